package engine

import (
	"encoding/binary"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/beaconmq/beacon/broker/topics"
	"github.com/beaconmq/beacon/storage"
)

// DB is what the engine needs of the database (storage.DB): ordered
// writes, synchronous or not, and scans at start.
type DB interface {
	Write(ops ...storage.Op) error
	// WriteStart queues ops and returns a function that waits (once) for
	// them to be durable.
	WriteStart(ops ...storage.Op) func() error
	WriteAsyncThen(then func(error), ops ...storage.Op)
	Scan(prefix []byte, fn func(key, value []byte) error) error
}

// Log is what the engine needs of the message log (storage.Log).
type Log interface {
	// AppendWith stores m with the ops extra returns for its seq, in one
	// atomic write, and returns once durable.
	AppendWith(m *storage.LogMessage, extra func(seq uint64) []storage.Op) (uint64, error)
	// AppendQueued is AppendWith that returns once the write is queued in
	// seq order, not once it is durable.
	AppendQueued(m *storage.LogMessage, extra func(seq uint64) []storage.Op) (uint64, error)
	// AppendStart is AppendWith that returns once the write is queued,
	// with a function that waits (once) for it to be durable.
	AppendStart(m *storage.LogMessage, extra func(seq uint64) []storage.Op) (uint64, func() error, error)
	Number(m *storage.LogMessage) uint64
	Keeps(topic string) bool // a retention rule records messages to topic
	Get(seq uint64) (storage.LogMessage, error)
	Ref(seq uint64)
	Unref(seq uint64)
	Release(seq uint64)
	StartTrimming()
	Epoch() uint64 // the log's epoch (a restart that lost its seq reservation begins a new one)
}

// Identities stores a session's principal with it and restores it after a
// restart, so deliveries to an offline session are authorized as before.
type Identities interface {
	MarshalPrincipal(p Principal) []byte
	// RestorePrincipal returns the principal of stored bytes; nil means
	// the session gets no deliveries until its client connects again.
	RestorePrincipal(client string, data []byte) Principal
}

// Persistence makes sessions and messages durable. A nil Persistence
// keeps everything in memory.
type Persistence struct {
	DB         DB
	Log        Log
	Identities Identities // nil: restored sessions are admitted to read everything their client reconnects with
}

// store is the engine's side of persistence.
type store struct {
	db  DB
	log Log
	ids Identities
	nt  *notifier
	gen uint64 // last generation handed out (guarded by Server.mu)
}

// notifier runs commit callbacks in order on its own goroutine, so the
// database's committer never waits for an engine lock.
type notifier struct {
	mu   sync.Mutex
	cond *sync.Cond
	q    []func()
	done bool
	wg   sync.WaitGroup
}

func newNotifier() *notifier {
	n := &notifier{}
	n.cond = sync.NewCond(&n.mu)
	n.wg.Add(1)
	go n.run()
	return n
}

func (n *notifier) push(fn func()) {
	n.mu.Lock()
	n.q = append(n.q, fn)
	n.mu.Unlock()
	n.cond.Signal()
}

func (n *notifier) run() {
	defer n.wg.Done()
	for {
		n.mu.Lock()
		for len(n.q) == 0 && !n.done {
			n.cond.Wait()
		}
		if len(n.q) == 0 {
			n.mu.Unlock()
			return
		}
		q := n.q
		n.q = nil
		n.mu.Unlock()
		for _, fn := range q {
			fn()
		}
	}
}

func (n *notifier) stop() {
	n.mu.Lock()
	n.done = true
	n.mu.Unlock()
	n.cond.Broadcast()
	n.wg.Wait()
}

// async writes ops after everything written before; then (if set) runs
// on the notifier once they are committed.
func (st *store) async(then func(error), ops ...storage.Op) {
	if len(ops) == 0 {
		if then != nil {
			st.nt.push(func() { then(nil) })
		}
		return
	}
	st.db.WriteAsyncThen(func(err error) {
		if then != nil {
			st.nt.push(func() { then(err) })
		}
	}, ops...)
}

// sessionOps are the writes that record sess (connected when
// disconnected is 0). Callers hold sess.mu.
func (st *store) sessionOp(sess *session, disconnected int64, will *Message, willDelay time.Duration) storage.Op {
	r := storage.SessionRecord{ID: sess.id, Gen: sess.gen, Version: sess.version,
		Expiry: uint32(sess.expiry / time.Second), Disconnected: disconnected, WillDelay: uint32(willDelay / time.Second)}
	if will != nil {
		r.Will = storage.AppendRetained(nil, logMessage(will))
	}
	if st.ids != nil && sess.principal != nil {
		r.Principal = st.ids.MarshalPrincipal(sess.principal)
	}
	return storage.Set(storage.SessionKey(sess.id), storage.AppendSession(nil, &r))
}

// dropOps remove everything stored of a client's session.
func dropOps(client string) []storage.Op {
	return []storage.Op{
		storage.Delete(storage.SessionKey(client)),
		storage.DeletePrefix(storage.SubPrefix(client)),
		storage.DeletePrefix(storage.QueuePrefix(client)),
		storage.DeletePrefix(storage.InboundPrefix(client)),
	}
}

func subOp(client string, s *topics.Subscription) storage.Op {
	r := storage.SubRecord{Filter: s.Filter, Group: s.Group, QoS: s.QoS, NoLocal: s.NoLocal,
		RetainAsPublished: s.RetainAsPublished, RetainHandling: s.RetainHandling, ID: s.ID}
	return storage.Set(storage.SubKey(client, s.Group, s.Filter), storage.AppendSub(nil, &r))
}

func queueOp(client string, gen uint64, f *flight) storage.Op {
	r := storage.QueueRecord{Gen: gen, Seq: f.msg.Seq, QoS: f.qos, Retain: f.retain, SubIDs: f.subIDs, PacketID: f.id, Pubrel: f.pubrel}
	return storage.Set(storage.QueueKey(client, gen, f.msg.Seq), storage.AppendQueue(nil, &r))
}

// logMessage is m in the log's form.
func logMessage(m *Message) *storage.LogMessage {
	return &storage.LogMessage{Time: m.Created, Topic: m.Topic, Payload: m.Payload, QoS: m.QoS, Retain: m.Retain,
		Client: m.Client, Device: m.Device, Expiry: m.Expiry, Props: m.sharedProps(), Origin: m.origin()}
}

// fromLog rebuilds a message from its log record.
func fromLog(lm *storage.LogMessage) (*Message, error) {
	m := &Message{Seq: lm.Seq, Topic: lm.Topic, Payload: lm.Payload, QoS: lm.QoS, Retain: lm.Retain,
		Client: lm.Client, Device: lm.Device, Created: lm.Time, Expiry: lm.Expiry}
	if err := decodeSharedProps(m, lm.Props); err != nil {
		return nil, err
	}
	if lm.Origin != "" {
		m.SetOrigin(lm.Origin)
	}
	return m, nil
}

var errBadStoredProps = errors.New("stored message properties do not decode")

// decodeSharedProps reads what sharedProps wrote.
func decodeSharedProps(m *Message, b []byte) error {
	str := func() (string, bool) {
		if len(b) < 2 || len(b) < 2+int(binary.BigEndian.Uint16(b)) {
			return "", false
		}
		n := int(binary.BigEndian.Uint16(b))
		s := string(b[2 : 2+n])
		b = b[2+n:]
		return s, true
	}
	for len(b) > 0 {
		id := b[0]
		b = b[1:]
		var ok bool
		switch id {
		case packets.PropPayloadFormat:
			if len(b) < 1 {
				return errBadStoredProps
			}
			m.PayloadFormat, m.PayloadFormatSet, b, ok = b[0], true, b[1:], true
		case packets.PropContentType:
			m.ContentType, ok = str()
		case packets.PropResponseTopic:
			m.ResponseTopic, ok = str()
		case packets.PropCorrelationData:
			var s string
			s, ok = str()
			m.CorrelationData = []byte(s)
		case packets.PropUser:
			var k, v string
			if k, ok = str(); ok {
				v, ok = str()
			}
			m.User = append(m.User, packets.UserProperty{Key: k, Val: v})
		}
		if !ok {
			return errBadStoredProps
		}
	}
	return nil
}

// LoadStats say what a start restored.
type LoadStats struct {
	Sessions, Subscriptions, Queued, Inflight, Retained int
	Expired                                             int // sessions whose expiry passed while the broker was down
	Wills                                               int // wills of connections that died with the broker, sent now or after their delay
	Missing                                             int // queue entries whose log record was gone (counted, removed)
	Damaged                                             int // records that did not decode (skipped, removed)
}

// Load restores the stored sessions, subscriptions, queues and retained
// messages. Call it once, before serving.
func (s *Server) Load() (LoadStats, error) {
	var st LoadStats
	ps := s.store
	if ps == nil {
		return st, nil
	}
	defer s.startLoops()
	now := s.now()
	var dels []storage.Op
	var restarted []string // connected when the broker died: their clock starts now, once
	sessions := map[string]*session{}
	err := ps.db.Scan(storage.SessionPrefix(), func(k, v []byte) error {
		r, err := storage.DecodeSession(v)
		if err != nil || r.ID != string(k[len(storage.SessionPrefix()):]) {
			st.Damaged++
			dels = append(dels, dropOps(string(k[len(storage.SessionPrefix()):]))...)
			return nil
		}
		disc := r.Disconnected
		if disc == 0 {
			disc = now.Unix() // connected when the broker stopped: the clock starts now
			restarted = append(restarted, r.ID)
		}
		expireAt := time.Unix(disc, 0).Add(time.Duration(r.Expiry) * time.Second)
		if !expireAt.After(now) {
			st.Expired++
			dels = append(dels, dropOps(r.ID)...)
			return nil
		}
		sess := newSession(s, r.ID)
		sess.gen, sess.version, sess.persistent = r.Gen, r.Version, true
		sess.expiry = time.Duration(r.Expiry) * time.Second
		sess.expireAt = expireAt
		sess.recvMax = 65535
		sess.recorded = true
		if ps.ids != nil {
			sess.principal = ps.ids.RestorePrincipal(r.ID, r.Principal)
		} else {
			sess.principal = AllowAll{}
		}
		if r.Gen > ps.gen {
			ps.gen = r.Gen
		}
		if len(r.Will) > 0 {
			lm, err := storage.DecodeRetained(r.Will)
			var w *Message
			if err == nil {
				w, err = fromLog(&lm)
			}
			if err != nil {
				st.Damaged++
			} else {
				// The connection died with the broker, or its will was
				// waiting for its delay: it goes when the delay has passed.
				sess.will = w
				sess.willAt = time.Unix(disc, 0).Add(time.Duration(r.WillDelay) * time.Second)
			}
		}
		sessions[r.ID] = sess
		return nil
	})
	if err != nil {
		return st, fmt.Errorf("load sessions: %w", err)
	}
	err = ps.db.Scan(storage.SubPrefix(""), func(k, v []byte) error {
		client, _, ok := storage.ClientOfKey(k)
		r, err := storage.DecodeSub(v)
		if sessions[client] == nil || !ok || err != nil || !validStoredFilter(r) {
			if err != nil || !ok {
				st.Damaged++
			}
			dels = append(dels, storage.Delete(append([]byte(nil), k...)))
			return nil
		}
		s.index.Subscribe(subscriptionOf(client, r))
		st.Subscriptions++
		return nil
	})
	if err != nil {
		return st, fmt.Errorf("load subscriptions: %w", err)
	}
	msgs := map[uint64]*Message{}
	err = ps.db.Scan(storage.QueuePrefix(""), func(k, v []byte) error {
		client, rest, ok := storage.ClientOfKey(k)
		gen, seq, ok2 := storage.ParseQueueRest(rest)
		sess := sessions[client]
		var q storage.QueueRecord
		var err error
		if ok && ok2 {
			q, err = storage.DecodeQueue(v, gen, seq)
		}
		if !ok || !ok2 || err != nil || sess == nil || gen != sess.gen {
			if !ok || !ok2 || err != nil {
				st.Damaged++
			}
			dels = append(dels, storage.Delete(append([]byte(nil), k...)))
			return nil
		}
		m := msgs[seq]
		if m == nil {
			lm, err := ps.log.Get(seq)
			if err == nil {
				m, err = fromLog(&lm)
			}
			if err != nil {
				st.Missing++
				dels = append(dels, storage.Delete(append([]byte(nil), k...)))
				return nil
			}
			msgs[seq] = m
		}
		ps.log.Ref(seq)
		f := &flight{msg: m, qos: q.QoS, retain: q.Retain, subIDs: q.SubIDs, id: q.PacketID, pubrel: q.Pubrel, stored: true}
		if f.id != 0 {
			f.sent = true
			sess.addOutLocked(f)
			st.Inflight++
		} else {
			sess.queue = append(sess.queue, f)
			if m.Expiry > 0 {
				sess.expiring++
			}
			st.Queued++
		}
		return nil
	})
	if err != nil {
		return st, fmt.Errorf("load queues: %w", err)
	}
	err = ps.db.Scan(storage.InboundPrefix(""), func(k, v []byte) error {
		client, rest, ok := storage.ClientOfKey(k)
		id, ok2 := storage.ParseInboundRest(rest)
		if sess := sessions[client]; ok && ok2 && sess != nil {
			sess.inQoS2[id] = struct{}{}
			return nil
		}
		dels = append(dels, storage.Delete(append([]byte(nil), k...)))
		return nil
	})
	if err != nil {
		return st, fmt.Errorf("load inbound flows: %w", err)
	}
	err = ps.db.Scan(storage.RetainPrefix(), func(k, v []byte) error {
		lm, err := storage.DecodeRetained(v)
		var m *Message
		if err == nil {
			m, err = fromLog(&lm)
		}
		if err != nil || !topics.ValidTopicName(m.Topic) {
			st.Damaged++
			dels = append(dels, storage.Delete(append([]byte(nil), k...)))
			return nil
		}
		s.retained.Set(m.Topic, m)
		st.Retained++
		return nil
	})
	if err != nil {
		return st, fmt.Errorf("load retained: %w", err)
	}

	for _, id := range restarted {
		if sess := sessions[id]; sess != nil {
			dels = append(dels, ps.sessionOp(sess, now.Unix(), sess.will, max(sess.willAt.Sub(now), 0)))
		}
	}
	// Written before the timers start: a will sent at once rewrites its
	// session's record without it, and that must come after this one.
	if len(dels) > 0 {
		if err := ps.db.Write(dels...); err != nil {
			return st, fmt.Errorf("remove stale records: %w", err)
		}
	}
	s.mu.Lock()
	for id, sess := range sessions {
		s.sessions[id] = sess
		sess.mu.Lock() // the timers may fire at once
		sess.expireTimer = time.AfterFunc(sess.expireAt.Sub(now), func() { s.expire(sess) })
		if sess.will != nil {
			sess.willTimer = time.AfterFunc(max(sess.willAt.Sub(now), 0), func() { s.sendDelayedWill(sess) })
			st.Wills++
		}
		sess.mu.Unlock()
		st.Sessions++
	}
	s.mu.Unlock()
	ps.log.StartTrimming()
	return st, nil
}

// subscriptionOf is a stored (or moved) subscription of client.
func subscriptionOf(client string, r storage.SubRecord) topics.Subscription {
	return topics.Subscription{Client: client, Filter: r.Filter, Group: r.Group, QoS: r.QoS,
		NoLocal: r.NoLocal, RetainAsPublished: r.RetainAsPublished, RetainHandling: r.RetainHandling, ID: r.ID}
}

func validStoredFilter(r storage.SubRecord) bool {
	if r.Group != "" {
		_, _, _, ok := topics.ParseShared("$share/" + r.Group + "/" + r.Filter)
		return ok
	}
	return topics.ValidFilter(r.Filter)
}
