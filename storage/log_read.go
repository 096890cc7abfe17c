package storage

import (
	"bytes"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"

	"github.com/dgraph-io/badger/v4"
)

// The log's read side: reads wait for the records they cover to be
// committed, and browser ids.

// waitCommitted returns once every stored seq up to seq is committed.
func (l *Log) waitCommitted(seq uint64) {
	if l.committed.Load() >= seq {
		return
	}
	l.waiters.Add(1)
	defer l.waiters.Add(-1)
	for {
		l.cmu.Lock()
		ch := l.cch
		l.cmu.Unlock()
		if l.committed.Load() >= seq {
			return
		}
		<-ch
	}
}

// settle returns once every stored record up to seq is committed and
// readable: also one whose seq is assigned but whose write is still being
// queued.
func (l *Log) settle(seq uint64) {
	q := l.queued.Load()
	if seq > q {
		l.appendMu.Lock() // an append holding seqs <= seq has queued its write
		q = l.queued.Load()
		l.appendMu.Unlock()
	}
	l.waitCommitted(min(seq, q))
}

// Get reads one stored message. It returns ErrLogNotFound for a seq that
// was never stored or has been deleted (also one deleted from a block
// that still holds other records).
func (l *Log) Get(seq uint64) (LogMessage, error) {
	var m LogMessage
	if seq == 0 || seq > l.Head() {
		return m, ErrLogNotFound
	}
	l.settle(seq)
	key, err := l.getKey(seq)
	if err != nil {
		return m, err
	}
	first, isBlock := parseBlockKey(key)
	keep := false
	if isBlock {
		// A block never changes once written (its key, the first seq, is
		// never used again), so a copy serves the next Gets of a reader
		// going through it; one that reads a block once copies nothing.
		if c := l.lastGet.Load(); c != nil && c.first == first && c.seqs != nil {
			return l.gotten(seq, m, c.get(seq, &m))
		}
		c := l.lastGet.Load()
		keep = c != nil && c.first == first
		if !keep {
			l.lastGet.Store(&cachedBlock{first: first})
		}
	}
	err = l.db.view(func(txn *badger.Txn) error {
		item, err := txn.Get(key)
		if err != nil {
			return err
		}
		return item.Value(func(b []byte) error {
			if isBlock {
				if keep {
					if c := newCachedBlock(first, b); c != nil {
						l.lastGet.Store(c)
						return c.get(seq, &m)
					}
				}
				return getFromBlock(first, b, seq, &m)
			}
			v, err := parseLogRecord(b)
			if err != nil {
				return err
			}
			v.message(seq, &m)
			return nil
		})
	})
	return l.gotten(seq, m, err)
}

// cachedBlock is the block the last Get read: with its records (in a
// copy of its value) once a Get reads it a second time.
type cachedBlock struct {
	first uint64
	seqs  []uint64
	recs  [][]byte
}

// newCachedBlock copies and splits a block, or returns nil if it is
// damaged (Gets then read it from the store and report the damage).
func newCachedBlock(first uint64, value []byte) *cachedBlock {
	c := &cachedBlock{first: first}
	value = bytes.Clone(value)
	if err := walkBlock(first, value, func(seq uint64, rec []byte) bool {
		c.seqs = append(c.seqs, seq)
		c.recs = append(c.recs, rec)
		return true
	}); err != nil || c.seqs == nil {
		return nil
	}
	return c
}

// get decodes the record seq into m.
func (c *cachedBlock) get(seq uint64, m *LogMessage) error {
	i, ok := slices.BinarySearch(c.seqs, seq)
	if !ok {
		return ErrLogNotFound
	}
	v, err := parseLogRecord(c.recs[i])
	if err != nil {
		return err
	}
	v.message(seq, m)
	return nil
}

// gotten is Get's result for err.
func (l *Log) gotten(seq uint64, m LogMessage, err error) (LogMessage, error) {
	if errors.Is(err, badger.ErrKeyNotFound) || errors.Is(err, ErrLogNotFound) {
		return LogMessage{}, ErrLogNotFound
	}
	if err != nil {
		return LogMessage{}, fmt.Errorf("log: get %d: %w", seq, err)
	}
	return m, nil
}

// getKey is the key that holds seq: its block's, or its own in a store
// written before blocks. It returns ErrLogNotFound for a seq the index
// says is not stored, in a block (the store may still hold it until the
// delete of the block commits).
func (l *Log) getKey(seq uint64) ([]byte, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if i := l.refOf(seq); i >= 0 {
		ref := l.blocks[i]
		if ref.n == 0 || ref.live < ref.n && !l.isStored(seq) {
			return nil, ErrLogNotFound
		}
		return blockKey(ref.first), nil
	}
	if seq <= l.legacyMax {
		// Under its own key (a store written before blocks), or not
		// stored: the store says which, and whether it is damaged.
		return logKey(seq), nil
	}
	if !l.isStored(seq) {
		return nil, ErrLogNotFound
	}
	return blockKey(seq), nil // the only record of its block
}

// getFromBlock decodes the record seq of a block into m.
func getFromBlock(first uint64, b []byte, seq uint64, m *LogMessage) error {
	found := false
	var perr error
	err := walkBlock(first, b, func(s uint64, rec []byte) bool {
		if s < seq {
			return true
		}
		if s == seq {
			found = true
			var v logView
			if v, perr = parseLogRecord(rec); perr == nil {
				v.message(seq, m)
			}
		}
		return false
	})
	switch {
	case found:
		return perr
	case err != nil:
		return err
	}
	return ErrLogNotFound
}

// Read calls fn for each stored message with a seq in (after, upto], in
// seq order, from one consistent snapshot, until fn returns false. upto 0
// means Head at the call. Every record appended up to upto is committed
// before the snapshot is taken. fn's *LogMessage is reused after fn
// returns; the strings and slices it holds are not, and may be kept.
// Damaged records are skipped. The snapshot is held until Read returns, so
// fn should hand messages on rather than wait on a network peer: a read
// transaction held for long keeps badger from reclaiming old versions.
func (l *Log) Read(after, upto uint64, fn func(*LogMessage) bool) error {
	if upto == 0 {
		upto = l.Head()
	}
	if after >= upto {
		return nil
	}
	l.settle(upto)
	var m LogMessage
	more := true
	l.mu.Lock()
	legacy := after < l.legacyMax
	l.mu.Unlock()
	err := l.db.view(func(txn *badger.Txn) error {
		if legacy {
			if err := l.readLegacy(txn, after, upto, &m, &more, fn); err != nil || !more {
				return err
			}
		}
		return l.readBlocks(txn, after, upto, &m, fn)
	})
	if err != nil {
		return fmt.Errorf("log: read: %w", err)
	}
	return nil
}

// readLegacy is Read of the records under their own keys (a store
// written before blocks).
func (l *Log) readLegacy(txn *badger.Txn, after, upto uint64, m *LogMessage, more *bool, fn func(*LogMessage) bool) error {
	it := txn.NewIterator(badger.IteratorOptions{Prefix: []byte(nsLog), PrefetchValues: true, PrefetchSize: 64})
	defer it.Close()
	for it.Seek(logKey(after + 1)); it.Valid(); it.Next() {
		item := it.Item()
		seq, ok := parseLogKey(item.Key())
		if !ok {
			continue
		}
		if seq > upto {
			*more = false
			return nil
		}
		err := item.Value(func(value []byte) error {
			v, err := parseLogRecord(value)
			if err != nil {
				return nil
			}
			v.message(seq, m)
			*more = fn(m)
			return nil
		})
		if err != nil || !*more {
			return err
		}
	}
	return nil
}

// readBlocks is Read of the blocks: from the one that holds after+1,
// skipping the records the index no longer holds.
func (l *Log) readBlocks(txn *badger.Txn, after, upto uint64, m *LogMessage, fn func(*LogMessage) bool) error {
	start := after + 1
	l.mu.Lock()
	if i := l.refOf(start); i >= 0 {
		start = l.blocks[i].first
	}
	l.mu.Unlock()
	it := txn.NewIterator(badger.IteratorOptions{Prefix: []byte(nsLogBlock), PrefetchValues: true, PrefetchSize: 16})
	defer it.Close()
	more := true
	for it.Seek(blockKey(start)); more && it.Valid(); it.Next() {
		item := it.Item()
		first, ok := parseBlockKey(item.Key())
		if !ok {
			continue
		}
		if first > upto {
			return nil
		}
		stored, partial := l.blockState(first)
		if !stored {
			continue // deleted since the snapshot
		}
		err := item.Value(func(value []byte) error {
			_ = walkBlock(first, value, func(seq uint64, rec []byte) bool {
				if seq <= after {
					return true
				}
				if seq > upto {
					more = false
					return false
				}
				if partial && !l.recordStored(seq) {
					return true
				}
				v, err := parseLogRecord(rec)
				if err != nil {
					return true // damaged: skipped
				}
				v.message(seq, m)
				more = fn(m)
				return more
			})
			return nil
		})
		if err != nil {
			return err
		}
	}
	return nil
}

// FormatID is the browser event id of seq: the epoch in 16 hex digits, a
// dash, and seq in decimal. The history's ids had the same shape (with a
// 12-digit epoch), so a browser resuming from one gets ErrLogIDForeign: a
// clean reset.
func (l *Log) FormatID(seq uint64) string {
	const digits = "0123456789abcdef"
	var b [17 + 20]byte
	for i := 0; i < 16; i++ {
		b[i] = digits[l.epoch>>(60-4*i)&0xf]
	}
	b[16] = '-'
	return string(strconv.AppendUint(b[:17], seq, 10))
}

// ParseID returns the seq of an id FormatID made. It returns
// ErrLogIDMalformed for anything else, ErrLogIDForeign for an id of
// another epoch, and ErrLogIDFuture for a seq beyond Head. Whether the
// messages after it are still stored is for Oldest to say.
func (l *Log) ParseID(s string) (uint64, error) {
	i := strings.LastIndexByte(s, '-')
	if i < 1 || i > 16 || i == len(s)-1 || len(s)-i-1 > 20 {
		return 0, ErrLogIDMalformed
	}
	epoch, err := strconv.ParseUint(s[:i], 16, 64)
	if err != nil {
		return 0, ErrLogIDMalformed
	}
	seq, err := strconv.ParseUint(s[i+1:], 10, 64)
	if err != nil {
		return 0, ErrLogIDMalformed
	}
	if epoch != l.epoch {
		return 0, ErrLogIDForeign
	}
	if seq > l.Head() {
		return 0, ErrLogIDFuture
	}
	return seq, nil
}
