package broker_test

import (
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"

	"github.com/beaconmq/beacon/broker"
	bt "github.com/beaconmq/beacon/broker/brokertest"
	"github.com/beaconmq/beacon/broker/cluster/clustertest"
)

// clusterConfig is a test node of the cluster on redis.
func clusterConfig(t *testing.T, redis *clustertest.Redis, id string) broker.Config {
	cfg := bt.Config(t)
	cfg.Cluster.RedisURL = redis.URL()
	cfg.Cluster.NodeID = id
	cfg.Cluster.Heartbeat = 200 * time.Millisecond
	return cfg
}

// waitWants waits until node b forwards messages on topic to the nodes want.
func waitWants(t *testing.T, b *broker.Broker, topic string, want ...string) {
	t.Helper()
	slices.Sort(want)
	bt.WaitFor(t, 20*time.Second, fmt.Sprintf("messages on %q forwarded to %v", topic, want), func() bool {
		return slices.Equal(b.ClusterRouter().Wants(topic), want)
	})
}

func TestClusterForwardsByInterest(t *testing.T) {
	redis := clustertest.StartRedis(t)
	a := bt.Start(t, clusterConfig(t, redis, "a"))
	b := bt.Start(t, clusterConfig(t, redis, "b"))
	c := bt.Start(t, clusterConfig(t, redis, "c"))

	subB := bt.Dial(t, b.MQTTAddr("tcp"), &paho.Connect{ClientID: "sub-b", CleanStart: true})
	subB.SubscribeT(t, paho.SubscribeOptions{Topic: "plant/+/temp", QoS: 1})
	s, resp := bt.OpenSSE(t, "http://"+c.HTTPAddr()+"/events?topic=plant/%23", nil)
	if s == nil {
		t.Fatalf("GET /events on c: %d", resp.StatusCode)
	}
	s.Until(t, "ready", 10*time.Second)
	waitWants(t, a, "plant/1/temp", "b", "c")
	waitWants(t, a, "plant/1/hum", "c")
	waitWants(t, a, "office/1/temp")

	pub := bt.Dial(t, a.MQTTAddr("tcp"), &paho.Connect{ClientID: "pub-a", CleanStart: true})
	const n = 50
	for i := range n {
		pub.PublishT(t, &paho.Publish{Topic: "plant/1/temp", QoS: byte(i % 2), Payload: []byte(fmt.Sprint(i))})
		pub.PublishT(t, &paho.Publish{Topic: "plant/1/hum", QoS: 1, Payload: []byte(fmt.Sprint(i))})
		pub.PublishT(t, &paho.Publish{Topic: "office/1/temp", QoS: 1, Payload: []byte(fmt.Sprint(i))})
	}
	// Then an end marker; once it and all n arrived, a second marker:
	// nothing may come twice in between.
	pub.PublishT(t, &paho.Publish{Topic: "plant/end/temp", QoS: 1, Payload: []byte("end")})
	countB := func(topic string) int {
		k := 0
		for _, m := range subB.Messages() {
			if m.Topic == topic {
				k++
			}
		}
		return k
	}
	bt.WaitFor(t, 20*time.Second, "b's subscriber gets everything", func() bool {
		return countB("plant/1/temp") >= n && countB("plant/end/temp") == 1
	})
	sseCount := map[string]int{}
	for sseCount["plant/1/temp"] < n || sseCount["plant/1/hum"] < n || sseCount["plant/end/temp"] < 1 {
		ev := s.NextT(t, 20*time.Second)
		if ev.Name != "message" {
			continue
		}
		var env struct{ Topic string }
		ev.JSON(t, &env)
		sseCount[env.Topic]++
	}
	pub.PublishT(t, &paho.Publish{Topic: "plant/end2/temp", QoS: 1, Payload: []byte("end2")})
	bt.WaitFor(t, 20*time.Second, "the second marker on b", func() bool { return countB("plant/end2/temp") == 1 })
	for {
		ev := s.NextT(t, 20*time.Second)
		if ev.Name != "message" {
			continue
		}
		var env struct{ Topic string }
		ev.JSON(t, &env)
		sseCount[env.Topic]++
		if env.Topic == "plant/end2/temp" {
			break
		}
	}
	if k := countB("plant/1/temp"); k != n {
		t.Fatalf("b's subscriber got %d messages, want %d exactly", k, n)
	}
	want := map[string]int{"plant/1/temp": n, "plant/1/hum": n, "plant/end/temp": 1, "plant/end2/temp": 1}
	if fmt.Sprint(sseCount) != fmt.Sprint(want) {
		t.Fatalf("c's stream got %v, want %v (each once, nothing of office/)", sseCount, want)
	}
	// In order per QoS (QoS 0 travels apart from QoS 1, as MQTT allows).
	next := [2]int{0, 1}
	for _, m := range subB.Messages() {
		if m.Topic != "plant/1/temp" {
			continue
		}
		q := m.QoS
		if q > 1 || string(m.Payload) != fmt.Sprint(next[q]) {
			t.Fatalf("on b: %s %q QoS %d, want payload %d next at that QoS", m.Topic, m.Payload, q, next[q])
		}
		next[q] += 2
	}
	st := a.ClusterRouter().Stats()
	if st.Forwarded == 0 || st.ForwardedLive == 0 || st.LiveDropped != 0 {
		t.Errorf("a's forwarding counters: %+v", st)
	}
}

func TestClusterRetainedReachesEveryNode(t *testing.T) {
	redis := clustertest.StartRedis(t)
	a := bt.Start(t, clusterConfig(t, redis, "a"))
	c := bt.Start(t, clusterConfig(t, redis, "c"))
	bt.WaitFor(t, 20*time.Second, "a knows c", func() bool {
		return slices.Contains(a.ClusterRouter().Nodes(), "c")
	})
	pub := bt.Dial(t, a.MQTTAddr("tcp"), &paho.Connect{ClientID: "pub-a", CleanStart: true})
	pub.PublishT(t, &paho.Publish{Topic: "cfg/1", QoS: 1, Retain: true, Payload: []byte("v1")})
	pub.PublishT(t, &paho.Publish{Topic: "cfg/1", QoS: 0, Retain: true, Payload: []byte("v2")})
	bt.WaitFor(t, 20*time.Second, "a's retained messages forwarded", func() bool {
		return a.ClusterRouter().Stats().Forwarded >= 2 && c.ClusterRouter().Stats().Received >= 2
	})
	sub := bt.Dial(t, c.MQTTAddr("tcp"), &paho.Connect{ClientID: "sub-c", CleanStart: true})
	sub.SubscribeT(t, paho.SubscribeOptions{Topic: "cfg/#", QoS: 1})
	got := sub.WaitMessages(t, 1, 20*time.Second)
	if string(got[0].Payload) != "v2" || !got[0].Retain {
		t.Fatalf("retained on c: %q retain=%v, want v2", got[0].Payload, got[0].Retain)
	}

	// A node that joins later reads the cluster's retained messages.
	d := bt.Start(t, clusterConfig(t, redis, "d"))
	late := bt.Dial(t, d.MQTTAddr("tcp"), &paho.Connect{ClientID: "sub-d", CleanStart: true})
	late.SubscribeT(t, paho.SubscribeOptions{Topic: "cfg/#", QoS: 1})
	got = late.WaitMessages(t, 1, 20*time.Second)
	if string(got[0].Payload) != "v2" {
		t.Fatalf("retained on a node that joined later: %q, want v2", got[0].Payload)
	}
}

// A node that is down gets what was sent to it when it returns: its
// persistent session's subscription stays its interest.
func TestClusterDeliversToANodeThatWasDown(t *testing.T) {
	hour := uint32(3600)
	redis := clustertest.StartRedis(t, "--appendonly", "yes")
	a := bt.Start(t, clusterConfig(t, redis, "a"))
	cfgB := clusterConfig(t, redis, "b")
	b := bt.Start(t, cfgB)
	sub := bt.Dial(t, b.MQTTAddr("tcp"), &paho.Connect{ClientID: "sub-b", CleanStart: true,
		Properties: &paho.ConnectProperties{SessionExpiryInterval: &hour}})
	sub.SubscribeT(t, paho.SubscribeOptions{Topic: "q/#", QoS: 1})
	waitWants(t, a, "q/x", "b")
	_ = sub.Disconnect(&paho.Disconnect{})
	bt.Stop(t, b)

	pub := bt.Dial(t, a.MQTTAddr("tcp"), &paho.Connect{ClientID: "pub-a", CleanStart: true})
	const n = 100
	for i := range n {
		pub.PublishT(t, &paho.Publish{Topic: "q/x", QoS: 1, Payload: []byte(fmt.Sprint(i))})
	}
	bt.WaitFor(t, 20*time.Second, "a forwarded everything", func() bool { return a.ClusterRouter().Stats().Pending == 0 })

	b2 := bt.Start(t, cfgB) // same data directory
	back := bt.Dial(t, b2.MQTTAddr("tcp"), &paho.Connect{ClientID: "sub-b", CleanStart: false,
		Properties: &paho.ConnectProperties{SessionExpiryInterval: &hour}})
	got := back.WaitMessages(t, n, 30*time.Second)
	for i, m := range got[:n] {
		if string(m.Payload) != fmt.Sprint(i) {
			t.Fatalf("message %d: %q (out of order or lost)", i, m.Payload)
		}
	}
	back.Barrier(t)
	q := 0
	for _, m := range back.Messages() {
		if strings.HasPrefix(m.Topic, "q/") {
			q++
		}
	}
	if q != n {
		t.Fatalf("got %d messages, want %d exactly", q, n)
	}
}
