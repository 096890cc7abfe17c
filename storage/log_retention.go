package storage

import (
	"math"
	"sort"
	"strings"
	"time"

	"github.com/beaconmq/beacon/broker/topics"
)

// Ref takes a reference on seq: the record is not deleted before the
// matching Unref. The router refs a seq before it releases it, and a
// session restoring its queue before StartTrimming, so the record is
// there; a Ref of a seq no longer stored takes nothing (see TryRef).
func (l *Log) Ref(seq uint64) { l.TryRef(seq) }

// TryRef is Ref that reports whether the record is stored: when it is not
// (never stored, or deleted) nothing is taken and no Unref is needed. A
// consumer that found seq by reading calls it, as retention may have
// deleted the record since.
func (l *Log) TryRef(seq uint64) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if st, ok := l.refs[seq]; ok {
		if st.n < math.MaxInt32 {
			st.n++
		}
		l.refs[seq] = st
		return true
	}
	for _, r := range l.rules {
		if r.q.contains(seq) {
			l.refs[seq] = refState{n: 1}
			return true
		}
	}
	return false
}

// Unref gives back a reference taken with Ref. The last one deletes a
// record that is outside its rule's retention (or matched no rule) and
// released.
func (l *Log) Unref(seq uint64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	st, ok := l.refs[seq]
	if !ok || st.n == 0 {
		l.strays.Add(1)
		return
	}
	st.n--
	l.settleRef(seq, st)
}

// Release tells the log that routing of seq is done: the router has taken
// every Ref it needs. Until then the record is never deleted. Every
// appended seq must be released once; numbered ones need not be.
func (l *Log) Release(seq uint64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	st, ok := l.refs[seq]
	if !ok || !st.pending() {
		l.strays.Add(1)
		return
	}
	st.flags &^= refPending
	l.pending--
	l.settleRef(seq, st)
}

// settleRef stores a changed reference state, or drops it once it has no
// references left and is released: a loose record is then deleted (once
// trimming started). Called with l.mu held.
func (l *Log) settleRef(seq uint64, st refState) {
	if st.n > 0 || st.pending() || st.loose() && !l.trimming {
		l.refs[seq] = st
		return
	}
	delete(l.refs, seq)
	if st.loose() {
		l.dels = l.deleteRecord(l.dels, seq, st.size)
		if len(l.dels) > maxPiggyDeletes {
			l.poke()
		}
	}
}

// deleteRecord takes a record out of the counts, and appends the delete
// of its block to ops if it was the block's last. Called with l.mu held.
func (l *Log) deleteRecord(ops []Op, seq uint64, size uint32) []Op {
	l.stored--
	l.bytes -= int64(size)
	l.trimCnt.Add(1)
	return l.blockDied(ops, seq)
}

// trimRule takes up to limit records outside the rule's retention out of
// it: an unreferenced, released one is deleted (appended to ops), any
// other becomes loose. Called with l.mu held, once trimming started.
func (l *Log) trimRule(r *logRule, now int64, limit int, ops []Op) []Op {
	cutoff := int64(math.MinInt64)
	if r.MaxAge > 0 {
		cutoff = now - int64(r.MaxAge)
	}
	for n := 0; n < limit && r.q.len() > 0; n++ {
		e := r.q.front()
		if !(r.MaxMessages > 0 && r.q.len() > r.MaxMessages ||
			r.MaxBytes > 0 && r.bytes > r.MaxBytes ||
			e.olderThan(cutoff)) {
			break
		}
		ops = l.popRule(r, ops)
	}
	return ops
}

// popRule takes the rule's oldest record out of its retention: deleted
// if unreferenced and released (appended to ops), loose otherwise.
// Called with l.mu held.
func (l *Log) popRule(r *logRule, ops []Op) []Op {
	e := r.q.front()
	r.q.pop()
	r.bytes -= int64(e.size)
	r.trimmed = max(r.trimmed, e.seq)
	l.trimmed = max(l.trimmed, e.seq)
	if st, ok := l.refs[e.seq]; ok {
		st.flags |= refLoose
		st.size = e.size
		l.refs[e.seq] = st
		return ops
	}
	return l.deleteRecord(ops, e.seq, e.size)
}

// entryBytes is the size of one retention index entry (logEntry).
const entryBytes = 16

// refEntryBytes estimates the memory of one reference map entry (its 8
// byte key, 12 byte state and the map's overhead; measured 30 to 55).
const refEntryBytes = 48

// indexEntries is the number of records the rules retain. Called with
// l.mu held.
func (l *Log) indexEntries() int {
	n := 0
	for _, r := range l.rules {
		n += r.q.len()
	}
	return n
}

// trimIndex takes up to limit of the oldest records, across rules, out
// of retention while the index is over LogOptions.MaxIndexBytes. Called
// with l.mu held, once trimming started.
func (l *Log) trimIndex(limit int, ops []Op) []Op {
	if l.opts.MaxIndexBytes <= 0 {
		return ops
	}
	over := int64(l.indexEntries())*entryBytes - l.opts.MaxIndexBytes
	for n := 0; over > 0 && n < limit; n++ {
		var oldest *logRule
		for _, r := range l.rules {
			if r.q.len() > 0 && (oldest == nil || r.q.front().seq < oldest.q.front().seq) {
				oldest = r
			}
		}
		if oldest == nil {
			break
		}
		ops = l.popRule(oldest, ops)
		l.evicted.Add(1)
		over -= entryBytes
	}
	return ops
}

// markOp appends the write of the trim mark to ops if it moved, for a
// write that holds all of ops: the mark commits with the deletes it
// covers. Called with l.mu held.
func (l *Log) markOp(ops []Op) []Op {
	if l.trimmed > l.savedTrim {
		ops = append(ops, metaOp(metaLogTrimmed, l.trimmed))
		l.savedTrim = l.trimmed
	}
	return ops
}

// markFirst is markOp for ops that may be split into several writes: the
// mark goes first, so it is never behind a delete it covers (a mark ahead
// of its deletes only makes Oldest cautious). Called with l.mu held.
func (l *Log) markFirst(ops []Op) []Op {
	if l.trimmed <= l.savedTrim {
		return ops
	}
	return append(l.markOp(make([]Op, 0, len(ops)+1)), ops...)
}

// poke wakes the trimmer without waiting.
func (l *Log) poke() {
	select {
	case l.kick <- struct{}{}:
	default:
	}
}

// StartTrimming lets retention run: the broker calls it once sessions have
// restored their references with Ref. Records found at open that are
// loose and unreferenced are deleted then, and so are damaged ones.
func (l *Log) StartTrimming() {
	l.mu.Lock()
	if l.trimming {
		l.mu.Unlock()
		return
	}
	l.trimming = true
	for seq, st := range l.refs {
		if st.n == 0 && !st.pending() {
			delete(l.refs, seq)
			if st.loose() {
				l.dels = l.deleteRecord(l.dels, seq, st.size)
			}
		}
	}
	for _, k := range l.damaged {
		l.dels = append(l.dels, Delete(k))
	}
	l.damaged = nil
	l.mu.Unlock()
	l.poke()
}

// trimLoop applies retention every second and whenever poked, until
// Shutdown.
func (l *Log) trimLoop() {
	defer l.wg.Done()
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		select {
		case <-l.done:
			return
		case <-t.C:
		case <-l.kick:
		}
		l.trimNow()
	}
}

// trimNow applies every rule's limits and queues the resulting deletes,
// in writes of at most maxLogDeletes, without holding the lock across a
// write.
func (l *Log) trimNow() {
	l.trimMu.Lock()
	defer l.trimMu.Unlock()
	for {
		l.mu.Lock()
		if !l.trimming {
			l.mu.Unlock()
			return
		}
		l.dropSealed()
		ops := l.dels
		l.dels = nil
		now := l.now().UnixNano()
		for _, r := range l.rules {
			if len(ops) >= maxLogDeletes {
				break
			}
			ops = l.trimRule(r, now, maxLogDeletes-len(ops), ops)
		}
		if len(ops) < maxLogDeletes {
			ops = l.trimIndex(maxLogDeletes-len(ops), ops)
		}
		more := len(ops) >= maxLogDeletes
		ops = l.markFirst(ops)
		l.mu.Unlock()
		l.writeDeletes(ops)
		if !more {
			return
		}
		select {
		case <-l.done:
			return
		default:
		}
	}
}

// writeDeletes queues ops in writes a transaction holds.
func (l *Log) writeDeletes(ops []Op) {
	for len(ops) > 0 {
		n := min(len(ops), maxLogDeletes)
		l.db.WriteAsync(ops[:n]...)
		ops = ops[n:]
	}
}

// Oldest is the position before which a reader of every topic has a gap:
// every record a rule retains with seq >= Oldest is still stored (one
// past the trim mark). A reader that has seen everything up to p resumes
// without a gap iff p+1 >= Oldest. Records that matched no rule are not
// retained at all (see Retains).
func (l *Log) Oldest() uint64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.trimmed + 1
}

// OldestFor is Oldest for a reader of the topics some filters match: only
// rules whose filter overlaps one of them count. After a restart every
// rule counts as trimmed up to the global mark.
func (l *Log) OldestFor(filters ...string) uint64 {
	split := make([][]string, len(filters))
	for i, f := range filters {
		split[i] = strings.Split(f, "/")
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	var mark uint64
	for _, r := range l.rules {
		if r.trimmed <= mark {
			continue
		}
		for _, f := range split {
			if topics.Overlaps(r.levels, f) {
				mark = r.trimmed
				break
			}
		}
	}
	return mark + 1
}

// FirstSince returns the seq of the oldest record kept by a rule that
// filters overlap whose time is at or after cutoff (unix nanoseconds), or
// Head+1 when there is none: where a read of "since a time" can start
// instead of at the oldest record. Records are in seq order and their
// times nearly so (the clock of one process).
func (l *Log) FirstSince(cutoff int64, filters ...string) uint64 {
	split := make([][]string, len(filters))
	for i, f := range filters {
		split[i] = strings.Split(f, "/")
	}
	first := l.Head() + 1
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, r := range l.rules {
		overlaps := false
		for _, f := range split {
			if topics.Overlaps(r.levels, f) {
				overlaps = true
				break
			}
		}
		if !overlaps {
			continue
		}
		q := &r.q
		i := sort.Search(q.len(), func(i int) bool { return !q.at(i).olderThan(cutoff) })
		if i < q.len() {
			first = min(first, q.at(i).seq)
		}
	}
	return first
}

// Retains reports whether every message filter matches belongs to a
// rule, so that a replay of it is complete after Oldest. Messages of no
// rule are stored only while referenced.
func (l *Log) Retains(filter string) bool {
	levels := strings.Split(filter, "/")
	for _, r := range l.rules {
		if topics.Covers(r.levels, levels) {
			return true
		}
	}
	return false
}

// Stats returns the log's counters.
func (l *Log) Stats() LogStats {
	s := LogStats{
		Head:     l.Head(),
		Appended: l.appended.Load(),
		Numbered: l.numbered.Load(),
		Trimmed:  l.trimCnt.Load(),
		Failed:   l.failed.Load(),
		Strays:   l.strays.Load(),
		Rules:    make([]LogRuleStats, len(l.rules)),
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	s.Oldest = l.trimmed + 1
	s.Stored, s.Bytes, s.Referenced, s.Pending, s.Damaged = l.stored, l.bytes, len(l.refs), l.pending, l.nDamaged
	for i, r := range l.rules {
		s.Rules[i] = LogRuleStats{Filter: r.Filter, Stored: r.q.len(), Bytes: r.bytes, Trimmed: r.trimmed}
		chunks := len(r.q.chunks)
		if r.q.spare != nil {
			chunks++
		}
		s.IndexBytes += int64(chunks) * logChunk * entryBytes
		s.IndexEntryBytes += int64(r.q.len()) * entryBytes
	}
	s.IndexBytes += int64(len(l.refs))*refEntryBytes + int64(cap(l.blocks))*blockRefBytes
	s.IndexEvicted = l.evicted.Load()
	return s
}
