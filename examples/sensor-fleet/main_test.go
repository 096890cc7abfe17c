package main

import (
	"bytes"
	"context"
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"
	"gopkg.in/yaml.v3"

	"github.com/beaconmq/beacon/broker/brokertest"
	"github.com/beaconmq/beacon/devices"
	"github.com/beaconmq/beacon/devices/codec"
)

func TestEncodeFrame(t *testing.T) {
	tests := []struct {
		name string
		r    reading
		want []byte
	}{
		{
			name: "typical",
			r:    reading{Temperature: 21.57, Humidity: 45.5, Battery: 3.712, OK: true, RSSI: -67},
			// 2157 = 0x086d, 91 = 0x5b, 3712 = 0x0e80, 1, -67 = 0xbd
			want: []byte{0x6d, 0x08, 0x5b, 0x80, 0x0e, 0x01, 0xbd},
		},
		{
			name: "negative temperature, not ok",
			r:    reading{Temperature: -5.5, Humidity: 30, Battery: 3.0, RSSI: -90},
			// -550 = 0xfdda, 60 = 0x3c, 3000 = 0x0bb8, 0, -90 = 0xa6
			want: []byte{0xda, 0xfd, 0x3c, 0xb8, 0x0b, 0x00, 0xa6},
		},
		{
			name: "rounds to the nearest step",
			r:    reading{Temperature: 19.996, Humidity: 50.3, Battery: 4.1996, OK: true, RSSI: -40},
			// 2000 = 0x07d0, 100.6 -> 101 = 0x65, 4200 = 0x1068, 1, -40 = 0xd8
			want: []byte{0xd0, 0x07, 0x65, 0x68, 0x10, 0x01, 0xd8},
		},
		{
			name: "saturates out of range values",
			r:    reading{Temperature: 400, Humidity: 200, Battery: -1, OK: true, RSSI: -200},
			want: []byte{0xff, 0x7f, 0xff, 0x00, 0x00, 0x01, 0x80},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got := encodeFrame(tc.r)
			if !bytes.Equal(got, tc.want) {
				t.Errorf("encodeFrame(%+v) = % x, want % x", tc.r, got, tc.want)
			}
		})
	}
}

// readmeDecoder compiles the codecs entry of README.md, so that the
// documentation and the encoder cannot drift apart.
func readmeDecoder(t *testing.T) *codec.Decoder {
	t.Helper()
	b, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile("(?s)```yaml\n(codecs:\n.*?)```").FindSubmatch(b)
	if m == nil {
		t.Fatal("README.md has no ```yaml block starting with codecs:")
	}
	var doc struct {
		Codecs []struct {
			Filter       string `yaml:"filter"`
			codec.Config `yaml:",inline"`
		} `yaml:"codecs"`
	}
	if err := yaml.Unmarshal(m[1], &doc); err != nil {
		t.Fatalf("README codecs block: %v", err)
	}
	if len(doc.Codecs) != 1 || doc.Codecs[0].Filter != "devices/+/telemetry" {
		t.Fatalf("README codecs block: want one entry for devices/+/telemetry, got %+v", doc.Codecs)
	}
	d, err := codec.New(doc.Codecs[0].Config)
	if err != nil {
		t.Fatalf("README codecs block: %v", err)
	}
	return d
}

func TestFrameDecodesWithREADMECodec(t *testing.T) {
	d := readmeDecoder(t)
	r := reading{Temperature: 21.57, Humidity: 45.5, Battery: 3.712, OK: true, RSSI: -67}
	got, err := d.Decode(encodeFrame(r))
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]any{"temperature": 21.57, "humidity": 45.5, "battery": 3.712, "ok": true, "rssi": -67.0}
	if len(got) != len(want) {
		t.Fatalf("decoded %v, want %v", got, want)
	}
	for k, w := range want {
		g := got[k]
		if wf, ok := w.(float64); ok {
			if gf, ok := g.(float64); !ok || math.Abs(gf-wf) > 1e-9 {
				t.Errorf("%s = %v, want %v", k, g, w)
			}
		} else if g != w {
			t.Errorf("%s = %v, want %v", k, g, w)
		}
	}
}

func TestSensorStepStaysInRange(t *testing.T) {
	dec := readmeDecoder(t)
	for seed := range uint64(5) {
		t.Run(fmt.Sprint("seed ", seed), func(t *testing.T) {
			rng := rand.New(rand.NewPCG(seed, 1))
			s := newSensor(rng)
			first := s.step(rng)
			last := first
			temps := map[float64]bool{}
			for i := range 10000 {
				r := s.step(rng)
				if r.Temperature < tempMin || r.Temperature > tempMax ||
					r.Humidity < humidityMin || r.Humidity > humidityMax ||
					r.Battery < batteryMin || r.Battery > batteryMax ||
					r.RSSI < int(rssiMin) || r.RSSI > int(rssiMax) || !r.OK {
					t.Fatalf("step %d: %+v out of range", i, r)
				}
				// Steps are small enough to plot as a walk, not noise.
				if math.Abs(r.Temperature-last.Temperature) > 0.5 || math.Abs(r.Humidity-last.Humidity) > 2.5 ||
					(r.Battery > last.Battery && r.Battery < batteryMax) || abs(r.RSSI-last.RSSI) > 6 {
					t.Fatalf("step %d: jump from %+v to %+v", i, last, r)
				}
				// What goes on the wire decodes in range too.
				m, err := dec.Decode(encodeFrame(r))
				if err != nil {
					t.Fatal(err)
				}
				if v := m["humidity"].(float64); v < humidityMin || v > humidityMax {
					t.Fatalf("step %d: humidity decodes as %v", i, v)
				}
				temps[m["temperature"].(float64)] = true
				last = r
			}
			if len(temps) < 50 {
				t.Errorf("temperature took only %d distinct values in 10,000 steps", len(temps))
			}
			if last.Battery == first.Battery {
				t.Error("battery did not drain")
			}
		})
	}
}

func abs(n int) int { return max(n, -n) }

func TestParseCredentials(t *testing.T) {
	tests := []struct {
		name    string
		in      string
		want    []credential
		wantErr string
	}{
		{
			name: "good",
			in:   "# made by beacon devices add\n\nsensor-001 s3cret-A_1\r\n  sensor-002\tsecretB  \n# end\n",
			want: []credential{{"sensor-001", "s3cret-A_1"}, {"sensor-002", "secretB"}},
		},
		{name: "id only", in: "sensor-001 TOPSECRET\n\nsensor-002\n", wantErr: "line 3: want \"<id> <secret>\", found 1 fields"},
		{name: "three fields", in: "sensor-001 TOP SECRET\n", wantErr: "line 1: want \"<id> <secret>\", found 3 fields"},
		{name: "bad id", in: "# x\nsensor/1 TOPSECRET\n", wantErr: "line 2: \"sensor/1\" is not a device id"},
		{name: "duplicate", in: "a x\nb y\na TOPSECRET\n", wantErr: "line 3: device \"a\" is already on line 1"},
		{name: "empty", in: "# nothing\n\n", wantErr: "no devices"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := parseCredentials(strings.NewReader(tc.in))
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("error %v, want one containing %q", err, tc.wantErr)
				}
				if strings.Contains(err.Error(), "SECRET") {
					t.Errorf("error %q may show a secret", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if fmt.Sprint(got) != fmt.Sprint(tc.want) {
				t.Errorf("got %v, want %v", got, tc.want)
			}
		})
	}
}

func TestCredentialsFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "creds.txt")
	if err := os.WriteFile(path, []byte("a 1\nb 2\nc 3\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, err := parseFlags([]string{"-credentials", path}, new(bytes.Buffer))
	if err != nil {
		t.Fatal(err)
	}
	if creds, err := cfg.credentials(); err != nil || len(creds) != 3 {
		t.Fatalf("all devices of the file: got %v, %v", creds, err)
	}
	cfg.Devices = 2
	if creds, err := cfg.credentials(); err != nil || len(creds) != 2 || creds[1].id != "b" {
		t.Fatalf("-devices 2: got %v, %v", creds, err)
	}
	cfg.Devices = 4
	if _, err := cfg.credentials(); err == nil || !strings.Contains(err.Error(), "has only 3 devices") {
		t.Fatalf("-devices 4: error %v", err)
	}
	if err := os.WriteFile(path, []byte("a 1\nb\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg.Devices = 0
	if _, err := cfg.credentials(); err == nil || !strings.Contains(err.Error(), path+": line 2:") {
		t.Fatalf("bad file: error %v, want it to name the file and line", err)
	}
}

func TestParseFlags(t *testing.T) {
	cfg, err := parseFlags(nil, new(bytes.Buffer))
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Devices != 50 || cfg.Interval != 5*time.Second || cfg.QoS != 1 || cfg.Prefix != "sensor" || cfg.Duration != 0 {
		t.Errorf("defaults: %+v", cfg)
	}
	u, err := cfg.brokerURL()
	if err != nil || u.String() != "mqtt://127.0.0.1:1883" {
		t.Errorf("default broker: %v, %v", u, err)
	}
	for _, tc := range []struct{ broker, want string }{
		{"mqtts://beacon.example.com", "mqtts://beacon.example.com:8883"},
		{"mqtt://[::1]", "mqtt://[::1]:1883"},
	} {
		cfg.Broker = tc.broker
		if u, err := cfg.brokerURL(); err != nil || u.String() != tc.want {
			t.Errorf("%s: %v, %v; want %s", tc.broker, u, err, tc.want)
		}
	}

	for _, tc := range []struct {
		args    []string
		wantErr string
	}{
		{[]string{"-broker", "127.0.0.1:1883"}, "-broker"},
		{[]string{"-broker", "http://127.0.0.1"}, "-broker"},
		{[]string{"-broker", "mqtt://u:p@127.0.0.1"}, "must not hold credentials"},
		{[]string{"-devices", "0"}, "-devices"},
		{[]string{"-interval", "0s"}, "-interval"},
		{[]string{"-qos", "3"}, "-qos"},
		{[]string{"-duration", "-1s"}, "-duration"},
		{[]string{"-prefix", "a/b"}, "-prefix"},
		{[]string{"extra"}, "unexpected argument"},
	} {
		if _, err := parseFlags(tc.args, new(bytes.Buffer)); err == nil || !strings.Contains(err.Error(), tc.wantErr) {
			t.Errorf("%v: error %v, want one containing %q", tc.args, err, tc.wantErr)
		}
	}
}

// startRun runs the fleet until the returned stop function is called,
// which waits for run to return.
func startRun(t *testing.T, cfg config) (stop func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(t.Context())
	errc := make(chan error, 1)
	go func() { errc <- run(ctx, cfg, brokertest.Logger(t)) }()
	var stopped atomic.Bool
	stop = func() {
		if stopped.Swap(true) {
			return
		}
		cancel()
		select {
		case err := <-errc:
			if err != nil {
				t.Errorf("run: %v", err)
			}
		case <-time.After(15 * time.Second):
			t.Fatal("run did not return after its context was cancelled")
		}
	}
	t.Cleanup(stop)
	return stop
}

// waitTelemetry waits until sub has received a 7-byte frame from every id.
func waitTelemetry(t *testing.T, sub *brokertest.Client, ids ...string) {
	t.Helper()
	brokertest.WaitFor(t, 10*time.Second, fmt.Sprintf("telemetry from %v", ids), func() bool {
		seen := map[string]bool{}
		for _, m := range sub.Messages() {
			if len(m.Payload) != frameSize {
				t.Fatalf("%s: %d-byte payload % x", m.Topic, len(m.Payload), m.Payload)
			}
			seen[m.Topic] = true
		}
		for _, id := range ids {
			if !seen["devices/"+id+"/telemetry"] {
				return false
			}
		}
		return true
	})
}

var subscribers atomic.Int64

// retainedStatus subscribes a new client to devices/+/status and returns
// the retained payload of each id's status once all have arrived.
func retainedStatus(t *testing.T, addr string, ids ...string) map[string]string {
	t.Helper()
	c := brokertest.Dial(t, addr, &paho.Connect{ClientID: fmt.Sprint("status-", subscribers.Add(1)), CleanStart: true})
	defer func() { _ = c.Disconnect(&paho.Disconnect{}) }()
	c.SubscribeT(t, paho.SubscribeOptions{Topic: "devices/+/status", QoS: 1})
	got := map[string]string{}
	brokertest.WaitFor(t, 10*time.Second, "retained status of every device", func() bool {
		for _, m := range c.Messages() {
			if m.Retain {
				got[strings.TrimSuffix(strings.TrimPrefix(m.Topic, "devices/"), "/status")] = string(m.Payload)
			}
		}
		return len(got) >= len(ids)
	})
	return got
}

func wantStatus(t *testing.T, addr, status string, ids ...string) {
	t.Helper()
	// mochi acknowledges a publish before it routes it, so a new
	// subscriber may still see the previous retained message for a moment.
	var got map[string]string
	brokertest.WaitFor(t, 10*time.Second, "status "+status, func() bool {
		got = retainedStatus(t, addr, ids...)
		for _, id := range ids {
			if got[id] != status {
				return false
			}
		}
		return true
	})
}

func TestRunPublishesTelemetryAndStatus(t *testing.T) {
	b := brokertest.Start(t, brokertest.Config(t))
	addr := b.MQTTAddr("tcp")
	sub := brokertest.Dial(t, addr, &paho.Connect{ClientID: "watcher", CleanStart: true})
	sub.SubscribeT(t, paho.SubscribeOptions{Topic: "devices/+/telemetry", QoS: 1})

	ids := []string{"sensor-001", "sensor-002", "sensor-003"}
	stop := startRun(t, config{
		Broker: "mqtt://" + addr, Devices: 3, Interval: 100 * time.Millisecond, Prefix: "sensor", QoS: 1,
		summaryEvery: 200 * time.Millisecond, seed: 1,
	})
	waitTelemetry(t, sub, ids...)
	wantStatus(t, addr, "online", ids...)

	stop()
	wantStatus(t, addr, "offline", ids...)
}

func TestRunWithCredentials(t *testing.T) {
	dir := t.TempDir()
	acl := filepath.Join(dir, "acl.yaml")
	rules := `rules:
  - subjects: [device]
    actions: [publish]
    topics: ["devices/%u/#"]
    effect: allow
  - subjects: [anonymous]
    actions: [subscribe]
    topics: ["devices/#"]
    effect: allow
`
	if err := os.WriteFile(acl, []byte(rules), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg := brokertest.Config(t)
	cfg.Auth.ACLFile = acl
	cfg.Auth.AllowAnonymous = true
	cfg.Auth.FailDelay = 0
	b := brokertest.Start(t, cfg)
	addr := b.MQTTAddr("tcp")

	var lines strings.Builder
	ids := []string{"sensor-001", "sensor-002"}
	for _, id := range ids {
		_, secret, err := b.Registry().Add(devices.NewDevice{ID: id, Type: "sensor"})
		if err != nil {
			t.Fatal(err)
		}
		fmt.Fprintf(&lines, "%s %s\n", id, secret)
	}
	creds := filepath.Join(dir, "creds.txt")
	if err := os.WriteFile(creds, []byte(lines.String()), 0o600); err != nil {
		t.Fatal(err)
	}

	sub := brokertest.Dial(t, addr, &paho.Connect{ClientID: "watcher", CleanStart: true})
	sub.SubscribeT(t, paho.SubscribeOptions{Topic: "devices/+/telemetry", QoS: 1})
	stop := startRun(t, config{Broker: "mqtt://" + addr, Credentials: creds, Interval: 100 * time.Millisecond, QoS: 1})
	waitTelemetry(t, sub, ids...)
	wantStatus(t, addr, "online", ids...)
	stop()
	wantStatus(t, addr, "offline", ids...)
}
