package hooks

import (
	"context"
	"fmt"
	"log/slog"
	"sync/atomic"
	"testing"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/beaconmq/beacon/storage"
)

// BenchmarkStorePublish measures what the store hook adds to one accepted
// QoS 1 message: the durable ingress write before the acknowledgement
// (OnPublish) and the commit of its routing (OnPublished), with 32
// publishers sharing group commits, under each sync policy.
func BenchmarkStorePublish(b *testing.B) {
	for _, policy := range []storage.SyncPolicy{storage.SyncBatch, storage.SyncAlways, storage.SyncNone} {
		b.Run(string(policy), func(b *testing.B) {
			db, err := storage.Open(storage.Options{Dir: b.TempDir(), Sync: policy, Logger: slog.New(slog.DiscardHandler)})
			if err != nil {
				b.Fatal(err)
			}
			defer db.Shutdown(context.Background())
			srv := mqtt.New(&mqtt.Options{Logger: slog.New(slog.DiscardHandler)})
			h := NewStore(StoreOptions{DB: db, MaxSessionExpiry: 3600, Server: srv})
			h.SetOpts(slog.New(slog.DiscardHandler), nil)
			var n atomic.Int64
			b.ReportAllocs()
			b.SetParallelism(16)
			b.RunParallel(func(pb *testing.PB) {
				cl := srv.NewClient(nil, "tcp", fmt.Sprintf("pub-%d", n.Add(1)), false)
				cl.Properties.ProtocolVersion = 5
				pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, PacketID: 1,
					TopicName: "bench/x", Payload: make([]byte, 64), ProtocolVersion: 5}
				for pb.Next() {
					out, err := h.OnPublish(cl, pk)
					if err != nil {
						b.Fatal(err)
					}
					h.OnPublished(cl, out)
				}
			})
		})
	}
}
