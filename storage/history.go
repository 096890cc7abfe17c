package storage

import (
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/dgraph-io/badger/v4"
)

// History records and the keys that describe them. A record's key is its
// sequence number in big-endian order, so a key-ordered scan is a replay.
const (
	nsHistory = "h\x00"
	nsMeta    = "m\x00"
)

// HistoryKey is the key of the history record with sequence seq.
func HistoryKey(seq uint64) []byte {
	return binary.BigEndian.AppendUint64([]byte(nsHistory), seq)
}

// HistoryPrefix covers every history record.
func HistoryPrefix() []byte { return []byte(nsHistory) }

// ParseHistoryKey returns the sequence of a history key.
func ParseHistoryKey(key []byte) (uint64, bool) {
	if len(key) != len(nsHistory)+8 || string(key[:len(nsHistory)]) != nsHistory {
		return 0, false
	}
	return binary.BigEndian.Uint64(key[len(nsHistory):]), true
}

// MetaKey is the key of a small named value of the broker's own (the
// history epoch, the reserved sequence).
func MetaKey(name string) []byte { return append([]byte(nsMeta), name...) }

// HistoryRecord is one recorded message.
type HistoryRecord struct {
	Seq     uint64 `json:"s"`
	Topic   string `json:"t"`
	Payload []byte `json:"p,omitempty"`
	QoS     byte   `json:"q,omitempty"`
	Retain  bool   `json:"r,omitempty"`
	TS      int64  `json:"ts"`          // unix milliseconds the broker routed it
	Device  string `json:"d,omitempty"` // id of the registered device that published it, or ""
	// Origin is the cluster identity of a message another node accepted
	// (its node, log epoch and seq there: engine.Identity); "" for one
	// accepted here. Not in the stored history form (the log keeps it).
	Origin string `json:"o,omitempty"`

	// Frame is an encoding of the record that every live reader shares
	// (Beacon's SSE event), made once before the record is handed to
	// them; nil for records read back from the store. Not stored.
	Frame []byte `json:"-"`
}

const historyVersion = 2 // 1: without Device

// AppendHistory appends the stored form of r (everything but Seq, which
// is the key) to dst.
func AppendHistory(dst []byte, r *HistoryRecord) []byte {
	flags := r.QoS & 3
	if r.Retain {
		flags |= 1 << 2
	}
	dst = append(dst, historyVersion, flags)
	dst = binary.AppendVarint(dst, r.TS)
	dst = appendBytes(dst, []byte(r.Topic))
	dst = appendBytes(dst, r.Payload)
	return appendBytes(dst, []byte(r.Device))
}

// DecodeHistory decodes a record stored under key. The record does not
// alias key or value.
func DecodeHistory(key, value []byte) (HistoryRecord, error) {
	var r HistoryRecord
	seq, ok := ParseHistoryKey(key)
	if !ok {
		return r, fmt.Errorf("%w: history key %x", ErrCorrupt, key)
	}
	r.Seq = seq
	rd := &reader{b: value}
	version := rd.byte()
	if version != 1 && version != historyVersion {
		return r, fmt.Errorf("%w: history record %d: unknown version", ErrCorrupt, seq)
	}
	flags := rd.byte()
	r.QoS = flags & 3
	r.Retain = flags&(1<<2) != 0
	r.TS = rd.varint()
	r.Topic = string(rd.bytes())
	r.Payload = append([]byte(nil), rd.bytes()...)
	if version >= 2 {
		r.Device = string(rd.bytes())
	}
	if rd.err != nil || len(rd.b) != 0 {
		return r, fmt.Errorf("%w: history record %d", ErrCorrupt, seq)
	}
	return r, nil
}

// errStop ends a ScanFrom early.
var errStop = errors.New("stop")

// ScanFrom calls fn for every key under prefix from start on, in key
// order, until fn returns false. The slices are only valid during the call.
func (d *DB) ScanFrom(prefix, start []byte, fn func(key, value []byte) bool) error {
	return d.ScanSnapshot(prefix, start, nil, fn)
}

// ScanSnapshot is ScanFrom that first calls opened, if set, once the
// read snapshot is taken: what opened checks then holds for everything
// the scan sees. An error from opened ends the scan and is returned.
func (d *DB) ScanSnapshot(prefix, start []byte, opened func() error, fn func(key, value []byte) bool) error {
	err := d.view(func(txn *badger.Txn) error {
		if opened != nil {
			if err := opened(); err != nil {
				return err
			}
		}
		it := txn.NewIterator(badger.IteratorOptions{Prefix: prefix, PrefetchValues: true, PrefetchSize: 64})
		defer it.Close()
		for it.Seek(start); it.Valid(); it.Next() {
			item := it.Item()
			more := true
			if err := item.Value(func(v []byte) error { more = fn(item.Key(), v); return nil }); err != nil {
				return err
			}
			if !more {
				return errStop
			}
		}
		return nil
	})
	if errors.Is(err, errStop) {
		return nil
	}
	return err
}

// Commit queues ops as one atomic unit and returns once they are
// committed and visible to readers, whatever the sync policy (under
// SyncNone, Write returns before that).
func (d *DB) Commit(ops ...Op) error {
	r := &request{ops: ops, done: make(chan error, 1)}
	if err := d.enqueue(r); err != nil {
		return err
	}
	return <-r.done
}

// PeekHistory returns the topic and time of a stored record without
// copying its payload. The topic aliases value.
func PeekHistory(value []byte) (topic []byte, ts int64, err error) {
	rd := &reader{b: value}
	if v := rd.byte(); v != 1 && v != historyVersion {
		return nil, 0, fmt.Errorf("%w: unknown history version", ErrCorrupt)
	}
	rd.byte()
	ts = rd.varint()
	topic = rd.bytes()
	if rd.err != nil {
		return nil, 0, rd.err
	}
	return topic, ts, nil
}
