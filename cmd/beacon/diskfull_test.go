package main

import (
	"bufio"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"

	bt "github.com/beaconmq/beacon/broker/brokertest"
)

// mountTmpfs mounts a tmpfs of size bytes on a new directory: a real small
// filesystem that fills up. It needs root; in CI a failure fails the test.
func mountTmpfs(t *testing.T, size int64) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "vol")
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Mount("tmpfs", dir, "tmpfs", 0, fmt.Sprintf("size=%d", size)); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("mount a %d-byte tmpfs (the test needs root): %v", size, err)
		}
		t.Skipf("cannot mount a tmpfs here (needs root): %v", err)
	}
	t.Cleanup(func() {
		if err := syscall.Unmount(dir, syscall.MNT_DETACH); err != nil {
			t.Errorf("unmount %s: %v", dir, err)
		}
	})
	return dir
}

// freeBytes is the space left on the volume holding dir.
func freeBytes(t *testing.T, dir string) int64 {
	t.Helper()
	var st syscall.Statfs_t
	if err := syscall.Statfs(dir, &st); err != nil {
		t.Fatal(err)
	}
	return int64(st.Bavail) * st.Bsize
}

// fill writes a file of n bytes (or until the volume is full when n < 0).
func fill(t *testing.T, path string, n int64) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 1<<20)
	for n != 0 {
		chunk := int64(len(buf))
		if n > 0 {
			chunk = min(chunk, n)
		}
		w, err := f.Write(buf[:chunk])
		if n > 0 {
			n -= int64(w)
		}
		if err != nil {
			if n < 0 && errors.Is(err, syscall.ENOSPC) {
				return
			}
			t.Fatalf("fill %s: %v", path, err)
		}
	}
}

// metric reads one value from /metrics: name with its labels as printed.
func metric(t *testing.T, httpAddr, name string) float64 {
	t.Helper()
	resp, err := http.Get("http://" + httpAddr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), name+" "); ok {
			f, err := strconv.ParseFloat(v, 64)
			if err != nil {
				t.Fatalf("%s: %v", name, err)
			}
			return f
		}
	}
	t.Fatalf("no metric %s", name)
	return 0
}

func readyz(t *testing.T, httpAddr string) (int, string) {
	t.Helper()
	resp, err := http.Get("http://" + httpAddr + "/readyz")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// TestDiskFull fills a small real filesystem under the broker: QoS 1 is
// refused with 0x97 at the reserve (before anything is acknowledged), a
// 3.1.1 publisher is closed, new persistent sessions are refused, the
// process lives, nothing acknowledged is lost, and publishing resumes by
// itself once space is freed.
func TestDiskFull(t *testing.T) {
	mosqPub := bt.RequireTool(t, "mosquitto_pub", "mosquitto-clients")
	vol := mountTmpfs(t, 256<<20)
	conf := filepath.Join(t.TempDir(), "beacon.yaml")
	writeFile(t, conf, "mqtt:\n  max_queued_messages: 65535\nstorage:\n  sync_interval: 50ms\n")
	p := startBeacon(t, filepath.Join(vol, "data"), "--config", conf)

	drain := bt.Dial(t, p.mqtt, persistentConnect("drain"))
	drain.SubscribeT(t, paho.SubscribeOptions{Topic: "fill/#", QoS: 1})
	_ = drain.Disconnect(&paho.Disconnect{})

	reserve := int64(metric(t, p.http, "beacon_storage_reserve_bytes"))
	if reserve <= 0 {
		t.Fatalf("reserve %d", reserve)
	}
	// Leave 16 MiB above the reserve for messages.
	filler := filepath.Join(vol, "filler")
	fill(t, filler, freeBytes(t, vol)-reserve-16<<20)
	t.Logf("volume 256 MiB, reserve %d MiB, %d MiB free after the filler", reserve>>20, freeBytes(t, vol)>>20)

	pub := bt.Dial(t, p.mqtt, &paho.Connect{ClientID: "filler-pub", CleanStart: true})
	payload := make([]byte, 4096)
	_, _ = rand.Read(payload) // incompressible, like real telemetry at volume
	var acked []string
	var refused *paho.PublishResponse
	for i := 0; i < 20000 && refused == nil; i++ {
		id := fmt.Sprintf("m-%d", i)
		copy(payload, id+" ")
		r := publish1(t, pub, "fill/a", payload)
		if r.ReasonCode >= 0x80 {
			refused = r
			break
		}
		acked = append(acked, id)
	}
	if refused == nil {
		t.Fatalf("%d messages of 4 KiB accepted on a 256 MiB volume: never refused", len(acked))
	}
	reason := ""
	if refused.Properties != nil {
		reason = refused.Properties.ReasonString
	}
	t.Logf("refused after %d acknowledged: 0x%02X %q", len(acked), refused.ReasonCode, reason)
	if refused.ReasonCode != 0x97 || !strings.Contains(reason, "disk space low") {
		t.Fatalf("refusal 0x%02X %q, want 0x97 (quota exceeded) saying disk space low", refused.ReasonCode, reason)
	}
	// Compaction may give some space back: take the volume well below the
	// reserve, so it stays low for the checks that follow.
	fill(t, filler+"2", max(freeBytes(t, vol)-reserve/2, 0))
	bt.WaitFor(t, 10*time.Second, "/readyz saying the disk is low", func() bool {
		code, body := readyz(t, p.http)
		return code == http.StatusServiceUnavailable && strings.Contains(body, "storage.min_free")
	})
	if low := metric(t, p.http, "beacon_storage_space_low"); low != 1 {
		t.Fatalf("beacon_storage_space_low = %v", low)
	}

	// QoS 0 is dropped, the connection stays; QoS 1 is refused again.
	if _, err := pub.Publish(context.Background(), &paho.Publish{Topic: "fill/a", QoS: 0, Payload: payload}); err != nil {
		t.Fatalf("QoS 0 publish while low: %v", err)
	}
	if r := publish1(t, pub, "fill/a", payload); r.ReasonCode != 0x97 {
		t.Fatalf("second QoS 1 while low: 0x%02X", r.ReasonCode)
	}
	if n := metric(t, p.http, `beacon_messages_dropped_total{reason="no_space"}`); n < 3 {
		t.Fatalf("beacon_messages_dropped_total{reason=\"no_space\"} = %v after two QoS 1 refusals and a QoS 0 drop", n)
	}
	if n := metric(t, p.http, "beacon_storage_space_refusals_total"); n < 3 {
		t.Fatalf("beacon_storage_space_refusals_total = %v", n)
	}

	// A new persistent session is refused; a clean one may still connect.
	if c, err := bt.TryDial(p.mqtt, persistentConnect("newcomer")); err == nil {
		_ = c.Disconnect(&paho.Disconnect{})
		t.Fatal("a new persistent session was accepted while the disk is low")
	} else if !strings.Contains(err.Error(), "disk space low") {
		t.Fatalf("new persistent session while low: %v, want CONNACK 0x97", err)
	}
	clean := bt.Dial(t, p.mqtt, &paho.Connect{ClientID: "clean-reader", CleanStart: true})
	_ = clean.Disconnect(&paho.Disconnect{})

	// MQTT 3.1.1 cannot be told: the connection is closed, nothing acked.
	host, port, _ := net.SplitHostPort(p.mqtt)
	out, err := exec.Command(mosqPub, "-h", host, "-p", port, "-V", "mqttv311", "-q", "1",
		"-t", "fill/v3", "-m", "not stored").CombinedOutput()
	if err == nil {
		t.Fatalf("mosquitto_pub -q 1 succeeded while the disk is low: %s", out)
	}

	// Space comes back: publishing resumes by itself.
	for _, f := range []string{filler, filler + "2"} {
		if err := os.Remove(f); err != nil {
			t.Fatal(err)
		}
	}
	bt.WaitFor(t, 30*time.Second, "publishing resumes after space is freed", func() bool {
		if r := publish1(t, pub, "fill/a", []byte("after")); r.ReasonCode < 0x80 {
			acked = append(acked, "after")
			return true
		}
		time.Sleep(50 * time.Millisecond)
		return false
	})
	bt.WaitFor(t, 10*time.Second, "/readyz ready after space returned", func() bool {
		code, _ := readyz(t, p.http)
		return code == http.StatusOK
	})
	select {
	case <-p.exited:
		t.Fatalf("broker exited with %d", p.exitCode)
	default:
	}

	// Every acknowledged message reaches the persistent subscriber, after
	// a SIGKILL too.
	p.kill(t)
	p = startBeacon(t, filepath.Join(vol, "data"), "--config", conf)
	d := bt.Dial(t, p.mqtt, persistentConnect("drain"))
	msgs := d.WaitMessages(t, len(acked), 60*time.Second)
	got := map[string]bool{}
	for _, m := range msgs {
		got[strings.SplitN(string(m.Payload), " ", 2)[0]] = true
	}
	for _, id := range acked {
		if !got[id] {
			t.Fatalf("acknowledged message %s lost (got %d distinct of %d)", id, len(got), len(acked))
		}
	}
}

// publish1 publishes at QoS 1 and returns the PUBACK, failure codes included.
func publish1(t *testing.T, c *bt.Client, topic string, payload []byte) *paho.PublishResponse {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	r, err := c.Publish(ctx, &paho.Publish{Topic: topic, QoS: 1, Payload: payload})
	if r == nil {
		t.Fatalf("publish to %s: %v", topic, err)
	}
	return r
}

// TestStartOnFullDisk kills the broker, fills its volume to the last
// byte and starts it again: it starts read-only (serving what is stored,
// refusing new messages with 0x97), and opens for writing by itself once
// space is freed.
func TestStartOnFullDisk(t *testing.T) {
	vol := mountTmpfs(t, 128<<20)
	data := filepath.Join(vol, "data")
	p := startBeacon(t, data)
	keeper := bt.Dial(t, p.mqtt, persistentConnect("keeper"))
	keeper.SubscribeT(t, paho.SubscribeOptions{Topic: "full/#", QoS: 1})
	_ = keeper.Disconnect(&paho.Disconnect{})
	pub := bt.Dial(t, p.mqtt, &paho.Connect{ClientID: "pub", CleanStart: true})
	pub.PublishT(t, &paho.Publish{Topic: "full/retained", QoS: 1, Retain: true, Payload: []byte("kept")})
	pub.PublishT(t, &paho.Publish{Topic: "full/queued", QoS: 1, Payload: []byte("queued")})
	p.kill(t)
	fill(t, filepath.Join(vol, "filler"), -1)

	p = startBeacon(t, data)
	if !strings.Contains(p.Logs(), "opening the store read-only") {
		t.Fatalf("no warning that the store opened read-only:\n%s", p.Logs())
	}
	bt.WaitFor(t, 10*time.Second, "/readyz saying the disk is low", func() bool {
		code, body := readyz(t, p.http)
		return code == http.StatusServiceUnavailable && strings.Contains(body, "disk space low")
	})
	reader := bt.Dial(t, p.mqtt, &paho.Connect{ClientID: "reader", CleanStart: true})
	reader.SubscribeT(t, paho.SubscribeOptions{Topic: "full/retained", QoS: 1})
	if m := reader.WaitMessages(t, 1, 10*time.Second)[0]; string(m.Payload) != "kept" {
		t.Fatalf("retained on a full disk: %q", m.Payload)
	}
	pub = bt.Dial(t, p.mqtt, &paho.Connect{ClientID: "pub", CleanStart: true})
	if r := publish1(t, pub, "full/new", []byte("new")); r.ReasonCode != 0x97 {
		t.Fatalf("QoS 1 on a full disk: 0x%02X, want 0x97", r.ReasonCode)
	}

	if err := os.Remove(filepath.Join(vol, "filler")); err != nil {
		t.Fatal(err)
	}
	bt.WaitFor(t, 30*time.Second, "the store opens for writing once space is freed", func() bool {
		if publish1(t, pub, "full/new", []byte("new")).ReasonCode < 0x80 {
			return true
		}
		time.Sleep(100 * time.Millisecond)
		return false
	})
	bt.WaitFor(t, 10*time.Second, "/readyz ready after space returned", func() bool {
		code, _ := readyz(t, p.http)
		return code == http.StatusOK
	})
	k := bt.Dial(t, p.mqtt, persistentConnect("keeper"))
	got := map[string]bool{}
	for _, m := range k.WaitMessages(t, 2, 20*time.Second) {
		got[string(m.Payload)] = true
	}
	if !got["queued"] || !got["new"] {
		t.Fatalf("after the full disk the persistent session got %v, want queued and new", got)
	}
}
