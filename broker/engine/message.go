package engine

import (
	"sync"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/beaconmq/beacon/storage"
)

// Message is one accepted message, shared (never copied) by every
// delivery. Treat it as immutable once routed.
type Message struct {
	Seq     uint64 // position in the message log (0 when not numbered)
	Topic   string
	Payload []byte
	QoS     byte
	Retain  bool
	Client  string // publishing client id; "" for the broker itself
	Device  string // registered device of the publisher (DeviceNamer), or ""
	Created int64  // unix nanoseconds accepted
	Expiry  int64  // unix seconds after which it is not delivered; 0 = never

	// MQTT 5 properties that travel with the message.
	PayloadFormat    byte
	PayloadFormatSet bool
	ContentType      string
	ResponseTopic    string
	CorrelationData  []byte
	User             []packets.UserProperty

	stored    bool      // written to the log (Release it after routing)
	volatile  bool      // never stored ($SYS)
	x         *msgExtra // what only some messages need (a cluster's, a retained one's)
	propsOnce sync.Once
	props     []byte // the shared v5 properties, encoded once
}

// msgExtra is the part of a message only some need, kept apart so every
// other message stays small.
type msgExtra struct {
	remote bool // came from another node: not routed to others again
	// fromNode are writes that go with the message from another node (its
	// place in that node's stream), route its way to other nodes.
	fromNode  []storage.Op
	route     Remote
	remoteRef bool   // the engine took a log reference for route
	scope     *Scope // from another node: which subscriptions here it reaches (nil: all)
	// A retained update's version (RetainVersion), decided in seq order
	// with its write; lost: a newer one was there, it changes nothing.
	retainVer  int64
	retainLost bool
	// origin is the message's identity from the node that accepted it
	// (Identity), for one that came from another node.
	origin string
}

func (m *Message) ext() *msgExtra {
	if m.x == nil {
		m.x = &msgExtra{}
	}
	return m.x
}

func (m *Message) isRemote() bool { return m.x != nil && m.x.remote }
func (m *Message) remoteRoute() Remote {
	if m.x == nil {
		return nil
	}
	return m.x.route
}

func (m *Message) scope() *Scope {
	if m.x == nil {
		return nil
	}
	return m.x.scope
}

func (m *Message) fromNode() []storage.Op {
	if m.x == nil {
		return nil
	}
	return m.x.fromNode
}

// retainVersion is the version a retained message holds its topic with.
func (m *Message) retainVersion() int64 {
	if m.x != nil && m.x.retainVer != 0 {
		return m.x.retainVer
	}
	return m.Created
}

// sharedProps is the encoded form of the properties every v5 delivery
// carries unchanged.
func (m *Message) sharedProps() []byte {
	if !m.PayloadFormatSet && m.ContentType == "" && m.ResponseTopic == "" && m.CorrelationData == nil && len(m.User) == 0 {
		return nil // the common message: nothing to encode, no Once to take
	}
	m.propsOnce.Do(func() {
		var b []byte
		if m.PayloadFormatSet {
			b = append(b, packets.PropPayloadFormat, m.PayloadFormat)
		}
		if m.ContentType != "" {
			b = appendString(append(b, packets.PropContentType), m.ContentType)
		}
		if m.ResponseTopic != "" {
			b = appendString(append(b, packets.PropResponseTopic), m.ResponseTopic)
		}
		if m.CorrelationData != nil {
			b = appendBinary(append(b, packets.PropCorrelationData), m.CorrelationData)
		}
		for _, u := range m.User {
			b = appendString(appendString(append(b, packets.PropUser), u.Key), u.Val)
		}
		m.props = b
	})
	return m.props
}

// expired reports whether the message may no longer be delivered at unix
// second now.
func (m *Message) expired(now int64) bool { return m.Expiry > 0 && now >= m.Expiry }

// fromPacket builds a message from a decoded PUBLISH (or a will) whose
// buffers the message may keep: the caller hands over ownership.
func fromPacket(pk *packets.Packet, topic string, client string, created int64) *Message {
	p := &pk.Properties
	m := &Message{
		Topic:            topic,
		Payload:          pk.Payload,
		QoS:              pk.FixedHeader.Qos,
		Retain:           pk.FixedHeader.Retain,
		Client:           client,
		Created:          created,
		PayloadFormat:    p.PayloadFormat,
		PayloadFormatSet: p.PayloadFormatFlag,
		ContentType:      p.ContentType,
		ResponseTopic:    p.ResponseTopic,
		CorrelationData:  p.CorrelationData,
		User:             p.User,
	}
	return m
}

// clone copies m's fields into a new message (its encoded properties are
// made again).
func (m *Message) clone() *Message {
	return &Message{Seq: m.Seq, Topic: m.Topic, Payload: m.Payload, QoS: m.QoS, Retain: m.Retain, Client: m.Client, Device: m.Device,
		Created: m.Created, Expiry: m.Expiry, PayloadFormat: m.PayloadFormat, PayloadFormatSet: m.PayloadFormatSet,
		ContentType: m.ContentType, ResponseTopic: m.ResponseTopic, CorrelationData: m.CorrelationData, User: m.User}
}
