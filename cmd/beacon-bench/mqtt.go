package main

import (
	"bufio"
	"errors"
	"fmt"
	"net"
	"time"
)

// MQTT control packet types (the high nibble of the fixed header).
const (
	typeConnect    = 1
	typeConnack    = 2
	typePublish    = 3
	typePuback     = 4
	typePubrec     = 5
	typePubrel     = 6
	typePubcomp    = 7
	typeSubscribe  = 8
	typeSuback     = 9
	typePingreq    = 12
	typePingresp   = 13
	typeDisconnect = 14
)

// MQTT 5 properties the client reads.
const (
	propReasonString  = 0x1F
	propReceiveMax    = 0x21
	propMaximumQoS    = 0x24
	propMaxPacketSize = 0x27
)

var errMalformed = errors.New("malformed packet")

// handshakeTimeout bounds CONNECT/CONNACK and SUBSCRIBE/SUBACK.
const handshakeTimeout = 10 * time.Second

// appendVarint appends an MQTT variable byte integer.
func appendVarint(b []byte, n int) []byte {
	for {
		c := byte(n & 0x7f)
		n >>= 7
		if n > 0 {
			c |= 0x80
		}
		b = append(b, c)
		if n == 0 {
			return b
		}
	}
}

// varint decodes an MQTT variable byte integer and its length in bytes.
func varint(b []byte) (n, size int, err error) {
	for i := 0; i < 4 && i < len(b); i++ {
		n |= int(b[i]&0x7f) << (7 * i)
		if b[i]&0x80 == 0 {
			return n, i + 1, nil
		}
	}
	return 0, 0, errMalformed
}

func appendString(b []byte, s string) []byte {
	b = append(b, byte(len(s)>>8), byte(len(s)))
	return append(b, s...)
}

// appendPacket appends a packet: the fixed header byte, the remaining
// length, then body.
func appendPacket(b []byte, first byte, body []byte) []byte {
	b = append(b, first)
	b = appendVarint(b, len(body))
	return append(b, body...)
}

// encodeConnect is an MQTT 5 CONNECT with clean start and no properties.
func encodeConnect(id, username, password string, keepAlive uint16) []byte {
	flags := byte(0x02) // clean start
	if username != "" {
		flags |= 0x80
	}
	if password != "" {
		flags |= 0x40
	}
	body := appendString(nil, "MQTT")
	body = append(body, 5, flags, byte(keepAlive>>8), byte(keepAlive), 0)
	body = appendString(body, id)
	if username != "" {
		body = appendString(body, username)
	}
	if password != "" {
		body = appendString(body, password)
	}
	return appendPacket(nil, typeConnect<<4, body)
}

// encodeSubscribe subscribes to one filter with packet id 1.
func encodeSubscribe(filter string, qos byte) []byte {
	body := []byte{0, 1, 0} // packet id 1, no properties
	body = appendString(body, filter)
	body = append(body, qos)
	return appendPacket(nil, typeSubscribe<<4|0x02, body)
}

// publishTemplate is an encoded PUBLISH whose packet id and payload header
// are patched for every message: see stamp.
type publishTemplate struct {
	b      []byte
	idAt   int // offset of the packet id; 0 at QoS 0
	dataAt int // offset of the payload
}

func newPublishTemplate(topic string, qos byte, size int) publishTemplate {
	body := appendString(nil, topic)
	idAt := 0
	if qos > 0 {
		idAt = len(body)
		body = append(body, 0, 0)
	}
	body = append(body, 0) // no properties
	dataAt := len(body)
	body = append(body, make([]byte, size)...)
	b := appendPacket(nil, typePublish<<4|qos<<1, body)
	shift := len(b) - len(body) // the fixed header
	t := publishTemplate{b: b, dataAt: dataAt + shift}
	if qos > 0 {
		t.idAt = idAt + shift
	}
	return t
}

// stamp writes a message's identity into an encoded PUBLISH (a copy of
// the template): packet id, then the payload's first 20 bytes, which say
// when the message was due (unix nanoseconds), its sequence number and its
// publisher.
func (t publishTemplate) stamp(b []byte, id uint16, due int64, seq uint64, pub uint32) {
	if t.idAt > 0 {
		b[t.idAt], b[t.idAt+1] = byte(id>>8), byte(id)
	}
	putStamp(b[t.dataAt:], due, seq, pub)
}

// ackPacket is PUBACK, PUBREC, PUBREL or PUBCOMP with reason Success: the
// fixed header (PUBREL has flags 0b0010) and the packet id.
func ackPacket(typ byte, id uint16) [4]byte {
	first := typ << 4
	if typ == typePubrel {
		first |= 0x02
	}
	return [4]byte{first, 2, byte(id >> 8), byte(id)}
}

// writeAck appends an acknowledgement to w. It flushes first rather than
// let a packet straddle two writes: a publisher's connection has two
// writers (PUBLISH and PUBREL), each with its own buffer.
func writeAck(w *bufio.Writer, typ byte, id uint16) error {
	if w.Available() < 4 {
		if err := w.Flush(); err != nil {
			return err
		}
	}
	a := ackPacket(typ, id)
	_, err := w.Write(append(w.AvailableBuffer(), a[:]...))
	return err
}

// parsePublish splits a PUBLISH body into its packet id (0 at QoS 0) and
// payload, skipping topic and properties. The payload aliases body.
func parsePublish(flags byte, body []byte) (qos byte, id uint16, payload []byte, err error) {
	qos = flags >> 1 & 3
	if len(body) < 2 || qos == 3 {
		return 0, 0, nil, errMalformed
	}
	pos := 2 + (int(body[0])<<8 | int(body[1]))
	if qos > 0 {
		if pos+2 > len(body) {
			return 0, 0, nil, errMalformed
		}
		id = uint16(body[pos])<<8 | uint16(body[pos+1])
		pos += 2
	}
	if pos >= len(body) {
		return 0, 0, nil, errMalformed
	}
	var n, size int
	if c := body[pos]; c < 0x80 { // the usual: a one-byte property length
		n, size = int(c), 1
	} else if n, size, err = varint(body[pos:]); err != nil {
		return 0, 0, nil, err
	}
	pos += size + n
	if pos > len(body) {
		return 0, 0, nil, errMalformed
	}
	return qos, id, body[pos:], nil
}

// parseAck reads PUBACK, PUBREC, PUBREL or PUBCOMP: packet id and reason
// code (absent means Success).
func parseAck(body []byte) (id uint16, reason byte, err error) {
	if len(body) < 2 {
		return 0, 0, errMalformed
	}
	id = uint16(body[0])<<8 | uint16(body[1])
	if len(body) > 2 {
		reason = body[2]
	}
	return id, reason, nil
}

// propSizes gives the size of each MQTT 5 property's value: a fixed width,
// or -1 for a two-byte-length string or binary, -2 for a string pair, -3
// for a variable byte integer.
var propSizes = map[byte]int{
	0x01: 1, 0x17: 1, 0x19: 1, 0x24: 1, 0x25: 1, 0x28: 1, 0x29: 1, 0x2A: 1,
	0x13: 2, 0x21: 2, 0x22: 2, 0x23: 2,
	0x02: 4, 0x11: 4, 0x18: 4, 0x27: 4,
	0x0B: -3,
	0x03: -1, 0x08: -1, 0x09: -1, 0x12: -1, 0x15: -1, 0x16: -1, 0x1A: -1, 0x1C: -1, 0x1F: -1,
	0x26: -2,
}

// properties walks a properties block (its length first) and calls fn with
// each property's id and value (for strings, without the length). It
// returns what follows the block.
func properties(b []byte, fn func(id byte, v []byte)) (rest []byte, err error) {
	n, size, err := varint(b)
	if err != nil || size+n > len(b) {
		return nil, errMalformed
	}
	p, rest := b[size:size+n], b[size+n:]
	for len(p) > 0 {
		id := p[0]
		p = p[1:]
		w, ok := propSizes[id]
		if !ok {
			return nil, fmt.Errorf("unknown property 0x%02x: %w", id, errMalformed)
		}
		switch {
		case w > 0:
			if len(p) < w {
				return nil, errMalformed
			}
			fn(id, p[:w])
			p = p[w:]
		case w == -3:
			_, s, err := varint(p)
			if err != nil {
				return nil, err
			}
			fn(id, p[:s])
			p = p[s:]
		default:
			for range -w { // one string, or the two of a pair
				if len(p) < 2 {
					return nil, errMalformed
				}
				l := int(p[0])<<8 | int(p[1])
				if len(p) < 2+l {
					return nil, errMalformed
				}
				fn(id, p[2:2+l])
				p = p[2+l:]
			}
		}
	}
	return rest, nil
}

// connack is what the broker said to CONNECT.
type connack struct {
	reason     byte
	receiveMax int // QoS 1/2 messages we may have in flight; 65535 when not said
	maxQoS     byte
	message    string // reason string, if any
}

func parseConnack(body []byte) (connack, error) {
	if len(body) < 3 {
		return connack{}, errMalformed
	}
	ca := connack{reason: body[1], receiveMax: 65535, maxQoS: 2}
	_, err := properties(body[2:], func(id byte, v []byte) {
		switch id {
		case propReceiveMax:
			ca.receiveMax = int(v[0])<<8 | int(v[1])
		case propMaximumQoS:
			ca.maxQoS = v[0]
		case propReasonString:
			ca.message = string(v)
		}
	})
	return ca, err
}

// disconnectError describes a DISCONNECT the broker sent.
func disconnectError(body []byte) error {
	if len(body) == 0 {
		return errors.New("broker sent DISCONNECT (normal)")
	}
	msg := ""
	if len(body) > 1 {
		_, _ = properties(body[1:], func(id byte, v []byte) {
			if id == propReasonString {
				msg = ": " + string(v)
			}
		})
	}
	return fmt.Errorf("broker sent DISCONNECT %s%s", reasonName(body[0]), msg)
}

// reasonNames are the MQTT 5 reason codes a broker sends in acks,
// CONNACK and DISCONNECT.
var reasonNames = map[byte]string{
	0x00: "success", 0x10: "no matching subscribers", 0x80: "unspecified error", 0x81: "malformed packet",
	0x82: "protocol error", 0x83: "implementation specific error", 0x87: "not authorized",
	0x89: "server busy", 0x8B: "server shutting down", 0x8D: "keep alive timeout", 0x8E: "session taken over",
	0x90: "topic name invalid", 0x91: "packet identifier in use", 0x92: "packet identifier not found",
	0x93: "receive maximum exceeded", 0x95: "packet too large", 0x96: "message rate too high",
	0x97: "quota exceeded", 0x99: "payload format invalid", 0x9B: "QoS not supported",
	0x9F: "connection rate exceeded",
}

// reasonName is a reason code as "0x97 quota exceeded".
func reasonName(code byte) string {
	if n, ok := reasonNames[code]; ok {
		return fmt.Sprintf("0x%02x %s", code, n)
	}
	return fmt.Sprintf("0x%02x", code)
}

// dial opens a client connection: from laddr when set (a source
// address of its own, so that ephemeral ports last; see connections.go).
func dial(addr string, laddr net.Addr) (net.Conn, error) {
	d := net.Dialer{Timeout: handshakeTimeout, LocalAddr: laddr}
	return d.Dial("tcp", addr)
}

// handshake sends CONNECT on conn and reads the CONNACK through r.
func handshake(conn net.Conn, r *reader, id, username, password string, keepAlive uint16) (connack, error) {
	_ = conn.SetDeadline(time.Now().Add(handshakeTimeout))
	defer func() { _ = conn.SetDeadline(time.Time{}) }()
	if _, err := conn.Write(encodeConnect(id, username, password, keepAlive)); err != nil {
		return connack{}, fmt.Errorf("connect %s: %w", id, err)
	}
	pk, err := r.next()
	if err != nil {
		return connack{}, fmt.Errorf("connect %s: no CONNACK: %w", id, err)
	}
	if pk.typ != typeConnack {
		return connack{}, fmt.Errorf("connect %s: got packet type %d, not CONNACK", id, pk.typ)
	}
	ca, err := parseConnack(pk.body)
	if err != nil {
		return ca, fmt.Errorf("connect %s: CONNACK: %w", id, err)
	}
	if ca.reason >= 0x80 {
		if ca.message != "" {
			return ca, fmt.Errorf("connect %s refused: %s: %s", id, reasonName(ca.reason), ca.message)
		}
		return ca, fmt.Errorf("connect %s refused: %s", id, reasonName(ca.reason))
	}
	return ca, nil
}

// subscribe sends SUBSCRIBE and waits for its SUBACK, passing any other
// packet that arrives first to other.
func subscribe(conn net.Conn, r *reader, filter string, qos byte, other func(packet) error) error {
	_ = conn.SetDeadline(time.Now().Add(handshakeTimeout))
	defer func() { _ = conn.SetDeadline(time.Time{}) }()
	if _, err := conn.Write(encodeSubscribe(filter, qos)); err != nil {
		return fmt.Errorf("subscribe %q: %w", filter, err)
	}
	for {
		pk, err := r.next()
		if err != nil {
			return fmt.Errorf("subscribe %q: no SUBACK: %w", filter, err)
		}
		if pk.typ != typeSuback {
			if err := other(pk); err != nil {
				return err
			}
			continue
		}
		if len(pk.body) < 3 {
			return fmt.Errorf("subscribe %q: SUBACK: %w", filter, errMalformed)
		}
		codes, err := properties(pk.body[2:], func(byte, []byte) {})
		if err != nil || len(codes) != 1 {
			return fmt.Errorf("subscribe %q: SUBACK: %w", filter, errMalformed)
		}
		switch {
		case codes[0] >= 0x80:
			return fmt.Errorf("subscribe %q refused: %s", filter, reasonName(codes[0]))
		case codes[0] < qos:
			return fmt.Errorf("subscribe %q: granted QoS %d, asked %d", filter, codes[0], qos)
		}
		return nil
	}
}
