package storage

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"
)

// mountTmpfs mounts a small real filesystem (root only; in CI a failure
// to mount fails the test).
func mountTmpfs(t *testing.T, size int64) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "vol")
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Mount("tmpfs", dir, "tmpfs", 0, fmt.Sprintf("size=%d", size)); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("mount a tmpfs (the test needs root): %v", err)
		}
		t.Skipf("cannot mount a tmpfs here: %v", err)
	}
	t.Cleanup(func() { _ = syscall.Unmount(dir, syscall.MNT_DETACH) })
	return dir
}

// TestVolumeFilledBehindTheStore fills the volume from outside faster
// than the store looks at it, then writes past a memtable: badger must
// get its next memtable (the emergency space), the writes are refused as
// a SpaceError, reads keep working, nothing crashes, and writes resume
// once space is freed.
func TestVolumeFilledBehindTheStore(t *testing.T) {
	vol := mountTmpfs(t, 64<<20)
	d, err := Open(Options{Dir: filepath.Join(vol, "data"), SpaceInterval: time.Hour}) // no look at the volume but the one at open
	if err != nil {
		t.Fatal(err)
	}
	defer d.Shutdown(context.Background())
	if err := d.Write(Set([]byte("k-first"), []byte("v"))); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(vol, "data", spareFile)); err != nil {
		t.Fatalf("no emergency space: %v", err)
	}
	// Another process takes every byte.
	filler := filepath.Join(vol, "filler")
	f, err := os.Create(filler)
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 1<<20)
	for {
		if _, err := f.Write(buf); err != nil {
			break
		}
	}
	f.Close()

	// Twice a memtable of small values: badger must rotate its memtable.
	val := make([]byte, 1000)
	refused := 0
	for i := range int(3 * d.memtable / 1000) {
		err := d.Write(Set([]byte(fmt.Sprintf("k%06d", i)), val))
		var se *SpaceError
		switch {
		case err == nil:
		case errors.As(err, &se):
			refused++
		default:
			t.Fatalf("write %d: %v", i, err)
		}
	}
	if refused == 0 {
		t.Fatal("no write was refused on a full volume")
	}
	if v, err := d.Get([]byte("k-first")); err != nil || string(v) != "v" {
		t.Fatalf("read on a full volume: %q %v", v, err)
	}
	if !d.Space().Low {
		t.Fatal("the store does not say it is low")
	}
	if err := d.Room(100); err == nil {
		t.Fatal("Room admits new data on a full volume")
	}
	t.Logf("%d of the writes refused; the emergency space kept badger going", refused)

	// Space returns: the store makes its spare again and accepts writes.
	if err := os.Remove(filler); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		d.space.kick <- struct{}{}
		time.Sleep(20 * time.Millisecond)
		if d.Room(100) == nil && d.Write(Set([]byte("k-after"), val)) == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("writes did not resume after space returned: %+v", d.Space())
		}
	}
	if _, err := os.Stat(filepath.Join(vol, "data", spareFile)); err != nil {
		t.Fatalf("the emergency space was not made again: %v", err)
	}
}
