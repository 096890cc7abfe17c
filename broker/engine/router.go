package engine

import (
	"errors"
	"sync"

	"github.com/beaconmq/beacon/broker/topics"
)

var matchesPool = sync.Pool{New: func() any { return new(topics.Matches) }}

// accept takes a message a client published (authorized already): the
// retained store is updated, the message routed.
func (s *Server) accept(m *Message) int {
	if m.Retain {
		s.retain(m)
	}
	return s.route(m)
}

// retain stores m as the retained message of its topic, or clears it if
// the payload is empty (MQTT-3.3.1-6, -7).
func (s *Server) retain(m *Message) {
	if len(m.Payload) == 0 {
		s.retained.Delete(m.Topic)
		return
	}
	s.retained.Set(m.Topic, m)
}

// route delivers m to every matching session the subscriber's principal
// lets read it, and returns how many sessions took it. It never waits for
// a subscriber.
func (s *Server) route(m *Message) int {
	ms := matchesPool.Get().(*topics.Matches)
	defer matchesPool.Put(ms)
	s.index.Match(m.Topic, m.Client, ms)
	n := 0
	for i := range ms.Direct {
		d := &ms.Direct[i]
		if s.deliverTo(d.Client, m, d.QoS, d.RetainAsPublished, d.IDs) {
			n++
		}
	}
	for i := range ms.Shared {
		g := &ms.Shared[i]
		sub, ok := g.Pick(s.sharedRR.Add(1), s.online)
		if !ok {
			continue
		}
		var ids []uint32
		if sub.ID > 0 {
			ids = []uint32{sub.ID}
		}
		if s.deliverTo(sub.Client, m, sub.QoS, sub.RetainAsPublished, ids) {
			n++
		}
	}
	if o := s.opts.Observer; o != nil {
		o.Routed(m, n)
	}
	return n
}

// online reports whether a client id has a connection attached.
func (s *Server) online(client string) bool {
	ss := s.session(client)
	if ss == nil {
		return false
	}
	ss.mu.Lock()
	defer ss.mu.Unlock()
	return ss.conn != nil
}

// deliverTo authorizes and hands one delivery to a client's session.
func (s *Server) deliverTo(client string, m *Message, subQoS byte, rap bool, ids []uint32) bool {
	ss := s.session(client)
	if ss == nil {
		return false
	}
	ss.mu.Lock()
	p := ss.principal
	v := ss.version
	ss.mu.Unlock()
	if p == nil || !p.Allow(ActRead, m.Topic) {
		s.dropped(DropDenied, client, m)
		return false
	}
	if m.expired(s.now().Unix()) {
		s.dropped(DropExpired, client, m)
		return false
	}
	retain := rap && m.Retain && v == 5
	if len(ids) > 0 {
		ids = append([]uint32(nil), ids...) // the match buffer is reused
	}
	return ss.deliver(m, min(m.QoS, subQoS), retain, ids)
}

// Publish routes a message from the broker itself (REST, presence, Home
// Assistant, $SYS): the caller has authorized it. Retained messages are
// stored.
func (s *Server) Publish(m *Message) int {
	if m.Created == 0 {
		m.Created = s.now().UnixNano()
	}
	return s.accept(m)
}

// publishWill routes a will as an ordinary publish from its client.
func (s *Server) publishWill(w *Message) {
	now := s.now()
	m := w.clone()
	m.Created = now.UnixNano()
	m.Expiry = 0
	if exp := s.messageExpiry(uint32(w.Expiry)); exp > 0 {
		m.Expiry = now.Add(exp).Unix()
	}
	s.accept(m)
}

// Retained calls fn for each retained message matching filter.
func (s *Server) Retained(filter string, fn func(m *Message) bool) {
	now := s.now().Unix()
	s.retained.Match(filter, func(_ string, m *Message) bool {
		if m.expired(now) {
			return true
		}
		return fn(m)
	})
}

// Disconnect closes the connections whose ClientInfo match (an admin
// kick, a revoked device): v5 clients get code (e.g. 0x98 administrative
// action, 0x87 not authorized). It returns how many were closed.
func (s *Server) Disconnect(match func(*ClientInfo) bool, code byte, reason string) int {
	s.mu.RLock()
	var hit []*conn
	for c := range s.conns {
		if c.sess != nil && match(c.info()) {
			hit = append(hit, c)
		}
	}
	s.mu.RUnlock()
	for _, c := range hit {
		c.close(errAdmin, code, reason)
	}
	return len(hit)
}

var errAdmin = errors.New("disconnected by the broker")
