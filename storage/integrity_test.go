package storage

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
)

// logBuffer is a slog handler's output that tests read.
type logBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

func writeN(t *testing.T, d *DB, n int) {
	t.Helper()
	for i := range n {
		if err := d.Write(Set([]byte(fmt.Sprintf("k%05d", i)), bytes.Repeat([]byte{byte(i)}, 100))); err != nil {
			t.Fatal(err)
		}
	}
}

// copyDir copies a store's files, as a crash would leave them when the
// store is still open (the memtable log not yet flushed).
func copyDir(t *testing.T, src string) string {
	t.Helper()
	dst := t.TempDir()
	entries, err := os.ReadDir(src)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if e.IsDir() || e.Name() == "LOCK" {
			continue
		}
		if err := copyFile(filepath.Join(src, e.Name()), filepath.Join(dst, e.Name())); err != nil {
			t.Fatal(err)
		}
	}
	return dst
}

func memLog(t *testing.T, dir string) string {
	t.Helper()
	f, err := listStore(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range f.logs {
		if strings.HasSuffix(name, ".mem") {
			if fi, _ := os.Stat(filepath.Join(dir, name)); fi.Size() > 0 {
				if d, _ := auditWAL(filepath.Join(dir, name)); d == nil {
					return filepath.Join(dir, name)
				}
			}
		}
	}
	t.Fatalf("no clean memtable log in %s: %v", dir, f.logs)
	return ""
}

func TestWALDamageReported(t *testing.T) {
	// 0xA5 in a value fails its entry's CRC; 0xFF from an entry's start
	// overflows its length varint, which makes badger refuse the log.
	for _, g := range []byte{0xA5, 0xFF} {
		t.Run(fmt.Sprintf("%#x", g), func(t *testing.T) { testWALDamage(t, g) })
	}
}

func testWALDamage(t *testing.T, garbage byte) {
	src := t.TempDir()
	d, err := Open(Options{Dir: src})
	if err != nil {
		t.Fatal(err)
	}
	const n = 300
	writeN(t, d, n)
	crashed := copyDir(t, src) // the directory a SIGKILL would leave
	if err := d.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}

	// A crash alone leaves a log that replays cleanly.
	mem := memLog(t, crashed)
	b, err := os.ReadFile(mem)
	if err != nil {
		t.Fatal(err)
	}
	// 21 bytes of garbage a third of the way in.
	d0, _ := auditWAL(mem)
	if d0 != nil {
		t.Fatalf("clean log reported damaged: %+v", d0)
	}
	end := bytes.LastIndex(b, []byte(walTxnKey)) + 64
	at := walHeaderSize + (end-walHeaderSize)/3
	if garbage == 0xFF {
		// The start of an entry near there.
		for off := walHeaderSize; ; {
			_, _, n := walEntry(b[off:])
			if off+n > at {
				at = off
				break
			}
			off += n
		}
	}
	copy(b[at:], bytes.Repeat([]byte{garbage}, 21))
	if err := os.WriteFile(mem, b, 0o600); err != nil {
		t.Fatal(err)
	}
	dmg, err := auditWAL(mem)
	if err != nil || dmg == nil {
		t.Fatalf("damage not found: %v %+v", err, dmg)
	}
	if dmg.LostWrites < n/2 || dmg.LostWrites > n {
		t.Fatalf("damage a third of the way into %d writes: %d lost writes reported", n, dmg.LostWrites)
	}

	var logs logBuffer
	d2, err := Open(Options{Dir: crashed, Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	if err != nil {
		t.Fatal(err)
	}
	defer d2.Shutdown(context.Background())
	out := logs.String()
	if !strings.Contains(out, "store log damaged") || !strings.Contains(out, fmt.Sprintf("dropped_writes=%d", dmg.LostWrites)) {
		t.Fatalf("open did not report the damage:\n%s", out)
	}
	saved, _ := filepath.Glob(filepath.Join(crashed, "damaged", filepath.Base(mem)+".*"))
	if len(saved) != 1 {
		t.Fatalf("no copy of the damaged log: %v", saved)
	}
	kept := 0
	_ = d2.Scan([]byte("k"), func(_, _ []byte) error { kept++; return nil })
	t.Logf("%d of %d writes readable after the damage; the report said %d dropped", kept, n, dmg.LostWrites)
	if kept+dmg.LostWrites < n-1 || kept+dmg.LostWrites > n {
		t.Fatalf("kept %d + reported lost %d != %d written", kept, dmg.LostWrites, n)
	}
}

func TestDamagedStoreRefused(t *testing.T) {
	make := func(t *testing.T) string {
		dir := t.TempDir()
		d, err := Open(Options{Dir: dir})
		if err != nil {
			t.Fatal(err)
		}
		writeN(t, d, 200)
		if err := d.Shutdown(context.Background()); err != nil { // flushes a table
			t.Fatal(err)
		}
		return dir
	}
	t.Run("manifest removed", func(t *testing.T) {
		dir := make(t)
		if err := os.Remove(filepath.Join(dir, "MANIFEST")); err != nil {
			t.Fatal(err)
		}
		_, err := Open(Options{Dir: dir})
		var de *DamageError
		if !errors.As(err, &de) || de.File != "MANIFEST" {
			t.Fatalf("open without MANIFEST: %v, want a DamageError naming MANIFEST", err)
		}
		if _, err := os.Stat(filepath.Join(dir, "MANIFEST")); err == nil {
			t.Fatal("the refused open created a MANIFEST")
		}
	})
	t.Run("table truncated", func(t *testing.T) {
		dir := make(t)
		tables, _ := filepath.Glob(filepath.Join(dir, "*.sst"))
		if len(tables) == 0 {
			t.Fatal("no table after shutdown")
		}
		fi, _ := os.Stat(tables[0])
		if err := os.Truncate(tables[0], fi.Size()/2); err != nil {
			t.Fatal(err)
		}
		_, err := Open(Options{Dir: dir})
		var de *DamageError
		if !errors.As(err, &de) || de.File != filepath.Base(tables[0]) {
			t.Fatalf("open with a truncated table: %v, want a DamageError naming %s", err, filepath.Base(tables[0]))
		}
	})
	t.Run("table overwritten", func(t *testing.T) {
		dir := make(t)
		tables, _ := filepath.Glob(filepath.Join(dir, "*.sst"))
		b, _ := os.ReadFile(tables[0])
		copy(b[len(b)/3:], bytes.Repeat([]byte{0x5A}, 64))
		if err := os.WriteFile(tables[0], b, 0o600); err != nil {
			t.Fatal(err)
		}
		_, err := Open(Options{Dir: dir})
		var de *DamageError
		if !errors.As(err, &de) {
			t.Fatalf("open with an overwritten table: %v, want a DamageError", err)
		}
	})
	t.Run("new directory", func(t *testing.T) {
		dir := filepath.Join(t.TempDir(), "fresh")
		d, err := Open(Options{Dir: dir})
		if err != nil {
			t.Fatal(err)
		}
		_ = d.Shutdown(context.Background())
		if _, err := os.Stat(filepath.Join(dir, markerFile)); err != nil {
			t.Fatalf("no marker in a new store: %v", err)
		}
	})
}
