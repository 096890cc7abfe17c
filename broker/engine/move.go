package engine

import (
	"errors"
	"time"

	"github.com/beaconmq/beacon/storage"
)

// A persistent session moves between the nodes of a cluster when its
// client reconnects to another node (broker/cluster drives it):
//
//   - the old node's MoveOut closes the client's connection (0x8E) and
//     keeps the session offline here, subscribed and queuing, while its
//     State (subscriptions, inbound QoS 2 flows, every flight with its
//     packet id) travels to the new node;
//   - the new node's CONNECT makes the session from it (moveIn, durable),
//     then the cluster commits the move, and the old node drops what
//     the State carried (Moving.Commit);
//   - what the old node still queues for the session (messages that were
//     on their way to it) follows as a tail (Moving.Tail, MoveInFlights),
//     until the old node stops matching it (StopMatching) and ends it
//     (Finish).
//
// While the new node takes the tail, a message that reaches the session
// both directly and through the old node is delivered once: the session
// keeps the identities (Identity) of what it got until MoveInDone.

// Identity names a message in a whole cluster: the node that accepted
// it, the epoch of that node's log and its seq there (storage.Identity).
func Identity(node string, epoch, seq uint64) string { return storage.Identity(node, epoch, seq) }

// SetOrigin records the identity the node that accepted m gave it
// (Identity), for a message from another node (BeginRemote).
func (m *Message) SetOrigin(id string) { m.ext().origin = id }

// Origin is the identity another node gave m (SetOrigin), "" for a
// message accepted here.
func (m *Message) Origin() string { return m.origin() }

func (m *Message) origin() string {
	if m.x == nil {
		return ""
	}
	return m.x.origin
}

// identity is m's Identity in the cluster, or "" without one.
func (s *Server) identity(m *Message) string {
	if o := m.origin(); o != "" {
		return o
	}
	cl := s.opts.Cluster
	if cl == nil || s.store == nil || m.Seq == 0 {
		return ""
	}
	return Identity(cl.ID(), s.store.log.Epoch(), m.Seq)
}

// MovedSession is a persistent session on its way between nodes.
type MovedSession struct {
	Version byte                `json:"v"`
	Expiry  uint32              `json:"e"` // seconds it outlives its connection
	NextID  uint16              `json:"n"`
	InQoS2  []uint16            `json:"i,omitempty"` // the client's QoS 2 ids PUBREC'd, awaiting PUBREL
	Subs    []storage.SubRecord `json:"s,omitempty"`
	Flights []MovedFlight       `json:"f,omitempty"` // in flight, then queued, in order
}

// MovedFlight is one outbound QoS 1/2 message of a moving session.
type MovedFlight struct {
	Msg    []byte   `json:"m"`           // EncodeMessage's form
	Origin string   `json:"o,omitempty"` // its Identity
	QoS    byte     `json:"q"`
	Retain bool     `json:"r,omitempty"`
	SubIDs []uint32 `json:"u,omitempty"`
	ID     uint16   `json:"p,omitempty"` // its packet id, 0 while queued
	Pubrel bool     `json:"l,omitempty"` // PUBREC received, PUBREL sent
	Sent   bool     `json:"d,omitempty"` // sent before: a resend carries DUP
}

// seenLimit bounds the identities a session moving in keeps: past it, a
// message reaching it twice during the move may be delivered twice.
const seenLimit = 1 << 17

// seenFor is the longest a session keeps them (a move whose old node
// never finishes).
const seenFor = 10 * time.Minute

// seenAfter is how long it keeps them once the move ended.
const seenAfter = time.Minute

// Moving is a session moving out of this node.
type Moving struct {
	s        *Server
	sess     *session
	snapshot []*flight // what State carried, until Commit
	handed   map[*flight]bool
	held     bool // not moving out: a session moved in whose commit is undecided (HoldMove)
}

// Errors of moves.
var (
	ErrNoSession = errors.New("no persistent session here")
	ErrMoving    = errors.New("the session is moving already")
	// ErrUndecided is a commit whose outcome is not known yet (Redis did
	// not answer): the session made here waits for SettleMove.
	ErrUndecided = errors.New("the move's outcome is not known yet")
)

// MoveOut starts moving client's persistent session to another node:
// its connection is closed with 0x8E (session taken over), its will
// dropped (the session goes on), and until Commit or Cancel it stays here
// offline, subscribed, queuing, and not for a CONNECT here. Without a
// persistent session here it returns ErrNoSession, having closed the
// connection of a session that ends with it (taken over as well).
func (s *Server) MoveOut(client string) (*Moving, error) {
	s.mu.Lock()
	sess := s.sessions[client]
	if sess == nil {
		s.mu.Unlock()
		return nil, ErrNoSession
	}
	sess.mu.Lock()
	switch {
	case sess.moving != nil:
		sess.mu.Unlock()
		s.mu.Unlock()
		return nil, ErrMoving
	case !sess.persistent || sess.discarded:
		sess.mu.Unlock()
		s.mu.Unlock()
		s.DropSession(client)
		return nil, ErrNoSession
	}
	old := sess.conn
	sess.conn = nil
	if sess.expireTimer != nil {
		sess.expireTimer.Stop()
		sess.expireTimer = nil
	}
	if sess.willTimer != nil {
		sess.willTimer.Stop()
		sess.willTimer = nil
	}
	sess.will = nil
	mv := &Moving{s: s, sess: sess, handed: map[*flight]bool{}}
	sess.moving = mv
	mv.snapshot = append(append(make([]*flight, 0, len(sess.out)+len(sess.queue)), sess.out...), sess.queue...)
	sess.mu.Unlock()
	s.mu.Unlock()
	if old != nil {
		old.takeOver()
		// What its reader had read is handled before State (an inbound
		// QoS 2 id, a SUBSCRIBE): wait for it to stop, bounded.
		select {
		case <-old.done:
		case <-time.After(2 * time.Second):
		}
	}
	return mv, nil
}

// State is what the new node needs to resume the session.
func (mv *Moving) State() *MovedSession {
	s, sess := mv.s, mv.sess
	subs := s.index.Subscriptions(sess.id)
	sess.mu.Lock()
	defer sess.mu.Unlock()
	st := &MovedSession{Version: sess.version, Expiry: uint32(sess.expiry / time.Second), NextID: sess.nextID}
	for id := range sess.inQoS2 {
		st.InQoS2 = append(st.InQoS2, id)
	}
	for i := range subs {
		sub := &subs[i]
		st.Subs = append(st.Subs, storage.SubRecord{Filter: sub.Filter, Group: sub.Group, QoS: sub.QoS, NoLocal: sub.NoLocal,
			RetainAsPublished: sub.RetainAsPublished, RetainHandling: sub.RetainHandling, ID: sub.ID})
	}
	for _, f := range mv.snapshot {
		st.Flights = append(st.Flights, s.movedFlight(f))
	}
	return st
}

func (s *Server) movedFlight(f *flight) MovedFlight {
	mf := MovedFlight{Msg: storage.AppendRetained(nil, logMessage(f.msg)), QoS: f.qos, Retain: f.retain,
		SubIDs: f.subIDs, ID: f.id, Pubrel: f.pubrel, Sent: f.sent}
	if !f.snapshot { // a retained message sent for a new subscription is that subscription's alone
		mf.Origin = s.identity(f.msg)
	}
	return mf
}

// Commit: the new node holds the session. What State carried is dropped
// here; what was queued since is the tail.
func (mv *Moving) Commit() {
	mv.sess.mu.Lock()
	defer mv.sess.mu.Unlock()
	mv.commitLocked()
}

// commitLocked drops the snapshot's flights, in flight or queued (a tail
// taken in meanwhile may have added others: they stay).
func (mv *Moving) commitLocked() {
	sess := mv.sess
	in := make(map[*flight]bool, len(mv.snapshot))
	for _, f := range mv.snapshot {
		in[f] = true
	}
	mv.snapshot = nil
	for i := len(sess.out) - 1; i >= 0; i-- {
		if f := sess.out[i]; in[f] {
			sess.removeOutLocked(i)
			mv.forgetLocked(f)
		}
	}
	kept := sess.queue[:0]
	for _, f := range sess.queue {
		if in[f] {
			if f.msg.Expiry > 0 {
				sess.expiring--
			}
			mv.forgetLocked(f)
			continue
		}
		kept = append(kept, f)
	}
	clear(sess.queue[len(kept):])
	sess.queue = kept
}

func (mv *Moving) forgetLocked(f *flight) {
	if f.stored {
		f.stored = false
		mv.s.store.unstore(mv.sess.id, mv.sess.gen, f.msg.Seq)
	}
}

// Resume makes everything the session holds its tail: for a move whose
// state went before a restart, or a session whose client moved to
// another node while this one was down.
func (mv *Moving) Resume() {
	mv.sess.mu.Lock()
	mv.snapshot = nil
	mv.sess.mu.Unlock()
}

// OfflineSessions lists the client ids of the persistent sessions here
// without a connection (not those moving).
func (s *Server) OfflineSessions() []string {
	s.mu.RLock()
	defer s.mu.RUnlock()
	var ids []string
	for id, sess := range s.sessions {
		sess.mu.Lock()
		if sess.persistent && !sess.discarded && sess.moving == nil && sess.conn == nil {
			ids = append(ids, id)
		}
		sess.mu.Unlock()
	}
	return ids
}

// CommitKnown is Commit for a move whose state went before a restart:
// the flights whose identities the state carried (known) are dropped,
// the others (queued since) are the tail.
func (mv *Moving) CommitKnown(known map[string]bool) {
	sess := mv.sess
	sess.mu.Lock()
	defer sess.mu.Unlock()
	var snap []*flight
	for _, list := range [][]*flight{sess.out, sess.queue} {
		for _, f := range list {
			if o := mv.s.identity(f.msg); o != "" && known[o] {
				snap = append(snap, f)
			}
		}
	}
	mv.snapshot = snap
	mv.commitLocked()
}

// Cancel: the move did not happen; the session is an ordinary offline
// one here again.
func (mv *Moving) Cancel() {
	s, sess := mv.s, mv.sess
	sess.mu.Lock()
	defer sess.mu.Unlock()
	if sess.moving != mv || sess.discarded {
		return
	}
	sess.moving = nil
	mv.snapshot = nil
	sess.expireAt = s.now().Add(sess.expiry)
	sess.expireTimer = time.AfterFunc(sess.expiry, func() { s.expire(sess) })
}

// TailBatch is some of a moving session's tail, handed out to be sent.
type TailBatch struct {
	mv      *Moving
	fs      []*flight
	Flights []MovedFlight
}

// Tail hands out up to max queued flights not handed out before, in
// order; nil if there are none.
func (mv *Moving) Tail(max int) *TailBatch {
	sess := mv.sess
	sess.mu.Lock()
	defer sess.mu.Unlock()
	var b *TailBatch
	// In flight first (a resumed move: a restart put the flights with a
	// packet id there), then queued.
	for _, f := range append(append([]*flight(nil), sess.out...), sess.queue...) {
		if mv.handed[f] {
			continue
		}
		if b == nil {
			b = &TailBatch{mv: mv}
		}
		mv.handed[f] = true
		b.fs = append(b.fs, f)
		b.Flights = append(b.Flights, mv.s.movedFlight(f))
		if len(b.fs) == max {
			break
		}
	}
	return b
}

// Taken: the new node has them; they leave the session here.
func (b *TailBatch) Taken() {
	sess := b.mv.sess
	sess.mu.Lock()
	defer sess.mu.Unlock()
	gone := make(map[*flight]bool, len(b.fs))
	for _, f := range b.fs {
		gone[f] = true
		delete(b.mv.handed, f)
	}
	for i := len(sess.out) - 1; i >= 0; i-- {
		if f := sess.out[i]; gone[f] {
			sess.removeOutLocked(i)
			b.mv.forgetLocked(f)
		}
	}
	kept := sess.queue[:0]
	for _, f := range sess.queue {
		if gone[f] {
			if f.msg.Expiry > 0 {
				sess.expiring--
			}
			b.mv.forgetLocked(f)
			continue
		}
		kept = append(kept, f)
	}
	clear(sess.queue[len(kept):])
	sess.queue = kept
}

// Return gives them back unsent (the way to the new node failed): the
// next Tail hands them out again.
func (b *TailBatch) Return() {
	sess := b.mv.sess
	sess.mu.Lock()
	defer sess.mu.Unlock()
	for _, f := range b.fs {
		delete(b.mv.handed, f)
	}
}

// StopMatching removes the session's subscriptions here: once the other
// nodes route its messages to the new node, none need come here.
func (mv *Moving) StopMatching() {
	s, id := mv.s, mv.sess.id
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.sessions[id] != mv.sess || mv.sess.moving != mv {
		return // the client id has another session here now
	}
	s.index.RemoveClient(id)
	if s.store != nil {
		s.store.async(nil, storage.DeletePrefix(storage.SubPrefix(id)))
	}
}

// Finish ends the session here once its tail is taken; it reports
// whether it did.
func (mv *Moving) Finish() bool {
	s, sess := mv.s, mv.sess
	s.mu.Lock()
	defer s.mu.Unlock()
	sess.mu.Lock()
	defer sess.mu.Unlock()
	if len(sess.out)+len(sess.queue) > 0 {
		return false
	}
	if sess.moving == mv && !sess.discarded {
		s.endLocked(sess)
	}
	return true
}

// endLocked ends a session here: its records, queue and subscriptions
// go. Callers hold s.mu and sess.mu.
func (s *Server) endLocked(sess *session) {
	sess.dropStoredLocked()
	sess.discardLocked()
	if s.sessions[sess.id] == sess {
		delete(s.sessions, sess.id)
	}
	s.index.RemoveClient(sess.id)
}

// Client is the moving session's client id.
func (mv *Moving) Client() string { return mv.sess.id }

// Gen is the moving session's generation.
func (mv *Moving) Gen() uint64 { return mv.sess.gen }

// moveIn makes client's session here from what another node moved out,
// for the CONNECT that resumes it (with its principal). A persistent
// session the client id has here already (made while the cluster was
// out of reach) takes the moved one in: its subscriptions, QoS 2 flows
// and messages join, the moved messages first. Durable when it returns.
func (s *Server) moveIn(client string, st *MovedSession, p Principal) (merged bool, gen uint64, err error) {
	var fs []*flight
	seen := map[string]struct{}{}
	for i := range st.Flights {
		if f := s.movedIn(client, &st.Flights[i]); f != nil {
			if o := f.msg.origin(); o != "" {
				seen[o] = struct{}{}
			}
			fs = append(fs, f)
		}
	}

	s.mu.Lock()
	if s.closing {
		s.mu.Unlock()
		return false, 0, errShutdown
	}
	sess := s.sessions[client]
	if sess != nil {
		sess.mu.Lock()
		switch {
		case sess.moving != nil:
			sess.mu.Unlock()
			s.mu.Unlock()
			return false, 0, ErrMoving
		case !sess.persistent || sess.discarded:
			// Ends; its connection is taken over (the CONNECT's attach
			// would, but this session is no longer the client id's).
			oldConn := sess.conn
			sess.conn = nil
			s.endLocked(sess)
			sess.mu.Unlock()
			sess = nil
			if oldConn != nil {
				defer oldConn.takeOver()
			}
		default:
			// Its own messages may be among the moved ones (both nodes
			// had the session while the cluster was apart): once.
			known := map[string]bool{}
			for _, list := range [][]*flight{sess.out, sess.queue} {
				for _, f := range list {
					if o := s.identity(f.msg); o != "" {
						known[o] = true
					}
				}
			}
			kept := fs[:0]
			for _, f := range fs {
				o := f.msg.origin()
				if _, dup := sess.seen[o]; o != "" && (known[o] || dup) {
					continue
				}
				kept = append(kept, f)
			}
			fs = kept
			sess.mu.Unlock()
		}
	}
	merged = sess != nil
	if sess == nil {
		sess = newSession(s, client)
		sess.principal, sess.version, sess.persistent = p, st.Version, true
		sess.expiry = time.Duration(st.Expiry) * time.Second
		sess.recvMax, sess.nextID = 65535, st.NextID
		if s.store != nil {
			s.store.gen++
			sess.gen = s.store.gen
		}
	}
	sess.mu.Lock()
	if sess.seen == nil {
		sess.seen = seen
	} else {
		for o := range seen {
			sess.seen[o] = struct{}{}
		}
	}
	sess.seenUntil = s.now().Add(seenFor)
	var ops []storage.Op
	for _, id := range st.InQoS2 {
		sess.inQoS2[id] = struct{}{}
		if s.store != nil {
			ops = append(ops, storage.Set(storage.InboundKey(client, id), nil))
		}
	}
	if s.store != nil && !merged {
		sess.recorded = true
		ops = append(ops, s.store.sessionOp(sess, s.now().Unix(), nil, 0))
	}
	gen = sess.gen
	s.sessions[client] = sess
	sess.holdLocked() // until the commit is decided (release, SettleMove)
	have := map[[2]string]bool{}
	if merged {
		for _, sub := range s.index.Subscriptions(client) {
			have[[2]string{sub.Group, sub.Filter}] = true
		}
	}
	for _, r := range st.Subs {
		if !validStoredFilter(r) {
			continue
		}
		sub := subscriptionOf(client, r)
		if have[[2]string{sub.Group, sub.Filter}] {
			continue // the one made here is newer
		}
		s.index.Subscribe(sub)
		if s.store != nil {
			ops = append(ops, subOp(client, &sub))
		}
	}
	s.mu.Unlock()
	defer sess.mu.Unlock()
	// Deliveries to the session wait for its lock, so none goes before
	// the moved messages are in.
	if s.store != nil {
		if err := s.storeMoved(client, gen, fs, ops); err != nil {
			return merged, gen, err
		}
	}
	// The moved messages are older than what the session here holds.
	queue := sess.queue
	sess.queue = nil
	for _, f := range fs {
		sess.adoptLocked(f)
	}
	sess.queue = append(sess.queue, queue...)
	sess.pumpLocked()
	return merged, gen, nil
}

// HoldMove keeps a session moved in whose commit is undecided from
// CONNECTs (0x88) until SettleMove.
func (s *Server) HoldMove(client string, gen uint64) {
	if sess := s.session(client); sess != nil {
		sess.mu.Lock()
		if sess.gen == gen && sess.moving == nil && !sess.discarded {
			sess.holdLocked()
		}
		sess.mu.Unlock()
	}
}

// holdLocked holds the session: it neither expires nor takes a CONNECT
// nor moves out until release (which starts its expiry again).
func (s *session) holdLocked() {
	s.moving = &Moving{s: s.srv, sess: s, held: true}
	if s.expireTimer != nil {
		s.expireTimer.Stop()
		s.expireTimer = nil
	}
}

// SettleMove ends the wait of a session moved in (generation gen) once
// the move's outcome is known: kept if this node won it (or the session
// was here before, merged), else ended.
func (s *Server) SettleMove(client string, gen uint64, won, merged bool) {
	if won || merged {
		s.release(client, gen)
		return
	}
	s.mu.Lock()
	sess := s.sessions[client]
	if sess == nil {
		s.mu.Unlock()
		return
	}
	sess.mu.Lock()
	if sess.gen != gen || sess.discarded {
		sess.mu.Unlock()
		s.mu.Unlock()
		return
	}
	sess.moving = nil
	s.endLocked(sess)
	sess.mu.Unlock()
	s.mu.Unlock()
}

// release ends the hold of a session moved in (generation gen): an
// ordinary session here from now on, with its expiry clock running.
func (s *Server) release(client string, gen uint64) {
	sess := s.session(client)
	if sess == nil {
		return
	}
	sess.mu.Lock()
	defer sess.mu.Unlock()
	if sess.gen != gen || sess.discarded || sess.moving == nil || !sess.moving.held {
		return
	}
	sess.moving = nil
	if sess.conn == nil && sess.expireTimer == nil {
		sess.expireAt = s.now().Add(sess.expiry)
		sess.expireTimer = time.AfterFunc(sess.expiry, func() { s.expire(sess) })
	}
}

// SessionGen is the generation of client's session here (0: none): a tail
// taken for it goes to that session only (MoveInFlights).
func (s *Server) SessionGen(client string) uint64 {
	sess := s.session(client)
	if sess == nil {
		return 0
	}
	sess.mu.Lock()
	defer sess.mu.Unlock()
	if sess.discarded {
		return 0
	}
	return sess.gen
}

// unrefFlights gives back the log references of moved flights written
// before a write failed (they are not added to the session).
func unrefFlights(st *store, fs []*flight) {
	for _, f := range fs {
		if f.stored {
			f.stored = false
			st.log.Unref(f.msg.Seq)
		}
	}
}

// movedIn decodes a moved flight, or returns nil for one that does not.
func (s *Server) movedIn(client string, mf *MovedFlight) *flight {
	m, err := DecodeMessage(mf.Msg)
	if err != nil {
		s.log.Warn("cluster: a moved message does not decode", "client", client, "error", err)
		return nil
	}
	if mf.Origin != "" {
		m.SetOrigin(mf.Origin)
	}
	return &flight{msg: m, qos: mf.QoS, retain: mf.Retain, subIDs: mf.SubIDs, id: mf.ID, pubrel: mf.Pubrel,
		sent: mf.Sent || mf.ID != 0, snapshot: mf.Origin == ""}
}

// storeMoved writes moved flights to the log with their queue entries
// (generation gen), and ops with them; on failure nothing is referenced.
func (s *Server) storeMoved(client string, gen uint64, fs []*flight, ops []storage.Op) error {
	var waits []func() error
	fail := func(err error) error {
		unrefFlights(s.store, fs)
		return err
	}
	for i, f := range fs {
		f := f
		var extra []storage.Op
		if i == len(fs)-1 {
			extra = ops
		}
		seq, wait, err := s.store.log.AppendStart(logMessage(f.msg), func(seq uint64) []storage.Op {
			f.msg.Seq = seq
			return append([]storage.Op{queueOp(client, gen, f)}, extra...)
		})
		if err != nil {
			return fail(err)
		}
		f.msg.Seq, f.msg.stored, f.stored = seq, true, true
		s.store.log.Ref(seq)
		s.store.log.Release(seq)
		if s.numObs != nil {
			s.numObs.Unrouted(seq)
		}
		waits = append(waits, wait)
	}
	if len(fs) == 0 && len(ops) > 0 {
		waits = append(waits, s.store.db.WriteStart(ops...))
	}
	for _, w := range waits {
		if err := w(); err != nil {
			return fail(err)
		}
	}
	return nil
}

// adoptLocked puts a moved flight in the session: in flight with its
// packet id, or queued. A flight whose id is in use here goes again with
// a new one; one waiting for PUBCOMP (the client has the message) cannot
// and is dropped.
func (s *session) adoptLocked(f *flight) {
	if f.id != 0 && s.byID[f.id] == nil {
		s.addOutLocked(f)
		return
	}
	if f.id != 0 && f.pubrel {
		s.srv.log.Warn("cluster: a moved QoS 2 flow's packet id is in use here; its PUBREL is not sent", "client", s.id, "id", f.id)
		if f.stored {
			f.stored = false
			s.srv.store.unstore(s.id, s.gen, f.msg.Seq)
		}
		return
	}
	f.id = 0
	s.queue = append(s.queue, f)
	if f.msg.Expiry > 0 {
		s.expiring++
	}
}

// dropMovedIn ends a session moveIn made when the move did not commit.
func (s *Server) dropMovedIn(client string, gen uint64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	sess := s.sessions[client]
	if sess == nil || gen == 0 {
		return
	}
	sess.mu.Lock()
	if sess.gen != gen {
		sess.mu.Unlock()
		return
	}
	s.endLocked(sess)
	sess.mu.Unlock()
}

// MoveInFlights adds a moved session's tail to it, with ops (how far the
// tail was taken) in the same writes; a message it already got is not
// added again. It returns once durable. Without the session (it ended)
// only ops are written.
func (s *Server) MoveInFlights(client string, gen uint64, fl []MovedFlight, ops []storage.Op) error {
	sess := s.session(client)
	if sess != nil {
		sess.mu.Lock()
		other := sess.gen != gen || sess.discarded
		sess.mu.Unlock()
		if other {
			sess = nil // the session the tail was for ended (a clean start, an expiry)
		}
	}
	if sess == nil {
		if s.store != nil && len(ops) > 0 {
			return s.store.db.Write(ops...)
		}
		return nil
	}
	var fs []*flight
	sess.mu.Lock()
	live, persistent := !sess.discarded && sess.gen == gen, sess.persistent
	for i := range fl {
		mf := &fl[i]
		if !live {
			break
		}
		if sess.seen != nil && mf.Origin != "" {
			if _, dup := sess.seen[mf.Origin]; dup {
				continue
			}
			if len(sess.seen) < seenLimit {
				sess.seen[mf.Origin] = struct{}{}
			}
		}
		if f := s.movedIn(client, mf); f != nil {
			fs = append(fs, f)
		}
	}
	sess.mu.Unlock()
	if s.store != nil {
		var err error
		if persistent {
			err = s.storeMoved(client, gen, fs, ops)
		} else if len(ops) > 0 {
			err = s.store.db.Write(ops...)
		}
		if err != nil {
			s.unmoved(sess, fs)
			return err
		}
	}
	sess.mu.Lock()
	defer sess.mu.Unlock()
	for _, f := range fs {
		if sess.discarded || sess.gen != gen {
			if f.stored {
				f.stored = false
				s.store.unstore(client, gen, f.msg.Seq)
			}
			continue
		}
		sess.adoptLocked(f)
		if c := sess.conn; c != nil && sess.holdsLocked(f) {
			// Came with its packet id: the flow goes on, as after a reconnect.
			if f.pubrel {
				id := f.id
				c.queue(func(b []byte) []byte { return appendAck(b, hdrPubrel, c.version, id, 0, "") })
			} else {
				sess.sendLocked(c, f, true)
			}
		}
	}
	sess.pumpLocked()
	return nil
}

// unmoved undoes MoveInFlights for a write that failed: the tail is
// taken again, so its messages are not counted as got.
func (s *Server) unmoved(sess *session, fs []*flight) {
	unrefFlights(s.store, fs)
	sess.mu.Lock()
	defer sess.mu.Unlock()
	for _, f := range fs {
		if o := f.msg.origin(); o != "" && sess.seen != nil {
			delete(sess.seen, o)
		}
	}
}

// MoveInDone ends the move of client's session here: the identities of
// what it got are kept a minute more (a copy that reaches it late, from
// a stream this node was behind on), then dropped.
func (s *Server) MoveInDone(client string) {
	if sess := s.session(client); sess != nil {
		sess.mu.Lock()
		if until := s.now().Add(seenAfter); sess.seen != nil && until.Before(sess.seenUntil) {
			sess.seenUntil = until
		}
		sess.mu.Unlock()
	}
}

// seenLocked reports whether a session moving in got m already, and
// remembers it otherwise.
func (s *session) seenLocked(m *Message) bool {
	if s.seen == nil {
		return false
	}
	if s.srv.now().After(s.seenUntil) {
		s.seen = nil
		return false
	}
	id := s.srv.identity(m)
	if id == "" {
		return false
	}
	if _, dup := s.seen[id]; dup {
		return true
	}
	if len(s.seen) < seenLimit {
		s.seen[id] = struct{}{}
	}
	return false
}

// DropSession ends client's session here, if it has one (its client
// started a clean session on another node): its connection is closed
// with 0x8E.
func (s *Server) DropSession(client string) bool {
	s.mu.Lock()
	sess := s.sessions[client]
	if sess == nil {
		s.mu.Unlock()
		return false
	}
	sess.mu.Lock()
	old := sess.conn
	sess.conn = nil
	if sess.expireTimer != nil {
		sess.expireTimer.Stop()
	}
	if sess.willTimer != nil {
		sess.willTimer.Stop()
	}
	w := sess.will
	sess.will = nil
	s.endLocked(sess)
	sess.mu.Unlock()
	s.mu.Unlock()
	if old != nil {
		old.takeOver()
	}
	if w != nil {
		s.publishWill(w) // the session ended before the will's delay passed
	}
	return true
}
