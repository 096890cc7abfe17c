package engine

import (
	"context"
	"fmt"
	"net"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/beaconmq/beacon/storage"
)

// PUBLISHes that arrive in one read share a group commit; what follows
// them still sees them: acks leave in order, a SUBSCRIBE in the same read
// gets the retained message just published, a QoS 0 PUBLISH after QoS 1
// ones is delivered after them, and a QoS 2 resend in the same read is
// acknowledged, not routed twice.
func TestPipelinedPublishesKeepOrder(t *testing.T) {
	_, addr, _ := durableServer(t, t.TempDir())
	watch := dialRaw(t, addr, 5)
	watch.connect("watch", true, nil)
	watch.subscribe(1, "p/#", 2)

	c := dialRaw(t, addr, 5)
	c.connect("pub", true, nil)
	pub := func(topic string, qos byte, id uint16, retain, dup bool, payload string) packets.Packet {
		return packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: qos, Retain: retain, Dup: dup},
			TopicName: topic, PacketID: id, Payload: []byte(payload)}
	}
	var batch []byte
	for i := range 10 {
		batch = append(batch, c.encode(pub("p/a", 1, uint16(1+i), false, false, fmt.Sprint(i)))...)
	}
	batch = append(batch, c.encode(pub("p/r", 1, 11, true, false, "retained"))...)
	batch = append(batch, c.encode(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Subscribe}, PacketID: 99,
		Filters: packets.Subscriptions{{Filter: "p/r", Qos: 1}}})...)
	batch = append(batch, c.encode(pub("p/a", 2, 12, false, false, "q2"))...)
	batch = append(batch, c.encode(pub("p/a", 2, 12, false, true, "q2"))...) // resent: one message
	batch = append(batch, c.encode(pub("p/a", 0, 0, false, false, "q0"))...)
	c.write(batch)

	for id := uint16(1); id <= 11; id++ {
		if ack := c.expect(packets.Puback); ack.PacketID != id {
			t.Fatalf("PUBACK %d, want %d: acks out of order", ack.PacketID, id)
		}
	}
	c.expect(packets.Suback)
	if got := c.expect(packets.Publish); string(got.Payload) != "retained" || !got.FixedHeader.Retain {
		t.Fatalf("after SUBACK got %q (retain %v), want the retained message", got.Payload, got.FixedHeader.Retain)
	}
	for range 2 {
		if rec := c.expect(packets.Pubrec); rec.PacketID != 12 {
			t.Fatalf("PUBREC %d, want 12", rec.PacketID)
		}
	}

	want := []string{"0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "retained", "q2", "q0"}
	var got []string
	pinged := false
	for {
		pk, err := watch.read(5 * time.Second)
		if err != nil {
			t.Fatalf("after %q: %v", got, err)
		}
		switch pk.FixedHeader.Type {
		case packets.Publish:
			got = append(got, string(pk.Payload))
			switch pk.FixedHeader.Qos {
			case 1:
				watch.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Puback}, PacketID: pk.PacketID})
			case 2:
				watch.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Pubrec}, PacketID: pk.PacketID})
			}
		case packets.Pubrel:
			watch.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Pubcomp}, PacketID: pk.PacketID})
		case packets.Pingresp:
			if len(got) != len(want) {
				t.Fatalf("deliveries %q, want %q", got, want)
			}
			for i := range want {
				if got[i] != want[i] {
					t.Fatalf("deliveries %q, want %q", got, want)
				}
			}
			return
		}
		if len(got) == len(want) && !pinged {
			pinged = true // anything more (a second q2) would come before the PINGRESP
			watch.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Pingreq}})
		}
	}
}

// A 3.1.1 client whose pending PUBLISH fails to store is disconnected
// (it has no other way to learn it), even when the failure is found while
// answering a later PUBLISH of the same read: that one is not
// acknowledged either, and nothing after it is.
func TestPipelinedStoreFailureClosesV3(t *testing.T) {
	db, l := openStore(t, t.TempDir(), storage.SyncBatch)
	s := New(Options{Persistence: &Persistence{DB: db, Log: l},
		Limits: Limits{MaxTopicLength: 16}})
	if _, err := s.Load(); err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = s.Serve(ln, "tcp") }()
	t.Cleanup(func() { _ = s.Shutdown(context.Background()) })

	c := dialRaw(t, ln.Addr().String(), 4)
	c.connect("v3", true, nil)
	// The store fails from here on (a real failure: the log is closed).
	if err := l.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
	batch := c.encode(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1, Retain: true},
		TopicName: "lost", PacketID: 1, Payload: []byte("not stored")})
	batch = append(batch, c.encode(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1},
		TopicName: "a/topic/longer/than/sixteen", PacketID: 2, Payload: []byte("refused")})...)
	batch = append(batch, c.encode(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1},
		TopicName: "ok", PacketID: 3, Payload: []byte("after")})...)
	c.write(batch)
	if got := c.expectClosed(); len(got) != 0 {
		t.Fatalf("got %d packets (first type %d id %d) before the close, want none", len(got), got[0].FixedHeader.Type, got[0].PacketID)
	}
	if _, ok := s.retained.Get("lost"); ok {
		t.Fatal("the message that failed to store is retained")
	}
}
