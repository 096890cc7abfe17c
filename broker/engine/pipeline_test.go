package engine

import (
	"fmt"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
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
