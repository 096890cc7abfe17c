package main

import (
	"bytes"
	"fmt"
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

// copyTree copies a stopped broker's data directory.
func copyTree(t *testing.T, src string) string {
	t.Helper()
	dst := filepath.Join(t.TempDir(), "data")
	if out, err := exec.Command("cp", "-a", src, dst).CombinedOutput(); err != nil {
		t.Fatalf("cp: %v: %s", err, out)
	}
	return dst
}

// startFails runs the broker on dataDir and returns its exit code and
// stderr; it must exit by itself.
func startFails(t *testing.T, dataDir string) (int, string) {
	t.Helper()
	cmd := exec.Command(beaconBin, "serve", "--mqtt-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0", "--data-dir", dataDir)
	cmd.Env = cleanEnv()
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		_ = cmd.Process.Kill()
		<-done
		t.Fatalf("the broker started on a damaged store:\n%s", stderr.String())
	}
	return cmd.ProcessState.ExitCode(), stderr.String()
}

func verifyStore(t *testing.T, dataDir string) (int, string) {
	t.Helper()
	cmd := exec.Command(beaconBin, "storage", "verify", "--data-dir", dataDir)
	cmd.Env = cleanEnv()
	out, _ := cmd.CombinedOutput()
	return cmd.ProcessState.ExitCode(), string(out)
}

// TestDamagedStore damages real data directories the ways the issue
// measured (MANIFEST deleted, garbage in the write-ahead log after a
// SIGKILL, a truncated table): the broker never starts silently with less.
func TestDamagedStore(t *testing.T) {
	const queued, retained = 1000, 100
	crashed := filepath.Join(t.TempDir(), "data")
	p := startBeacon(t, crashed)
	sub := bt.Dial(t, p.mqtt, persistentConnect("dmg-sub"))
	sub.SubscribeT(t, paho.SubscribeOptions{Topic: "dmg/q", QoS: 1})
	_ = sub.Disconnect(&paho.Disconnect{})
	pub := bt.Dial(t, p.mqtt, &paho.Connect{ClientID: "dmg-pub", CleanStart: true})
	for i := range retained {
		pub.PublishT(t, &paho.Publish{Topic: fmt.Sprintf("dmg/r/%d", i), QoS: 1, Retain: true, Payload: []byte("r")})
	}
	publishAll(t, pub, "dmg/q", "q", 1, queued, 8)
	p.kill(t)

	// Stopped cleanly once (the memtable flushed to a table) for the
	// MANIFEST and table cases.
	flushed := copyTree(t, crashed)
	p = startBeacon(t, flushed)
	if code := p.stop(t, syscall.SIGTERM); code != 0 {
		t.Fatalf("stop: exit %d", code)
	}

	if code, out := verifyStore(t, crashed); code != 0 {
		t.Fatalf("verify of a store a SIGKILL left: exit %d\n%s", code, out)
	}
	if code, out := verifyStore(t, flushed); code != 0 || !strings.Contains(out, "ok: no damage found") {
		t.Fatalf("verify of a cleanly stopped store: exit %d\n%s", code, out)
	}

	t.Run("MANIFEST removed", func(t *testing.T) {
		dir := copyTree(t, flushed)
		if err := os.Remove(filepath.Join(dir, "MANIFEST")); err != nil {
			t.Fatal(err)
		}
		code, stderr := startFails(t, dir)
		if code == 0 || !strings.Contains(stderr, "MANIFEST") || !strings.Contains(stderr, "backup") {
			t.Fatalf("start without MANIFEST: exit %d, want a refusal naming MANIFEST and what to do:\n%s", code, stderr)
		}
		if code, out := verifyStore(t, dir); code != 1 || !strings.Contains(out, "MANIFEST") {
			t.Fatalf("verify without MANIFEST: exit %d\n%s", code, out)
		}
	})

	t.Run("table truncated", func(t *testing.T) {
		dir := copyTree(t, flushed)
		tables, _ := filepath.Glob(filepath.Join(dir, "*.sst"))
		if len(tables) == 0 {
			t.Fatal("no table in a cleanly stopped store")
		}
		fi, _ := os.Stat(tables[0])
		if err := os.Truncate(tables[0], fi.Size()*2/3); err != nil {
			t.Fatal(err)
		}
		name := filepath.Base(tables[0])
		code, stderr := startFails(t, dir)
		if code == 0 || !strings.Contains(stderr, name) || strings.Contains(stderr, "panic") {
			t.Fatalf("start with a truncated table: exit %d, want a refusal naming %s:\n%s", code, name, stderr)
		}
		if code, out := verifyStore(t, dir); code != 1 || !strings.Contains(out, name) {
			t.Fatalf("verify with a truncated table: exit %d\n%s", code, out)
		}
	})

	t.Run("write-ahead log garbage after SIGKILL", func(t *testing.T) {
		dir := copyTree(t, crashed)
		logs, _ := filepath.Glob(filepath.Join(dir, "*.mem"))
		var mem string
		var b []byte
		for _, l := range logs {
			if c, _ := os.ReadFile(l); bytes.Contains(c, []byte("!badger!txn")) {
				mem, b = l, c
			}
		}
		if mem == "" {
			t.Fatalf("no memtable log with writes in %v", logs)
		}
		end := bytes.LastIndex(b, []byte("!badger!txn"))
		copy(b[end/3:], bytes.Repeat([]byte{0xA5}, 21))
		if err := os.WriteFile(mem, b, 0o600); err != nil {
			t.Fatal(err)
		}
		if code, out := verifyStore(t, dir); code != 1 || !strings.Contains(out, filepath.Base(mem)) {
			t.Fatalf("verify with a damaged log: exit %d\n%s", code, out)
		}
		p := startBeacon(t, dir)
		logs2 := p.Logs()
		if !strings.Contains(logs2, "store log damaged") || !strings.Contains(logs2, `"dropped_writes"`) {
			t.Fatalf("start after log damage did not report it:\n%s", logs2)
		}
		saved, _ := filepath.Glob(filepath.Join(dir, "damaged", filepath.Base(mem)+".*"))
		if len(saved) != 1 {
			t.Fatalf("no copy of the damaged log kept: %v", saved)
		}
	})
}
