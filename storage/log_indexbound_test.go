package storage_test

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/beaconmq/beacon/storage"
)

// LogOptions.MaxIndexBytes bounds the retention index: many distinct
// long topics under rules without a count limit keep the accounted index
// bytes under the bound; the oldest records leave retention first (across
// rules), and a reader from before them is told (Oldest moves).
func TestLogMaxIndexBytes(t *testing.T) {
	const bound = 64 << 10 // 4,096 entries of 16 bytes
	db := openLogDB(t, t.TempDir(), storage.SyncNone)
	l := openLog(t, db, storage.LogOptions{MaxIndexBytes: bound,
		Rules: []storage.LogRule{{Filter: "a/#", MaxAge: time.Hour}, {Filter: "b/#", MaxAge: time.Hour}}})
	l.StartTrimming()
	pad := strings.Repeat("x", 1000)
	const n = 10000
	for i := range n {
		l.Release(appendMsg(t, l, fmt.Sprintf("%c/%d/%s", "ab"[i%2], i, pad), "v"))
		if st := l.Stats(); st.IndexEntryBytes > bound {
			t.Fatalf("after %d appends: %d index bytes, bound %d", i+1, st.IndexEntryBytes, bound)
		}
	}
	checkFor(t, 10*time.Second, 10*time.Millisecond, func() error {
		st := l.Stats()
		if st.Stored > bound/16 || st.IndexBytes <= 0 || st.IndexBytes > 2*bound {
			return fmt.Errorf("stored %d, index %d bytes (entries %d); want at most %d records", st.Stored, st.IndexBytes, st.IndexEntryBytes, bound/16)
		}
		return nil
	})
	// The deletes go within a second (the trimmer's write).
	checkFor(t, 10*time.Second, 10*time.Millisecond, func() error {
		got := stored(t, l)
		if len(got) != bound/16 || got[0] != n-bound/16+1 || got[len(got)-1] != n {
			return fmt.Errorf("stored %d records from %d to %d, want the newest %d", len(got), got[0], got[len(got)-1], bound/16)
		}
		return nil
	})
	if o := l.Oldest(); o != n-bound/16+1 {
		t.Fatalf("Oldest %d, want %d", o, n-bound/16+1)
	}
	if st := l.Stats(); st.IndexEvicted != n-bound/16 {
		t.Fatalf("evicted %d, want %d", st.IndexEvicted, n-bound/16)
	}
}
