package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	bt "github.com/beaconmq/beacon/broker/brokertest"
)

// The scenarios run for a second against a real Beacon (the binary, built
// once) and a real Mosquitto, and the tests check the counts, never the
// rates: a loaded machine makes a run slower, not different.

// beaconBin is the broker binary under test, built by TestMain.
var beaconBin string

// Brokers shared by the tests that need nothing special: every run uses
// topics and client ids of its own.
var shared struct {
	mu        sync.Mutex
	beacon    *brokerProc
	mosquitto *brokerProc
	dirs      []string // their data, removed by TestMain
}

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "beacon-bench-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	beaconBin = filepath.Join(dir, "beacon")
	build := exec.Command("go", "build", "-o", beaconBin, "github.com/beaconmq/beacon/cmd/beacon")
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "build beacon:", err)
		os.Exit(1)
	}
	code := m.Run()
	for _, b := range []*brokerProc{shared.beacon, shared.mosquitto} {
		if b != nil {
			b.stop()
		}
	}
	for _, d := range append(shared.dirs, dir) {
		_ = os.RemoveAll(d)
	}
	os.Exit(code)
}

// sharedBroker returns the shared Beacon (with HTTP, for SSE) or Mosquitto,
// starting it on first use.
func sharedBroker(t *testing.T, name string) *brokerProc {
	t.Helper()
	var mosq string
	if name == "mosquitto" {
		mosq = requireMosquitto(t)
	}
	shared.mu.Lock()
	defer shared.mu.Unlock()
	p := &shared.beacon
	if name == "mosquitto" {
		p = &shared.mosquitto
	}
	if *p == nil {
		// Not t.TempDir: the broker outlives the test that started it.
		dir, err := os.MkdirTemp("", "beacon-bench-broker-")
		if err != nil {
			t.Fatal(err)
		}
		shared.dirs = append(shared.dirs, dir)
		var b *brokerProc
		if name == "mosquitto" {
			b, err = startMosquitto(mosq, dir, brokerOptions{})
		} else {
			b, err = startBeacon(beaconBin, dir, brokerOptions{http: true})
		}
		if err != nil {
			t.Fatalf("start %s: %v", name, err)
		}
		*p = b
	}
	return *p
}

// requireMosquitto finds the Mosquitto broker: in PATH, in /usr/sbin, or
// not at all (which fails the test under CI and skips it elsewhere).
func requireMosquitto(t *testing.T) string {
	t.Helper()
	if p, err := findMosquitto("mosquitto"); err == nil {
		return p
	}
	return bt.RequireTool(t, "mosquitto", "mosquitto")
}

// runBench runs cfg against b with the defaults of the command line.
func runBench(t *testing.T, b *brokerProc, cfg config) result {
	t.Helper()
	cfg.Addr, cfg.HTTP, cfg.PID = b.mqtt, b.http, b.pid()
	if cfg.Duration == 0 {
		cfg.Duration = time.Second
	}
	if cfg.Inflight == 0 {
		cfg.Inflight = 16
	}
	cfg.Size = max(cfg.Size, 64)
	cfg.Topic = "test"
	res, err := bench(t.Context(), cfg)
	if err != nil {
		t.Fatalf("%s: %v\nbroker log:\n%s", cfg.Scenario, err, b.logs())
	}
	t.Logf("%s qos %d: published %d, expected %d, delivered %d, dup %d, lost %d, errors %v, dropped %d %s, p99 %.2f ms, cpu %.2f µs/msg",
		cfg.Scenario, cfg.QoS, res.Published, res.Expected, res.Delivered, res.Duplicates, res.Lost, res.ErrorsBy,
		res.Dropped, res.DropReason, res.LatencyP99, res.CPUPerMsgUS)
	return res
}

// checkExact: every message published was delivered once to every
// subscriber due it, and nothing failed.
func checkExact(t *testing.T, res result, subscribers int64) {
	t.Helper()
	if res.Published == 0 {
		t.Fatal("nothing published")
	}
	if res.Expected != subscribers*res.Published {
		t.Errorf("expected %d deliveries, want %d x published %d", res.Expected, subscribers, res.Published)
	}
	if res.Delivered != res.Expected || res.Lost != 0 || res.Duplicates != 0 {
		t.Errorf("delivered %d of %d, lost %d, duplicates %d", res.Delivered, res.Expected, res.Lost, res.Duplicates)
	}
	if res.Errors != 0 || res.Dropped != 0 || res.Unsent != 0 {
		t.Errorf("errors %v, dropped %d (%s), unsent %d", res.ErrorsBy, res.Dropped, res.DropReason, res.Unsent)
	}
}

// QoS 1/2 fan-in at 10,000 messages in the second: fewer than any session
// queue holds, so a broker that keeps its promises delivers every one,
// however the machine schedules the subscriber. A window of 4 at QoS 2
// keeps the publishers waiting for it.
func TestFanin(t *testing.T) {
	for _, name := range []string{"beacon", "mosquitto"} {
		for _, tc := range []struct {
			qos      byte
			inflight int
		}{{1, 16}, {2, 4}} {
			t.Run(fmt.Sprintf("%s/qos%d", name, tc.qos), func(t *testing.T) {
				res := runBench(t, sharedBroker(t, name), config{Scenario: "fanin", QoS: tc.qos, Clients: 4, Rate: 10000,
					Inflight: tc.inflight})
				checkExact(t, res, 1)
				if res.Published != 10000 || res.Inflight != tc.inflight {
					t.Errorf("published %d with a window of %d, want the 10000 scheduled with %d", res.Published, res.Inflight, tc.inflight)
				}
			})
		}
	}
}

// Saturated QoS 0 may lose messages; whatever is not delivered is counted.
func TestFaninQoS0Saturated(t *testing.T) {
	for _, name := range []string{"beacon", "mosquitto"} {
		t.Run(name, func(t *testing.T) {
			res := runBench(t, sharedBroker(t, name), config{Scenario: "fanin", Clients: 4, Duration: 500 * time.Millisecond})
			if res.Published == 0 || res.Expected != res.Published {
				t.Fatalf("expected %d deliveries for %d published", res.Expected, res.Published)
			}
			if res.Lost != res.Expected-res.Delivered || res.Duplicates != 0 || res.Errors != 0 {
				t.Errorf("delivered %d of %d, lost %d, duplicates %d, errors %v", res.Delivered, res.Expected, res.Lost,
					res.Duplicates, res.ErrorsBy)
			}
		})
	}
}

func TestFanoutQoS0(t *testing.T) {
	for _, name := range []string{"beacon", "mosquitto"} {
		t.Run(name, func(t *testing.T) {
			res := runBench(t, sharedBroker(t, name), config{Scenario: "fanout", Clients: 5, Rate: 2000})
			if res.Published != 2000 || res.Expected != 5*res.Published {
				t.Fatalf("expected %d deliveries for %d published to 5 subscribers", res.Expected, res.Published)
			}
			// QoS 0 may lose; what is not delivered must be counted lost.
			if res.Lost != res.Expected-res.Delivered || res.Duplicates != 0 {
				t.Errorf("delivered %d of %d, lost %d, duplicates %d", res.Delivered, res.Expected, res.Lost, res.Duplicates)
			}
		})
	}
}

func TestPairs(t *testing.T) {
	for _, name := range []string{"beacon", "mosquitto"} {
		t.Run(name, func(t *testing.T) {
			res := runBench(t, sharedBroker(t, name), config{Scenario: "pairs", QoS: 1, Clients: 3, Rate: 600})
			checkExact(t, res, 1)
			if res.Published != 600 { // 200 due per publisher in the second, all sent
				t.Errorf("published %d, want the 600 scheduled", res.Published)
			}
		})
	}
}

func TestSSE(t *testing.T) {
	res := runBench(t, sharedBroker(t, "beacon"), config{Scenario: "sse", QoS: 1, Clients: 3, Rate: 200})
	checkExact(t, res, 3)
	if res.Connections != 3 {
		t.Errorf("%d streams, want 3", res.Connections)
	}
}

func TestConnections(t *testing.T) {
	for _, name := range []string{"beacon", "mosquitto"} {
		t.Run(name, func(t *testing.T) {
			res := runBench(t, sharedBroker(t, name), config{Scenario: "connections", Clients: 50, Duration: 200 * time.Millisecond})
			if res.Connections != 50 || res.Dropped != 0 {
				t.Errorf("%d connections open, %d dropped; want 50, 0", res.Connections, res.Dropped)
			}
		})
	}
}

// More connections than the process may open fail at once, naming the
// limit, instead of hanging on the first refused dial.
func TestConnectionsBeyondFileLimit(t *testing.T) {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
	_, err := bench(t.Context(), config{Scenario: "connections", Addr: "127.0.0.1:1", Clients: int(min(lim.Max, 1<<30)),
		Duration: time.Second, Inflight: 16})
	if err == nil || !strings.Contains(err.Error(), "RLIMIT_NOFILE") {
		t.Fatalf("got %v, want an error naming RLIMIT_NOFILE", err)
	}
}

// The loss accounting can fail a run: Mosquitto keeps 20 QoS 1 messages in
// flight and 5 queued for a subscriber that reads nothing for two seconds,
// and drops the rest of what it has acknowledged to the publishers.
func TestLossCounted(t *testing.T) {
	b, err := startMosquitto(requireMosquitto(t), t.TempDir(), brokerOptions{maxQueued: 5})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(b.stop)
	var out, errOut bytes.Buffer
	code := run(t.Context(), []string{"fanin", "--addr", b.mqtt, "--qos", "1", "--clients", "2", "--duration", "1s",
		"--sub-stall", "2s", "--topic", "test", "--json"}, &out, &errOut)
	var res result
	if err := json.Unmarshal(out.Bytes(), &res); err != nil {
		t.Fatalf("exit %d, output %q: %v; stderr %s", code, out.String(), err, errOut.String())
	}
	t.Logf("published %d, delivered %d, lost %d, errors %v", res.Published, res.Delivered, res.Lost, res.ErrorsBy)
	if code != 3 {
		t.Errorf("exit %d, want 3 (acknowledged messages lost)", code)
	}
	if res.Published < 100 || res.Delivered == 0 || res.Lost == 0 || res.Lost != res.Expected-res.Delivered {
		t.Errorf("published %d, delivered %d, lost %d: want most of them lost, and counted", res.Published, res.Delivered, res.Lost)
	}
}

func TestComparisonTable(t *testing.T) {
	rows := compareRows(config{Clients: 100, Duration: time.Second}, 1000, 10000, 1000)
	contenders := []contender{{name: "mosquitto"}, {name: "beacon", beacon: true}}
	fanin := func(del, cpu float64) result {
		return result{Config: config{Scenario: "fanin"}, DeliveredPS: del, CPUPerMsgUS: cpu, Lost: 10, Expected: 100, LostPercent: 10}
	}
	results := map[string]map[string][]result{
		rows[0].name: {"mosquitto": {fanin(100, 4), fanin(300, 6), fanin(200, 5)}, "beacon": {fanin(400, 2)}},
	}
	sse := rows[len(rows)-1].name
	results[sse] = map[string][]result{"beacon": {{Config: config{Scenario: "sse", QoS: 1}, DeliveredPS: 1e6}}}
	var out bytes.Buffer
	printComparison(&out, rows, contenders, results, map[string]map[string][]string{}, 3)
	table := out.String()
	for _, want := range []string{
		"| QoS 0 fan-in, saturated (100 publishers) | 200/s, lost 30 (10.0%), dup 0 | 400/s, lost 10 (10.0%), dup 0 | 2.00x |",
		"| broker CPU per delivered QoS 0 message | 5.00 µs | 2.00 µs | 0.40x |",
		"| SSE 1 → 1,000 streams at 1,000 msg/s | n/a | 1,000,000/s",
	} {
		if !strings.Contains(table, want) {
			t.Errorf("table lacks %q:\n%s", want, table)
		}
	}
}
