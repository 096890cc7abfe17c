package main

import (
	"encoding/json"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// cli runs the built binary with a clean environment.
func cli(t *testing.T, args ...string) (string, error) {
	t.Helper()
	cmd := exec.Command(beaconBin, args...)
	cmd.Env = cleanEnv()
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// TestDevicesCLIFindsRunningBroker manages devices on a broker running on a
// random port with no admin token or address configured: the CLI finds it
// through the file in the data directory; stopped (cleanly or killed), the
// CLI works on the data directory again.
func TestDevicesCLIFindsRunningBroker(t *testing.T) {
	data := filepath.Join(t.TempDir(), "data")
	p := startBeacon(t, data)
	file := filepath.Join(data, "admin.json")
	st, err := os.Stat(file)
	if err != nil {
		t.Fatalf("local admin file: %v", err)
	}
	if st.Mode().Perm() != 0o600 {
		t.Fatalf("local admin file mode %v, want 0600", st.Mode().Perm())
	}
	var la struct{ URL, Token string }
	raw, _ := os.ReadFile(file)
	if err := json.Unmarshal(raw, &la); err != nil || len(la.Token) < 32 {
		t.Fatalf("local admin file %q: %v", raw, err)
	}
	u, _ := url.Parse(la.URL)
	_, port, _ := net.SplitHostPort(p.http)
	if u.Host != "127.0.0.1:"+port {
		t.Fatalf("local admin file names %s, broker listens on %s", la.URL, p.http)
	}
	if strings.Contains(p.Logs(), la.Token) {
		t.Fatal("the local admin credential is in the log")
	}

	out, err := cli(t, "devices", "add", "kitchen-1", "--data-dir", data, "--json")
	var added struct{ Secret string }
	if err != nil || json.Unmarshal([]byte(out), &added) != nil || added.Secret == "" {
		t.Fatalf("devices add against the running broker: %v %s", err, out)
	}
	// The running broker knows it at once: the device may connect.
	mosqPub(t, p.mqtt, "-u", "kitchen-1", "-P", added.Secret, "-t", "devices/kitchen-1/temp", "-m", "1")
	if out, err := cli(t, "devices", "add", "hall-2", "--data-dir", data); err != nil {
		t.Fatalf("devices add: %v %s", err, out)
	}
	if out, err := cli(t, "devices", "list", "--data-dir", data); err != nil || !strings.Contains(out, "kitchen-1") || !strings.Contains(out, "hall-2") {
		t.Fatalf("devices list against the running broker: %v %s", err, out)
	}
	if out, err := cli(t, "devices", "remove", "hall-2", "--data-dir", data); err != nil {
		t.Fatalf("devices remove: %v %s", err, out)
	}

	if code := p.stop(t, syscall.SIGTERM); code != 0 {
		t.Fatalf("exit %d", code)
	}
	if _, err := os.Stat(file); !os.IsNotExist(err) {
		t.Fatalf("local admin file after a clean stop: %v", err)
	}
	out, err = cli(t, "devices", "list", "--data-dir", data)
	if err != nil || !strings.Contains(out, "kitchen-1") || strings.Contains(out, "hall-2") {
		t.Fatalf("devices list on the stopped broker's data: %v %s", err, out)
	}

	// Killed: the file stays behind, stale; the CLI opens the data directory.
	p = startBeacon(t, data)
	p.kill(t)
	if _, err := os.Stat(file); err != nil {
		t.Fatalf("local admin file after SIGKILL: %v (the test expects it stale)", err)
	}
	if out, err := cli(t, "devices", "add", "porch-3", "--data-dir", data); err != nil {
		t.Fatalf("devices add with a stale local admin file: %v %s", err, out)
	}
	if out, err := cli(t, "devices", "list", "--data-dir", data); err != nil || !strings.Contains(out, "porch-3") {
		t.Fatalf("devices list: %v %s", err, out)
	}
}
