package engine

import (
	"sync"
	"time"

	"github.com/beaconmq/beacon/storage"
)

// session is the state of a client id that outlives a connection:
// subscriptions (in the server's index, by client id), outbound QoS 1/2
// flows and their queue, inbound QoS 2 flows and a will waiting for its
// delay.
//
// Packet ids: outbound flows use ids the server assigns (out); inbound QoS
// 2 flows use the ids the client assigned (inQoS2). The two spaces are
// separate, as MQTT numbers each direction on its own.
//
// With persistence, a persistent session's queue entries are log
// references written with the message; the id of a QoS 2 message and its
// PUBREL state are written before the packet that depends on them goes
// out, so a restart resends the same flow, never a second one.
type session struct {
	id  string
	srv *Server

	mu          sync.Mutex
	conn        *conn // attached connection, or nil while offline
	principal   Principal
	version     byte
	persistent  bool
	recorded    bool          // a session record is stored
	gen         uint64        // generation of the stored records
	expiry      time.Duration // how long the session outlives its connection
	expireAt    time.Time     // while offline and persistent
	expireTimer *time.Timer
	discarded   bool // replaced (clean start) or expired: deliveries are dropped

	expiring int // queued messages with an expiry (for the sweeper)

	recvMax uint16 // the client's Receive Maximum (outbound in flight)
	maxOut  uint32 // the client's Maximum Packet Size; 0 = none
	nextID  uint16
	out     []*flight           // outbound QoS 1/2 in flight, in the order sent
	byID    map[uint16]*flight  // out by packet id; nil while out is empty
	queue   []*flight           // outbound QoS 1/2 waiting for room, in order
	inQoS2  map[uint16]struct{} // client ids of inbound QoS 2 messages PUBREC'd, awaiting PUBREL

	moving    *Moving             // moving out to another node (MoveOut)
	seen      map[string]struct{} // moving in: the identities of the messages it got (seenLocked)
	seenUntil time.Time

	will      *Message    // a will waiting for its delay while offline
	willAt    time.Time   // when it goes (restored sessions)
	willTimer *time.Timer // publishes will
}

// flight is one outbound QoS 1/2 message of a session.
type flight struct {
	msg        *Message
	qos        byte
	retain     bool
	subIDs     []uint32
	id         uint16 // 0 while queued
	pubrel     bool   // PUBREC received, PUBREL sent: waiting for PUBCOMP
	sent       bool   // sent on some connection (a resend carries DUP)
	stored     bool   // a queue entry is stored for it
	idPending  bool   // its id is being written; the PUBLISH waits for that
	relPending bool   // its PUBREL state is being written; the PUBREL waits
	snapshot   bool   // a retained message sent for a new subscription
}

func newSession(srv *Server, id string) *session {
	return &session{id: id, srv: srv, inQoS2: map[uint16]struct{}{}}
}

func (s *session) isPersistent() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.persistent
}

// allocIDLocked returns a free outbound packet id. Callers hold mu and
// have checked that fewer than 65535 flows are in flight.
func (s *session) allocIDLocked() uint16 {
	for {
		s.nextID++
		if s.nextID == 0 {
			s.nextID = 1
		}
		if s.byID[s.nextID] == nil {
			return s.nextID
		}
	}
}

// addOutLocked puts a flight with its id in flight.
func (s *session) addOutLocked(f *flight) {
	s.out = append(s.out, f)
	if s.byID == nil {
		s.byID = make(map[uint16]*flight)
	}
	s.byID[f.id] = f
}

// removeOutLocked ends the flight at out[i]. Flights mostly end in the
// order they were sent: the first one leaves without moving the others.
func (s *session) removeOutLocked(i int) {
	f := s.out[i]
	if s.byID[f.id] == f {
		delete(s.byID, f.id)
	}
	if i == 0 {
		s.out[0] = nil
		s.out = s.out[1:]
	} else {
		copy(s.out[i:], s.out[i+1:])
		s.out[len(s.out)-1] = nil
		s.out = s.out[:len(s.out)-1]
	}
	if len(s.out) == 0 {
		s.out, s.byID = nil, nil // an idle session keeps neither
	}
}

// indexOutLocked is the position of f in out, or -1.
func (s *session) indexOutLocked(f *flight) int {
	for i, g := range s.out {
		if g == f {
			return i
		}
	}
	return -1
}

// deliver hands a planned delivery to the session. QoS 0 goes to the
// connection if it is attached and has room (else it is dropped and
// counted); QoS 1/2 are queued and sent as the Receive Maximum and the
// outbound budget allow.
func (s *session) deliver(m *Message, t *target) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.discarded || (t.stored && t.gen != s.gen) {
		if t.stored {
			// Replaced after the entry was planned: it belongs to no one.
			s.srv.store.unstore(s.id, t.gen, m.Seq)
		}
		return false
	}
	if t.qos == 0 {
		c := s.conn
		if c == nil {
			return false
		}
		var full *int
		if t.mayWait {
			full = &t.full
		}
		if c.sendQoS0(m, t.retain, t.ids, true, full) {
			return true
		}
		if t.full > 0 {
			t.fullConn = c
		}
		return false
	}
	if (!s.persistent && s.conn == nil) || s.seenLocked(m) {
		if t.stored {
			s.srv.store.unstore(s.id, t.gen, m.Seq)
		}
		return false
	}
	s.queue = append(s.queue, &flight{msg: m, qos: t.qos, retain: t.retain, subIDs: t.ids, stored: t.stored})
	if m.Expiry > 0 {
		s.expiring++
	}
	s.pumpLocked()
	return true
}

// deliverRetained queues a retained message for a new subscription (not
// stored: a restart does not resend what a subscription got at its start).
func (s *session) deliverRetained(m *Message, qos byte, ids []uint32) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.discarded {
		return
	}
	if qos == 0 {
		if s.conn != nil {
			s.conn.sendQoS0(m, true, ids, false, nil)
		}
		return
	}
	if len(s.out)+len(s.queue) >= s.srv.lim.MaxQueued {
		s.srv.dropped(DropQueueLimit, s.id, m)
		return
	}
	s.queue = append(s.queue, &flight{msg: m, qos: qos, retain: true, subIDs: ids, snapshot: true})
	if m.Expiry > 0 {
		s.expiring++
	}
	s.pumpLocked()
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
		drop := DropReason("")
		d := delivery{qos: f.qos, retain: f.retain, subIDs: f.subIDs, expiry: remainingExpiry(f.msg, now)}
		size, _, _ := publishSize(f.msg, c.version, &d)
		switch {
		case f.msg.expired(now):
			drop = DropExpired
		case s.maxOut > 0 && uint32(size) > s.maxOut:
			drop = DropTooLarge
		}
		if drop != "" {
			if f.msg.Expiry > 0 {
				s.expiring--
			}
			s.queue[0] = nil
			s.queue = s.queue[1:]
			s.srv.dropped(drop, s.id, f.msg)
			if f.stored {
				s.srv.store.unstore(s.id, s.gen, f.msg.Seq)
			}
			continue
		}
		if !c.hasRoom(size) {
			return // flush pumps again once the socket drains
		}
		f.id = s.allocIDLocked()
		if f.msg.Expiry > 0 {
			s.expiring--
		}
		s.queue[0] = nil
		s.queue = s.queue[1:]
		s.addOutLocked(f)
		if f.stored && f.qos == 2 {
			// The id must be durable before the PUBLISH: a restart then
			// resends this flow with the same id, which the client knows.
			f.idPending = true
			s.srv.store.async(func(error) { s.sendPending(f) }, queueOp(s.id, s.gen, f))
			continue
		}
		s.sendLocked(c, f, false)
	}
	if len(s.queue) == 0 {
		s.queue = nil // let a long drained queue's array go
	}
}

// sendLocked queues the PUBLISH of a flight in flight.
func (s *session) sendLocked(c *conn, f *flight, dup bool) {
	d := delivery{qos: f.qos, retain: f.retain, subIDs: f.subIDs, dup: dup, id: f.id, expiry: s.srv.remainingExpiry(f.msg)}
	if c.queue(func(b []byte) []byte { return c.encodePublish(b, f.msg, &d) }) {
		if so := s.srv.sentObs; so != nil {
			so.Sent(f.msg, f.qos, !f.sent && !f.snapshot)
		}
		f.sent = true
		s.srv.stats.sent.Add(1)
		c.traffic.msgsOut.Add(1)
	}
}

// sendPending sends a flight whose id has been written.
func (s *session) sendPending(f *flight) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !f.idPending {
		return
	}
	f.idPending = false
	if c := s.conn; c != nil && s.holdsLocked(f) {
		s.sendLocked(c, f, f.sent)
	}
}

// sendPubrel sends the PUBREL of a flight whose PUBREL state has been
// written.
func (s *session) sendPubrel(f *flight) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !f.relPending {
		return
	}
	f.relPending = false
	if c := s.conn; c != nil && s.holdsLocked(f) {
		id := f.id
		c.queue(func(b []byte) []byte { return appendAck(b, hdrPubrel, c.version, id, 0, "") })
	}
}

func (s *session) holdsLocked(f *flight) bool { return f.id != 0 && s.byID[f.id] == f }

// resendLocked sends the flows in flight again on a new connection, in
// their order: PUBLISH with DUP, or PUBREL for those PUBREC'd (MQTT-4.4.0-1).
// QoS 1 flows beyond the new Receive Maximum go back to the head of the
// queue; QoS 2 flows keep their ids (the client may hold them).
func (s *session) resendLocked(c *conn) {
	var keep, back []*flight
	for _, f := range s.out {
		switch {
		case f.pubrel:
			if !f.relPending {
				id := f.id
				c.queue(func(b []byte) []byte { return appendAck(b, hdrPubrel, c.version, id, 0, "") })
			}
			keep = append(keep, f)
		case f.qos == 1 && len(keep) >= int(s.recvMax):
			delete(s.byID, f.id)
			f.id = 0
			back = append(back, f)
			if f.msg.Expiry > 0 {
				s.expiring++
			}
		default:
			if !f.idPending {
				s.sendLocked(c, f, f.sent)
			}
			keep = append(keep, f)
		}
	}
	s.out = keep
	if len(keep) == 0 {
		s.byID = nil
	}
	if len(back) > 0 {
		s.queue = append(back, s.queue...)
	}
}

// ack completes an outbound QoS 1 flow (PUBACK) or QoS 2 flow (PUBCOMP),
// or ends a QoS 2 flow the client refused (PUBREC with a failure code).
// It reports whether the id was in flight in that state.
func (s *session) ack(c *conn, typ byte, id uint16, refused bool) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	f := s.byID[id]
	if f == nil || f.idPending {
		return false
	}
	done := typ == pubackType && f.qos == 1 ||
		typ == pubcompType && f.qos == 2 && f.pubrel ||
		typ == pubrecType && f.qos == 2 && !f.pubrel && refused
	if !done {
		return false
	}
	s.removeOutLocked(s.indexOutLocked(f))
	if f.stored {
		s.srv.store.unstore(s.id, s.gen, f.msg.Seq)
	}
	if s.conn == c {
		s.pumpLocked()
	}
	return true
}

// released moves an outbound QoS 2 flow to the PUBREL state (the
// client's PUBREC) and sends the PUBREL, after the state is written if the
// flow is stored. It reports whether the id was in flight awaiting PUBREC
// (a repeated PUBREC is answered again).
func (s *session) released(c *conn, id uint16) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	f := s.byID[id]
	if f == nil || f.qos != 2 || f.idPending {
		return false
	}
	if f.pubrel {
		if !f.relPending {
			c.queue(func(b []byte) []byte { return appendAck(b, hdrPubrel, c.version, id, 0, "") })
		}
		return true
	}
	f.pubrel = true
	if f.stored {
		f.relPending = true
		s.srv.store.async(func(error) { s.sendPubrel(f) }, queueOp(s.id, s.gen, f))
		return true
	}
	c.queue(func(b []byte) []byte { return appendAck(b, hdrPubrel, c.version, id, 0, "") })
	return true
}

// unstore removes a delivered or dropped queue entry and its reference.
func (st *store) unstore(client string, gen, seq uint64) {
	st.async(nil, storage.Delete(storage.QueueKey(client, gen, seq)))
	st.log.Unref(seq) // after the delete is queued: a trim of the record commits after it
}

// dropStoredLocked forgets the stored records of a session that ends or
// stops being persistent, and the log references of its queue. Callers
// hold s.srv.mu and s.mu, so the writes are ordered with the next
// session of the client id.
func (s *session) dropStoredLocked() {
	st := s.srv.store
	if st == nil {
		return
	}
	if s.recorded {
		st.async(nil, dropOps(s.id)...)
		s.recorded = false
	}
	for _, list := range [][]*flight{s.out, s.queue} {
		for _, f := range list {
			if f.stored {
				f.stored = false
				st.log.Unref(f.msg.Seq)
			}
		}
	}
}

// remainingExpiry is remainingExpiry now; a message without expiry
// (most) costs no clock read.
func (s *Server) remainingExpiry(m *Message) uint32 {
	if m.Expiry == 0 {
		return 0
	}
	return remainingExpiry(m, s.now().Unix())
}

// remainingExpiry is the Message Expiry Interval to send: what is left of
// the publisher's (MQTT-3.3.2-6), at least 1 second.
func remainingExpiry(m *Message, now int64) uint32 {
	if m.Expiry == 0 {
		return 0
	}
	return uint32(max(m.Expiry-now, 1))
}
