package cluster_test

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/beaconmq/beacon/broker/cluster"
	"github.com/beaconmq/beacon/broker/cluster/clustertest"
	"github.com/beaconmq/beacon/devices"
)

// events is what every node's Publish said, in order: "<node>:<device>:on|off".
type events struct {
	mu  sync.Mutex
	all []string
}

func (e *events) add(s string) { e.mu.Lock(); e.all = append(e.all, s); e.mu.Unlock() }
func (e *events) list() []string {
	e.mu.Lock()
	defer e.mu.Unlock()
	return slices.Clone(e.all)
}

// presenceNode is one node's connections (set by the test as connections
// would come and go) and its registry.
type presenceNode struct {
	id   string
	node *cluster.Node
	reg  *devices.Registry
	p    *cluster.Presence
	mu   sync.Mutex
	conn map[string]int
}

func (n *presenceNode) connect(dev string, delta int) {
	n.mu.Lock()
	n.conn[dev] += delta
	if n.conn[dev] <= 0 {
		delete(n.conn, dev)
	}
	n.mu.Unlock()
	n.reg.SetOnline(dev, n.count(dev) > 0)
	n.p.Changed(dev)
}

func (n *presenceNode) count(dev string) int {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.conn[dev]
}

func startPresence(t *testing.T, r *clustertest.Redis, id string, ev *events) *presenceNode {
	t.Helper()
	pn := &presenceNode{id: id, node: openNode(t, r, id), conn: map[string]int{}}
	var err error
	if pn.reg, err = devices.OpenRegistry(openDB(t)); err != nil {
		t.Fatal(err)
	}
	if _, _, err := pn.reg.Add(devices.NewDevice{ID: "d1"}); err != nil {
		t.Fatal(err)
	}
	pn.p = cluster.NewPresence(pn.node, cluster.PresenceOptions{Registry: pn.reg, Count: pn.count,
		Counts: func() map[string]int {
			pn.mu.Lock()
			defer pn.mu.Unlock()
			out := map[string]int{}
			for k, v := range pn.conn {
				out[k] = v
			}
			return out
		},
		Publish: func(dev string, online bool) {
			s := "off"
			if online {
				s = "on"
			}
			ev.add(id + ":" + dev + ":" + s)
		}})
	pn.node.Start()
	select {
	case <-pn.p.Synced():
	case <-time.After(20 * time.Second):
		t.Fatalf("%s: presence not synced", id)
	}
	waitFor(t, id+" up", func() error {
		if !pn.node.Up() {
			return fmt.Errorf("down")
		}
		return nil
	})
	return pn
}

func onlineIn(want bool, nodes ...*presenceNode) func() error {
	return func() error {
		for _, n := range nodes {
			if d, _ := n.reg.Get("d1"); d.Online != want {
				return fmt.Errorf("d1 online=%v in %s's registry", d.Online, n.id)
			}
		}
		return nil
	}
}

func TestPresenceShared(t *testing.T) {
	r := clustertest.StartRedis(t)
	ev := &events{}
	a := startPresence(t, r, "a", ev)
	b := startPresence(t, r, "b", ev)
	c := startPresence(t, r, "c", ev)

	a.connect("d1", 1)
	waitFor(t, "online everywhere", onlineIn(true, a, b, c))
	b.connect("d1", 1)
	b.connect("d1", 1) // two connections on b
	// b's count is written by b's goroutine: once it is in Redis, a's
	// connection going cannot make the device offline.
	waitFor(t, "b's connections in redis", func() error {
		v, _ := a.node.Client().HGet(context.Background(), a.node.Key("presence"), "d1").Result()
		if v != `{"a":1,"b":2}` && v != `{"b":2,"a":1}` {
			return fmt.Errorf("entry %q", v)
		}
		return nil
	})
	a.connect("d1", -1)
	b.connect("d1", -1)
	// One connection left, on b: online everywhere (a's and c's view come from Redis).
	waitFor(t, "a's connection gone from redis", func() error {
		v, _ := a.node.Client().HGet(context.Background(), a.node.Key("presence"), "d1").Result()
		if v != `{"b":1}` {
			return fmt.Errorf("entry %q", v)
		}
		return nil
	})
	// a's view of b's connection comes with b's notice, which may follow
	// a's own change: eventually online (nothing said offline: see the end).
	waitFor(t, "online everywhere while on b", onlineIn(true, a, b, c))
	b.connect("d1", -1)
	waitFor(t, "offline everywhere", onlineIn(false, a, b, c))

	// c has it and dies (its liveness key is gone, its entries stay):
	// a survivor removes them and says offline.
	c.connect("d1", 1)
	waitFor(t, "online on a and b", onlineIn(true, a, b))
	if err := c.node.Close(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "offline after c died", onlineIn(false, a, b))

	// a leaves cleanly: its entries go at once.
	a.connect("d1", 1)
	waitFor(t, "online on b", onlineIn(true, b))
	if err := a.p.Leave(t.Context()); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "offline after a left", onlineIn(false, b))

	got := ev.list()
	// Each cluster-wide change said once, by one node.
	var want []string
	for _, e := range got {
		want = append(want, e[strings.Index(e, ":")+1:])
	}
	if !slices.Equal(want, []string{"d1:on", "d1:off", "d1:on", "d1:off", "d1:on", "d1:off"}) {
		t.Fatalf("presence said %v", got)
	}
	if got[0] != "a:d1:on" || got[1] != "b:d1:off" || got[2] != "c:d1:on" || got[3] == "c:d1:off" || got[5] != "a:d1:off" {
		t.Fatalf("said by the wrong nodes: %v", got)
	}
}

func TestPresenceRestoredAfterRedisLoss(t *testing.T) {
	// Redis comes back empty: each node writes its connections again.
	r := clustertest.StartRedis(t)
	ev := &events{}
	a := startPresence(t, r, "a", ev)
	b := startPresence(t, r, "b", ev)
	a.connect("d1", 1)
	waitFor(t, "online on b", onlineIn(true, b))
	r.Kill()
	waitFor(t, "a sees redis gone", func() error {
		if a.node.Up() {
			return fmt.Errorf("up")
		}
		return nil
	})
	r.Start()
	waitFor(t, "a's entry written again", func() error {
		v, err := b.node.Client().HGet(context.Background(), b.node.Key("presence"), "d1").Result()
		if v != `{"a":1}` {
			return fmt.Errorf("entry %q %v", v, err)
		}
		return nil
	})
	waitFor(t, "online on a and b", onlineIn(true, a, b))
}
