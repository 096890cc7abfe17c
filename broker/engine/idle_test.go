package engine

import (
	"fmt"
	"runtime"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
)

// idleCount is how many connections wait in the idle poller.
func idleCount(s *Server) int {
	return s.Stats().Idle
}

func waitIdle(t *testing.T, s *Server, n int) {
	t.Helper()
	waitFor(t, 10*time.Second, func() error {
		if got := idleCount(s); got != n {
			return fmt.Errorf("%d connections idle, want %d", got, n)
		}
		return nil
	})
}

// An idle connection gives its reader goroutine back, and still gets its
// deliveries, answers its pings and publishes when it wakes.
func TestIdleConnectionWakes(t *testing.T) {
	s, addr := startServer(t, Options{Limits: Limits{IdleAfter: 30 * time.Millisecond}})
	sub := dialRaw(t, addr, 5)
	sub.connect("sleeper", true, nil)
	sub.subscribe(1, "idle/#", 1)
	pub := dialRaw(t, addr, 5)
	pub.connect("pub", true, nil)
	waitIdle(t, s, 2)

	// A delivery to an idle connection: written without waking its reader.
	pub.publish("idle/a", []byte("one"), 1, 1)
	pub.expect(packets.Puback)
	got := sub.expect(packets.Publish)
	if string(got.Payload) != "one" {
		t.Fatalf("payload %q", got.Payload)
	}
	// Its PUBACK wakes the reader; it idles again afterwards.
	sub.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Puback}, PacketID: got.PacketID})
	sub.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Pingreq}})
	sub.expect(packets.Pingresp)
	waitIdle(t, s, 2)
	if n := s.Stats().Inflight; n != 0 {
		t.Fatalf("inflight %d after the PUBACK of an idle connection", n)
	}
	// Many wake-ups in a row, each packet alone after an idle wait.
	for i := range 3 {
		sub.publish("idle/b", []byte{byte(i)}, 0, 0)
		got := sub.expect(packets.Publish)
		if got.Payload[0] != byte(i) {
			t.Fatalf("payload %v, want %d", got.Payload, i)
		}
		waitIdle(t, s, 2)
	}
}

// The keep-alive of an idle connection is kept by the poller: a v5 client
// that goes silent is told 0x8D and closed.
func TestIdleKeepAliveExpires(t *testing.T) {
	s, addr := startServer(t, Options{Limits: Limits{IdleAfter: 20 * time.Millisecond}})
	c := dialRaw(t, addr, 5)
	c.connect("silent", true, func(pk *packets.Packet) { pk.Connect.Keepalive = 1 })
	waitIdle(t, s, 1)
	start := time.Now()
	got := c.expectClosed()
	if len(got) != 1 || got[0].FixedHeader.Type != packets.Disconnect || got[0].ReasonCode != codeKeepAliveTimeout {
		t.Fatalf("got %+v, want one DISCONNECT 0x8D", got)
	}
	// 1.5 x 1 s from the last packet, checked once a second.
	if d := time.Since(start); d < time.Second {
		t.Fatalf("closed after %v, before the keep-alive ran out", d)
	}
	waitFor(t, 5*time.Second, func() error {
		if n := s.Stats().Connections; n != 0 {
			return fmt.Errorf("%d connections", n)
		}
		return nil
	})
}

// A takeover, a shutdown and a client's own close reach idle connections.
func TestIdleConnectionClosed(t *testing.T) {
	s, addr := startServer(t, Options{Limits: Limits{IdleAfter: 20 * time.Millisecond}})
	old := dialRaw(t, addr, 5)
	old.connect("dev", false, func(pk *packets.Packet) { pk.Properties.SessionExpiryInterval = 60 })
	gone := dialRaw(t, addr, 4)
	gone.connect("gone", true, nil)
	stay := dialRaw(t, addr, 5)
	stay.connect("stay", true, nil)
	waitIdle(t, s, 3)

	nw := dialRaw(t, addr, 5)
	ack := nw.connect("dev", false, func(pk *packets.Packet) { pk.Properties.SessionExpiryInterval = 60 })
	if !ack.SessionPresent {
		t.Fatal("the session of an idle connection was not taken over")
	}
	if got := old.expectClosed(); len(got) != 1 || got[0].ReasonCode != codeSessionTakenOver {
		t.Fatalf("old connection got %+v, want DISCONNECT 0x8E", got)
	}
	_ = gone.nc.Close()
	waitFor(t, 5*time.Second, func() error {
		if n := s.Stats().Connections; n != 2 {
			return fmt.Errorf("%d connections, want 2 (stay and the new dev)", n)
		}
		return nil
	})
	waitIdle(t, s, 2)
	if err := s.Shutdown(t.Context()); err != nil {
		t.Fatal(err)
	}
	for _, c := range []*raw{stay, nw} {
		if got := c.expectClosed(); len(got) != 1 || got[0].ReasonCode != codeServerShuttingDown {
			t.Fatalf("got %+v, want DISCONNECT 0x8B", got)
		}
	}
}

// Idle connections hold no goroutine each.
func TestIdleConnectionsHoldNoGoroutine(t *testing.T) {
	s, addr := startServer(t, Options{Limits: Limits{IdleAfter: 20 * time.Millisecond}})
	const n = 200
	before := runtime.NumGoroutine()
	for i := range n {
		c := dialRaw(t, addr, 4)
		c.connect(fmt.Sprintf("c%d", i), true, nil)
		c.subscribe(1, fmt.Sprintf("t/%d", i), 0)
	}
	waitIdle(t, s, n)
	if g := runtime.NumGoroutine() - before; g > n/4 { // a reader each would be n more
		t.Fatalf("%d more goroutines for %d idle connections", g, n)
	}
}

// A connection that has not sent or been sent a PUBLISH goes to the
// poller after firstIdleAfter, however long IdleAfter is (after a reconnect
// storm of idle devices few readers are alive at once), also when it parked
// between its CONNECT and its SUBSCRIBE; once a message has flowed it keeps
// its reader for IdleAfter.
func TestFirstIdleIsSooner(t *testing.T) {
	s, addr := startServer(t, Options{Limits: Limits{IdleAfter: time.Hour}})
	c := dialRaw(t, addr, 5)
	c.connect("device", true, nil)
	waitIdle(t, s, 1)               // a slow link: parked before its SUBSCRIBE
	c.subscribe(1, "cmd/device", 0) // resumed it: the SUBACK came
	waitIdle(t, s, 1)
	c.publish("cmd/device", []byte("on"), 0, 0)
	if got := c.expect(packets.Publish); string(got.Payload) != "on" {
		t.Fatalf("payload %q", got.Payload)
	}
	// A message has flowed: IdleAfter (an hour) holds, so it stays awake
	// for many times firstIdleAfter.
	for range 10 {
		time.Sleep(firstIdleAfter / 2)
		if n := idleCount(s); n != 0 {
			t.Fatalf("%d connections idle after a message, with IdleAfter an hour", n)
		}
	}
}
