package engine

import (
	"fmt"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
)

func TestPublishSubscribeQoS(t *testing.T) {
	for _, version := range []byte{4, 5} {
		for _, qos := range []byte{0, 1, 2} {
			t.Run(fmt.Sprintf("v%d/qos%d", version, qos), func(t *testing.T) {
				_, addr := startServer(t, Options{})
				sub := dialRaw(t, addr, version)
				if ack := sub.connect("sub", true, nil); ack.ReasonCode != 0 {
					t.Fatalf("CONNACK 0x%02x", ack.ReasonCode)
				}
				if ack := sub.subscribe(1, "a/+", 2); ack.ReasonCodes[0] != 2 {
					t.Fatalf("SUBACK %v", ack.ReasonCodes)
				}
				pub := dialRaw(t, addr, version)
				pub.connect("pub", true, nil)
				pub.publish("a/b", []byte("hello"), qos, 7)
				switch qos {
				case 1:
					if ack := pub.expect(packets.Puback); ack.PacketID != 7 {
						t.Fatalf("PUBACK id %d", ack.PacketID)
					}
				case 2:
					pub.expect(packets.Pubrec)
					pub.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Pubrel}, PacketID: 7})
					pub.expect(packets.Pubcomp)
				}
				got := sub.expect(packets.Publish)
				if got.TopicName != "a/b" || string(got.Payload) != "hello" || got.FixedHeader.Qos != qos {
					t.Fatalf("got %q %q qos %d", got.TopicName, got.Payload, got.FixedHeader.Qos)
				}
				switch qos {
				case 1:
					sub.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Puback}, PacketID: got.PacketID})
				case 2:
					sub.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Pubrec}, PacketID: got.PacketID})
					sub.expect(packets.Pubrel)
					sub.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Pubcomp}, PacketID: got.PacketID})
				}
			})
		}
	}
}

// The server's outbound packet ids and the client's inbound ones are
// separate spaces: a client publishing QoS 2 with id 1 while the server
// has its own id 1 in flight to it loses neither.
func TestPacketIDSpacesSeparate(t *testing.T) {
	srv, addr := startServer(t, Options{})
	c := dialRaw(t, addr, 4)
	c.connect("both", false, nil)
	c.subscribe(1, "t", 2)
	other := dialRaw(t, addr, 4)
	other.connect("other", true, nil)
	other.publish("t", []byte("from-other"), 2, 1)
	other.expect(packets.Pubrec)
	other.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Pubrel}, PacketID: 1})
	other.expect(packets.Pubcomp)
	out := c.expect(packets.Publish) // the server's id, unacknowledged
	// The client now publishes QoS 2 with the same id.
	c.publish("u", []byte("from-client"), 2, out.PacketID)
	if ack := c.expect(packets.Pubrec); ack.PacketID != out.PacketID {
		t.Fatalf("PUBREC id %d", ack.PacketID)
	}
	// The outbound message is still in flight: complete it.
	c.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Pubrec}, PacketID: out.PacketID})
	if rel := c.expect(packets.Pubrel); rel.PacketID != out.PacketID {
		t.Fatalf("PUBREL id %d", rel.PacketID)
	}
	c.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Pubrel}, PacketID: out.PacketID})
	if comp := c.expect(packets.Pubcomp); comp.PacketID != out.PacketID {
		t.Fatalf("PUBCOMP id %d", comp.PacketID)
	}
	c.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Pubcomp}, PacketID: out.PacketID})
	waitFor(t, 5*time.Second, func() error {
		if n := srv.Stats().Inflight; n != 0 {
			return fmt.Errorf("%d in flight", n)
		}
		return nil
	})
}

// A persistent session queues QoS 1/2 messages while offline and sends
// them all when the client comes back, within its Receive Maximum.
func TestPersistentSessionQueueAndReceiveMaximum(t *testing.T) {
	_, addr := startServer(t, Options{})
	sub := dialRaw(t, addr, 5)
	sub.connect("phone", true, func(pk *packets.Packet) {
		pk.Properties.SessionExpiryInterval, pk.Properties.SessionExpiryIntervalFlag = 300, true
	})
	sub.subscribe(1, "alerts/#", 2)
	sub.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Disconnect}})
	sub.expectClosed()

	pub := dialRaw(t, addr, 5)
	pub.connect("pub", true, nil)
	const n = 20
	for i := 1; i <= n; i++ {
		qos := byte(1 + i%2)
		pub.publish("alerts/door", []byte(fmt.Sprint(i)), qos, uint16(i))
		if qos == 2 {
			pub.expect(packets.Pubrec)
			pub.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Pubrel}, PacketID: uint16(i)})
			pub.expect(packets.Pubcomp)
		} else {
			pub.expect(packets.Puback)
		}
	}

	sub = dialRaw(t, addr, 5)
	ack := sub.connect("phone", false, func(pk *packets.Packet) {
		pk.Properties.SessionExpiryInterval, pk.Properties.SessionExpiryIntervalFlag = 300, true
		pk.Properties.ReceiveMaximum = 2
	})
	if !ack.SessionPresent {
		t.Fatal("session not present")
	}
	for want := 1; want <= n; {
		// Exactly two arrive before we acknowledge.
		a := sub.expect(packets.Publish)
		b := sub.expect(packets.Publish)
		if _, err := sub.read(200 * time.Millisecond); err == nil {
			t.Fatal("a third message arrived with Receive Maximum 2")
		}
		for _, p := range []packets.Packet{a, b} {
			if string(p.Payload) != fmt.Sprint(want) {
				t.Fatalf("got %q, want %d", p.Payload, want)
			}
			want++
			if p.FixedHeader.Qos == 1 {
				sub.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Puback}, PacketID: p.PacketID})
			} else {
				sub.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Pubrec}, PacketID: p.PacketID})
				sub.expect(packets.Pubrel)
				sub.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Pubcomp}, PacketID: p.PacketID})
			}
		}
	}
}

func TestRetained(t *testing.T) {
	_, addr := startServer(t, Options{})
	pub := dialRaw(t, addr, 4)
	pub.connect("pub", true, nil)
	pub.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1, Retain: true},
		TopicName: "home/status", Payload: []byte("online"), PacketID: 1})
	pub.expect(packets.Puback)
	sub := dialRaw(t, addr, 4)
	sub.connect("sub", true, nil)
	sub.subscribe(1, "home/#", 1)
	got := sub.expect(packets.Publish)
	if !got.FixedHeader.Retain || string(got.Payload) != "online" {
		t.Fatalf("got retain=%v %q", got.FixedHeader.Retain, got.Payload)
	}
	// An empty retained payload clears it.
	pub.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1, Retain: true},
		TopicName: "home/status", PacketID: 2})
	pub.expect(packets.Puback)
	late := dialRaw(t, addr, 4)
	late.connect("late", true, nil)
	late.subscribe(1, "home/#", 1)
	if pk, err := late.read(200 * time.Millisecond); err == nil {
		t.Fatalf("got %q after the retained message was cleared", pk.Payload)
	}
}

func TestWill(t *testing.T) {
	_, addr := startServer(t, Options{})
	sub := dialRaw(t, addr, 4)
	sub.connect("watch", true, nil)
	sub.subscribe(1, "devices/+/status", 1)

	will := func(pk *packets.Packet) {
		pk.Connect.WillFlag = true
		pk.Connect.WillTopic = "devices/s1/status"
		pk.Connect.WillPayload = []byte("offline")
		pk.Connect.WillQos = 1
	}
	d := dialRaw(t, addr, 4)
	d.connect("s1", true, will)
	_ = d.nc.Close() // vanish without DISCONNECT
	got := sub.expect(packets.Publish)
	if got.TopicName != "devices/s1/status" || string(got.Payload) != "offline" {
		t.Fatalf("got %q %q", got.TopicName, got.Payload)
	}
	sub.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Puback}, PacketID: got.PacketID})

	// A normal DISCONNECT discards the will.
	d = dialRaw(t, addr, 4)
	d.connect("s1", true, will)
	d.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Disconnect}})
	d.expectClosed()
	if pk, err := sub.read(300 * time.Millisecond); err == nil {
		t.Fatalf("will sent after a normal DISCONNECT: %q", pk.Payload)
	}
}

func TestProtocolErrors(t *testing.T) {
	_, addr := startServer(t, Options{Limits: Limits{TopicAliasMax: 4}})
	cases := []struct {
		name    string
		version byte
		connect func(*packets.Packet)
		after   func(r *raw)
		connack byte // expected CONNACK code, when refused
		discon  byte // expected v5 DISCONNECT code after CONNECT
	}{
		{name: "v3 empty id persistent", version: 4, connect: func(pk *packets.Packet) { pk.Connect.ClientIdentifier = ""; pk.Connect.Clean = false }, connack: 0x02},
		{name: "v5 auth method", version: 5, connect: func(pk *packets.Packet) { pk.Properties.AuthenticationMethod = "SCRAM" }, connack: 0x8C},
		{name: "v5 will wildcard", version: 5, connect: func(pk *packets.Packet) {
			pk.Connect.WillFlag, pk.Connect.WillTopic, pk.Connect.WillPayload = true, "a/#", []byte("x")
		}, connack: 0x90},
		{name: "v5 empty topic without alias", version: 5, after: func(r *raw) { r.publish("", []byte("x"), 1, 1) }, discon: 0x82},
		{name: "v5 alias too big", version: 5, after: func(r *raw) {
			r.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish}, TopicName: "a",
				Properties: packets.Properties{TopicAlias: 9, TopicAliasFlag: true}})
		}, discon: 0x94},
		{name: "v5 unknown alias", version: 5, after: func(r *raw) {
			r.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish},
				Properties: packets.Properties{TopicAlias: 2, TopicAliasFlag: true}})
		}, discon: 0x82},
		{name: "v5 wildcard topic", version: 5, after: func(r *raw) { r.publish("a/+", []byte("x"), 0, 0) }, discon: 0x82},
		{name: "v5 second connect", version: 5, after: func(r *raw) {
			r.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect},
				Connect: packets.ConnectParams{ProtocolName: []byte("MQTT"), ClientIdentifier: "x", Clean: true}})
		}, discon: 0x82},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r := dialRaw(t, addr, tc.version)
			ack := r.connect("c-"+tc.name, true, tc.connect)
			if tc.connack != 0 {
				if ack.ReasonCode != tc.connack {
					t.Fatalf("CONNACK 0x%02x, want 0x%02x", ack.ReasonCode, tc.connack)
				}
				r.expectClosed()
				return
			}
			if ack.ReasonCode != 0 {
				t.Fatalf("CONNACK 0x%02x", ack.ReasonCode)
			}
			tc.after(r)
			got := r.expectClosed()
			if len(got) == 0 || got[len(got)-1].FixedHeader.Type != packets.Disconnect || got[len(got)-1].ReasonCode != tc.discon {
				t.Fatalf("got %+v, want DISCONNECT 0x%02x", got, tc.discon)
			}
		})
	}
}

// A v3.1.1 client gets 3.1.1 return codes: 0x01 for a protocol level we
// do not speak.
func TestV3UnsupportedLevel(t *testing.T) {
	_, addr := startServer(t, Options{})
	r := dialRaw(t, addr, 4)
	// CONNECT with protocol level 6.
	r.write([]byte{0x10, 12, 0, 4, 'M', 'Q', 'T', 'T', 6, 2, 0, 30, 0, 0})
	pk, err := r.read(5 * time.Second)
	if err != nil || pk.FixedHeader.Type != packets.Connack || pk.ReasonCode != 0x01 {
		t.Fatalf("got %+v %v, want CONNACK 0x01", pk.FixedHeader, err)
	}
}

// Topic aliases live for one connection: an alias set before a reconnect
// is unknown after it.
func TestTopicAliasPerConnection(t *testing.T) {
	_, addr := startServer(t, Options{Limits: Limits{TopicAliasMax: 4}})
	r := dialRaw(t, addr, 5)
	r.connect("al", true, nil)
	r.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, TopicName: "x/y", PacketID: 1,
		Properties: packets.Properties{TopicAlias: 1, TopicAliasFlag: true}})
	r.expect(packets.Puback)
	r.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, PacketID: 2,
		Properties: packets.Properties{TopicAlias: 1, TopicAliasFlag: true}})
	r.expect(packets.Puback)
	r.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Disconnect}})
	r.expectClosed()
	r = dialRaw(t, addr, 5)
	r.connect("al", true, nil)
	r.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, PacketID: 3,
		Properties: packets.Properties{TopicAlias: 1, TopicAliasFlag: true}})
	got := r.expectClosed()
	if len(got) != 1 || got[0].FixedHeader.Type != packets.Disconnect || got[0].ReasonCode != 0x82 {
		t.Fatalf("got %+v, want DISCONNECT 0x82", got)
	}
}
