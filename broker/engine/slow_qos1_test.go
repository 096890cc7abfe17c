package engine

import (
	"bytes"
	"fmt"
	"net"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
)

// QoS 1 messages to a subscriber that stops reading are never dropped:
// they wait in its session, its connection is closed as a slow consumer,
// and when it comes back it gets every one (mochi acknowledged 300 and
// delivered 100, with nothing left queued).
func TestStuckQoS1SubscriberLosesNothing(t *testing.T) {
	srv, addr := startServer(t, Options{Limits: Limits{OutboundBudget: 64 << 10, WriteTimeout: time.Second}})
	stuck := dialRaw(t, addr, 5)
	_ = stuck.nc.(*net.TCPConn).SetReadBuffer(4096)
	stuck.connect("stuck-q1", true, v5connect(600))
	stuck.subscribe(1, "q1/#", 1)
	// From here on it reads nothing.

	pub := dialRaw(t, addr, 5)
	pub.connect("pub", true, nil)
	payload := bytes.Repeat([]byte("y"), 16<<10)
	const n = 300
	for i := 1; i <= n; i++ {
		pub.publish("q1/a", append([]byte(fmt.Sprintf("%03d", i)), payload...), 1, uint16(i))
		pub.expect(packets.Puback)
	}
	waitFor(t, 10*time.Second, func() error {
		if st := srv.Stats(); st.SlowConsumers == 0 {
			return fmt.Errorf("stuck subscriber not closed yet")
		}
		return nil
	})
	back := dialRaw(t, addr, 5)
	if ack := back.connect("stuck-q1", false, v5connect(600)); !ack.SessionPresent {
		t.Fatal("session not present")
	}
	seen := map[string]bool{}
	for len(seen) < n {
		pk, err := back.read(5 * time.Second)
		if err != nil {
			t.Fatalf("got %d of %d: %v", len(seen), n, err)
		}
		if pk.FixedHeader.Type != packets.Publish {
			continue
		}
		seen[string(pk.Payload[:3])] = true
		back.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Puback}, PacketID: pk.PacketID})
	}
	if d := srv.Stats().Dropped[DropQueueFull]; d != 0 {
		t.Fatalf("%d messages counted as dropped", d)
	}
}
