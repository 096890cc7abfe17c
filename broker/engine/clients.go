package engine

import (
	"cmp"
	"slices"
	"sync/atomic"
	"time"

	"github.com/beaconmq/beacon/broker/topics"
)

// traffic counts one connection's packets and bytes (the operator
// console's per-client numbers; the Stats counters are their sums).
type traffic struct {
	msgsIn, bytesIn, msgsOut, bytesOut atomic.Uint64
}

// ClientDetail describes a session and its connection, if any, for
// operators (the admin API's clients).
type ClientDetail struct {
	ID              string
	Username        string
	Device          string
	Connected       bool
	Remote          string // while connected
	Listener        string // tcp, tls, ws
	ProtocolVersion byte
	ConnectedAt     time.Time // while connected
	KeepAlive       time.Duration
	CleanStart      bool
	Persistent      bool
	SessionExpiry   time.Duration
	ExpiresAt       time.Time // offline persistent sessions
	Subscriptions   int
	Inflight        int // outbound QoS 1/2 sent, not yet acknowledged
	Queued          int // outbound QoS 1/2 waiting to be sent
	MessagesIn      uint64
	MessagesOut     uint64
	BytesIn         uint64
	BytesOut        uint64
}

// SubscriptionInfo is one subscription of a client.
type SubscriptionInfo = topics.Subscription

// Clients lists every session, connected or kept for a client that is
// away, ordered by client id.
func (s *Server) Clients() []ClientDetail {
	s.mu.RLock()
	list := make([]*session, 0, len(s.sessions))
	for _, ss := range s.sessions {
		list = append(list, ss)
	}
	s.mu.RUnlock()
	out := make([]ClientDetail, 0, len(list))
	for _, ss := range list {
		if d, ok := s.detail(ss); ok {
			out = append(out, d)
		}
	}
	slices.SortFunc(out, func(a, b ClientDetail) int { return cmp.Compare(a.ID, b.ID) })
	return out
}

// Client returns one client's session and its subscriptions.
func (s *Server) Client(id string) (ClientDetail, []SubscriptionInfo, bool) {
	ss := s.session(id)
	if ss == nil {
		return ClientDetail{}, nil, false
	}
	d, ok := s.detail(ss)
	if !ok {
		return ClientDetail{}, nil, false
	}
	return d, s.index.Subscriptions(id), true
}

// Subscriptions lists the subscriptions of every client (client "") or
// of one, ordered by client, filter and group.
func (s *Server) Subscriptions(client string) []SubscriptionInfo {
	if client != "" {
		return s.index.Subscriptions(client)
	}
	var out []SubscriptionInfo
	for _, d := range s.Clients() {
		out = append(out, s.index.Subscriptions(d.ID)...)
	}
	return out
}

func (s *Server) detail(ss *session) (ClientDetail, bool) {
	ss.mu.Lock()
	if ss.discarded {
		ss.mu.Unlock()
		return ClientDetail{}, false
	}
	d := ClientDetail{ID: ss.id, ProtocolVersion: ss.version, Persistent: ss.persistent, SessionExpiry: ss.expiry,
		Inflight: len(ss.out), Queued: len(ss.queue)}
	c := ss.conn
	if c == nil && ss.persistent {
		d.ExpiresAt = ss.expireAt
	}
	ss.mu.Unlock()
	if c != nil {
		d.Connected, d.Remote, d.Listener = true, c.remote, c.listener
		d.Username, d.Device, d.KeepAlive, d.CleanStart = c.username, c.device, c.keepalive, c.cleanStart
		d.ConnectedAt = c.connectedAt
		d.MessagesIn, d.BytesIn = c.traffic.msgsIn.Load(), c.traffic.bytesIn.Load()
		d.MessagesOut, d.BytesOut = c.traffic.msgsOut.Load(), c.traffic.bytesOut.Load()
	}
	d.Subscriptions = len(s.index.Subscriptions(ss.id))
	return d, true
}

// Kick closes a client's connection (v5: DISCONNECT 0x98 administrative
// action) and, with discard, ends its session: queued messages and
// subscriptions are dropped, in memory and in the store. It reports
// whether the client had a session.
func (s *Server) Kick(id string, discard bool) bool {
	ss := s.session(id)
	if ss == nil {
		return false
	}
	ss.mu.Lock()
	c := ss.conn
	ss.mu.Unlock()
	if c != nil {
		c.close(errAdmin, codeAdminAction, "disconnected by an administrator")
		select {
		case <-c.done:
		case <-time.After(5 * time.Second):
		}
	}
	if discard {
		s.discardSession(ss)
	}
	return true
}

// discardSession ends a session that no connection holds (a connection
// that took it over meanwhile keeps it).
func (s *Server) discardSession(ss *session) {
	s.mu.Lock()
	ss.mu.Lock()
	if ss.conn != nil || ss.discarded || s.sessions[ss.id] != ss {
		ss.mu.Unlock()
		s.mu.Unlock()
		return
	}
	ss.dropStoredLocked()
	ss.discardLocked()
	delete(s.sessions, ss.id)
	if ss.expireTimer != nil {
		ss.expireTimer.Stop()
		ss.expireTimer = nil
	}
	if ss.willTimer != nil {
		ss.willTimer.Stop()
	}
	ss.will, ss.willTimer = nil, nil
	ss.mu.Unlock()
	s.index.RemoveClient(ss.id)
	s.mu.Unlock()
}
