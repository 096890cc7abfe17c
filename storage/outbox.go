package storage

import (
	"bytes"
	"encoding/binary"
	"fmt"
)

// The webhook outbox: messages waiting to be POSTed, one key range per
// webhook. A record's key ends in its sequence number in big-endian order,
// so a key-ordered scan of a webhook's prefix is its delivery order. The
// prefix itself, with nothing after it, is the webhook's mark: the highest
// sequence reserved, so that a sequence (an idempotency key receivers
// dedupe on) is never handed out twice, even when the outbox was empty at
// a restart.
//
//	o 0x00 <name> 0x00                 mark: 8-byte big-endian sequence
//	o 0x00 <name> 0x00 <8-byte seq>    record: AppendOutbox
//
// Webhook names must not contain 0x00.
const nsOutbox = "o\x00"

// OutboxPrefix covers the records and the mark of one webhook, or the
// whole outbox when name is "".
func OutboxPrefix(name string) []byte {
	if name == "" {
		return []byte(nsOutbox)
	}
	k := make([]byte, 0, len(nsOutbox)+len(name)+1)
	k = append(k, nsOutbox...)
	k = append(k, name...)
	return append(k, 0)
}

// OutboxKey is the key of the record with sequence seq of a webhook.
func OutboxKey(name string, seq uint64) []byte {
	k := make([]byte, 0, len(nsOutbox)+len(name)+1+8)
	k = append(k, nsOutbox...)
	k = append(k, name...)
	k = append(k, 0)
	return binary.BigEndian.AppendUint64(k, seq)
}

// OutboxMarkKey is the key of a webhook's reserved-sequence mark.
func OutboxMarkKey(name string) []byte { return OutboxPrefix(name) }

// splitOutboxKey returns the webhook name of an outbox key and what
// follows the separator after it.
func splitOutboxKey(key []byte) (name string, rest []byte, ok bool) {
	if !bytes.HasPrefix(key, []byte(nsOutbox)) {
		return "", nil, false
	}
	k := key[len(nsOutbox):]
	i := bytes.IndexByte(k, 0)
	if i <= 0 {
		return "", nil, false
	}
	return string(k[:i]), k[i+1:], true
}

// ParseOutboxKey returns the webhook name and sequence of a record key;
// ok is false for anything else, a mark included.
func ParseOutboxKey(key []byte) (name string, seq uint64, ok bool) {
	name, rest, ok := splitOutboxKey(key)
	if !ok || len(rest) != 8 {
		return "", 0, false
	}
	return name, binary.BigEndian.Uint64(rest), true
}

// ParseOutboxMarkKey returns the webhook name of a mark key.
func ParseOutboxMarkKey(key []byte) (name string, ok bool) {
	name, rest, ok := splitOutboxKey(key)
	if !ok || len(rest) != 0 {
		return "", false
	}
	return name, true
}

// OutboxRecord is one message waiting for its webhook.
type OutboxRecord struct {
	Attempts uint32 // delivery attempts made so far
	Created  int64  // unix milliseconds the message was queued
	Body     []byte // the request body, exactly as signed and sent
}

const outboxVersion = 1

// AppendOutbox appends the stored form of r to dst.
func AppendOutbox(dst []byte, r *OutboxRecord) []byte {
	dst = append(dst, outboxVersion)
	dst = binary.AppendUvarint(dst, uint64(r.Attempts))
	dst = binary.AppendVarint(dst, r.Created)
	return append(dst, r.Body...)
}

// OutboxRecordSize is an upper bound of the stored size of a record with
// a body of n bytes, to size the buffer of AppendOutbox.
func OutboxRecordSize(n int) int { return 1 + binary.MaxVarintLen32 + binary.MaxVarintLen64 + n }

// DecodeOutbox decodes what AppendOutbox wrote. The record does not alias
// value.
func DecodeOutbox(value []byte) (OutboxRecord, error) {
	var r OutboxRecord
	rd := &reader{b: value}
	if v := rd.byte(); v != outboxVersion {
		return r, fmt.Errorf("%w: outbox record version %d", ErrCorrupt, v)
	}
	attempts := rd.uvarint()
	r.Created = rd.varint()
	if rd.err != nil || attempts > 1<<32-1 {
		return OutboxRecord{}, fmt.Errorf("%w: outbox record header", ErrCorrupt)
	}
	r.Attempts = uint32(attempts)
	r.Body = bytes.Clone(rd.b)
	return r, nil
}
