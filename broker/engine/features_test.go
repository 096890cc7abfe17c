package engine

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
)

func v5connect(expiry uint32) func(*packets.Packet) {
	return func(pk *packets.Packet) {
		if expiry > 0 {
			pk.Properties.SessionExpiryInterval, pk.Properties.SessionExpiryIntervalFlag = expiry, true
		}
	}
}

func subscribeOpts(r *raw, id uint16, subID int, subs ...packets.Subscription) packets.Packet {
	r.t.Helper()
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Subscribe}, PacketID: id, Filters: subs}
	if subID > 0 {
		pk.Properties.SubscriptionIdentifier = []int{subID}
	}
	r.send(pk)
	return r.expect(packets.Suback)
}

func TestSharedSubscriptionsOneMemberEach(t *testing.T) {
	_, addr := startServer(t, Options{})
	var members []*raw
	for i := 0; i < 3; i++ {
		r := dialRaw(t, addr, 5)
		r.connect(fmt.Sprintf("worker-%d", i), true, nil)
		if ack := subscribeOpts(r, 1, 0, packets.Subscription{Filter: "$share/g/jobs/+", Qos: 0}); ack.ReasonCodes[0] != 0 {
			t.Fatalf("SUBACK 0x%02x", ack.ReasonCodes[0])
		}
		members = append(members, r)
	}
	other := dialRaw(t, addr, 5)
	other.connect("other-group", true, nil)
	subscribeOpts(other, 1, 0, packets.Subscription{Filter: "$share/h/jobs/#", Qos: 0})
	pub := dialRaw(t, addr, 5)
	pub.connect("pub", true, nil)
	const n = 30
	for i := 0; i < n; i++ {
		pub.publish("jobs/a", []byte(fmt.Sprint(i)), 0, 0)
	}
	total := 0
	for _, r := range members {
		for {
			if _, err := r.read(300 * time.Millisecond); err != nil {
				break
			}
			total++
		}
	}
	if total != n {
		t.Fatalf("group g got %d messages, want %d (each once)", total, n)
	}
	for i := 0; i < n; i++ {
		other.expect(packets.Publish)
	}
}

func TestSubscriptionOptions(t *testing.T) {
	_, addr := startServer(t, Options{})
	c := dialRaw(t, addr, 5)
	c.connect("opts", true, nil)
	// Two filters with identifiers 7 and 9 match: one PUBLISH with both.
	subscribeOpts(c, 1, 7, packets.Subscription{Filter: "s/+", Qos: 1})
	subscribeOpts(c, 2, 9, packets.Subscription{Filter: "s/#", Qos: 0, NoLocal: true})
	pub := dialRaw(t, addr, 5)
	pub.connect("pub", true, nil)
	pub.publish("s/x", []byte("a"), 1, 1)
	pub.expect(packets.Puback)
	got := c.expect(packets.Publish)
	ids := got.Properties.SubscriptionIdentifier
	if got.FixedHeader.Qos != 1 || len(ids) != 2 || ids[0] != 7 || ids[1] != 9 {
		t.Fatalf("qos %d ids %v, want qos 1 ids [7 9]", got.FixedHeader.Qos, ids)
	}
	c.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Puback}, PacketID: got.PacketID})

	// No Local: the client's own message comes back only through s/+.
	c.publish("s/y", []byte("own"), 0, 0)
	own := c.expect(packets.Publish)
	if ids := own.Properties.SubscriptionIdentifier; len(ids) != 1 || ids[0] != 7 {
		t.Fatalf("own message ids %v, want [7]", ids)
	}

	// Retain As Published and Retain Handling.
	pub.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Retain: true}, TopicName: "r/1", Payload: []byte("kept")})
	rap := dialRaw(t, addr, 5)
	rap.connect("rap", true, nil)
	subscribeOpts(rap, 1, 0, packets.Subscription{Filter: "r/#", RetainAsPublished: true, RetainHandling: 1})
	if m := rap.expect(packets.Publish); !m.FixedHeader.Retain {
		t.Fatal("retained message at subscribe time without RETAIN")
	}
	// Subscribing again with RH=1 does not resend; RH=2 never sends.
	subscribeOpts(rap, 2, 0, packets.Subscription{Filter: "r/#", RetainAsPublished: true, RetainHandling: 1})
	subscribeOpts(rap, 3, 0, packets.Subscription{Filter: "r/+", RetainHandling: 2})
	if pk, err := rap.read(300 * time.Millisecond); err == nil {
		t.Fatalf("got %q, want no retained message", pk.Payload)
	}
	pub.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Retain: true}, TopicName: "r/1", Payload: []byte("live")})
	live := rap.expect(packets.Publish)
	if !live.FixedHeader.Retain {
		t.Fatal("live retained message lost RETAIN under Retain As Published")
	}
}

func TestMessageExpiry(t *testing.T) {
	now := time.Unix(1_700_000_000, 0)
	var mu = make(chan time.Time, 1)
	mu <- now
	clock := func() time.Time { t := <-mu; mu <- t; return t }
	advance := func(d time.Duration) { t := <-mu; mu <- t.Add(d) }
	_, addr := startServer(t, Options{Now: clock})
	sub := dialRaw(t, addr, 5)
	sub.connect("exp", true, v5connect(600))
	sub.subscribe(1, "e/#", 1)
	sub.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Disconnect}})
	sub.expectClosed()
	pub := dialRaw(t, addr, 5)
	pub.connect("pub", true, nil)
	pub.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, TopicName: "e/short", PacketID: 1,
		Payload: []byte("short"), Properties: packets.Properties{MessageExpiryInterval: 10}})
	pub.expect(packets.Puback)
	pub.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, TopicName: "e/long", PacketID: 2,
		Payload: []byte("long"), Properties: packets.Properties{MessageExpiryInterval: 100}})
	pub.expect(packets.Puback)
	advance(30 * time.Second)
	sub = dialRaw(t, addr, 5)
	sub.connect("exp", false, v5connect(600))
	got := sub.expect(packets.Publish)
	if string(got.Payload) != "long" || got.Properties.MessageExpiryInterval != 70 {
		t.Fatalf("got %q expiry %d, want long with 70 s left", got.Payload, got.Properties.MessageExpiryInterval)
	}
}

func TestKeepAliveTimeout(t *testing.T) {
	_, addr := startServer(t, Options{})
	r := dialRaw(t, addr, 5)
	r.connect("ka", true, func(pk *packets.Packet) { pk.Connect.Keepalive = 1 })
	got := r.expectClosed() // 1.5 s of silence
	if len(got) != 1 || got[0].FixedHeader.Type != packets.Disconnect || got[0].ReasonCode != 0x8D {
		t.Fatalf("got %+v, want DISCONNECT 0x8D", got)
	}
}

func TestTakeoverTellsTheOldConnection(t *testing.T) {
	_, addr := startServer(t, Options{})
	old := dialRaw(t, addr, 5)
	old.connect("same", true, nil)
	nw := dialRaw(t, addr, 5)
	nw.connect("same", true, nil)
	got := old.expectClosed()
	if len(got) != 1 || got[0].ReasonCode != 0x8E {
		t.Fatalf("old connection got %+v, want DISCONNECT 0x8E", got)
	}
	nw.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Pingreq}})
	nw.expect(packets.Pingresp)
}

// A clean connection ending just before a persistent one with the same id
// connects never touches the new session.
func TestCleanSessionEndingBeforePersistent(t *testing.T) {
	srv, addr := startServer(t, Options{})
	for i := 0; i < 30; i++ {
		id := fmt.Sprintf("flip-%d", i)
		clean := dialRaw(t, addr, 4)
		clean.connect(id, true, nil)
		clean.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Disconnect}})
		persistent := dialRaw(t, addr, 4)
		persistent.connect(id, false, nil)
		persistent.subscribe(1, "flip/"+id, 1)
		persistent.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Disconnect}})
		persistent.expectClosed()
	}
	pub := dialRaw(t, addr, 4)
	pub.connect("pub", true, nil)
	for i := 0; i < 30; i++ {
		pub.publish(fmt.Sprintf("flip/flip-%d", i), []byte("x"), 1, uint16(i+1))
		pub.expect(packets.Puback)
	}
	waitFor(t, 5*time.Second, func() error {
		if q := srv.Stats().Inflight; q != 30 {
			return fmt.Errorf("%d of 30 queued", q)
		}
		return nil
	})
}

func TestWillDelay(t *testing.T) {
	_, addr := startServer(t, Options{})
	sub := dialRaw(t, addr, 5)
	sub.connect("watch", true, nil)
	sub.subscribe(1, "w/#", 0)
	will := func(pk *packets.Packet) {
		pk.Properties.SessionExpiryInterval, pk.Properties.SessionExpiryIntervalFlag = 60, true
		pk.Connect.WillFlag, pk.Connect.WillTopic, pk.Connect.WillPayload = true, "w/d", []byte("gone")
		pk.Connect.WillProperties.WillDelayInterval = 1
	}
	// Back within the delay: no will.
	d := dialRaw(t, addr, 5)
	d.connect("dev", true, will)
	_ = d.nc.Close()
	d = dialRaw(t, addr, 5)
	d.connect("dev", false, will)
	if pk, err := sub.read(1500 * time.Millisecond); err == nil {
		t.Fatalf("will %q sent though the client came back within the delay", pk.Payload)
	}
	// Gone for longer: the will after the delay.
	_ = d.nc.Close()
	got := sub.expect(packets.Publish)
	if string(got.Payload) != "gone" {
		t.Fatalf("got %q", got.Payload)
	}
}

// The server uses the client's topic aliases: the first PUBLISH of a topic
// carries the topic and an alias, the next ones the alias only.
func TestOutboundTopicAliases(t *testing.T) {
	_, addr := startServer(t, Options{})
	sub := dialRaw(t, addr, 5)
	sub.connect("aliased", true, func(pk *packets.Packet) { pk.Properties.TopicAliasMaximum = 2 })
	sub.subscribe(1, "long/topic/name/#", 0)
	pub := dialRaw(t, addr, 5)
	pub.connect("pub", true, nil)
	for _, tp := range []string{"long/topic/name/a", "long/topic/name/a", "long/topic/name/b", "long/topic/name/c", "long/topic/name/c"} {
		pub.publish(tp, []byte(tp), 0, 0)
	}
	want := []struct {
		topic string
		alias uint16
	}{{"long/topic/name/a", 1}, {"", 1}, {"long/topic/name/b", 2}, {"long/topic/name/c", 0}, {"long/topic/name/c", 0}}
	for i, w := range want {
		got := sub.expect(packets.Publish)
		if got.TopicName != w.topic || got.Properties.TopicAlias != w.alias {
			t.Fatalf("message %d: topic %q alias %d, want %q alias %d", i, got.TopicName, got.Properties.TopicAlias, w.topic, w.alias)
		}
	}
}

func TestSysTopics(t *testing.T) {
	_, addr := startServer(t, Options{Version: "beacon-test-1", SysInterval: 50 * time.Millisecond})
	r := dialRaw(t, addr, 4)
	r.connect("sys", true, nil)
	r.subscribe(1, "$SYS/broker/version", 0)
	got := r.expect(packets.Publish)
	if string(got.Payload) != "beacon-test-1" {
		t.Fatalf("got %q", got.Payload)
	}
	// '#' does not match $SYS topics, and clients may not publish there.
	r.subscribe(2, "#", 0)
	r.publish("$SYS/broker/version", []byte("forged"), 1, 9)
	r.expect(packets.Puback)
	// $SYS/broker/version keeps coming every 50 ms; watch it for a while.
	for end := time.Now().Add(500 * time.Millisecond); time.Now().Before(end); {
		pk, err := r.read(200 * time.Millisecond)
		if err != nil {
			break
		}
		if string(pk.Payload) == "forged" || (pk.FixedHeader.Type == packets.Publish && !strings.HasPrefix(pk.TopicName, "$SYS/broker/version")) {
			t.Fatalf("got %q on %q", pk.Payload, pk.TopicName)
		}
	}
}

// An offline session does not keep an expired message until its client
// returns: the sweeper drops it.
func TestExpiredMessagesLeaveOfflineQueues(t *testing.T) {
	srv, addr := startServer(t, Options{})
	sub := dialRaw(t, addr, 5)
	sub.connect("away", true, v5connect(600))
	sub.subscribe(1, "x", 1)
	sub.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Disconnect}})
	sub.expectClosed()
	pub := dialRaw(t, addr, 5)
	pub.connect("pub", true, nil)
	pub.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, TopicName: "x", PacketID: 1,
		Payload: []byte("brief"), Properties: packets.Properties{MessageExpiryInterval: 1}})
	pub.expect(packets.Puback)
	pub.publish("x", []byte("lasting"), 1, 2)
	pub.expect(packets.Puback)
	waitFor(t, 5*time.Second, func() error {
		si, _ := srv.Session("away")
		if si.Queued != 1 {
			return fmt.Errorf("%d queued", si.Queued)
		}
		return nil
	})
}
