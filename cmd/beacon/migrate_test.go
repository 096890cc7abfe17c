package main

import (
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	bt "github.com/beaconmq/beacon/broker/brokertest"
)

// runBin runs the built binary with stdin and returns its exit code and
// combined output.
func runBin(t *testing.T, input string, args ...string) (int, string) {
	t.Helper()
	cmd := exec.Command(beaconBin, args...)
	cmd.Env = cleanEnv()
	if input != "" {
		cmd.Stdin = strings.NewReader(input)
	}
	out, err := cmd.CombinedOutput()
	if err != nil {
		if ee, ok := err.(*exec.ExitError); ok {
			return ee.ExitCode(), string(out)
		}
		t.Fatalf("beacon %v: %v", args, err)
	}
	return 0, string(out)
}

// makePasswd writes a password file with Debian's mosquitto_passwd; each
// user is {name, algorithm, password}.
func makePasswd(t *testing.T, path string, users ...[3]string) {
	t.Helper()
	bin := bt.RequireTool(t, "mosquitto_passwd", "mosquitto")
	for i, u := range users {
		args := []string{"-H", u[1], "-b"}
		if i == 0 {
			args = append(args, "-c")
		}
		args = append(args, path, u[0], u[2])
		if out, err := exec.Command(bin, args...).CombinedOutput(); err != nil {
			t.Fatalf("mosquitto_passwd %v: %v: %s", args[:len(args)-1], err, out)
		}
	}
}

// mosqPubResult runs mosquitto_pub and returns its error and output.
func mosqPubResult(t *testing.T, addr string, args ...string) (string, error) {
	t.Helper()
	bin := bt.RequireTool(t, "mosquitto_pub", "mosquitto-clients")
	host, port, _ := net.SplitHostPort(addr)
	out, err := exec.Command(bin, append([]string{"-h", host, "-p", port}, args...)...).CombinedOutput()
	return string(out), err
}

const migrateRules = `rules:
  - subjects: [device]
    actions: [publish]
    topics: ["devices/%u/#"]
    effect: allow
  - subjects: [device]
    actions: [subscribe]
    topics: ["devices/#"]
    effect: allow
`

// TestImportMosquittoPasswd: a password file made by Mosquitto's own tool
// is imported into a data directory; the built broker then admits the old
// passwords ($7$ and $6$) from mosquitto_pub and refuses wrong ones. A
// secret chosen with --secret-stdin works alike, offline and through the
// running broker's admin API, and is never printed.
func TestImportMosquittoPasswd(t *testing.T) {
	dir := t.TempDir()
	data := filepath.Join(dir, "data")
	passwd := filepath.Join(dir, "passwd")
	makePasswd(t, passwd,
		[3]string{"alice", "sha512-pbkdf2", "alice-old-pass"},
		[3]string{"bob", "sha512", "bob-old-pass"})
	code, out := runBin(t, "", "devices", "import", "--mosquitto-passwd", passwd, "--data-dir", data, "--type", "sensor")
	if code != 0 || !strings.Contains(out, "imported alice") || !strings.Contains(out, "2 imported, 0 skipped, 0 failed") {
		t.Fatalf("import: exit %d\n%s", code, out)
	}
	// Again: nothing changes, both are skipped.
	if code, out := runBin(t, "", "devices", "import", "--mosquitto-passwd", passwd, "--data-dir", data); code != 0 || !strings.Contains(out, "0 imported, 2 skipped") {
		t.Fatalf("second import: exit %d\n%s", code, out)
	}
	chosen := "carol's chosen secret 42"
	if code, out := runBin(t, "short\n", "devices", "add", "carol", "--secret-stdin", "--data-dir", data); code == 0 || !strings.Contains(out, "shorter than 16 bytes") || strings.Contains(out, "short\n") {
		t.Fatalf("short secret: exit %d\n%s", code, out)
	}
	code, out = runBin(t, chosen+"\n", "devices", "add", "carol", "--secret-stdin", "--data-dir", data)
	if code != 0 || strings.Contains(out, chosen) || !strings.Contains(out, "device carol added") {
		t.Fatalf("add --secret-stdin: exit %d\n%s", code, out)
	}
	code, out = runBin(t, "", "devices", "show", "alice", "--data-dir", data)
	if code != 0 || !strings.Contains(out, `"secret_scheme": "pbkdf2-sha512"`) || strings.Contains(out, "secret_hash") {
		t.Fatalf("show: exit %d\n%s", code, out)
	}

	rules := filepath.Join(dir, "acl.yaml")
	conf := filepath.Join(dir, "beacon.yaml")
	if err := os.WriteFile(rules, []byte(migrateRules), 0o600); err != nil {
		t.Fatal(err)
	}
	const adminToken = "admin-token-for-the-import-test"
	if err := os.WriteFile(conf, []byte("auth:\n  acl_file: "+rules+"\n  admin_token: "+adminToken+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	p := startBeacon(t, data, "--config", conf)

	sub := startMosqSub(t, p.mqtt, "-u", "alice", "-P", "alice-old-pass", "-q", "1", "-t", "devices/#", "-C", "5", "-F", "%t %p")
	mosqPub(t, p.mqtt, "-u", "alice", "-P", "alice-old-pass", "-q", "1", "-t", "devices/alice/temp", "-m", "21.5")
	mosqPub(t, p.mqtt, "-u", "bob", "-P", "bob-old-pass", "-q", "1", "-t", "devices/bob/temp", "-m", "19")
	mosqPub(t, p.mqtt, "-u", "carol", "-P", chosen, "-q", "1", "-t", "devices/carol/temp", "-m", "7")
	for _, tc := range [][2]string{{"alice", "wrong"}, {"alice", "bob-old-pass"}, {"bob", "alice-old-pass"}, {"bob", ""}, {"nobody", "alice-old-pass"}} {
		args := []string{"-u", tc[0], "-q", "1", "-t", "devices/" + tc[0] + "/temp", "-m", "bad"}
		if tc[1] != "" {
			args = append(args, "-P", tc[1])
		}
		if out, err := mosqPubResult(t, p.mqtt, args...); err == nil || !strings.Contains(strings.ToLower(out), "refused") {
			t.Fatalf("%s with a wrong password: %v %s", tc[0], err, out)
		}
	}

	// Through the running broker: the CLI sends the chosen secret to the admin API.
	dave := "dave's chosen secret 4242"
	code, out = runBin(t, dave+"\n", "devices", "add", "dave", "--secret-stdin", "--server", "http://"+p.http, "--token", adminToken)
	if code != 0 || strings.Contains(out, dave) {
		t.Fatalf("add --secret-stdin via the API: exit %d\n%s", code, out)
	}
	mosqPub(t, p.mqtt, "-u", "dave", "-P", dave, "-q", "1", "-t", "devices/dave/temp", "-m", "8")
	// An import through the running broker: the hashes go through the admin API.
	more := filepath.Join(dir, "passwd2")
	makePasswd(t, more, [3]string{"erin", "sha512-pbkdf2", "erin-old-pass"}, [3]string{"alice", "sha512-pbkdf2", "another"})
	code, out = runBin(t, "", "devices", "import", "--mosquitto-passwd", more, "--server", "http://"+p.http, "--token", adminToken)
	if code != 0 || !strings.Contains(out, "imported erin") || !strings.Contains(out, "1 imported, 1 skipped, 0 failed") {
		t.Fatalf("import via the API: exit %d\n%s", code, out)
	}
	mosqPub(t, p.mqtt, "-u", "erin", "-P", "erin-old-pass", "-q", "1", "-t", "devices/erin/temp", "-m", "9")
	if out, err := mosqPubResult(t, p.mqtt, "-u", "alice", "-P", "another", "-t", "devices/alice/x", "-m", "0"); err == nil {
		t.Fatalf("a skipped user's new password was admitted: %s", out)
	}

	got := sub.wait(t, 20*time.Second)
	want := "devices/alice/temp 21.5|devices/bob/temp 19|devices/carol/temp 7|devices/dave/temp 8|devices/erin/temp 9"
	if strings.Join(got, "|") != want {
		t.Fatalf("subscriber got %q, want %q", got, want)
	}
	for _, secret := range []string{"alice-old-pass", "bob-old-pass", chosen, dave, "erin-old-pass"} {
		if strings.Contains(p.Logs(), secret) {
			t.Fatalf("the broker logged a password")
		}
	}
}
