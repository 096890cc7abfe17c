package storage

import (
	"runtime"
	"testing"
	"time"
	"unsafe"
)

func TestEntryQueue(t *testing.T) {
	var q entryQueue
	next, front := uint64(1), uint64(1)
	// Grow and shrink across chunk boundaries several times.
	for round, n := range []int{1, logChunk - 1, 3*logChunk + 7, 10, 2 * logChunk, 0} {
		for i := 0; i < n; i++ {
			q.push(logEntry{seq: next * 2}) // even seqs: odd ones are absent
			next++
		}
		if q.len() != int(next-front) {
			t.Fatalf("round %d: len %d, want %d", round, q.len(), next-front)
		}
		for _, s := range []uint64{front * 2, (next - 1) * 2, (front+next)/2*2 + 1, 0, next * 2} {
			want := s%2 == 0 && s >= front*2 && s < next*2
			if q.contains(s) != want {
				t.Fatalf("round %d: contains(%d) = %v", round, s, !want)
			}
		}
		for i := 0; i < q.len()/2+1 && q.len() > 0; i++ {
			if got := q.front().seq; got != front*2 {
				t.Fatalf("round %d: front %d, want %d", round, got, front*2)
			}
			q.pop()
			front++
		}
	}
	for q.len() > 0 {
		q.pop()
	}
	if len(q.chunks) > 1 {
		t.Fatalf("an empty queue holds %d chunks", len(q.chunks))
	}
}

func TestLogEntry(t *testing.T) {
	if s := unsafe.Sizeof(logEntry{}); s != 16 {
		t.Fatalf("logEntry is %d bytes", s)
	}
	if s := unsafe.Sizeof(refState{}); s != 12 {
		t.Fatalf("refState is %d bytes", s)
	}
	tm := time.Unix(100, 1).UnixNano()
	e := newLogEntry(1, tm, 1<<40)
	if e.sec != 101 || e.size != 1<<32-1 {
		t.Fatalf("entry %+v", e)
	}
	if e.olderThan(time.Unix(101, 0).UnixNano()) || !e.olderThan(time.Unix(101, 1).UnixNano()) {
		t.Fatal("age rounds the wrong way")
	}
	if e := newLogEntry(1, -5, 0); e.sec != 0 {
		t.Fatalf("time before 1970: %+v", e)
	}
	if e := newLogEntry(1, 1<<62, 0); e.sec != 1<<32-1 {
		t.Fatalf("time after 2106: %+v", e)
	}
}

// TestLogIndexMemory measures the bytes the index costs per record: a
// rule's queue, and the reference map for records that are referenced or
// not yet released.
func TestLogIndexMemory(t *testing.T) {
	if testing.Short() {
		t.Skip("allocates")
	}
	const n = 1 << 20
	heap := func() uint64 {
		runtime.GC()
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		return ms.HeapAlloc
	}
	before := heap()
	var q entryQueue
	for i := 0; i < n; i++ {
		q.push(logEntry{seq: uint64(i)})
	}
	queue := float64(heap()-before) / n
	before = heap()
	refs := map[uint64]refState{}
	for i := 0; i < n; i++ {
		refs[uint64(i)] = refState{n: 1}
	}
	ref := float64(heap()-before) / n
	t.Logf("index: %.1f B per retained record, %.1f B per referenced one", queue, ref)
	if queue > 17 {
		t.Errorf("queue costs %.1f B per record", queue)
	}
	runtime.KeepAlive(&q)
	runtime.KeepAlive(refs)
}
