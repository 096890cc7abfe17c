package main

import (
	"bytes"
	"context"
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

func runCLI(t *testing.T, env []string, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	var o, e bytes.Buffer
	code = run(context.Background(), args, env, &o, &e)
	return code, o.String(), e.String()
}

func TestVersion(t *testing.T) {
	out, err := exec.Command(beaconBin, "version").Output()
	if err != nil || !strings.HasPrefix(string(out), "beacon ") {
		t.Fatalf("beacon version: %q %v", out, err)
	}
}

func TestConfigPrintPrecedence(t *testing.T) {
	dir := t.TempDir()
	conf := filepath.Join(dir, "beacon.yaml")
	if err := os.WriteFile(conf, []byte("mqtt:\n  addr: 127.0.0.1:1000\n  max_queued_messages: 7\nhttp:\n  addr: 127.0.0.1:2000\nlog:\n  level: debug\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	env := []string{"BEACON_HTTP_ADDR=127.0.0.1:3000", "BEACON_LOG_LEVEL=warn"}
	code, out, errOut := runCLI(t, env, "config", "print", "--config", conf, "--log-level", "error")
	if code != 0 {
		t.Fatalf("exit %d: %s", code, errOut)
	}
	for _, want := range []string{
		`addr: "127.0.0.1:1000"`,   // file over default
		"max_queued_messages: 7",   // file
		`addr: "127.0.0.1:3000"`,   // env over file
		`level: "error"`,           // flag over env over file
		"max_packet_size: 1048576", // default
		"max_session_expiry: 168h0m0s",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("config print lacks %q:\n%s", want, out)
		}
	}
	// What config print prints loads back to the same thing.
	back := filepath.Join(dir, "printed.yaml")
	if err := os.WriteFile(back, []byte(out), 0o600); err != nil {
		t.Fatal(err)
	}
	code, out2, errOut := runCLI(t, nil, "config", "print", "--config", back)
	if code != 0 || out2 != out {
		t.Fatalf("round trip: exit %d %s\n%s\n---\n%s", code, errOut, out, out2)
	}
}

func TestConfigErrors(t *testing.T) {
	dir := t.TempDir()
	cases := []struct {
		name, file string
		env        []string
		args       []string
		want       string
	}{
		{name: "unknown key", file: "mqtt:\n  addr: 127.0.0.1:1883\n  max_queued_mesages: 5\n",
			want: `beacon.yaml:3: mqtt.max_queued_mesages: unknown key (did you mean "max_queued_messages"?)`},
		{name: "unknown section", file: "mqqt:\n  addr: x\n", want: "beacon.yaml:1: mqqt: unknown key"},
		{name: "bad number", file: "mqtt:\n  max_queued_messages: lots\n", want: `beacon.yaml:2: mqtt.max_queued_messages: invalid number "lots"`},
		{name: "out of range", file: "mqtt:\n  max_queued_messages: 70000\n", want: "beacon.yaml:2: mqtt.max_queued_messages: invalid number"},
		{name: "bad duration", file: "storage:\n  sync_interval: 5\n", want: `beacon.yaml:2: storage.sync_interval: invalid duration "5"`},
		{name: "validation names line", file: "log:\n  format: xml\n", want: `beacon.yaml:2: log.format: "xml" is not text or json`},
		{name: "bad sync policy", file: "storage:\n  sync: sometimes\n", want: `beacon.yaml:2: storage.sync: "sometimes" is not always, batch or none`},
		{name: "not a mapping", file: "mqtt: 5\n", want: "beacon.yaml:1: mqtt: expected a mapping of keys"},
		{name: "yaml syntax", file: "mqtt:\n  addr: [\n", want: "beacon.yaml: (file): yaml:"},
		{name: "tls without cert", args: []string{"--tls-addr", "127.0.0.1:8883"}, want: "mqtt.tls_addr: needs mqtt.tls_cert and mqtt.tls_key"},
		{name: "bad env", env: []string{"BEACON_MQTT_MAX_QOS=3"}, want: "mqtt.max_qos: 3 is not 0, 1 or 2 (set by env BEACON_MQTT_MAX_QOS)"},
		{name: "unknown env", env: []string{"BEACON_MQTT_PORT=1"}, want: "BEACON_MQTT_PORT: unknown environment variable"},
		{name: "bad flag value", args: []string{"--mqtt-addr", "nowhere"}, want: `mqtt.addr: "nowhere" is not host:port (set by flag)`},
		{name: "unknown flag", args: []string{"--mqtt-port", "1"}, want: "flag provided but not defined: -mqtt-port"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			args := append([]string{"serve"}, tc.args...)
			if tc.file != "" {
				path := filepath.Join(dir, "beacon.yaml")
				if err := os.WriteFile(path, []byte(tc.file), 0o600); err != nil {
					t.Fatal(err)
				}
				args = append(args, "--config", path)
			}
			code, _, errOut := runCLI(t, tc.env, args...)
			if code != 2 {
				t.Errorf("exit code %d, want 2", code)
			}
			if !strings.Contains(errOut, tc.want) {
				t.Errorf("stderr %q does not contain %q", errOut, tc.want)
			}
		})
	}
}

// TestGracefulStop: SIGTERM disconnects clients with "server shutting
// down", flushes storage (even with storage.sync none) and exits 0.
func TestGracefulStop(t *testing.T) {
	data := t.TempDir()
	p := startBeacon(t, data)
	sub := bt.Dial(t, p.mqtt, persistentConnect("graceful-sub"))
	sub.SubscribeT(t, paho.SubscribeOptions{Topic: "g/#", QoS: 1})
	_ = sub.Disconnect(&paho.Disconnect{})
	if code := p.stop(t, syscall.SIGTERM); code != 0 {
		t.Fatalf("exit code %d after SIGTERM", code)
	}

	conf := filepath.Join(t.TempDir(), "none.yaml")
	if err := os.WriteFile(conf, []byte("storage:\n  sync: none\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	p = startBeacon(t, data, "--config", conf)
	watcher, err := bt.TryDial(p.mqtt, &paho.Connect{ClientID: "graceful-watch", CleanStart: true})
	if err != nil {
		t.Fatal(err)
	}
	pub := bt.Dial(t, p.mqtt, &paho.Connect{ClientID: "graceful-pub", CleanStart: true})
	for range 100 {
		pub.PublishT(t, &paho.Publish{Topic: "g/x", QoS: 1, Payload: []byte("m")})
	}
	if code := p.stop(t, syscall.SIGINT); code != 0 {
		t.Fatalf("exit code %d after SIGINT", code)
	}
	if d := watcher.ServerDisconnect(); d == nil || d.ReasonCode != 0x8b {
		t.Fatalf("connected client was not sent DISCONNECT 0x8b: %+v", d)
	}
	if !strings.Contains(p.Logs(), `"msg":"stopped"`) {
		t.Fatalf("no clean stop logged:\n%s", p.Logs())
	}

	p = startBeacon(t, data)
	sub = bt.Dial(t, p.mqtt, persistentConnect("graceful-sub"))
	sub.WaitMessages(t, 100, 20*time.Second)
}

func TestHealthcheck(t *testing.T) {
	p := startBeacon(t, t.TempDir())
	if code, _, errOut := runCLI(t, nil, "healthcheck", "--http-addr", p.http); code != 0 {
		t.Fatalf("healthcheck of a running broker: exit %d: %s", code, errOut)
	}
	p.stop(t, syscall.SIGTERM)
	if code, _, _ := runCLI(t, nil, "healthcheck", "--http-addr", p.http); code != 1 {
		t.Fatalf("healthcheck of a stopped broker: exit %d, want 1", code)
	}
}
