package storage

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/beaconmq/beacon/broker/topics"
)

// Errors of the message log.
var (
	// ErrLogNotFound: the record was never stored (numbered only) or has
	// been deleted.
	ErrLogNotFound = errors.New("storage: log record not found")
	// ErrLogIDMalformed: not an id FormatID makes.
	ErrLogIDMalformed = errors.New("storage: malformed log id")
	// ErrLogIDForeign: an id of another data directory (wiped, replaced,
	// or an id of the history that preceded the log).
	ErrLogIDForeign = errors.New("storage: log id of another epoch")
	// ErrLogIDFuture: an id of this epoch beyond the last seq assigned.
	ErrLogIDFuture = errors.New("storage: log id from the future")
)

// LogRule is the retention of the messages a topic filter matches. A
// message belongs to the first rule whose filter matches its topic. A
// record is outside its rule's retention once any limit says so; zero
// limits mean no limit (a rule with none keeps its records forever).
type LogRule struct {
	Filter      string        // MQTT topic filter
	MaxMessages int           // keep the newest MaxMessages records; 0 = no count limit
	MaxAge      time.Duration // keep records younger than MaxAge; 0 = no age limit
	MaxBytes    int64         // keep the newest records up to this sum of topic+payload+props bytes; 0 = no limit
}

// LogOptions configure OpenLog. Zero values take the documented defaults.
type LogOptions struct {
	Rules []LogRule // retention per topic filter; none: only referenced records are kept
	// ReserveBlock is how many sequence numbers are reserved in the store
	// at a time, so that a seq handed out is never handed out again after
	// a crash; default 65,536.
	ReserveBlock uint64
	Now          func() time.Time // for tests; default time.Now
	// MaxIndexBytes bounds the rules' retention index (16 bytes per
	// record a rule retains): beyond it the oldest records, across rules,
	// leave retention as if a rule had trimmed them (deleted once no
	// session holds them; Oldest moves past them). 0: no bound.
	MaxIndexBytes int64
}

// LogStats are the log's counters and sizes.
type LogStats struct {
	Head       uint64 // last seq assigned
	Oldest     uint64 // see Log.Oldest
	Stored     int    // records stored now, including ones kept only by references
	Bytes      int64  // topic+payload+props bytes of the stored records
	Referenced int    // records in the reference map: referenced, not yet released, or kept past retention
	Pending    int    // records appended and not yet released
	Appended   int64  // records appended since open
	Numbered   int64  // messages numbered without being stored since open
	Trimmed    int64  // records deleted since open
	Failed     int64  // records whose write failed since open
	Damaged    int    // records found damaged at open (skipped; deleted once trimming starts)
	Strays     int64  // Unref or Release calls that matched no Ref or Append
	Rules      []LogRuleStats
	// IndexBytes is the memory the in-memory index holds: the rules'
	// entry chunks, the reference map (estimated at refEntryBytes an
	// entry) and the blocks' refs. IndexEntryBytes is what
	// LogOptions.MaxIndexBytes bounds: 16 bytes per record a rule retains.
	// IndexEvicted counts records that left retention because of that
	// bound.
	IndexBytes, IndexEntryBytes, IndexEvicted int64
}

// LogRuleStats describe the records a rule retains.
type LogRuleStats struct {
	Filter  string
	Stored  int    // records inside the rule's retention
	Bytes   int64  // their topic+payload+props bytes
	Trimmed uint64 // highest seq that left the rule's retention (a lower bound after a restart)
}

// Log is the broker's message log: every message the broker accepts is
// appended once and read by every consumer (session queues, browser
// streams, history, webhooks, Home Assistant) by its seq.
//
// # Ids
//
// A message's id is (Epoch, seq). The epoch is a random number made when
// the data directory's log is created. Seqs increase by one per message,
// stored (Append) or not (Number), and are never handed out twice, also
// after a crash: they are reserved in the store in blocks before they are
// handed out. FormatID and ParseID turn ids into browser event ids.
//
// # Order and durability
//
// Append returns once the record is durable under the DB's sync policy.
// Concurrent appends share group commits; seqs are assigned and the
// writes queued under one lock, so commit order is seq order. The records
// that meet between two group commits share one block, one badger key
// (see log_block.go), with the ops that travel with them; retention,
// references and reads stay per record. Read and Get
// wait for records up to the seq they were asked for to be committed, so
// a reader that reads up to Head and then follows live messages from
// Head+1 on misses nothing, whatever the sync policy.
//
// # Retention and references
//
// A record belongs to the first rule whose filter matches its topic. It is
// deleted once three things hold: it is outside its rule's retention (or
// matched no rule), it has no references, and it has been released.
//
//   - A consumer that keeps a seq (a session queue, a webhook) calls Ref,
//     and Unref once done with it. A consumer that found the seq by
//     reading, and may race with retention, calls TryRef, which reports
//     whether the record is still stored (a false one takes nothing).
//   - The router calls Release once it has taken every Ref of a message it
//     appended; every appended record must be released. Until then no
//     record is deleted: not even a rule's count or byte limit removes a
//     message before the sessions it is routed to hold it.
//   - A record outside its rule's retention that is still referenced is
//     kept, no longer counts against the rule, and is deleted by its last
//     Unref.
//
// Count and byte limits are applied on Append, age limits every second.
// A deleted record is gone for Get and Read at once; its block's key is
// deleted with the block's last record. Deletes are queued asynchronously
// in batches, with the trim mark (the highest seq that left a rule's
// retention, see Oldest) in the same write.
//
// At open every record is taken as released and unreferenced: sessions
// restore their references by calling Ref, and nothing is deleted until
// the broker calls StartTrimming; until then the log only appends.
//
// # Memory
//
// The index holds no topics: 16 bytes per record a rule retains (in 8 KiB
// chunks, so growing never copies), plus a map entry (measured 30 to 55
// bytes, with the map's growth slack) per record that is referenced, not
// yet released, or kept past its retention, plus 16 bytes per block of
// more than one record (a block of one needs nothing: its key is its
// seq's). Ten million retained records cost 160 MB, whatever their
// topics, and 4 MB more in blocks of 40.
type Log struct {
	db    *DB
	opts  LogOptions
	now   func() time.Time
	log   *slog.Logger
	epoch uint64
	rules []*logRule

	// appendMu orders appends: seqs are assigned and their writes queued
	// to the DB under it. It is never held by the committer, nor taken by
	// callbacks the committer runs.
	appendMu sync.Mutex
	// trimMu lets one trimNow run at a time, from taking its deletes to
	// queuing them: a trim that returns has queued what the one before
	// it took (a TrimNow racing the background trimmer could return
	// while the other's deletes were not queued yet).
	trimMu sync.Mutex
	last   uint64    // guarded by appendMu: the last seq assigned
	closed bool      // guarded by appendMu
	open   *logBlock // guarded by appendMu: the block appends add to, if not sealed
	// blockHint is the size of the last block sealed: a new block's value
	// starts with room for as much. Guarded by appendMu.
	blockHint int
	// legacyWrites (tests only) writes one key per record, as stores
	// did before blocks. Guarded by appendMu.
	legacyWrites bool

	blockCap int // bytes of one block's value (badger keeps it inline)
	writeCap int // bytes of the other ops in one block's write

	head      atomic.Uint64 // == last
	queued    atomic.Uint64 // the last stored seq whose write is queued
	committed atomic.Uint64 // every stored seq up to this is committed (or failed)
	waiters   atomic.Int32  // goroutines in waitCommitted
	cmu       sync.Mutex
	cch       chan struct{} // guarded by cmu: closed (and replaced) when committed moves while waiters > 0

	res logReservation

	lastGet atomic.Pointer[cachedBlock] // the block of the last Get

	mu        sync.Mutex // guards the index below
	refs      map[uint64]refState
	dels      []Op   // deletes not yet queued
	keyBuf    []byte // the keys of dels are carved from it
	trimming  bool
	trimmed   uint64 // highest seq that left a rule's retention
	savedTrim uint64 // the trim mark in the last write queued
	stored    int
	bytes     int64
	pending   int
	damaged   [][]byte // keys of damaged records, deleted when trimming starts
	nDamaged  int
	// blocks are the stored blocks of more than one record (and the open
	// one), in seq order; deadBlocks of them are deleted and not yet
	// dropped. lastOpen: appends may add to the newest, openBlock.
	blocks     []blockRef
	deadBlocks int
	lastOpen   bool
	openBlock  *logBlock
	legacyMax  uint64 // highest seq stored under an nsLog key

	appended atomic.Int64
	numbered atomic.Int64
	trimCnt  atomic.Int64
	evicted  atomic.Int64 // records out of retention by MaxIndexBytes
	failed   atomic.Int64
	strays   atomic.Int64

	kick     chan struct{}
	done     chan struct{}
	wg       sync.WaitGroup
	shutOnce sync.Once
}

type logRule struct {
	LogRule
	levels  []string
	q       entryQueue
	bytes   int64
	trimmed uint64 // highest seq of the rule that left its retention
}

// logReservation is the reserved range of seqs. The committer completes
// reservations, so it has its own lock, never held across a DB call.
type logReservation struct {
	mu       sync.Mutex
	durable  uint64 // seqs up to this are reserved in the store
	asked    uint64 // highest reservation queued
	inflight bool
	err      error         // the last reservation's failure
	ch       chan struct{} // closed (and replaced) when a reservation completes
}

// Limits on the writes of the log.
const (
	maxLogDeletes   = 4096    // deletes in one write (well inside a badger transaction)
	minPiggyDeletes = 64      // deletes gathered before an append's write takes them
	maxPiggyDeletes = 256     // deletes an append's write takes at most
	maxLogBatchSize = 1 << 20 // bytes of ops in one block's write (a badger transaction holds 2.4 MB)
)

// OpenLog opens the message log in db: it loads (or creates) the epoch,
// resumes after every seq handed out before, and rebuilds the retention
// index from the stored records. A damaged record is skipped and counted.
func OpenLog(db *DB, opts LogOptions) (*Log, error) {
	if opts.ReserveBlock == 0 {
		opts.ReserveBlock = 1 << 16
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	l := &Log{
		db:   db,
		opts: opts,
		now:  opts.Now,
		log:  db.log,
		cch:  make(chan struct{}),
		refs: map[uint64]refState{},
		kick: make(chan struct{}, 1),
		done: make(chan struct{}),
	}
	l.res.ch = make(chan struct{})
	// A block below badger's value threshold stays in the LSM tree; the
	// rest of its write stays well inside a transaction (15% of a
	// memtable), also on a small volume's small memtables.
	l.blockCap = max(int(db.bopts.ValueThreshold)-1, 256)
	l.writeCap = int(min(maxLogBatchSize, db.memtable*15/100/4))
	for i, r := range opts.Rules {
		if strings.HasPrefix(r.Filter, "$share/") {
			return nil, fmt.Errorf("log rule %d: topic %q: a shared subscription, not a filter", i, r.Filter)
		}
		if err := topics.CheckFilter(r.Filter); err != nil {
			return nil, fmt.Errorf("log rule %d: %w", i, err)
		}
		if r.MaxMessages < 0 || r.MaxAge < 0 || r.MaxBytes < 0 {
			return nil, fmt.Errorf("log rule %d %q: negative limit", i, r.Filter)
		}
		l.rules = append(l.rules, &logRule{LogRule: r, levels: strings.Split(r.Filter, "/")})
	}
	if err := l.load(); err != nil {
		return nil, err
	}
	l.wg.Add(1)
	go l.trimLoop()
	return l, nil
}

func (l *Log) load() error {
	epoch, haveEpoch, err := l.readMeta(metaLogEpoch)
	if err != nil {
		return err
	}
	reserved, haveReserved, err := l.readMeta(metaLogReserved)
	if err != nil {
		return err
	}
	trimmed, _, err := l.readMeta(metaLogTrimmed)
	if err != nil {
		return err
	}

	maxSeq, err := l.loadRecords()
	if err != nil {
		return fmt.Errorf("log: load: %w", err)
	}

	var ops []Op
	if !haveEpoch || !haveReserved || epoch == 0 {
		// A new log, or one whose reservation is lost: seqs after the
		// highest stored one may have been seen, so ids start a new epoch.
		if haveEpoch {
			l.log.Warn("log: sequence reservation missing or damaged: starting a new epoch")
		}
		if epoch, err = newEpoch(); err != nil {
			return err
		}
		ops = append(ops, metaOp(metaLogEpoch, epoch))
	}
	l.epoch = epoch
	l.last = max(reserved, maxSeq)
	l.head.Store(l.last)
	l.queued.Store(l.last)
	l.committed.Store(l.last)
	target := l.last + l.opts.ReserveBlock
	ops = append(ops, metaOp(metaLogReserved, target))
	if err := l.db.Commit(ops...); err != nil {
		if !errors.Is(err, ErrNoSpace) {
			return fmt.Errorf("log: reserve sequence numbers: %w", err)
		}
		// The store opened read-only on a full volume: it stores nothing
		// until space returns, and the numbers handed out meanwhile (to
		// live messages only) are not reserved. After a restart the
		// numbering resumes below them; nothing stored carries one.
		l.log.Warn("log: the store is read-only: numbering live messages without a stored reservation")
	}
	l.res.durable, l.res.asked = target, target

	l.trimmed, l.savedTrim = trimmed, trimmed
	for _, r := range l.rules {
		// Per-rule marks are not stored: after a restart every rule is
		// taken as trimmed up to the global mark.
		r.trimmed = trimmed
	}
	return nil
}

// loadRecords indexes the stored records: first those of a store written
// before blocks (one key each, seqs below every block's), then the
// blocks. It returns the highest seq found.
func (l *Log) loadRecords() (uint64, error) {
	var maxSeq uint64
	err := l.db.Scan([]byte(nsLog), func(key, value []byte) error {
		seq, ok := parseLogKey(key)
		if !ok {
			l.damage(key, "bad key")
			return nil
		}
		maxSeq = max(maxSeq, seq)
		l.legacyMax = seq
		v, err := parseLogRecord(value)
		if err != nil {
			l.damage(key, err.Error())
			return nil
		}
		l.index(l.ruleFor(v.topic), seq, v.time, v.size(), 0)
		return nil
	})
	if err != nil {
		return 0, err
	}
	err = l.db.Scan([]byte(nsLogBlock), func(key, value []byte) error {
		first, ok := parseBlockKey(key)
		if !ok {
			l.damage(key, "bad key")
			return nil
		}
		if first <= maxSeq {
			// Blocks are written after every per-record key and after one
			// another: only a store written to by an older version after
			// a newer one (unsupported) gets here. Nothing is dropped.
			l.log.Warn("log: a block starts at or below a seq stored before it", "block", first, "max", maxSeq)
		}
		n, walked, last := 0, 0, first
		err := walkBlock(first, value, func(seq uint64, rec []byte) bool {
			maxSeq = max(maxSeq, seq)
			walked, last = walked+1, seq
			v, err := parseLogRecord(rec)
			if err != nil {
				l.nDamaged++
				l.log.Warn("log: skipping a damaged record", "block", first, "seq", seq, "error", err.Error())
				return true
			}
			l.index(l.ruleFor(v.topic), seq, v.time, v.size(), 0)
			n++
			return true
		})
		switch {
		case n == 0:
			l.damage(key, fmt.Sprint("no readable record: ", err))
		case err != nil:
			l.nDamaged++
			l.log.Warn("log: skipping the damaged end of a block", "block", first, "error", err.Error())
		}
		if n > 1 || n == 1 && (walked > 1 || err != nil) {
			// A block of one good record is found by its seq; any other
			// needs a ref. Blocks hold at most maxBlockRecords.
			l.blocks = append(l.blocks, blockRef{first: first, span: uint32(min(last-first, math.MaxUint32)),
				n: uint16(min(n, maxBlockRecords)), live: uint16(min(n, maxBlockRecords))})
		}
		return nil
	})
	return maxSeq, err
}

// damage counts a record that cannot be read. Called before start.
func (l *Log) damage(key []byte, why string) {
	l.nDamaged++
	l.damaged = append(l.damaged, append([]byte(nil), key...))
	l.log.Warn("log: skipping a damaged record", "key", fmt.Sprintf("%x", key), "error", why)
}

func newEpoch() (uint64, error) {
	var b [8]byte
	for {
		if _, err := rand.Read(b[:]); err != nil {
			return 0, fmt.Errorf("log: epoch: %w", err)
		}
		if e := binary.BigEndian.Uint64(b[:]); e != 0 {
			return e, nil
		}
	}
}

// readMeta reads an 8-byte meta value; a damaged one counts as missing.
func (l *Log) readMeta(name string) (uint64, bool, error) {
	v, err := l.db.Get(MetaKey(name))
	switch {
	case errors.Is(err, ErrNotFound):
		return 0, false, nil
	case err != nil:
		return 0, false, fmt.Errorf("log: read %s: %w", name, err)
	case len(v) != 8:
		l.log.Warn("log: damaged meta value", "name", name, "len", len(v))
		return 0, false, nil
	}
	return binary.BigEndian.Uint64(v), true, nil
}

func metaOp(name string, v uint64) Op {
	return Set(MetaKey(name), binary.BigEndian.AppendUint64(nil, v))
}

// ruleFor is the index of the first rule matching topic, or -1.
func (l *Log) ruleFor(topic []byte) int { return l.ruleForString(string(topic)) }

func (l *Log) ruleForString(topic string) int {
	for i, r := range l.rules {
		if topics.Match(r.Filter, topic) {
			return i
		}
	}
	return -1
}

// index adds a stored record. Called with l.mu held (or before start), in
// seq order.
func (l *Log) index(rule int, seq uint64, timeNS int64, size int, flags uint8) {
	e := newLogEntry(seq, timeNS, size)
	l.stored++
	l.bytes += int64(e.size)
	if flags&refPending != 0 {
		l.pending++
	}
	if rule < 0 {
		l.refs[seq] = refState{size: e.size, flags: flags | refLoose}
		return
	}
	r := l.rules[rule]
	r.q.push(e)
	r.bytes += int64(e.size)
	if flags != 0 {
		l.refs[seq] = refState{size: e.size, flags: flags}
	}
}

// Epoch is the random number naming this data directory's log.
func (l *Log) Epoch() uint64 { return l.epoch }

// Head is the last seq assigned, stored or not (0 if none).
func (l *Log) Head() uint64 { return l.head.Load() }

// Append assigns m the next seq (and the time, if m.Time is 0), writes
// the record, and returns once it is durable under the DB's sync policy.
// The caller must Release the seq once routing is done.
func (l *Log) Append(m *LogMessage) (uint64, error) { return l.AppendWith(m, nil) }

// AppendWith is Append that also writes the ops extra returns for the
// message's seq (say, the queue entries of the sessions it goes to) in the
// same atomic write. extra runs under the lock that orders appends: it
// must be quick and must not call the Log. All of it must fit in one
// badger transaction (about 2.4 MB and some 20,000 ops).
func (l *Log) AppendWith(m *LogMessage, extra func(seq uint64) []Op) (uint64, error) {
	seq, wait, err := l.AppendStart(m, extra)
	if err != nil {
		return 0, err
	}
	if err := wait(); err != nil {
		return 0, err
	}
	return seq, nil
}

// AppendStart is AppendWith in two steps: it numbers and queues the write
// and returns its seq and a function that waits until the write is
// durable. Writes are durable in the order they were started, so a
// publisher can start several and wait for them in order. The seq is
// Released as after AppendWith, also if the wait fails.
func (l *Log) AppendStart(m *LogMessage, extra func(seq uint64) []Op) (uint64, func() error, error) {
	ms := [1]*LogMessage{m}
	wait, err := l.appendMessages(ms[:], extra, true)
	if err != nil {
		return 0, nil, err
	}
	return m.Seq, wait, nil
}

// AppendQueued is AppendWith that returns once the write is queued, in
// seq order, without waiting for it to be durable: for a message nobody
// was promised anything about (QoS 0). Readers (Read, Get) still see it
// only once committed; a failed write is counted in LogStats.Failed.
func (l *Log) AppendQueued(m *LogMessage, extra func(seq uint64) []Op) (uint64, error) {
	ms := [1]*LogMessage{m}
	if _, err := l.appendMessages(ms[:], extra, false); err != nil {
		return 0, err
	}
	return m.Seq, nil
}

// AppendBatch appends several messages with consecutive seqs and one
// wait. A batch larger than a transaction holds is written in several
// atomic parts, in order; an error means some of it may be stored.
func (l *Log) AppendBatch(ms []*LogMessage) error {
	wait, err := l.appendMessages(ms, nil, true)
	if err != nil {
		return err
	}
	return wait()
}

// Keeps reports whether a retention rule keeps messages to topic: storing
// one is worthwhile even when no session queues it.
func (l *Log) Keeps(topic string) bool { return l.ruleForString(topic) >= 0 }

// Number assigns m the next seq (and the time, if m.Time is 0) without
// storing it, for a message nobody keeps that live streams still number.
// It returns 0 if the log is shut down or seqs cannot be reserved.
func (l *Log) Number(m *LogMessage) uint64 {
	if m.Time == 0 {
		m.Time = l.now().UnixNano()
	}
	l.appendMu.Lock()
	defer l.appendMu.Unlock()
	if l.closed {
		return 0
	}
	seq, err := l.take(1)
	if err != nil {
		l.log.Error("log: reserve sequence numbers", "error", err)
		return 0
	}
	m.Seq = seq
	l.numbered.Add(1)
	return seq
}

// appendMessages appends ms; extra, if set, adds ops for the seq of a
// single message to its write. It returns once the writes are queued;
// with durable, the function it returns waits until they are durable
// under the sync policy (without, it returns nil at once).
func (l *Log) appendMessages(ms []*LogMessage, extra func(seq uint64) []Op, durable bool) (func() error, error) {
	if len(ms) == 0 {
		return noWait, nil
	}
	now := l.now().UnixNano()
	total := 0
	for _, m := range ms {
		if m.QoS > 2 {
			return nil, fmt.Errorf("log: append %q: QoS %d", m.Topic, m.QoS)
		}
		if m.Time == 0 {
			m.Time = now
		}
		total += logRecordSize(m)
	}
	// Encode outside the lock, into one buffer; under it the records are
	// copied into blocks.
	buf := make([]byte, 0, total)
	var oneRule [1]int
	var oneRec [1][]byte
	rules, recs := oneRule[:], oneRec[:]
	if len(ms) > 1 {
		rules, recs = make([]int, len(ms)), make([][]byte, len(ms))
	}
	for i, m := range ms {
		start := len(buf)
		buf = appendLogRecord(buf, m)
		recs[i] = buf[start:len(buf):len(buf)]
		rules[i] = l.ruleForString(m.Topic)
	}
	return l.commitAppend(ms, rules, recs, now, extra, durable)
}

func noWait() error { return nil }

// commitAppend numbers the encoded records, adds them to blocks, indexes
// them and queues the blocks' writes in seq order, then waits for them
// outside the lock.
//
// The open block (queued, not yet taken by the committer) takes the
// records only while it is the last request queued, so they commit in the
// order of every write queued before the append (a session's delete
// before a queue entry of its successor). It is locked for the whole of
// it, so the committer cannot commit a record before it is indexed; a
// block opened here is queued only after.
func (l *Log) commitAppend(ms []*LogMessage, rules []int, recs [][]byte, now int64, with func(uint64) []Op, durable bool) (func() error, error) {
	l.appendMu.Lock()
	if l.closed {
		l.appendMu.Unlock()
		return nil, ErrClosed
	}
	first, err := l.take(uint64(len(ms)))
	if err != nil {
		l.appendMu.Unlock()
		return nil, fmt.Errorf("log: reserve sequence numbers: %w", err)
	}
	for i, m := range ms {
		m.Seq = first + uint64(i)
	}
	var ops []Op
	if with != nil && len(ms) == 1 {
		ops = with(ms[0].Seq)
	}
	opBytes := 0
	for _, op := range ops {
		opBytes += op.Size()
	}

	held := l.open
	if held != nil {
		held.mu.Lock()
		if !held.sealed && !l.db.isLast(&held.req) {
			// A write queued after the block returned: records added now
			// would commit before it. The block ends here.
			held.sealLocked()
		}
		if held.sealed {
			l.blockHint = len(held.buf) // the next block will likely be as large
			held.mu.Unlock()
			held = nil
		}
	}
	// Add the records: to the open block while they fit, then to new ones.
	var oneBlock [1]*logBlock
	var oneCount [1]int
	touched, counts := oneBlock[:0], oneCount[:0]
	cur := held
	for i, rec := range recs {
		var rops []Op
		rb := 0
		if i == 0 {
			rops, rb = ops, opBytes
		}
		if cur == nil || !cur.fits(l, ms[i].Seq, len(rec), len(rops), rb) {
			if cur != nil {
				cur.sealLocked()
				l.blockHint = len(cur.buf)
			}
			cur = l.newBlock(ms[i].Seq)
		}
		if len(touched) == 0 || touched[len(touched)-1] != cur {
			touched, counts = append(touched, cur), append(counts, 0)
		}
		counts[len(counts)-1]++
		cur.add(ms[i].Seq, rec, rops)
	}

	l.mu.Lock()
	for i, m := range ms {
		l.index(rules[i], m.Seq, m.Time, m.Size(), refPending)
	}
	for i, b := range touched {
		l.registerBlock(b, counts[i], i == len(touched)-1 && !b.sealed)
	}
	extra, poke := l.trimOnAppend(rules, now)
	l.mu.Unlock()
	if len(extra) > 0 {
		cur.addOps(extra)
	}
	if cur.sealed {
		l.open = nil
	} else {
		l.open = cur
	}
	if held != nil {
		held.mu.Unlock()
	}

	queued, records := 0, 0
	for i, b := range touched {
		if b != held {
			if err = l.db.enqueue(&b.req); err != nil {
				l.open = nil
				break
			}
		}
		queued++
		records += counts[i]
	}
	if records > 0 {
		l.queued.Store(ms[records-1].Seq)
	}
	l.appendMu.Unlock()
	if poke {
		l.poke()
	}
	l.appended.Add(int64(records))
	if err != nil {
		// The DB is closed: the seqs are spent, the records not stored.
		l.failed.Add(int64(len(ms) - records))
		return nil, fmt.Errorf("log: append: %w", err)
	}
	if !durable || l.db.opts.Sync == SyncNone {
		return noWait, nil
	}
	if len(touched) == 1 {
		return touched[0].wait, nil
	}
	return func() error {
		var err error
		for _, b := range touched {
			if werr := b.wait(); werr != nil {
				err = werr
			}
		}
		return err
	}, nil
}

// trimOnAppend applies the count and byte limits (and age, with the same
// clock) of the rules just appended to. They apply at once in the index;
// their deletes gather and go, with the trim mark, in the write of the
// append that finds enough of them (extra), or in the trimmer's within a
// second. A big backlog is left to the trimmer (poke). Called with l.mu
// held.
func (l *Log) trimOnAppend(rules []int, now int64) (extra []Op, poke bool) {
	if !l.trimming {
		return nil, false
	}
	prev := -1
	for _, ri := range rules {
		if ri >= 0 && ri != prev {
			l.dels = l.trimRule(l.rules[ri], now, maxPiggyDeletes, l.dels)
			prev = ri
		}
	}
	l.dels = l.trimIndex(maxPiggyDeletes, l.dels)
	switch n := len(l.dels); {
	case n > maxPiggyDeletes:
		return nil, true
	case n >= minPiggyDeletes:
		extra = l.markOp(append(make([]Op, 0, n+1), l.dels...))
		clear(l.dels)
		l.dels = l.dels[:0]
	}
	return extra, false
}

// wrote is the committer's report of a block of n records up to seq
// last: blocks commit in queue order, so every stored seq up to last is
// then committed (or failed).
func (l *Log) wrote(last uint64, n int, err error) {
	if err != nil {
		l.failed.Add(int64(n))
	}
	for {
		c := l.committed.Load()
		if c >= last || l.committed.CompareAndSwap(c, last) {
			break
		}
	}
	if l.waiters.Load() > 0 {
		l.cmu.Lock()
		close(l.cch)
		l.cch = make(chan struct{})
		l.cmu.Unlock()
	}
}

// take assigns k seqs and returns the first, once they are reserved in the
// store. It asks for the next block half a block ahead, so appends wait
// for a reservation only when they outrun the store. Called with
// l.appendMu held.
func (l *Log) take(k uint64) (uint64, error) {
	need := l.last + k
	r := &l.res
	waited := false
	for {
		r.mu.Lock()
		ok := need <= r.durable
		if !ok && waited && !r.inflight && r.err != nil {
			err := r.err
			r.mu.Unlock()
			return 0, err
		}
		var ask uint64
		if !r.inflight && need+l.opts.ReserveBlock/2 >= r.asked {
			ask = max(r.asked, need) + l.opts.ReserveBlock
			r.asked, r.inflight = ask, true
		}
		ch := r.ch
		r.mu.Unlock()
		if ask != 0 {
			l.db.WriteAsyncThen(func(err error) { l.reserved(ask, err) }, metaOp(metaLogReserved, ask))
		}
		if ok {
			first := l.last + 1
			l.last = need
			l.head.Store(need)
			return first, nil
		}
		<-ch
		waited = true
	}
}

// reserved completes a reservation; called by the committer.
func (l *Log) reserved(upto uint64, err error) {
	r := &l.res
	r.mu.Lock()
	defer r.mu.Unlock()
	r.inflight = false
	r.err = err
	if err == nil {
		r.durable = max(r.durable, upto)
	} else {
		r.asked = r.durable
	}
	close(r.ch)
	r.ch = make(chan struct{})
}

// Shutdown stops the trimmer, rejects further appends (ErrClosed) and
// queues the pending deletes. Call it after the engine stopped and before
// the DB shuts down. It is idempotent.
func (l *Log) Shutdown(ctx context.Context) error {
	l.appendMu.Lock()
	l.closed = true
	l.appendMu.Unlock()
	l.shutOnce.Do(func() { close(l.done) })
	stopped := make(chan struct{})
	go func() { l.wg.Wait(); close(stopped) }()
	select {
	case <-stopped:
	case <-ctx.Done():
		return fmt.Errorf("log shutdown: %w", ctx.Err())
	}
	l.mu.Lock()
	l.closeLast() // no append adds to the open block any more
	ops := l.markFirst(l.dels)
	l.dels = nil
	l.mu.Unlock()
	l.writeDeletes(ops)
	return nil
}
