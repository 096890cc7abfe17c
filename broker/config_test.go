package broker

import (
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"
)

func TestDefaultsAreLoopbackAndValid(t *testing.T) {
	cfg := Default()
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	for _, a := range []string{cfg.MQTT.Addr, cfg.HTTP.Addr} {
		if !IsLoopback(a) {
			t.Errorf("default address %q is not loopback", a)
		}
	}
}

func TestIsLoopback(t *testing.T) {
	for addr, want := range map[string]bool{
		"127.0.0.1:1883": true, "[::1]:1883": true, "localhost:1883": true, "127.3.4.5:1": true,
		"0.0.0.0:1883": false, ":1883": false, "[::]:1883": false, "192.168.1.2:1883": false, "example.com:1883": false,
	} {
		if got := IsLoopback(addr); got != want {
			t.Errorf("IsLoopback(%q) = %v, want %v", addr, got, want)
		}
	}
}

// TestExampleConfigDocumentsEveryKey keeps docs/beacon.example.yaml and
// docs/configuration.md in step with Config: the example must set every key
// to its default, and the reference must name every key and variable.
func TestExampleConfigDocumentsEveryKey(t *testing.T) {
	example := filepath.Join("..", "docs", "beacon.example.yaml")
	cfg, err := Load(example, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	want := Default()
	want.Storage.Dir = filepath.Join("..", "docs", want.Storage.Dir) // relative paths in a file resolve from its directory
	if !reflect.DeepEqual(cfg, want) {
		t.Errorf("%s differs from the defaults:\n got %+v\nwant %+v", example, cfg, want)
	}
	src := &Source{File: example, lines: map[string]int{}, from: map[string]string{}}
	data, err := os.ReadFile(example)
	if err != nil {
		t.Fatal(err)
	}
	var scratch = Default()
	if err := decodeYAML(data, &scratch, src); err != nil {
		t.Fatal(err)
	}
	ref, err := os.ReadFile(filepath.Join("..", "docs", "configuration.md"))
	if err != nil {
		t.Fatal(err)
	}
	for _, key := range configKeys() {
		if _, ok := src.lines[key]; !ok {
			t.Errorf("%s does not set %s", example, key)
		}
		if !strings.Contains(string(ref), "`"+key+"`") {
			t.Errorf("docs/configuration.md does not document `%s`", key)
		}
		if !strings.Contains(string(ref), EnvName(key)) {
			t.Errorf("docs/configuration.md does not name %s", EnvName(key))
		}
	}
}

func TestLoadEmptyFileAndEnv(t *testing.T) {
	path := filepath.Join(t.TempDir(), "empty.yaml")
	if err := os.WriteFile(path, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, err := Load(path, []string{"PATH=/bin", "BEACON_STORAGE_SYNC=always", "BEACON_MQTT_KEEPALIVE_MAX=90s", "BEACON_MQTT_SHARED_SUBSCRIPTIONS=false"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Storage.Sync != "always" || cfg.MQTT.KeepaliveMax != 90*time.Second || cfg.MQTT.SharedSubs {
		t.Fatalf("env not applied: %+v", cfg)
	}
}

func TestValidateNamesKey(t *testing.T) {
	cases := []struct {
		key    string
		mutate func(*Config)
	}{
		{"mqtt.addr", func(c *Config) { c.MQTT.Addr = ""; c.MQTT.TLSAddr = "" }},
		{"mqtt.tls_addr", func(c *Config) { c.MQTT.TLSAddr = "127.0.0.1:8883" }},
		{"mqtt.tls_cert", func(c *Config) { c.MQTT.TLSCert = "/no/such/cert.pem" }},
		{"mqtt.max_packet_size", func(c *Config) { c.MQTT.MaxPacketSize = 10 }},
		{"mqtt.max_session_expiry", func(c *Config) { c.MQTT.MaxSessionExpiry = 0 }},
		{"mqtt.max_queued_messages", func(c *Config) { c.MQTT.MaxQueuedMessages = 0 }},
		{"mqtt.keepalive_min", func(c *Config) { c.MQTT.KeepaliveMin = 1500 * time.Millisecond }},
		{"mqtt.keepalive_min", func(c *Config) { c.MQTT.KeepaliveMin = time.Minute; c.MQTT.KeepaliveMax = time.Second }},
		{"mqtt.max_qos", func(c *Config) { c.MQTT.MaxQoS = 3 }},
		{"http.addr", func(c *Config) { c.HTTP.Addr = "127.0.0.1:99999" }},
		{"storage.dir", func(c *Config) { c.Storage.Dir = "" }},
		{"log.level", func(c *Config) { c.Log.Level = "loud" }},
		{"cluster.redis_url", func(c *Config) { c.Cluster.RedisURL = "http://127.0.0.1:6379" }},
		{"cluster.redis_url", func(c *Config) { c.Cluster.RedisURL = "redis://127.0.0.1:26379/0?master_name=b&no_such_option=1" }},
		{"cluster.node_id", func(c *Config) { c.Cluster.RedisURL = "redis://127.0.0.1:6379/0"; c.Cluster.NodeID = "a:b" }},
	}
	for _, tc := range cases {
		t.Run(tc.key, func(t *testing.T) {
			cfg := Default()
			tc.mutate(&cfg)
			var ce *ConfigError
			if err := cfg.Validate(); !errors.As(err, &ce) || ce.Key != tc.key {
				t.Fatalf("Validate() = %v, want an error naming %s", err, tc.key)
			}
		})
	}
}

func TestHistoryRulesFromFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "h.yaml")
	write := func(doc string) {
		if err := os.WriteFile(path, []byte(doc), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write("history:\n  rules:\n    - filter: devices/+/telemetry\n      max_messages: 5\n    - filter: \"#\"\n      max_age: 0s\n")
	cfg, err := Load(path, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	want := []HistoryRuleConfig{{Filter: "devices/+/telemetry", MaxMessages: 5, MaxAge: 24 * time.Hour}, {Filter: "#", MaxMessages: 10000}}
	if !reflect.DeepEqual(cfg.History.Rules, want) {
		t.Fatalf("rules %+v, want %+v (omitted keys take the defaults)", cfg.History.Rules, want)
	}
	for _, tc := range []struct{ doc, want string }{
		{"history:\n  rules:\n    - filter: a/#\n    - filter: a/#/b\n", "h.yaml:4: history.rules[1].filter"},
		{"history:\n  rules:\n    - filter: a\n      max_mesages: 3\n", `h.yaml:4: history.rules[0].max_mesages: unknown key (did you mean "max_messages"?)`},
		{"history:\n  rules:\n    - filter: a\n      max_messages: 0\n", "h.yaml:4: history.rules[0].max_messages"},
		{"history:\n  rules: devices/#\n", "h.yaml:2: history.rules: expected a list"},
	} {
		write(tc.doc)
		if _, err := Load(path, nil, nil); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: %v, want %q", tc.doc, err, tc.want)
		}
	}
	ref, _ := os.ReadFile(filepath.Join("..", "docs", "configuration.md"))
	for _, key := range ListKeys() {
		if !strings.Contains(string(ref), "`"+key+"`") {
			t.Errorf("docs/configuration.md does not document `%s`", key)
		}
	}
}

func TestExampleConfigsLoad(t *testing.T) {
	for _, path := range []string{"../examples/sensor-fleet/beacon.yaml"} {
		cfg, err := Load(path, nil, nil)
		if err != nil {
			t.Fatalf("%s: %v", path, err)
		}
		if len(cfg.Codecs) == 0 {
			t.Fatalf("%s: no codecs", path)
		}
	}
}

func FuzzLoad(f *testing.F) {
	example, _ := os.ReadFile(filepath.Join("..", "docs", "beacon.example.yaml"))
	f.Add(string(example))
	f.Add("mqtt:\n  addr: 127.0.0.1:1\n")
	f.Add("mqtt: [1, 2]\n")
	f.Add("a: &x\n  b: *x\n")
	f.Add("storage:\n  sync_interval: 1h\n  sync: none\n")
	dir := f.TempDir()
	f.Fuzz(func(t *testing.T, doc string) {
		path := filepath.Join(dir, "fuzz.yaml")
		if err := os.WriteFile(path, []byte(doc), 0o600); err != nil {
			t.Fatal(err)
		}
		cfg, err := Load(path, nil, nil)
		if err != nil {
			var ce *ConfigError
			if !errors.As(err, &ce) {
				t.Fatalf("error %v is not a *ConfigError", err)
			}
			if ce.Key == "" {
				t.Fatalf("error %v names no key", err)
			}
			return
		}
		if err := cfg.Validate(); err != nil {
			t.Fatalf("Load accepted an invalid config: %v", err)
		}
	})
}
