package hooks

import (
	"strings"
	"time"

	"github.com/beaconmq/beacon/devices"
)

// The live side of the history: Feed puts the engine's messages back in
// seq order and fans them out to the watches.

// SetFrame makes live records carry f's encoding in Record.Frame, made
// once per record before any watch gets it (the SSE event, shared by
// every stream). Call it before the first Feed.
func (h *History) SetFrame(f func(*Record) []byte) {
	h.mu.Lock()
	h.frame = f
	h.mu.Unlock()
}

// Feed hands the history a message the engine accepted and routed, after
// its log write committed (QoS 0: was queued); m.Seq is its seq in the log (0: not numbered,
// ignored). The broker calls it for every numbered message, stored or
// not, whether or not anyone watches: a seq never fed holds live delivery
// back for GapWait. Calls may come from many goroutines in any order.
// Feed keeps m.Topic and m.Payload (it does not copy them): the caller
// must not change them afterwards. It never blocks on a watcher.
func (h *History) Feed(m *Message) {
	if m == nil || m.Seq == 0 {
		return
	}
	if h.log.Keeps(m.Topic) {
		h.last.put(m.Topic, m.Seq)
	}
	h.mu.Lock()
	skipped := h.feed(m)
	h.mu.Unlock()
	h.logSkipped(skipped)
}

// Skip tells the history of a seq the log gave a message that goes live
// to no watch (numbered for another purpose: a moved session's queue), so
// live delivery does not wait for it.
func (h *History) Skip(seq uint64) {
	if seq == 0 {
		return
	}
	h.mu.Lock()
	skipped := h.feed(&Message{Seq: seq, Topic: skipTopic})
	h.mu.Unlock()
	h.logSkipped(skipped)
}

// skipTopic is the topic of what Skip feeds: no topic name is empty, so
// no filter matches it.
const skipTopic = ""

// feed is Feed under h.mu; it returns the seqs it gave up on, if any.
func (h *History) feed(m *Message) (skipped seqRange) {
	if h.closed {
		return
	}
	seq := m.Seq
	if len(h.watches) == 0 && len(h.held) == 0 {
		// Nobody watches, so nothing is put back in order: a watch made
		// later starts at the log's head, past every seq numbered now,
		// and a seq below done fed late is not wanted by it.
		h.done = max(h.done, seq)
		return
	}
	switch {
	case seq <= h.done:
		if _, ok := h.gaveUp[seq]; ok {
			delete(h.gaveUp, seq)
			if m.Topic == skipTopic {
				return // nothing to deliver late
			}
			h.late.Add(1)
			if h.wanted(m.Topic, seq) {
				h.deliver(feedRecord(m))
			}
		}
		// Else fed twice, or numbered before the history was made.
	case seq == h.done+1:
		h.done = seq
		if h.wanted(m.Topic, seq) {
			h.deliver(feedRecord(m))
		}
		if len(h.held) > 0 {
			h.release()
		}
	default:
		if _, dup := h.held[seq]; dup {
			return
		}
		// Watches registered from now on have From >= seq: only those
		// that want it now can want it when it is released.
		var rec *Record
		if h.wanted(m.Topic, seq) {
			rec = feedRecord(m)
		}
		h.held[seq] = rec
		if len(h.held) == 1 {
			h.gapSince = time.Now()
			h.arm(h.gapWait)
		}
		if len(h.held) > maxHeld {
			skipped = h.giveUp()
		}
	}
	return skipped
}

// seqRange is the seqs from first to last; zero if empty.
type seqRange struct{ first, last uint64 }

func (h *History) logSkipped(r seqRange) {
	if r.first != 0 {
		h.logger.Warn("history: seqs never fed: live delivery goes on past them", "from", r.first, "to", r.last)
	}
}

func feedRecord(m *Message) *Record {
	ts := m.Time / int64(time.Millisecond)
	if m.Time == 0 {
		ts = time.Now().UnixMilli()
	}
	return &Record{Seq: m.Seq, Topic: m.Topic, Payload: m.Payload, QoS: m.QoS, Retain: m.Retain, TS: ts, Device: m.Device, Origin: m.Origin}
}

// release delivers the held messages that follow done without a gap.
// Called with h.mu held.
func (h *History) release() {
	moved := false
	for {
		rec, ok := h.held[h.done+1]
		if !ok {
			break
		}
		delete(h.held, h.done+1)
		h.done++
		moved = true
		if rec != nil {
			h.deliver(rec)
		}
	}
	if moved && len(h.held) > 0 {
		h.gapSince = time.Now() // a new oldest gap
	}
}

// giveUp skips the seqs missing before the oldest held message, releases
// what follows, and returns the seqs skipped. Called with h.mu held, with
// messages held.
func (h *History) giveUp() seqRange {
	first := uint64(0)
	for seq := range h.held {
		if first == 0 || seq < first {
			first = seq
		}
	}
	h.skips.Add(int64(first - 1 - h.done))
	if len(h.gaveUp) >= maxSkipped {
		clear(h.gaveUp) // long past: a feed that late is dropped
	}
	for seq := h.done + 1; seq < first && len(h.gaveUp) < maxSkipped; seq++ {
		h.gaveUp[seq] = struct{}{}
	}
	skipped := seqRange{h.done + 1, first - 1}
	h.done = first - 1
	h.release()
	return skipped
}

// arm sets the gap timer to fire after d, unless it is set. Called with
// h.mu held.
func (h *History) arm(d time.Duration) {
	if h.armed {
		return
	}
	h.armed = true
	if h.timer == nil {
		h.timer = time.AfterFunc(d, h.gapTimer)
		return
	}
	h.timer.Reset(d)
}

// gapTimer gives up on the oldest gap once it has been open for GapWait.
func (h *History) gapTimer() {
	h.mu.Lock()
	skipped := h.expireGap()
	h.mu.Unlock()
	h.logSkipped(skipped)
}

// expireGap is gapTimer under h.mu.
func (h *History) expireGap() seqRange {
	h.armed = false
	if h.closed || len(h.held) == 0 {
		return seqRange{}
	}
	if wait := h.gapWait - time.Since(h.gapSince); wait > 0 {
		h.arm(wait)
		return seqRange{}
	}
	skipped := h.giveUp()
	if len(h.held) > 0 {
		h.gapSince = time.Now()
		h.arm(h.gapWait)
	}
	return skipped
}

// wanted reports whether a watch registered before seq matches topic.
// Called with h.mu held.
func (h *History) wanted(topic string, seq uint64) bool {
	if topic == skipTopic {
		return false
	}
	for w := range h.exact[topic] {
		if w.From < seq {
			return true
		}
	}
	for w, filters := range h.wild {
		if w.From >= seq {
			continue
		}
		for _, f := range filters {
			if devices.MatchesTopic(f, topic) {
				return true
			}
		}
	}
	return false
}

// deliver hands rec to every watch registered before it with a matching
// filter, once. Called with h.mu held.
func (h *History) deliver(rec *Record) {
	h.stamp++
	if h.frame != nil && rec.Frame == nil {
		// Once, before any watch can read it, for every watch it goes to.
		rec.Frame = h.frame(rec)
	}
	for w := range h.exact[rec.Topic] {
		h.send(w, rec)
	}
	for w, filters := range h.wild {
		if w.stamp == h.stamp || w.From >= rec.Seq {
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
	if w.stamp == h.stamp || w.From >= rec.Seq {
		return
	}
	w.stamp = h.stamp
	select {
	case w.ch <- rec:
	default:
		// The watcher fell behind: end it rather than block the broker or
		// skip messages. Its client resumes from its last id.
		h.overflows.Add(1)
		h.end(w, true)
	}
}

// Watch is a live feed of the messages matching some filters, fed after
// the position it was registered at, in seq order (see History).
type Watch struct {
	h        *History
	From     uint64 // the log's Head when the watch began: it gets the messages after it
	ch       chan *Record
	ended    chan struct{} // closed with ch
	filters  []string
	stamp    uint64 // guarded by h.mu: the last delivery it got
	overflow bool   // guarded by h.mu; set before ch is closed
	stopped  bool   // guarded by h.mu
}

// SetInterest makes fn hear the filters live watches follow: added for
// each filter of a new watch, removed as it ends (in a cluster, so that
// other nodes forward what browsers here follow). fn runs under the
// history's lock: it must be quick and must not call the history.
func (h *History) SetInterest(fn func(filter string, added bool)) {
	h.mu.Lock()
	h.interest = fn
	h.mu.Unlock()
}

// Watch registers a feed of the messages matching filters, buffering up to
// buffer messages. A watcher that lets its buffer fill is ended: C is
// closed and Overflowed reports true.
func (h *History) Watch(filters []string, buffer int) *Watch {
	w := &Watch{h: h, ch: make(chan *Record, buffer), ended: make(chan struct{}), filters: filters}
	h.mu.Lock()
	defer h.mu.Unlock()
	// Under h.mu: a message fed from now on with a seq after From is
	// delivered to w, one numbered up to From is not (it is in the log,
	// for a replay up to From, if the log stored it).
	w.From = h.log.Head()
	if h.closed {
		w.stopped = true
		close(w.ch)
		close(w.ended)
		return w
	}
	h.watches[w] = struct{}{}
	if h.interest != nil {
		for _, f := range filters {
			h.interest(f, true)
		}
	}
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
// history shuts down (not by Stop).
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

// Stop unregisters the watch. It is idempotent.
func (w *Watch) Stop() {
	w.h.mu.Lock()
	defer w.h.mu.Unlock()
	w.h.unwatch(w)
}

// end unregisters w and closes its channel. Called with h.mu held.
func (h *History) end(w *Watch, overflow bool) {
	if w.stopped {
		return
	}
	h.unwatch(w)
	w.overflow = overflow
	close(w.ch)
	close(w.ended)
}

// unwatch removes w from the index. Called with h.mu held.
func (h *History) unwatch(w *Watch) {
	if w.stopped {
		return
	}
	w.stopped = true
	delete(h.watches, w)
	if h.interest != nil {
		for _, f := range w.filters {
			h.interest(f, false)
		}
	}
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
