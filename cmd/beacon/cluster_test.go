package main

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"

	bt "github.com/beaconmq/beacon/broker/brokertest"
	"github.com/beaconmq/beacon/broker/cluster/clustertest"
)

// clusterNode starts the binary as node id of the cluster on redis,
// with its data in data.
func clusterNode(t *testing.T, redisURL, id, data string) *proc {
	t.Helper()
	conf := filepath.Join(t.TempDir(), "beacon.yaml")
	body := fmt.Sprintf("mqtt:\n  max_queued_messages: 60000\ncluster:\n  redis_url: %q\n  node_id: %q\n  heartbeat: 200ms\n", redisURL, id)
	if err := os.WriteFile(conf, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	return startBeacon(t, data, "--config", conf)
}

// acked is what publishers had acknowledged, by payload.
type acked struct {
	mu sync.Mutex
	m  []string
	n  atomic.Int64
}

// load publishes QoS 1 to topic from workers connections until stop
// closes or the broker goes away, recording every acknowledged payload.
func (a *acked) load(t *testing.T, addr, topic, prefix string, workers int, stop <-chan struct{}) *sync.WaitGroup {
	var wg sync.WaitGroup
	for w := range workers {
		c, err := bt.TryDial(addr, &paho.Connect{ClientID: fmt.Sprintf("%s-pub-%d", prefix, w), CleanStart: true})
		if err != nil {
			t.Fatal(err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { _ = c.Disconnect(&paho.Disconnect{}) }()
			for i := 0; ; i++ {
				payload := fmt.Sprintf("%s-%d-%d", prefix, w, i)
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				r, err := c.Publish(ctx, &paho.Publish{Topic: topic, QoS: 1, Payload: []byte(payload)})
				cancel()
				if err != nil || (r != nil && r.ReasonCode >= 0x80) {
					return
				}
				a.mu.Lock()
				a.m = append(a.m, payload)
				a.mu.Unlock()
				a.n.Add(1)
				select {
				case <-stop:
					return
				default:
				}
			}
		}()
	}
	return &wg
}

// waitAll waits until c has every acknowledged payload; it reports the
// lost ones.
func (a *acked) waitAll(t *testing.T, c *bt.Client, timeout time.Duration) {
	t.Helper()
	a.mu.Lock()
	want := append([]string(nil), a.m...)
	a.mu.Unlock()
	lost := func() []string {
		got := map[string]bool{}
		for _, m := range c.Messages() {
			got[string(m.Payload)] = true
		}
		var l []string
		for _, w := range want {
			if !got[w] {
				l = append(l, w)
			}
		}
		return l
	}
	deadline := time.Now().Add(timeout)
	l := lost()
	for len(l) > 0 && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
		l = lost()
	}
	t.Logf("%d acknowledged, %d received on the other node, %d lost", len(want), c.Count(), len(l))
	if len(l) > 0 {
		t.Fatalf("%d acknowledged messages lost across nodes, e.g. %v", len(l), l[:min(5, len(l))])
	}
}

// A SIGKILL of the publishing node, then of the receiving one, under
// QoS 1 load loses nothing either had acknowledged.
func TestClusterSIGKILLLosesNothing(t *testing.T) {
	redis := clustertest.StartRedis(t, "--appendonly", "yes", "--appendfsync", "always")
	dataA, dataB := t.TempDir(), t.TempDir()
	a := clusterNode(t, redis.URL(), "a", dataA)
	b := clusterNode(t, redis.URL(), "b", dataB)

	sub := bt.Dial(t, b.mqtt, persistentConnect("sub-b"))
	sub.SubscribeT(t, paho.SubscribeOptions{Topic: "load/#", QoS: 1})
	probe := bt.Dial(t, a.mqtt, &paho.Connect{ClientID: "probe", CleanStart: true})
	bt.WaitFor(t, 30*time.Second, "a forwards load/ to b", func() bool {
		probe.PublishT(t, &paho.Publish{Topic: "load/probe", QoS: 1, Payload: []byte("probe")})
		return sub.Count() > 0
	})

	var ack acked
	stop := make(chan struct{})
	wg := ack.load(t, a.mqtt, "load/a", "one", 4, stop)
	bt.WaitFor(t, 60*time.Second, "1,000 acknowledged on a", func() bool { return ack.n.Load() >= 1000 })
	a.kill(t)
	wg.Wait()
	a = clusterNode(t, redis.URL(), "a", dataA)
	ack.waitAll(t, sub, 60*time.Second)

	// Now the receiving node dies while messages stream to it.
	wg = ack.load(t, a.mqtt, "load/a", "two", 4, stop)
	bt.WaitFor(t, 60*time.Second, "1,000 more acknowledged on a", func() bool { return ack.n.Load() >= 2000 })
	b.kill(t)
	bt.WaitFor(t, 60*time.Second, "500 acknowledged on a while b is down", func() bool { return ack.n.Load() >= 2500 })
	close(stop)
	wg.Wait()
	b = clusterNode(t, redis.URL(), "b", dataB)
	back := bt.Dial(t, b.mqtt, persistentConnect("sub-b"))
	// What reached sub before the kill counts as received.
	before := map[string]bool{}
	for _, m := range sub.Messages() {
		before[string(m.Payload)] = true
	}
	ack.mu.Lock()
	var rest []string
	for _, p := range ack.m {
		if !before[p] {
			rest = append(rest, p)
		}
	}
	ack.m = rest
	ack.mu.Unlock()
	ack.waitAll(t, back, 60*time.Second)
}

// Redis killed (and started again empty) under QoS 1 load: the nodes
// serve their own clients meanwhile, say not ready, and once Redis is
// back everything acknowledged reaches the other node.
func TestClusterRedisRestartLosesNothing(t *testing.T) {
	redis := clustertest.StartRedis(t) // no persistence: Redis comes back empty
	a := clusterNode(t, redis.URL(), "a", t.TempDir())
	b := clusterNode(t, redis.URL(), "b", t.TempDir())
	sub := bt.Dial(t, b.mqtt, persistentConnect("sub-b"))
	sub.SubscribeT(t, paho.SubscribeOptions{Topic: "load/#", QoS: 1})
	probe := bt.Dial(t, a.mqtt, &paho.Connect{ClientID: "probe", CleanStart: true})
	bt.WaitFor(t, 30*time.Second, "a forwards load/ to b", func() bool {
		probe.PublishT(t, &paho.Publish{Topic: "load/probe", QoS: 1, Payload: []byte("probe")})
		return sub.Count() > 0
	})
	ready := func(p *proc) int {
		resp, err := http.Get("http://" + p.http + "/readyz")
		if err != nil {
			return 0
		}
		resp.Body.Close()
		return resp.StatusCode
	}

	var ack acked
	stop := make(chan struct{})
	wg := ack.load(t, a.mqtt, "load/a", "r", 4, stop)
	bt.WaitFor(t, 60*time.Second, "500 acknowledged", func() bool { return ack.n.Load() >= 500 })
	redis.Kill()
	bt.WaitFor(t, 30*time.Second, "a not ready without Redis", func() bool { return ready(a) == http.StatusServiceUnavailable })
	n := ack.n.Load()
	bt.WaitFor(t, 60*time.Second, "a still acknowledges its publishers", func() bool { return ack.n.Load() >= n+500 })
	redis.Start()
	bt.WaitFor(t, 30*time.Second, "a ready again", func() bool { return ready(a) == http.StatusOK && ready(b) == http.StatusOK })
	n = ack.n.Load()
	bt.WaitFor(t, 60*time.Second, "500 more acknowledged", func() bool { return ack.n.Load() >= n+500 })
	close(stop)
	wg.Wait()
	ack.waitAll(t, sub, 90*time.Second)
	for _, p := range []*proc{a, b} {
		for _, l := range strings.Split(p.Logs(), "\n") {
			if strings.Contains(l, `"cluster: `) {
				t.Log(l)
			}
		}
	}
}

// A session moves from a to b while QoS 1 load from b runs through it,
// and a is SIGKILLed in the middle of the move (it still sends what it
// queued): once it is back, every message b's publishers had
// acknowledged has reached the moved session, none twice.
func TestClusterSessionMoveSurvivesSIGKILL(t *testing.T) {
	redis := clustertest.StartRedis(t, "--appendonly", "yes", "--appendfsync", "always")
	dataA, dataB := t.TempDir(), t.TempDir()
	a := clusterNode(t, redis.URL(), "a", dataA)
	b := clusterNode(t, redis.URL(), "b", dataB)

	sub := bt.Dial(t, a.mqtt, persistentConnect("roamer"))
	sub.SubscribeT(t, paho.SubscribeOptions{Topic: "roam/#", QoS: 1})
	probe := bt.Dial(t, b.mqtt, &paho.Connect{ClientID: "probe", CleanStart: true})
	bt.WaitFor(t, 30*time.Second, "b forwards roam/ to a", func() bool {
		probe.PublishT(t, &paho.Publish{Topic: "roam/probe", QoS: 1, Payload: []byte("probe")})
		return sub.Count() > 0
	})
	_ = sub.Disconnect(&paho.Disconnect{})

	var ack acked
	stop := make(chan struct{})
	wg := ack.load(t, b.mqtt, "roam/b", "mv", 4, stop)
	bt.WaitFor(t, 60*time.Second, "1,000 acknowledged for the offline session on a", func() bool { return ack.n.Load() >= 1000 })
	moved := bt.Dial(t, b.mqtt, persistentConnect("roamer"))
	if !moved.Connack.SessionPresent {
		t.Fatal("the session was not present on b")
	}
	a.kill(t) // within the move's grace: a was still matching and sending its tail
	n := ack.n.Load()
	bt.WaitFor(t, 60*time.Second, "1,000 more acknowledged", func() bool { return ack.n.Load() >= n+1000 })
	a = clusterNode(t, redis.URL(), "a", dataA)
	close(stop)
	wg.Wait()
	ack.waitAll(t, moved, 60*time.Second)
	moved.Barrier(t)
	seen := map[string]int{}
	dups := 0
	for _, m := range moved.Messages() {
		if seen[string(m.Payload)]++; seen[string(m.Payload)] == 2 && strings.HasPrefix(string(m.Payload), "mv-") {
			dups++
		}
	}
	if dups > 0 {
		t.Fatalf("%d messages arrived twice", dups)
	}
	for _, l := range strings.Split(a.Logs(), "\n") {
		if strings.Contains(l, "cluster") {
			t.Log(l)
		}
	}
}
