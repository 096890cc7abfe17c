package cluster_test

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/beaconmq/beacon/broker/cluster"
	"github.com/beaconmq/beacon/broker/cluster/clustertest"
	"github.com/beaconmq/beacon/devices"
)

// inForce is a node's rules in force, set by the apply function given to
// cluster.NewRules (which parses them as the broker does).
type inForce struct {
	mu    sync.Mutex
	rules *devices.Rules
}

func (f *inForce) apply(text []byte) error {
	rs, err := devices.ParseRules("cluster", text)
	if err != nil {
		return err
	}
	f.mu.Lock()
	f.rules = rs
	f.mu.Unlock()
	return nil
}

// allows reports whether a device may publish to topic under the rules in
// force (the built-in defaults while none were applied).
func (f *inForce) allows(topic string) bool {
	f.mu.Lock()
	rs := f.rules
	f.mu.Unlock()
	if rs == nil {
		rs = devices.DefaultRules()
	}
	p := devices.Principal{Kind: devices.DeviceKind, Name: "d1"}
	return devices.NewAuthorizer(rs).Allowed(&p, devices.Publish, topic)
}

func allowOnly(topic string) []byte {
	return fmt.Appendf(nil, "rules:\n  - effect: allow\n    subjects: [device]\n    actions: [publish]\n    topics: [%q]\n", topic)
}

func startRules(t *testing.T, r *clustertest.Redis, id string, file []byte) (*cluster.Node, *cluster.Rules, *inForce) {
	t.Helper()
	n := openNode(t, r, id)
	f := &inForce{}
	if file != nil {
		if err := f.apply(file); err != nil { // what setupAuth does with the file
			t.Fatal(err)
		}
	}
	rs := cluster.NewRules(n, file, f.apply)
	n.Start()
	select {
	case <-rs.Synced():
	case <-time.After(20 * time.Second):
		t.Fatalf("%s: rules not synced", id)
	}
	return n, rs, f
}

func TestRulesShared(t *testing.T) {
	r := clustertest.StartRedis(t)
	// C has no file and the cluster no rules yet: built-in defaults.
	_, _, fc := startRules(t, r, "c", nil)
	if fc.allows("a/1") {
		t.Fatal("defaults allow a/1")
	}
	// A's file becomes the cluster's; B, whose file differs, takes A's.
	na, ra, fa := startRules(t, r, "a", allowOnly("a/1"))
	_, _, fb := startRules(t, r, "b", allowOnly("b/1"))
	if !fb.allows("a/1") || fb.allows("b/1") {
		t.Fatal("B kept its own file instead of the cluster's rules")
	}
	waitFor(t, "C applies A's rules", func() error {
		if !fc.allows("a/1") {
			return fmt.Errorf("not yet")
		}
		return nil
	})

	// A reload on A reaches B and C.
	waitFor(t, "A up", func() error {
		if !na.Up() {
			return fmt.Errorf("down")
		}
		return nil
	})
	next := allowOnly("x/2")
	if err := fa.apply(next); err != nil {
		t.Fatal(err)
	}
	if err := ra.Publish(next); err != nil {
		t.Fatal(err)
	}
	for name, f := range map[string]*inForce{"b": fb, "c": fc} {
		waitFor(t, name+" applies the reload", func() error {
			if !f.allows("x/2") || f.allows("a/1") {
				return fmt.Errorf("not yet")
			}
			return nil
		})
	}

	// A text that does not parse is logged and the rules in force stay.
	ctx := context.Background()
	if err := na.Client().Set(ctx, na.Key("acl"), "rules: [", 0).Err(); err != nil {
		t.Fatal(err)
	}
	if err := na.Client().Publish(ctx, na.Key("acl"), "test").Err(); err != nil {
		t.Fatal(err)
	}
	// Then a good text after it reaches B (the notices keep flowing).
	good := allowOnly("y/3")
	if err := na.Client().Set(ctx, na.Key("acl"), good, 0).Err(); err != nil {
		t.Fatal(err)
	}
	if err := na.Client().Publish(ctx, na.Key("acl"), "test").Err(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "B applies the good text", func() error {
		if !fb.allows("y/3") {
			return fmt.Errorf("not yet")
		}
		return nil
	})

	// Redis away: a reload is refused.
	r.Kill()
	waitFor(t, "A sees redis gone", func() error {
		if na.Up() {
			return fmt.Errorf("up")
		}
		return nil
	})
	if err := ra.Publish(allowOnly("z/4")); err == nil {
		t.Fatal("a reload while redis is away was accepted")
	}
}

func TestRulesBadTextKeepsRules(t *testing.T) {
	r := clustertest.StartRedis(t)
	na, _, fa := startRules(t, r, "a", allowOnly("a/1"))
	ctx := context.Background()
	if err := na.Client().Set(ctx, na.Key("acl"), "rules: [", 0).Err(); err != nil {
		t.Fatal(err)
	}
	// A node joining now finds a text that does not parse: it keeps its file.
	_, _, fb := startRules(t, r, "b", allowOnly("b/1"))
	if !fb.allows("b/1") {
		t.Fatal("B dropped its file's rules for a text that does not parse")
	}
	if !fa.allows("a/1") {
		t.Fatal("A changed")
	}
}
