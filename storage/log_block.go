package storage

import (
	"encoding/binary"
	"fmt"
	"math"
	"sort"
	"sync"
	"sync/atomic"
)

// Log blocks. The records appended between two group commits share one
// badger key, so the store's per-key work (memtable insert, log entry,
// compaction, the delete once retention trims) is paid once per block, not
// once per message:
//
//	L 0x00 <8-byte first seq>   block
//
// A block's value is blockVersion, then per record: uvarint seq delta
// (0 for the first record, whose seq is the key's; at least 1 after, as
// numbered seqs leave gaps), uvarint length, and the record
// (appendLogRecord). A block holds at most what badger keeps inline
// (its value threshold), so blocks stay in the LSM tree like the small
// records they replace; a record larger than that is a block by itself.
//
// Stores written before blocks hold one key per record (nsLog, "l\x00");
// they are read and trimmed as before, and new records go to blocks. Their
// seqs are all below the first block's.
const nsLogBlock = "L\x00"

const blockVersion = 1

// Limits of one block's write (the block and the ops that travel with its
// records: queue entries, deletes, the trim mark).
const (
	maxBlockOps     = 512            // ops in one block's write
	maxBlockRecords = math.MaxUint16 // records in one block (blockRef counts them in 16 bits)
)

func blockKey(first uint64) []byte {
	return binary.BigEndian.AppendUint64(append(make([]byte, 0, len(nsLogBlock)+8), nsLogBlock...), first)
}

func appendBlockKey(dst []byte, first uint64) []byte {
	return binary.BigEndian.AppendUint64(append(dst, nsLogBlock...), first)
}

// parseBlockKey returns the first seq of a block key.
func parseBlockKey(key []byte) (uint64, bool) {
	if len(key) != len(nsLogBlock)+8 || string(key[:len(nsLogBlock)]) != nsLogBlock {
		return 0, false
	}
	return binary.BigEndian.Uint64(key[len(nsLogBlock):]), true
}

// walkBlock calls fn for each record of a block, in seq order, until fn
// returns false. It returns an error wrapping ErrCorrupt if the block's
// framing is damaged (after calling fn for the records before the damage);
// the records themselves are for fn to parse.
func walkBlock(first uint64, b []byte, fn func(seq uint64, rec []byte) bool) error {
	if len(b) == 0 || b[0] != blockVersion {
		return fmt.Errorf("%w: log block version", ErrCorrupt)
	}
	b = b[1:]
	seq := first
	for i := 0; len(b) > 0; i++ {
		d, n := binary.Uvarint(b)
		if n <= 0 || i > 0 && d == 0 || i == 0 && d != 0 || seq+d < seq {
			return fmt.Errorf("%w: log block %d: bad seq after %d", ErrCorrupt, first, seq)
		}
		seq += d
		b = b[n:]
		size, n := binary.Uvarint(b)
		if n <= 0 || size > uint64(len(b)-n) {
			return fmt.Errorf("%w: log block %d: bad length of %d", ErrCorrupt, first, seq)
		}
		rec := b[n : n+int(size) : n+int(size)]
		b = b[n+int(size):]
		if !fn(seq, rec) {
			return nil
		}
	}
	return nil
}

// checkBlock parses every record of a block (for Verify).
func checkBlock(key, value []byte) error {
	first, ok := parseBlockKey(key)
	if !ok {
		return fmt.Errorf("%w: bad key", ErrCorrupt)
	}
	var bad error
	n := 0
	err := walkBlock(first, value, func(seq uint64, rec []byte) bool {
		n++
		if _, err := parseLogRecord(rec); err != nil {
			bad = fmt.Errorf("record %d: %w", seq, err)
			return false
		}
		return true
	})
	switch {
	case err != nil:
		return err
	case bad == nil && n == 0:
		return fmt.Errorf("%w: log block %d holds no record", ErrCorrupt, first)
	}
	return bad
}

// logBlock is a block being written: one DB request, queued when the
// block is opened. Appends add records (and their ops) to it until it is
// sealed: by the committer when it takes the request, or by an append
// that finds it full. Records of one block commit together.
type logBlock struct {
	mu     sync.Mutex
	log    *Log
	req    request // ops[0] is the block's set
	inline [2]Op   // the first ops of req
	key    [len(nsLogBlock) + 8]byte
	buf    []byte // the block's value
	first  uint64
	last   uint64
	n      int
	bytes  int  // bytes of the ops other than the block
	sealed bool // guarded by mu: no more records
	// isSealed is sealed for the index, which cannot take mu (the lock
	// order is appendMu, a block's mu, l.mu): once it is true every
	// record of the block is registered.
	isSealed atomic.Bool
	legacy   bool // one record under its nsLog key (tests of old stores)

	done sync.WaitGroup // done once committed (or failed)
	err  error          // set before done is done
}

// newBlock makes the block that starts with seq; its request is the
// caller's to queue. Called with l.appendMu held.
func (l *Log) newBlock(seq uint64) *logBlock {
	b := &logBlock{log: l, first: seq, last: seq, legacy: l.legacyWrites}
	var key []byte
	if b.legacy {
		key = appendLogKey(b.key[:0], seq)
	} else {
		key = appendBlockKey(b.key[:0], seq)
		size := max(l.blockHint, 128)
		if size > l.blockCap/2 {
			size = l.blockCap // a full block: never grown
		}
		b.buf = append(make([]byte, 0, size), blockVersion)
	}
	b.req.ops = append(b.inline[:0], Set(key, nil))
	b.req.blk = b
	b.done.Add(1)
	return b
}

// committed is the committer's report on the block's write.
func (b *logBlock) committed(err error) {
	b.log.wrote(b.last, b.n, err)
	b.err = err
	b.done.Done()
}

// wait returns once the block is committed, with its error.
func (b *logBlock) wait() error {
	b.done.Wait()
	if b.err != nil {
		return fmt.Errorf("log: append: %w", b.err)
	}
	return nil
}

// fits reports whether the record seq of size bytes and ops (of opBytes)
// still go into b. Called with b.mu held.
func (b *logBlock) fits(l *Log, seq uint64, size, ops, opBytes int) bool {
	return !b.sealed && !b.legacy &&
		b.n < maxBlockRecords && seq-b.first <= math.MaxUint32 &&
		len(b.buf)+2*binary.MaxVarintLen64+size <= l.blockCap &&
		len(b.req.ops)+ops <= maxBlockOps &&
		b.bytes+opBytes <= l.writeCap
}

// add appends the record seq and ops to b. Called with b.mu held (or
// before b is queued), in seq order.
func (b *logBlock) add(seq uint64, rec []byte, ops []Op) {
	if b.legacy {
		b.buf = append(b.buf, rec...)
	} else {
		d := uint64(0)
		if b.n > 0 {
			d = seq - b.last
		}
		b.buf = binary.AppendUvarint(b.buf, d)
		b.buf = binary.AppendUvarint(b.buf, uint64(len(rec)))
		b.buf = append(b.buf, rec...)
	}
	b.last = seq
	b.n++
	b.addOps(ops)
	if b.legacy {
		b.sealLocked()
	}
}

func (b *logBlock) addOps(ops []Op) {
	for _, op := range ops {
		b.bytes += op.Size()
	}
	b.req.ops = append(b.req.ops, ops...)
}

// seal ends the block: the committer calls it when it takes the request.
func (b *logBlock) seal() {
	b.mu.Lock()
	b.sealLocked()
	b.mu.Unlock()
}

func (b *logBlock) sealLocked() {
	if !b.sealed {
		b.sealed = true
		b.req.ops[0].value = b.buf
		b.isSealed.Store(true)
	}
}

// blockRef is a stored block of more than one record (or the open one)
// in the log's index: 16 bytes. A block of one record that is not open
// has none: its key is that of its seq. Its key is deleted once its last
// record is (and no append can add to it).
type blockRef struct {
	first uint64
	span  uint32 // its last seq - first
	n     uint16 // records indexed; 0: deleted (dropped once at the front)
	live  uint16 // of them, not yet deleted
}

// blockRefBytes is the size of a blockRef.
const blockRefBytes = 16

func (r *blockRef) covers(seq uint64) bool {
	return seq >= r.first && seq-r.first <= uint64(r.span)
}

// blockIndex is the index in l.blocks of the block that may hold seq (the
// last one starting at or before it), or -1. Called with l.mu held.
func (l *Log) blockIndex(seq uint64) int {
	return sort.Search(len(l.blocks), func(i int) bool { return l.blocks[i].first > seq }) - 1
}

// refOf is the index of the block ref holding seq, or -1 if none does (a
// block of one record, a record of a store written before blocks, or a
// seq never stored). A deleted block's ref has n == 0. Called with l.mu
// held.
func (l *Log) refOf(seq uint64) int {
	if i := l.blockIndex(seq); i >= 0 && l.blocks[i].covers(seq) {
		return i
	}
	return -1
}

// keyOf is the key of a record no block ref holds. Called with l.mu held.
func (l *Log) keyOf(dst []byte, seq uint64) []byte {
	if seq <= l.legacyMax {
		return appendLogKey(dst, seq)
	}
	return appendBlockKey(dst, seq)
}

// registerBlock counts k records added to block b. Called with l.mu held,
// in seq order.
func (l *Log) registerBlock(b *logBlock, k int, open bool) {
	if b.legacy {
		l.closeLast()
		l.legacyMax = max(l.legacyMax, b.last)
		return
	}
	if n := len(l.blocks); n > 0 && l.lastOpen {
		if last := &l.blocks[n-1]; last.first == b.first {
			last.n += uint16(k)
			last.live += uint16(k)
			last.span = uint32(b.last - b.first)
			l.setOpen(b, open)
			return
		}
	}
	l.closeLast()
	l.blocks = append(l.blocks, blockRef{first: b.first, span: uint32(b.last - b.first), n: uint16(k), live: uint16(k)})
	l.setOpen(b, open)
}

func (l *Log) setOpen(b *logBlock, open bool) {
	l.lastOpen, l.openBlock = open, nil
	if open {
		l.openBlock = b
	} else {
		l.closeLast()
	}
}

// closeLast handles the newest ref once no append adds to its block any
// more: deleted if its records are all gone, dropped if it holds one.
// Called with l.mu held.
func (l *Log) closeLast() {
	l.lastOpen, l.openBlock = false, nil
	n := len(l.blocks)
	if n == 0 || l.blocks[n-1].n == 0 {
		return
	}
	switch last := &l.blocks[n-1]; {
	case last.live == 0:
		l.dels = l.dropBlock(l.dels, n-1)
	case last.n == 1 && last.span == 0:
		l.blocks = l.blocks[:n-1]
	}
}

// blockClosed reports whether no append can add to the block at index i
// any more. Called with l.mu held.
func (l *Log) blockClosed(i int) bool {
	return i != len(l.blocks)-1 || !l.lastOpen || l.openBlock.isSealed.Load()
}

// dropSealed closes the newest ref if the committer has sealed its block.
// Called with l.mu held.
func (l *Log) dropSealed() {
	if l.lastOpen && l.openBlock.isSealed.Load() {
		l.closeLast()
	}
}

// blockDied counts a deleted record, and appends the delete of its block
// to ops with the block's last record. Called with l.mu held.
func (l *Log) blockDied(ops []Op, seq uint64) []Op {
	i := l.refOf(seq)
	if i < 0 {
		// The only record of its block (or under its own key).
		if cap(l.keyBuf)-len(l.keyBuf) < len(nsLog)+8 {
			l.keyBuf = make([]byte, 0, (len(nsLog)+8)*minPiggyDeletes)
		}
		start := len(l.keyBuf)
		l.keyBuf = l.keyOf(l.keyBuf, seq)
		return append(ops, Delete(l.keyBuf[start:len(l.keyBuf):len(l.keyBuf)]))
	}
	ref := &l.blocks[i]
	if ref.live == 0 {
		return ops
	}
	ref.live--
	if ref.live == 0 && l.blockClosed(i) {
		if i == len(l.blocks)-1 {
			l.lastOpen, l.openBlock = false, nil
		}
		ops = l.dropBlock(ops, i)
	}
	return ops
}

// dropBlock appends the delete of the block at index i to ops and takes
// it out of the index. Called with l.mu held.
func (l *Log) dropBlock(ops []Op, i int) []Op {
	ref := &l.blocks[i]
	ref.n = 0
	l.deadBlocks++
	if cap(l.keyBuf)-len(l.keyBuf) < len(nsLog)+8 {
		l.keyBuf = make([]byte, 0, (len(nsLog)+8)*minPiggyDeletes)
	}
	start := len(l.keyBuf)
	l.keyBuf = appendBlockKey(l.keyBuf, ref.first)
	ops = append(ops, Delete(l.keyBuf[start:len(l.keyBuf):len(l.keyBuf)]))
	// Deleted refs leave from the front; a referenced old record can pin
	// the front, so the slice is compacted once it is mostly dead.
	k := 0
	for k < len(l.blocks) && l.blocks[k].n == 0 {
		k++
	}
	if k > 0 {
		l.blocks = l.blocks[k:]
		l.deadBlocks -= k
	}
	if l.deadBlocks > 64 && l.deadBlocks > len(l.blocks)/2 {
		live := make([]blockRef, 0, len(l.blocks)-l.deadBlocks)
		for _, b := range l.blocks {
			if b.n > 0 {
				live = append(live, b)
			}
		}
		l.blocks, l.deadBlocks = live, 0
	}
	return ops
}

// isStored reports whether seq is a stored record in the index (what
// TryRef checks). Called with l.mu held.
func (l *Log) isStored(seq uint64) bool {
	if _, ok := l.refs[seq]; ok {
		return true
	}
	for _, r := range l.rules {
		if r.q.contains(seq) {
			return true
		}
	}
	return false
}

// blockState is what a reader needs to know about the block starting at
// first: whether it is stored, and whether some of its records are not.
func (l *Log) blockState(first uint64) (stored, partial bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if i := l.blockIndex(first); i >= 0 && l.blocks[i].first == first {
		r := l.blocks[i]
		return r.n > 0, r.live < r.n
	}
	return l.isStored(first), false // a block of one record
}

// recordStored is isStored for a reader.
func (l *Log) recordStored(seq uint64) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.isStored(seq)
}
