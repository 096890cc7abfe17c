package devices_test

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/beaconmq/beacon/devices"
)

// requireTool finds a Debian tool; in CI a missing one fails the test.
func requireTool(t *testing.T, name, pkg string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err == nil {
		return p
	}
	msg := name + " not found: install the Debian package " + pkg + " (make test does)"
	if os.Getenv("CI") != "" {
		t.Fatal(msg)
	}
	t.Skip(msg)
	return ""
}

// mosquittoPasswd makes a password file with Debian's mosquitto_passwd:
// users maps a name to [hash algorithm, password].
func mosquittoPasswd(t *testing.T, users [][3]string) string {
	t.Helper()
	bin := requireTool(t, "mosquitto_passwd", "mosquitto")
	path := filepath.Join(t.TempDir(), "passwd")
	for i, u := range users {
		args := []string{"-H", u[1], "-b"}
		if i == 0 {
			args = append(args, "-c")
		}
		args = append(args, path, u[0], u[2])
		if out, err := exec.Command(bin, args...).CombinedOutput(); err != nil {
			t.Fatalf("mosquitto_passwd %v: %v: %s", args, err, out)
		}
	}
	return path
}

func TestImportMosquittoHashes(t *testing.T) {
	path := mosquittoPasswd(t, [][3]string{
		{"alice", "sha512-pbkdf2", "alice-old-pass"},
		{"bob", "sha512", "bob pass with spaces"},
		{"carol.sensor-1", "sha512-pbkdf2", "é unicode ü"},
	})
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	entries, err := devices.ParsePasswdFile(path, f)
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != 3 || !strings.HasPrefix(entries[0].Hash, "$7$") || !strings.HasPrefix(entries[1].Hash, "$6$") {
		t.Fatalf("entries: %+v", entries)
	}
	r, err := devices.OpenRegistry(openStore(t, t.TempDir()))
	if err != nil {
		t.Fatal(err)
	}
	passwords := map[string]string{"alice": "alice-old-pass", "bob": "bob pass with spaces", "carol.sensor-1": "é unicode ü"}
	for _, e := range entries {
		d, secret, err := r.Add(devices.NewDevice{ID: e.Username, PasswordHash: e.Hash})
		if err != nil {
			t.Fatal(err)
		}
		if secret != "" || d.SecretHash != nil || d.SecretScheme == "" {
			t.Fatalf("imported %s: secret %q, %+v", e.Username, secret, d)
		}
	}
	for id, pw := range passwords {
		if _, err := r.Authenticate(id, pw); err != nil {
			t.Fatalf("%s with the Mosquitto password: %v", id, err)
		}
		for _, wrong := range []string{"", pw + "x", pw[:len(pw)-1], strings.ToUpper(pw)} {
			if _, err := r.Authenticate(id, wrong); !errors.Is(err, devices.ErrBadCredentials) {
				t.Fatalf("%s with %q: %v", id, wrong, err)
			}
		}
	}
	if d, _ := r.Get("bob"); d.SecretScheme != devices.SchemeSHA512 {
		t.Fatalf("bob's scheme: %q", d.SecretScheme)
	}
	// Rotating gives Beacon's own secret; the Mosquitto password stops working.
	secret, err := r.Rotate("alice")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := r.Authenticate("alice", "alice-old-pass"); !errors.Is(err, devices.ErrBadCredentials) {
		t.Fatalf("old password after rotate: %v", err)
	}
	if d, err := r.Authenticate("alice", secret); err != nil || d.SecretScheme != "" {
		t.Fatalf("new secret after rotate: %+v %v", d, err)
	}
}

func TestChosenSecret(t *testing.T) {
	r, err := devices.OpenRegistry(openStore(t, t.TempDir()))
	if err != nil {
		t.Fatal(err)
	}
	var fe *devices.FieldError
	for _, bad := range []string{"short", strings.Repeat("x", devices.MinChosenSecret-1), "a-long-enough-secret\nwith a newline"} {
		if _, _, err := r.Add(devices.NewDevice{ID: "d1", Secret: bad}); !errors.As(err, &fe) || fe.Field != "secret" {
			t.Fatalf("secret %q: %v", bad, err)
		}
	}
	chosen := "correct horse battery staple"
	d, secret, err := r.Add(devices.NewDevice{ID: "d1", Secret: chosen})
	if err != nil || secret != "" || d.SecretScheme != devices.SchemePBKDF2SHA512 {
		t.Fatalf("add: %+v %q %v", d, secret, err)
	}
	if _, err := r.Authenticate("d1", chosen); err != nil {
		t.Fatal(err)
	}
	if _, err := r.Authenticate("d1", chosen+" "); !errors.Is(err, devices.ErrBadCredentials) {
		t.Fatalf("wrong: %v", err)
	}
	if _, _, err := r.Add(devices.NewDevice{ID: "d2", Secret: chosen, PasswordHash: "$6$x$y"}); !errors.As(err, &fe) {
		t.Fatalf("both: %v", err)
	}
}

func TestParsePasswdFileErrors(t *testing.T) {
	salt12 := "QfUj8bOHfrhuapdW"
	sum := strings.Repeat("A", 86) + "=="
	for _, tc := range []struct{ name, file, want string }{
		{"plain text", "alice:secret\n", "passwd:1: user \"alice\" has a plain-text password"},
		{"no colon", "# comment\n\nalice\n", "passwd:3: expected username:hash"},
		{"bad id", "a/b:$6$" + salt12 + "$" + sum + "\n", "cannot be a device id"},
		{"argon2", "alice:$argon2id$v=19$m=47104,t=1,p=1$x$y\n", "argon2id is not supported"},
		{"huge iterations", "alice:$7$999999999$" + salt12 + "$" + sum + "\n", "iterations is more than"},
		{"short hash", "alice:$7$101$" + salt12 + "$AAAA\n", "hash is not 64 bytes"},
		{"bad salt", "alice:$6$AAAA$" + sum + "\n", "salt is not 12 or 64 bytes"},
		{"duplicate", "a:$6$" + salt12 + "$" + sum + "\na:$6$" + salt12 + "$" + sum + "\n", "already on line 1"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := devices.ParsePasswdFile("passwd", strings.NewReader(tc.file))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want %q", err, tc.want)
			}
			if strings.Contains(err.Error(), sum) {
				t.Fatalf("the error quotes the hash: %v", err)
			}
		})
	}
	entries, err := devices.ParsePasswdFile("passwd", strings.NewReader("# users\r\nalice:$6$"+salt12+"$"+sum+"\r\n\n"))
	if err != nil || len(entries) != 1 || entries[0].Line != 2 {
		t.Fatalf("%+v %v", entries, err)
	}
}
