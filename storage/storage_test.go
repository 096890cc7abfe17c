package storage_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"reflect"
	"sync"
	"testing"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/beaconmq/beacon/storage"
)

func open(t testing.TB, dir string, policy storage.SyncPolicy) *storage.DB {
	t.Helper()
	db, err := storage.Open(storage.Options{Dir: dir, Sync: policy})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = db.Shutdown(context.Background()) })
	return db
}

func count(t testing.TB, db *storage.DB, prefix []byte) int {
	t.Helper()
	n := 0
	if err := db.Scan(prefix, func(_, _ []byte) error { n++; return nil }); err != nil {
		t.Fatal(err)
	}
	return n
}

func TestWritesSurviveReopen(t *testing.T) {
	for _, policy := range []storage.SyncPolicy{storage.SyncAlways, storage.SyncBatch, storage.SyncNone} {
		t.Run(string(policy), func(t *testing.T) {
			dir := t.TempDir()
			db := open(t, dir, policy)
			// Many writers at once share group commits.
			var wg sync.WaitGroup
			for w := range 16 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for i := range 200 {
						key := storage.InflightKey(fmt.Sprintf("client-%d", w), uint16(i+1))
						if err := db.Write(storage.Set(key, []byte("v"))); err != nil {
							t.Error(err)
							return
						}
					}
				}()
			}
			wg.Wait()
			if got := db.Stats().Ops; got < 3200 && policy != storage.SyncNone {
				t.Fatalf("ops written %d, want 3200", got)
			}
			if err := db.Shutdown(context.Background()); err != nil {
				t.Fatal(err)
			}
			if err := db.Write(storage.Set([]byte("x"), nil)); !errors.Is(err, storage.ErrClosed) {
				t.Fatalf("write after shutdown: %v, want ErrClosed", err)
			}
			db = open(t, dir, policy)
			if n := count(t, db, storage.InflightPrefix("")); n != 3200 {
				t.Fatalf("after reopen: %d records, want 3200", n)
			}
			if n := count(t, db, storage.InflightPrefix("client-3")); n != 200 {
				t.Fatalf("client-3: %d records, want 200", n)
			}
		})
	}
}

func TestGroupCommitSharesCommits(t *testing.T) {
	db := open(t, t.TempDir(), storage.SyncAlways)
	var wg sync.WaitGroup
	for w := range 32 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 50 {
				_ = db.Write(storage.Set(fmt.Appendf(nil, "k/%d/%d", w, i), []byte("v")))
			}
		}()
	}
	wg.Wait()
	st := db.Stats()
	t.Logf("%d ops in %d commits", st.Ops, st.Commits)
	if st.Ops != 1600 || st.Commits >= st.Ops {
		t.Fatalf("%d ops in %d commits: writers did not share commits", st.Ops, st.Commits)
	}
}

func TestDeletePrefixAndOrder(t *testing.T) {
	db := open(t, t.TempDir(), storage.SyncBatch)
	var ops []storage.Op
	for i := range 10 {
		ops = append(ops, storage.Set(storage.SubscriptionKey("a", fmt.Sprint("f", i)), []byte("x")))
		ops = append(ops, storage.Set(storage.SubscriptionKey("ab", fmt.Sprint("f", i)), []byte("x")))
	}
	if err := db.Write(ops...); err != nil {
		t.Fatal(err)
	}
	// Async writes commit in order with later ones: the delete wins over the
	// set queued before it.
	db.WriteAsync(storage.Set(storage.ClientKey("a"), []byte("1")))
	db.WriteAsync(storage.Delete(storage.ClientKey("a")))
	if err := db.Write(storage.DeletePrefix(storage.SubscriptionPrefix("a"))); err != nil {
		t.Fatal(err)
	}
	if n := count(t, db, storage.SubscriptionPrefix("a")); n != 0 {
		t.Fatalf("%d subscriptions of a left", n)
	}
	if n := count(t, db, storage.SubscriptionPrefix("ab")); n != 10 {
		t.Fatalf("prefix delete of a touched ab: %d left of 10", n)
	}
	if _, err := db.Get(storage.ClientKey("a")); !errors.Is(err, storage.ErrNotFound) {
		t.Fatalf("client a: %v, want ErrNotFound", err)
	}
}

func TestKeys(t *testing.T) {
	k := storage.InflightKey("dev/1", 513)
	id, ok := storage.SplitInflightKey(k)
	if !ok || id != "dev/1" {
		t.Fatalf("split %q: %q %v", k, id, ok)
	}
	if !bytes.HasPrefix(k, storage.InflightPrefix("dev/1")) || bytes.HasPrefix(k, storage.InflightPrefix("dev")) {
		t.Fatal("inflight prefix must match exactly one client")
	}
	seq, ok := storage.ParseIngressKey(storage.IngressKey(1 << 40))
	if !ok || seq != 1<<40 {
		t.Fatalf("ingress key round trip: %d %v", seq, ok)
	}
	// Ingress keys sort in sequence order.
	if bytes.Compare(storage.IngressKey(255), storage.IngressKey(256)) >= 0 {
		t.Fatal("ingress keys out of order")
	}
}

func samplePackets() []packets.Packet {
	pf := byte(1)
	return []packets.Packet{
		{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, PacketID: 1, TopicName: "a/b", Payload: []byte("hello"), Created: 1700000000},
		{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 2, Retain: true, Dup: true}, PacketID: 65535,
			TopicName: "devices/x/telemetry", Payload: []byte{0, 1, 2, 255}, ProtocolVersion: 5, Created: 1700000001, Expiry: 1700003601,
			Origin: "sensor-1",
			Properties: packets.Properties{PayloadFormat: pf, PayloadFormatFlag: true, MessageExpiryInterval: 3600,
				ContentType: "application/json", ResponseTopic: "reply/here", CorrelationData: []byte{9, 9},
				User:                   []packets.UserProperty{{Key: "k", Val: "v"}, {Key: "k", Val: "w"}},
				SubscriptionIdentifier: []int{1, 268435455}}},
		{FixedHeader: packets.FixedHeader{Type: packets.Pubrec}, PacketID: 7, ProtocolVersion: 4, Created: -5},
		{FixedHeader: packets.FixedHeader{Type: packets.Pubrel, Qos: 1}, PacketID: 8},
	}
}

func TestMessageRoundTrip(t *testing.T) {
	for i, pk := range samplePackets() {
		b := storage.AppendMessage(nil, &pk)
		got, err := storage.DecodeMessage(b)
		if err != nil {
			t.Fatalf("packet %d: %v", i, err)
		}
		if !reflect.DeepEqual(got, pk) {
			t.Fatalf("packet %d:\n got %+v\nwant %+v", i, got, pk)
		}
		// Every truncation is an error, never a panic or a wrong packet.
		for n := range len(b) {
			if _, err := storage.DecodeMessage(b[:n]); err == nil {
				t.Fatalf("packet %d truncated to %d bytes decoded without error", i, n)
			}
		}
	}
}

func FuzzDecodeMessage(f *testing.F) {
	for _, pk := range samplePackets() {
		f.Add(storage.AppendMessage(nil, &pk))
	}
	f.Add([]byte{1, 3, 0, 5, 0, 1})
	f.Fuzz(func(t *testing.T, b []byte) {
		pk, err := storage.DecodeMessage(b)
		if err != nil {
			if !errors.Is(err, storage.ErrCorrupt) {
				t.Fatalf("error %v does not wrap ErrCorrupt", err)
			}
			return
		}
		// What decodes re-encodes to a form that decodes to the same packet.
		again, err := storage.DecodeMessage(storage.AppendMessage(nil, &pk))
		if err != nil || !reflect.DeepEqual(again, pk) {
			t.Fatalf("re-encode: %v\n%+v\n%+v", err, again, pk)
		}
	})
}

func BenchmarkAppendMessage(b *testing.B) {
	pk := samplePackets()[0]
	pk.Payload = make([]byte, 64)
	buf := make([]byte, 0, 256)
	b.ReportAllocs()
	for b.Loop() {
		buf = storage.AppendMessage(buf[:0], &pk)
	}
}

func BenchmarkDecodeMessage(b *testing.B) {
	pk := samplePackets()[0]
	pk.Payload = make([]byte, 64)
	enc := storage.AppendMessage(nil, &pk)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := storage.DecodeMessage(enc); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkWriteParallel measures a durable write (one small record, as
// OnPublish makes for each QoS 1/2 message) with many concurrent writers
// sharing group commits.
func BenchmarkWriteParallel(b *testing.B) {
	for _, policy := range []storage.SyncPolicy{storage.SyncBatch, storage.SyncAlways} {
		b.Run(string(policy), func(b *testing.B) {
			db := open(b, b.TempDir(), policy)
			val := make([]byte, 100)
			var seq uint64
			var mu sync.Mutex
			b.ReportAllocs()
			b.SetParallelism(32)
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					mu.Lock()
					seq++
					k := storage.IngressKey(seq)
					mu.Unlock()
					if err := db.Write(storage.Set(k, val)); err != nil {
						b.Fatal(err)
					}
				}
			})
			st := db.Stats()
			b.ReportMetric(float64(st.Ops)/float64(max(st.Commits, 1)), "ops/commit")
		})
	}
}

// TestLargeGroupsStayAtomic: writes that together exceed one badger
// transaction are committed request by request, each whole; a request too
// large alone fails alone.
func TestLargeGroupsStayAtomic(t *testing.T) {
	db := open(t, t.TempDir(), storage.SyncBatch)
	big := make([]byte, 900<<10)
	var wg sync.WaitGroup
	errs := make([]error, 6)
	for i := range errs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = db.Write(storage.Set(fmt.Appendf(nil, "big/%d/a", i), big), storage.Set(fmt.Appendf(nil, "big/%d/b", i), big))
		}()
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("request %d: %v", i, err)
		}
	}
	if n := count(t, db, []byte("big/")); n != 12 {
		t.Fatalf("%d records, want 12", n)
	}
	// Values from 4 KiB on live in the value log, where a transaction
	// counts only their pointers: a request too large for one is made of
	// values kept inline.
	var ops []storage.Op
	inline := make([]byte, 3<<10)
	for i := range 1024 {
		ops = append(ops, storage.Set(fmt.Appendf(nil, "huge/%d", i), inline))
	}
	if err := db.Write(ops...); err == nil {
		t.Fatal("a 3 MiB request larger than a transaction was accepted")
	}
	if n := count(t, db, []byte("huge/")); n != 0 {
		t.Fatalf("a failed request left %d of its records", n)
	}
	if err := db.Write(storage.Set([]byte("after"), []byte("ok"))); err != nil {
		t.Fatalf("the store after a failed request: %v", err)
	}
}
