package broker

import (
	"path/filepath"
	"strings"
)

// pathKeys are the keys that name files or directories. Set in a
// configuration file, a relative one is resolved from that file's
// directory; set by an environment variable or a flag, from the working
// directory.
var pathKeys = []struct {
	key  string
	list bool // comma-separated
	ptr  func(*Config) *string
}{
	{"storage.dir", false, func(c *Config) *string { return &c.Storage.Dir }},
	{"mqtt.tls_cert", false, func(c *Config) *string { return &c.MQTT.TLSCert }},
	{"mqtt.tls_key", false, func(c *Config) *string { return &c.MQTT.TLSKey }},
	{"mqtt.tls_client_ca", false, func(c *Config) *string { return &c.MQTT.TLSClientCA }},
	{"http.tls_cert", false, func(c *Config) *string { return &c.HTTP.TLSCert }},
	{"http.tls_key", false, func(c *Config) *string { return &c.HTTP.TLSKey }},
	{"auth.acl_file", false, func(c *Config) *string { return &c.Auth.ACLFile }},
	{"auth.admin_token_file", false, func(c *Config) *string { return &c.Auth.AdminTokenFile }},
	{"auth.jwt_secret_file", false, func(c *Config) *string { return &c.Auth.JWTSecretFile }},
	{"auth.jwt_public_keys", true, func(c *Config) *string { return &c.Auth.JWTPublicKeys }},
	{"auth.jwks_file", false, func(c *Config) *string { return &c.Auth.JWKSFile }},
	{"cluster.redis_password_file", false, func(c *Config) *string { return &c.Cluster.RedisPasswordFile }},
}

// resolveFilePaths makes the relative paths the file at path set (the
// keys in set) relative to the file's directory.
func resolveFilePaths(c *Config, path string, set map[string]int) {
	dir := filepath.Dir(path)
	for _, k := range pathKeys {
		if _, ok := set[k.key]; !ok {
			continue
		}
		p := k.ptr(c)
		if !k.list {
			*p = resolvePath(dir, *p)
			continue
		}
		parts := strings.Split(*p, ",")
		for i, f := range parts {
			if f = strings.TrimSpace(f); f != "" {
				parts[i] = resolvePath(dir, f)
			}
		}
		*p = strings.Join(parts, ",")
	}
}

func resolvePath(dir, p string) string {
	if p == "" || filepath.IsAbs(p) {
		return p
	}
	return filepath.Join(dir, p)
}

// absPaths returns c with every relative path made absolute (from the
// working directory), for printing.
func (c Config) absPaths() Config {
	for _, k := range pathKeys {
		p := k.ptr(&c)
		parts := []string{*p}
		if k.list {
			parts = strings.Split(*p, ",")
		}
		for i, f := range parts {
			f = strings.TrimSpace(f)
			if f != "" && !filepath.IsAbs(f) {
				if a, err := filepath.Abs(f); err == nil {
					f = a
				}
			}
			parts[i] = f
		}
		*p = strings.Join(parts, ",")
	}
	return c
}
