package storage

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"

	"github.com/mochi-mqtt/server/v2/packets"
)

// Key namespaces. Client ids and topics cannot contain U+0000 (MQTT
// strings forbid it), so 0x00 separates the parts of a key.
const (
	nsClient       = "c\x00"
	nsSubscription = "s\x00"
	nsInflight     = "i\x00"
	nsRetained     = "r\x00"
	nsIngress      = "g\x00"
)

// ClientKey is the key of a session record.
func ClientKey(id string) []byte { return append([]byte(nsClient), id...) }

// ClientPrefix covers every session record.
func ClientPrefix() []byte { return []byte(nsClient) }

// SubscriptionKey is the key of one subscription of a session.
func SubscriptionKey(client, filter string) []byte {
	k := make([]byte, 0, len(nsSubscription)+len(client)+1+len(filter))
	k = append(k, nsSubscription...)
	k = append(k, client...)
	k = append(k, 0)
	return append(k, filter...)
}

// SubscriptionPrefix covers the subscriptions of one session, or of all
// sessions when client is "".
func SubscriptionPrefix(client string) []byte {
	if client == "" {
		return []byte(nsSubscription)
	}
	return append(append([]byte(nsSubscription), client...), 0)
}

// InflightKey is the key of one inflight or queued packet of a session.
func InflightKey(client string, packetID uint16) []byte {
	k := make([]byte, 0, len(nsInflight)+len(client)+3)
	k = append(k, nsInflight...)
	k = append(k, client...)
	k = append(k, 0)
	return binary.BigEndian.AppendUint16(k, packetID)
}

// InflightPrefix covers the inflight packets of one session, or of all
// sessions when client is "".
func InflightPrefix(client string) []byte {
	if client == "" {
		return []byte(nsInflight)
	}
	return append(append([]byte(nsInflight), client...), 0)
}

// SplitInflightKey returns the client id of an inflight key.
func SplitInflightKey(key []byte) (client string, ok bool) {
	if len(key) < len(nsInflight)+3 {
		return "", false
	}
	return string(key[len(nsInflight) : len(key)-3]), true
}

// RetainedKey is the key of the retained message of a topic.
func RetainedKey(topic string) []byte { return append([]byte(nsRetained), topic...) }

// RetainedPrefix covers every retained message.
func RetainedPrefix() []byte { return []byte(nsRetained) }

// IngressKey is the key of an accepted but not yet routed message.
func IngressKey(seq uint64) []byte {
	return binary.BigEndian.AppendUint64([]byte(nsIngress), seq)
}

// IngressPrefix covers the ingress log.
func IngressPrefix() []byte { return []byte(nsIngress) }

// ParseIngressKey returns the sequence of an ingress key.
func ParseIngressKey(key []byte) (uint64, bool) {
	if len(key) != len(nsIngress)+8 {
		return 0, false
	}
	return binary.BigEndian.Uint64(key[len(nsIngress):]), true
}

// Session is the stored form of a client session.
type Session struct {
	ID                string                 `json:"id"`
	Listener          string                 `json:"listener,omitempty"`
	Username          []byte                 `json:"username,omitempty"`
	ProtocolVersion   byte                   `json:"protocol_version"`
	Clean             bool                   `json:"clean,omitempty"`
	SessionExpiry     uint32                 `json:"session_expiry,omitempty"`
	SessionExpirySet  bool                   `json:"session_expiry_set,omitempty"`
	ReceiveMaximum    uint16                 `json:"receive_maximum,omitempty"`
	TopicAliasMaximum uint16                 `json:"topic_alias_maximum,omitempty"`
	MaximumPacketSize uint32                 `json:"maximum_packet_size,omitempty"`
	User              []packets.UserProperty `json:"user,omitempty"`
	Will              *Will                  `json:"will,omitempty"`
	Disconnected      int64                  `json:"disconnected,omitempty"` // unix seconds; 0 while connected
	Identity          json.RawMessage        `json:"identity,omitempty"`     // who the client authenticated as
}

// Will is the stored will of a session.
type Will struct {
	Topic   string                 `json:"topic"`
	Payload []byte                 `json:"payload,omitempty"`
	Qos     byte                   `json:"qos,omitempty"`
	Retain  bool                   `json:"retain,omitempty"`
	Delay   uint32                 `json:"delay,omitempty"`
	User    []packets.UserProperty `json:"user,omitempty"`
}

// Subscription is the stored form of one subscription.
type Subscription struct {
	Filter            string `json:"filter"`
	Qos               byte   `json:"qos"`
	NoLocal           bool   `json:"no_local,omitempty"`
	RetainAsPublished bool   `json:"retain_as_published,omitempty"`
	RetainHandling    byte   `json:"retain_handling,omitempty"`
	Identifier        int    `json:"identifier,omitempty"`
}

// MarshalJSONValue encodes a session or subscription record.
func MarshalJSONValue(v any) []byte {
	b, err := json.Marshal(v)
	if err != nil { // only plain structs are stored: cannot happen
		panic(fmt.Sprintf("storage: marshal %T: %v", v, err))
	}
	return b
}

// messageVersion is the first byte of every encoded message.
const messageVersion = 1

// property presence bits of an encoded message.
const (
	propPayloadFormat = 1 << iota
	propMessageExpiry
	propContentType
	propResponseTopic
	propCorrelation
	propUser
	propSubIDs
)

// ErrCorrupt is returned when a stored message cannot be decoded.
var ErrCorrupt = errors.New("storage: corrupt message record")

// AppendMessage appends the compact binary form of a PUBLISH, PUBREC or
// PUBREL packet (header, ids, times, topic, payload and the v5 message
// properties) to dst.
func AppendMessage(dst []byte, pk *packets.Packet) []byte {
	fh := pk.FixedHeader
	flags := fh.Qos & 3
	if fh.Retain {
		flags |= 1 << 2
	}
	if fh.Dup {
		flags |= 1 << 3
	}
	dst = append(dst, messageVersion, fh.Type, flags, pk.ProtocolVersion)
	dst = binary.BigEndian.AppendUint16(dst, pk.PacketID)
	dst = binary.AppendVarint(dst, pk.Created)
	dst = binary.AppendVarint(dst, pk.Expiry)
	dst = appendBytes(dst, []byte(pk.Origin))
	dst = appendBytes(dst, []byte(pk.TopicName))
	dst = appendBytes(dst, pk.Payload)

	p := &pk.Properties
	var bits byte
	if p.PayloadFormatFlag {
		bits |= propPayloadFormat
	}
	if p.MessageExpiryInterval > 0 {
		bits |= propMessageExpiry
	}
	if p.ContentType != "" {
		bits |= propContentType
	}
	if p.ResponseTopic != "" {
		bits |= propResponseTopic
	}
	if len(p.CorrelationData) > 0 {
		bits |= propCorrelation
	}
	if len(p.User) > 0 {
		bits |= propUser
	}
	if len(p.SubscriptionIdentifier) > 0 {
		bits |= propSubIDs
	}
	dst = append(dst, bits)
	if bits&propPayloadFormat != 0 {
		dst = append(dst, p.PayloadFormat)
	}
	if bits&propMessageExpiry != 0 {
		dst = binary.AppendUvarint(dst, uint64(p.MessageExpiryInterval))
	}
	if bits&propContentType != 0 {
		dst = appendBytes(dst, []byte(p.ContentType))
	}
	if bits&propResponseTopic != 0 {
		dst = appendBytes(dst, []byte(p.ResponseTopic))
	}
	if bits&propCorrelation != 0 {
		dst = appendBytes(dst, p.CorrelationData)
	}
	if bits&propUser != 0 {
		dst = binary.AppendUvarint(dst, uint64(len(p.User)))
		for _, u := range p.User {
			dst = appendBytes(dst, []byte(u.Key))
			dst = appendBytes(dst, []byte(u.Val))
		}
	}
	if bits&propSubIDs != 0 {
		dst = binary.AppendUvarint(dst, uint64(len(p.SubscriptionIdentifier)))
		for _, id := range p.SubscriptionIdentifier {
			dst = binary.AppendUvarint(dst, uint64(id))
		}
	}
	return dst
}

func appendBytes(dst, b []byte) []byte {
	dst = binary.AppendUvarint(dst, uint64(len(b)))
	return append(dst, b...)
}

// DecodeMessage decodes what AppendMessage wrote. The packet does not alias b.
func DecodeMessage(b []byte) (packets.Packet, error) {
	var pk packets.Packet
	r := reader{b: b}
	if v := r.byte(); v != messageVersion {
		return pk, fmt.Errorf("%w: version %d", ErrCorrupt, v)
	}
	pk.FixedHeader.Type = r.byte()
	flags := r.byte()
	pk.FixedHeader.Qos = flags & 3
	pk.FixedHeader.Retain = flags&(1<<2) != 0
	pk.FixedHeader.Dup = flags&(1<<3) != 0
	pk.ProtocolVersion = r.byte()
	pk.PacketID = r.uint16()
	pk.Created = r.varint()
	pk.Expiry = r.varint()
	pk.Origin = string(r.bytes())
	pk.TopicName = string(r.bytes())
	if payload := r.bytes(); len(payload) > 0 {
		pk.Payload = append([]byte(nil), payload...)
	}
	bits := r.byte()
	p := &pk.Properties
	if bits&propPayloadFormat != 0 {
		p.PayloadFormatFlag = true
		p.PayloadFormat = r.byte()
	}
	if bits&propMessageExpiry != 0 {
		p.MessageExpiryInterval = uint32(r.uvarint())
	}
	if bits&propContentType != 0 {
		p.ContentType = string(r.bytes())
	}
	if bits&propResponseTopic != 0 {
		p.ResponseTopic = string(r.bytes())
	}
	if bits&propCorrelation != 0 {
		p.CorrelationData = append([]byte(nil), r.bytes()...)
	}
	if bits&propUser != 0 {
		n := r.count()
		for i := 0; i < n && r.err == nil; i++ {
			k, v := string(r.bytes()), string(r.bytes())
			p.User = append(p.User, packets.UserProperty{Key: k, Val: v})
		}
	}
	if bits&propSubIDs != 0 {
		n := r.count()
		for i := 0; i < n && r.err == nil; i++ {
			p.SubscriptionIdentifier = append(p.SubscriptionIdentifier, int(r.uvarint()))
		}
	}
	if r.err != nil {
		return packets.Packet{}, r.err
	}
	if len(r.b) != 0 {
		return packets.Packet{}, fmt.Errorf("%w: %d trailing bytes", ErrCorrupt, len(r.b))
	}
	return pk, nil
}

// reader consumes b; after the first error every read returns zero values.
type reader struct {
	b   []byte
	err error
}

func (r *reader) fail() {
	if r.err == nil {
		r.err = fmt.Errorf("%w: truncated", ErrCorrupt)
	}
	r.b = nil
}

func (r *reader) byte() byte {
	if len(r.b) < 1 {
		r.fail()
		return 0
	}
	v := r.b[0]
	r.b = r.b[1:]
	return v
}

func (r *reader) uint16() uint16 {
	if len(r.b) < 2 {
		r.fail()
		return 0
	}
	v := binary.BigEndian.Uint16(r.b)
	r.b = r.b[2:]
	return v
}

func (r *reader) varint() int64 {
	v, n := binary.Varint(r.b)
	if n <= 0 {
		r.fail()
		return 0
	}
	r.b = r.b[n:]
	return v
}

func (r *reader) uvarint() uint64 {
	v, n := binary.Uvarint(r.b)
	if n <= 0 {
		r.fail()
		return 0
	}
	r.b = r.b[n:]
	return v
}

// count reads a length that must be satisfiable by the bytes left.
func (r *reader) count() int {
	n := r.uvarint()
	if n > uint64(len(r.b)) {
		r.fail()
		return 0
	}
	return int(n)
}

func (r *reader) bytes() []byte {
	n := r.count()
	v := r.b[:n]
	r.b = r.b[n:]
	return v
}
