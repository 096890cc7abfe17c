package storage_test

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"os"
	"path/filepath"
	"testing"

	"github.com/beaconmq/beacon/storage"
)

// Large values (a message with a long topic or payload) go to the value
// log, not into the LSM tree: inline, every compaction rebuilt them in
// memory (badger's table builders held gigabytes after 20 clients
// published 1,024 messages of 60 KB each).
func TestLargeValuesLeaveTheTree(t *testing.T) {
	dir := t.TempDir()
	db, err := storage.Open(storage.Options{Dir: dir, Sync: storage.SyncNone})
	if err != nil {
		t.Fatal(err)
	}
	for i := range 600 { // 36 MB: more than two memtables
		value := make([]byte, 60<<10)
		_, _ = rand.Read(value) // incompressible
		if err := db.Write(storage.Set(binary.BigEndian.AppendUint64([]byte("big/"), uint64(i)), value)); err != nil {
			t.Fatal(err)
		}
	}
	if err := db.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
	size := func(pattern string) int64 {
		files, _ := filepath.Glob(filepath.Join(dir, pattern))
		var n int64
		for _, f := range files {
			if fi, err := os.Stat(f); err == nil {
				n += fi.Size()
			}
		}
		return n
	}
	sst, vlog := size("*.sst"), size("*.vlog")
	if sst > 4<<20 || vlog < 30<<20 {
		t.Fatalf("tables %d bytes, value log %d bytes: want the 36 MB of values in the value log", sst, vlog)
	}
}
