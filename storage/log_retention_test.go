package storage_test

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/beaconmq/beacon/storage"
)

func TestLogRetention(t *testing.T) {
	type step struct {
		topic   string
		payload int           // bytes
		advance time.Duration // clock advance before the append
	}
	tests := []struct {
		name  string
		rules []storage.LogRule
		steps []step
		after time.Duration // clock advance after the appends
		want  []uint64
	}{
		{
			name:  "count",
			rules: []storage.LogRule{{Filter: "a/#", MaxMessages: 3}},
			steps: []step{{topic: "a/1"}, {topic: "a/2"}, {topic: "a"}, {topic: "a/3"}, {topic: "a/4"}},
			want:  seqs(3, 5),
		},
		{
			name:  "bytes",
			rules: []storage.LogRule{{Filter: "b/+", MaxBytes: 3 * (3 + 10)}},
			steps: []step{{topic: "b/1", payload: 10}, {topic: "b/2", payload: 10}, {topic: "b/3", payload: 10}, {topic: "b/4", payload: 10}},
			want:  seqs(2, 4),
		},
		{
			name:  "bytes larger than the limit",
			rules: []storage.LogRule{{Filter: "b", MaxBytes: 5}},
			steps: []step{{topic: "b", payload: 1}, {topic: "b", payload: 10}},
			want:  nil,
		},
		{
			name:  "age",
			rules: []storage.LogRule{{Filter: "#", MaxAge: time.Minute}},
			steps: []step{{topic: "x"}, {topic: "x", advance: 30 * time.Second}, {topic: "x", advance: 20 * time.Second}},
			after: 15 * time.Second, // ages 65s, 35s, 15s
			want:  seqs(2, 3),
		},
		{
			name:  "age exactly at the limit is kept",
			rules: []storage.LogRule{{Filter: "#", MaxAge: time.Minute}},
			steps: []step{{topic: "x"}},
			after: time.Minute,
			want:  []uint64{1},
		},
		{
			name: "first matching rule wins",
			rules: []storage.LogRule{
				{Filter: "s/important", MaxMessages: 10},
				{Filter: "s/#", MaxMessages: 1},
			},
			steps: []step{{topic: "s/important"}, {topic: "s/x"}, {topic: "s/important"}, {topic: "s/y"}},
			want:  []uint64{1, 3, 4},
		},
		{
			name:  "no rule: deleted once released",
			rules: []storage.LogRule{{Filter: "kept"}},
			steps: []step{{topic: "kept"}, {topic: "other"}, {topic: "$SYS/x"}},
			want:  []uint64{1},
		},
		{
			name:  "wildcard rules do not take $ topics",
			rules: []storage.LogRule{{Filter: "#"}},
			steps: []step{{topic: "$SYS/x"}, {topic: "y"}},
			want:  []uint64{2},
		},
		{
			name:  "no limits keeps all",
			rules: []storage.LogRule{{Filter: "#"}},
			steps: []step{{topic: "a"}, {topic: "b", advance: 1000 * time.Hour}},
			want:  seqs(1, 2),
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			clock := newFakeClock()
			db := openLogDB(t, t.TempDir(), storage.SyncBatch)
			l := openLog(t, db, storage.LogOptions{Rules: tc.rules, Now: clock.Now})
			l.StartTrimming()
			for _, s := range tc.steps {
				clock.Advance(s.advance)
				seq := appendMsg(t, l, s.topic, strings.Repeat("p", s.payload))
				l.Release(seq) // routed to nobody
			}
			clock.Advance(tc.after)
			l.TrimNow()
			barrier(t, db)
			if got := stored(t, l); !slices.Equal(got, tc.want) {
				t.Fatalf("stored %v, want %v", got, tc.want)
			}
			st := l.Stats()
			if st.Stored != len(tc.want) || st.Trimmed != int64(len(tc.steps)-len(tc.want)) || st.Referenced != 0 {
				t.Fatalf("stats %+v", st)
			}
			var bytes int64
			for _, seq := range tc.want {
				m, err := l.Get(seq)
				if err != nil {
					t.Fatal(err)
				}
				bytes += int64(m.Size())
			}
			if st.Bytes != bytes {
				t.Fatalf("stats bytes %d, want %d", st.Bytes, bytes)
			}
		})
	}
}

// TestLogAgeTrimmer: the trimmer goroutine applies age limits by itself.
func TestLogAgeTrimmer(t *testing.T) {
	clock := newFakeClock()
	db := openLogDB(t, t.TempDir(), storage.SyncBatch)
	l := openLog(t, db, storage.LogOptions{Rules: []storage.LogRule{{Filter: "#", MaxAge: time.Hour}}, Now: clock.Now})
	l.StartTrimming()
	for i := 0; i < 3; i++ {
		l.Release(appendMsg(t, l, "t", "x"))
	}
	clock.Advance(2 * time.Hour)
	checkFor(t, 5*time.Second, 50*time.Millisecond, func() error {
		if got := stored(t, l); len(got) != 0 {
			return fmt.Errorf("still stored: %v", got)
		}
		return nil
	})
	if o := l.Oldest(); o != 4 {
		t.Fatalf("oldest %d, want 4", o)
	}
}

func TestLogReferences(t *testing.T) {
	db := openLogDB(t, t.TempDir(), storage.SyncBatch)
	l := openLog(t, db, storage.LogOptions{Rules: []storage.LogRule{{Filter: "r/#", MaxMessages: 2}}})
	l.StartTrimming()
	settle := func() { t.Helper(); l.TrimNow(); barrier(t, db) }
	has := func(seq uint64) bool {
		t.Helper()
		_, err := l.Get(seq)
		if err != nil && !errors.Is(err, storage.ErrLogNotFound) {
			t.Fatal(err)
		}
		return err == nil
	}

	// A referenced record outlives its rule's retention.
	r1 := appendMsg(t, l, "r/1", "a")
	first := l.TryRef(r1)
	if second := l.TryRef(r1); !first || !second { // two sessions
		t.Fatal("ref of a stored record failed")
	}
	l.Release(r1)
	for i := 0; i < 3; i++ {
		l.Release(appendMsg(t, l, "r/x", "b"))
	}
	settle()
	if !has(r1) {
		t.Fatal("referenced record trimmed")
	}
	if got := stored(t, l); !slices.Equal(got, []uint64{r1, 3, 4}) {
		t.Fatalf("stored %v", got)
	}
	if st := l.Stats(); st.Rules[0].Stored != 2 || st.Stored != 3 {
		t.Fatalf("the kept record counts against its rule: %+v", st)
	}
	l.Unref(r1)
	settle()
	if !has(r1) {
		t.Fatal("deleted with a reference left")
	}
	l.Unref(r1)
	settle()
	if has(r1) {
		t.Fatal("not deleted after the last unref")
	}
	if l.TryRef(r1) {
		t.Fatal("ref of a deleted record succeeded")
	}

	// A record of no rule: kept until released, then while referenced.
	q := appendMsg(t, l, "queue/only", "c")
	settle()
	if !has(q) {
		t.Fatal("rule-less record deleted before release")
	}
	if !l.TryRef(q) {
		t.Fatal("ref failed")
	}
	l.Release(q)
	settle()
	if !has(q) {
		t.Fatal("referenced rule-less record deleted")
	}
	l.Unref(q)
	settle()
	if has(q) {
		t.Fatal("rule-less record kept after its last unref")
	}

	// Released with no reference: deleted at once.
	q2 := appendMsg(t, l, "queue/only", "d")
	l.Release(q2)
	settle()
	if has(q2) {
		t.Fatal("unreferenced released rule-less record kept")
	}

	// Not even a count limit removes a record that is not yet released.
	var pend []uint64
	for i := 0; i < 4; i++ {
		pend = append(pend, appendMsg(t, l, "r/p", "e"))
	}
	settle()
	for _, seq := range pend {
		if !has(seq) {
			t.Fatalf("unreleased record %d trimmed", seq)
		}
	}
	for _, seq := range pend {
		l.Release(seq)
	}
	settle()
	if got := stored(t, l); !slices.Equal(got, pend[2:]) {
		t.Fatalf("stored %v, want %v", got, pend[2:])
	}

	// Refs of a record in its rule's retention with no map entry.
	last := pend[3]
	if !l.TryRef(last) {
		t.Fatal("ref of a retained record failed")
	}
	l.Unref(last)

	// Strays are counted, never panic or go negative.
	n := l.Number(&storage.LogMessage{Topic: "r/live"})
	if l.TryRef(n) {
		t.Fatal("ref of a numbered (never stored) seq succeeded")
	}
	l.Unref(n)
	l.Unref(last)
	l.Release(last) // released already
	if st := l.Stats(); st.Strays != 3 || st.Referenced != 0 || st.Pending != 0 {
		t.Fatalf("stats %+v", st)
	}
	if !has(last) {
		t.Fatal("stray unref deleted a retained record")
	}
}

// TestLogStartTrimmingGate: after a restart nothing is deleted before
// StartTrimming; then only what no restored reference holds.
func TestLogStartTrimmingGate(t *testing.T) {
	dir := t.TempDir()
	rules := []storage.LogRule{{Filter: "r", MaxMessages: 2}}
	db, err := storage.Open(storage.Options{Dir: dir})
	if err != nil {
		t.Fatal(err)
	}
	l, err := storage.OpenLog(db, storage.LogOptions{Rules: []storage.LogRule{{Filter: "r"}}}) // no limit yet
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 5; i++ {
		appendMsg(t, l, "r", "")
	}
	appendMsg(t, l, "q", "") // 6: queued for a session
	appendMsg(t, l, "q", "") // 7: nobody
	_ = l.Shutdown(context.Background())
	if err := db.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}

	db = openLogDB(t, dir, storage.SyncBatch)
	l = openLog(t, db, storage.LogOptions{Rules: rules})
	if st := l.Stats(); st.Stored != 7 || st.Rules[0].Stored != 5 || st.Pending != 0 {
		t.Fatalf("after open: %+v", st)
	}
	s8 := appendMsg(t, l, "r", "") // appends happen (after the reserved block)
	l.Release(s8)
	l.TrimNow()
	barrier(t, db)
	if got := stored(t, l); !slices.Equal(got, append(seqs(1, 7), s8)) {
		t.Fatalf("deleted before StartTrimming: %v", got)
	}
	// Sessions restore their references.
	if !l.TryRef(6) || !l.TryRef(2) || !l.TryRef(7) {
		t.Fatal("restoring a ref failed")
	}
	l.Unref(7) // a session that dropped it
	l.TrimNow()
	barrier(t, db)
	if got := stored(t, l); !slices.Equal(got, append(seqs(1, 7), s8)) {
		t.Fatalf("deleted before StartTrimming: %v", got)
	}
	l.StartTrimming()
	l.StartTrimming() // idempotent
	checkFor(t, 5*time.Second, 20*time.Millisecond, func() error {
		barrier(t, db)
		if got, want := stored(t, l), []uint64{2, 5, 6, s8}; !slices.Equal(got, want) {
			return fmt.Errorf("stored %v, want %v", got, want)
		}
		return nil
	})
	l.Unref(2)
	l.Unref(6)
	checkFor(t, 5*time.Second, 20*time.Millisecond, func() error {
		barrier(t, db)
		if got, want := stored(t, l), []uint64{5, s8}; !slices.Equal(got, want) {
			return fmt.Errorf("stored %v, want %v", got, want)
		}
		return nil
	})
}

func TestLogOldest(t *testing.T) {
	dir := t.TempDir()
	rules := []storage.LogRule{
		{Filter: "fast/#", MaxMessages: 1},
		{Filter: "slow/#", MaxMessages: 100},
	}
	db, err := storage.Open(storage.Options{Dir: dir})
	if err != nil {
		t.Fatal(err)
	}
	l, err := storage.OpenLog(db, storage.LogOptions{Rules: rules})
	if err != nil {
		t.Fatal(err)
	}
	l.StartTrimming()
	if l.Oldest() != 1 {
		t.Fatalf("oldest of an empty log %d", l.Oldest())
	}
	l.Release(appendMsg(t, l, "slow/1", "")) // 1
	l.Release(appendMsg(t, l, "fast/1", "")) // 2
	l.Release(appendMsg(t, l, "fast/2", "")) // 3: trims 2
	l.Release(appendMsg(t, l, "nobody", "")) // 4: no rule, no gap
	l.Release(appendMsg(t, l, "fast/3", "")) // 5: trims 3
	l.Release(appendMsg(t, l, "slow/2", "")) // 6
	tests := []struct {
		filters []string
		want    uint64
	}{
		{nil, 1},
		{[]string{"slow/#"}, 1},
		{[]string{"fast/1"}, 4},
		{[]string{"slow/1", "fast/+"}, 4},
		{[]string{"#"}, 4},
		{[]string{"other"}, 1},
	}
	for _, tc := range tests {
		if got := l.OldestFor(tc.filters...); got != tc.want {
			t.Errorf("OldestFor(%q) = %d, want %d", tc.filters, got, tc.want)
		}
	}
	if l.Oldest() != 4 {
		t.Fatalf("oldest %d, want 4", l.Oldest())
	}
	for filter, want := range map[string]bool{"fast/#": true, "slow/a/b": true, "#": false, "nobody": false, "fast": true, "slow": true, "other/#": false} {
		if got := l.Retains(filter); got != want {
			t.Errorf("Retains(%q) = %v", filter, got)
		}
	}
	_ = l.Shutdown(context.Background())
	if err := db.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
	// The mark survives a restart; every rule counts as trimmed up to it.
	db = openLogDB(t, dir, storage.SyncBatch)
	l = openLog(t, db, storage.LogOptions{Rules: rules})
	if l.Oldest() != 4 || l.OldestFor("slow/#") != 4 {
		t.Fatalf("after restart: oldest %d, slow %d", l.Oldest(), l.OldestFor("slow/#"))
	}
}

// TestLogBlockRetention: count, age and byte limits trim records one by
// one inside a block: a trimmed record of a block that still holds others
// is gone for Get and Read, and the block's key goes with its last record.
func TestLogBlockRetention(t *testing.T) {
	const payload = 10
	size := int64(len("t/x") + payload)
	tests := []struct {
		name string
		rule storage.LogRule
		old  bool          // the first five records of the first batch are two minutes old
		gap  time.Duration // clock advance before the second batch
		want []uint64      // stored after the second batch
	}{
		{name: "count", rule: storage.LogRule{Filter: "t/#", MaxMessages: 5}, want: seqs(16, 20)},
		{name: "bytes", rule: storage.LogRule{Filter: "t/#", MaxBytes: 5 * size}, want: seqs(16, 20)},
		{name: "age", rule: storage.LogRule{Filter: "t/#", MaxAge: time.Minute}, old: true, gap: 2 * time.Minute, want: seqs(11, 20)},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			clock := newFakeClock()
			db := openLogDB(t, t.TempDir(), storage.SyncBatch)
			l := openLog(t, db, storage.LogOptions{Rules: []storage.LogRule{tc.rule}, Now: clock.Now})
			l.StartTrimming()
			batch := func(old bool) {
				t.Helper()
				var ms []*storage.LogMessage
				for i := 0; i < 10; i++ {
					m := &storage.LogMessage{Topic: "t/x", Payload: make([]byte, payload)}
					if old && i < 5 {
						m.Time = clock.Now().Add(-2 * time.Minute).UnixNano()
					}
					ms = append(ms, m)
				}
				if err := l.AppendBatch(ms); err != nil {
					t.Fatal(err)
				}
				for _, m := range ms {
					l.Release(m.Seq)
				}
				l.TrimNow()
				barrier(t, db)
			}
			batch(tc.old)
			if got := blockFirsts(t, db); !slices.Equal(got, []uint64{1}) {
				t.Fatalf("blocks %v, want one from 1", got)
			}
			if got := stored(t, l); !slices.Equal(got, seqs(6, 10)) {
				t.Fatalf("stored %v after the first batch", got)
			}
			for seq := uint64(1); seq <= 10; seq++ {
				_, err := l.Get(seq)
				if trimmed := seq <= 5; trimmed != errors.Is(err, storage.ErrLogNotFound) || !trimmed && err != nil {
					t.Fatalf("get %d of the live block: %v", seq, err)
				}
			}
			if l.TryRef(3) {
				t.Fatal("ref of a trimmed record in a live block")
			}
			var got []uint64
			if err := l.Read(2, 8, func(m *storage.LogMessage) bool { got = append(got, m.Seq); return true }); err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(got, seqs(6, 8)) {
				t.Fatalf("read (2, 8] of a partly trimmed block: %v", got)
			}

			clock.Advance(tc.gap)
			batch(false)
			if got := blockFirsts(t, db); !slices.Equal(got, []uint64{11}) {
				t.Fatalf("blocks %v, want the first gone with its last record", got)
			}
			if got := stored(t, l); !slices.Equal(got, tc.want) {
				t.Fatalf("stored %v, want %v", got, tc.want)
			}
			if st := l.Stats(); st.Stored != len(tc.want) || st.Trimmed != int64(20-len(tc.want)) {
				t.Fatalf("stats %+v", st)
			}
		})
	}
}

// TestLogBlockReference: a referenced record keeps its block, all of whose
// other records are gone; its last Unref deletes the block.
func TestLogBlockReference(t *testing.T) {
	db := openLogDB(t, t.TempDir(), storage.SyncBatch)
	l := openLog(t, db, storage.LogOptions{Rules: []storage.LogRule{{Filter: "#", MaxMessages: 2}}})
	l.StartTrimming()
	batch := func(ref uint64) {
		t.Helper()
		var ms []*storage.LogMessage
		for i := 0; i < 5; i++ {
			ms = append(ms, &storage.LogMessage{Topic: "r", Payload: []byte{byte(i)}})
		}
		if err := l.AppendBatch(ms); err != nil {
			t.Fatal(err)
		}
		for _, m := range ms {
			if m.Seq == ref {
				l.Ref(m.Seq) // a session queues it
			}
			l.Release(m.Seq)
		}
		l.TrimNow()
		barrier(t, db)
	}
	batch(3)
	batch(0)
	if got := blockFirsts(t, db); !slices.Equal(got, []uint64{1, 6}) {
		t.Fatalf("blocks %v", got)
	}
	if got := stored(t, l); !slices.Equal(got, []uint64{3, 9, 10}) {
		t.Fatalf("stored %v", got)
	}
	if m, err := l.Get(3); err != nil || m.Payload[0] != 2 {
		t.Fatalf("get of the referenced record: %v", err)
	}
	if _, err := l.Get(4); !errors.Is(err, storage.ErrLogNotFound) {
		t.Fatalf("get of a trimmed record beside it: %v", err)
	}
	l.Unref(3)
	l.TrimNow()
	barrier(t, db)
	if got := blockFirsts(t, db); !slices.Equal(got, []uint64{6}) {
		t.Fatalf("blocks %v after the last unref", got)
	}
	if _, err := l.Get(3); !errors.Is(err, storage.ErrLogNotFound) {
		t.Fatalf("get after the last unref: %v", err)
	}
}

// TestLogGetOfTrimmedInCachedBlock: a block Get has kept does not serve a
// record trimmed since.
func TestLogGetOfTrimmedInCachedBlock(t *testing.T) {
	db := openLogDB(t, t.TempDir(), storage.SyncBatch)
	l := openLog(t, db, storage.LogOptions{Rules: []storage.LogRule{{Filter: "#", MaxMessages: 5}}})
	l.StartTrimming()
	var ms []*storage.LogMessage
	for i := 0; i < 10; i++ {
		ms = append(ms, &storage.LogMessage{Topic: "c", Payload: []byte{byte(i)}})
	}
	if err := l.AppendBatch(ms); err != nil {
		t.Fatal(err)
	}
	for _, seq := range []uint64{1, 2, 3} { // the block is kept from the second on
		if m, err := l.Get(seq); err != nil || m.Payload[0] != byte(seq-1) {
			t.Fatalf("get %d: %v", seq, err)
		}
	}
	for _, m := range ms {
		l.Release(m.Seq)
	}
	l.TrimNow()
	barrier(t, db)
	for seq := uint64(1); seq <= 10; seq++ {
		m, err := l.Get(seq)
		switch {
		case seq <= 5 && !errors.Is(err, storage.ErrLogNotFound):
			t.Fatalf("get %d, trimmed: %v", seq, err)
		case seq > 5 && (err != nil || m.Payload[0] != byte(seq-1)):
			t.Fatalf("get %d: %v", seq, err)
		}
	}
}

// TestLogSingleRecordBlocks: appends that do not meet are blocks of one
// record, which the index holds no ref for; retention deletes them by
// their seq, before and after a reopen.
func TestLogSingleRecordBlocks(t *testing.T) {
	dir := t.TempDir()
	db, err := storage.Open(storage.Options{Dir: dir})
	if err != nil {
		t.Fatal(err)
	}
	rules := []storage.LogRule{{Filter: "#", MaxMessages: 10}}
	l, err := storage.OpenLog(db, storage.LogOptions{Rules: rules})
	if err != nil {
		t.Fatal(err)
	}
	l.StartTrimming()
	for i := 0; i < 30; i++ { // each waits for its commit: the next is a new block
		l.Release(appendMsg(t, l, "s", strconv.Itoa(i)))
	}
	if n := storage.LogBlockRefs(l); n > 1 {
		t.Fatalf("%d block refs for blocks of one record", n)
	}
	l.TrimNow()
	barrier(t, db)
	if got, want := blockFirsts(t, db), seqs(21, 30); !slices.Equal(got, want) {
		t.Fatalf("blocks %v, want %v", got, want)
	}
	var ms []*storage.LogMessage
	for i := 0; i < 5; i++ {
		ms = append(ms, &storage.LogMessage{Topic: "s", Payload: []byte{byte(i)}})
	}
	if err := l.AppendBatch(ms); err != nil { // 31..35, one block
		t.Fatal(err)
	}
	_ = l.Shutdown(context.Background())
	if err := db.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}

	db = openLogDB(t, dir, storage.SyncBatch)
	l = openLog(t, db, storage.LogOptions{Rules: rules})
	if n := storage.LogBlockRefs(l); n != 1 {
		t.Fatalf("%d block refs after reopen, want 1 (the batch's)", n)
	}
	if got := stored(t, l); !slices.Equal(got, seqs(26, 35)) { // the batch trimmed 21..25
		t.Fatalf("stored %v", got)
	}
	l.StartTrimming()
	var after []uint64
	for i := 0; i < 3; i++ {
		seq := appendMsg(t, l, "s", "after")
		l.Release(seq)
		after = append(after, seq)
	}
	l.TrimNow()
	barrier(t, db)
	if got := stored(t, l); !slices.Equal(got, append(seqs(29, 35), after...)) {
		t.Fatalf("stored %v", got)
	}
	if got, want := blockFirsts(t, db), append([]uint64{29, 30, 31}, after...); !slices.Equal(got, want) {
		t.Fatalf("blocks %v, want %v", got, want)
	}
	if _, err := l.Get(25); !errors.Is(err, storage.ErrLogNotFound) {
		t.Fatalf("get of a trimmed one-record block: %v", err)
	}
	if m, err := l.Get(33); err != nil || m.Payload[0] != 2 {
		t.Fatalf("get 33: %v", err)
	}
}
