package broker_test

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/beaconmq/beacon/broker"
)

// TestConfigPathsRelativeToFile: relative paths in a configuration file
// are the file's neighbours wherever the broker is started; paths from the
// environment or flags stay relative to the working directory, and
// absolute ones are kept.
func TestConfigPathsRelativeToFile(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "etc")
	if err := os.MkdirAll(filepath.Join(dir, "keys"), 0o700); err != nil {
		t.Fatal(err)
	}
	abs := filepath.Join(t.TempDir(), "abs.pem")
	cwd := t.TempDir()
	t.Chdir(cwd)
	for _, f := range []string{filepath.Join(dir, "acl.yaml"), filepath.Join(dir, "jwt.secret"), filepath.Join(dir, "keys/a.pem"), abs,
		filepath.Join(cwd, "jwks.json")} {
		if err := os.WriteFile(f, []byte("rules: []\n# 0123456789abcdef0123456789abcdef\n"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	conf := filepath.Join(dir, "beacon.yaml")
	if err := os.WriteFile(conf, []byte("storage:\n  dir: data\nauth:\n  acl_file: acl.yaml\n  jwt_secret_file: ./jwt.secret\n"+
		"  jwt_public_keys: keys/a.pem, "+abs+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, err := broker.Load(conf, []string{"BEACON_AUTH_JWKS_FILE=jwks.json"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ key, got, want string }{
		{"storage.dir", cfg.Storage.Dir, filepath.Join(dir, "data")},
		{"auth.acl_file", cfg.Auth.ACLFile, filepath.Join(dir, "acl.yaml")},
		{"auth.jwt_secret_file", cfg.Auth.JWTSecretFile, filepath.Join(dir, "jwt.secret")},
		{"auth.jwt_public_keys", cfg.Auth.JWTPublicKeys, filepath.Join(dir, "keys/a.pem") + "," + abs},
		{"auth.jwks_file (env)", cfg.Auth.JWKSFile, "jwks.json"},
	} {
		if tc.got != tc.want {
			t.Errorf("%s = %q, want %q", tc.key, tc.got, tc.want)
		}
	}
	// A flag overrides the file's value and is taken as given.
	cfg, err = broker.Load(conf, nil, map[string]string{"storage.dir": "here"})
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Storage.Dir != "here" {
		t.Errorf("storage.dir from a flag = %q, want %q", cfg.Storage.Dir, "here")
	}
}
