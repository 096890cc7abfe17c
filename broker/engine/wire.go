package engine

import (
	"encoding/binary"
	"errors"

	"github.com/mochi-mqtt/server/v2/packets"
)

// Packet type bytes (first byte of the fixed header, flags included where
// they are fixed).
const (
	hdrPuback   = packets.Puback << 4
	hdrPubrec   = packets.Pubrec << 4
	hdrPubrel   = packets.Pubrel<<4 | 0x02
	hdrPubcomp  = packets.Pubcomp << 4
	hdrPingresp = packets.Pingresp << 4
)

func appendVarint(b []byte, n int) []byte {
	for {
		c := byte(n % 128)
		n /= 128
		if n > 0 {
			c |= 0x80
		}
		b = append(b, c)
		if n == 0 {
			return b
		}
	}
}

func varintLen(n int) int {
	switch {
	case n < 128:
		return 1
	case n < 16384:
		return 2
	case n < 2097152:
		return 3
	}
	return 4
}

func appendString(b []byte, s string) []byte {
	b = binary.BigEndian.AppendUint16(b, uint16(len(s)))
	return append(b, s...)
}

func appendBinary(b, v []byte) []byte {
	b = binary.BigEndian.AppendUint16(b, uint16(len(v)))
	return append(b, v...)
}

// delivery is how one message goes out to one connection.
type delivery struct {
	qos     byte
	retain  bool
	dup     bool
	id      uint16
	subIDs  []uint32
	alias   uint16 // topic alias to send; 0 = none
	noTopic bool   // the alias is known to the client: send an empty topic
	expiry  uint32 // remaining message expiry interval in seconds; 0 = none
}

// publishSize is the size of the PUBLISH packet appendPublish writes.
func publishSize(m *Message, version byte, d *delivery) (total, remaining, propLen int) {
	remaining = 2 + len(m.Payload)
	if !d.noTopic {
		remaining += len(m.Topic)
	}
	if d.qos > 0 {
		remaining += 2
	}
	if version == 5 {
		propLen = len(m.sharedProps())
		if d.expiry > 0 {
			propLen += 5
		}
		if d.alias > 0 {
			propLen += 3
		}
		for _, id := range d.subIDs {
			propLen += 1 + varintLen(int(id))
		}
		remaining += varintLen(propLen) + propLen
	}
	return 1 + varintLen(remaining) + remaining, remaining, propLen
}

// appendPublish encodes m as a PUBLISH for a client of the given protocol
// version.
func appendPublish(b []byte, m *Message, version byte, d *delivery) []byte {
	_, remaining, propLen := publishSize(m, version, d)
	h := byte(packets.Publish<<4) | d.qos<<1
	if d.dup {
		h |= 0x08
	}
	if d.retain {
		h |= 0x01
	}
	b = appendVarint(append(b, h), remaining)
	if d.noTopic {
		b = append(b, 0, 0)
	} else {
		b = appendString(b, m.Topic)
	}
	if d.qos > 0 {
		b = binary.BigEndian.AppendUint16(b, d.id)
	}
	if version == 5 {
		b = appendVarint(b, propLen)
		if d.expiry > 0 {
			b = binary.BigEndian.AppendUint32(append(b, packets.PropMessageExpiryInterval), d.expiry)
		}
		if d.alias > 0 {
			b = binary.BigEndian.AppendUint16(append(b, packets.PropTopicAlias), d.alias)
		}
		for _, id := range d.subIDs {
			b = appendVarint(append(b, packets.PropSubscriptionIdentifier), int(id))
		}
		b = append(b, m.sharedProps()...)
	}
	return append(b, m.Payload...)
}

// appendAck encodes PUBACK, PUBREC, PUBREL or PUBCOMP. A v5 ack with a
// reason other than success carries it (and a reason string if given).
func appendAck(b []byte, hdr byte, version byte, id uint16, reason byte, reasonString string) []byte {
	if version < 5 || (reason == 0 && reasonString == "") {
		b = append(b, hdr, 2)
		return binary.BigEndian.AppendUint16(b, id)
	}
	propLen := 0
	if reasonString != "" {
		propLen = 3 + len(reasonString)
	}
	b = appendVarint(append(b, hdr), 3+varintLen(propLen)+propLen)
	b = append(binary.BigEndian.AppendUint16(b, id), reason)
	b = appendVarint(b, propLen)
	if reasonString != "" {
		b = appendString(append(b, packets.PropReasonString), reasonString)
	}
	return b
}

// errDupProperty is a v5 property present twice where the spec allows one.
var errDupProperty = errors.New("property included more than once")

// errZeroProperty is a property whose value may not be 0.
var errZeroProperty = errors.New("receive maximum or maximum packet size of 0")

// errBadProperties is a properties section that does not parse.
var errBadProperties = errors.New("malformed properties")

// checkProperties walks a v5 properties section (length varint first)
// and reports a property that occurs twice, which mochi's decoder lets
// through (MQTT-2.2.2-2: a protocol error), or a section that does not
// parse. It returns the section's total size.
func checkProperties(b []byte) (int, error) {
	n, used, ok := readVarint(b)
	if !ok || used+n > len(b) {
		return 0, errBadProperties
	}
	p := b[used : used+n]
	var seen [64]bool
	for len(p) > 0 {
		id := p[0]
		p = p[1:]
		if id >= 64 {
			return 0, errBadProperties
		}
		var size int
		switch id {
		case 1, 23, 25, 36, 37, 40, 41, 42:
			size = 1
		case 19, 33, 34, 35:
			size = 2
		case 2, 17, 24, 39:
			size = 4
		case 11:
			_, u, ok := readVarint(p)
			if !ok {
				return 0, errBadProperties
			}
			size = u
		case 3, 8, 9, 18, 21, 22, 26, 28, 31:
			if len(p) < 2 {
				return 0, errBadProperties
			}
			size = 2 + int(binary.BigEndian.Uint16(p))
		case 38:
			if len(p) < 2 {
				return 0, errBadProperties
			}
			k := 2 + int(binary.BigEndian.Uint16(p))
			if len(p) < k+2 {
				return 0, errBadProperties
			}
			size = k + 2 + int(binary.BigEndian.Uint16(p[k:]))
		default:
			return 0, errBadProperties
		}
		if size > len(p) {
			return 0, errBadProperties
		}
		// Receive Maximum and Maximum Packet Size of 0 are protocol errors
		// (MQTT-3.1.2-21 and 3.1.2-24).
		if (id == packets.PropReceiveMaximum && binary.BigEndian.Uint16(p) == 0) ||
			(id == packets.PropMaximumPacketSize && binary.BigEndian.Uint32(p) == 0) {
			return 0, errZeroProperty
		}
		p = p[size:]
		if id != packets.PropUser && id != packets.PropSubscriptionIdentifier {
			if seen[id] {
				return 0, errDupProperty
			}
			seen[id] = true
		}
	}
	return used + n, nil
}

// readVarint reads an MQTT variable byte integer.
func readVarint(b []byte) (n, used int, ok bool) {
	mul := 1
	for i := 0; i < 4 && i < len(b); i++ {
		n += int(b[i]&0x7f) * mul
		if b[i]&0x80 == 0 {
			return n, i + 1, true
		}
		mul *= 128
	}
	return 0, 0, false
}

// propertiesOffset is where the first v5 properties section of a packet
// body starts, or -1 if the packet has none.
func propertiesOffset(typ byte, qos byte, body []byte) int {
	switch typ {
	case packets.Connect:
		if len(body) < 2 {
			return -1
		}
		return 2 + int(binary.BigEndian.Uint16(body)) + 4
	case packets.Publish:
		if len(body) < 2 {
			return -1
		}
		off := 2 + int(binary.BigEndian.Uint16(body))
		if qos > 0 {
			off += 2
		}
		return off
	case packets.Subscribe, packets.Unsubscribe:
		return 2
	case packets.Puback, packets.Pubrec, packets.Pubrel, packets.Pubcomp:
		if len(body) > 3 {
			return 3
		}
	case packets.Disconnect, packets.Auth:
		if len(body) > 1 {
			return 1
		}
	}
	return -1
}

// checkDuplicateProps checks the properties of a v5 packet body (and a
// CONNECT's will properties) for duplicates.
func checkDuplicateProps(typ, qos byte, body []byte) error {
	off := propertiesOffset(typ, qos, body)
	if off < 0 || off > len(body) {
		return nil // mochi's decoder reports what is missing
	}
	n, err := checkProperties(body[off:])
	if err != nil || typ != packets.Connect || len(body) < 10 {
		return err
	}
	flags := body[off-3]
	if flags&0x04 == 0 {
		return nil
	}
	rest := body[off+n:]
	if len(rest) < 2 {
		return nil
	}
	idLen := 2 + int(binary.BigEndian.Uint16(rest))
	if idLen > len(rest) {
		return nil
	}
	_, err = checkProperties(rest[idLen:])
	return err
}
