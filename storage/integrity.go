package storage

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"hash/crc32"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/dgraph-io/badger/v4/options"
	"github.com/dgraph-io/badger/v4/table"
	"github.com/dgraph-io/ristretto/v2/z"
)

// markerFile tells a directory that held a store from a new one: badger
// alone, missing its MANIFEST, would start empty and say nothing.
const markerFile = "BEACON-STORE"

type marker struct {
	Format  int       `json:"format"`
	Created time.Time `json:"created"`
}

// DamageError says why a store is not opened as it is: the file, what is
// wrong with it, and what to do.
type DamageError struct {
	Dir, File, Problem string
}

func (e *DamageError) Error() string {
	return fmt.Sprintf("the store in %s is damaged: %s: %s. Nothing was changed. Restore the directory from a backup, "+
		"or move it away to start with an empty store; `beacon storage verify --data-dir %s` checks it",
		e.Dir, e.File, e.Problem, e.Dir)
}

// storeFiles is what a data directory holds.
type storeFiles struct {
	marker   bool
	manifest bool
	tables   []string // *.sst, sorted
	logs     []string // memtable logs and the newest value log: what badger replays
	data     []string // files that only a store that held data has: tables, value and memtable logs with content
}

func listStore(dir string) (storeFiles, error) {
	var f storeFiles
	vlog := ""
	entries, err := os.ReadDir(dir)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return f, nil
		}
		return f, err
	}
	for _, e := range entries {
		name := e.Name()
		switch {
		case name == markerFile:
			f.marker = true
		case name == "MANIFEST":
			f.manifest = true
		case strings.HasSuffix(name, ".sst"):
			f.tables = append(f.tables, name)
			f.data = append(f.data, name)
		case strings.HasSuffix(name, ".vlog"), strings.HasSuffix(name, ".mem"):
			if fi, err := e.Info(); err == nil && fi.Size() > 0 {
				f.data = append(f.data, name)
				if strings.HasSuffix(name, ".mem") {
					f.logs = append(f.logs, name)
				} else if vlog == "" || name > vlog {
					vlog = name
				}
			}
		}
	}
	if vlog != "" {
		f.logs = append(f.logs, vlog)
	}
	sort.Strings(f.tables)
	return f, nil
}

// checkStore refuses a directory whose store is damaged before badger
// opens it: a MANIFEST missing from a directory that held a store, or a
// table that does not read back (badger would panic, or skip the table and
// lose what it holds). It reads every table once.
func checkStore(dir string) (storeFiles, error) {
	f, err := listStore(dir)
	if err != nil {
		return f, fmt.Errorf("read data directory: %w", err)
	}
	if !f.manifest && (f.marker || len(f.data) > 0) {
		held := "it holds " + strings.Join(firstN(f.data, 3), ", ")
		if f.marker {
			held = "the directory held a store (" + markerFile + ")"
		}
		return f, &DamageError{Dir: dir, File: "MANIFEST", Problem: "missing, but " + held +
			"; opened without it the store would start empty"}
	}
	for _, name := range f.tables {
		if err := verifyTable(filepath.Join(dir, name)); err != nil {
			return f, &DamageError{Dir: dir, File: name, Problem: err.Error()}
		}
	}
	return f, nil
}

func firstN(s []string, n int) []string {
	if len(s) > n {
		return append(s[:n:n], "...")
	}
	return s
}

// verifyTable opens a table file and checks the checksum of every block.
// A damaged file can make badger's reader index out of range: that panic
// is caught here and reported as the damage it is. A table that fails is
// left mapped (badger may or may not have closed it, and unmapping twice
// could unmap someone else's memory): the store is not opened then.
func verifyTable(path string) (err error) {
	mf, err := z.OpenMmapFile(path, os.O_RDONLY, 0)
	if err != nil {
		return fmt.Errorf("cannot open: %w", err)
	}
	if len(mf.Data) == 0 {
		_ = mf.Close(-1)
		return errors.New("empty (truncated)")
	}
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("unreadable (truncated or overwritten): %v", r)
		}
	}()
	t, err := table.OpenTable(mf, table.Options{ChkMode: options.OnTableRead, BlockSize: 4 << 10,
		Compression: options.Snappy, BloomFalsePositive: 0.01})
	if err != nil {
		return fmt.Errorf("checksum or structure does not verify: %w", err)
	}
	return t.Close(-1)
}

// writeMarker records that dir holds a store, once.
func writeMarker(dir string) error {
	b, _ := json.Marshal(marker{Format: 1, Created: time.Now().UTC()})
	path := filepath.Join(dir, markerFile)
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, append(b, '\n'), 0o600); err != nil {
		return err
	}
	if err := syncFile(tmp); err != nil {
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		return err
	}
	return z.SyncDir(dir)
}

func syncFile(path string) error {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	return f.Sync()
}

// walDamage is what a memtable log holds past the last write badger can
// read back: badger replays a log up to the first entry that does not
// verify and drops the rest, silently.
type walDamage struct {
	File       string
	ValidEnd   int // bytes badger keeps
	Dropped    int // bytes from there to the last non-zero byte
	LostWrites int // complete writes (transaction ends) among them
}

// Badger's log entry: meta, user meta, uvarint key length, value length
// and expiry, key, value, then a big-endian CRC-32C of all before it.
const (
	walHeaderSize = 20 // the file's header (key id, IV)
	walBitTxn     = 1 << 6
	walBitFinTxn  = 1 << 7
	walTxnKey     = "!badger!txn"
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// auditWAL reads a memtable log the way badger replays it and reports
// what it would drop; nil when the log ends cleanly.
func auditWAL(path string) (*walDamage, error) {
	b, err := os.ReadFile(path)
	if err != nil || len(b) <= walHeaderSize {
		return nil, err
	}
	off, valid := walHeaderSize, walHeaderSize
	var txn []byte // the commit timestamp of the open transaction's entries
	for {
		meta, key, n := walEntry(b[off:])
		if n == 0 {
			break
		}
		if meta&walBitTxn != 0 {
			if len(key) < 8 || (txn != nil && !bytes.Equal(txn, key[len(key)-8:])) {
				break
			}
			txn = key[len(key)-8:]
		} else if meta&walBitFinTxn != 0 {
			txn, valid = nil, off+n
		} else if txn != nil {
			break
		} else {
			valid = off + n
		}
		off += n
	}
	last := len(b) - 1
	for last >= valid && b[last] == 0 {
		last--
	}
	if last < valid {
		return nil, nil
	}
	tail := b[valid : last+1]
	return &walDamage{File: filepath.Base(path), ValidEnd: valid, Dropped: len(tail),
		LostWrites: bytes.Count(tail, []byte(walTxnKey))}, nil
}

// walEntry parses one log entry at the start of b: its meta, key and
// length; n is 0 when b does not start with an entry that verifies.
func walEntry(b []byte) (meta byte, key []byte, n int) {
	if len(b) < 2 {
		return 0, nil, 0
	}
	p := 2
	var lens [3]uint64
	for i := range lens {
		v, k := binary.Uvarint(b[p:])
		if k <= 0 {
			return 0, nil, 0
		}
		lens[i], p = v, p+k
	}
	klen, vlen := lens[0], lens[1]
	if klen > 1<<16 || vlen > uint64(len(b)) || uint64(p)+klen+vlen+4 > uint64(len(b)) {
		return 0, nil, 0
	}
	end := p + int(klen) + int(vlen)
	if binary.BigEndian.Uint32(b[end:]) != crc32.Checksum(b[:end], castagnoli) {
		return 0, nil, 0
	}
	return b[0], b[p : p+int(klen)], end + 4
}

// reportWALDamage audits the logs badger replays at open (memtable logs,
// and the value log being written) and says what is dropped: a crash
// leaves at most a torn last write; more is damage. A copy of a damaged
// log goes to the directory's damaged/ folder, for recovery by hand,
// before its unreadable tail is cleared.
func reportWALDamage(dir string, f storeFiles, log *slog.Logger) {
	for _, name := range f.logs {
		path := filepath.Join(dir, name)
		d, err := auditWAL(path)
		if err != nil {
			log.Warn("could not audit a log before replay", "file", name, "error", err)
			continue
		}
		if d == nil {
			continue
		}
		if d.LostWrites == 0 && d.Dropped <= maxTornWrite {
			log.Info("log ends in a torn write (a crash during a write): dropped", "file", name, "bytes", d.Dropped)
			continue
		}
		saved := filepath.Join(dir, "damaged", fmt.Sprintf("%s.%s", name, time.Now().UTC().Format("20060102T150405Z")))
		if err := copyFile(path, saved); err != nil {
			log.Error("store log damaged, and it cannot be copied aside: not opening it", "file", name, "error", err)
			continue // badger replays it as it is, or refuses it
		}
		// Badger replays up to the damage and drops the rest; some damage
		// makes it refuse the whole log instead (an entry header that does
		// not parse). With the copy kept, the tail is cleared here, so the
		// replay ends at the damage either way.
		if err := zeroFrom(path, d.ValidEnd, d.ValidEnd+d.Dropped); err != nil {
			log.Error("clearing a damaged log's tail", "file", name, "error", err)
		}
		log.Error("store log damaged: what follows the damage is dropped",
			"file", name, "readable_bytes", d.ValidEnd, "dropped_bytes", d.Dropped,
			"dropped_writes", d.LostWrites, "copy", saved)
	}
}

// maxTornWrite is the most a crash can leave half-written at a log's end
// without it counting as damage: one group commit's entries.
const maxTornWrite = 4 << 20

// zeroFrom overwrites [from, to) of a file with zeros and syncs it.
func zeroFrom(path string, from, to int) error {
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	if _, err := f.WriteAt(make([]byte, to-from), int64(from)); err != nil {
		return err
	}
	return f.Sync()
}

func copyFile(src, dst string) error {
	b, err := os.ReadFile(src)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(dst), 0o700); err != nil {
		return err
	}
	return os.WriteFile(dst, b, 0o600)
}
