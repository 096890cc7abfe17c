package hooks

import (
	"context"
	"errors"
	"fmt"
	"hash/maphash"
	"sync"
	"time"

	"github.com/beaconmq/beacon/storage"
)

// Last: the newest recorded message of a topic.
//
// The history keeps no topic strings (a record's topic can be 64 KiB):
// lastIndex maps a 64-bit hash of a topic to the seq of its newest record,
// for the topics a retention rule keeps, in two generations of up to
// LastTopics/2 topics each (16 bytes and the map's overhead per topic: 2
// to 3 MiB at the default). When the current generation is full it
// becomes the previous one and the previous one is dropped: a topic is
// found as long as fewer than LastTopics/2 other topics were published
// since its last message. At start the index is filled from the log in
// the background; Last waits for that when the index does not know a
// topic. For a topic dropped from the index, Last reads the last
// lastScan seqs up to the highest dropped seq, and reports nothing
// recorded beyond them.

// lastScan bounds the read of Last for a topic the index dropped.
const lastScan = 1 << 16

// lastChunk is how many seqs the start-up indexing reads per snapshot.
const lastChunk = 1 << 16

type lastIndex struct {
	seed   maphash.Seed
	mu     sync.Mutex
	cur    map[uint64]uint64
	prev   map[uint64]uint64
	gen    int           // topics per generation
	lost   uint64        // highest seq dropped from the index
	ready  bool          // the start-up indexing is done
	opened uint64        // the log's Head at start: indexing covers seqs up to it
	done   chan struct{} // closed when ready
}

func (x *lastIndex) init(gen int, opened uint64) {
	x.seed = maphash.MakeSeed()
	x.gen = max(gen, 1)
	x.cur = make(map[uint64]uint64)
	x.opened = opened
	x.done = make(chan struct{})
}

// lastEntryBytes estimates the memory of one topic in the index: a
// 16-byte map entry and the map's overhead.
const lastEntryBytes = 40

// bytes estimates the index's memory.
func (x *lastIndex) bytes() int64 {
	x.mu.Lock()
	defer x.mu.Unlock()
	return int64(len(x.cur)+len(x.prev)) * lastEntryBytes
}

func (x *lastIndex) key(topic string) uint64 { return maphash.String(x.seed, topic) }

// put records seq as the newest record of topic unless a newer one is.
func (x *lastIndex) put(topic string, seq uint64) {
	k := x.key(topic)
	x.mu.Lock()
	defer x.mu.Unlock()
	if s, ok := x.cur[k]; ok {
		x.cur[k] = max(s, seq)
		return
	}
	if s, ok := x.prev[k]; ok {
		seq = max(s, seq)
		delete(x.prev, k)
	}
	if len(x.cur) >= x.gen {
		for _, s := range x.prev {
			x.lost = max(x.lost, s)
		}
		x.prev, x.cur = x.cur, make(map[uint64]uint64, len(x.cur))
	}
	x.cur[k] = seq
}

// get returns the indexed seq of topic; final says the answer needs no
// further look: the seq is newer than anything still being indexed, or
// the indexing is done and dropped nothing.
func (x *lastIndex) get(topic string) (seq uint64, found, final bool, lost uint64) {
	k := x.key(topic)
	x.mu.Lock()
	defer x.mu.Unlock()
	seq, found = x.cur[k]
	if !found {
		seq, found = x.prev[k]
	}
	final = x.ready && (found || x.lost == 0) || found && seq > x.opened
	return seq, found, final, x.lost
}

// indexLast fills the index from the records stored at start, in chunks
// so that no snapshot is held for long.
func (h *History) indexLast(upto uint64) {
	defer h.wg.Done()
	defer func() {
		h.last.mu.Lock()
		h.last.ready = true
		h.last.mu.Unlock()
		close(h.last.done)
	}()
	for after := uint64(0); after < upto; after += lastChunk {
		select {
		case <-h.stop:
			return
		default:
		}
		err := h.log.Read(after, min(after+lastChunk, upto), func(m *storage.LogMessage) bool {
			if h.log.Keeps(m.Topic) {
				h.last.put(m.Topic, m.Seq)
			}
			return true
		})
		if err != nil {
			h.logger.Error("history: index the newest record of each topic", "error", err)
			return
		}
	}
}

// Last returns the newest recorded message on topic: stored and kept by
// a retention rule (see lastIndex for its bounds).
func (h *History) Last(ctx context.Context, topic string) (*Record, bool, error) {
	if !h.log.Keeps(topic) {
		return nil, false, nil
	}
	seq, found, final, lost := h.last.get(topic)
	if !final {
		select {
		case <-h.last.done:
		case <-h.stop:
			return nil, false, errors.New("history: shut down")
		case <-ctx.Done():
			return nil, false, ctx.Err()
		}
		seq, found, _, lost = h.last.get(topic)
	}
	if found {
		rec, ok, err := h.get(seq, topic)
		if ok || err != nil || lost == 0 {
			// Not stored: trimmed, and so is every older record of the
			// topic (a rule trims its oldest first).
			return rec, ok, err
		}
		// A hash collision with another topic: look for it as dropped.
	}
	if lost == 0 {
		return nil, false, nil
	}
	return h.scanLast(ctx, topic, lost)
}

// get reads seq if it is a stored record of topic that has not left its
// rule's retention (the log may take a second to delete one that has).
func (h *History) get(seq uint64, topic string) (*Record, bool, error) {
	if !h.log.TryRef(seq) {
		return nil, false, nil
	}
	defer h.log.Unref(seq)
	m, err := h.log.Get(seq)
	switch {
	case errors.Is(err, storage.ErrLogNotFound):
		return nil, false, nil
	case err != nil:
		return nil, false, fmt.Errorf("history: last: %w", err)
	case m.Topic != topic || m.Expiry != 0 && m.Expiry < time.Now().Unix():
		return nil, false, nil
	}
	return recordOf(&m), true, nil
}

// scanLast reads the last lastScan seqs up to upto for the newest record
// of topic.
func (h *History) scanLast(ctx context.Context, topic string, upto uint64) (*Record, bool, error) {
	after := uint64(0)
	if upto > lastScan {
		after = upto - lastScan
	}
	var newest uint64
	err := h.log.Read(after, upto, func(m *storage.LogMessage) bool {
		if m.Topic == topic {
			newest = m.Seq
		}
		return ctx.Err() == nil
	})
	if err != nil {
		return nil, false, fmt.Errorf("history: last: %w", err)
	}
	if err := ctx.Err(); err != nil {
		return nil, false, err
	}
	if newest == 0 {
		return nil, false, nil
	}
	return h.get(newest, topic)
}
