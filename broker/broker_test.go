package broker_test

import (
	"context"
	"fmt"
	"net"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/beaconmq/beacon/broker"
	bt "github.com/beaconmq/beacon/broker/brokertest"
	"github.com/beaconmq/beacon/storage"
)

func u32(v uint32) *uint32 { return &v }

func startBroker(t *testing.T, mutate func(*broker.Config)) (*broker.Broker, string) {
	t.Helper()
	cfg := bt.Config(t)
	if mutate != nil {
		mutate(&cfg)
	}
	b := bt.Start(t, cfg)
	return b, b.MQTTAddr("tcp")
}

func TestQoSRoundTrip(t *testing.T) {
	_, addr := startBroker(t, nil)
	for _, qos := range []byte{0, 1, 2} {
		t.Run(fmt.Sprintf("qos%d", qos), func(t *testing.T) {
			topic := fmt.Sprintf("rt/qos%d", qos)
			sub := bt.Dial(t, addr, &paho.Connect{ClientID: "sub-" + topic, CleanStart: true})
			sub.SubscribeT(t, paho.SubscribeOptions{Topic: "rt/+", QoS: 2})
			pub := bt.Dial(t, addr, &paho.Connect{ClientID: "pub-" + topic, CleanStart: true})
			const n = 50
			for i := range n {
				pub.PublishT(t, &paho.Publish{Topic: topic, QoS: qos, Payload: []byte(strconv.Itoa(i))})
			}
			msgs := sub.WaitMessages(t, n, 10*time.Second)
			for i, m := range msgs {
				if m.Topic != topic || m.QoS != qos || string(m.Payload) != strconv.Itoa(i) {
					t.Fatalf("message %d: got topic %q qos %d payload %q", i, m.Topic, m.QoS, m.Payload)
				}
			}
		})
	}
}

func TestQoSDowngradedToSubscription(t *testing.T) {
	_, addr := startBroker(t, nil)
	sub := bt.Dial(t, addr, &paho.Connect{ClientID: "sub", CleanStart: true})
	sub.SubscribeT(t, paho.SubscribeOptions{Topic: "down", QoS: 1})
	pub := bt.Dial(t, addr, &paho.Connect{ClientID: "pub", CleanStart: true})
	pub.PublishT(t, &paho.Publish{Topic: "down", QoS: 2, Payload: []byte("x")})
	if m := sub.WaitMessages(t, 1, 5*time.Second)[0]; m.QoS != 1 {
		t.Fatalf("delivered at QoS %d, want the subscription's 1", m.QoS)
	}
}

func TestRetained(t *testing.T) {
	_, addr := startBroker(t, nil)
	pub := bt.Dial(t, addr, &paho.Connect{ClientID: "pub", CleanStart: true})
	pub.PublishT(t, &paho.Publish{Topic: "home/temp", QoS: 1, Retain: true, Payload: []byte("21.5")})
	pub.PublishT(t, &paho.Publish{Topic: "home/hum", QoS: 0, Retain: true, Payload: []byte("40")})
	pub.Barrier(t)

	sub := bt.Dial(t, addr, &paho.Connect{ClientID: "sub", CleanStart: true})
	sub.SubscribeT(t, paho.SubscribeOptions{Topic: "home/#", QoS: 1})
	msgs := sub.WaitMessages(t, 2, 5*time.Second)
	got := map[string]string{}
	for _, m := range msgs {
		if !m.Retain {
			t.Errorf("retained message on %q delivered without the retain flag", m.Topic)
		}
		got[m.Topic] = string(m.Payload)
	}
	if got["home/temp"] != "21.5" || got["home/hum"] != "40" {
		t.Fatalf("retained messages: %v", got)
	}

	// An empty retained payload clears the topic.
	pub.PublishT(t, &paho.Publish{Topic: "home/temp", QoS: 1, Retain: true})
	pub.Barrier(t)
	late := bt.Dial(t, addr, &paho.Connect{ClientID: "late", CleanStart: true})
	late.SubscribeT(t, paho.SubscribeOptions{Topic: "home/#", QoS: 1})
	late.WaitMessages(t, 1, 5*time.Second)
	// Give a wrongly kept message the same chance to arrive as the kept one.
	pub.PublishT(t, &paho.Publish{Topic: "home/marker", QoS: 1, Payload: []byte("m")})
	msgs = late.WaitMessages(t, 2, 5*time.Second)
	for _, m := range msgs {
		if m.Topic == "home/temp" {
			t.Fatalf("cleared retained message still delivered: %q retain=%v qos=%d all=%d", m.Payload, m.Retain, m.QoS, len(msgs))
		}
	}
}

func TestWillOnAbruptDisconnect(t *testing.T) {
	_, addr := startBroker(t, nil)
	sub := bt.Dial(t, addr, &paho.Connect{ClientID: "watcher", CleanStart: true})
	sub.SubscribeT(t, paho.SubscribeOptions{Topic: "devices/+/status", QoS: 1})

	dev := bt.DialRaw(t, addr, 4)
	dev.Send(t, packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Connect},
		Connect: packets.ConnectParams{
			ClientIdentifier: "dev1", Clean: true, Keepalive: 30,
			WillFlag: true, WillTopic: "devices/dev1/status", WillPayload: []byte("offline"), WillQos: 1,
		},
	})
	if ack := dev.Expect(t, packets.Connack); ack.ReasonCode != 0 {
		t.Fatalf("connack 0x%02x", ack.ReasonCode)
	}
	_ = dev.Conn.Close() // no DISCONNECT: the will must be published

	m := sub.WaitMessages(t, 1, 5*time.Second)[0]
	if m.Topic != "devices/dev1/status" || string(m.Payload) != "offline" {
		t.Fatalf("will: got %q %q", m.Topic, m.Payload)
	}
}

func TestNoWillOnCleanDisconnect(t *testing.T) {
	_, addr := startBroker(t, nil)
	sub := bt.Dial(t, addr, &paho.Connect{ClientID: "watcher", CleanStart: true})
	sub.SubscribeT(t, paho.SubscribeOptions{Topic: "st/#", QoS: 1})
	dev, err := bt.TryDial(addr, &paho.Connect{ClientID: "dev", CleanStart: true,
		WillMessage: &paho.WillMessage{Topic: "st/dev", Payload: []byte("gone"), QoS: 1}})
	if err != nil {
		t.Fatal(err)
	}
	_ = dev.Disconnect(&paho.Disconnect{ReasonCode: 0})
	pub := bt.Dial(t, addr, &paho.Connect{ClientID: "pub", CleanStart: true})
	pub.PublishT(t, &paho.Publish{Topic: "st/marker", QoS: 1, Payload: []byte("m")})
	for _, m := range sub.WaitMessages(t, 1, 5*time.Second) {
		if m.Topic == "st/dev" {
			t.Fatal("will published after a normal DISCONNECT")
		}
	}
}

func TestWillDelayCancelledByReconnect(t *testing.T) {
	b, addr := startBroker(t, nil)
	sub := bt.Dial(t, addr, &paho.Connect{ClientID: "watcher", CleanStart: true})
	sub.SubscribeT(t, paho.SubscribeOptions{Topic: "wd/#", QoS: 1})

	connect := func(delay uint32) *bt.Client {
		c, err := bt.TryDial(addr, &paho.Connect{
			ClientID: "wd-dev", CleanStart: false,
			Properties:     &paho.ConnectProperties{SessionExpiryInterval: u32(60)},
			WillMessage:    &paho.WillMessage{Topic: "wd/dev", Payload: []byte("offline"), QoS: 1},
			WillProperties: &paho.WillProperties{WillDelayInterval: u32(delay)},
		})
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	// Delayed will, cut off, back within the delay: no will [MQTT-3.1.3-9].
	c := connect(1)
	c.TerminateConnectionForTest()
	// Reconnect only once the broker has seen the connection die (and
	// scheduled the will); otherwise there is nothing to cancel.
	bt.WaitFor(t, 5*time.Second, "the broker to notice the cut", func() bool {
		si, ok := b.Engine().Session("wd-dev")
		return ok && !si.Connected
	})
	c2 := connect(1)
	defer func() { _ = c2.Disconnect(&paho.Disconnect{}) }()

	// A longer delay, cut off later and not back: the will comes, and it is
	// due after the first client's would have been.
	d, err := bt.TryDial(addr, &paho.Connect{
		ClientID: "wd-dev2", CleanStart: true,
		Properties:     &paho.ConnectProperties{SessionExpiryInterval: u32(60)},
		WillMessage:    &paho.WillMessage{Topic: "wd/dev2", Payload: []byte("offline"), QoS: 1},
		WillProperties: &paho.WillProperties{WillDelayInterval: u32(2)},
	})
	if err != nil {
		t.Fatal(err)
	}
	d.TerminateConnectionForTest()
	sub.WaitMessages(t, 1, 10*time.Second)
	// Wills due in the same tick are sent together; a barrier message
	// published now arrives after all of them.
	pub := bt.Dial(t, addr, &paho.Connect{ClientID: "wd-pub", CleanStart: true})
	pub.PublishT(t, &paho.Publish{Topic: "wd/marker", QoS: 1, Payload: []byte("m")})
	msgs := sub.WaitMessages(t, 2, 5*time.Second)
	for _, m := range msgs {
		if m.Topic == "wd/dev" {
			t.Fatal("will sent although the client reconnected within the will delay")
		}
	}
	if msgs[0].Topic != "wd/dev2" {
		t.Fatalf("delayed will: got %q", msgs[0].Topic)
	}
}

func TestKeepaliveTimeoutPublishesWill(t *testing.T) {
	_, addr := startBroker(t, nil)
	sub := bt.Dial(t, addr, &paho.Connect{ClientID: "watcher", CleanStart: true})
	sub.SubscribeT(t, paho.SubscribeOptions{Topic: "ka/#", QoS: 1})

	dev := bt.DialRaw(t, addr, 4)
	dev.Send(t, packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Connect},
		Connect: packets.ConnectParams{ClientIdentifier: "silent", Clean: true, Keepalive: 1,
			WillFlag: true, WillTopic: "ka/silent", WillPayload: []byte("timeout")},
	})
	dev.Expect(t, packets.Connack)
	// Send nothing more: 1.5 x keep-alive later the broker must drop us.
	dev.Closed(t, 10*time.Second)
	if m := sub.WaitMessages(t, 1, 5*time.Second)[0]; m.Topic != "ka/silent" {
		t.Fatalf("got %q, want the will of the silent client", m.Topic)
	}

	// An MQTT 5 client is told why: DISCONNECT 0x8D keep alive timeout.
	dev5 := bt.DialRaw(t, addr, 5)
	dev5.Send(t, packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Connect},
		Connect:     packets.ConnectParams{ClientIdentifier: "silent5", Clean: true, Keepalive: 1},
	})
	dev5.Expect(t, packets.Connack)
	if last := dev5.Closed(t, 10*time.Second); last.FixedHeader.Type != packets.Disconnect || last.ReasonCode != 0x8d {
		t.Fatalf("v5 keep-alive timeout: last packet type %d reason 0x%02x, want DISCONNECT 0x8d", last.FixedHeader.Type, last.ReasonCode)
	}
}

func TestKeepaliveBounds(t *testing.T) {
	_, addr := startBroker(t, func(c *broker.Config) { c.MQTT.KeepaliveMax = 60 * time.Second })
	// v5: the server tells the client the keep-alive to use.
	c := bt.Dial(t, addr, &paho.Connect{ClientID: "ka5", CleanStart: true, KeepAlive: 600})
	if p := c.Connack.Properties; p == nil || p.ServerKeepAlive == nil || *p.ServerKeepAlive != 60 {
		t.Fatalf("server keep alive: %+v", p)
	}
	// v3.1.1: no way to tell, so the CONNECT is refused (identifier rejected, as Mosquitto does).
	raw := bt.DialRaw(t, addr, 4)
	raw.Send(t, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect},
		Connect: packets.ConnectParams{ClientIdentifier: "ka3", Clean: true, Keepalive: 600}})
	if ack := raw.Expect(t, packets.Connack); ack.ReasonCode != 0x02 {
		t.Fatalf("v3 connack 0x%02x, want 0x02", ack.ReasonCode)
	}
	raw.Closed(t, 5*time.Second)
}

func TestConnackAnnouncesLimits(t *testing.T) {
	_, addr := startBroker(t, func(c *broker.Config) { c.MQTT.MaxPacketSize = 4096 })
	c := bt.Dial(t, addr, &paho.Connect{ClientID: "caps", CleanStart: true})
	p := c.Connack.Properties
	if p == nil || p.MaximumPacketSize == nil || *p.MaximumPacketSize != 4096 {
		t.Fatalf("maximum packet size not announced: %+v", p)
	}
	if p.ReceiveMaximum == nil || *p.ReceiveMaximum != 100 {
		t.Fatalf("receive maximum: %+v", p.ReceiveMaximum)
	}
	if p.TopicAliasMaximum == nil || *p.TopicAliasMaximum != 1024 {
		t.Fatalf("topic alias maximum: %+v", p.TopicAliasMaximum)
	}
}

func TestPersistentSessionQueuesWhileOffline(t *testing.T) {
	_, addr := startBroker(t, nil)
	connect := func(clean bool) *bt.Client {
		return bt.Dial(t, addr, &paho.Connect{ClientID: "persist", CleanStart: clean,
			Properties: &paho.ConnectProperties{SessionExpiryInterval: u32(300)}})
	}
	c := connect(true)
	c.SubscribeT(t, paho.SubscribeOptions{Topic: "q/#", QoS: 1})
	_ = c.Disconnect(&paho.Disconnect{})

	// Many messages queued within the same second: they must come back in
	// order.
	const n = 250
	pub := bt.Dial(t, addr, &paho.Connect{ClientID: "pub", CleanStart: true})
	for i := range n {
		pub.PublishT(t, &paho.Publish{Topic: "q/x", QoS: 1, Payload: []byte(strconv.Itoa(i))})
	}
	pub.Barrier(t)
	c = connect(false)
	if !c.Connack.SessionPresent {
		t.Fatal("session not present on reconnect")
	}
	msgs := c.WaitMessages(t, n, 10*time.Second)
	for i, m := range msgs[:n] {
		if string(m.Payload) != strconv.Itoa(i) {
			t.Fatalf("message %d of the backlog is %q: queued messages out of order", i, m.Payload)
		}
	}
	_ = c.Disconnect(&paho.Disconnect{})

	// Clean start discards the session and its subscriptions.
	c = connect(true)
	if c.Connack.SessionPresent {
		t.Fatal("clean start reported a present session")
	}
	pub.PublishT(t, &paho.Publish{Topic: "q/x", QoS: 1, Payload: []byte("after")})
	sub2 := bt.Dial(t, addr, &paho.Connect{ClientID: "probe", CleanStart: true})
	sub2.SubscribeT(t, paho.SubscribeOptions{Topic: "q/#", QoS: 1})
	pub.PublishT(t, &paho.Publish{Topic: "q/x", QoS: 1, Payload: []byte("probe")})
	sub2.WaitMessages(t, 1, 5*time.Second)
	if n := c.Count(); n != 0 {
		t.Fatalf("clean-started client got %d messages from a discarded subscription", n)
	}
}

func TestSessionExpiry(t *testing.T) {
	b, addr := startBroker(t, nil)
	c := bt.Dial(t, addr, &paho.Connect{ClientID: "short", CleanStart: true,
		Properties: &paho.ConnectProperties{SessionExpiryInterval: u32(1)}})
	c.SubscribeT(t, paho.SubscribeOptions{Topic: "exp/#", QoS: 1})
	_ = c.Disconnect(&paho.Disconnect{})
	bt.WaitFor(t, 10*time.Second, "session to expire", func() bool {
		_, ok := b.Engine().Session("short")
		return !ok
	})
	c = bt.Dial(t, addr, &paho.Connect{ClientID: "short", CleanStart: false,
		Properties: &paho.ConnectProperties{SessionExpiryInterval: u32(1)}})
	if c.Connack.SessionPresent {
		t.Fatal("expired session still present")
	}
}

func TestSessionExpiryCappedByConfig(t *testing.T) {
	_, addr := startBroker(t, func(c *broker.Config) { c.MQTT.MaxSessionExpiry = time.Hour })
	c := bt.Dial(t, addr, &paho.Connect{ClientID: "long", CleanStart: true,
		Properties: &paho.ConnectProperties{SessionExpiryInterval: u32(1 << 30)}})
	p := c.Connack.Properties
	if p == nil || p.SessionExpiryInterval == nil || *p.SessionExpiryInterval != 3600 {
		t.Fatalf("session expiry not capped to 3600: %+v", p)
	}
}

func TestMessageExpiry(t *testing.T) {
	b, addr := startBroker(t, nil)
	c := bt.Dial(t, addr, &paho.Connect{ClientID: "offline", CleanStart: true,
		Properties: &paho.ConnectProperties{SessionExpiryInterval: u32(300)}})
	c.SubscribeT(t, paho.SubscribeOptions{Topic: "me/#", QoS: 1})
	_ = c.Disconnect(&paho.Disconnect{})

	pub := bt.Dial(t, addr, &paho.Connect{ClientID: "pub", CleanStart: true})
	pub.PublishT(t, &paho.Publish{Topic: "me/short", QoS: 1, Payload: []byte("stale"),
		Properties: &paho.PublishProperties{MessageExpiry: u32(1)}})
	pub.PublishT(t, &paho.Publish{Topic: "me/long", QoS: 1, Payload: []byte("fresh"),
		Properties: &paho.PublishProperties{MessageExpiry: u32(3600)}})
	pub.Barrier(t) // both are queued before the wait below can hold
	bt.WaitFor(t, 10*time.Second, "the expired message to leave the queue", func() bool {
		si, _ := b.Engine().Session("offline")
		return si.Queued+si.Inflight == 1
	})
	c = bt.Dial(t, addr, &paho.Connect{ClientID: "offline", CleanStart: false,
		Properties: &paho.ConnectProperties{SessionExpiryInterval: u32(300)}})
	m := c.WaitMessages(t, 1, 5*time.Second)[0]
	if m.Topic != "me/long" {
		t.Fatalf("got %q, want only the unexpired message", m.Topic)
	}
	if m.Properties == nil || m.Properties.MessageExpiry == nil || *m.Properties.MessageExpiry > 3600 {
		t.Fatalf("remaining expiry not forwarded: %+v", m.Properties)
	}
}

func TestSharedSubscription(t *testing.T) {
	_, addr := startBroker(t, nil)
	a := bt.Dial(t, addr, &paho.Connect{ClientID: "worker-a", CleanStart: true})
	a.SubscribeT(t, paho.SubscribeOptions{Topic: "$share/workers/jobs/#", QoS: 1})
	bb := bt.Dial(t, addr, &paho.Connect{ClientID: "worker-b", CleanStart: true})
	bb.SubscribeT(t, paho.SubscribeOptions{Topic: "$share/workers/jobs/#", QoS: 1})
	pub := bt.Dial(t, addr, &paho.Connect{ClientID: "pub", CleanStart: true})
	const n = 40
	for i := range n {
		pub.PublishT(t, &paho.Publish{Topic: "jobs/x", QoS: 1, Payload: []byte(strconv.Itoa(i))})
	}
	bt.WaitFor(t, 10*time.Second, "all jobs", func() bool { return a.Count()+bb.Count() >= n })
	seen := map[string]int{}
	for _, m := range append(a.Messages(), bb.Messages()...) {
		seen[string(m.Payload)]++
	}
	if len(seen) != n || a.Count()+bb.Count() != n {
		t.Fatalf("each job must go to exactly one worker: %d distinct, a=%d b=%d", len(seen), a.Count(), bb.Count())
	}
}

func TestTopicAlias(t *testing.T) {
	_, addr := startBroker(t, nil)
	sub := bt.Dial(t, addr, &paho.Connect{ClientID: "sub", CleanStart: true})
	sub.SubscribeT(t, paho.SubscribeOptions{Topic: "alias/#", QoS: 1})
	pub := bt.Dial(t, addr, &paho.Connect{ClientID: "pub", CleanStart: true})
	alias := uint16(3)
	pub.PublishT(t, &paho.Publish{Topic: "alias/long/topic", QoS: 1, Payload: []byte("1"),
		Properties: &paho.PublishProperties{TopicAlias: &alias}})
	pub.PublishT(t, &paho.Publish{Topic: "", QoS: 1, Payload: []byte("2"),
		Properties: &paho.PublishProperties{TopicAlias: &alias}})
	msgs := sub.WaitMessages(t, 2, 5*time.Second)
	for _, m := range msgs {
		if m.Topic != "alias/long/topic" {
			t.Fatalf("aliased publish delivered on %q", m.Topic)
		}
	}
}

func TestSysTopics(t *testing.T) {
	_, addr := startBroker(t, nil)
	sub := bt.Dial(t, addr, &paho.Connect{ClientID: "sys", CleanStart: true})
	sub.SubscribeT(t, paho.SubscribeOptions{Topic: "$SYS/broker/version", QoS: 0})
	if m := sub.WaitMessages(t, 1, 5*time.Second)[0]; len(m.Payload) == 0 {
		t.Fatal("empty $SYS/broker/version")
	}
	// '#' must not match $SYS topics [MQTT-4.7.2-1].
	all := bt.Dial(t, addr, &paho.Connect{ClientID: "all", CleanStart: true})
	all.SubscribeT(t, paho.SubscribeOptions{Topic: "#", QoS: 0})
	pub := bt.Dial(t, addr, &paho.Connect{ClientID: "pub", CleanStart: true})
	pub.PublishT(t, &paho.Publish{Topic: "marker", QoS: 1, Payload: []byte("m")})
	for _, m := range all.WaitMessages(t, 1, 5*time.Second) {
		if m.Topic[0] == '$' {
			t.Fatalf("'#' delivered %q", m.Topic)
		}
	}
}

func TestMQTT311(t *testing.T) {
	_, addr := startBroker(t, nil)
	sub := bt.DialRaw(t, addr, 4)
	sub.Send(t, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect},
		Connect: packets.ConnectParams{ClientIdentifier: "v3sub", Clean: true, Keepalive: 30}})
	if ack := sub.Expect(t, packets.Connack); ack.ReasonCode != 0 {
		t.Fatalf("connack 0x%02x", ack.ReasonCode)
	}
	sub.Send(t, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Subscribe, Qos: 1}, PacketID: 1,
		Filters: packets.Subscriptions{{Filter: "v3/#", Qos: 2}}})
	if sa := sub.Expect(t, packets.Suback); len(sa.ReasonCodes) != 1 || sa.ReasonCodes[0] != 2 {
		t.Fatalf("suback %v", sa.ReasonCodes)
	}

	pub := bt.DialRaw(t, addr, 4)
	pub.Send(t, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect},
		Connect: packets.ConnectParams{ClientIdentifier: "v3pub", Clean: true, Keepalive: 30}})
	pub.Expect(t, packets.Connack)
	pub.Send(t, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, PacketID: 7,
		TopicName: "v3/a", Payload: []byte("one")})
	if ack := pub.Expect(t, packets.Puback); ack.PacketID != 7 {
		t.Fatalf("puback for %d", ack.PacketID)
	}
	pub.Send(t, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 2}, PacketID: 8,
		TopicName: "v3/b", Payload: []byte("two")})
	pub.Expect(t, packets.Pubrec)
	pub.Send(t, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Pubrel, Qos: 1}, PacketID: 8})
	pub.Expect(t, packets.Pubcomp)

	m := sub.Expect(t, packets.Publish)
	if m.TopicName != "v3/a" || string(m.Payload) != "one" || m.FixedHeader.Qos != 1 {
		t.Fatalf("first: %q %q qos %d", m.TopicName, m.Payload, m.FixedHeader.Qos)
	}
	sub.Send(t, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Puback}, PacketID: m.PacketID})
	m = sub.Expect(t, packets.Publish)
	if m.TopicName != "v3/b" || m.FixedHeader.Qos != 2 {
		t.Fatalf("second: %q qos %d", m.TopicName, m.FixedHeader.Qos)
	}
	sub.Send(t, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Pubrec}, PacketID: m.PacketID})
	sub.Expect(t, packets.Pubrel)
	sub.Send(t, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Pubcomp}, PacketID: m.PacketID})
}

// TestBadInput sends what broken or hostile clients send. Each offending
// connection must be closed while a well-behaved client keeps working and
// nothing stored is lost.
func TestBadInput(t *testing.T) {
	b, addr := startBroker(t, func(c *broker.Config) { c.MQTT.MaxPacketSize = 1024 })

	// A persistent session with queued messages must come through intact.
	keeper := bt.Dial(t, addr, &paho.Connect{ClientID: "keeper", CleanStart: true,
		Properties: &paho.ConnectProperties{SessionExpiryInterval: u32(300)}})
	keeper.SubscribeT(t, paho.SubscribeOptions{Topic: "keep/#", QoS: 1})
	_ = keeper.Disconnect(&paho.Disconnect{})
	good := bt.Dial(t, addr, &paho.Connect{ClientID: "good", CleanStart: true})
	good.SubscribeT(t, paho.SubscribeOptions{Topic: "ok/#", QoS: 1})
	good.PublishT(t, &paho.Publish{Topic: "keep/1", QoS: 1, Payload: []byte("before")})

	connect := func(t *testing.T, r *bt.Raw, id string) {
		r.Send(t, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect},
			Connect: packets.ConnectParams{ClientIdentifier: id, Clean: true, Keepalive: 30}})
		r.Expect(t, packets.Connack)
	}
	cases := []struct {
		name    string
		version byte
		connect bool
		bytes   []byte
		wantRC  byte // v5 DISCONNECT reason expected before the close; 0 = any
	}{
		{name: "garbage before connect", version: 4, bytes: []byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n")},
		{name: "publish before connect", version: 4, bytes: []byte{0x30, 0x05, 0x00, 0x01, 'a', 'h', 'i'}},
		{name: "reserved packet type", version: 4, connect: true, bytes: []byte{0xf0, 0x00}},
		{name: "invalid remaining length", version: 4, connect: true, bytes: []byte{0x30, 0xff, 0xff, 0xff, 0xff, 0x01}},
		{name: "truncated topic", version: 4, connect: true, bytes: []byte{0x30, 0x03, 0x00, 0x09, 'a'}},
		{name: "wildcard in topic name", version: 4, connect: true, bytes: []byte{0x30, 0x05, 0x00, 0x03, 'a', '/', '#'}},
		{name: "second connect", version: 4, connect: true, bytes: []byte{0x10, 0x0c, 0x00, 0x04, 'M', 'Q', 'T', 'T', 0x04, 0x02, 0x00, 0x1e, 0x00, 0x00}},
		{name: "oversize packet v3", version: 4, connect: true, bytes: append([]byte{0x30, 0x80, 0x10, 0x00, 0x01, 'a'}, make([]byte, 2045)...)},
		{name: "bad utf8 v5", version: 5, connect: true, bytes: []byte{0x30, 0x06, 0x00, 0x02, 0xc3, 0x28, 0x00, 'x'}, wantRC: 0x81},
		{name: "oversize packet v5", version: 5, connect: true, bytes: append([]byte{0x30, 0x80, 0x10, 0x00, 0x01, 'a', 0x00}, make([]byte, 2044)...), wantRC: 0x95},
		{name: "wildcard in topic name v5", version: 5, connect: true, bytes: []byte{0x30, 0x06, 0x00, 0x03, 'a', '/', '+', 0x00}, wantRC: 0x82},
		{name: "reserved packet type v5", version: 5, connect: true, bytes: []byte{0xf0, 0x00}},
	}
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r := bt.DialRaw(t, addr, tc.version)
			if tc.connect {
				connect(t, r, fmt.Sprintf("bad-%d", i))
			}
			_ = r.Conn.SetWriteDeadline(time.Now().Add(5 * time.Second))
			_, _ = r.Conn.Write(tc.bytes) // the server may close before it has read everything
			last := r.Closed(t, 10*time.Second)
			if tc.wantRC != 0 && (last.FixedHeader.Type != packets.Disconnect || last.ReasonCode != tc.wantRC) {
				t.Fatalf("last packet before the close: type %d reason 0x%02x, want DISCONNECT 0x%02x",
					last.FixedHeader.Type, last.ReasonCode, tc.wantRC)
			}
		})
	}

	// A CONNECT flood: many sockets, half never sending CONNECT.
	var idle []net.Conn
	for i := range 200 {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		idle = append(idle, c)
		if i%2 == 0 {
			r := &bt.Raw{Conn: c, Version: 4}
			r.Send(t, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect},
				Connect: packets.ConnectParams{ClientIdentifier: fmt.Sprintf("flood-%d", i), Clean: true, Keepalive: 30}})
		}
	}
	for _, c := range idle {
		_ = c.Close()
	}

	// The good client still works, and the stored session survived.
	good.PublishT(t, &paho.Publish{Topic: "ok/after", QoS: 1, Payload: []byte("still here")})
	if m := good.WaitMessages(t, 1, 5*time.Second)[0]; string(m.Payload) != "still here" {
		t.Fatalf("good client got %q", m.Payload)
	}
	good.PublishT(t, &paho.Publish{Topic: "keep/2", QoS: 1, Payload: []byte("after")})
	good.Barrier(t)
	keeper = bt.Dial(t, addr, &paho.Connect{ClientID: "keeper", CleanStart: false,
		Properties: &paho.ConnectProperties{SessionExpiryInterval: u32(300)}})
	if !keeper.Connack.SessionPresent {
		t.Fatalf("the stored session did not survive the bad input: %+v", b.Stats())
	}
	if got := keeper.WaitMessages(t, 2, 15*time.Second); string(got[0].Payload) != "before" || string(got[1].Payload) != "after" {
		t.Fatalf("queued messages: %q %q", got[0].Payload, got[1].Payload)
	}
	_ = b
}

func TestOversizePacketV5IsRefused(t *testing.T) {
	_, addr := startBroker(t, func(c *broker.Config) { c.MQTT.MaxPacketSize = 1024 })
	c := bt.Dial(t, addr, &paho.Connect{ClientID: "big", CleanStart: true})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	// paho checks the announced maximum itself and refuses to send.
	if _, err := c.Publish(ctx, &paho.Publish{Topic: "big", QoS: 1, Payload: make([]byte, 4096)}); err == nil {
		t.Fatal("a publish larger than the announced maximum packet size was accepted")
	}
}

// TestSlowSubscriberDoesNotBlockOthers: a subscriber that stops reading
// must not hold back the publisher or other subscribers; what it cannot
// take is counted, not silently lost.
func TestSlowSubscriberDoesNotBlockOthers(t *testing.T) {
	b, addr := startBroker(t, func(c *broker.Config) {
		c.MQTT.MaxQueuedMessages = 200
	})
	stuck := bt.DialRaw(t, addr, 4)
	stuck.Send(t, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect},
		Connect: packets.ConnectParams{ClientIdentifier: "stuck", Clean: true, Keepalive: 0}})
	stuck.Expect(t, packets.Connack)
	stuck.Send(t, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Subscribe, Qos: 1}, PacketID: 1,
		Filters: packets.Subscriptions{{Filter: "flood/#", Qos: 1}}})
	stuck.Expect(t, packets.Suback)
	// From here on "stuck" never reads nor acknowledges.

	fast := bt.Dial(t, addr, &paho.Connect{ClientID: "fast", CleanStart: true})
	fast.SubscribeT(t, paho.SubscribeOptions{Topic: "flood/#", QoS: 1})
	pub := bt.Dial(t, addr, &paho.Connect{ClientID: "pub", CleanStart: true})
	const n = 2000
	payload := make([]byte, 512)
	for i := range n {
		pub.PublishT(t, &paho.Publish{Topic: "flood/x", QoS: 1, Payload: payload})
		if i%50 == 49 {
			// Keep the healthy subscriber within its own queue limit (200)
			// on busy cores: what is tested is that "stuck" holds nobody up.
			fast.WaitMessages(t, i+1-50, 30*time.Second)
		}
	}
	fast.WaitMessages(t, n, 30*time.Second)
	if d := b.Stats().QueueLimitDrops; d < n-200 {
		t.Fatalf("messages beyond the stuck client's queue: %d counted as dropped, want at least %d", d, n-200)
	}
}

func TestGracefulShutdownDisconnectsClients(t *testing.T) {
	cfg := bt.Config(t)
	b, err := broker.New(cfg, bt.Logger(t))
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Start(); err != nil {
		t.Fatal(err)
	}
	c, err := bt.TryDial(b.MQTTAddr("tcp"), &paho.Connect{ClientID: "c", CleanStart: true})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := b.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	bt.WaitFor(t, 5*time.Second, "server DISCONNECT", func() bool { return c.ServerDisconnect() != nil })
	if rc := c.ServerDisconnect().ReasonCode; rc != packets.ErrServerShuttingDown.Code {
		t.Fatalf("disconnect reason 0x%02x, want 0x8b server shutting down", rc)
	}
	if err := b.Shutdown(ctx); err != nil {
		t.Fatalf("second shutdown: %v", err)
	}
}

// TestUnackedQueueSurvivesReconnectAndRestart: messages a client received
// but did not acknowledge stay stored when it reconnects (mochi "drops"
// them from the old client object when the session is taken over) and
// come back after a restart.
func TestUnackedQueueSurvivesReconnectAndRestart(t *testing.T) {
	cfg := bt.Config(t)
	b1 := bt.Start(t, cfg)
	addr := b1.MQTTAddr("tcp")
	connect := func(addr string) *bt.Raw {
		r := bt.DialRaw(t, addr, 4)
		r.Send(t, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect},
			Connect: packets.ConnectParams{ClientIdentifier: "lazy", Clean: false, Keepalive: 30}})
		r.Expect(t, packets.Connack)
		return r
	}
	r := connect(addr)
	r.Send(t, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Subscribe, Qos: 1}, PacketID: 1,
		Filters: packets.Subscriptions{{Filter: "lazy/#", Qos: 1}}})
	r.Expect(t, packets.Suback)
	_ = r.Conn.Close()
	pub := bt.Dial(t, addr, &paho.Connect{ClientID: "pub", CleanStart: true})
	for i := range 3 {
		pub.PublishT(t, &paho.Publish{Topic: "lazy/x", QoS: 1, Payload: []byte(strconv.Itoa(i))})
	}
	pub.Barrier(t)
	// Reconnect, receive the three, acknowledge none, leave.
	r = connect(addr)
	for range 3 {
		r.Expect(t, packets.Publish)
	}
	_ = r.Conn.Close()
	bt.WaitFor(t, 5*time.Second, "the session to go offline", func() bool {
		si, ok := b1.Engine().Session("lazy")
		return ok && !si.Connected
	})
	bt.Stop(t, b1)

	b2 := bt.Start(t, cfg)
	r = connect(b2.MQTTAddr("tcp"))
	for i := range 3 {
		if m := r.Expect(t, packets.Publish); string(m.Payload) != strconv.Itoa(i) {
			t.Fatalf("after restart, message %d is %q", i, m.Payload)
		}
	}
}

// TestExpiredSessionLeavesNoSubscriptions: mochi forgets an expired client
// but not its subscriptions; a later client with the same id must not
// receive what the expired session had subscribed to.
func TestExpiredSessionLeavesNoSubscriptions(t *testing.T) {
	b, addr := startBroker(t, nil)
	c := bt.Dial(t, addr, &paho.Connect{ClientID: "ghost", CleanStart: true,
		Properties: &paho.ConnectProperties{SessionExpiryInterval: u32(1)}})
	c.SubscribeT(t, paho.SubscribeOptions{Topic: "exp/#", QoS: 1})
	_ = c.Disconnect(&paho.Disconnect{})
	bt.WaitFor(t, 10*time.Second, "the session to expire", func() bool {
		_, ok := b.Engine().Session("ghost")
		return !ok
	})
	c = bt.Dial(t, addr, &paho.Connect{ClientID: "ghost", CleanStart: true})
	c.SubscribeT(t, paho.SubscribeOptions{Topic: "marker", QoS: 1})
	pub := bt.Dial(t, addr, &paho.Connect{ClientID: "pub", CleanStart: true})
	pub.PublishT(t, &paho.Publish{Topic: "exp/x", QoS: 1, Payload: []byte("stale subscription")})
	pub.PublishT(t, &paho.Publish{Topic: "marker", QoS: 1, Payload: []byte("m")})
	for _, m := range c.WaitMessages(t, 1, 5*time.Second) {
		if m.Topic != "marker" {
			t.Fatalf("received %q through the expired session's subscription", m.Topic)
		}
	}
}

// TestQoS2ResentPublishIsAcknowledgedNotDelivered: a QoS 2 PUBLISH sent
// again before PUBREL (its PUBREC was lost) gets a PUBREC again, success,
// and is delivered once [MQTT-4.3.3-9].
func TestQoS2ResentPublishIsAcknowledgedNotDelivered(t *testing.T) {
	_, addr := startBroker(t, nil)
	sub := bt.Dial(t, addr, &paho.Connect{ClientID: "q2sub", CleanStart: true})
	sub.SubscribeT(t, paho.SubscribeOptions{Topic: "q2/#", QoS: 2})
	for _, version := range []byte{4, 5} {
		r := bt.DialRaw(t, addr, version)
		r.Send(t, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect},
			Connect: packets.ConnectParams{ClientIdentifier: fmt.Sprintf("q2pub%d", version), Clean: true, Keepalive: 30}})
		r.Expect(t, packets.Connack)
		pub := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 2}, PacketID: 7,
			TopicName: fmt.Sprintf("q2/v%d", version), Payload: []byte("once")}
		r.Send(t, pub)
		r.Expect(t, packets.Pubrec)
		pub.FixedHeader.Dup = true
		r.Send(t, pub) // as if the first PUBREC had been lost
		if ack := r.Expect(t, packets.Pubrec); ack.PacketID != 7 || ack.ReasonCode != 0 {
			t.Fatalf("v%d: resent PUBLISH answered with PUBREC reason 0x%02x for id %d, want success", version, ack.ReasonCode, ack.PacketID)
		}
		r.Send(t, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Pubrel, Qos: 1}, PacketID: 7})
		r.Expect(t, packets.Pubcomp)
	}
	sub.WaitMessages(t, 2, 5*time.Second)
	sub.Barrier(t)
	n := 0
	for _, m := range sub.Messages() {
		if strings.HasPrefix(m.Topic, "q2/") {
			n++
		}
	}
	if n != 2 {
		t.Fatalf("%d deliveries of 2 QoS 2 messages each sent twice, want 2", n)
	}
}

// TestInboundPacketIDDoesNotEraseOutboundMessage: client and broker number
// packets independently; a client publishing with the id of a message the
// broker is still waiting for it to acknowledge must not make the broker
// forget that message (it is resent when the client comes back).
func TestInboundPacketIDDoesNotEraseOutboundMessage(t *testing.T) {
	_, addr := startBroker(t, nil)
	connect := func() *bt.Raw {
		r := bt.DialRaw(t, addr, 4)
		r.Send(t, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect},
			Connect: packets.ConnectParams{ClientIdentifier: "both-ways", Clean: false, Keepalive: 30}})
		r.Expect(t, packets.Connack)
		return r
	}
	dev := connect()
	dev.Send(t, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Subscribe, Qos: 1}, PacketID: 1,
		Filters: packets.Subscriptions{{Filter: "cmd/dev", Qos: 1}}})
	dev.Expect(t, packets.Suback)
	ctl := bt.Dial(t, addr, &paho.Connect{ClientID: "controller", CleanStart: true})
	ctl.PublishT(t, &paho.Publish{Topic: "cmd/dev", QoS: 1, Payload: []byte("reboot")})
	cmd := dev.Expect(t, packets.Publish)
	// The device publishes telemetry with the same packet id before it acknowledges the command.
	dev.Send(t, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, PacketID: cmd.PacketID,
		TopicName: "telemetry/dev", Payload: []byte("21.5")})
	if ack := dev.Expect(t, packets.Puback); ack.PacketID != cmd.PacketID {
		t.Fatalf("puback for %d", ack.PacketID)
	}
	_ = dev.Conn.Close() // gone before acknowledging the command
	dev = connect()
	again := dev.Expect(t, packets.Publish)
	if string(again.Payload) != "reboot" || !again.FixedHeader.Dup {
		t.Fatalf("after reconnect got %q dup=%v, want the unacknowledged command again", again.Payload, again.FixedHeader.Dup)
	}
}

// A data directory written by the mochi-based versions: its retained
// messages are carried over at the first start (once), not dropped in
// silence.
func TestUpgradeCarriesOverRetained(t *testing.T) {
	cfg := bt.Config(t)
	db, err := storage.Open(storage.Options{Dir: cfg.Storage.Dir})
	if err != nil {
		t.Fatal(err)
	}
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1, Retain: true},
		TopicName: "home/status", Payload: []byte("online"), ProtocolVersion: 4}
	if err := db.Write(storage.Set(storage.RetainedKey("home/status"), storage.AppendMessage(nil, &pk))); err != nil {
		t.Fatal(err)
	}
	if err := db.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
	for range 2 { // the second start finds it in the new store only
		b := bt.Start(t, cfg)
		c := bt.Dial(t, b.MQTTAddr("tcp"), &paho.Connect{ClientID: "late", CleanStart: true})
		c.SubscribeT(t, paho.SubscribeOptions{Topic: "home/#", QoS: 1})
		if m := c.WaitMessages(t, 1, 5*time.Second)[0]; m.Topic != "home/status" || string(m.Payload) != "online" || !m.Retain {
			t.Fatalf("carried-over retained message: %q %q retain=%v", m.Topic, m.Payload, m.Retain)
		}
		_ = c.Disconnect(&paho.Disconnect{})
		bt.Stop(t, b)
	}
}
