package engine

import (
	"time"

	"sync"
)

// session is the state of a client id that outlives a connection:
// subscriptions (in the server's index, by client id), outbound QoS 1/2
// flows and their queue, inbound QoS 2 flows and the will.
//
// Packet ids: outbound flows use ids the server assigns (out); inbound QoS
// 2 flows use the ids the client assigned (inQoS2). The two spaces are
// separate, as MQTT numbers each direction on its own.
type session struct {
	id  string
	srv *Server

	mu          sync.Mutex
	conn        *conn // attached connection, or nil while offline
	principal   Principal
	version     byte
	persistent  bool
	expiry      time.Duration // after the connection ends; -1 = never
	expireAt    time.Time     // while offline and persistent
	discarded   bool          // replaced (clean start) or expired: deliveries are dropped
	expireTimer *time.Timer

	recvMax uint16 // the client's Receive Maximum (outbound in flight)
	maxOut  uint32 // the client's Maximum Packet Size; 0 = none
	nextID  uint16
	out     []*flight           // outbound QoS 1/2 in flight, in the order sent
	queue   []*flight           // outbound QoS 1/2 waiting for room, in order
	inQoS2  map[uint16]struct{} // client ids of inbound QoS 2 messages PUBREC'd, awaiting PUBREL

	will      *Message    // a will waiting for its delay while offline
	willTimer *time.Timer // publishes will
}

// flight is one outbound QoS 1/2 message of a session.
type flight struct {
	msg    *Message
	qos    byte
	retain bool
	subIDs []uint32
	id     uint16 // 0 while queued
	pubrel bool   // PUBREC received, PUBREL sent: waiting for PUBCOMP
	sent   bool   // sent on some connection (a resend carries DUP)
}

func newSession(srv *Server, id string) *session {
	return &session{id: id, srv: srv, inQoS2: map[uint16]struct{}{}}
}

// allocID returns a free outbound packet id. Callers hold mu and have
// checked that fewer than 65535 flows are in flight.
func (s *session) allocIDLocked() uint16 {
	for {
		s.nextID++
		if s.nextID == 0 {
			s.nextID = 1
		}
		if !s.inUseLocked(s.nextID) {
			return s.nextID
		}
	}
}

func (s *session) inUseLocked(id uint16) bool {
	for _, f := range s.out {
		if f.id == id {
			return true
		}
	}
	return false
}

// deliver hands a routed message to the session. QoS 0 goes to the
// connection if it is attached and has room (else it is dropped and
// counted); QoS 1/2 are queued and sent as the Receive Maximum and the
// outbound budget allow.
func (s *session) deliver(m *Message, qos byte, retain bool, subIDs []uint32) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.discarded {
		return false
	}
	if qos == 0 {
		c := s.conn
		if c == nil {
			return false
		}
		return c.sendQoS0(m, retain, subIDs)
	}
	if !s.persistent && s.conn == nil {
		return false
	}
	if len(s.out)+len(s.queue) >= s.srv.lim.MaxQueued {
		s.srv.dropped(DropQueueLimit, s.id, m)
		return false
	}
	s.queue = append(s.queue, &flight{msg: m, qos: qos, retain: retain, subIDs: subIDs})
	s.pumpLocked()
	return true
}

// pump sends queued messages while the window and the budget allow.
func (s *session) pump(c *conn) {
	s.mu.Lock()
	if s.conn == c {
		s.pumpLocked()
	}
	s.mu.Unlock()
}

func (s *session) pumpLocked() {
	c := s.conn
	if c == nil {
		return
	}
	now := s.srv.now().Unix()
	for len(s.queue) > 0 && len(s.out) < int(s.recvMax) {
		f := s.queue[0]
		if f.msg.expired(now) {
			s.queue[0] = nil
			s.queue = s.queue[1:]
			s.srv.dropped(DropExpired, s.id, f.msg)
			continue
		}
		d := delivery{qos: f.qos, retain: f.retain, subIDs: f.subIDs, expiry: remainingExpiry(f.msg, now)}
		size, _, _ := publishSize(f.msg, c.version, &d)
		if s.maxOut > 0 && uint32(size) > s.maxOut {
			s.queue[0] = nil
			s.queue = s.queue[1:]
			s.srv.dropped(DropTooLarge, s.id, f.msg)
			continue
		}
		if !c.hasRoom(size) {
			return // flush pumps again once the socket drains
		}
		f.id = s.allocIDLocked()
		d.id = f.id
		if !c.queue(func(b []byte) []byte { return appendPublish(b, f.msg, c.version, &d) }) {
			f.id = 0
			return
		}
		f.sent = true
		s.queue[0] = nil
		s.queue = s.queue[1:]
		s.out = append(s.out, f)
	}
	if len(s.queue) == 0 {
		s.queue = nil // let a long drained queue's array go
	}
}

// resendLocked sends the flows in flight again on a new connection, in
// their order: PUBLISH with DUP, or PUBREL for those PUBREC'd (MQTT-4.4.0-1).
// Flows beyond the new Receive Maximum go back to the head of the queue.
func (s *session) resendLocked(c *conn) {
	now := s.srv.now().Unix()
	var keep []*flight
	var back []*flight
	for _, f := range s.out {
		if f.pubrel {
			id := f.id
			c.queue(func(b []byte) []byte { return appendAck(b, hdrPubrel, c.version, id, 0, "") })
			keep = append(keep, f)
			continue
		}
		if len(keep) >= int(s.recvMax) {
			f.id = 0
			back = append(back, f)
			continue
		}
		d := delivery{qos: f.qos, retain: f.retain, subIDs: f.subIDs, dup: f.sent, id: f.id, expiry: remainingExpiry(f.msg, now)}
		c.queue(func(b []byte) []byte { return appendPublish(b, f.msg, c.version, &d) })
		keep = append(keep, f)
	}
	s.out = keep
	if len(back) > 0 {
		s.queue = append(back, s.queue...)
	}
}

// ack completes an outbound QoS 1 flow (PUBACK) or, for QoS 2, moves it to
// the PUBREL state (PUBREC) or completes it (PUBCOMP). It reports whether
// the id was in flight in that state.
func (s *session) ack(c *conn, typ byte, id uint16) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	for i, f := range s.out {
		if f.id != id {
			continue
		}
		switch {
		case typ == pubackType && f.qos == 1, typ == pubcompType && f.qos == 2 && f.pubrel:
			copy(s.out[i:], s.out[i+1:])
			s.out[len(s.out)-1] = nil
			s.out = s.out[:len(s.out)-1]
			if s.conn == c {
				s.pumpLocked()
			}
			return true
		case typ == pubrecType && f.qos == 2:
			f.pubrel = true
			return true
		}
		return false
	}
	return false
}

// remainingExpiry is the Message Expiry Interval to send: what is left of
// the publisher's (MQTT-3.3.2-6), at least 1 second.
func remainingExpiry(m *Message, now int64) uint32 {
	if m.Expiry == 0 {
		return 0
	}
	return uint32(max(m.Expiry-now, 1))
}
