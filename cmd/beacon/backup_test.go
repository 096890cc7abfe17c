package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"

	bt "github.com/beaconmq/beacon/broker/brokertest"
)

// TestBackupRestore backs up a running broker under load through the
// admin API, restores the file into a new directory, and starts a broker
// on it: sessions with their queued messages, retained messages and
// devices are there. A truncated backup and a non-empty target are
// refused.
func TestBackupRestore(t *testing.T) {
	dir := t.TempDir()
	data := filepath.Join(dir, "data")
	acl := filepath.Join(dir, "acl.yaml")
	writeFile(t, acl, "rules:\n  - subjects: [anonymous, device]\n    actions: [publish, subscribe]\n    topics: [\"#\"]\n    effect: allow\n")
	conf := filepath.Join(dir, "beacon.yaml")
	writeFile(t, conf, "storage:\n  dir: "+data+"\nauth:\n  acl_file: "+acl+
		"\n  allow_anonymous: true\n  admin_token: admin-token-0123456789\n  fail_delay: 0s\n")
	code, out, errOut := runCLI(t, nil, "devices", "add", "dev-1", "--config", conf, "--json")
	if code != 0 {
		t.Fatalf("devices add: %d %s", code, errOut)
	}
	var dev struct{ Secret string }
	if err := json.Unmarshal([]byte(out), &dev); err != nil || dev.Secret == "" {
		t.Fatalf("devices add --json: %q %v", out, err)
	}

	p := startBeacon(t, data, "--config", conf)
	const queued, retained = 500, 50
	sub := bt.Dial(t, p.mqtt, persistentConnect("bk-sub"))
	sub.SubscribeT(t, paho.SubscribeOptions{Topic: "bk/q", QoS: 1})
	_ = sub.Disconnect(&paho.Disconnect{})
	pub := bt.Dial(t, p.mqtt, &paho.Connect{ClientID: "bk-pub", CleanStart: true})
	for i := range retained {
		pub.PublishT(t, &paho.Publish{Topic: fmt.Sprintf("bk/r/%d", i), QoS: 1, Retain: true, Payload: []byte(fmt.Sprint(i))})
	}
	publishAll(t, pub, "bk/q", "q", 1, queued, 8)

	// Load while the backup is taken.
	var stop atomic.Bool
	var wg sync.WaitGroup
	var loaded atomic.Int64
	load := bt.Dial(t, p.mqtt, &paho.Connect{ClientID: "bk-load", CleanStart: true})
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := 0; !stop.Load(); i++ {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			_, err := load.Publish(ctx, &paho.Publish{Topic: "bk/q", QoS: 1, Payload: []byte(fmt.Sprintf("load-%d", i))})
			cancel()
			if err != nil {
				return
			}
			loaded.Add(1)
		}
	}()
	bt.WaitFor(t, 10*time.Second, "load running", func() bool { return loaded.Load() > 100 })
	file := filepath.Join(dir, "beacon.backup")
	code, _, errOut = runCLI(t, nil, "backup", file, "--config", conf, "--http-addr", p.http)
	stop.Store(true)
	wg.Wait()
	if code != 0 || !strings.Contains(errOut, "online") {
		t.Fatalf("backup: exit %d: %s", code, errOut)
	}
	t.Logf("online backup taken while %d messages were published", loaded.Load())
	if p.stop(t, syscall.SIGTERM) != 0 {
		t.Fatal("stop")
	}

	// A truncated backup is refused.
	whole, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	cut := filepath.Join(dir, "cut.backup")
	if err := os.WriteFile(cut, whole[:len(whole)*2/3], 0o600); err != nil {
		t.Fatal(err)
	}
	if code, _, errOut := runCLI(t, nil, "restore", cut, "--data-dir", filepath.Join(dir, "from-cut")); code == 0 || !strings.Contains(errOut, "truncated or damaged") {
		t.Fatalf("restore of a truncated backup: exit %d: %s", code, errOut)
	}
	// So is a target that holds a store.
	if code, _, errOut := runCLI(t, nil, "restore", file, "--data-dir", data); code == 0 || !strings.Contains(errOut, "already holds a store") {
		t.Fatalf("restore over a store: exit %d: %s", code, errOut)
	}

	restored := filepath.Join(dir, "restored")
	if code, _, errOut := runCLI(t, nil, "restore", file, "--data-dir", restored); code != 0 {
		t.Fatalf("restore: exit %d: %s", code, errOut)
	}
	if code, out, _ := runCLI(t, nil, "storage", "verify", "--data-dir", restored); code != 0 {
		t.Fatalf("verify of the restored store: exit %d\n%s", code, out)
	}
	p = startBeacon(t, restored, "--config", conf)
	s := bt.Dial(t, p.mqtt, persistentConnect("bk-sub"))
	if !s.Connack.SessionPresent {
		t.Fatal("the persistent session was not restored")
	}
	msgs := s.WaitMessages(t, queued, 30*time.Second)
	got := map[string]bool{}
	for _, m := range msgs {
		got[string(m.Payload)] = true
	}
	for i := range queued {
		if !got[fmt.Sprintf("q-%d", i)] {
			t.Fatalf("queued message q-%d not restored (%d messages)", i, len(msgs))
		}
	}
	r := bt.Dial(t, p.mqtt, &paho.Connect{ClientID: "bk-reader", CleanStart: true})
	r.SubscribeT(t, paho.SubscribeOptions{Topic: "bk/r/#", QoS: 1})
	if n := len(r.WaitMessages(t, retained, 10*time.Second)); n != retained {
		t.Fatalf("%d retained restored, want %d", n, retained)
	}
	if _, err := bt.TryDial(p.mqtt, &paho.Connect{ClientID: "dev-1", CleanStart: true, Username: "dev-1", UsernameFlag: true,
		Password: []byte(dev.Secret), PasswordFlag: true}); err != nil {
		t.Fatalf("the device does not log in after the restore: %v", err)
	}
}
