// Package storage is Beacon's single embedded database: one badger store that
// holds sessions, subscriptions, inflight and queued QoS 1/2 messages,
// retained messages and the ingress log of accepted messages.
//
// All writes go through one committer goroutine that gathers the writes of
// every connection into one badger transaction (group commit). A caller of
// [DB.Write] returns once its writes are durable under the configured
// [SyncPolicy]; [DB.WriteAsync] queues writes that are committed in order
// with everything queued after them.
package storage

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/dgraph-io/badger/v4"
)

// SyncPolicy says when a write counts as durable.
type SyncPolicy string

const (
	// SyncAlways commits and fsyncs before a write returns: survives a
	// process crash and a power loss. The fsync is shared by every write in
	// the same group commit.
	SyncAlways SyncPolicy = "always"
	// SyncBatch commits to the database files (the kernel's page cache)
	// before a write returns and fsyncs every SyncInterval: survives a
	// process crash (SIGKILL); a power loss may lose the last interval.
	SyncBatch SyncPolicy = "batch"
	// SyncNone returns as soon as a write is queued: survives a graceful
	// stop; a process crash may lose the writes still queued.
	SyncNone SyncPolicy = "none"
)

// Valid reports whether p is a known policy.
func (p SyncPolicy) Valid() bool {
	switch p {
	case SyncAlways, SyncBatch, SyncNone:
		return true
	}
	return false
}

// ErrClosed is returned by writes after Shutdown.
var ErrClosed = errors.New("storage: database closed")

// Options configures Open. Zero values take the documented defaults.
type Options struct {
	Dir          string        // data directory; required
	Sync         SyncPolicy    // default SyncBatch
	SyncInterval time.Duration // fsync period under SyncBatch; default 1s
	GCInterval   time.Duration // value-log GC period; default 5m
	Logger       *slog.Logger  // default slog.Default()
	// ObserveCommit, when set, is told how long each group commit took.
	ObserveCommit func(time.Duration)
	// MinFree is the free space kept on the volume (zero: DefaultReserve);
	// below it Room refuses new data. It is never less than what the
	// store needs to flush and compact what it holds (12 memtables: 192
	// MiB, less on a volume under 1 GiB, whose memtables are smaller).
	MinFree Reserve
	// SpaceInterval is how often free space is looked at; default 250ms.
	SpaceInterval time.Duration
}

// DB is the opened database. It is safe for concurrent use.
type DB struct {
	// db is reopened (read-only on a full volume at start, read-write
	// once space returns) under dbMu held for writing; every use holds
	// it for reading.
	dbMu     sync.RWMutex
	db       *badger.DB
	bopts    badger.Options
	readOnly atomic.Bool // opened read-only: every write fails with a *SpaceError
	memtable int64       // badger's memtable size
	spareMu  sync.Mutex  // guards the emergency file (spare.go)
	spareOK  atomic.Bool // the emergency file is there
	// suspended: the emergency file was given up (the volume filled
	// behind the store's back); every write fails with a *SpaceError, acks
	// and deletes too, so badger never needs another file before space
	// returns and a new spare is made.
	suspended atomic.Bool

	opts  Options
	log   *slog.Logger
	queue chan *request
	// qmu orders the sends on queue with the stores of tail, the last
	// request sent. It is held across a send (which blocks while the
	// queue is full), so nothing the committer waits for may take it.
	qmu    sync.Mutex
	tail   atomic.Pointer[request]
	space  *space
	mu     sync.RWMutex // guards closed against sends on queue
	closed bool
	done   chan struct{} // closed by Shutdown: stops the tickers
	wg     sync.WaitGroup

	commits    atomic.Int64
	commitErrs atomic.Int64
	opsWritten atomic.Int64
}

type opKind uint8

const (
	opSet opKind = iota
	opDelete
	opDeletePrefix
)

// Op is one write: a set, a delete, or a delete of every key under a prefix.
type Op struct {
	kind  opKind
	key   []byte
	value []byte
}

// Size is the number of bytes the op writes.
func (o Op) Size() int { return len(o.key) + len(o.value) }

// Set writes value under key.
func Set(key, value []byte) Op { return Op{kind: opSet, key: key, value: value} }

// Delete removes key.
func Delete(key []byte) Op { return Op{kind: opDelete, key: key} }

// DeletePrefix removes every key that starts with prefix.
func DeletePrefix(prefix []byte) Op { return Op{kind: opDeletePrefix, key: prefix} }

type request struct {
	ops  []Op
	done chan error  // nil for async writes
	then func(error) // called by the committer after the commit, if set
	// blk, if set, is the log's block the request writes: it may grow
	// while queued, until the committer takes it (and seals it) before
	// reading ops; blk is told once it is committed, after then.
	blk *logBlock
}

// take is called by the committer for each request it dequeues.
func (r *request) take() {
	if r.blk != nil {
		r.blk.seal()
	}
}

// maxGroupOps bounds how many ops one group commit gathers before committing.
const maxGroupOps = 8192

// valueThreshold is the size from which a value is kept in badger's value
// log instead of the LSM tree. Badger's default (1 MiB) kept every
// message inline: compactions then rebuilt tables of 60 KB records in
// memory, and its table-builder pool held gigabytes (RSS 4 GiB after
// 20 x 1,024 messages of 60 KB). Small messages, the common case, stay
// inline.
const valueThreshold = 4 << 10

// Open opens (or creates) the database in opts.Dir.
func Open(opts Options) (*DB, error) {
	if opts.Dir == "" {
		return nil, errors.New("storage: no data directory")
	}
	if opts.Sync == "" {
		opts.Sync = SyncBatch
	}
	if !opts.Sync.Valid() {
		return nil, fmt.Errorf("storage: unknown sync policy %q", opts.Sync)
	}
	if opts.SyncInterval <= 0 {
		opts.SyncInterval = time.Second
	}
	if opts.GCInterval <= 0 {
		opts.GCInterval = 5 * time.Minute
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.SpaceInterval <= 0 {
		opts.SpaceInterval = 250 * time.Millisecond
	}
	log := opts.Logger.With("component", "storage")
	if err := os.MkdirAll(opts.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("create data directory: %w", err)
	}
	total, _, err := statfs(opts.Dir)
	if err != nil {
		return nil, err
	}
	// Badger writes its memtables through memory-mapped files: a page it
	// cannot get on a full volume kills the process (SIGBUS). The reserve
	// keeps room for every memtable to be flushed and compacted, and on a
	// small volume the memtables are smaller so the reserve stays small.
	memtable := int64(min(max(total/64, 1<<20), 16<<20))
	sp, err := newSpace(opts.Dir, opts.MinFree, uint64(memtablesReserved*memtable))
	if err != nil {
		return nil, err
	}

	bo := badger.DefaultOptions(opts.Dir).
		WithLogger(badgerLogger{log}).
		WithSyncWrites(opts.Sync == SyncAlways).
		WithDetectConflicts(false). // one committer: there is nothing to conflict with
		WithMemTableSize(memtable).
		WithBaseTableSize(min(2<<20, memtable)).
		// Values above this go to the value log; a transaction holds at
		// most 15% of a memtable (badger's batch size). See valueThreshold.
		WithValueThreshold(min(valueThreshold, memtable*15/100/2)).
		WithNumMemtables(3).
		WithBlockCacheSize(32 << 20).
		WithIndexCacheSize(16 << 20).
		WithValueLogFileSize(min(max(int64(total/8), 4<<20), 64<<20)).
		WithNumCompactors(2)
	// The checks read (and may repair) the files: not while another
	// process has the store open. The lock is let go for badger's own.
	unlock, err := lockDir(opts.Dir)
	if err != nil {
		return nil, fmt.Errorf("open store %q: %w", opts.Dir, err)
	}
	began := time.Now()
	files, err := checkStore(opts.Dir)
	if err != nil {
		unlock()
		return nil, err
	}
	log.Debug("store checked", "tables", len(files.tables), "took", time.Since(began).Round(time.Millisecond))
	reportWALDamage(opts.Dir, files, log)
	unlock()
	bdb, err := badger.Open(bo)
	readOnly := false
	if isNoSpace(err) {
		// No room to open for writing (a new memtable log, the flush of
		// the ones replayed): serve what is stored, read-only, until
		// space returns.
		log.Warn("the data directory's volume is full: opening the store read-only; messages and new sessions "+
			"are refused until space is freed", "dir", opts.Dir, "error", err)
		removeEmptyMemtables(opts.Dir, log)
		bdb, err = badger.Open(bo.WithReadOnly(true))
		readOnly = true
	}
	if err != nil {
		return nil, fmt.Errorf("open store %q: %w", opts.Dir, err)
	}
	if !files.marker {
		if !files.manifest {
			log.Info("created a new store", "dir", opts.Dir)
		}
		if err := writeMarker(opts.Dir); err != nil && !readOnly {
			_ = bdb.Close()
			return nil, fmt.Errorf("open store %q: %w", opts.Dir, err)
		}
	}

	d := &DB{
		db:       bdb,
		memtable: memtable,
		bopts:    bo,
		opts:     opts,
		log:      log,
		space:    sp,
		queue:    make(chan *request, 4096),
		done:     make(chan struct{}),
	}
	if readOnly {
		d.readOnly.Store(true)
		d.space.low.Store(true)
	}
	registerSpare(d)
	d.ensureSpare()
	d.wg.Add(3)
	go d.commitLoop()
	go d.maintenance()
	go d.watchSpace(opts.SpaceInterval)
	return d, nil
}

// Write queues ops as one atomic unit and returns once they are durable
// under the policy: committed (SyncBatch), committed and fsynced
// (SyncAlways), or merely queued (SyncNone).
func (d *DB) Write(ops ...Op) error { return d.WriteStart(ops...)() }

// WriteStart queues ops as one atomic unit and returns a function that
// waits until they are durable under the sync policy (or failed), so a
// writer can queue several writes and then wait for them in order.
func (d *DB) WriteStart(ops ...Op) (wait func() error) {
	if d.opts.Sync == SyncNone {
		err := d.enqueue(&request{ops: ops})
		return func() error { return err }
	}
	r := &request{ops: ops, done: make(chan error, 1)}
	if err := d.enqueue(r); err != nil {
		return func() error { return err }
	}
	return func() error { return <-r.done }
}

// WriteAsync queues ops as one atomic unit without waiting. They commit
// before any write queued after them.
func (d *DB) WriteAsync(ops ...Op) {
	if err := d.enqueue(&request{ops: ops}); err != nil {
		d.log.Warn("write after close dropped", "ops", len(ops))
	}
}

// WriteAsyncThen queues ops like WriteAsync and calls then once they are
// committed (or failed), from the committer: then must not block, nor wait
// for anything that waits for a write.
func (d *DB) WriteAsyncThen(then func(error), ops ...Op) {
	if err := d.enqueue(&request{ops: ops, then: then}); err != nil {
		then(err)
	}
}

func (d *DB) enqueue(r *request) error {
	d.mu.RLock()
	defer d.mu.RUnlock()
	if d.closed {
		return ErrClosed
	}
	d.qmu.Lock()
	d.queue <- r
	d.tail.Store(r)
	d.qmu.Unlock()
	return nil
}

// isLast reports whether r is the last request queued: whether ops added
// to it now commit in the order they would if queued now. A request
// queued later, whose enqueue returned, makes it false.
func (d *DB) isLast(r *request) bool { return d.tail.Load() == r }

// commitLoop is the only writer. It gathers whatever is queued into one
// transaction, so concurrent writers share one commit (and one fsync).
func (d *DB) commitLoop() {
	defer d.wg.Done()
	var group []*request
	for r := range d.queue {
		r.take()
		group = append(group[:0], r)
		n := len(r.ops)
	gather:
		for n < maxGroupOps {
			select {
			case next, ok := <-d.queue:
				if !ok {
					break gather
				}
				next.take()
				group = append(group, next)
				n += len(next.ops)
			default:
				break gather
			}
		}
		start := time.Now()
		errs := d.commitGroup(group)
		if d.opts.ObserveCommit != nil {
			d.opts.ObserveCommit(time.Since(start))
		}
		d.commits.Add(1)
		for i, g := range group {
			if errs[i] != nil {
				d.commitErrs.Add(1)
				if !errors.Is(errs[i], ErrNoSpace) { // the space watcher says that, once a minute
					d.log.Error("commit failed", "error", errs[i], "ops", len(g.ops), "waited", g.done != nil)
				}
			} else {
				d.opsWritten.Add(int64(len(g.ops)))
			}
			if g.done != nil {
				g.done <- errs[i]
			}
			if g.then != nil {
				g.then(errs[i])
			}
			if g.blk != nil {
				g.blk.committed(errs[i])
			}
		}
		clear(group)
	}
}

// commitGroup commits the requests of a group in one transaction, and
// returns an error per request. Every request is atomic: when the group
// does not fit in one badger transaction, each request is committed on its
// own, and a request that does not fit alone fails by itself.
func (d *DB) commitGroup(group []*request) []error {
	errs := make([]error, len(group))
	err := d.noSpace(d.commitTxn(group))
	if err == nil {
		return errs
	}
	if len(group) == 1 || !errors.Is(err, badger.ErrTxnTooBig) {
		for i := range errs {
			errs[i] = err
		}
		return errs
	}
	for i, r := range group {
		errs[i] = d.noSpace(d.commitTxn([]*request{r}))
	}
	return errs
}

// commitTxn applies requests in one transaction; nothing is written unless
// all of them are.
func (d *DB) commitTxn(reqs []*request) error {
	// Read-only, a write fails without waiting for dbMu, so a reader
	// that waits for a write while reopen waits for it cannot deadlock.
	if d.readOnly.Load() || d.suspended.Load() {
		return &SpaceError{Free: d.space.free.Load(), Reserve: d.space.reserve}
	}
	d.dbMu.RLock()
	defer d.dbMu.RUnlock()
	txn := d.db.NewTransaction(true)
	defer txn.Discard()
	written := 0
	for _, r := range reqs {
		for _, op := range r.ops {
			var err error
			switch op.kind {
			case opSet:
				err = txn.Set(op.key, op.value)
				written += op.Size()
			case opDelete:
				err = txn.Delete(op.key)
			case opDeletePrefix:
				var keys [][]byte
				keys, err = prefixKeys(txn, op.key)
				for _, k := range keys {
					if err = txn.Delete(k); err != nil {
						break
					}
				}
			}
			if err != nil {
				return fmt.Errorf("write %q: %w", op.key, err)
			}
		}
	}
	err := txn.Commit()
	if err == nil {
		d.space.written.Add(int64(written))
	}
	return err
}

// removeEmptyMemtables deletes the empty memtable logs a failed open
// leaves behind (created, then not allocated for want of space): they
// hold nothing, and a read-only open cannot map them.
func removeEmptyMemtables(dir string, log *slog.Logger) {
	files, _ := filepath.Glob(filepath.Join(dir, "*.mem"))
	for _, f := range files {
		if fi, err := os.Stat(f); err == nil && fi.Size() == 0 {
			if err := os.Remove(f); err != nil {
				log.Warn("removing an empty memtable log", "file", f, "error", err)
			}
		}
	}
}

// isNoSpace reports whether err is a full volume's ENOSPC; badger wraps
// some errors as text only, so the message counts too.
func isNoSpace(err error) bool {
	return err != nil && (errors.Is(err, syscall.ENOSPC) || strings.Contains(err.Error(), syscall.ENOSPC.Error()))
}

// noSpace makes a write that failed for a full volume (ENOSPC, from
// badger allocating a file) a *SpaceError, and has the watcher look.
func (d *DB) noSpace(err error) error {
	if !isNoSpace(err) {
		return err
	}
	select {
	case d.space.kick <- struct{}{}:
	default:
	}
	return fmt.Errorf("%w: %w", &SpaceError{Free: d.space.free.Load(), Reserve: d.space.reserve}, err)
}

func prefixKeys(txn *badger.Txn, prefix []byte) ([][]byte, error) {
	it := txn.NewIterator(badger.IteratorOptions{Prefix: prefix})
	defer it.Close()
	var keys [][]byte
	for it.Rewind(); it.Valid(); it.Next() {
		keys = append(keys, it.Item().KeyCopy(nil))
	}
	return keys, nil
}

// Scan calls fn for every key under prefix, in key order. The slices are
// only valid during the call.
func (d *DB) Scan(prefix []byte, fn func(key, value []byte) error) error {
	return d.view(func(txn *badger.Txn) error {
		it := txn.NewIterator(badger.IteratorOptions{Prefix: prefix, PrefetchValues: true, PrefetchSize: 64})
		defer it.Close()
		for it.Rewind(); it.Valid(); it.Next() {
			item := it.Item()
			err := item.Value(func(v []byte) error { return fn(item.Key(), v) })
			if err != nil {
				return err
			}
		}
		return nil
	})
}

// Get returns a copy of the value under key, or ErrNotFound.
func (d *DB) Get(key []byte) ([]byte, error) {
	var out []byte
	err := d.view(func(txn *badger.Txn) error {
		item, err := txn.Get(key)
		if err != nil {
			return err
		}
		out, err = item.ValueCopy(nil)
		return err
	})
	if errors.Is(err, badger.ErrKeyNotFound) {
		return nil, ErrNotFound
	}
	return out, err
}

// view runs fn in a read transaction.
func (d *DB) view(fn func(txn *badger.Txn) error) error {
	d.dbMu.RLock()
	defer d.dbMu.RUnlock()
	return d.db.View(fn)
}

// reopen opens a store that started read-only for writing, once the
// volume has room again; it reports whether it did. On failure the store
// stays (or is again) read-only. It waits for the reads in progress;
// writes, failing while read-only, never wait for it.
func (d *DB) reopen() bool {
	d.dbMu.Lock()
	defer d.dbMu.Unlock()
	if err := d.db.Close(); err != nil {
		d.log.Error("closing the read-only store", "error", err)
	}
	bdb, err := badger.Open(d.bopts)
	if err != nil {
		d.log.Warn("the store is still read-only: opening it for writing failed", "error", err)
		removeEmptyMemtables(d.opts.Dir, d.log)
		if bdb, err = badger.Open(d.bopts.WithReadOnly(true)); err != nil {
			// Nothing to read from either: every use fails from now on,
			// with badger's ErrDBClosed.
			d.log.Error("reopening the store read-only failed", "error", err)
			return false
		}
		d.db = bdb
		return false
	}
	d.db = bdb
	d.readOnly.Store(false)
	d.log.Info("the store is open for writing again")
	return true
}

// Size returns the bytes of the store's tables and value log files.
func (d *DB) Size() (lsm, vlog int64) {
	d.dbMu.RLock()
	defer d.dbMu.RUnlock()
	return d.db.Size()
}

// ErrNotFound is returned by Get for a missing key.
var ErrNotFound = errors.New("storage: key not found")

// Stats are counters for metrics and tests.
type Stats struct {
	Commits      int64 // group commits done
	CommitErrors int64 // group commits that failed
	Ops          int64 // ops written
}

// Stats returns the counters.
func (d *DB) Stats() Stats {
	return Stats{Commits: d.commits.Load(), CommitErrors: d.commitErrs.Load(), Ops: d.opsWritten.Load()}
}

// maintenance fsyncs on the SyncBatch schedule and runs value-log GC until
// Shutdown.
func (d *DB) maintenance() {
	defer d.wg.Done()
	gc := time.NewTicker(d.opts.GCInterval)
	defer gc.Stop()
	var syncC <-chan time.Time
	if d.opts.Sync == SyncBatch {
		t := time.NewTicker(d.opts.SyncInterval)
		defer t.Stop()
		syncC = t.C
	}
	for {
		select {
		case <-d.done:
			return
		case <-syncC:
			if err := d.sync(); err != nil {
				d.log.Error("periodic sync failed", "error", err)
			}
		case <-gc.C:
			if !d.space.low.Load() && !d.readOnly.Load() { // a rewrite needs room before it frees any
				d.runGC()
			}
		}
	}
}

func (d *DB) runGC() {
	for i := 0; i < 16; i++ { // bounded: one pass rewrites at most 16 files
		select {
		case <-d.done:
			return
		default:
		}
		d.dbMu.RLock()
		err := d.db.RunValueLogGC(0.5)
		d.dbMu.RUnlock()
		if err != nil {
			if !errors.Is(err, badger.ErrNoRewrite) {
				d.log.Warn("value log gc", "error", err)
			}
			return
		}
	}
}

// Shutdown commits everything queued, fsyncs and closes the database. It is
// idempotent; ctx bounds the wait for the queue to drain.
func (d *DB) Shutdown(ctx context.Context) error {
	d.mu.Lock()
	if d.closed {
		d.mu.Unlock()
		return nil
	}
	d.closed = true
	close(d.queue)
	close(d.done)
	d.mu.Unlock()

	drained := make(chan struct{})
	go func() { d.wg.Wait(); close(drained) }()
	select {
	case <-drained:
	case <-ctx.Done():
		return fmt.Errorf("storage shutdown: %w", ctx.Err())
	}
	if err := d.sync(); err != nil {
		d.log.Warn("final sync", "error", err)
	}
	unregisterSpare(d)
	d.dbMu.Lock()
	defer d.dbMu.Unlock()
	return d.db.Close()
}

// sync fsyncs what is committed (nothing to do read-only).
func (d *DB) sync() error {
	if d.readOnly.Load() {
		return nil
	}
	d.dbMu.RLock()
	defer d.dbMu.RUnlock()
	return d.db.Sync()
}

// badgerLogger sends badger's logs to slog; its chatty info lines go to debug.
type badgerLogger struct{ l *slog.Logger }

func (b badgerLogger) Errorf(f string, a ...any)   { b.l.Error(fmt.Sprintf(f, a...)) }
func (b badgerLogger) Warningf(f string, a ...any) { b.l.Warn(fmt.Sprintf(f, a...)) }
func (b badgerLogger) Infof(f string, a ...any)    { b.l.Debug(fmt.Sprintf(f, a...)) }
func (b badgerLogger) Debugf(f string, a ...any)   { b.l.Debug(fmt.Sprintf(f, a...)) }
