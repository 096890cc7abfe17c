package storage

import (
	"errors"
	"fmt"
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
// was never stored or has been deleted.
func (l *Log) Get(seq uint64) (LogMessage, error) {
	var m LogMessage
	if seq == 0 || seq > l.Head() {
		return m, ErrLogNotFound
	}
	l.settle(seq)
	err := l.db.view(func(txn *badger.Txn) error {
		item, err := txn.Get(logKey(seq))
		if err != nil {
			return err
		}
		return item.Value(func(b []byte) error {
			v, err := parseLogRecord(b)
			if err != nil {
				return err
			}
			v.message(seq, &m)
			return nil
		})
	})
	if errors.Is(err, badger.ErrKeyNotFound) {
		return LogMessage{}, ErrLogNotFound
	}
	if err != nil {
		return LogMessage{}, fmt.Errorf("log: get %d: %w", seq, err)
	}
	return m, nil
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
	err := l.db.ScanFrom([]byte(nsLog), logKey(after+1), func(key, value []byte) bool {
		seq, ok := parseLogKey(key)
		if !ok {
			return true
		}
		if seq > upto {
			return false
		}
		v, err := parseLogRecord(value)
		if err != nil {
			return true
		}
		v.message(seq, &m)
		return fn(&m)
	})
	if err != nil {
		return fmt.Errorf("log: read: %w", err)
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
