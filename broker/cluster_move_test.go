package broker_test

import (
	"context"
	"fmt"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"

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
	// when a took over: then a sends it again, as QoS 1 allows.
	onBoth, onNew := 0, 0
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
	if onBoth == 0 || onNew > 1 {
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
