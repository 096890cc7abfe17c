package storage

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"syscall"

	"github.com/dgraph-io/badger/v4"
	"github.com/dgraph-io/badger/v4/options"
)

// ErrInUse says a running broker holds a data directory.
var ErrInUse = errors.New("in use by a running broker (stop it, or work on a copy)")

// VerifyReport is what Verify found in a data directory.
type VerifyReport struct {
	Dir      string
	Tables   int            // table files whose every block verified
	Records  map[string]int // records read back, by kind
	Damaged  map[string]int // records that do not decode, by kind
	Problems []string       // damage found, one line each
}

// OK reports whether nothing is damaged.
func (r *VerifyReport) OK() bool { return len(r.Problems) == 0 }

// Write prints the report for a person.
func (r *VerifyReport) Write(w io.Writer) {
	fmt.Fprintf(w, "store %s: %d tables verified\n", r.Dir, r.Tables)
	kinds := make([]string, 0, len(r.Records))
	for k := range r.Records {
		kinds = append(kinds, k)
	}
	sort.Strings(kinds)
	for _, k := range kinds {
		line := fmt.Sprintf("  %-16s %d", k, r.Records[k])
		if n := r.Damaged[k]; n > 0 {
			line += fmt.Sprintf(" (%d do not decode)", n)
		}
		fmt.Fprintln(w, line)
	}
	if r.OK() {
		fmt.Fprintln(w, "ok: no damage found")
		return
	}
	for _, p := range r.Problems {
		fmt.Fprintln(w, "DAMAGE:", p)
	}
}

// recordKinds names the store's key spaces and checks their values.
var recordKinds = []struct {
	prefix, name string
	check        func(key, value []byte) error
}{
	{nsSession, "sessions", func(_, v []byte) error { _, err := DecodeSession(v); return err }},
	{nsSub, "subscriptions", func(_, v []byte) error { _, err := DecodeSub(v); return err }},
	{nsQueue, "queued", func(k, v []byte) error {
		gen, seq, ok := ParseQueueRest(queueRest(k))
		if !ok {
			return errors.New("bad key")
		}
		_, err := DecodeQueue(v, gen, seq)
		return err
	}},
	{nsInbound, "inbound-qos2", nil},
	{nsRetain, "retained", func(_, v []byte) error { _, err := DecodeRetained(v); return err }},
	{nsLog, "log-records", func(_, v []byte) error { _, err := parseLogRecord(v); return err }},
	{nsLogBlock, "log-blocks", checkBlock},
	{nsHistory, "history", func(k, v []byte) error { _, err := DecodeHistory(k, v); return err }},
	{nsOutbox, "webhook-outbox", nil},
	{nsDevice, "devices", nil},
	{nsMeta, "meta", nil},
	{nsForward, "cluster-forwards", nil},
	{nsCursor, "cluster-cursors", nil},
}

// queueRest is a queue key after its client id.
func queueRest(k []byte) []byte {
	rest := k[len(nsQueue):]
	if i := strings.IndexByte(string(rest), 0); i >= 0 {
		return rest[i+1:]
	}
	return nil
}

// Verify checks a data directory offline without changing it: the
// MANIFEST and every table (checksums), the logs badger replays, and
// every record read back and decoded. It fails when the directory is in
// use by a running broker.
func Verify(dir string) (*VerifyReport, error) {
	r := &VerifyReport{Dir: dir, Records: map[string]int{}, Damaged: map[string]int{}}
	if err := InUse(dir); err != nil {
		return nil, err
	}
	if _, err := os.Stat(filepath.Join(dir, "MANIFEST")); errors.Is(err, os.ErrNotExist) {
		if f, _ := listStore(dir); !f.marker && len(f.data) == 0 {
			return nil, fmt.Errorf("%s holds no store", dir)
		}
	}
	files, err := checkStore(dir)
	var de *DamageError
	if errors.As(err, &de) {
		r.Problems = append(r.Problems, de.File+": "+de.Problem)
		return r, nil
	}
	if err != nil {
		return nil, err
	}
	r.Tables = len(files.tables)
	for _, name := range files.logs {
		d, err := auditWAL(filepath.Join(dir, name))
		switch {
		case err != nil:
			r.Problems = append(r.Problems, fmt.Sprintf("%s: cannot read: %v", name, err))
		case d != nil && (d.LostWrites > 0 || d.Dropped > maxTornWrite):
			r.Problems = append(r.Problems, fmt.Sprintf("%s: %d bytes after offset %d do not read back; "+
				"the next start drops them, with %d complete writes", name, d.Dropped, d.ValidEnd, d.LostWrites))
		}
	}
	// Badger replays the memtable logs only opened for writing, so the
	// records are read from a scratch copy beside the directory: tables
	// linked (badger never changes one), everything it writes copied.
	scratch, err := scratchCopy(dir)
	if err != nil {
		return nil, fmt.Errorf("make a scratch copy to read the records from: %w", err)
	}
	defer os.RemoveAll(scratch)
	bdb, err := badger.Open(badger.DefaultOptions(scratch).WithLogger(nil).WithNumCompactors(0).
		WithCompactL0OnClose(false).WithChecksumVerificationMode(options.OnBlockRead))
	if err != nil {
		r.Problems = append(r.Problems, fmt.Sprintf("open: %v", err))
		return r, nil
	}
	defer bdb.Close()
	err = bdb.View(func(txn *badger.Txn) error {
		it := txn.NewIterator(badger.IteratorOptions{PrefetchValues: false})
		defer it.Close()
		for it.Rewind(); it.Valid(); it.Next() {
			item := it.Item()
			key := item.Key()
			kind := "other"
			var check func(k, v []byte) error
			for _, rk := range recordKinds {
				if strings.HasPrefix(string(key), rk.prefix) {
					kind, check = rk.name, rk.check
					break
				}
			}
			r.Records[kind]++
			err := item.Value(func(v []byte) error {
				if check != nil {
					return check(key, v)
				}
				return nil
			})
			if err != nil {
				r.Damaged[kind]++
				if r.Damaged[kind] <= 3 {
					r.Problems = append(r.Problems, fmt.Sprintf("%s record %q: %v", kind, key, err))
				}
			}
		}
		return nil
	})
	if err != nil {
		r.Problems = append(r.Problems, fmt.Sprintf("reading records: %v", err))
	}
	return r, nil
}

// InUse fails (with ErrInUse) when a running broker holds dir's lock.
func InUse(dir string) error {
	f, err := os.Open(dir) // badger locks the directory itself
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	defer f.Close()
	// Exclusive: a broker that opened its store read-only (a full disk)
	// holds the lock shared.
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		return fmt.Errorf("%s: %w", dir, ErrInUse)
	}
	return syscall.Flock(int(f.Fd()), syscall.LOCK_UN)
}

// scratchCopy makes a copy of a store badger may open for writing without
// changing the original: next to it (so tables can be hard links), in a
// temporary directory if the parent is not writable.
func scratchCopy(dir string) (string, error) {
	scratch, err := os.MkdirTemp(filepath.Dir(filepath.Clean(dir)), ".beacon-verify-")
	if err != nil {
		if scratch, err = os.MkdirTemp("", "beacon-verify-"); err != nil {
			return "", err
		}
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		os.RemoveAll(scratch)
		return "", err
	}
	for _, e := range entries {
		name := e.Name()
		if e.IsDir() || name == "LOCK" || name == spareFile {
			continue
		}
		src, dst := filepath.Join(dir, name), filepath.Join(scratch, name)
		if strings.HasSuffix(name, ".sst") && os.Link(src, dst) == nil {
			continue
		}
		if err := copyFile(src, dst); err != nil {
			os.RemoveAll(scratch)
			return "", err
		}
	}
	return scratch, nil
}

// lockDir takes the data directory's lock (badger's: a flock on the
// directory) for the checks before badger opens it; unlock lets it go.
func lockDir(dir string) (unlock func(), err error) {
	f, err := os.Open(dir)
	if err != nil {
		return nil, err
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		f.Close()
		return nil, ErrInUse
	}
	return func() {
		_ = syscall.Flock(int(f.Fd()), syscall.LOCK_UN)
		f.Close()
	}, nil
}
