package main

import (
	"context"
	"encoding/json"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"

	bt "github.com/beaconmq/beacon/broker/brokertest"
)

// TestDevicesAndTokensEndToEnd provisions a device with the CLI on a
// stopped broker's data directory, runs the binary, and checks every way
// in with mosquitto clients: the device's secret, a wrong secret, a minted
// token, the CLI against the running broker's admin API, and a SIGHUP
// reload that keeps connections.
func TestDevicesAndTokensEndToEnd(t *testing.T) {
	mosqPubBin := bt.RequireTool(t, "mosquitto_pub", "mosquitto-clients")
	dir := t.TempDir()
	data := filepath.Join(dir, "data")
	acl := filepath.Join(dir, "acl.yaml")
	writeFile(t, acl, "rules:\n  - subjects: [device]\n    actions: [publish]\n    topics: [\"devices/%u/#\"]\n    effect: allow\n"+
		"  - subjects: [\"role:viewer\"]\n    actions: [subscribe]\n    topics: [\"devices/#\"]\n    effect: allow\n")
	conf := filepath.Join(dir, "beacon.yaml")
	writeFile(t, conf, "storage:\n  dir: "+data+"\nauth:\n  acl_file: "+acl+
		"\n  admin_token: admin-token-0123456789\n  jwt_secret: jwt-secret-0123456789-0123456789-xx\n  fail_delay: 0s\n")

	// Provision while the broker is stopped: straight into the data directory.
	code, out, errOut := runCLI(t, nil, "devices", "add", "sensor-1", "--type", "thermo", "--tag", "room=hall", "--config", conf, "--json")
	if code != 0 {
		t.Fatalf("devices add: %d %s", code, errOut)
	}
	var added struct {
		Secret string `json:"secret"`
	}
	if err := json.Unmarshal([]byte(out), &added); err != nil || added.Secret == "" {
		t.Fatalf("devices add --json: %q %v", out, err)
	}

	p := startBeacon(t, data, "--config", conf)
	host, port, _ := net.SplitHostPort(p.mqtt)
	tokCode, tokOut, tokErr := runCLI(t, nil, "token", "--config", conf, "--sub", "dashboard", "--role", "viewer", "--ttl", "1h")
	if tokCode != 0 {
		t.Fatalf("token: exit %d: %s", tokCode, tokErr)
	}
	tok := strings.TrimSpace(tokOut)

	viewer := startMosqSub(t, p.mqtt, "-i", "viewer", "-u", "dashboard", "-P", tok, "-t", "devices/#", "-C", "2", "-F", "%t %p")
	pub := func(user, pass, topic, msg string) (string, error) {
		out, err := exec.Command(mosqPubBin, "-h", host, "-p", port, "-u", user, "-P", pass, "-q", "1", "-t", topic, "-m", msg).CombinedOutput()
		return string(out), err
	}
	if out, err := pub("sensor-1", added.Secret, "devices/sensor-1/temp", "21.5"); err != nil {
		t.Fatalf("device publish: %v %s", err, out)
	}
	// Every refusal, as mosquitto_pub (MQTT 3.1.1) reports it.
	code, out, errOut = runCLI(t, nil, "devices", "add", "retired", "--config", conf, "--http-addr", p.http, "--json")
	var retired struct{ Secret string }
	if code != 0 || json.Unmarshal([]byte(out), &retired) != nil {
		t.Fatalf("devices add through the API: %s", errOut)
	}
	if code, _, errOut := runCLI(t, nil, "devices", "disable", "retired", "--config", conf, "--http-addr", p.http); code != 0 {
		t.Fatalf("devices disable: %s", errOut)
	}
	for _, tc := range []struct{ name, user, pass, want string }{
		{"wrong secret", "sensor-1", "wrong", "bad user name or password"},
		{"unknown device", "ghost", "x", "bad user name or password"},
		{"disabled device", "retired", retired.Secret, "not authori"},
		{"anonymous", "", "", "not authori"},
		{"malformed token", "anyone", "eyJhbGciOiJIUzI1NiJ9.e30.bad", "bad user name or password"},
	} {
		args := []string{"-h", host, "-p", port, "-q", "1", "-t", "devices/x/t", "-m", "x"}
		if tc.user != "" {
			args = append(args, "-u", tc.user)
		}
		if tc.pass != "" {
			args = append(args, "-P", tc.pass)
		}
		out, err := exec.Command(mosqPubBin, args...).CombinedOutput()
		if err == nil || !strings.Contains(strings.ToLower(string(out)), tc.want) {
			t.Errorf("%s: %v %q, want a refusal saying %q", tc.name, err, out, tc.want)
		}
	}

	// The broker holds the data directory: the CLI goes through the admin API.
	if code, out, errOut := runCLI(t, nil, "devices", "list", "--config", conf, "--http-addr", p.http); code != 0 || !strings.Contains(out, "sensor-1") {
		t.Fatalf("devices list against the running broker: %d %q %s", code, out, errOut)
	}
	code, out, errOut = runCLI(t, nil, "devices", "rotate", "sensor-1", "--config", conf, "--http-addr", p.http, "--json")
	var rotated struct{ Secret string }
	if code != 0 || json.Unmarshal([]byte(out), &rotated) != nil || rotated.Secret == "" {
		t.Fatalf("devices rotate: %d %q %s", code, out, errOut)
	}
	if out, err := pub("sensor-1", added.Secret, "devices/sensor-1/temp", "old"); err == nil {
		t.Fatalf("the old secret works after rotate: %s", out)
	}

	// SIGHUP reloads the rules; the viewer's connection stays.
	writeFile(t, acl, "rules:\n  - subjects: [device]\n    actions: [publish]\n    topics: [\"devices/%u/#\"]\n    effect: allow\n"+
		"  - subjects: [\"role:viewer\"]\n    actions: [subscribe]\n    topics: [\"devices/#\"]\n    effect: allow\n"+
		"  - subjects: [device]\n    actions: [subscribe]\n    topics: [\"devices/%u/cmd/#\"]\n    effect: allow\n")
	if err := p.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	bt.WaitFor(t, 5*time.Second, "the reload", func() bool { return strings.Contains(p.Logs(), `"ACL reloaded"`) })
	if out, err := pub("sensor-1", rotated.Secret, "devices/sensor-1/temp", "22.0"); err != nil {
		t.Fatalf("device publish with the rotated secret: %v %s", err, out)
	}
	got := strings.Join(viewer.wait(t, 10*time.Second), "|")
	if got != "devices/sensor-1/temp 21.5|devices/sensor-1/temp 22.0" {
		t.Fatalf("viewer got %q", got)
	}

	// The same token over MQTT 5: publishing is not in its rules, and the
	// client is told so.
	c := bt.Dial(t, p.mqtt, &paho.Connect{ClientID: "jwt5", CleanStart: true, Password: []byte(tok), PasswordFlag: true})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if r, _ := c.Publish(ctx, &paho.Publish{Topic: "devices/sensor-1/temp", QoS: 1, Payload: []byte("spoof")}); r == nil || r.ReasonCode != 0x87 {
		t.Fatalf("viewer publish: %+v, want PUBACK 0x87", r)
	}
}

func writeFile(t *testing.T, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
}
