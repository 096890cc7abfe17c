package storage_test

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/beaconmq/beacon/storage"
)

// benchMessage is a typical sensor reading.
func benchMessage() *storage.LogMessage {
	return &storage.LogMessage{Topic: "devices/dev-0042/sensors/temperature", Payload: []byte(`{"t":21.5,"h":40}`),
		QoS: 1, Client: "dev-0042", Device: "dev-0042"}
}

// BenchmarkLogAppend appends and releases (routed to nobody), serially
// and from parallel appenders that share group commits. trim=count: a
// full count rule, so every append also deletes the oldest record (the
// steady state of retention); trim=none: a rule without limits.
func BenchmarkLogAppend(b *testing.B) {
	for _, policy := range []storage.SyncPolicy{storage.SyncNone, storage.SyncBatch} {
		for _, trim := range []string{"count", "none"} {
			for _, parallel := range []bool{false, true} {
				mode := "serial"
				if parallel {
					mode = "parallel"
				}
				b.Run(fmt.Sprintf("sync=%s/trim=%s/%s", policy, trim, mode), func(b *testing.B) {
					rule := storage.LogRule{Filter: "devices/#"}
					if trim == "count" {
						rule.MaxMessages = 1000
					}
					db := openLogDB(b, b.TempDir(), policy)
					l := openLog(b, db, storage.LogOptions{Rules: []storage.LogRule{rule}})
					l.StartTrimming()
					for i := 0; i < 2*rule.MaxMessages; i++ { // fill the rule
						seq, err := l.Append(benchMessage())
						if err != nil {
							b.Fatal(err)
						}
						l.Release(seq)
					}
					b.ReportAllocs()
					b.ResetTimer()
					if !parallel {
						for i := 0; i < b.N; i++ {
							seq, err := l.Append(benchMessage())
							if err != nil {
								b.Fatal(err)
							}
							l.Release(seq)
						}
						return
					}
					b.SetParallelism(16) // many connections per core
					b.RunParallel(func(pb *testing.PB) {
						for pb.Next() {
							seq, err := l.Append(benchMessage())
							if err != nil {
								b.Error(err)
								return
							}
							l.Release(seq)
						}
					})
				})
			}
		}
	}
}

// BenchmarkLogNumber numbers messages that are not stored (QoS 0).
func BenchmarkLogNumber(b *testing.B) {
	db := openLogDB(b, b.TempDir(), storage.SyncBatch)
	l := openLog(b, db, storage.LogOptions{})
	m := benchMessage()
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			m := *m
			l.Number(&m)
		}
	})
}

// BenchmarkLogRead replays stored messages (per message).
func BenchmarkLogRead(b *testing.B) {
	const stored = 10_000
	db := openLogDB(b, b.TempDir(), storage.SyncNone)
	l := openLog(b, db, storage.LogOptions{Rules: []storage.LogRule{{Filter: "#"}}})
	ms := make([]*storage.LogMessage, stored)
	for i := range ms {
		ms[i] = benchMessage()
	}
	if err := l.AppendBatch(ms); err != nil {
		b.Fatal(err)
	}
	barrier(b, db)
	b.ReportAllocs()
	b.ResetTimer()
	n := 0
	for n < b.N {
		err := l.Read(0, 0, func(m *storage.LogMessage) bool {
			n++
			return n < b.N
		})
		if err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkLogGet reads one message by seq.
func BenchmarkLogGet(b *testing.B) {
	db := openLogDB(b, b.TempDir(), storage.SyncBatch)
	l := openLog(b, db, storage.LogOptions{})
	seq, err := l.Append(benchMessage())
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if _, err := l.Get(seq); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkLogGetSequential reads stored messages by seq, one after the
// other (a session restoring its queue at startup).
func BenchmarkLogGetSequential(b *testing.B) {
	const stored = 10_000
	db := openLogDB(b, b.TempDir(), storage.SyncNone)
	l := openLog(b, db, storage.LogOptions{Rules: []storage.LogRule{{Filter: "#"}}})
	ms := make([]*storage.LogMessage, stored)
	for i := range ms {
		ms[i] = benchMessage()
	}
	if err := l.AppendBatch(ms); err != nil {
		b.Fatal(err)
	}
	barrier(b, db)
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if _, err := l.Get(uint64(i%stored) + 1); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkLogRefUnref is a session taking and dropping a reference.
func BenchmarkLogRefUnref(b *testing.B) {
	db := openLogDB(b, b.TempDir(), storage.SyncBatch)
	l := openLog(b, db, storage.LogOptions{Rules: []storage.LogRule{{Filter: "#"}}})
	l.StartTrimming()
	seq, err := l.Append(benchMessage())
	if err != nil {
		b.Fatal(err)
	}
	l.Release(seq)
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		l.Ref(seq)
		l.Unref(seq)
	}
}

func BenchmarkEncodeLogMessage(b *testing.B) {
	m := benchMessage()
	buf := make([]byte, 0, 256)
	b.ReportAllocs()
	for i := 0; i < b.N; i++ {
		buf = storage.EncodeLogMessage(buf[:0], m)
	}
}

func BenchmarkDecodeLogMessage(b *testing.B) {
	enc := storage.EncodeLogMessage(nil, benchMessage())
	b.ReportAllocs()
	for i := 0; i < b.N; i++ {
		if _, err := storage.DecodeLogMessage(enc); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkLogAppendQueued64 is the QoS 0 fan-in path: 64-byte payloads
// appended with AppendQueued (not waited for) from 8 goroutines, under
// the default sync policy. trim=count: a full count rule, so retention
// deletes as much as is appended; trim=none: a rule without limits. It
// reports the badger ops (sets and deletes) written per 1,000 messages.
func BenchmarkLogAppendQueued64(b *testing.B) {
	for _, trim := range []string{"none", "count"} {
		b.Run("trim="+trim, func(b *testing.B) {
			rule := storage.LogRule{Filter: "devices/#"}
			if trim == "count" {
				rule.MaxMessages = 10_000
			}
			db := openLogDB(b, b.TempDir(), storage.SyncBatch)
			l := openLog(b, db, storage.LogOptions{Rules: []storage.LogRule{rule}})
			l.StartTrimming()
			payload := make([]byte, 64)
			m := storage.LogMessage{Topic: "devices/dev-0042/sensors/temperature", Payload: payload, Client: "dev-0042"}
			for i := 0; i < 2*rule.MaxMessages; i++ { // fill the rule
				m := m
				seq, err := l.AppendQueued(&m, nil)
				if err != nil {
					b.Fatal(err)
				}
				l.Release(seq)
			}
			barrier(b, db)
			before, cpu0 := db.Stats().Ops, cpuTime()
			b.ReportAllocs()
			b.ResetTimer()
			var wg sync.WaitGroup
			var next atomic.Int64
			for g := 0; g < 8; g++ {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for next.Add(1) <= int64(b.N) {
						m := m
						seq, err := l.AppendQueued(&m, nil)
						if err != nil {
							b.Error(err)
							return
						}
						l.Release(seq)
					}
				}()
			}
			wg.Wait()
			barrier(b, db)
			b.StopTimer()
			b.ReportMetric(float64(cpuTime()-cpu0)/float64(b.N), "cpu-ns/op")
			if trim == "count" {
				// Let the trimmer's deletes of this run land before counting.
				checkFor(b, 10*time.Second, 5*time.Millisecond, func() error {
					if st := l.Stats(); st.Stored > rule.MaxMessages {
						return fmt.Errorf("%d stored", st.Stored)
					}
					return nil
				})
				l.Shutdown(context.Background()) //nolint:errcheck // queues the last deletes
				barrier(b, db)
			}
			b.ReportMetric(float64(db.Stats().Ops-before)*1000/float64(b.N), "ops/1k-msgs")
		})
	}
}
