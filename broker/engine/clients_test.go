package engine_test

import (
	"context"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"

	"github.com/beaconmq/beacon/broker/brokertest"
	"github.com/beaconmq/beacon/broker/engine"
	"github.com/beaconmq/beacon/storage"
)

// TestClientsAndKick: the operator's view of clients (counters,
// subscriptions, offline sessions) and the kick, with and without the
// session, from real paho clients and a real store.
func TestClientsAndKick(t *testing.T) {
	db, err := storage.Open(storage.Options{Dir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	l, err := storage.OpenLog(db, storage.LogOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = l.Shutdown(context.Background()); _ = db.Shutdown(context.Background()) })
	s, addr := serve(t, engine.Options{Persistence: &engine.Persistence{DB: db, Log: l}})
	expiry := uint32(3600)
	persistent := func(id string) *paho.Connect {
		return &paho.Connect{ClientID: id, CleanStart: false, KeepAlive: 30, Properties: &paho.ConnectProperties{SessionExpiryInterval: &expiry}}
	}
	sub := brokertest.Dial(t, addr, persistent("console-sub"))
	sub.SubscribeT(t, paho.SubscribeOptions{Topic: "c/#", QoS: 1}, paho.SubscribeOptions{Topic: "d/+", QoS: 0})
	pub := brokertest.Dial(t, addr, &paho.Connect{ClientID: "console-pub", CleanStart: true, KeepAlive: 20})
	for range 5 {
		pub.PublishT(t, &paho.Publish{Topic: "c/x", QoS: 1, Payload: []byte("hello")})
	}
	sub.WaitMessages(t, 5, 10*time.Second)

	list := s.Clients()
	if len(list) != 2 || list[0].ID != "console-pub" || list[1].ID != "console-sub" {
		t.Fatalf("clients: %+v", list)
	}
	p, c := list[0], list[1]
	if !p.Connected || p.MessagesIn != 5 || p.BytesIn == 0 || !p.CleanStart || p.KeepAlive != 20*time.Second || p.ProtocolVersion != 5 || p.Listener != "tcp" {
		t.Fatalf("publisher: %+v", p)
	}
	if c.MessagesOut != 5 || c.BytesOut == 0 || c.Subscriptions != 2 || !c.Persistent || c.SessionExpiry != time.Hour || c.CleanStart {
		t.Fatalf("subscriber: %+v", c)
	}
	if time.Since(c.ConnectedAt) > time.Minute || c.Remote == "" {
		t.Fatalf("subscriber connection: %+v", c)
	}
	_, subs, ok := s.Client("console-sub")
	if !ok || len(subs) != 2 || subs[0].Filter != "c/#" || subs[0].QoS != 1 || subs[1].Filter != "d/+" {
		t.Fatalf("subscriptions: %+v", subs)
	}

	// Kick: v5 DISCONNECT 0x98; the persistent session stays and queues.
	if !s.Kick("console-sub", false) {
		t.Fatal("kick: no such client")
	}
	brokertest.WaitFor(t, 10*time.Second, "the kicked client's DISCONNECT", func() bool { return sub.ServerDisconnect() != nil })
	if d := sub.ServerDisconnect(); d.ReasonCode != 0x98 {
		t.Fatalf("kicked client got %+v, want DISCONNECT 0x98", d)
	}
	pub.PublishT(t, &paho.Publish{Topic: "c/x", QoS: 1, Payload: []byte("while away")})
	d, _, ok := s.Client("console-sub")
	if !ok || d.Connected || d.Queued != 1 || d.ExpiresAt.IsZero() {
		t.Fatalf("after the kick: %+v %v", d, ok)
	}
	// Kick and discard: the session, its queue and subscriptions go.
	if !s.Kick("console-sub", true) {
		t.Fatal("discard: no such client")
	}
	if _, _, ok := s.Client("console-sub"); ok {
		t.Fatal("the session is still there after kick and discard")
	}
	back := brokertest.Dial(t, addr, persistent("console-sub"))
	if back.Connack.SessionPresent {
		t.Fatal("a discarded session came back")
	}
	if s.Kick("nobody", true) {
		t.Fatal("kicked a client that does not exist")
	}
}
