package engine

import (
	"fmt"

	"github.com/beaconmq/beacon/storage"
)

// Pending is a message from another node between BeginRemote and Finish.
type Pending struct {
	s *Server
	a *acceptance
}

// BeginRemote starts accepting a message another node forwarded: it is
// matched, planned and its write queued as any publish, with ops (its
// place in the forwarding stream) in the same write, and it is not
// routed to other nodes again; scope (nil: all) says which subscriptions
// here it reaches. Several may be begun before they are
// finished, in order: their writes share a group commit.
func (s *Server) BeginRemote(m *Message, ops []storage.Op, scope *Scope) *Pending {
	x := m.ext()
	x.remote, x.fromNode, x.scope = true, ops, scope
	if m.Created == 0 {
		m.Created = s.now().UnixNano()
	}
	return &Pending{s: s, a: s.beginAccept(m, nil)}
}

// FromNode reports whether m came from another node of a cluster (its
// webhook outbox records and its extensions ran there).
func (m *Message) FromNode() bool { return m.isRemote() }

// Finish waits for the write and delivers the message; it returns how
// many sessions took it.
func (p *Pending) Finish() (int, error) { return p.s.finishAccept(p.a) }

// EncodeMessage is m's stored form (the log's record), for sending to
// another node.
// A retained message carries its version (RetainVersion) as its time.
func EncodeMessage(m *Message) []byte {
	lm := logMessage(m)
	if m.Retain {
		lm.Time = m.retainVersion()
	}
	return storage.AppendRetained(nil, lm)
}

// RetainedVersionOf is the version a retained message was given when it
// was written (0 for one that is not retained).
func RetainedVersionOf(m *Message) int64 {
	if !m.Retain {
		return 0
	}
	return m.retainVersion()
}

// RetainVersion orders the retained updates of a topic in the whole
// cluster, as a string that sorts like them: the update's version (unix
// nanoseconds), then its publishing client.
func RetainVersion(ver int64, client string) string { return fmt.Sprintf("%020d|%s", ver, client) }

// EncodeLogMessage is the same for a message read back from the log.
func EncodeLogMessage(lm *storage.LogMessage) []byte { return storage.AppendRetained(nil, lm) }

// DecodeMessage reads what EncodeMessage wrote.
func DecodeMessage(b []byte) (*Message, error) {
	lm, err := storage.DecodeRetained(b)
	if err != nil {
		return nil, err
	}
	return fromLog(&lm)
}

// SetRetained makes m the retained message of its topic here (stored,
// and kept in memory) without routing it, unless the one held is newer
// (by version, see RetainVersion): for a node catching up with the
// cluster's retained messages. An empty payload clears the topic. It is
// decided and its write queued in order with the local updates
// (retainDecide), so memory and store agree.
func (s *Server) SetRetained(m *Message) error {
	s.retMu.Lock()
	cur := s.retPending[m.Topic]
	if cur == nil {
		cur = s.retainedHeldLocked(m.Topic)
	}
	if cur != nil && !retainNewer(m.Created, m.Client, cur.retainVersion(), cur.Client) {
		s.retMu.Unlock()
		return nil
	}
	x := m.ext()
	x.remote, x.retainVer = true, m.Created
	if s.retPending == nil {
		s.retPending = map[string]*Message{}
	}
	s.retPending[m.Topic] = m
	var wait func() error
	if st := s.store; st != nil {
		op := storage.Delete(storage.RetainKey(m.Topic))
		if len(m.Payload) > 0 {
			op = storage.Set(storage.RetainKey(m.Topic), storage.AppendRetained(nil, logMessage(m)))
		}
		wait = st.db.WriteStart(op) // queued under retMu: after what was decided before, before what is decided next
	}
	s.retMu.Unlock()
	if wait != nil {
		if err := wait(); err != nil {
			s.retainFailed(m)
			return err
		}
	}
	s.setRetained(m)
	return nil
}

func (s *Server) retainedMessage(topic string) (*Message, bool) {
	s.retMu.Lock()
	defer s.retMu.Unlock()
	return s.retained.Get(topic)
}
