package storage

import (
	"encoding/binary"
	"errors"
)

// Session state of the engine (broker/engine). Every key starts with a
// namespace and the client id, so one DeletePrefix removes a client's
// records of a kind:
//
//	S 0x00 <client>                            session record
//	U 0x00 <client> 0x00 <group> 0x00 <filter>  subscription
//	Q 0x00 <client> 0x00 <8-byte gen> <8-byte seq>  queued or in-flight outbound QoS 1/2 message (a log reference)
//	I 0x00 <client> 0x00 <2-byte packet id>     inbound QoS 2 message PUBREC'd, awaiting PUBREL
//	R 0x00 <topic>                              retained message (appendLogRecord form)
//
// A queue entry carries the generation of the session that made it: a
// session started clean gets a new generation, so entries of the one it
// replaced that commit late are ignored at load and removed.
const (
	nsSession = "S\x00"
	nsSub     = "U\x00"
	nsQueue   = "Q\x00"
	nsInbound = "I\x00"
	nsRetain  = "R\x00"
)

// SessionRecord is a persistent session.
type SessionRecord struct {
	ID           string
	Gen          uint64
	Version      byte   // MQTT protocol level
	Expiry       uint32 // seconds the session lives after its connection ends
	Disconnected int64  // unix seconds its connection ended; 0 = connected (at a crash: counted from the load)
	Principal    []byte // who the session belongs to, in the authenticator's form
	// Will is the will of the session's connection (AppendRetained form,
	// Expiry holding the will's expiry interval in seconds), sent after a
	// crash; WillDelay its delay in seconds. Empty without a will.
	Will      []byte
	WillDelay uint32
}

// SubRecord is one subscription of a session.
type SubRecord struct {
	Filter            string
	Group             string // shared-subscription group, "" if none
	QoS               byte
	NoLocal           bool
	RetainAsPublished bool
	RetainHandling    byte
	ID                uint32 // subscription identifier, 0 = none
}

// QueueRecord is an outbound QoS 1/2 message of a session: a reference to
// log record Seq and how it goes out.
type QueueRecord struct {
	Gen      uint64
	Seq      uint64
	QoS      byte
	Retain   bool
	SubIDs   []uint32
	PacketID uint16 // 0 while queued; the id it was sent with
	Pubrel   bool   // PUBREC received, PUBREL sent
}

func clientPrefix(ns, client string) []byte {
	b := make([]byte, 0, len(ns)+len(client)+1)
	return append(append(append(b, ns...), client...), 0)
}

// SessionKey is the key of a client's session record.
func SessionKey(client string) []byte { return append([]byte(nsSession), client...) }

// SessionPrefix covers every session record.
func SessionPrefix() []byte { return []byte(nsSession) }

// SubKey is the key of one subscription.
func SubKey(client, group, filter string) []byte {
	b := clientPrefix(nsSub, client)
	return append(append(append(b, group...), 0), filter...)
}

// SubPrefix covers a client's subscriptions ("" client: every one).
func SubPrefix(client string) []byte {
	if client == "" {
		return []byte(nsSub)
	}
	return clientPrefix(nsSub, client)
}

// QueueKey is the key of a queue entry.
func QueueKey(client string, gen, seq uint64) []byte {
	b := clientPrefix(nsQueue, client)
	return binary.BigEndian.AppendUint64(binary.BigEndian.AppendUint64(b, gen), seq)
}

// QueuePrefix covers a client's queue ("" client: every queue).
func QueuePrefix(client string) []byte {
	if client == "" {
		return []byte(nsQueue)
	}
	return clientPrefix(nsQueue, client)
}

// InboundKey is the key of an inbound QoS 2 mark.
func InboundKey(client string, id uint16) []byte {
	return binary.BigEndian.AppendUint16(clientPrefix(nsInbound, client), id)
}

// InboundPrefix covers a client's inbound marks ("" client: every one).
func InboundPrefix(client string) []byte {
	if client == "" {
		return []byte(nsInbound)
	}
	return clientPrefix(nsInbound, client)
}

// RetainKey is the key of the retained message of topic.
func RetainKey(topic string) []byte { return append([]byte(nsRetain), topic...) }

// RetainPrefix covers every retained message.
func RetainPrefix() []byte { return []byte(nsRetain) }

// ClientOfKey returns the client id of a subscription, queue or inbound
// key, and the rest of the key after it.
func ClientOfKey(key []byte) (client string, rest []byte, ok bool) {
	if len(key) < 2 {
		return "", nil, false
	}
	k := key[2:]
	for i, c := range k {
		if c == 0 {
			return string(k[:i]), k[i+1:], true
		}
	}
	return "", nil, false
}

// ParseQueueRest reads gen and seq from the rest of a queue key.
func ParseQueueRest(rest []byte) (gen, seq uint64, ok bool) {
	if len(rest) != 16 {
		return 0, 0, false
	}
	return binary.BigEndian.Uint64(rest), binary.BigEndian.Uint64(rest[8:]), true
}

// ParseInboundRest reads the packet id from the rest of an inbound key.
func ParseInboundRest(rest []byte) (uint16, bool) {
	if len(rest) != 2 {
		return 0, false
	}
	return binary.BigEndian.Uint16(rest), true
}

// ErrBadRecord is a stored record that does not decode.
var ErrBadRecord = errors.New("storage: damaged record")

const sessionRecordVersion = 1

// AppendSession encodes r.
func AppendSession(dst []byte, r *SessionRecord) []byte {
	dst = append(dst, sessionRecordVersion, r.Version)
	dst = binary.AppendUvarint(dst, r.Gen)
	dst = binary.AppendUvarint(dst, uint64(r.Expiry))
	dst = binary.AppendVarint(dst, r.Disconnected)
	dst = appendBytes(dst, []byte(r.ID))
	dst = appendBytes(dst, r.Principal)
	dst = appendBytes(dst, r.Will)
	return binary.AppendUvarint(dst, uint64(r.WillDelay))
}

// DecodeSession decodes a session record.
func DecodeSession(b []byte) (SessionRecord, error) {
	var r SessionRecord
	rd := &reader{b: b}
	if rd.byte() != sessionRecordVersion {
		return r, ErrBadRecord
	}
	r.Version = rd.byte()
	r.Gen = rd.uvarint()
	exp := rd.uvarint()
	r.Disconnected = rd.varint()
	r.ID = string(rd.bytes())
	r.Principal = append([]byte(nil), rd.bytes()...)
	if w := rd.bytes(); len(w) > 0 {
		r.Will = append([]byte(nil), w...)
	}
	delay := rd.uvarint()
	if rd.err != nil || exp > 1<<32-1 || delay > 1<<32-1 {
		return SessionRecord{}, ErrBadRecord
	}
	r.Expiry, r.WillDelay = uint32(exp), uint32(delay)
	return r, nil
}

// AppendSub encodes a subscription (filter and group are in the key but
// stored again so a record decodes on its own).
func AppendSub(dst []byte, s *SubRecord) []byte {
	flags := s.QoS & 3
	if s.NoLocal {
		flags |= 1 << 2
	}
	if s.RetainAsPublished {
		flags |= 1 << 3
	}
	flags |= (s.RetainHandling & 3) << 4
	dst = append(dst, 1, flags)
	dst = binary.AppendUvarint(dst, uint64(s.ID))
	dst = appendBytes(dst, []byte(s.Group))
	return appendBytes(dst, []byte(s.Filter))
}

// DecodeSub decodes a subscription.
func DecodeSub(b []byte) (SubRecord, error) {
	var s SubRecord
	rd := &reader{b: b}
	if rd.byte() != 1 {
		return s, ErrBadRecord
	}
	flags := rd.byte()
	id := rd.uvarint()
	s.Group = string(rd.bytes())
	s.Filter = string(rd.bytes())
	if rd.err != nil || id > 268435455 || flags&3 == 3 || (flags>>4)&3 == 3 {
		return SubRecord{}, ErrBadRecord
	}
	s.QoS, s.NoLocal, s.RetainAsPublished, s.RetainHandling, s.ID = flags&3, flags&4 != 0, flags&8 != 0, (flags>>4)&3, uint32(id)
	return s, nil
}

// AppendQueue encodes a queue entry (gen and seq are the key).
func AppendQueue(dst []byte, q *QueueRecord) []byte {
	flags := q.QoS & 3
	if q.Retain {
		flags |= 1 << 2
	}
	if q.Pubrel {
		flags |= 1 << 3
	}
	dst = append(dst, 1, flags)
	dst = binary.BigEndian.AppendUint16(dst, q.PacketID)
	dst = binary.AppendUvarint(dst, uint64(len(q.SubIDs)))
	for _, id := range q.SubIDs {
		dst = binary.AppendUvarint(dst, uint64(id))
	}
	return dst
}

// DecodeQueue decodes a queue entry; gen and seq come from its key.
func DecodeQueue(b []byte, gen, seq uint64) (QueueRecord, error) {
	q := QueueRecord{Gen: gen, Seq: seq}
	rd := &reader{b: b}
	if rd.byte() != 1 {
		return q, ErrBadRecord
	}
	flags := rd.byte()
	q.PacketID = rd.uint16()
	n := rd.uvarint()
	if n > 64 {
		return QueueRecord{}, ErrBadRecord
	}
	for i := uint64(0); i < n; i++ {
		id := rd.uvarint()
		if id > 268435455 {
			return QueueRecord{}, ErrBadRecord
		}
		q.SubIDs = append(q.SubIDs, uint32(id))
	}
	if rd.err != nil || flags&3 == 0 || flags&3 == 3 {
		return QueueRecord{}, ErrBadRecord
	}
	q.QoS, q.Retain, q.Pubrel = flags&3, flags&4 != 0, flags&8 != 0
	return q, nil
}

// AppendRetained encodes a retained message (the log record form).
func AppendRetained(dst []byte, m *LogMessage) []byte { return appendLogRecord(dst, m) }

// DecodeRetained decodes a retained message.
func DecodeRetained(b []byte) (LogMessage, error) { return DecodeLogMessage(b) }
