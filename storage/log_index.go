package storage

import (
	"math"
	"sort"
)

// The log's in-memory retention index. It holds no topic strings: a rule's
// records are a FIFO of 16-byte entries, and only records that are
// referenced, not yet released, or kept past their retention have an entry
// in the reference map.

// logEntry is one record of a rule, in seq order: 16 bytes.
type logEntry struct {
	seq  uint64
	sec  uint32 // unix seconds of the record's Time, rounded up: age never trims early
	size uint32 // topic+payload+props bytes, saturated at 4 GiB-1
}

func newLogEntry(seq uint64, timeNS int64, size int) logEntry {
	sec := (timeNS + 1e9 - 1) / 1e9
	if timeNS <= 0 {
		sec = 0
	}
	return logEntry{seq: seq, sec: uint32(min(sec, math.MaxUint32)), size: uint32(min(size, math.MaxUint32))}
}

// olderThan reports whether the entry's time is before cutoff (unix
// nanoseconds).
func (e logEntry) olderThan(cutoff int64) bool { return int64(e.sec)*1e9 < cutoff }

// logChunk is the number of entries in one chunk of a queue (8 KiB).
const logChunk = 512

// entryQueue is a FIFO of entries in fixed chunks: growing it never copies
// the entries (no pause under the lock at millions of records), and a
// queue wastes at most two chunks.
type entryQueue struct {
	chunks []*[logChunk]logEntry
	head   int // first live entry in chunks[0]
	n      int
	spare  *[logChunk]logEntry // the last chunk emptied, reused by push
}

func (q *entryQueue) len() int { return q.n }

func (q *entryQueue) push(e logEntry) {
	end := q.head + q.n
	if end == len(q.chunks)*logChunk {
		c := q.spare
		q.spare = nil
		if c == nil {
			c = new([logChunk]logEntry)
		}
		q.chunks = append(q.chunks, c)
	}
	q.chunks[end/logChunk][end%logChunk] = e
	q.n++
}

// front is the oldest entry; the queue must not be empty.
func (q *entryQueue) front() logEntry { return q.chunks[0][q.head] }

// pop removes the oldest entry; the queue must not be empty.
func (q *entryQueue) pop() {
	q.head++
	q.n--
	if q.head == logChunk {
		q.spare = q.chunks[0]
		q.chunks[0] = nil
		q.chunks = q.chunks[1:]
		q.head = 0
	}
	if q.n == 0 {
		q.head = 0
	}
}

func (q *entryQueue) at(i int) logEntry {
	j := q.head + i
	return q.chunks[j/logChunk][j%logChunk]
}

// contains reports whether seq is in the queue (entries are in seq order).
func (q *entryQueue) contains(seq uint64) bool {
	i := sort.Search(q.n, func(i int) bool { return q.at(i).seq >= seq })
	return i < q.n && q.at(i).seq == seq
}

// refState is a record's entry in the reference map: 12 bytes.
type refState struct {
	n     int32  // references taken with Ref and not yet given back
	size  uint32 // the record's size, for the byte count of loose records
	flags uint8
}

const (
	// refPending: appended and not yet released; never deleted.
	refPending = 1 << iota
	// refLoose: outside every rule's retention (matched no rule, or
	// trimmed while referenced); deleted once unreferenced and released.
	refLoose
)

func (s refState) pending() bool { return s.flags&refPending != 0 }
func (s refState) loose() bool   { return s.flags&refLoose != 0 }
