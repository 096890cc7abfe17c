package hooks

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/beaconmq/beacon/devices"
	"github.com/beaconmq/beacon/storage"
)

// HistoryRule says which messages are recorded and for how long: the
// newest MaxMessages messages matching Filter, none older than MaxAge.
// A message belongs to the first rule whose filter matches it.
type HistoryRule struct {
	Filter      string
	MaxMessages int
	MaxAge      time.Duration
}

// HistoryOptions configure a History.
type HistoryOptions struct {
	DB    *storage.DB
	Rules []HistoryRule
	Log   *slog.Logger
	// ReserveBlock is how many sequence numbers are reserved in the store
	// at a time (default 65,536), so that a sequence handed out live is
	// never reused after a crash.
	ReserveBlock uint64
	// Publisher, when set, names the registered device a client is (or
	// ""), recorded with its messages so codecs can go by device type.
	Publisher func(cl *mqtt.Client) string
}

// Record is a message as the bridges see it: a sequence number in the
// history's epoch and the message.
type Record = storage.HistoryRecord

// Reasons a position cannot be replayed from.
const (
	ResetUnknown      = "unknown"       // not an id of ours, or from the future
	ResetForeignEpoch = "foreign_epoch" // an id from another store (wiped or replaced)
	ResetExpired      = "expired"       // messages after it were trimmed by retention
)

// ErrReset is returned for a position that cannot be replayed from; it
// wraps one of the Reset reasons as text.
type ErrReset struct{ Reason string }

func (e *ErrReset) Error() string { return "cannot replay: " + e.Reason }

// History is the broker's message history and live feed for the browser
// bridges. Every routed message gets the next sequence number; messages
// matching a rule are queued to the store in sequence order (without
// waiting for the commit); watchers get every message matching their
// filters. The sequence is assigned and the watchers fed under one lock,
// so a watcher registered at sequence S sees exactly the messages after S,
// and a replay up to S followed by the watcher's messages has no gap and
// no duplicate.
//
// Add it before the Store hook: its record is then queued before the
// store deletes the message from the ingress log, so a crash cannot lose
// an acknowledged message from the history.
type History struct {
	mqtt.HookBase
	opts  HistoryOptions
	log   *slog.Logger
	db    *storage.DB
	epoch string

	mu        sync.Mutex
	seq       uint64 // last sequence handed out
	reserved  uint64 // sequences up to this are reserved in the store
	rules     []*ruleState
	trimmed   uint64            // highest sequence ever trimmed
	savedTrim uint64            // the trim mark as last written to the store
	last      map[string]uint64 // topic -> newest recorded sequence
	queued    uint64            // last recorded sequence queued to the store

	// persisted is the last recorded sequence committed (records commit in
	// order). The committer updates it without h.mu, which a publisher may
	// hold while it waits for room in the store's queue.
	persisted atomic.Uint64
	flushMu   sync.Mutex
	flushed   chan struct{} // closed (and replaced) after each commit
	watches   map[*Watch]struct{}
	exact     map[string]map[*Watch]struct{}
	wild      map[*Watch][][]string
	closed    bool

	done chan struct{}
	wg   sync.WaitGroup

	recorded  atomic.Int64
	trimCount atomic.Int64
	failed    atomic.Int64
	overflows atomic.Int64
}

type ruleState struct {
	HistoryRule
	levels  []string
	entries []entry // oldest first, from head
	head    int
	trimmed uint64 // highest sequence trimmed from this rule
}

type entry struct {
	seq   uint64
	ts    int64
	topic string
}

var _ mqtt.Hook = (*History)(nil)

const (
	metaEpoch    = "history/epoch"
	metaReserved = "history/reserved"
	metaTrimmed  = "history/trimmed"
)

// NewHistory opens the history in opts.DB: it loads (or creates) the
// epoch, resumes the sequence after everything handed out before, and
// indexes the stored records under the current rules, deleting what they
// no longer keep.
func NewHistory(opts HistoryOptions) (*History, error) {
	if opts.ReserveBlock == 0 {
		opts.ReserveBlock = 1 << 16
	}
	if opts.Log == nil {
		opts.Log = slog.Default()
	}
	h := &History{
		opts:    opts,
		log:     opts.Log,
		db:      opts.DB,
		last:    map[string]uint64{},
		flushed: make(chan struct{}),
		watches: map[*Watch]struct{}{},
		exact:   map[string]map[*Watch]struct{}{},
		wild:    map[*Watch][][]string{},
		done:    make(chan struct{}),
	}
	for _, r := range opts.Rules {
		if r.MaxMessages <= 0 {
			return nil, fmt.Errorf("history rule %q: max_messages must be positive", r.Filter)
		}
		h.rules = append(h.rules, &ruleState{HistoryRule: r, levels: strings.Split(r.Filter, "/")})
	}
	if err := h.load(); err != nil {
		return nil, err
	}
	h.wg.Add(1)
	go h.ager()
	return h, nil
}

func (h *History) load() error {
	epoch, err := h.db.Get(storage.MetaKey(metaEpoch))
	switch {
	case errors.Is(err, storage.ErrNotFound):
		b := make([]byte, 6)
		if _, err := rand.Read(b); err != nil {
			return err
		}
		epoch = []byte(hex.EncodeToString(b))
		if err := h.db.Commit(storage.Set(storage.MetaKey(metaEpoch), epoch)); err != nil {
			return fmt.Errorf("history: store epoch: %w", err)
		}
	case err != nil:
		return fmt.Errorf("history: read epoch: %w", err)
	}
	h.epoch = string(epoch)
	h.seq = h.readMeta(metaReserved)
	h.trimmed = h.readMeta(metaTrimmed)

	var dels []storage.Op
	err = h.db.Scan(storage.HistoryPrefix(), func(key, value []byte) error {
		seq, ok := storage.ParseHistoryKey(key)
		if !ok {
			return nil
		}
		h.seq = max(h.seq, seq)
		topic, ts, err := storage.PeekHistory(value)
		if err != nil {
			h.log.Warn("history: dropping a corrupt record", "seq", seq, "error", err)
			dels = append(dels, storage.Delete(bytes.Clone(key)))
			return nil
		}
		r := h.ruleFor(string(topic))
		if r == nil { // the rules changed: no longer kept
			dels = append(dels, storage.Delete(bytes.Clone(key)))
			h.trimmed = max(h.trimmed, seq)
			return nil
		}
		t := string(topic)
		r.entries = append(r.entries, entry{seq: seq, ts: ts, topic: t})
		h.last[t] = seq
		return nil
	})
	if err != nil {
		return fmt.Errorf("history: load: %w", err)
	}
	now := time.Now()
	for _, r := range h.rules {
		r.trimmed = h.trimmed
		if n := len(r.entries); n > 0 && n >= r.MaxMessages {
			// Full: older records may have been trimmed by count since the
			// trim mark was last written.
			r.trimmed = max(r.trimmed, r.entries[0].seq-1)
			h.trimmed = max(h.trimmed, r.trimmed)
		}
		for _, seq := range h.trimRule(r, now) {
			dels = append(dels, storage.Delete(storage.HistoryKey(seq)))
		}
	}
	h.persisted.Store(h.seq)
	h.queued = h.seq
	h.reserved = h.seq + h.opts.ReserveBlock
	// The marks first (a trim mark ahead of its deletes is safe), then the
	// deletes in batches a transaction can hold.
	if err := h.db.Commit(h.metaOp(metaReserved, h.reserved), h.metaOp(metaTrimmed, h.trimmed)); err != nil {
		return fmt.Errorf("history: reserve sequences: %w", err)
	}
	h.savedTrim = h.trimmed
	for len(dels) > 0 {
		n := min(len(dels), maxOpsPerWrite)
		if err := h.db.Commit(dels[:n]...); err != nil {
			return fmt.Errorf("history: trim: %w", err)
		}
		dels = dels[n:]
	}
	return nil
}

func (h *History) readMeta(name string) uint64 {
	v, err := h.db.Get(storage.MetaKey(name))
	if err != nil || len(v) != 8 {
		return 0
	}
	return binary.BigEndian.Uint64(v)
}

func (h *History) metaOp(name string, v uint64) storage.Op {
	return storage.Set(storage.MetaKey(name), binary.BigEndian.AppendUint64(nil, v))
}

// ruleFor is the first rule matching topic, or nil.
func (h *History) ruleFor(topic string) *ruleState {
	for _, r := range h.rules {
		if devices.MatchesTopic(r.levels, topic) {
			return r
		}
	}
	return nil
}

// trimRule removes entries beyond the rule's count and age limits and
// returns their sequences. Called with h.mu held (or before start).
func (h *History) trimRule(r *ruleState, now time.Time) []uint64 {
	var out []uint64
	cutoff := int64(-1 << 63)
	if r.MaxAge > 0 {
		cutoff = now.Add(-r.MaxAge).UnixMilli()
	}
	for r.head < len(r.entries) && (len(r.entries)-r.head > r.MaxMessages || r.entries[r.head].ts < cutoff) {
		e := r.entries[r.head]
		r.entries[r.head] = entry{}
		r.head++
		out = append(out, e.seq)
		r.trimmed = max(r.trimmed, e.seq)
		h.trimmed = max(h.trimmed, e.seq)
		if h.last[e.topic] == e.seq {
			delete(h.last, e.topic)
		}
	}
	// Compact once the dead prefix is half the slice.
	if r.head > 64 && r.head*2 >= len(r.entries) {
		r.entries = append(r.entries[:0], r.entries[r.head:]...)
		r.head = 0
	}
	return out
}

// Epoch is the store's history epoch: a random name made when the store
// was created.
func (h *History) Epoch() string { return h.epoch }

// EventID is the event id of a sequence number: opaque to clients.
func (h *History) EventID(seq uint64) string { return h.epoch + "-" + strconv.FormatUint(seq, 10) }

// Seq is the last sequence handed out.
func (h *History) Seq() uint64 {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.seq
}

// ParseID returns the sequence of an event id of this store, or an
// *ErrReset saying why it is not one.
func (h *History) ParseID(id string) (uint64, error) {
	i := strings.LastIndexByte(id, '-')
	if i < 0 {
		return 0, &ErrReset{Reason: ResetUnknown}
	}
	seq, err := strconv.ParseUint(id[i+1:], 10, 64)
	if err != nil {
		return 0, &ErrReset{Reason: ResetUnknown}
	}
	if id[:i] != h.epoch {
		return 0, &ErrReset{Reason: ResetForeignEpoch}
	}
	if seq > h.Seq() {
		return 0, &ErrReset{Reason: ResetUnknown}
	}
	return seq, nil
}

// ID implements mqtt.Hook.
func (h *History) ID() string { return "beacon-history" }

// Provides implements mqtt.Hook.
func (h *History) Provides(b byte) bool { return b == mqtt.OnPublished }

// OnPublished numbers a routed message, records it when a rule wants it,
// and feeds the watchers.
func (h *History) OnPublished(cl *mqtt.Client, pk packets.Packet) {
	if pk.Ignore || pk.FixedHeader.Type != packets.Publish {
		return
	}
	device := ""
	if h.opts.Publisher != nil {
		device = h.opts.Publisher(cl)
	}
	h.Publish(&Record{Topic: pk.TopicName, Payload: pk.Payload, QoS: pk.FixedHeader.Qos, Retain: pk.FixedHeader.Retain,
		Device: device}, time.Now())
}

// Publish numbers, records and feeds one message (its Seq and TS are
// set here). OnPublished calls it for everything the engine routes.
func (h *History) Publish(rec *Record, now time.Time) {
	topic := rec.Topic
	rec.TS = now.UnixMilli()
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.closed {
		return
	}
	if h.seq >= h.reserved {
		// Reserve before handing out: a sequence seen live must never be
		// handed out again after a crash. One commit per block.
		next := h.seq + h.opts.ReserveBlock
		if err := h.db.Commit(h.metaOp(metaReserved, next)); err != nil {
			h.log.Error("history: reserve sequences", "error", err)
		} else {
			h.reserved = next
		}
	}
	h.seq++
	rec.Seq = h.seq
	if r := h.ruleFor(topic); r != nil {
		r.entries = append(r.entries, entry{seq: rec.Seq, ts: rec.TS, topic: topic})
		h.last[topic] = rec.Seq
		h.recorded.Add(1)
		ops := []storage.Op{storage.Set(storage.HistoryKey(rec.Seq), storage.AppendHistory(nil, rec))}
		if len(r.entries)-r.head > r.MaxMessages {
			// The trim mark is written within a second (ager) and at
			// shutdown, not per message; after a crash, a rule found full
			// counts as trimmed up to its oldest record (see load).
			for _, seq := range h.trimRule(r, now) {
				ops = append(ops, storage.Delete(storage.HistoryKey(seq)))
				h.trimCount.Add(1)
			}
		}
		h.queued = rec.Seq
		seq := rec.Seq
		h.db.WriteAsyncThen(func(err error) { h.committed(seq, err) }, ops...)
	}
	h.feed(rec)
}

// trimOps appends the deletes of trimmed sequences to ops.
func (h *History) trimOps(ops []storage.Op, trimmed []uint64) []storage.Op {
	for _, seq := range trimmed {
		ops = append(ops, storage.Delete(storage.HistoryKey(seq)))
	}
	h.trimCount.Add(int64(len(trimmed)))
	return ops
}

// maxOpsPerWrite keeps a write well inside one badger transaction.
const maxOpsPerWrite = 4096

// writeTrims queues the trim mark, if it moved, then ops in batches.
// Called with h.mu held.
func (h *History) writeTrims(ops []storage.Op) {
	if h.closed {
		return
	}
	if h.trimmed > h.savedTrim {
		h.db.WriteAsync(h.metaOp(metaTrimmed, h.trimmed))
		h.savedTrim = h.trimmed
	}
	for len(ops) > 0 {
		n := min(len(ops), maxOpsPerWrite)
		h.db.WriteAsync(ops[:n]...)
		ops = ops[n:]
	}
}

// committed is called by the store's committer once the record seq (and
// everything queued before it) is committed.
func (h *History) committed(seq uint64, err error) {
	if err != nil {
		// The message went out live; a replay will miss it. Rare: the
		// store itself is failing, and says so in its own log.
		h.failed.Add(1)
	}
	if seq > h.persisted.Load() {
		h.persisted.Store(seq)
	}
	h.flushMu.Lock()
	close(h.flushed)
	h.flushed = make(chan struct{})
	h.flushMu.Unlock()
}

// feed hands rec to every watcher with a matching filter, once. Called
// with h.mu held.
func (h *History) feed(rec *Record) {
	for w := range h.exact[rec.Topic] {
		h.send(w, rec)
	}
	for w, filters := range h.wild {
		if w.last == rec.Seq {
			continue
		}
		for _, f := range filters {
			if devices.MatchesTopic(f, rec.Topic) {
				h.send(w, rec)
				break
			}
		}
	}
}

func (h *History) send(w *Watch, rec *Record) {
	if w.last == rec.Seq {
		return
	}
	select {
	case w.ch <- rec:
		w.last = rec.Seq
	default:
		// The watcher fell behind: end it rather than block the broker or
		// skip messages. Its client resumes from its last id.
		h.overflows.Add(1)
		h.unwatch(w)
		w.overflow = true
		close(w.ch)
		close(w.ended)
	}
}

// ager trims by age every second.
func (h *History) ager() {
	defer h.wg.Done()
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		select {
		case <-h.done:
			return
		case now := <-t.C:
			// Trims by age, and the trim mark that count trims moved (they
			// do not write it per message).
			h.mu.Lock()
			var ops []storage.Op
			for _, r := range h.rules {
				if r.MaxAge > 0 {
					ops = h.trimOps(ops, h.trimRule(r, now))
				}
			}
			h.writeTrims(ops)
			h.mu.Unlock()
		}
	}
}

// waitPersisted returns once every recorded message up to seq is
// committed and readable.
func (h *History) waitPersisted(ctx context.Context, seq uint64) error {
	h.mu.Lock()
	seq = min(seq, h.queued)
	h.mu.Unlock()
	for {
		h.flushMu.Lock()
		ch := h.flushed
		h.flushMu.Unlock()
		if h.persisted.Load() >= seq {
			return nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// Records reports whether every message a filter matches is recorded: a
// rule's filter covers it.
func (h *History) Records(filter string) bool {
	levels := strings.Split(filter, "/")
	for _, r := range h.rules {
		if devices.Covers(r.levels, levels) {
			return true
		}
	}
	return false
}

// CanReplay reports whether every recorded message after seq matching any
// of filters is still stored; if not it returns an *ErrReset.
func (h *History) CanReplay(seq uint64, filters []string) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if seq > h.seq {
		return &ErrReset{Reason: ResetUnknown}
	}
	for _, r := range h.rules {
		if r.trimmed <= seq {
			continue
		}
		for _, f := range filters {
			if devices.Overlaps(r.levels, strings.Split(f, "/")) {
				return &ErrReset{Reason: ResetExpired}
			}
		}
	}
	return nil
}

// Replay calls fn, in order, for every recorded message with a sequence
// in (after, upto] that match accepts, until fn returns false. It returns
// an *ErrReset, before calling fn, if retention has meanwhile removed
// messages after "after" that filters match: checked once the read
// snapshot is taken, so nothing trimmed before it goes unnoticed and
// nothing trimmed after it is missing from it.
func (h *History) Replay(ctx context.Context, after, upto uint64, filters []string, match func(topic string) bool, fn func(*Record) bool) error {
	if err := h.waitPersisted(ctx, upto); err != nil {
		return err
	}
	check := func() error { return h.CanReplay(after, filters) }
	if after >= upto {
		return check()
	}
	var derr error
	err := h.db.ScanSnapshot(storage.HistoryPrefix(), storage.HistoryKey(after+1), check, func(key, value []byte) bool {
		seq, ok := storage.ParseHistoryKey(key)
		if !ok || seq > upto || ctx.Err() != nil {
			return false
		}
		topic, _, err := storage.PeekHistory(value)
		if err != nil || !match(string(topic)) {
			return true
		}
		rec, err := storage.DecodeHistory(key, value)
		if err != nil {
			derr = err
			return false
		}
		return fn(&rec)
	})
	return errors.Join(err, derr, ctx.Err())
}

// Last returns the newest recorded message on topic.
func (h *History) Last(ctx context.Context, topic string) (*Record, bool, error) {
	h.mu.Lock()
	seq, ok := h.last[topic]
	h.mu.Unlock()
	if !ok {
		return nil, false, nil
	}
	if err := h.waitPersisted(ctx, seq); err != nil {
		return nil, false, err
	}
	v, err := h.db.Get(storage.HistoryKey(seq))
	if errors.Is(err, storage.ErrNotFound) {
		return nil, false, nil // trimmed meanwhile
	}
	if err != nil {
		return nil, false, err
	}
	rec, err := storage.DecodeHistory(storage.HistoryKey(seq), v)
	if err != nil {
		return nil, false, err
	}
	return &rec, true, nil
}

// Watch is a live feed of the messages matching some filters, from the
// sequence it was registered at on.
type Watch struct {
	h        *History
	From     uint64 // the last sequence before the watch began
	ch       chan *Record
	ended    chan struct{} // closed with ch
	filters  []string
	last     uint64 // guarded by h.mu
	overflow bool   // guarded by h.mu; set before ch is closed
	stopped  bool   // guarded by h.mu
}

// Watch registers a feed of the messages matching filters, buffering up to
// buffer messages. A watcher that lets its buffer fill is ended: C is
// closed and Overflowed reports true.
func (h *History) Watch(filters []string, buffer int) *Watch {
	w := &Watch{h: h, ch: make(chan *Record, buffer), ended: make(chan struct{}), filters: filters}
	h.mu.Lock()
	defer h.mu.Unlock()
	w.From = h.seq
	w.last = h.seq
	if h.closed {
		w.stopped = true
		close(w.ch)
		close(w.ended)
		return w
	}
	h.watches[w] = struct{}{}
	var wild [][]string
	for _, f := range filters {
		if strings.ContainsAny(f, "+#") {
			wild = append(wild, strings.Split(f, "/"))
			continue
		}
		if h.exact[f] == nil {
			h.exact[f] = map[*Watch]struct{}{}
		}
		h.exact[f][w] = struct{}{}
	}
	if len(wild) > 0 {
		h.wild[w] = wild
	}
	return w
}

// C delivers the messages; it is closed when the watch overflows or the
// history shuts down.
func (w *Watch) C() <-chan *Record { return w.ch }

// Ended is closed when C is: the watch overflowed or the history shut
// down. A writer blocked on a stuck client can watch it to give up at once.
func (w *Watch) Ended() <-chan struct{} { return w.ended }

// Overflowed reports whether the watch ended because its reader fell
// behind.
func (w *Watch) Overflowed() bool {
	w.h.mu.Lock()
	defer w.h.mu.Unlock()
	return w.overflow
}

// Stop unregisters the watch.
func (w *Watch) Stop() {
	w.h.mu.Lock()
	defer w.h.mu.Unlock()
	w.h.unwatch(w)
}

// unwatch removes w from the index. Called with h.mu held.
func (h *History) unwatch(w *Watch) {
	if w.stopped {
		return
	}
	w.stopped = true
	delete(h.watches, w)
	for _, f := range w.filters {
		if set := h.exact[f]; set != nil {
			delete(set, w)
			if len(set) == 0 {
				delete(h.exact, f)
			}
		}
	}
	delete(h.wild, w)
}

// HistoryStats are the history's counters.
type HistoryStats struct {
	Seq       uint64 // last sequence handed out
	Stored    int    // records stored now
	Recorded  int64  // records written since start
	Trimmed   int64  // records removed by retention since start
	Failed    int64  // records the store failed to commit
	Overflows int64  // watchers ended because they fell behind
	Watchers  int
}

// Stats returns the counters.
func (h *History) Stats() HistoryStats {
	h.mu.Lock()
	defer h.mu.Unlock()
	s := HistoryStats{Seq: h.seq, Recorded: h.recorded.Load(), Trimmed: h.trimCount.Load(),
		Failed: h.failed.Load(), Overflows: h.overflows.Load(), Watchers: len(h.watches)}
	for _, r := range h.rules {
		s.Stored += len(r.entries) - r.head
	}
	return s
}

// Shutdown stops the history: watchers are ended and the records the
// engine routed are committed. Call it after the engine has stopped and
// before the store closes.
func (h *History) Shutdown(ctx context.Context) error {
	h.mu.Lock()
	if h.closed {
		h.mu.Unlock()
		return nil
	}
	if h.trimmed > h.savedTrim {
		h.db.WriteAsync(h.metaOp(metaTrimmed, h.trimmed)) // committed before the store closes
		h.savedTrim = h.trimmed
	}
	h.closed = true
	for w := range h.watches {
		h.unwatch(w)
		close(w.ch)
		close(w.ended)
	}
	h.mu.Unlock()
	close(h.done)
	stopped := make(chan struct{})
	go func() { h.wg.Wait(); close(stopped) }()
	select {
	case <-stopped:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("history: %w", ctx.Err())
	}
}
