package devices_test

import (
	"encoding/json"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/beaconmq/beacon/devices"
)

// recorder keeps the changes a registry tells.
type recorder struct {
	mu      sync.Mutex
	changes []devices.Change
}

func (r *recorder) add(c devices.Change) {
	r.mu.Lock()
	r.changes = append(r.changes, c)
	r.mu.Unlock()
}
func (r *recorder) take() []devices.Change {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := r.changes
	r.changes = nil
	return out
}

func TestApplyFromAnotherRegistry(t *testing.T) {
	// Registry A makes changes in its own store; registry B (another
	// node) is told them with Apply and must authenticate alike without
	// writing anything to its own store.
	dirA := t.TempDir()
	dbA := openStore(t, dirA)
	a, err := devices.OpenRegistry(dbA)
	if err != nil {
		t.Fatal(err)
	}
	dbB := openStore(t, t.TempDir())
	b, err := devices.OpenRegistry(dbB)
	if err != nil {
		t.Fatal(err)
	}
	var rec recorder
	b.OnChange(rec.add)
	recordOf := func(id string) []byte {
		var out []byte
		_ = dbA.Devices(func(data []byte) error {
			var d devices.Device
			if json.Unmarshal(data, &d) == nil && d.ID == id {
				out = append([]byte(nil), data...)
			}
			return nil
		})
		return out
	}

	_, secret, err := a.Add(devices.NewDevice{ID: "pump-1", Type: "pump"})
	if err != nil {
		t.Fatal(err)
	}
	got, err := b.Apply("pump-1", fixed(recordOf("pump-1")))
	if err != nil || !got.Added || got.Revoked {
		t.Fatalf("apply add: %+v %v", got, err)
	}
	if _, err := b.Authenticate("pump-1", secret); err != nil {
		t.Fatalf("B refuses the secret added on A: %v", err)
	}
	if c := rec.take(); len(c) != 1 || !c[0].Added || !c[0].Remote || c[0].Device.ID != "pump-1" {
		t.Fatalf("changes after add: %+v", c)
	}
	// The same record again (a node's own change coming back) changes nothing.
	if got, _ := b.Apply("pump-1", fixed(recordOf("pump-1"))); got.Added || got.Revoked {
		t.Fatalf("apply again: %+v", got)
	}

	// B's own store was not written.
	n := 0
	_ = dbB.Devices(func([]byte) error { n++; return nil })
	if n != 0 {
		t.Fatalf("Apply wrote %d records to B's store", n)
	}

	// Online here survives a record from elsewhere (which says offline).
	b.SetOnline("pump-1", true)
	rec.take()
	if _, err := b.Apply("pump-1", fixed(recordOf("pump-1"))); err != nil {
		t.Fatal(err)
	}
	if d, _ := b.Get("pump-1"); !d.Online {
		t.Fatal("Apply reset the online flag")
	}

	newSecret, err := a.Rotate("pump-1")
	if err != nil {
		t.Fatal(err)
	}
	if got, _ := b.Apply("pump-1", fixed(recordOf("pump-1"))); !got.Revoked || !got.Updated {
		t.Fatalf("apply rotate: %+v", got)
	}
	if _, err := b.Authenticate("pump-1", secret); err == nil {
		t.Fatal("B still accepts the old secret after a rotate on A")
	}
	if _, err := b.Authenticate("pump-1", newSecret); err != nil {
		t.Fatalf("B refuses the new secret: %v", err)
	}
	off := false
	if _, err := a.Update("pump-1", devices.Update{Enabled: &off}); err != nil {
		t.Fatal(err)
	}
	if got, _ := b.Apply("pump-1", fixed(recordOf("pump-1"))); !got.Revoked {
		t.Fatalf("apply disable: %+v", got)
	}
	if err := a.Remove("pump-1"); err != nil {
		t.Fatal(err)
	}
	if got, _ := b.Apply("pump-1", fixed(nil)); !got.Removed || !got.Revoked {
		t.Fatalf("apply remove: %+v", got)
	}
	if _, err := b.Authenticate("pump-1", newSecret); err == nil {
		t.Fatal("B accepts a device removed on A")
	}
	if c := rec.take(); len(c) != 1 || !c[0].Removed || !c[0].Remote {
		t.Fatalf("changes after remove: %+v", c)
	}
	if _, err := b.Apply("x", fixed([]byte("{"))); err == nil {
		t.Fatal("a bad record applied")
	}
	if _, err := b.Apply("x", fixed(recordOfJSON(t, devices.Device{ID: "y"}))); err == nil {
		t.Fatal("a record of another id applied")
	}
}

// fixed is a fetch that returns data.
func fixed(data []byte) func() ([]byte, error) { return func() ([]byte, error) { return data, nil } }

func recordOfJSON(t *testing.T, d devices.Device) []byte {
	t.Helper()
	data, err := json.Marshal(d)
	if err != nil {
		t.Fatal(err)
	}
	return data
}

func TestApplyAll(t *testing.T) {
	r, err := devices.OpenRegistry(openStore(t, t.TempDir()))
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := r.Add(devices.NewDevice{ID: "old"}); err != nil {
		t.Fatal(err)
	}
	if _, _, err := r.Add(devices.NewDevice{ID: "kept"}); err != nil {
		t.Fatal(err)
	}
	kept, _ := r.Get("kept")
	kept.Enabled = false
	all := map[string][]byte{
		"kept": recordOfJSON(t, kept),
		"new":  recordOfJSON(t, devices.Device{ID: "new", Name: "new", Enabled: true}),
		"bad":  []byte("not json"),
	}
	added, removed, revoked, err := r.ApplyAll(func() (map[string][]byte, error) { return all, nil })
	if err == nil {
		t.Fatal("the bad record was not reported")
	}
	slices.Sort(revoked)
	if added != 1 || removed != 1 || !slices.Equal(revoked, []string{"kept", "old"}) {
		t.Fatalf("added %d removed %d revoked %v", added, removed, revoked)
	}
	var ids []string
	for _, d := range r.List(nil) {
		ids = append(ids, d.ID)
	}
	if !slices.Equal(ids, []string{"kept", "new"}) {
		t.Fatalf("devices after ApplyAll: %v", ids)
	}
}

func TestRemoteOnline(t *testing.T) {
	r, err := devices.OpenRegistry(openStore(t, t.TempDir()))
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := r.Add(devices.NewDevice{ID: "d1"}); err != nil {
		t.Fatal(err)
	}
	var rec recorder
	r.OnChange(rec.add)
	online := func() bool { d, _ := r.Get("d1"); return d.Online }

	r.SetRemoteOnline("d1", true)
	if c := rec.take(); !online() || len(c) != 1 || !c[0].Device.Online || !c[0].Remote {
		t.Fatalf("remote online: %v %+v", online(), c)
	}
	r.SetOnline("d1", true) // also here: no change of Online
	if c := rec.take(); len(c) != 0 {
		t.Fatalf("local online while remote: %+v", c)
	}
	r.SetRemoteOnline("d1", false)
	if c := rec.take(); !online() || len(c) != 0 {
		t.Fatalf("remote gone, still here: %v %+v", online(), c)
	}
	r.SetOnline("d1", false)
	if c := rec.take(); online() || len(c) != 1 || c[0].Device.Online || c[0].Remote {
		t.Fatalf("offline everywhere: %v %+v", online(), c)
	}
	later := time.Now().Add(time.Hour).UTC().Truncate(time.Second)
	r.Seen("d1", later)
	if d, _ := r.Get("d1"); !d.LastSeen.Equal(later) {
		t.Fatalf("last seen %v, want %v", d.LastSeen, later)
	}
	r.Seen("d1", later.Add(-2*time.Hour))
	if d, _ := r.Get("d1"); !d.LastSeen.Equal(later) {
		t.Fatalf("Seen moved last-seen back to %v", d.LastSeen)
	}
}

func TestApplyFetchesUnderTheLock(t *testing.T) {
	// A record read before this registry's own write must not be applied
	// after it: fetch runs with the registry locked, so a Rotate started
	// meanwhile waits and wins.
	db := openStore(t, t.TempDir())
	r, err := devices.OpenRegistry(db)
	if err != nil {
		t.Fatal(err)
	}
	_, oldSecret, err := r.Add(devices.NewDevice{ID: "d1"})
	if err != nil {
		t.Fatal(err)
	}
	var before []byte
	_ = db.Devices(func(data []byte) error { before = append([]byte(nil), data...); return nil })
	var newSecret string
	done := make(chan struct{})
	_, err = r.Apply("d1", func() ([]byte, error) {
		go func() {
			defer close(done)
			s, err := r.Rotate("d1")
			if err != nil {
				t.Error(err)
			}
			newSecret = s
		}()
		// Under the lock the rotate cannot finish; give it the chance it
		// would have without the lock.
		select {
		case <-done:
		case <-time.After(200 * time.Millisecond):
		}
		return before, nil
	})
	if err != nil {
		t.Fatal(err)
	}
	<-done
	if _, err := r.Authenticate("d1", newSecret); err != nil {
		t.Fatalf("the rotated secret was undone by a record read before it: %v", err)
	}
	if _, err := r.Authenticate("d1", oldSecret); err == nil {
		t.Fatal("the old secret works again")
	}
}
