package engine

import (
	"errors"
	"sync"
	"time"

	"github.com/beaconmq/beacon/broker/topics"
	"github.com/beaconmq/beacon/storage"
)

var matchesPool = sync.Pool{New: func() any { return new(topics.Matches) }}

// target is one planned delivery of a message.
type target struct {
	sess   *session
	gen    uint64
	qos    byte
	retain bool
	ids    []uint32
	stored bool // a queue entry is written with the message

	// A QoS 0 delivery that did not fit the connection's outbound budget
	// (mayWait): full is its size, fullConn the connection to wait for.
	mayWait  bool
	full     int
	fullConn *conn
}

var targetsPool = sync.Pool{New: func() any { s := make([]target, 0, 16); return &s }}

// inbound names the publisher's inbound QoS 2 flow a message belongs to,
// so its mark is written with the message.
type inbound struct {
	sess *session
	id   uint16
}

// accept makes a message durable as far as anyone keeps it, then routes
// it: match, authorize each delivery, write the message with the queue
// entries of the persistent sessions it goes to (and the retained update
// and the publisher's QoS 2 mark) in one atomic write, and only then
// hand it to the sessions. It returns how many sessions took it. A
// publisher waits for the write, and for a subscriber's socket only
// while it drains (awaitRoom, bounded).
func (s *Server) accept(m *Message, in *inbound) (int, error) {
	return s.finishAccept(s.beginAccept(m, in))
}

// acceptance is a message between beginAccept, which matched it, planned
// its deliveries and queued its write, and finishAccept, which waits for
// the write and delivers it. A publisher may begin several before it
// finishes them, in the same order: the writes share a group commit.
type acceptance struct {
	m    *Message
	ms   *topics.Matches // from matchesPool: the targets' ids point into it
	tp   *[]target       // from targetsPool
	wait func() error    // waits for the write (once); nil: none
	err  error           // the write could not be queued
}

func (s *Server) beginAccept(m *Message, in *inbound) *acceptance {
	a := &acceptance{m: m, ms: matchesPool.Get().(*topics.Matches), tp: targetsPool.Get().(*[]target)}
	s.index.Match(m.Topic, m.Client, a.ms)
	cl := s.opts.Cluster
	routed := cl != nil && !m.isRemote() && !m.volatile
	var gen uint64
	if routed {
		gen = cl.Enter()
		if rt := cl.Route(m, a.ms.Shared); rt != nil {
			m.ext().route = rt
		}
	}
	*a.tp = s.plan(m, a.ms, (*a.tp)[:0])
	a.wait, a.err = s.commit(m, *a.tp, in)
	if routed {
		cl.Leave(gen) // numbered (or failed)
	}
	return a
}

// finishAccept waits for a's write, then delivers its message. It returns
// how many sessions took it.
func (s *Server) finishAccept(a *acceptance) (int, error) {
	defer func() {
		matchesPool.Put(a.ms)
		clear(*a.tp)
		*a.tp = (*a.tp)[:0]
		targetsPool.Put(a.tp)
	}()
	m, ts := a.m, *a.tp
	err := a.err
	if err == nil && a.wait != nil {
		err = a.wait()
	}
	if err != nil {
		if m.Retain {
			s.retainFailed(m)
		}
		if st := s.store; st != nil && m.stored {
			// Appended but not durable: give back what commit took.
			for i := range ts {
				if ts[i].stored {
					st.log.Unref(m.Seq)
				}
			}
			if m.x != nil && m.x.remoteRef {
				st.log.Unref(m.Seq)
			}
			st.log.Release(m.Seq)
		}
		return 0, err
	}
	if m.Retain {
		s.setRetained(m)
	}
	n := 0
	stall := s.lim.PublisherStall > 0
	var stallUntil time.Time // one bound for the message, however many subscribers are behind
	for i := range ts {
		t := &ts[i]
		t.mayWait = stall && t.qos == 0
		if t.sess.deliver(m, t) {
			n++
			continue
		}
		if t.fullConn == nil {
			continue
		}
		// A subscriber's socket is behind: hold the publisher back while
		// it drains (bounded), rather than drop.
		c := t.fullConn
		t.mayWait, t.fullConn = false, nil
		if stallUntil.IsZero() {
			stallUntil = time.Now().Add(s.lim.PublisherStall)
		}
		if fits, waited := c.awaitRoom(t.full, stallUntil); waited {
			s.stats.stalls.Add(1)
			if !fits {
				s.stats.stallTimeouts.Add(1)
			}
		}
		if t.sess.deliver(m, t) {
			n++
		}
	}
	if s.store != nil && m.Seq != 0 && m.stored {
		s.store.log.Release(m.Seq)
	}
	if r := m.remoteRoute(); r != nil && !r.Durable() {
		r.Done(m, nil)
	}
	if o := s.opts.Observer; o != nil {
		o.Routed(m, n)
	}
	return n, nil
}

// setRetained applies a retained update once it is durable, unless it
// lost to a newer one when it was written (retainDecide) or a newer one
// was applied since: memory ends where the store does, also when two
// publishers (or two nodes) race on one topic.
func (s *Server) setRetained(m *Message) {
	s.retMu.Lock()
	defer s.retMu.Unlock()
	if s.retPending[m.Topic] == m {
		delete(s.retPending, m.Topic)
	}
	if m.x != nil && m.x.retainLost {
		return
	}
	if cur := s.retainedHeldLocked(m.Topic); cur != nil && retainNewer(cur.retainVersion(), cur.Client, m.retainVersion(), m.Client) {
		return
	}
	if len(m.Payload) == 0 {
		s.retained.Delete(m.Topic)
		s.tombstoneLocked(m)
		return
	}
	delete(s.retTomb, m.Topic)
	s.retained.Set(m.Topic, m)
}

// retainedHeldLocked is what a topic's retained state is: its message, or
// the clear that ended it (a tombstone, so an older update that arrives
// later from another node does not bring it back). Called with retMu.
func (s *Server) retainedHeldLocked(topic string) *Message {
	if cur, ok := s.retained.Get(topic); ok {
		return cur
	}
	return s.retTomb[topic]
}

// tombstoneTTL is how long a cleared topic's version is kept: longer than
// an update from another node may reasonably take to arrive.
const tombstoneTTL = 10 * time.Minute

// tombstoneLocked keeps the version of a clear. Called with retMu.
func (s *Server) tombstoneLocked(m *Message) {
	if s.retTomb == nil {
		s.retTomb = map[string]*Message{}
	}
	s.retTomb[m.Topic] = &Message{Topic: m.Topic, Client: m.Client, Created: m.retainVersion()}
	if len(s.retTomb) > 10000 && len(s.retTomb)%1000 == 0 {
		old := s.now().Add(-tombstoneTTL).UnixNano()
		for t, tm := range s.retTomb {
			if tm.Created < old {
				delete(s.retTomb, t)
			}
		}
	}
}

// retainNewer reports whether version a (of client ca) is after b (of cb).
func retainNewer(a int64, ca string, b int64, cb string) bool {
	return a > b || a == b && ca > cb
}

// retainDecide gives a retained update its version and its write, in
// seq order (under the log's append lock, with the message's write): a
// local one is newer than what the topic holds (its time, or just after
// the newest one's, should the clock have gone back); one from another
// node keeps the version it was given there and changes nothing if an
// equal or newer one is here. Every node so ends with the same message.
func (s *Server) retainDecide(m *Message) (storage.Op, bool) {
	s.retMu.Lock()
	defer s.retMu.Unlock()
	cur := s.retPending[m.Topic]
	if cur == nil {
		cur = s.retainedHeldLocked(m.Topic)
	}
	x := m.ext()
	ver := m.Created
	if cur != nil {
		cv := cur.retainVersion()
		switch {
		case x.remote && !retainNewer(ver, m.Client, cv, cur.Client):
			x.retainLost = true
			return storage.Op{}, false
		case !x.remote && ver <= cv:
			ver = cv + 1
		}
	}
	x.retainVer = ver
	if s.retPending == nil {
		s.retPending = map[string]*Message{}
	}
	s.retPending[m.Topic] = m
	if len(m.Payload) == 0 {
		return storage.Delete(storage.RetainKey(m.Topic)), true
	}
	lm := logMessage(m)
	lm.Time = ver
	return storage.Set(storage.RetainKey(m.Topic), storage.AppendRetained(nil, lm)), true
}

// retainFailed forgets a retained update whose write failed.
func (s *Server) retainFailed(m *Message) {
	s.retMu.Lock()
	if s.retPending[m.Topic] == m {
		delete(s.retPending, m.Topic)
	}
	s.retMu.Unlock()
}

// plan lists the deliveries of m: one per matching client (one member
// per shared group), each authorized for reading.
func (s *Server) plan(m *Message, ms *topics.Matches, ts []target) []target {
	now := s.now().Unix()
	if m.expired(now) {
		return ts
	}
	sc := m.scope()
	if sc == nil || !sc.NoDirect {
		for i := range ms.Direct {
			d := &ms.Direct[i]
			ts = s.planOne(ts, d.Client, m, d.QoS, d.RetainAsPublished, d.IDs)
		}
	}
	for i := range ms.Shared {
		g := &ms.Shared[i]
		if len(g.Members) == 0 {
			continue
		}
		if rt := m.remoteRoute(); rt != nil && rt.Takes(g.Group, g.Filter) {
			continue // another node's member gets it
		}
		if sc != nil && !sc.serves(g.Group, g.Filter) {
			continue // the sending node chose another node's member
		}
		// No member online: the one picked keeps it if its session does.
		sub, _ := g.Pick(s.sharedRR.Add(1), s.online)
		var ids []uint32
		if sub.ID > 0 {
			ids = []uint32{sub.ID}
		}
		ts = s.planOne(ts, sub.Client, m, sub.QoS, sub.RetainAsPublished, ids)
	}
	return ts
}

func (s *Server) planOne(ts []target, client string, m *Message, subQoS byte, rap bool, ids []uint32) []target {
	ss := s.session(client)
	if ss == nil {
		return ts
	}
	qos := min(m.QoS, subQoS)
	ss.mu.Lock()
	p, v, persistent, online, gen, discarded := ss.principal, ss.version, ss.persistent, ss.conn != nil, ss.gen, ss.discarded
	full := qos > 0 && len(ss.out)+len(ss.queue) >= s.lim.MaxQueued
	ss.mu.Unlock()
	switch {
	case discarded, !online && (qos == 0 || !persistent):
		return ts
	case p == nil || !p.Allow(ActRead, m.Topic):
		s.dropped(DropDenied, client, m)
		return ts
	case full:
		s.dropped(DropQueueLimit, client, m)
		return ts
	}
	if len(ids) > 0 {
		ids = append([]uint32(nil), ids...) // the match buffer is reused
	}
	return append(ts, target{sess: ss, gen: gen, qos: qos, retain: rap && m.Retain && v == 5, ids: ids,
		stored: s.store != nil && persistent && qos > 0})
}

// commit queues what must be durable before m is delivered and
// acknowledged, and numbers m in the log. It returns a function that
// waits (once) for the write, or nil if there is nothing to wait for.
func (s *Server) commit(m *Message, ts []target, in *inbound) (wait func() error, err error) {
	st := s.store
	if st == nil || m.volatile {
		return nil, nil // without a store a Remote is sent as it is (QoS 0 only)
	}
	var fixed []storage.Op
	cm := s.opts.Committer
	if m.isRemote() {
		cm = nil // the node that accepted it wrote its outbox records
	}
	if cm != nil {
		fixed = cm.Prepare(m)
	}
	rt := m.remoteRoute()
	durableRemote := rt != nil && rt.Durable()
	// failed reports a write that was never queued.
	failed := func(err error) {
		if cm != nil {
			cm.Committed(m, err)
		}
		if durableRemote {
			rt.Done(m, err)
		}
	}
	// done reports the outcome to the Committer (and the cluster) once it
	// is known.
	done := func(w func() error) func() error {
		if cm == nil && !durableRemote {
			return w
		}
		return func() error {
			var err error
			if w != nil {
				err = w()
			}
			if cm != nil {
				cm.Committed(m, err)
			}
			if durableRemote {
				rt.Done(m, err)
			}
			return err
		}
	}
	committerOps := len(fixed)
	keep := m.Retain || len(fixed) > 0 || durableRemote || st.log.Keeps(m.Topic)
	for i := range ts {
		keep = keep || ts[i].stored
	}
	// A message from another node carries its place in that node's
	// stream: written with it, it is taken once.
	fixed = append(fixed, m.fromNode()...)
	if in != nil && in.sess.isPersistent() {
		fixed = append(fixed, storage.Set(storage.InboundKey(in.sess.id, in.id), nil))
	}
	if err := s.room(m, keep, fixed); err != nil {
		failed(err)
		return nil, err
	}
	if !keep {
		// Numbered only: nothing of the message is encoded or written.
		m.Seq = st.log.Number(&storage.LogMessage{Time: m.Created})
		if len(fixed) > 0 {
			return done(st.db.WriteStart(fixed...)), nil
		}
		return done(nil), nil
	}
	extra := func(seq uint64) []storage.Op {
		ops := fixed
		if m.Retain {
			if op, ok := s.retainDecide(m); ok {
				ops = append(ops, op)
			}
		}
		if durableRemote {
			ops = append(ops, rt.Queued(m, seq)...)
		}
		for i := range ts {
			t := &ts[i]
			if t.stored {
				f := flight{msg: &Message{Seq: seq}, qos: t.qos, retain: t.retain, subIDs: t.ids}
				ops = append(ops, queueOp(t.sess.id, t.gen, &f))
			}
		}
		return ops
	}
	// A QoS 0 message is promised nothing: its record (for history) is
	// queued in order and the publisher goes on. What a session queues, a
	// webhook outbox or a QoS 2 mark waits for the write.
	durable := m.QoS > 0 || committerOps > 0 || durableRemote || len(m.fromNode()) > 0
	for i := range ts {
		durable = durable || ts[i].stored
	}
	var seq uint64
	if durable {
		seq, wait, err = st.log.AppendStart(logMessage(m), extra)
	} else {
		seq, err = st.log.AppendQueued(logMessage(m), extra)
	}
	if err != nil {
		failed(err)
		return nil, err
	}
	m.Seq, m.stored = seq, true
	for i := range ts {
		if ts[i].stored {
			st.log.Ref(seq)
		}
	}
	if durableRemote {
		st.log.Ref(seq) // the cluster's, until it forwarded the message
		m.x.remoteRef = true
	}
	return done(wait), nil
}

// roomer is the part of the database that knows its free space
// (storage.DB.Room).
type roomer interface{ Room(n int) error }

// room refuses a message that would add data while the volume is below
// its reserve (storage.ErrNoSpace); clearing a retained message, which
// frees more than it adds, passes.
func (s *Server) room(m *Message, keep bool, fixed []storage.Op) error {
	r, ok := s.store.db.(roomer)
	if !ok {
		return nil
	}
	n := 0
	if keep {
		n = len(m.Topic) + len(m.Payload) + 64
	}
	for _, op := range fixed {
		n += op.Size()
	}
	if n == 0 || (m.Retain && len(m.Payload) == 0) {
		return nil
	}
	if err := r.Room(n); err != nil {
		s.dropped(DropNoSpace, m.Client, m)
		return err
	}
	return nil
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

// Publish routes a message from the broker itself (REST, presence, Home
// Assistant, $SYS): the caller has authorized it. It returns how many
// sessions took it, once it is durable.
func (s *Server) Publish(m *Message) (int, error) {
	if m.Created == 0 {
		m.Created = s.now().UnixNano()
	}
	return s.accept(m, nil)
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
	if _, err := s.accept(m, nil); err != nil {
		s.log.Error("will not published: store failed", "client", w.Client, "error", err)
	}
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
