package broker

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestValidateClientCertKeys(t *testing.T) {
	dir := t.TempDir()
	pem := filepath.Join(dir, "f.pem")
	if err := os.WriteFile(pem, []byte("not used"), 0o600); err != nil {
		t.Fatal(err)
	}
	tlsOn := func(c *Config) { c.MQTT.TLSAddr, c.MQTT.TLSCert, c.MQTT.TLSKey = "127.0.0.1:0", pem, pem }
	for _, tc := range []struct {
		key, want string
		mutate    func(*Config)
	}{
		{"mqtt.tls_client_ca", "set mqtt.tls_addr", func(c *Config) { c.MQTT.TLSClientCA = pem }},
		{"mqtt.tls_require_client_cert", "needs mqtt.tls_client_ca", func(c *Config) { tlsOn(c); c.MQTT.TLSRequireClientCert = true }},
		{"mqtt.tls_identity", `"email" is not cn or san`, func(c *Config) { tlsOn(c); c.MQTT.TLSClientCA = pem; c.MQTT.TLSIdentity = "email" }},
		{"mqtt.tls_client_ca", "no/such", func(c *Config) { tlsOn(c); c.MQTT.TLSClientCA = filepath.Join(dir, "no/such") }},
	} {
		t.Run(tc.key, func(t *testing.T) {
			cfg := Default()
			tc.mutate(&cfg)
			var ce *ConfigError
			if err := cfg.Validate(); !errors.As(err, &ce) || ce.Key != tc.key || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Validate() = %v, want %s: %s", err, tc.key, tc.want)
			}
		})
	}
	cfg := Default()
	tlsOn(&cfg)
	cfg.MQTT.TLSClientCA, cfg.MQTT.TLSRequireClientCert, cfg.MQTT.TLSIdentity = pem, true, "san"
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	// A CA file without a certificate is named when the listener starts.
	var ce *ConfigError
	if err := clientCertConfig(nil, cfg.MQTT); !errors.As(err, &ce) || ce.Key != "mqtt.tls_client_ca" || !strings.Contains(err.Error(), "no PEM certificate") {
		t.Fatalf("clientCertConfig: %v", err)
	}
}
