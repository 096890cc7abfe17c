package broker_test

import (
	"context"
	"fmt"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"
	"github.com/mochi-mqtt/server/v2/packets"

	bt "github.com/beaconmq/beacon/broker/brokertest"
	"github.com/beaconmq/beacon/broker/cluster/clustertest"
)

// A persistent session made on a resumes on b with everything queued for
// it, while publishers on a and c go on: every message arrives once; a
// closes the old connection with 0x8E and forgets the session, and the
// other nodes route its messages to b alone. Then it moves back, taking
// over the connection on b.
func TestClusterSessionMovesBetweenNodes(t *testing.T) {
	rds := clustertest.StartRedis(t)
	a := bt.Start(t, clusterConfig(t, rds, "a"))
	b := bt.Start(t, clusterConfig(t, rds, "b"))
	c := bt.Start(t, clusterConfig(t, rds, "c"))

	sub := bt.Dial(t, a.MQTTAddr("tcp"), persistent("mover", true))
	sub.SubscribeT(t, paho.SubscribeOptions{Topic: "mv/#", QoS: 2})
	waitWants(t, c, "mv/x", "a")
	waitWants(t, b, "mv/x", "a")
	_ = sub.Disconnect(&paho.Disconnect{})

	pubA := bt.Dial(t, a.MQTTAddr("tcp"), &paho.Connect{ClientID: "pub-a", CleanStart: true})
	pubC := bt.Dial(t, c.MQTTAddr("tcp"), &paho.Connect{ClientID: "pub-c", CleanStart: true})
	const queued = 40
	for i := range queued {
		pubA.PublishT(t, &paho.Publish{Topic: "mv/a", QoS: byte(1 + i%2), Payload: []byte("q-a-" + strconv.Itoa(i))})
		pubC.PublishT(t, &paho.Publish{Topic: "mv/c", QoS: 1, Payload: []byte("q-c-" + strconv.Itoa(i))})
	}
	bt.WaitFor(t, 20*time.Second, "a holds all queued messages", func() bool { return a.Engine().Stats().Inflight == 2*queued })

	// Publishers on a and c go on during the move.
	var wg sync.WaitGroup
	stop := make(chan struct{})
	sent := map[string]int{}
	var mu sync.Mutex
	for _, p := range []struct {
		name string
		c    *bt.Client
	}{{"a", pubA}, {"c", pubC}} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				payload := fmt.Sprintf("live-%s-%d", p.name, i)
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				_, err := p.c.Publish(ctx, &paho.Publish{Topic: "mv/" + p.name, QoS: 1, Payload: []byte(payload)})
				cancel()
				if err != nil {
					t.Errorf("publish on %s: %v", p.name, err)
					return
				}
				mu.Lock()
				sent[payload]++
				mu.Unlock()
				time.Sleep(2 * time.Millisecond)
			}
		}()
	}
	time.Sleep(200 * time.Millisecond)

	onB := bt.Dial(t, b.MQTTAddr("tcp"), persistent("mover", false))
	if !onB.Connack.SessionPresent {
		t.Fatal("the session was not present on b")
	}
	waitWants(t, c, "mv/x", "b") // a stopped matching after the grace
	time.Sleep(300 * time.Millisecond)
	close(stop)
	wg.Wait()
	pubC.PublishT(t, &paho.Publish{Topic: "mv/end", QoS: 1, Payload: []byte("end")})

	want := 2*queued + len(sent) + 1
	bt.WaitFor(t, 30*time.Second, fmt.Sprintf("%d messages on b", want), func() bool { return onB.Count() >= want })
	onB.Barrier(t)
	got := map[string]int{}
	for _, m := range onB.Messages() {
		got[string(m.Payload)]++
	}
	for i := range queued {
		for _, k := range []string{"q-a-" + strconv.Itoa(i), "q-c-" + strconv.Itoa(i)} {
			if got[k] != 1 {
				t.Errorf("queued %s arrived %d times", k, got[k])
			}
		}
	}
	for k := range sent {
		if got[k] != 1 {
			t.Errorf("%s (published during the move) arrived %d times", k, got[k])
		}
	}
	if t.Failed() {
		t.Fatalf("%d distinct of %d messages", len(got), want)
	}
	bt.WaitFor(t, 20*time.Second, "a forgot the session", func() bool { return a.Engine().Stats().Sessions == 1 }) // pub-a's
	if st := b.ClusterRouter().Stats(); st.MovedIn != 1 {
		t.Fatalf("b's moves: %+v", st)
	}

	// Back to a, taking over b's live connection.
	pubC.PublishT(t, &paho.Publish{Topic: "mv/back", QoS: 1, Payload: []byte("back")})
	onA := bt.Dial(t, a.MQTTAddr("tcp"), persistent("mover", false))
	if !onA.Connack.SessionPresent {
		t.Fatal("the session was not present back on a")
	}
	bt.WaitFor(t, 10*time.Second, "b's connection closed with 0x8E", func() bool {
		d := onB.ServerDisconnect()
		return d != nil && d.ReasonCode == 0x8E
	})
	pubC.PublishT(t, &paho.Publish{Topic: "mv/after", QoS: 1, Payload: []byte("after")})
	bt.WaitFor(t, 20*time.Second, "a's connection gets what follows", func() bool {
		for _, m := range onA.Messages() {
			if string(m.Payload) == "after" {
				return true
			}
		}
		return false
	})
	// "back" may have been in flight on b's connection, unacknowledged,
	// when a took over: then a sends it again, as QoS 1 allows. Or b had
	// not taken it yet: then it comes in b's tail, maybe after "after".
	var onBoth, onNew int
	count := func() bool {
		onBoth, onNew = 0, 0
		for _, m := range onB.Messages() {
			if string(m.Payload) == "back" {
				onBoth++
			}
		}
		for _, m := range onA.Messages() {
			if string(m.Payload) == "back" {
				onBoth++
				onNew++
			}
		}
		return onBoth > 0
	}
	bt.WaitFor(t, 20*time.Second, `"back" on b's or a's connection`, count)
	onA.Barrier(t)
	count()
	if onNew > 1 {
		t.Fatalf("the message published as it moved back arrived %d times, %d of them on a", onBoth, onNew)
	}
}

// A client that starts clean on another node ends its session where it
// was: the old connection gets 0x8E, the old node forgets the session.
func TestClusterCleanStartElsewhereEndsTheSession(t *testing.T) {
	rds := clustertest.StartRedis(t)
	a := bt.Start(t, clusterConfig(t, rds, "a"))
	b := bt.Start(t, clusterConfig(t, rds, "b"))
	onA := bt.Dial(t, a.MQTTAddr("tcp"), persistent("fresh", true))
	onA.SubscribeT(t, paho.SubscribeOptions{Topic: "fresh/#", QoS: 1})
	waitWants(t, b, "fresh/x", "a")

	onB := bt.Dial(t, b.MQTTAddr("tcp"), persistent("fresh", true))
	if onB.Connack.SessionPresent {
		t.Fatal("a clean start found a session")
	}
	bt.WaitFor(t, 10*time.Second, "a's connection closed with 0x8E", func() bool {
		d := onA.ServerDisconnect()
		return d != nil && d.ReasonCode == 0x8E
	})
	bt.WaitFor(t, 10*time.Second, "a forgot the session", func() bool { return a.Engine().Stats().Sessions == 0 })
	waitWants(t, b, "fresh/x")
}

// A client that reconnects elsewhere while its node is down gets a new
// session there; when the node returns, what it had queued follows the
// client.
func TestClusterQueueFollowsAClientThatMovedWhileItsNodeWasDown(t *testing.T) {
	rds := clustertest.StartRedis(t, "--appendonly", "yes")
	cfgA := clusterConfig(t, rds, "a")
	a := bt.Start(t, cfgA)
	b := bt.Start(t, clusterConfig(t, rds, "b"))
	sub := bt.Dial(t, a.MQTTAddr("tcp"), persistent("wanderer", true))
	sub.SubscribeT(t, paho.SubscribeOptions{Topic: "w/#", QoS: 1})
	_ = sub.Disconnect(&paho.Disconnect{})
	pub := bt.Dial(t, a.MQTTAddr("tcp"), &paho.Connect{ClientID: "pub-a", CleanStart: true})
	const n = 20
	for i := range n {
		pub.PublishT(t, &paho.Publish{Topic: "w/x", QoS: 1, Payload: []byte("held-" + strconv.Itoa(i))})
	}
	bt.Stop(t, a)
	bt.WaitFor(t, 20*time.Second, "b sees a down", func() bool { return !b.ClusterRouter().NodeUp("a") })

	onB := bt.Dial(t, b.MQTTAddr("tcp"), persistent("wanderer", false))
	if onB.Connack.SessionPresent {
		t.Fatal("a session was present on b although its node was down")
	}
	onB.SubscribeT(t, paho.SubscribeOptions{Topic: "w/#", QoS: 1})

	a2 := bt.Start(t, cfgA) // same data directory
	got := onB.WaitMessages(t, n, 30*time.Second)
	for i, m := range got[:n] {
		if string(m.Payload) != "held-"+strconv.Itoa(i) {
			t.Fatalf("message %d: %q", i, m.Payload)
		}
	}
	bt.WaitFor(t, 20*time.Second, "the returned node forgot the session", func() bool { return a2.Engine().Stats().Sessions == 0 })
	onB.Barrier(t)
	k := 0
	for _, m := range onB.Messages() {
		if m.Topic == "w/x" {
			k++
		}
	}
	if k != n {
		t.Fatalf("got %d messages, want %d exactly", k, n)
	}
}

// dialUntil connects, trying again while the broker answers 0x88 (the
// session is still moving).
func dialUntil(t *testing.T, addr string, cp *paho.Connect) *bt.Client {
	t.Helper()
	var c *bt.Client
	bt.WaitFor(t, 30*time.Second, "a CONNECT that is not refused", func() bool {
		var err error
		c, err = bt.TryDial(addr, cp)
		return err == nil
	})
	t.Cleanup(func() { _ = c.Disconnect(&paho.Disconnect{}) })
	return c
}

// A client that moves a -> b and straight back to a, while a is still
// finishing the first move: it waits (0x88) until a has, then keeps its
// subscriptions and gets what is published on any node.
func TestClusterSessionMovesBackAtOnce(t *testing.T) {
	rds := clustertest.StartRedis(t)
	a := bt.Start(t, clusterConfig(t, rds, "a"))
	b := bt.Start(t, clusterConfig(t, rds, "b"))
	c := bt.Start(t, clusterConfig(t, rds, "c"))
	sub := bt.Dial(t, a.MQTTAddr("tcp"), persistent("bouncer", true))
	sub.SubscribeT(t, paho.SubscribeOptions{Topic: "qb/#", QoS: 1})
	waitWants(t, c, "qb/x", "a")
	onB := bt.Dial(t, b.MQTTAddr("tcp"), persistent("bouncer", false))
	if !onB.Connack.SessionPresent {
		t.Fatal("not present on b")
	}
	back := dialUntil(t, a.MQTTAddr("tcp"), persistent("bouncer", false))
	if !back.Connack.SessionPresent {
		t.Fatal("not present back on a")
	}
	// a took the CONNECT only once its first move had ended (0x88 until
	// then): the session that came back is the only one there.
	waitWants(t, c, "qb/x", "a")
	pubC := bt.Dial(t, c.MQTTAddr("tcp"), &paho.Connect{ClientID: "pub-c", CleanStart: true})
	pubA := bt.Dial(t, a.MQTTAddr("tcp"), &paho.Connect{ClientID: "pub-a", CleanStart: true})
	pubC.PublishT(t, &paho.Publish{Topic: "qb/c", QoS: 1, Payload: []byte("from-c")})
	pubA.PublishT(t, &paho.Publish{Topic: "qb/a", QoS: 1, Payload: []byte("from-a")})
	got := back.WaitMessages(t, 2, 20*time.Second)
	if len(got) != 2 {
		t.Fatalf("got %d messages", len(got))
	}
}

// A client that starts clean on b while its session's node a is down:
// when a returns, the old session ends there and its queue goes nowhere.
func TestClusterCleanStartWhileTheOwnerIsDown(t *testing.T) {
	rds := clustertest.StartRedis(t, "--appendonly", "yes")
	cfgA := clusterConfig(t, rds, "a")
	a := bt.Start(t, cfgA)
	b := bt.Start(t, clusterConfig(t, rds, "b"))
	sub := bt.Dial(t, a.MQTTAddr("tcp"), persistent("restarter", true))
	sub.SubscribeT(t, paho.SubscribeOptions{Topic: "old/#", QoS: 1})
	_ = sub.Disconnect(&paho.Disconnect{})
	pub := bt.Dial(t, a.MQTTAddr("tcp"), &paho.Connect{ClientID: "pub-a", CleanStart: true})
	for i := range 5 {
		pub.PublishT(t, &paho.Publish{Topic: "old/x", QoS: 1, Payload: []byte("old-" + strconv.Itoa(i))})
	}
	bt.Stop(t, a)
	bt.WaitFor(t, 20*time.Second, "b sees a down", func() bool { return !b.ClusterRouter().NodeUp("a") })
	onB := bt.Dial(t, b.MQTTAddr("tcp"), persistent("restarter", true))
	onB.SubscribeT(t, paho.SubscribeOptions{Topic: "new/#", QoS: 1})
	a2 := bt.Start(t, cfgA)
	bt.WaitFor(t, 20*time.Second, "a2 ended the old session", func() bool { return a2.Engine().Stats().Sessions == 0 })
	onB.Barrier(t)
	for _, m := range onB.Messages() {
		if m.Topic == "old/x" {
			t.Fatalf("the clean session got the old one's %q", m.Payload)
		}
	}
}

// A QoS 2 message in flight (sent, no PUBREC) to a client whose node then
// goes down: the client resumes on b (a new session), and when a returns
// the message arrives there with the same packet id and DUP, and its
// flow completes.
func TestClusterQoS2InFlightFollowsTheClient(t *testing.T) {
	rds := clustertest.StartRedis(t, "--appendonly", "yes")
	cfgA := clusterConfig(t, rds, "a")
	a := bt.Start(t, cfgA)
	b := bt.Start(t, clusterConfig(t, rds, "b"))
	connect := func(r *bt.Raw) packets.Packet {
		r.Send(t, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect},
			Connect: packets.ConnectParams{ClientIdentifier: "q2dev", Clean: false, Keepalive: 30}})
		return r.Expect(t, packets.Connack)
	}
	subscribe := func(r *bt.Raw) {
		r.Send(t, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Subscribe, Qos: 1}, PacketID: 1,
			Filters: packets.Subscriptions{{Filter: "q2/#", Qos: 2}}})
		r.Expect(t, packets.Suback)
	}
	r := bt.DialRaw(t, a.MQTTAddr("tcp"), 4)
	connect(r)
	subscribe(r)
	pub := bt.Dial(t, a.MQTTAddr("tcp"), &paho.Connect{ClientID: "pub-a", CleanStart: true})
	pub.PublishT(t, &paho.Publish{Topic: "q2/x", QoS: 2, Payload: []byte("exactly-once")})
	first := r.Expect(t, packets.Publish)
	_ = r.Conn.Close() // no PUBREC
	bt.Stop(t, a)
	bt.WaitFor(t, 20*time.Second, "b sees a down", func() bool { return !b.ClusterRouter().NodeUp("a") })

	r2 := bt.DialRaw(t, b.MQTTAddr("tcp"), 4)
	if ack := connect(r2); ack.SessionPresent {
		t.Fatal("a session was present on b although its node was down")
	}
	subscribe(r2)
	bt.Start(t, cfgA)
	again := r2.Expect(t, packets.Publish)
	if string(again.Payload) != "exactly-once" || again.PacketID != first.PacketID || !again.FixedHeader.Dup {
		t.Fatalf("resent as %q id %d dup %v; first was id %d", again.Payload, again.PacketID, again.FixedHeader.Dup, first.PacketID)
	}
	r2.Send(t, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Pubrec}, PacketID: again.PacketID})
	rel := r2.Expect(t, packets.Pubrel)
	r2.Send(t, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Pubcomp, Qos: 1}, PacketID: rel.PacketID})
	if pk, err := r2.Read(time.Second); err == nil && pk.FixedHeader.Type == packets.Publish {
		t.Fatalf("sent again after its flow completed: %+v", pk)
	}
}

// A client that resumes on b and then starts clean there, while a still
// sends the tail of the moved session: the tail is the old session's and
// goes nowhere; the clean session gets nothing it did not subscribe to.
func TestClusterCleanStartDuringTheTail(t *testing.T) {
	rds := clustertest.StartRedis(t)
	a := bt.Start(t, clusterConfig(t, rds, "a"))
	b := bt.Start(t, clusterConfig(t, rds, "b"))
	c := bt.Start(t, clusterConfig(t, rds, "c"))
	sub := bt.Dial(t, a.MQTTAddr("tcp"), persistent("twice", true))
	sub.SubscribeT(t, paho.SubscribeOptions{Topic: "tw/#", QoS: 1})
	waitWants(t, c, "tw/x", "a")
	_ = sub.Disconnect(&paho.Disconnect{})
	pubC := bt.Dial(t, c.MQTTAddr("tcp"), &paho.Connect{ClientID: "pub-c", CleanStart: true})
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			_, err := pubC.Publish(ctx, &paho.Publish{Topic: "tw/x", QoS: 1, Payload: []byte(strconv.Itoa(i))})
			cancel()
			if err != nil {
				return
			}
			time.Sleep(2 * time.Millisecond)
		}
	}()
	time.Sleep(200 * time.Millisecond)
	resumed := bt.Dial(t, b.MQTTAddr("tcp"), persistent("twice", false))
	if !resumed.Connack.SessionPresent {
		t.Fatal("not present on b")
	}
	_ = resumed.Disconnect(&paho.Disconnect{})
	clean := bt.Dial(t, b.MQTTAddr("tcp"), persistent("twice", true))
	bt.WaitFor(t, 30*time.Second, "a ended the moved session", func() bool { return a.Engine().Stats().Sessions == 0 })
	close(stop)
	<-done
	clean.Barrier(t)
	for _, m := range clean.Messages() {
		if m.Topic == "tw/x" {
			t.Fatalf("the clean session got %q from the old session's tail", m.Payload)
		}
	}
}
