package main

import (
	"encoding/json"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	bt "github.com/beaconmq/beacon/broker/brokertest"
)

// TestHelpAndVersion: beacon --help lists every subcommand on a line of
// its own with the serve flags, each subcommand's --help its flags, and
// --version the version.
func TestHelpAndVersion(t *testing.T) {
	for _, arg := range []string{"--help", "-h", "help"} {
		out, err := exec.Command(beaconBin, arg).CombinedOutput()
		if err != nil {
			t.Fatalf("beacon %s: %v %s", arg, err, out)
		}
		for _, want := range []string{"\n  beacon [serve] [flags]", "\n  beacon config print", "\n  beacon devices", "\n  beacon token",
			"\n  beacon healthcheck", "\n  beacon version", "-mqtt-addr", "-data-dir"} {
			if !strings.Contains(string(out), want) {
				t.Errorf("beacon %s lacks %q:\n%s", arg, want, out)
			}
		}
	}
	for _, arg := range []string{"--version", "-version", "version"} {
		out, err := exec.Command(beaconBin, arg).Output()
		if err != nil || !strings.HasPrefix(string(out), "beacon ") {
			t.Errorf("beacon %s: %q %v", arg, out, err)
		}
	}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"serve", "--help"}, "-http-addr"},
		{[]string{"token", "--help"}, "-subscribe"},
		{[]string{"devices", "--help"}, "beacon devices add NAME"},
		{[]string{"devices", "add", "--help"}, "-type"},
		{[]string{"config", "print", "--help"}, "-config"},
		{[]string{"healthcheck", "--help"}, "-http-addr"},
	} {
		out, err := exec.Command(beaconBin, tc.args...).CombinedOutput()
		if err != nil || !strings.Contains(string(out), tc.want) {
			t.Errorf("beacon %s: %v, want %q in:\n%s", strings.Join(tc.args, " "), err, tc.want, out)
		}
	}
}

// TestStartLogSaysWhereToConnect: the start log names the MQTT and
// dashboard URLs.
func TestStartLogSaysWhereToConnect(t *testing.T) {
	p := startBeacon(t, filepath.Join(t.TempDir(), "data"))
	// startBeacon returns at "http listening"; "beacon ready" follows it.
	bt.WaitFor(t, 10*time.Second, "the ready line", func() bool { return strings.Contains(p.Logs(), `"msg":"beacon ready"`) })
	var ready map[string]any
	for _, l := range strings.Split(p.Logs(), "\n") {
		if strings.Contains(l, `"msg":"beacon ready"`) {
			_ = json.Unmarshal([]byte(l), &ready)
		}
	}
	if ready["mqtt"] != "mqtt://"+p.mqtt || ready["dashboard"] != "http://"+p.http+"/" || ready["websocket"] != "ws://"+p.http+"/mqtt" {
		t.Fatalf("ready line %v; want mqtt://%s, http://%s/ and ws://%s/mqtt", ready, p.mqtt, p.http, p.http)
	}
}
