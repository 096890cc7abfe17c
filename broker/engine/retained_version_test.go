package engine

import (
	"testing"
	"time"

	"github.com/beaconmq/beacon/storage"
)

// A retained clear keeps its version: an older update arriving later from
// another node (its stream was behind) does not bring the cleared message
// back (the node that sent it and Redis stay cleared too).
func TestRetainedClearKeepsItsVersion(t *testing.T) {
	s, _, _ := durableServer(t, t.TempDir())
	now := time.Now().UnixNano()
	// This node's client clears t at `now`.
	if _, err := s.Publish(&Message{Topic: "t", Retain: true, QoS: 1, Client: "local", Created: now}); err != nil {
		t.Fatal(err)
	}
	// An update made a second earlier on another node arrives afterwards.
	old := &Message{Topic: "t", Payload: []byte("old"), Retain: true, QoS: 1, Client: "other", Created: now - int64(time.Second)}
	if _, err := s.BeginRemote(old, nil, nil).Finish(); err != nil {
		t.Fatal(err)
	}
	if m, ok := s.retainedMessage("t"); ok {
		t.Fatalf("an update older than the clear came back: %q (version %d < clear's %d)", m.Payload, m.retainVersion(), now)
	}
}

// The cluster's copy of a retained message, read while a newer local
// update is between its write and being applied, is decided in order with
// it: memory and store end with the newer one.
func TestSetRetainedOrderedWithLocalUpdates(t *testing.T) {
	dir := t.TempDir()
	s, _, _ := durableServer(t, dir)
	now := time.Now().UnixNano()
	p := &Message{Topic: "t", Payload: []byte("local-newer"), Retain: true, QoS: 1, Client: "local", Created: now}
	a := s.beginAccept(p, nil) // decided and queued, not yet applied
	old := &Message{Topic: "t", Payload: []byte("cluster-older"), Retain: true, QoS: 1, Client: "other", Created: now - int64(time.Second)}
	if err := s.SetRetained(old); err != nil {
		t.Fatal(err)
	}
	if _, err := s.finishAccept(a); err != nil {
		t.Fatal(err)
	}
	mem, _ := s.retainedMessage("t")
	var stored string
	_ = s.store.db.Scan(storage.RetainPrefix(), func(k, v []byte) error {
		lm, err := storage.DecodeRetained(v)
		if err == nil && lm.Topic == "t" {
			stored = string(lm.Payload)
		}
		return nil
	})
	if string(mem.Payload) != stored {
		t.Fatalf("memory holds %q, the store %q (a restart goes back to the older one)", mem.Payload, stored)
	}
}
