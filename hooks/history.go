package hooks

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/beaconmq/beacon/storage"
)

// HistoryOptions configure a History. Zero values take the documented
// defaults.
type HistoryOptions struct {
	// Log is the broker's message log, opened with the retention rules
	// built from history.rules: it is the history. Required.
	Log    *storage.Log
	Logger *slog.Logger
	// GapWait is how long live delivery waits for a seq that has not been
	// fed while later ones have (see History); default 1s.
	GapWait time.Duration
	// LastTopics bounds the topics whose newest record Last finds without
	// reading the log (see Last); default 65,536.
	LastTopics int
}

// Record is a message as the bridges see it: its seq in the message log
// and the message.
type Record = storage.HistoryRecord

// Reasons a position cannot be replayed from.
const (
	ResetUnknown      = "unknown"       // not an id of ours, or from the future
	ResetForeignEpoch = "foreign_epoch" // an id of another log (wiped or replaced, or of the history before the log)
	ResetExpired      = "expired"       // messages after it were trimmed by retention
)

// ErrReset is returned for a position that cannot be replayed from; it
// wraps one of the Reset reasons as text.
type ErrReset struct{ Reason string }

func (e *ErrReset) Error() string { return "cannot replay: " + e.Reason }

// History is the browser bridges' view of the message log: replays read
// the log (storage.Log), and a live fan-out hands the messages the broker
// feeds to the watchers whose filters match. It stores nothing itself: the
// engine appends every accepted message once to the log, retention is the
// log's rules, and ids are the log's (epoch, seq).
//
// # Replay and live: no gap, no duplicate
//
// A watch is registered at From, the log's Head read under the lock Feed
// takes to fan out, and gets live exactly the fed messages with Seq >
// From. Everything the log stored with Seq <= From is in a Replay up to
// From (Log.Read waits for those writes to commit), so a message numbered
// before the watch and fed after it is replayed, not repeated live.
// Messages the log did not store (numbered only: no rule keeps their
// topic) are live only.
//
// # Order of live delivery
//
// A browser resumes from the id of the last event it saw, and the replay
// that follows covers only seqs after it: an id must mean "everything
// matching up to here was seen". Feed is called from many goroutines, not
// in seq order, so History puts the feed back in order: a message is
// handed to the watchers only once every lower seq has been fed (a fed
// message no watcher wants is only counted), and each watch gets its
// messages in increasing seq order. A message whose predecessor is
// missing is held (Stats.Held); a seq not fed within GapWait of becoming
// the oldest missing one is given up on (Stats.Skipped: the engine
// numbered it but failed to store or route it, which happens only when
// the store fails), and the messages after it go out. A given-up seq that
// is fed after all is delivered late, out of order (Stats.Late); a seq
// fed twice, or one numbered before the History was made, is dropped.
type History struct {
	log     *storage.Log
	logger  *slog.Logger
	gapWait time.Duration

	mu       sync.Mutex
	closed   bool
	interest func(filter string, added bool) // guarded by mu; SetInterest
	watches  map[*Watch]struct{}
	exact    map[string]map[*Watch]struct{}
	wild     map[*Watch][][]string
	stamp    uint64 // one per delivered record: a watch with overlapping filters gets it once
	done     uint64 // every seq up to this has been fed or given up on
	held     map[uint64]*Record
	gapSince time.Time           // when the oldest missing seq became the oldest
	armed    bool                // the gap timer is set
	timer    *time.Timer         // gives up on a gap; nil until the first one
	gaveUp   map[uint64]struct{} // seqs given up on (bounded), fed late if at all

	last lastIndex

	frame func(*Record) []byte // encodes Record.Frame; nil: none

	overflows atomic.Int64
	skips     atomic.Int64
	late      atomic.Int64

	stop     chan struct{}
	wg       sync.WaitGroup
	shutOnce sync.Once
}

// Bounds of the reordering.
const (
	maxHeld    = 1 << 16 // held messages beyond which the oldest gap is given up on at once
	maxSkipped = 1 << 10 // given-up seqs remembered for a late feed
)

// NewHistory makes the history of opts.Log. Make it before the engine
// accepts messages: seqs numbered before it are not delivered live. It
// starts indexing the newest record of each topic for Last in the
// background.
func NewHistory(opts HistoryOptions) (*History, error) {
	if opts.Log == nil {
		return nil, errors.New("history: no message log")
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.GapWait <= 0 {
		opts.GapWait = time.Second
	}
	if opts.LastTopics <= 0 {
		opts.LastTopics = 1 << 16
	}
	h := &History{
		log:     opts.Log,
		logger:  opts.Logger,
		gapWait: opts.GapWait,
		watches: map[*Watch]struct{}{},
		exact:   map[string]map[*Watch]struct{}{},
		wild:    map[*Watch][][]string{},
		held:    map[uint64]*Record{},
		gaveUp:  map[uint64]struct{}{},
		stop:    make(chan struct{}),
	}
	h.mu.Lock()
	h.done = h.log.Head()
	h.mu.Unlock()
	h.last.init(opts.LastTopics/2, h.done)
	h.wg.Add(1)
	go h.indexLast(h.done)
	return h, nil
}

// Epoch is the epoch of the log the history is.
func (h *History) Epoch() uint64 { return h.log.Epoch() }

// TimeOf is when the message seq was accepted (unix milliseconds); false
// if the log does not hold it.
func (h *History) TimeOf(seq uint64) (int64, bool) {
	m, err := h.log.Get(seq)
	if err != nil {
		return 0, false
	}
	return m.Time / int64(time.Millisecond), true
}

// EventID is the browser event id of a seq: opaque to clients.
func (h *History) EventID(seq uint64) string { return h.log.FormatID(seq) }

// ParseID returns the seq of an event id of this log, or an *ErrReset
// saying why it is not one.
func (h *History) ParseID(id string) (uint64, error) {
	seq, err := h.log.ParseID(id)
	switch {
	case err == nil:
		return seq, nil
	case errors.Is(err, storage.ErrLogIDForeign):
		return 0, &ErrReset{Reason: ResetForeignEpoch}
	default: // malformed, or from the future
		return 0, &ErrReset{Reason: ResetUnknown}
	}
}

// Keeps reports whether a retention rule records messages on topic.
func (h *History) Keeps(topic string) bool { return h.log.Keeps(topic) }

// Records reports whether every message a filter matches is recorded: a
// retention rule of the log covers it, so a replay of it is complete.
func (h *History) Records(filter string) bool { return h.log.Retains(filter) }

// CanReplay reports whether every recorded message after seq matching any
// of filters is still stored; if not it returns an *ErrReset.
func (h *History) CanReplay(seq uint64, filters []string) error {
	if seq > h.log.Head() {
		return &ErrReset{Reason: ResetUnknown}
	}
	if h.log.OldestFor(filters...) > seq+1 {
		return &ErrReset{Reason: ResetExpired}
	}
	return nil
}

// Replay calls fn, in seq order, for every recorded message with a seq in
// (after, upto] whose topic match accepts, until fn returns false.
// Recorded means kept by a retention rule: a record the log holds only
// for a session is not replayed, nor is one whose message expiry passed.
// It returns an *ErrReset, before calling fn, if retention has removed
// messages after "after" that filters match: checked once the read
// snapshot is taken, so nothing trimmed before it goes unnoticed and
// nothing trimmed after it is missing from it. The Record passed to fn may
// be kept.
func (h *History) Replay(ctx context.Context, after, upto uint64, filters []string, match func(topic string) bool, fn func(*Record) bool) error {
	if err := h.CanReplay(after, filters); err != nil {
		return err
	}
	if after >= upto {
		return nil
	}
	checked := false
	var reset error
	now := time.Now().Unix()
	err := h.log.Read(after, upto, func(m *storage.LogMessage) bool {
		if !checked {
			// Inside the snapshot: the log raises its trim mark before it
			// queues the deletes, so a delete the snapshot reflects is
			// seen here.
			checked = true
			if reset = h.CanReplay(after, filters); reset != nil {
				return false
			}
		}
		if ctx.Err() != nil {
			return false
		}
		if !h.log.Keeps(m.Topic) || m.Expiry != 0 && m.Expiry < now || !match(m.Topic) {
			return true
		}
		return fn(recordOf(m))
	})
	if reset != nil {
		return reset
	}
	if err != nil {
		return fmt.Errorf("history: replay: %w", err)
	}
	if !checked {
		// Nothing stored after "after": a trim since the snapshot only
		// makes this cautious.
		if err := h.CanReplay(after, filters); err != nil {
			return err
		}
	}
	return ctx.Err()
}

// recordOf is the Record of a message read from the log; it keeps m's
// strings and slices, which Log.Read does not reuse.
func recordOf(m *storage.LogMessage) *Record {
	return &Record{Seq: m.Seq, Topic: m.Topic, Payload: m.Payload, QoS: m.QoS, Retain: m.Retain,
		TS: m.Time / int64(time.Millisecond), Device: m.Device, Origin: m.Origin}
}

// HistoryStats are the history's counters.
type HistoryStats struct {
	Seq       uint64 // the log's last seq assigned
	Stored    int    // records the log's retention rules hold now
	Recorded  int64  // records appended to the log since it opened
	Trimmed   int64  // records the log deleted since it opened
	Failed    int64  // records whose write to the log failed since it opened
	Overflows int64  // watchers ended because they fell behind
	Watchers  int
	Held      int   // fed messages waiting for a lower seq to be fed
	Skipped   int64 // seqs given up on: not fed within GapWait (noticed only while someone watches)
	Late      int64 // messages fed after their seq was given up on
	// IndexBytes is the memory of the in-memory index: the log's
	// (storage.LogStats.IndexBytes) and the newest-record-per-topic index
	// of Last (estimated at lastEntryBytes a topic). IndexEvicted counts
	// records that left retention by the log's MaxIndexBytes.
	IndexBytes, IndexEvicted int64
}

// Stats returns the counters.
func (h *History) Stats() HistoryStats {
	ls := h.log.Stats()
	s := HistoryStats{Seq: ls.Head, Recorded: ls.Appended, Trimmed: ls.Trimmed, Failed: ls.Failed,
		Overflows: h.overflows.Load(), Skipped: h.skips.Load(), Late: h.late.Load(),
		IndexBytes: ls.IndexBytes + h.last.bytes(), IndexEvicted: ls.IndexEvicted}
	for _, r := range ls.Rules {
		s.Stored += r.Stored
	}
	h.mu.Lock()
	s.Watchers, s.Held = len(h.watches), len(h.held)
	h.mu.Unlock()
	return s
}

// Shutdown ends every watch and stops feeding and indexing. It does not
// shut the log down (the broker does, after it). Call it after the engine
// has stopped. It is idempotent.
func (h *History) Shutdown(ctx context.Context) error {
	h.mu.Lock()
	if !h.closed {
		h.closed = true
		for w := range h.watches {
			h.end(w, false)
		}
		clear(h.held)
		if h.timer != nil {
			h.timer.Stop()
		}
	}
	h.mu.Unlock()
	h.shutOnce.Do(func() { close(h.stop) })
	stopped := make(chan struct{})
	go func() { h.wg.Wait(); close(stopped) }()
	select {
	case <-stopped:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("history: %w", ctx.Err())
	}
}
