package cluster_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/beaconmq/beacon/broker/cluster"
	"github.com/beaconmq/beacon/broker/cluster/clustertest"
	"github.com/beaconmq/beacon/devices"
	"github.com/beaconmq/beacon/storage"
)

func waitFor(t *testing.T, what string, cond func() error) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		err := cond()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s: %v", what, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func testLogger(t *testing.T) *slog.Logger {
	level := slog.LevelWarn
	if os.Getenv("BEACON_TEST_LOG") == "debug" {
		level = slog.LevelDebug
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level})).With("test", t.Name())
}

func openNode(t *testing.T, r *clustertest.Redis, id string) *cluster.Node {
	t.Helper()
	n, err := cluster.Open(cluster.Options{URL: r.URL(), NodeID: id, Heartbeat: 200 * time.Millisecond, Logger: testLogger(t).With("node", id)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = n.Close() })
	return n
}

func openDB(t *testing.T) *storage.DB {
	t.Helper()
	db, err := storage.Open(storage.Options{Dir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = db.Shutdown(context.Background()) })
	return db
}

// revoked records the devices a node was told to disconnect.
type revoked struct {
	mu  sync.Mutex
	ids []string
}

func (r *revoked) add(id string) { r.mu.Lock(); r.ids = append(r.ids, id); r.mu.Unlock() }
func (r *revoked) has(id string) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if !slices.Contains(r.ids, id) {
		return fmt.Errorf("revoked %v, not %q", r.ids, id)
	}
	return nil
}

type member struct {
	node    *cluster.Node
	db      *storage.DB
	reg     *devices.Registry
	devs    *cluster.Devices
	revoked *revoked
}

// join opens a node with its own badger store; prepare runs on its
// registry before the node joins (devices registered on one node).
func join(t *testing.T, r *clustertest.Redis, id string, prepare func(*devices.Registry)) *member {
	t.Helper()
	m := &member{node: openNode(t, r, id), db: openDB(t), revoked: &revoked{}}
	var err error
	if m.reg, err = devices.OpenRegistry(m.db); err != nil {
		t.Fatal(err)
	}
	if prepare != nil {
		prepare(m.reg)
	}
	m.devs = cluster.NewDevices(m.node, m.reg, m.db, m.revoked.add)
	m.node.Start()
	select {
	case <-m.devs.Synced():
	case <-time.After(20 * time.Second):
		t.Fatalf("node %s: registry not read from redis", id)
	}
	waitFor(t, id+" up", func() error {
		if ok, why := m.node.Ready(); !ok {
			return errors.New(why)
		}
		return nil
	})
	return m
}

func authenticates(reg *devices.Registry, id, secret string) func() error {
	return func() error { _, err := reg.Authenticate(id, secret); return err }
}

func refuses(reg *devices.Registry, id, secret string) func() error {
	return func() error {
		if _, err := reg.Authenticate(id, secret); err == nil {
			return fmt.Errorf("%s still logs in", id)
		}
		return nil
	}
}

func TestDevicesShared(t *testing.T) {
	r := clustertest.StartRedis(t)
	var oldSecret string
	a := join(t, r, "a", func(reg *devices.Registry) {
		var err error
		if _, oldSecret, err = reg.Add(devices.NewDevice{ID: "before-1"}); err != nil {
			t.Fatal(err)
		}
	})
	b := join(t, r, "b", nil)

	// A's device from before the cluster was copied up and reached B.
	waitFor(t, "B knows A's earlier device", authenticates(b.reg, "before-1", oldSecret))

	_, secret, err := a.reg.Add(devices.NewDevice{ID: "pump-1", Type: "pump"})
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, "B accepts the device added on A", authenticates(b.reg, "pump-1", secret))
	if d, err := b.reg.Get("pump-1"); err != nil || d.Type != "pump" {
		t.Fatalf("on B: %+v %v", d, err)
	}

	newSecret, err := a.reg.Rotate("pump-1")
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, "B refuses the old secret", refuses(b.reg, "pump-1", secret))
	waitFor(t, "B accepts the new secret", authenticates(b.reg, "pump-1", newSecret))
	waitFor(t, "B kicks the rotated device", func() error { return b.revoked.has("pump-1") })
	if a.revoked.has("pump-1") == nil {
		t.Fatal("A was told to revoke its own change (the admin API does that itself)")
	}

	if err := b.reg.Remove("before-1"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "A refuses the device removed on B", refuses(a.reg, "before-1", oldSecret))
	waitFor(t, "A kicks it", func() error { return a.revoked.has("before-1") })
	// A's local copy follows: the removed device is gone from its badger store too.
	waitFor(t, "A's local copy", func() error {
		var ids []string
		_ = a.db.Devices(func(data []byte) error { ids = append(ids, string(data)); return nil })
		if len(ids) != 1 {
			return fmt.Errorf("%d local records", len(ids))
		}
		return nil
	})

	// Redis away: known devices log in, changes are refused.
	r.Kill()
	waitFor(t, "A sees redis gone", func() error {
		if a.node.Up() {
			return errors.New("still up")
		}
		return nil
	})
	if _, _, err := a.reg.Add(devices.NewDevice{ID: "while-down"}); !errors.Is(err, devices.ErrUnavailable) {
		t.Fatalf("add while redis is away: %v", err)
	}
	if err := a.reg.Remove("pump-1"); !errors.Is(err, devices.ErrUnavailable) {
		t.Fatalf("remove while redis is away: %v", err)
	}
	if _, err := b.reg.Authenticate("pump-1", newSecret); err != nil {
		t.Fatalf("login while redis is away: %v", err)
	}

	// Redis back empty (no persistence): the nodes fill it again from
	// their copies, and changes flow again.
	r.Start()
	waitFor(t, "A back", func() error {
		if !a.node.Up() {
			return errors.New("down")
		}
		return nil
	})
	var secret2 string
	waitFor(t, "an add on A after redis is back", func() error {
		var err error
		_, secret2, err = a.reg.Add(devices.NewDevice{ID: "after-1"})
		return err
	})
	waitFor(t, "B accepts it", authenticates(b.reg, "after-1", secret2))
	waitFor(t, "pump-1 back in redis", func() error {
		n, err := a.node.Client().HExists(context.Background(), a.node.Key("devices"), "pump-1").Result()
		if err != nil || !n {
			return fmt.Errorf("%v %v", n, err)
		}
		return nil
	})
	if _, err := b.reg.Authenticate("pump-1", newSecret); err != nil {
		t.Fatalf("pump-1 after redis came back: %v", err)
	}
}

func TestDevicesSeedOnce(t *testing.T) {
	// A node that joined once does not bring back, from its local copy, a
	// device removed while it was away.
	r := clustertest.StartRedis(t)
	a := join(t, r, "a", nil)
	db := openDB(t)
	reg, err := devices.OpenRegistry(db)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := reg.Add(devices.NewDevice{ID: "gone-1"}); err != nil {
		t.Fatal(err)
	}
	n := openNode(t, r, "b")
	d := cluster.NewDevices(n, reg, db, nil)
	n.Start()
	<-d.Synced()
	waitFor(t, "A knows gone-1", func() error { _, err := a.reg.Get("gone-1"); return err })
	_ = n.Close()
	waitFor(t, "A up", func() error {
		if !a.node.Up() {
			return errors.New("down")
		}
		return nil
	})
	if err := a.reg.Remove("gone-1"); err != nil {
		t.Fatal(err)
	}
	// b comes back with a registry opened from its old copy.
	reg2, err := devices.OpenRegistry(db)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := reg2.Get("gone-1"); err != nil {
		t.Fatal("the local copy should still have it before the node rejoins")
	}
	n2 := openNode(t, r, "b")
	d2 := cluster.NewDevices(n2, reg2, db, nil)
	n2.Start()
	<-d2.Synced()
	if _, err := reg2.Get("gone-1"); err == nil {
		t.Fatal("b brought back a device removed while it was away")
	}
	if ok, _ := a.node.Client().HExists(context.Background(), a.node.Key("devices"), "gone-1").Result(); ok {
		t.Fatal("gone-1 copied up again")
	}
}
