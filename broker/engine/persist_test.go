package engine

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/beaconmq/beacon/storage"
)

// openStore opens a data directory the way the broker does.
func openStore(t testing.TB, dir string, sync storage.SyncPolicy) (*storage.DB, *storage.Log) {
	t.Helper()
	db, err := storage.Open(storage.Options{Dir: dir, Sync: sync})
	if err != nil {
		t.Fatal(err)
	}
	// Registered before the caller's server cleanup, so it runs after
	// it; a store the test already shut down is left alone.
	t.Cleanup(func() { _ = db.Shutdown(context.Background()) })
	l, err := storage.OpenLog(db, storage.LogOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return db, l
}

// lastLoad is what the last durableServer restored.
var lastLoad LoadStats

// durableServer runs a Server on dir; stop shuts it down as a graceful
// broker stop does.
func durableServer(t *testing.T, dir string) (s *Server, addr string, stop func()) {
	t.Helper()
	db, l := openStore(t, dir, storage.SyncBatch)
	s = New(Options{Persistence: &Persistence{DB: db, Log: l}})
	st, err := s.Load()
	if err != nil {
		t.Fatal(err)
	}
	lastLoad = st
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = s.Serve(ln, "tcp") }()
	stopped := false
	stop = func() {
		if stopped {
			return
		}
		stopped = true
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := s.Shutdown(ctx); err != nil {
			t.Errorf("shutdown: %v", err)
		}
		_ = l.Shutdown(ctx)
		if err := db.Shutdown(ctx); err != nil {
			t.Errorf("db shutdown: %v", err)
		}
	}
	t.Cleanup(stop)
	return s, ln.Addr().String(), stop
}

func TestRestartKeepsSessionsQueuesAndRetained(t *testing.T) {
	dir := t.TempDir()
	_, addr, stop := durableServer(t, dir)
	sub := dialRaw(t, addr, 5)
	sub.connect("keeper", true, v5connect(3600))
	sub.subscribe(1, "k/#", 2)
	pub := dialRaw(t, addr, 4)
	pub.connect("pub", true, nil)
	// One QoS 2 message reaches the subscriber, which does not answer.
	pub.publish("k/first", []byte("first"), 2, 1)
	pub.expect(packets.Pubrec)
	pub.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Pubrel}, PacketID: 1})
	pub.expect(packets.Pubcomp)
	first := sub.expect(packets.Publish)
	_ = sub.nc.Close()
	for i := 2; i <= 10; i++ {
		pub.publish("k/more", []byte(fmt.Sprint(i)), 1, uint16(i))
		pub.expect(packets.Puback)
	}
	pub.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1, Retain: true},
		TopicName: "k/status", Payload: []byte("on"), PacketID: 11})
	pub.expect(packets.Puback)
	stop()

	srv, addr, _ := durableServer(t, dir)
	if st := srv.Stats(); st.Sessions != 1 || st.Retained != 1 {
		t.Fatalf("after restart: %d sessions, %d retained", st.Sessions, st.Retained)
	}
	sub = dialRaw(t, addr, 5)
	if ack := sub.connect("keeper", false, v5connect(3600)); !ack.SessionPresent {
		t.Fatal("session not present after restart")
	}
	again := sub.expect(packets.Publish)
	if !again.FixedHeader.Dup || again.PacketID != first.PacketID || string(again.Payload) != "first" {
		t.Fatalf("QoS 2 resent as dup=%v id %d (was %d) %q", again.FixedHeader.Dup, again.PacketID, first.PacketID, again.Payload)
	}
	for i := 2; i <= 11; i++ {
		got := sub.expect(packets.Publish)
		want := fmt.Sprint(i)
		if i == 11 {
			want = "on"
		}
		if string(got.Payload) != want {
			t.Fatalf("got %q, want %q", got.Payload, want)
		}
		sub.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Puback}, PacketID: got.PacketID})
	}
}

// The child process of TestQoS2ExactlyOnceAcrossSIGKILL: a durable
// engine on the directory and address the parent gives.
func TestEngineChild(t *testing.T) {
	dir, addr := os.Getenv("BEACON_ENGINE_CHILD_DIR"), os.Getenv("BEACON_ENGINE_CHILD_ADDR")
	if dir == "" {
		t.Skip("run by TestQoS2ExactlyOnceAcrossSIGKILL")
	}
	db, l := openStore(t, dir, storage.SyncBatch)
	s := New(Options{Persistence: &Persistence{DB: db, Log: l}})
	if _, err := s.Load(); err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	fmt.Println("listening")
	_ = s.Serve(ln, "tcp")
}

// An online QoS 2 subscriber across repeated SIGKILLs of the broker: every
// message the publisher completed arrives, none twice.
func TestQoS2ExactlyOnceAcrossSIGKILL(t *testing.T) {
	if testing.Short() {
		t.Skip("kills a broker process repeatedly")
	}
	dir := t.TempDir()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	_ = ln.Close()
	start := func() *exec.Cmd {
		cmd := exec.Command(os.Args[0], "-test.run=^TestEngineChild$", "-test.v")
		cmd.Env = append(os.Environ(), "BEACON_ENGINE_CHILD_DIR="+dir, "BEACON_ENGINE_CHILD_ADDR="+addr)
		out, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		cmd.Stderr = os.Stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			if strings.Contains(sc.Text(), "listening") {
				go func() {
					for sc.Scan() {
					}
				}()
				return cmd
			}
		}
		t.Fatalf("child did not start: %v", cmd.Wait())
		return nil
	}
	child := start()
	t.Cleanup(func() { _ = child.Process.Kill(); _ = child.Wait() })

	sub := &qos2Client{t: t, id: "exactly-once-sub", addr: addr, filter: "eo/#", got: map[string]int{}}
	pub := &qos2Client{t: t, id: "exactly-once-pub", addr: addr}
	if err := sub.dial(); err != nil {
		t.Fatal(err)
	}
	// The first message must find the subscription: wait for its SUBACK
	// before anything is published (nothing can arrive before it yet).
	if pk, err := sub.r.read(5 * time.Second); err != nil || pk.FixedHeader.Type != packets.Suback {
		t.Fatalf("no SUBACK: %v %v", pk.FixedHeader.Type, err)
	}
	done := make(chan struct{})
	go sub.receive(done)
	completed := 0
	const kills = 10
	for k := 0; k < kills; k++ {
		for i := 0; i < 150; i++ {
			if err := pub.publish(fmt.Sprintf("m%d", completed)); err != nil {
				break
			}
			completed++
			if i == 100 {
				_ = child.Process.Signal(syscall.SIGKILL) // mid-stream
				_ = child.Wait()
				child = start()
			}
		}
		// The publisher finishes the message in flight at the kill.
		for pub.publish(fmt.Sprintf("m%d", completed)) != nil {
			time.Sleep(20 * time.Millisecond) // reconnect backoff
		}
		completed++
	}
	waitFor(t, 20*time.Second, func() error {
		missing := sub.missing(completed)
		if len(missing) > 0 {
			return fmt.Errorf("%d of %d completed messages not received, e.g. %v", len(missing), completed, missing[:min(5, len(missing))])
		}
		return nil
	})
	close(done)
	if d := sub.duplicates(); len(d) > 0 {
		t.Fatalf("%d messages delivered twice: %v", len(d), d[:min(5, len(d))])
	}
	t.Logf("%d QoS 2 messages over %d kills: 0 lost, 0 duplicates", completed, kills)
}

// qos2Client is a persistent MQTT 3.1.1 QoS 2 client that keeps its
// protocol state across connections, as a real device does: a subscriber
// remembers the ids it PUBREC'd until PUBREL, a publisher resends its
// flow in flight.
type qos2Client struct {
	t      *testing.T
	id     string
	addr   string
	filter string
	r      *raw

	// subscriber
	pendingIn map[uint16]bool
	got       map[string]int
	mu        chan struct{}

	// publisher
	nextID uint16
}

func (c *qos2Client) dial() error {
	nc, err := net.DialTimeout("tcp", c.addr, time.Second)
	if err != nil {
		return err
	}
	r := &raw{t: c.t, nc: nc, br: bufio.NewReader(nc), version: 4}
	name := []byte("MQTT")
	connect := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect}, ProtocolVersion: 4,
		Connect: packets.ConnectParams{ProtocolName: name, ClientIdentifier: c.id, Clean: false, Keepalive: 30}}
	if err := sendPacket(nc, connect); err != nil {
		return err
	}
	ack, err := r.read(5 * time.Second)
	if err != nil || ack.FixedHeader.Type != packets.Connack || ack.ReasonCode != 0 {
		_ = nc.Close()
		return fmt.Errorf("connack: %v %v", ack.ReasonCode, err)
	}
	if c.filter != "" && !ack.SessionPresent {
		if err := sendPacket(nc, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Subscribe, Qos: 1}, PacketID: 1,
			ProtocolVersion: 4, Filters: packets.Subscriptions{{Filter: c.filter, Qos: 2}}}); err != nil {
			return err
		}
	}
	c.r = r
	return nil
}

func sendPacket(nc net.Conn, pk packets.Packet) error {
	var buf strings.Builder
	_ = buf
	var b bytesBuffer
	var err error
	switch pk.FixedHeader.Type {
	case packets.Connect:
		err = pk.ConnectEncode(&b.Buffer)
	case packets.Subscribe:
		err = pk.SubscribeEncode(&b.Buffer)
	case packets.Publish:
		err = pk.PublishEncode(&b.Buffer)
	case packets.Pubrec:
		err = pk.PubrecEncode(&b.Buffer)
	case packets.Pubrel:
		pk.FixedHeader.Qos = 1
		err = pk.PubrelEncode(&b.Buffer)
	case packets.Pubcomp:
		err = pk.PubcompEncode(&b.Buffer)
	}
	if err != nil {
		return err
	}
	_ = nc.SetWriteDeadline(time.Now().Add(5 * time.Second))
	_, err = nc.Write(b.Bytes())
	return err
}

// receive runs the subscriber until done, reconnecting after each kill.
func (c *qos2Client) receive(done chan struct{}) {
	c.pendingIn = map[uint16]bool{}
	c.mu = make(chan struct{}, 1)
	c.mu <- struct{}{}
	for {
		select {
		case <-done:
			return
		default:
		}
		if c.r == nil {
			if c.dial() != nil {
				time.Sleep(20 * time.Millisecond) // reconnect backoff
				continue
			}
		}
		pk, err := c.r.read(500 * time.Millisecond)
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			_ = c.r.nc.Close()
			c.r = nil
			continue
		}
		switch pk.FixedHeader.Type {
		case packets.Publish:
			<-c.mu
			if !c.pendingIn[pk.PacketID] {
				c.pendingIn[pk.PacketID] = true
				c.got[string(pk.Payload)]++
			}
			c.mu <- struct{}{}
			_ = sendPacket(c.r.nc, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Pubrec}, PacketID: pk.PacketID, ProtocolVersion: 4})
		case packets.Pubrel:
			<-c.mu
			delete(c.pendingIn, pk.PacketID)
			c.mu <- struct{}{}
			_ = sendPacket(c.r.nc, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Pubcomp}, PacketID: pk.PacketID, ProtocolVersion: 4})
		}
	}
}

func (c *qos2Client) missing(n int) []string {
	<-c.mu
	defer func() { c.mu <- struct{}{} }()
	var out []string
	for i := 0; i < n; i++ {
		if c.got[fmt.Sprintf("m%d", i)] == 0 {
			out = append(out, fmt.Sprintf("m%d", i))
		}
	}
	return out
}

func (c *qos2Client) duplicates() []string {
	<-c.mu
	defer func() { c.mu <- struct{}{} }()
	var out []string
	for k, n := range c.got {
		if n > 1 {
			out = append(out, k)
		}
	}
	return out
}

// publish completes one QoS 2 flow, resuming it on a new connection if
// the broker dies: PUBLISH with DUP until PUBREC, then PUBREL until
// PUBCOMP. It returns an error only if it could not connect.
func (c *qos2Client) publish(payload string) error {
	c.nextID = c.nextID%65535 + 1
	id := c.nextID
	released := false
	dup := false
	for attempt := 0; attempt < 200; attempt++ {
		if c.r == nil {
			if err := c.dial(); err != nil {
				if attempt > 100 {
					return err
				}
				time.Sleep(20 * time.Millisecond) // reconnect backoff
				continue
			}
		}
		var err error
		if !released {
			err = sendPacket(c.r.nc, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 2, Dup: dup},
				TopicName: "eo/x", Payload: []byte(payload), PacketID: id, ProtocolVersion: 4})
		} else {
			err = sendPacket(c.r.nc, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Pubrel}, PacketID: id, ProtocolVersion: 4})
		}
		for err == nil {
			var pk packets.Packet
			pk, err = c.r.read(5 * time.Second)
			if err != nil {
				break
			}
			if pk.PacketID != id {
				continue
			}
			if pk.FixedHeader.Type == packets.Pubrec && !released {
				released = true
				err = sendPacket(c.r.nc, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Pubrel}, PacketID: id, ProtocolVersion: 4})
				continue
			}
			if pk.FixedHeader.Type == packets.Pubcomp && released {
				return nil
			}
		}
		_ = c.r.nc.Close()
		c.r = nil
		dup = true
	}
	return errors.New("publish did not complete")
}

// A session restored after a restart and then replaced by a clean
// connection is gone from the store too: the next restart does not bring
// back its subscriptions or inbound QoS 2 marks (a stale mark made the
// client's next QoS 2 message with that id look like a duplicate).
func TestCleanStartAfterRestartForgetsTheStoredSession(t *testing.T) {
	dir := t.TempDir()
	_, addr, stop := durableServer(t, dir)
	c := dialRaw(t, addr, 4)
	c.connect("x", false, nil)
	c.subscribe(1, "a/#", 1)
	c.publish("b", []byte("unreleased"), 2, 7) // PUBREC'd, never PUBREL'd
	c.expect(packets.Pubrec)
	_ = c.nc.Close()
	stop()

	_, addr, stop = durableServer(t, dir)
	c = dialRaw(t, addr, 4)
	if ack := c.connect("x", true, nil); ack.SessionPresent {
		t.Fatal("clean connection got session present")
	}
	c.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Disconnect}})
	c.expectClosed()
	stop()

	srv, addr, _ := durableServer(t, dir)
	if st := srv.Stats(); st.Sessions != 0 || st.Subscriptions != 0 {
		t.Fatalf("after the clean session: %d sessions, %d subscriptions restored", st.Sessions, st.Subscriptions)
	}
	watch := dialRaw(t, addr, 4)
	watch.connect("watch", true, nil)
	watch.subscribe(1, "b", 2)
	c = dialRaw(t, addr, 4)
	c.connect("x", false, nil)
	c.publish("b", []byte("new"), 2, 7)
	c.expect(packets.Pubrec)
	if got := watch.expect(packets.Publish); string(got.Payload) != "new" {
		t.Fatalf("got %q", got.Payload)
	}
}

// A broker that stops gracefully sends no wills: its clients did not fail.
func TestNoWillsAtShutdown(t *testing.T) {
	dir := t.TempDir()
	_, addr, stop := durableServer(t, dir)
	w := dialRaw(t, addr, 4)
	w.connect("watcher", false, nil)
	w.subscribe(1, "status/#", 1)
	w.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Disconnect}})
	w.expectClosed()
	d := dialRaw(t, addr, 5)
	d.connect("dev", true, func(pk *packets.Packet) {
		pk.Connect.WillFlag, pk.Connect.WillTopic, pk.Connect.WillPayload, pk.Connect.WillQos = true, "status/dev", []byte("offline"), 1
	})
	stop()
	srv, addr, _ := durableServer(t, dir)
	if si, _ := srv.Session("watcher"); si.Queued+si.Inflight != 0 {
		t.Fatalf("the watcher has %d messages queued after a graceful stop", si.Queued+si.Inflight)
	}
	_ = addr
}

// The will of a connection that died with the broker is sent once after
// the restart, not again at the next one.
func TestWillAfterCrashSentOnce(t *testing.T) {
	dir := t.TempDir()
	db, l := openStore(t, dir, storage.SyncBatch)
	s := New(Options{Persistence: &Persistence{DB: db, Log: l}})
	if _, err := s.Load(); err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = s.Serve(ln, "tcp") }()
	w := dialRaw(t, ln.Addr().String(), 4)
	w.connect("watcher", false, nil)
	w.subscribe(1, "status/#", 1)
	w.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Disconnect}})
	w.expectClosed()
	d := dialRaw(t, ln.Addr().String(), 4)
	d.connect("dev", false, func(pk *packets.Packet) {
		pk.Connect.WillFlag, pk.Connect.WillTopic, pk.Connect.WillPayload, pk.Connect.WillQos = true, "status/dev", []byte("offline"), 1
	})
	// A crash: the store is closed under the running engine, which is
	// then abandoned (its listener closed).
	waitFor(t, 5*time.Second, func() error {
		if si, ok := s.Session("dev"); !ok || !si.Connected {
			return errString("dev not connected")
		}
		return nil
	})
	_ = ln.Close()
	_ = l.Shutdown(t.Context())
	_ = db.Shutdown(t.Context())
	_ = d.nc.Close()

	for round := 1; round <= 2; round++ {
		srv, _, stop := durableServer(t, dir)
		waitFor(t, 5*time.Second, func() error {
			si, _ := srv.Session("watcher")
			if round == 1 && si.Queued+si.Inflight != 1 {
				return errString("will not queued for the watcher yet")
			}
			return nil
		})
		if wills := lastLoad.Wills; wills != 2-round {
			t.Fatalf("restart %d restored %d wills to send, want %d", round, wills, 2-round)
		}
		si, _ := srv.Session("watcher")
		if want := 1; si.Queued+si.Inflight != want {
			t.Fatalf("restart %d: watcher holds %d messages, want %d (the one will)", round, si.Queued+si.Inflight, want)
		}
		stop()
	}
}
