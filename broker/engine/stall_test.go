package engine

import (
	"bufio"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
)

// dialSlow opens a connection with a fixed receive buffer (no
// autotuning), so a reader that stops reading fills the broker's outbound
// budget soon.
func dialSlow(t *testing.T, addr string, rcvbuf int) *raw {
	t.Helper()
	nc, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	_ = nc.(*net.TCPConn).SetReadBuffer(rcvbuf)
	t.Cleanup(func() { _ = nc.Close() })
	return &raw{t: t, nc: nc, br: bufio.NewReaderSize(nc, 64<<10), version: 5}
}

// publishQoS0 writes n numbered QoS 0 PUBLISH packets of size bytes from
// its own goroutine (the broker may hold it back) and reports when done.
func publishQoS0(t *testing.T, addr, topic string, n, size int) <-chan error {
	t.Helper()
	pub := dialRaw(t, addr, 5)
	pub.connect(fmt.Sprintf("pub-%s", topic), true, nil)
	done := make(chan error, 1)
	go func() {
		w := bufio.NewWriterSize(pub.nc, 64<<10)
		payload := make([]byte, size)
		for i := range n {
			binary.BigEndian.PutUint32(payload, uint32(i))
			b := append([]byte{0x30}, appendVarint(nil, 2+len(topic)+1+len(payload))...)
			b = appendString(b, topic)
			b = append(b, 0) // no properties
			b = append(b, payload...)
			if _, err := w.Write(b); err != nil {
				done <- err
				return
			}
		}
		done <- w.Flush()
	}()
	return done
}

// readNumbered reads QoS 0 PUBLISHes until n arrived or the connection
// ends, and checks they come in order without gaps.
func readNumbered(t *testing.T, r *raw, n int) int {
	t.Helper()
	for i := range n {
		pk, err := r.read(10 * time.Second)
		if err != nil {
			if err == io.EOF {
				return i
			}
			t.Fatalf("after %d messages: %v", i, err)
		}
		if pk.FixedHeader.Type != packets.Publish {
			t.Fatalf("packet type %d", pk.FixedHeader.Type)
		}
		if got := binary.BigEndian.Uint32(pk.Payload); got != uint32(i) {
			t.Fatalf("message %d arrived as number %d: a gap", got, i)
		}
	}
	return n
}

// A subscriber that reads slower than its publisher holds the publisher
// back instead of losing QoS 0 messages.
func TestQoS0BackpressureLosesNothing(t *testing.T) {
	s, addr := startServer(t, Options{Limits: Limits{OutboundBudget: 8 << 10, PublisherStall: 10 * time.Second}})
	sub := dialSlow(t, addr, 64<<10)
	sub.connect("reader", true, nil)
	sub.subscribe(1, "bp/t", 0)
	const n, size = 32000, 1000 // 32 MB: more than the sockets' buffers hold
	done := publishQoS0(t, addr, "bp/t", n, size)
	// The subscriber does not read until the publisher is held back.
	waitFor(t, 20*time.Second, func() error {
		if st := s.Stats(); st.Stalls == 0 {
			return fmt.Errorf("no stall yet (%d sent)", st.Sent)
		}
		return nil
	})
	if got := readNumbered(t, sub, n); got != n {
		t.Fatalf("received %d of %d", got, n)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	st := s.Stats()
	if st.Dropped[DropQueueFull] != 0 || st.StallTimeouts != 0 {
		t.Fatalf("dropped %d, %d stalls timed out", st.Dropped[DropQueueFull], st.StallTimeouts)
	}
}

// A subscriber that stops reading costs its publisher one bounded stall,
// then loses its QoS 0 messages; the other subscribers get every one.
func TestQoS0StuckSubscriberDoesNotHoldPublishers(t *testing.T) {
	// The stall must outlast any pause of the healthy reader on a loaded
	// machine (a 50 ms one ran out under -race and dropped a message to it):
	// the stuck subscriber marks itself stalled after its first timeout
	// anyway, so a long stall costs the run a few seconds at most.
	s, addr := startServer(t, Options{Limits: Limits{OutboundBudget: 8 << 10, PublisherStall: time.Second}})
	stuck := dialSlow(t, addr, 4096)
	stuck.connect("stuck", true, nil)
	stuck.subscribe(1, "bp/t", 0)
	healthy := dialRaw(t, addr, 5)
	healthy.connect("healthy", true, nil)
	healthy.subscribe(1, "bp/t", 0)
	const n, size = 12000, 1000
	done := publishQoS0(t, addr, "bp/t", n, size)
	if got := readNumbered(t, healthy, n); got != n {
		t.Fatalf("the healthy subscriber received %d of %d", got, n)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	st := s.Stats()
	if st.Dropped[DropQueueFull] == 0 || st.StallTimeouts == 0 {
		t.Fatalf("dropped %d, %d stalls timed out: the stuck subscriber lost nothing?", st.Dropped[DropQueueFull], st.StallTimeouts)
	}
	// One stall per period in which the socket took nothing, not one per message.
	if st.StallTimeouts > 20 {
		t.Fatalf("%d stalls timed out for %d messages", st.StallTimeouts, n)
	}
}

// Thousands of flows in flight to one subscriber, acknowledged out of
// order, free their packet ids; the ids in flight are always distinct.
func TestManyFlightsOutOfOrder(t *testing.T) {
	s, addr := startServer(t, Options{Limits: Limits{MaxQueued: 10000}})
	sub := dialRaw(t, addr, 5)
	sub.connect("many", true, func(pk *packets.Packet) { pk.Properties.ReceiveMaximum = 5000 })
	sub.subscribe(1, "m/#", 2)
	pub := dialRaw(t, addr, 5)
	pub.connect("pub", true, nil)
	for round := range 2 {
		const n = 3000
		for i := range n {
			pub.publish("m/t", []byte{byte(i)}, byte(1+i%2), uint16(1+i%60000))
			pk := pub.expect(packets.Puback + byte(i%2)) // PUBACK for QoS 1, PUBREC for QoS 2
			if i%2 == 1 {
				pub.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Pubrel, Qos: 1}, PacketID: pk.PacketID})
				pub.expect(packets.Pubcomp)
			}
		}
		ids := map[uint16]byte{}
		var order []uint16
		for range n {
			pk := sub.expect(packets.Publish)
			if _, dup := ids[pk.PacketID]; dup {
				t.Fatalf("round %d: packet id %d in flight twice", round, pk.PacketID)
			}
			ids[pk.PacketID] = pk.FixedHeader.Qos
			order = append(order, pk.PacketID)
		}
		// Acknowledge newest first.
		for i := len(order) - 1; i >= 0; i-- {
			id := order[i]
			if ids[id] == 1 {
				sub.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Puback}, PacketID: id})
				continue
			}
			sub.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Pubrec}, PacketID: id})
			rel := sub.expect(packets.Pubrel)
			if rel.PacketID != id {
				t.Fatalf("PUBREL %d for PUBREC %d", rel.PacketID, id)
			}
			sub.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Pubcomp}, PacketID: id})
		}
		waitFor(t, 10*time.Second, func() error {
			if n := s.Stats().Inflight; n != 0 {
				return fmt.Errorf("round %d: %d in flight", round, n)
			}
			return nil
		})
	}
}
