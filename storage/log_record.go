package storage

import (
	"encoding/binary"
	"fmt"
)

// Log records. Records are stored in blocks (log_block.go); a store
// written before blocks holds one key per record, the namespace and its
// sequence number in big-endian order, so a key-ordered scan is seq order:
//
//	l 0x00 <8-byte seq>    record: appendLogRecord
//
// The log's own metadata lives under MetaKey("log.epoch"),
// MetaKey("log.reserved") and MetaKey("log.trimmed"), 8-byte big-endian
// each.
const nsLog = "l\x00"

const (
	metaLogEpoch    = "log.epoch"
	metaLogReserved = "log.reserved"
	metaLogTrimmed  = "log.trimmed"
)

func logKey(seq uint64) []byte { return appendLogKey(make([]byte, 0, len(nsLog)+8), seq) }

// appendLogKey appends the key of seq to dst.
func appendLogKey(dst []byte, seq uint64) []byte {
	return binary.BigEndian.AppendUint64(append(dst, nsLog...), seq)
}

// parseLogKey returns the sequence of a log key.
func parseLogKey(key []byte) (uint64, bool) {
	if len(key) != len(nsLog)+8 || string(key[:len(nsLog)]) != nsLog {
		return 0, false
	}
	return binary.BigEndian.Uint64(key[len(nsLog):]), true
}

// LogMessage is one accepted message.
type LogMessage struct {
	Seq     uint64 // set by Append (in the key or the block, not part of the record)
	Time    int64  // unix nanoseconds the broker accepted it (set by Append if 0)
	Topic   string
	Payload []byte
	QoS     byte
	Retain  bool
	Client  string // publishing client id ("" for the broker itself)
	Device  string // registered device id of the publisher, or ""
	Expiry  int64  // unix seconds after which it must not be delivered; 0 = never
	Props   []byte // opaque: encoded MQTT 5 properties that travel with the message
	// Origin names a message another node of a cluster accepted: that
	// node's identity for it (engine.Identity), "" for one accepted here.
	Origin string
}

// Size is what the message counts for in a rule's MaxBytes: its topic,
// payload and properties.
func (m *LogMessage) Size() int { return len(m.Topic) + len(m.Payload) + len(m.Props) }

// The stored form (version 1):
//
//	byte    version (1)
//	byte    flags: bits 0-1 QoS, 2 retain, 3 client, 4 device, 5 expiry, 6 props
//	varint  time
//	uvarint len, topic
//	uvarint len, payload
//	[uvarint len, client]   if flag 3
//	[uvarint len, device]   if flag 4
//	[varint expiry]         if flag 5
//	[uvarint len, props]    if flag 6
//	[uvarint len, origin]   if flag 7
//
// Optional fields cost nothing when empty; a new field takes a new
// version.
const logVersion = 1

const (
	logFlagRetain = 1 << 2
	logFlagClient = 1 << 3
	logFlagDevice = 1 << 4
	logFlagExpiry = 1 << 5
	logFlagProps  = 1 << 6
	logFlagOrigin = 1 << 7
	logFlagsKnown = 1<<8 - 1
)

// logRecordSize bounds the length of m's stored form.
func logRecordSize(m *LogMessage) int {
	return 2 + 3*binary.MaxVarintLen64 + 4*binary.MaxVarintLen32 +
		len(m.Topic) + len(m.Payload) + len(m.Client) + len(m.Device) + len(m.Props) + len(m.Origin)
}

// appendLogRecord appends the stored form of m (everything but Seq) to dst.
func appendLogRecord(dst []byte, m *LogMessage) []byte {
	flags := m.QoS & 3
	if m.Retain {
		flags |= logFlagRetain
	}
	if m.Client != "" {
		flags |= logFlagClient
	}
	if m.Device != "" {
		flags |= logFlagDevice
	}
	if m.Expiry != 0 {
		flags |= logFlagExpiry
	}
	if len(m.Props) > 0 {
		flags |= logFlagProps
	}
	if m.Origin != "" {
		flags |= logFlagOrigin
	}
	dst = append(dst, logVersion, flags)
	dst = binary.AppendVarint(dst, m.Time)
	dst = appendString(dst, m.Topic)
	dst = appendBytes(dst, m.Payload)
	if flags&logFlagClient != 0 {
		dst = appendString(dst, m.Client)
	}
	if flags&logFlagDevice != 0 {
		dst = appendString(dst, m.Device)
	}
	if flags&logFlagExpiry != 0 {
		dst = binary.AppendVarint(dst, m.Expiry)
	}
	if flags&logFlagProps != 0 {
		dst = appendBytes(dst, m.Props)
	}
	if flags&logFlagOrigin != 0 {
		dst = appendString(dst, m.Origin)
	}
	return dst
}

func appendString(dst []byte, s string) []byte {
	dst = binary.AppendUvarint(dst, uint64(len(s)))
	return append(dst, s...)
}

// logView is a decoded record whose slices alias the stored value.
type logView struct {
	flags                                 byte
	time, expiry                          int64
	topic, payload, client, device, props []byte
	origin                                []byte
}

// size is the record's MaxBytes size (see LogMessage.Size).
func (v *logView) size() int { return len(v.topic) + len(v.payload) + len(v.props) }

// parseLogRecord checks and splits a stored value without copying it.
func parseLogRecord(b []byte) (logView, error) {
	var v logView
	r := reader{b: b}
	if ver := r.byte(); ver != logVersion {
		if r.err != nil {
			return v, r.err
		}
		return v, fmt.Errorf("%w: log record version %d", ErrCorrupt, ver)
	}
	v.flags = r.byte()
	if v.flags&^logFlagsKnown != 0 || v.flags&3 == 3 {
		return v, fmt.Errorf("%w: log record flags %#x", ErrCorrupt, v.flags)
	}
	v.time = r.varint()
	v.topic = r.bytes()
	v.payload = r.bytes()
	if v.flags&logFlagClient != 0 {
		v.client = r.bytes()
	}
	if v.flags&logFlagDevice != 0 {
		v.device = r.bytes()
	}
	if v.flags&logFlagExpiry != 0 {
		v.expiry = r.varint()
	}
	if v.flags&logFlagProps != 0 {
		v.props = r.bytes()
	}
	if v.flags&logFlagOrigin != 0 {
		v.origin = r.bytes()
	}
	if r.err != nil {
		return logView{}, r.err
	}
	if len(r.b) != 0 {
		return logView{}, fmt.Errorf("%w: log record: %d trailing bytes", ErrCorrupt, len(r.b))
	}
	return v, nil
}

// message copies v into m, in two allocations: one string holding the
// topic, client and device, one slice holding the payload and props.
func (v *logView) message(seq uint64, m *LogMessage) {
	*m = LogMessage{Seq: seq, Time: v.time, QoS: v.flags & 3, Retain: v.flags&logFlagRetain != 0, Expiry: v.expiry}
	if n := len(v.topic) + len(v.client) + len(v.device) + len(v.origin); n > 0 {
		buf := make([]byte, 0, n)
		buf = append(append(append(append(buf, v.topic...), v.client...), v.device...), v.origin...)
		s := string(buf)
		t, c, d := len(v.topic), len(v.topic)+len(v.client), len(v.topic)+len(v.client)+len(v.device)
		m.Topic, m.Client, m.Device, m.Origin = s[:t], s[t:c], s[c:d], s[d:]
	}
	if n := len(v.payload) + len(v.props); n > 0 {
		buf := make([]byte, 0, n)
		buf = append(append(buf, v.payload...), v.props...)
		p := len(v.payload)
		m.Payload = buf[:p:p]
		if len(v.props) > 0 {
			m.Props = buf[p:]
		}
	}
}

// DecodeLogMessage decodes a stored log record. The message does not
// alias b; its Seq is zero (the sequence is the key). Any input that is
// not a record returns an error wrapping ErrCorrupt.
func DecodeLogMessage(b []byte) (LogMessage, error) {
	var m LogMessage
	v, err := parseLogRecord(b)
	if err != nil {
		return m, err
	}
	v.message(0, &m)
	return m, nil
}

// EncodeLogMessage appends the stored form of m (everything but Seq) to
// dst.
func EncodeLogMessage(dst []byte, m *LogMessage) []byte { return appendLogRecord(dst, m) }
