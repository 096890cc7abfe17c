package main

import (
	"encoding/binary"
	"math/bits"
	"sync/atomic"
	"time"
)

// stampSize is the part of every payload that identifies the message:
// when it was due (unix nanoseconds), its sequence number at its
// publisher, and the publisher's index.
const stampSize = 20

func putStamp(p []byte, due int64, seq uint64, pub uint32) {
	binary.BigEndian.PutUint64(p, uint64(due))
	binary.BigEndian.PutUint64(p[8:], seq)
	binary.BigEndian.PutUint32(p[16:], pub)
}

// maxSeq bounds the sequence numbers a tally accepts, so that a payload
// that is not ours cannot make it allocate gigabytes of bitset.
const maxSeq = 1 << 34

// bitset is a set of sequence numbers.
type bitset []uint64

// add inserts seq and reports whether it was new.
func (s *bitset) add(seq uint64) bool {
	w := seq >> 6
	if w >= uint64(len(*s)) {
		s.grow(w)
	}
	bit := uint64(1) << (seq & 63)
	if (*s)[w]&bit != 0 {
		return false
	}
	(*s)[w] |= bit
	return true
}

// grow makes word w addressable, doubling the capacity when it must.
func (s *bitset) grow(w uint64) {
	if w < uint64(cap(*s)) {
		*s = (*s)[:w+1] // words past the length are still zero: nothing writes them
		return
	}
	grown := make(bitset, w+1, max(2*uint64(cap(*s)), w+1, 64))
	copy(grown, *s)
	*s = grown
}

func (s bitset) has(seq uint64) bool {
	w := seq >> 6
	return w < uint64(len(s)) && s[w]&(1<<(seq&63)) != 0
}

// missing counts the members of want that are not in s.
func (s bitset) missing(want bitset) int64 {
	var n int
	for i, w := range want {
		if i < len(s) {
			w &^= s[i]
		}
		n += bits.OnesCount64(w)
	}
	return int64(n)
}

// missingBelow counts the numbers 0..n-1 that are not in s.
func (s bitset) missingBelow(n int64) int64 {
	var have int
	full := int(n >> 6)
	for i := 0; i < full && i < len(s); i++ {
		have += bits.OnesCount64(s[i])
	}
	if r := n & 63; r > 0 && full < len(s) {
		have += bits.OnesCount64(s[full] & (1<<r - 1))
	}
	return n - int64(have)
}

// tally is what one subscriber (an MQTT connection or an SSE stream) has
// received. It belongs to the goroutine that reads for that subscriber:
// recording a message takes no lock and, once the bitsets have grown,
// allocates nothing. The run merges the tallies when the readers are done;
// while it waits, it watches only the two atomics.
type tally struct {
	seen       []bitset // by publisher index
	delivered  int64    // distinct messages
	duplicates int64
	foreign    int64 // payloads that are not a bench stamp of this run
	lastAt     int64 // unix nanos of the last delivery
	latency    histogram

	// For the drain, published by flush at the end of every read batch.
	count atomic.Int64 // delivered
	last  atomic.Int64 // lastAt
}

func newTally(publishers int) *tally {
	return &tally{seen: make([]bitset, publishers)}
}

// record counts one delivery received at now (unix nanoseconds).
func (t *tally) record(p []byte, now int64) {
	if len(p) < stampSize {
		t.foreign++
		return
	}
	due := int64(binary.BigEndian.Uint64(p))
	seq := binary.BigEndian.Uint64(p[8:])
	pub := binary.BigEndian.Uint32(p[16:])
	if int(pub) >= len(t.seen) || seq >= maxSeq {
		t.foreign++
		return
	}
	t.lastAt = now
	if !t.seen[pub].add(seq) {
		t.duplicates++
		return
	}
	t.delivered++
	t.latency.add(now - due)
}

// flush makes the counts visible to the run.
func (t *tally) flush() {
	t.count.Store(t.delivered)
	t.last.Store(t.lastAt)
}

// Latencies are kept in a log-linear histogram of nanoseconds, as HDR
// histograms do: exact below 64 ns, then 64 buckets for every power of
// two, so a bucket is at most 1/64 (1.6%) wide. Values are capped at 2^40
// ns (18 minutes).
const (
	histSub     = 6 // log2 of the buckets per power of two
	histMaxBits = 40
	histBuckets = (histMaxBits - histSub + 1) << histSub
)

type histogram struct {
	counts [histBuckets]uint64
	n      uint64
	max    int64
}

func bucketOf(v int64) int {
	if v < 1<<histSub {
		return int(max(v, 0))
	}
	if v >= 1<<histMaxBits {
		return histBuckets - 1
	}
	shift := bits.Len64(uint64(v)) - histSub - 1
	return (shift+1)<<histSub + int(v>>shift) - 1<<histSub
}

// bucketValue is the middle of bucket i.
func bucketValue(i int) int64 {
	if i < 1<<histSub {
		return int64(i)
	}
	shift := i>>histSub - 1
	low := int64(i&(1<<histSub-1)+1<<histSub) << shift
	return low + (int64(1)<<shift)/2
}

func (h *histogram) add(v int64) {
	h.counts[bucketOf(v)]++
	h.n++
	h.max = max(h.max, v)
}

func (h *histogram) merge(o *histogram) {
	for i, c := range o.counts {
		h.counts[i] += c
	}
	h.n += o.n
	h.max = max(h.max, o.max)
}

// quantile is the value below which a fraction q of the samples lie.
func (h *histogram) quantile(q float64) time.Duration {
	if h.n == 0 {
		return 0
	}
	if q >= 1 {
		return time.Duration(h.max)
	}
	rank := uint64(q*float64(h.n) + 0.5)
	rank = min(max(rank, 1), h.n)
	var seen uint64
	for i, c := range h.counts {
		if seen += c; seen >= rank {
			return time.Duration(min(bucketValue(i), h.max))
		}
	}
	return time.Duration(h.max)
}
