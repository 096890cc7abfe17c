package storage

import (
	"os"
	"path/filepath"
	"strings"
	"sync"

	"github.com/dgraph-io/ristretto/v2/z"
)

// spareFile is the store's emergency space: a file of allocated blocks
// that the store gives up when badger cannot allocate a file it needs
// (z.NoSpace). Badger that fails to create its next memtable is left
// without one and dies at its next write; with the spare, a volume that
// fills between two looks (another process writing fast) costs refused
// messages, never the process.
const spareFile = "BEACON-SPARE"

// spares maps data directories to their open DB, for z.NoSpace.
var spares struct {
	once sync.Once
	mu   sync.Mutex
	dbs  map[string]*DB
}

func registerSpare(d *DB) {
	spares.once.Do(func() {
		spares.dbs = map[string]*DB{}
		z.NoSpace = func(path string) bool {
			spares.mu.Lock()
			var d *DB
			for dir, db := range spares.dbs {
				if strings.HasPrefix(path, dir+string(filepath.Separator)) {
					d = db
				}
			}
			spares.mu.Unlock()
			return d != nil && d.releaseSpare()
		}
	})
	spares.mu.Lock()
	spares.dbs[filepath.Clean(d.opts.Dir)] = d
	spares.mu.Unlock()
}

func unregisterSpare(d *DB) {
	spares.mu.Lock()
	delete(spares.dbs, filepath.Clean(d.opts.Dir))
	spares.mu.Unlock()
}

// spareSize is what badger may need to allocate at once: a memtable log
// (twice the memtable) and a little.
func (d *DB) spareSize() int64 { return 2*d.memtable + 1<<20 }

// ensureSpare creates the spare when it is missing and the volume is
// above its reserve. Called at open and by the space watcher.
func (d *DB) ensureSpare() {
	d.spareMu.Lock()
	defer d.spareMu.Unlock()
	path := filepath.Join(d.opts.Dir, spareFile)
	if fi, err := os.Stat(path); err == nil && fi.Size() >= d.spareSize() {
		d.spareOK.Store(true)
		return
	}
	if d.readOnly.Load() || d.space.low.Load() {
		return
	}
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY, 0o600)
	if err != nil {
		d.log.Warn("cannot create the store's emergency space", "file", path, "error", err)
		return
	}
	defer f.Close()
	if err := allocateFile(f, d.spareSize()); err != nil {
		_ = os.Remove(path)
		d.log.Warn("cannot allocate the store's emergency space", "file", path, "error", err)
		return
	}
	d.spareOK.Store(true)
	if d.suspended.Swap(false) {
		d.log.Info("the store has its emergency space again: writes resume", "dir", d.opts.Dir)
	}
}

// releaseSpare gives the spare's space to badger: the volume is full.
// New data is refused from now on until the watcher sees room again and
// has made a new spare.
func (d *DB) releaseSpare() bool {
	d.spareMu.Lock()
	defer d.spareMu.Unlock()
	if !d.spareOK.Load() {
		return false
	}
	if err := os.Remove(filepath.Join(d.opts.Dir, spareFile)); err != nil {
		return false
	}
	d.spareOK.Store(false)
	d.suspended.Store(true)
	d.space.low.Store(true)
	select {
	case d.space.kick <- struct{}{}:
	default:
	}
	d.log.Warn("the volume is full: the store gave up its emergency space to keep running; every write (new messages, "+
		"sessions, acknowledgements) is refused until space returns", "dir", d.opts.Dir)
	return true
}

// allocateFile gives f n bytes of allocated blocks (fallocate; a
// filesystem without it gets the bytes written).
func allocateFile(f *os.File, n int64) error {
	if err := fallocate(f, n); err == nil {
		return f.Sync()
	}
	buf := make([]byte, 1<<20)
	for off := int64(0); off < n; off += int64(len(buf)) {
		if _, err := f.WriteAt(buf[:min(int64(len(buf)), n-off)], off); err != nil {
			return err
		}
	}
	return f.Sync()
}
