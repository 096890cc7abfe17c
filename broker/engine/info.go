package engine

import (
	"errors"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
)

// SessionInfo describes a session, for operators and tests.
type SessionInfo struct {
	ID         string
	Connected  bool
	Remote     string // address of the attached connection
	Persistent bool
	Inflight   int // outbound QoS 1/2 messages sent and not yet acknowledged
	Queued     int // outbound QoS 1/2 messages waiting to be sent
	ExpiresAt  time.Time
}

// Session returns what the engine holds for a client id.
func (s *Server) Session(id string) (SessionInfo, bool) {
	ss := s.session(id)
	if ss == nil {
		return SessionInfo{}, false
	}
	ss.mu.Lock()
	defer ss.mu.Unlock()
	si := SessionInfo{ID: id, Connected: ss.conn != nil, Persistent: ss.persistent, Inflight: len(ss.out), Queued: len(ss.queue)}
	if ss.conn != nil {
		si.Remote = ss.conn.remote
	} else {
		si.ExpiresAt = ss.expireAt
	}
	return si, true
}

// SendObserver is an Observer that also hears of every PUBLISH queued to a
// connection (for delivery counters and latency): live is false for a
// resend and for a retained message sent to a new subscription. It is
// called on the hot path with the session's lock held: count, never block.
type SendObserver interface {
	Sent(m *Message, qos byte, live bool)
}

// NumberObserver is an Observer that also hears of the seqs the log gives
// messages that are not routed here (the queued messages of a session
// that moved in from another node: they were routed there), so a reader
// of the log in seq order (the history) does not wait for them.
type NumberObserver interface {
	Unrouted(seq uint64)
}

// sweepExpired drops queued messages whose expiry passed from the
// sessions that hold any, every interval, so an offline session does not
// keep them (in memory and in the store) until its client returns.
func (s *Server) sweepExpired(every time.Duration, done <-chan struct{}) {
	defer s.wg.Done()
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-done:
			return
		case <-t.C:
		}
		now := s.now().Unix()
		s.mu.RLock()
		list := make([]*session, 0, len(s.sessions))
		for _, ss := range s.sessions {
			list = append(list, ss)
		}
		s.mu.RUnlock()
		for _, ss := range list {
			ss.mu.Lock()
			if ss.expiring > 0 {
				ss.dropExpiredLocked(now)
			}
			ss.mu.Unlock()
		}
	}
}

// dropExpiredLocked removes expired messages from the queue (not those in
// flight: their flow must finish).
func (s *session) dropExpiredLocked(now int64) {
	kept := s.queue[:0]
	for _, f := range s.queue {
		if f.msg.expired(now) {
			s.srv.dropped(DropExpired, s.id, f.msg)
			if f.stored {
				s.srv.store.unstore(s.id, s.gen, f.msg.Seq)
			}
			s.expiring--
			continue
		}
		kept = append(kept, f)
	}
	clear(s.queue[len(kept):])
	s.queue = kept
}

// DisconnectReason names why a connection ended, for metrics: client (a
// DISCONNECT), network, keepalive, protocol_error, taken_over,
// slow_consumer, or server (shutdown, an admin kick, expired credentials).
func DisconnectReason(err error) string {
	var pe *protoError
	switch {
	case err == nil, errors.Is(err, errDisconnect):
		return "client"
	case errors.Is(err, errKeepAlive):
		return "keepalive"
	case errors.Is(err, errTakenOver):
		return "taken_over"
	case errors.Is(err, errSlowConsumer):
		return "slow_consumer"
	case errors.Is(err, errShutdown), errors.Is(err, errAdmin), errors.Is(err, errExpired):
		return "server"
	case errors.As(err, &pe):
		return "protocol_error"
	}
	return "network"
}

// SubscriptionObserver is an Observer that also hears of every SUBSCRIBE
// and UNSUBSCRIBE once it is decided, before the acknowledgement is sent:
// the filters as the client sent them and the reason code for each
// (SUBSCRIBE: the granted QoS or a refusal; UNSUBSCRIBE: 0, 0x11 no
// subscription, or a refusal). The slices are valid only during the call.
type SubscriptionObserver interface {
	Subscribed(c *ClientInfo, filters []string, codes []byte)
	Unsubscribed(c *ClientInfo, filters []string, codes []byte)
}

// observeSubs tells the SubscriptionObserver, if there is one.
func (c *conn) observeSubs(pk *packets.Packet, codes []byte, unsubscribe bool) {
	o := c.srv.subObs
	if o == nil {
		return
	}
	filters := make([]string, len(pk.Filters))
	for i, f := range pk.Filters {
		filters[i] = f.Filter
	}
	if unsubscribe {
		o.Unsubscribed(c.info(), filters, codes)
		return
	}
	o.Subscribed(c.info(), filters, codes)
}
