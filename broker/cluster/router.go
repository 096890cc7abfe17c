package cluster

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/beaconmq/beacon/broker/engine"
	"github.com/beaconmq/beacon/broker/topics"
	"github.com/beaconmq/beacon/storage"
)

// LogStore is the part of the message log the router reads forwarded
// messages back from and holds them in.
type LogStore interface {
	Get(seq uint64) (storage.LogMessage, error)
	TryRef(seq uint64) bool
	Unref(seq uint64)
	Epoch() uint64
}

// DB is the part of the store the router keeps its records in.
type DB interface {
	Scan(prefix []byte, fn func(key, value []byte) error) error
	Write(ops ...storage.Op) error
	WriteAsync(ops ...storage.Op)
}

// Engine is the part of the engine that takes messages from other nodes.
type Engine interface {
	BeginRemote(m *engine.Message, ops []storage.Op, scope *engine.Scope) *engine.Pending
	SetRetained(m *engine.Message) error
	// Sessions moving between nodes (move.go).
	MoveOut(client string) (*engine.Moving, error)
	MoveInFlights(client string, gen uint64, fl []engine.MovedFlight, ops []storage.Op) error
	MoveInDone(client string)
	SessionGen(client string) uint64
	HoldMove(client string, gen uint64)
	SettleMove(client string, gen uint64, won, merged bool)
	DropSession(client string) bool
	OfflineSessions() []string
}

// Stats are the router's counters.
type Stats struct {
	Forwarded      uint64 // durable messages written to another node's stream (once per node)
	ForwardedLive  uint64 // QoS 0 messages sent to another node (once per node)
	LiveDropped    uint64 // QoS 0 messages for other nodes dropped (Redis away or too slow)
	Received       uint64 // durable messages taken from other nodes
	ReceivedLive   uint64 // QoS 0 messages taken from other nodes
	Damaged        uint64 // entries from other nodes that did not decode
	Missing        uint64 // messages to forward no longer in the log
	TakeFailures   uint64 // reads of another node's stream this node could not take all of (retried)
	Pending        int    // durable messages held: not yet taken by every destination that is up
	Unsent         int    // of those, not yet in Redis
	PendingInStore int    // of those held, whose message is not in memory (read back from the log)
	MovedIn        uint64 // sessions that moved here from another node
	MovedOut       uint64 // sessions that moved from here to another node
	MoveRefused    uint64 // CONNECTs refused: the node holding the session did not hand it over
}

// Router forwards what this node accepts to the other nodes that want
// it, and takes what they forward here. It is the engine's Cluster.
type Router struct {
	n     *Node
	lg    LogStore
	db    DB
	eng   Engine
	log   *slog.Logger
	epoch uint64

	// Interest: this node's filters (counted) and what Redis still has to hear.
	imu       sync.Mutex
	local     map[string]int
	dirty     map[string]bool // key -> added
	iwake     chan struct{}
	fullPush  atomic.Bool
	dirtyGen  uint64        // guarded by imu: changes reported
	pushedGen uint64        // guarded by imu: changes known to be in Redis
	pushed    chan struct{} // guarded by imu: closed (and made anew) when pushedGen grows

	// The other nodes' filters: a subscription index whose clients are node ids.
	rmu      sync.RWMutex
	remote   *topics.Index
	known    map[string]bool      // every other node seen (retained messages go to all)
	alive    map[string]bool      // of those, the ones whose liveness key was there at the last look
	unlisted map[string]time.Time // of those, the ones missing from the nodes hash, since

	// Forwarding, in seq order.
	fmu     sync.Mutex
	pending []*forward
	bodies  int // pending entries holding their message
	fwake   chan struct{}
	live    chan liveMsg

	rewind    bool                // a stream lost entries: send what is held again (forwarder goroutine)
	redisBack atomic.Bool         // Redis came back: rewind before the next batch
	lastSent  map[string]uint64   // stream -> seq of its last entry after our last batch (forwarder goroutine)
	sharedRR  atomic.Uint64       // turns of the shared groups
	downSince map[string]downMark // destinations seen without liveness key (forwarder goroutine)

	// Taking.
	cursors map[string]string          // stream -> last id taken in order (inbox goroutine)
	ahead   map[string]map[string]bool // stream -> ids taken past a failed one (inbox goroutine)

	retainedSynced atomic.Bool // the cluster's retained messages were read

	mv moves // sessions moving to or from this node
	pg pages // replays for browser readers (history.go)

	// Routes under way, for fence (history.go); apart from the fields
	// around them, as every publish writes them.
	_        [64]byte
	fgen     atomic.Uint64
	fcount   [2]atomic.Int64
	_        [64]byte
	fmuFence sync.Mutex
	drained  atomic.Int64 // reads of the inbox that took every stream to its end (as it was then)

	forwarded, forwardedLive, liveDropped, received, receivedLive, damaged, missing, takeFailures atomic.Uint64
}

type forward struct {
	seq    uint64
	m      *engine.Message // nil: read it back from the log
	epoch  uint64          // of the log that holds it (a restart may begin a new one)
	ver    int64           // a retained message\'s version (engine.RetainVersion), which its log record lacks
	nodes  []string
	scopes []string // per node: which of its subscriptions it reaches (encodeScope)
	state  int8     // fwdWriting, fwdCommitted, fwdSent or fwdFailed
}

type liveMsg struct {
	body   []byte
	seq    uint64 // in this node's log: its identity goes with it
	nodes  []string
	scopes []string
}

// NewRouter makes the router of node n over the node's log and store.
func NewRouter(n *Node, lg LogStore, db DB) *Router {
	r := &Router{n: n, lg: lg, db: db, log: n.log, epoch: lg.Epoch(),
		local: map[string]int{}, dirty: map[string]bool{}, iwake: make(chan struct{}, 1), pushed: make(chan struct{}),
		remote: topics.NewIndex(), known: map[string]bool{},
		fwake: make(chan struct{}, 1), live: make(chan liveMsg, 4096),
		lastSent: map[string]uint64{}, cursors: map[string]string{}, downSince: map[string]downMark{},
		alive: map[string]bool{}, unlisted: map[string]time.Time{}, ahead: map[string]map[string]bool{},
		mv: moves{committed: map[string]chan struct{}{}, resume: map[string]moveRecord{}, taking: map[string]moveRecord{}, superseded: map[string]bool{}}}
	r.pg.init()
	return r
}

var _ engine.Cluster = (*Router)(nil)

// Load restores what a previous run left: messages still to forward
// (their log records are referenced again, before the log trims) and
// how far each stream from another node was taken. Call it before the
// engine loads.
func (r *Router) Load() (pending int, err error) {
	var gone []storage.Op
	err = r.db.Scan(storage.ForwardPrefix(), func(k, v []byte) error {
		seq, ok := storage.ParseForwardKey(k)
		if !ok {
			return nil
		}
		var rec forwardRecord
		if json.Unmarshal(v, &rec) != nil {
			gone = append(gone, storage.Delete(storage.ForwardKey(seq)))
			return nil
		}
		nodes, scopes := make([]string, len(rec.Dests)), make([]string, len(rec.Dests))
		for i, p := range rec.Dests {
			nodes[i], scopes[i] = p[0], p[1]
		}
		if !r.lg.TryRef(seq) {
			gone = append(gone, storage.Delete(storage.ForwardKey(seq)))
			r.missing.Add(1)
			return nil
		}
		r.pending = append(r.pending, &forward{seq: seq, epoch: rec.Epoch, ver: rec.Version, nodes: nodes, scopes: scopes, state: fwdCommitted})
		return nil
	})
	if err != nil {
		return 0, err
	}
	if len(gone) > 0 {
		r.log.Warn("cluster: messages to forward are no longer in the log", "missing", len(gone))
		if err := r.db.Write(gone...); err != nil {
			return 0, err
		}
	}
	err = r.db.Scan(storage.CursorPrefix(), func(k, v []byte) error {
		if stream, id, ok := storage.ParseTakenMark(k); ok {
			if r.ahead[stream] == nil {
				r.ahead[stream] = map[string]bool{}
			}
			r.ahead[stream][id] = true // taken past one that was not, before a restart
			return nil
		}
		r.cursors[string(k[len(storage.CursorPrefix()):])] = string(v)
		return nil
	})
	if err == nil {
		err = r.loadMoves()
	}
	return len(r.pending), err
}

// Start begins forwarding and taking, with eng the engine messages from
// other nodes go to. Retained messages the cluster holds that this node
// lacks (or holds older) are taken first, if Redis answers.
func (r *Router) Start(eng Engine) {
	r.eng = eng
	r.fullPush.Store(true)
	// Before the node takes clients: what the other nodes want (else the
	// first messages accepted here would reach no one there), and the
	// cluster's retained messages. Without Redis it goes on and learns
	// them when Redis answers.
	ctx, cancel := context.WithTimeout(r.n.ctx, 5*time.Second)
	if err := r.readAllInterest(ctx); err != nil {
		r.log.Warn("cluster: the other nodes' interest was not read before serving; messages accepted here reach them once it is", "error", err)
	}
	r.refreshNodes(ctx)
	r.n.Subscribe(r.ctlKey(r.n.ID()), nil, r.onCtl)
	r.resumeMoves(ctx)
	r.resumeOrphans(ctx)
	cancel()
	r.syncRetained()
	r.n.OnUp(func() {
		// Clean starts elsewhere while this node could not hear, and
		// offline sessions whose client another node holds now (one made
		// here while Redis was away): handed on.
		r.n.Go(func(ctx context.Context) { r.resumeOrphans(ctx) })
		r.fullPush.Store(true)
		select {
		case r.iwake <- struct{}{}:
		default:
		}
		r.redisBack.Store(true) // it may have come back without what it held
		r.wakeForwarder()
	})
	r.n.Go(r.pushInterest)
	r.followInterest()
	r.n.Go(r.forwardLoop)
	r.n.Go(r.liveLoop)
	r.n.Go(r.inboxLoop)
	r.n.Subscribe(r.n.Key("live", r.n.ID()), nil, r.takeLive)
	select {
	case r.iwake <- struct{}{}:
	default:
	}
	r.wakeForwarder()
}

// Stats returns the counters.
func (r *Router) Stats() Stats {
	r.fmu.Lock()
	p, held, unsent := len(r.pending), r.bodies, 0
	for _, f := range r.pending {
		if f.state == fwdWriting || f.state == fwdCommitted {
			unsent++
		}
	}
	r.fmu.Unlock()
	return Stats{Forwarded: r.forwarded.Load(), ForwardedLive: r.forwardedLive.Load(), LiveDropped: r.liveDropped.Load(),
		TakeFailures: r.takeFailures.Load(), Received: r.received.Load(), ReceivedLive: r.receivedLive.Load(), Damaged: r.damaged.Load(), Missing: r.missing.Load(),
		Pending: p, Unsent: unsent, PendingInStore: p - held,
		MovedIn: r.mv.in.Load(), MovedOut: r.mv.out.Load(), MoveRefused: r.mv.refused.Load()}
}

// Route is the engine's: the other nodes a message accepted here goes
// to. Each shared group matching here or elsewhere is served by one node
// (this one counts once, however many members it has), in turn. A
// retained message goes to every node (each keeps the cluster's retained
// messages); others to the nodes with a matching filter or a chosen group.
func (r *Router) Route(m *engine.Message, shared []topics.SharedMatch) engine.Remote {
	r.rmu.RLock()
	if r.remote.Len() == 0 && !m.Retain {
		r.rmu.RUnlock()
		return nil
	}
	ms := matchesPool.Get().(*topics.Matches)
	r.remote.Match(m.Topic, "", ms)
	rt := &route{r: r, durable: m.QoS > 0 || m.Retain}
	scopes := map[string]*engine.Scope{}
	for i := range ms.Direct {
		scopes[ms.Direct[i].Client] = &engine.Scope{}
	}
	for i := range ms.Shared {
		g := &ms.Shared[i]
		var cands []string
		for _, sub := range g.Members {
			cands = appendNew(cands, sub.Client)
		}
		local := slices.ContainsFunc(shared, func(l topics.SharedMatch) bool {
			return l.Group == g.Group && l.Filter == g.Filter && len(l.Members) > 0
		})
		// Nodes that are down keep their members' sessions, but a member
		// elsewhere that is up gets the message now.
		up := cands[:0:0]
		for _, c := range cands {
			if a, seen := r.alive[c]; a || !seen {
				up = append(up, c)
			}
		}
		if len(up) > 0 || local {
			cands = up
		}
		if local {
			cands = append(cands, "") // this node
		}
		slices.Sort(cands)
		pick := cands[r.sharedRR.Add(1)%uint64(len(cands))]
		if pick == "" {
			continue
		}
		sc := scopes[pick]
		if sc == nil {
			sc = &engine.Scope{NoDirect: true}
			scopes[pick] = sc
		}
		key := g.Group + "\x00" + g.Filter
		sc.Groups = append(sc.Groups, key)
		if local {
			rt.takes = append(rt.takes, key)
		}
	}
	if m.Retain {
		for id := range r.known {
			if scopes[id] == nil {
				scopes[id] = &engine.Scope{NoDirect: true} // keeps it, delivers it to nobody
			}
		}
	}
	r.rmu.RUnlock()
	matchesPool.Put(ms)
	if len(scopes) == 0 && !m.Retain { // a retained message goes to the cluster's retained hash, alone or not
		return nil
	}
	for id, sc := range scopes {
		rt.nodes = append(rt.nodes, id)
		rt.scopes = append(rt.scopes, encodeScope(sc))
	}
	return rt
}

// encodeScope is "" for the common scope (direct subscriptions only),
// else JSON.
func encodeScope(sc *engine.Scope) string {
	if !sc.NoDirect && len(sc.Groups) == 0 {
		return ""
	}
	b, _ := json.Marshal(sc)
	return string(b)
}

func decodeScope(s string) (*engine.Scope, error) {
	sc := &engine.Scope{}
	if s == "" {
		return sc, nil
	}
	return sc, json.Unmarshal([]byte(s), sc)
}

var matchesPool = sync.Pool{New: func() any { return new(topics.Matches) }}

func appendNew(s []string, v string) []string {
	for _, x := range s {
		if x == v {
			return s
		}
	}
	return append(s, v)
}

// forwardRecord is the stored form of a message still to forward: the
// epoch of the log it is in (its stream's name) and its destinations with
// their scopes.
type forwardRecord struct {
	Epoch   uint64      `json:"e"`
	Version int64       `json:"v,omitempty"`
	Dests   [][2]string `json:"d"`
}

// route is one message's way out (engine.Remote).
type route struct {
	r       *Router
	nodes   []string
	scopes  []string
	takes   []string // shared groups matching here that another node serves
	durable bool
	f       *forward
}

func (rt *route) Durable() bool { return rt.durable }

func (rt *route) Takes(group, filter string) bool {
	for _, k := range rt.takes {
		if len(k) == len(group)+1+len(filter) && k[:len(group)] == group && k[len(group)+1:] == filter {
			return true
		}
	}
	return false
}

// Queued records, in the message's own write, that it is still to be
// forwarded, and queues it in seq order.
func (rt *route) Queued(m *engine.Message, seq uint64) []storage.Op {
	r := rt.r
	f := &forward{seq: seq, epoch: r.epoch, ver: engine.RetainedVersionOf(m), m: m, nodes: rt.nodes, scopes: rt.scopes}
	r.fmu.Lock()
	if r.bodies >= r.n.opts.ForwardBuffer {
		f.m = nil // read back from the log when its turn comes
	} else {
		r.bodies++
	}
	r.pending = append(r.pending, f)
	r.fmu.Unlock()
	rt.f = f
	rec := forwardRecord{Epoch: r.epoch, Version: f.ver, Dests: make([][2]string, len(rt.nodes))}
	for i := range rt.nodes {
		rec.Dests[i] = [2]string{rt.nodes[i], rt.scopes[i]}
	}
	v, _ := json.Marshal(rec)
	return []storage.Op{storage.Set(storage.ForwardKey(seq), v)}
}

func (rt *route) Done(m *engine.Message, err error) {
	r := rt.r
	if !rt.durable {
		select {
		case r.live <- liveMsg{body: engine.EncodeMessage(m), seq: m.Seq, nodes: rt.nodes, scopes: rt.scopes}:
		default:
			r.liveDropped.Add(uint64(len(rt.nodes)))
		}
		return
	}
	if rt.f == nil {
		return // never queued
	}
	r.fmu.Lock()
	if err != nil {
		rt.f.state = fwdFailed // the engine gave back its reference
	} else {
		rt.f.state = fwdCommitted
	}
	r.fmu.Unlock()
	r.wakeForwarder()
}

func (r *Router) wakeForwarder() {
	select {
	case r.fwake <- struct{}{}:
	default:
	}
}

// streamKey is the stream of this node's messages to dest from the log
// of epoch.
func (r *Router) streamKey(dest string, epoch uint64) string {
	return r.n.Key("fwd", dest, r.n.ID(), strconv.FormatUint(epoch, 16))
}

// streamOrigin is the origin and log epoch of a stream to this node
// (streamKey).
func (r *Router) streamOrigin(stream string) (origin string, epoch uint64, ok bool) {
	rest, ok := strings.CutPrefix(stream, r.n.Key("fwd", r.n.ID(), ""))
	if !ok {
		return "", 0, false
	}
	i := strings.LastIndexByte(rest, ':')
	if i < 0 {
		return "", 0, false
	}
	epoch, err := strconv.ParseUint(rest[i+1:], 16, 64)
	return rest[:i], epoch, err == nil
}

// forwardBatch is the most messages one append to a stream carries, and
// one read of a stream takes.
const forwardBatch = 1024

// inboxRelist is how often a node looks for new streams to it (a node
// that joined, or restarted with a new log epoch): their first messages
// wait at most about twice this.
const inboxRelist = 250 * time.Millisecond

// downMark is when a destination was first and last seen without its
// liveness key.
type downMark struct{ since, last time.Time }

// downAfter is how long a destination's liveness key must be missing
// before its messages are left to Redis alone.
const downAfter = 30 * time.Second

// Forwarding states.
const (
	fwdFailed    int8 = -1 // the write failed: never forwarded
	fwdWriting   int8 = 0  // its write is not durable yet
	fwdCommitted int8 = 1  // durable here: to send
	fwdSent      int8 = 2  // in the destinations' streams: held until they took it
)

// forwardLoop writes committed messages to their destinations' streams
// in seq order. A sent message is held (its forwarding record and log
// reference) until every destination that is up has taken it: if Redis
// loses the stream (a crash before its append-only file had it, a
// failover to a replica behind), what was not taken is sent again when
// Redis is back. For a destination that is down, Redis's copy is the one
// that waits.
func (r *Router) forwardLoop(ctx context.Context) {
	backoff := 50 * time.Millisecond
	confirm := time.NewTicker(200 * time.Millisecond)
	defer confirm.Stop()
	for {
		if r.redisBack.Swap(false) {
			r.rewind = true
			if !r.retainedSynced.Load() {
				r.syncRetained()
			}
		}
		if r.rewind {
			// A stream lost entries (Redis came back without them): send
			// again all that is held, oldest first. The script skips
			// what each stream has; its receiver skips what it took.
			r.rewind = false
			r.fmu.Lock()
			for _, f := range r.pending {
				if f.state == fwdSent {
					f.state = fwdCommitted
				}
			}
			r.fmu.Unlock()
		}
		batch := r.takeBatch()
		if len(batch) == 0 {
			select {
			case <-ctx.Done():
				return
			case <-r.fwake:
			case <-confirm.C:
				r.release(ctx)
			}
			continue
		}
		err := r.send(ctx, batch)
		if errors.Is(err, errRewind) {
			r.n.Report(nil)
			r.rewind = true
			continue
		}
		r.n.Report(err)
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			select {
			case <-ctx.Done():
				return
			case <-time.After(backoff):
			}
			backoff = min(2*backoff, 2*time.Second)
			continue
		}
		backoff = 50 * time.Millisecond
		r.fmu.Lock()
		for _, f := range batch {
			if f.m != nil {
				f.m = nil // a resend reads it back from the log
				r.bodies--
			}
			if f.state == fwdCommitted {
				f.state = fwdSent
			}
		}
		r.fmu.Unlock()
		select {
		case <-confirm.C:
			r.release(ctx)
		default:
		}
	}
}

// takeBatch returns the committed messages that follow the sent ones at
// the head of the queue, up to forwardBatch; none while the next one's
// write is still going. Failed writes at the head are dropped.
func (r *Router) takeBatch() []*forward {
	r.fmu.Lock()
	defer r.fmu.Unlock()
	r.dropFailed()
	i := 0
	for i < len(r.pending) && (r.pending[i].state == fwdSent || r.pending[i].state == fwdFailed) {
		i++
	}
	j := i
	for j < len(r.pending) && j-i < forwardBatch && r.pending[j].state == fwdCommitted {
		j++
	}
	return append([]*forward(nil), r.pending[i:j]...)
}

// dropFailed removes failed writes from the head. Called with fmu held.
func (r *Router) dropFailed() {
	for len(r.pending) > 0 && r.pending[0].state == fwdFailed {
		if r.pending[0].m != nil {
			r.bodies--
		}
		r.pending = r.pending[1:]
	}
	if len(r.pending) == 0 {
		r.pending = nil
	}
}

// release lets go of the sent messages at the head that every live
// destination has taken (the taken:<stream> keys receivers keep), and
// of those for destinations that are down.
func (r *Router) release(ctx context.Context) {
	r.fmu.Lock()
	r.dropFailed()
	type dest struct {
		node  string
		epoch uint64
	}
	dests := map[dest]bool{}
	for _, f := range r.pending {
		if f.state != fwdSent && f.state != fwdFailed {
			break
		}
		for _, d := range f.nodes {
			dests[dest{d, f.epoch}] = true
		}
	}
	r.fmu.Unlock()
	ids := make([]dest, 0, len(dests))
	keys := make([]string, 0, 2*len(dests))
	for d := range dests {
		ids = append(ids, d)
		keys = append(keys, r.takenKey(r.streamKey(d.node, d.epoch)), r.n.Key("node", d.node))
	}
	var vals []any
	if len(keys) > 0 {
		ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		var err error
		vals, err = r.n.rdb.MGet(ctx, keys...).Result()
		cancel()
		r.n.Report(err)
		if err != nil {
			return
		}
	}
	taken := map[dest]uint64{}
	now := time.Now()
	for i, dd := range ids {
		d := dd.node
		if vals[2*i+1] == nil {
			// Down for a while (not just Redis come back empty, before
			// the node's next heartbeat): Redis holds its messages.
			// Missing at every look for downAfter (looks at most a few
			// seconds apart), not at two looks an outage apart.
			mk, ok := r.downSince[d]
			if !ok || now.Sub(mk.last) > 5*time.Second {
				mk.since = now
			}
			mk.last = now
			r.downSince[d] = mk
			if now.Sub(mk.since) >= downAfter {
				taken[dd] = math.MaxUint64
				continue
			}
		} else {
			delete(r.downSince, d)
		}
		if v, ok := vals[2*i].(string); ok {
			taken[dd], _ = strconv.ParseUint(v, 10, 64)
		}
	}
	r.fmu.Lock()
	n := 0
	for n < len(r.pending) {
		f := r.pending[n]
		if f.state == fwdFailed {
			n++
			continue
		}
		if f.state != fwdSent {
			break
		}
		done := true
		for _, d := range f.nodes {
			if taken[dest{d, f.epoch}] < f.seq {
				done = false
				break
			}
		}
		if !done {
			break
		}
		n++
	}
	gone := append([]*forward(nil), r.pending[:n]...)
	for _, f := range gone {
		if f.m != nil {
			r.bodies--
		}
	}
	r.pending = r.pending[n:]
	if len(r.pending) == 0 {
		r.pending = nil
	}
	r.fmu.Unlock()
	dels := make([]storage.Op, 0, len(gone))
	for _, f := range gone {
		if f.state == fwdSent {
			dels = append(dels, storage.Delete(storage.ForwardKey(f.seq)))
		}
	}
	if len(dels) > 0 {
		r.db.WriteAsync(dels...)
	}
	for _, f := range gone {
		if f.state == fwdSent {
			r.lg.Unref(f.seq)
		}
	}
}

// takenKey is where the receiver of stream says how far it has taken it.
func (r *Router) takenKey(stream string) string {
	return r.n.Key("taken") + strings.TrimPrefix(stream, r.n.Key("fwd"))
}

// appendScript appends a batch to one stream, unless the stream lost
// entries it had been given: KEYS[1] the stream, KEYS[2] the
// destination's inbox set; ARGV[1] the seq the stream's last entry had
// after the previous batch (0: unknown), then seq, body and scope
// triples (the scope says which of the receiver's subscriptions the
// message reaches: "" for all but shared groups). Entries
// not newer than the stream's last are skipped (sent before a crash, or
// a lost reply). It returns {"ok", last seq} or {"rewind", last seq}
// when the stream ends before ARGV[1]: Redis came back without entries
// (a restart without them in its append-only file, a failover to a
// replica behind), and everything held must go again first, in order.
var appendScript = redis.NewScript(`
local last = 0
if redis.call('EXISTS', KEYS[1]) == 1 then
  local info = redis.call('XINFO', 'STREAM', KEYS[1])
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then
      last = tonumber(string.match(info[i + 1], '^(%d+)'))
    end
  end
end
local expect = tonumber(ARGV[1])
if expect > last then
  return {'rewind', tostring(last)}
end
redis.call('SADD', KEYS[2], KEYS[1])
for i = 2, #ARGV, 3 do
  local seq = tonumber(ARGV[i])
  if seq > last then
    redis.call('XADD', KEYS[1], ARGV[i] .. '-0', 'm', ARGV[i + 1], 's', ARGV[i + 2])
    last = seq
  end
end
return {'ok', tostring(last)}
`)

// retainScript sets (or, with an empty value, clears) the cluster's
// retained message of a topic unless a newer version is there: KEYS[1]
// the retained hash, KEYS[2] the versions hash; ARGV topic, version,
// value. A cleared topic keeps its version, so an older message cannot
// come back.
var retainScript = redis.NewScript(`
local cur = redis.call('HGET', KEYS[2], ARGV[1])
if cur and cur >= ARGV[2] then
  return 0
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
if ARGV[3] == '' then
  redis.call('HDEL', KEYS[1], ARGV[1])
else
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
end
return 1
`)

// errRewind: a stream lost entries; the held messages go again.
var errRewind = errors.New("cluster: a forwarding stream lost entries")

// send writes one batch in one round trip: per destination, one call of
// appendScript.
func (r *Router) send(ctx context.Context, batch []*forward) error {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	args := map[string][]any{} // by stream
	destOf := map[string]string{}
	var streams []string
	queued := 0
	p := r.n.rdb.Pipeline()
	for _, f := range batch {
		var body []byte
		var topic string
		retain := false
		if f.m != nil {
			body, topic, retain = engine.EncodeMessage(f.m), f.m.Topic, f.m.Retain
		} else {
			lm, err := r.lg.Get(f.seq)
			if err != nil {
				if errors.Is(err, storage.ErrNotFound) {
					r.missing.Add(1)
					continue
				}
				return err
			}
			if lm.Retain && f.ver != 0 {
				lm.Time = f.ver // the version it was given when written
			}
			body, topic, retain = engine.EncodeLogMessage(&lm), lm.Topic, lm.Retain
		}
		for i, dest := range f.nodes {
			stream := r.streamKey(dest, f.epoch)
			a, ok := args[stream]
			if !ok {
				a = []any{r.lastSent[stream]}
				streams = append(streams, stream)
				destOf[stream] = dest
			}
			args[stream] = append(a, f.seq, body, f.scopes[i])
		}
		if retain {
			// The cluster's copy: the newest by version wins, in Redis as
			// on every node (engine.RetainVersion).
			lm, _ := storage.DecodeRetained(body)
			val := body
			if len(lm.Payload) == 0 {
				val = nil
			}
			retainScript.Eval(ctx, p, []string{r.n.Key("retained"), r.n.Key("retained-version")},
				topic, engine.RetainVersion(lm.Time, lm.Client), val)
			queued++
		}
	}
	if len(streams) == 0 {
		if queued == 0 {
			return nil
		}
		_, err := p.Exec(ctx)
		return err
	}
	cmds := make([]*redis.Cmd, len(streams))
	for i, stream := range streams {
		cmds[i] = appendScript.Eval(ctx, p, []string{stream, r.n.Key("inbox", destOf[stream])}, args[stream]...)
	}
	if _, err := p.Exec(ctx); err != nil {
		return err
	}
	rewind := false
	for i, c := range cmds {
		stream := streams[i]
		res, err := c.StringSlice()
		if err != nil || len(res) != 2 {
			return fmt.Errorf("cluster: append to %s: %v %v", destOf[stream], res, err)
		}
		last, _ := strconv.ParseUint(res[1], 10, 64)
		if res[0] == "rewind" {
			r.log.Warn("cluster: Redis lost messages not yet taken by a node; sending them again",
				"node", destOf[stream], "stream_ends_at", last, "sent_up_to", r.lastSent[stream])
			rewind = true
		} else {
			r.forwarded.Add(uint64((len(args[stream]) - 1) / 3))
		}
		r.lastSent[stream] = last
	}
	if rewind {
		return errRewind
	}
	return nil
}

// liveLoop sends QoS 0 messages to the nodes that want them, as they
// come: best effort, like QoS 0 itself.
func (r *Router) liveLoop(ctx context.Context) {
	var batch []liveMsg
	for {
		select {
		case <-ctx.Done():
			return
		case lm := <-r.live:
			batch = append(batch[:0], lm)
		}
	more:
		for len(batch) < forwardBatch {
			select {
			case lm := <-r.live:
				batch = append(batch, lm)
			default:
				break more
			}
		}
		sctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		p := r.n.rdb.Pipeline()
		n := 0
		for _, lm := range batch {
			for i, dest := range lm.nodes {
				p.Publish(sctx, r.n.Key("live", dest), livePayload(lm.scopes[i], r.identity(lm.seq), lm.body))
				n++
			}
		}
		_, err := p.Exec(sctx)
		cancel()
		r.n.Report(err)
		if err != nil {
			r.liveDropped.Add(uint64(n))
		} else {
			r.forwardedLive.Add(uint64(n))
		}
		clear(batch)
	}
}

// livePayload is a QoS 0 message on the live channel: its scope's
// length (uvarint), its scope, its identity's length and identity
// (engine.Identity; "" if it was not numbered), the message.
func livePayload(scope, origin string, body []byte) []byte {
	b := binary.AppendUvarint(make([]byte, 0, len(scope)+len(origin)+len(body)+4), uint64(len(scope)))
	b = append(b, scope...)
	b = binary.AppendUvarint(b, uint64(len(origin)))
	return append(append(b, origin...), body...)
}

// parseLive splits what livePayload joined.
func parseLive(payload string) (scope, origin, body string, ok bool) {
	if scope, payload, ok = cutPrefixed(payload); !ok {
		return "", "", "", false
	}
	if origin, payload, ok = cutPrefixed(payload); !ok {
		return "", "", "", false
	}
	return scope, origin, payload, true
}

// cutPrefixed splits a uvarint-length-prefixed string off s.
func cutPrefixed(s string) (v, rest string, ok bool) {
	n, k := binary.Uvarint([]byte(s[:min(len(s), binary.MaxVarintLen64)]))
	if k <= 0 || uint64(len(s)-k) < n {
		return "", "", false
	}
	return s[k : k+int(n)], s[k+int(n):], true
}

// identity is the cluster identity of this node's message seq, or "".
func (r *Router) identity(seq uint64) string {
	if seq == 0 {
		return ""
	}
	return engine.Identity(r.n.ID(), r.epoch, seq)
}

// takeLive routes a QoS 0 message another node sent.
func (r *Router) takeLive(payload string) {
	scope, origin, body, ok := parseLive(payload)
	if !ok {
		r.damaged.Add(1)
		return
	}
	sc, err := decodeScope(scope)
	if err != nil {
		r.damaged.Add(1)
		return
	}
	m, err := engine.DecodeMessage([]byte(body))
	if err != nil {
		r.damaged.Add(1)
		return
	}
	if origin != "" {
		m.SetOrigin(origin)
	}
	if _, err := r.eng.BeginRemote(m, nil, sc).Finish(); err == nil {
		r.receivedLive.Add(1)
	}
}

// inboxLoop takes the messages other nodes wrote to this node's
// streams, in order, each written here with the stream's new position in
// the same write: taken once, also across crashes.
func (r *Router) inboxLoop(ctx context.Context) {
	var streams []string
	var listed, published time.Time
	backoff := 50 * time.Millisecond
	fail := func(err error) bool {
		r.n.Report(err)
		select {
		case <-ctx.Done():
			return false
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 2*time.Second)
		return true
	}
	for ctx.Err() == nil {
		if time.Since(listed) > inboxRelist || len(streams) == 0 {
			lctx, cancel := context.WithTimeout(ctx, 3*time.Second)
			s, err := r.n.rdb.SMembers(lctx, r.n.Key("inbox", r.n.ID())).Result()
			cancel()
			if err != nil {
				if !fail(err) {
					return
				}
				continue
			}
			streams, listed = s, time.Now()
			if time.Since(published) > time.Second {
				r.publishTaken(ctx)
				published = time.Now()
			}
			if len(streams) == 0 {
				r.drained.Add(1)
				select {
				case <-ctx.Done():
					return
				case <-time.After(inboxRelist / 2):
				}
				continue
			}
		}
		args := make([]string, 0, 2*len(streams))
		args = append(args, streams...)
		for _, s := range streams {
			id := r.cursors[s]
			if id == "" {
				id = "0-0"
			}
			args = append(args, id)
		}
		res, err := r.n.rdb.XRead(ctx, &redis.XReadArgs{Streams: args, Count: forwardBatch, Block: inboxRelist}).Result()
		if errors.Is(err, redis.Nil) {
			r.n.Report(nil)
			r.drained.Add(1)
			continue
		}
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			if !fail(err) {
				return
			}
			continue
		}
		r.n.Report(nil)
		failed, end := false, true
		for _, xs := range res {
			end = end && len(xs.Messages) < forwardBatch
			if err := r.take(ctx, xs); err != nil {
				failed = true
				r.takeFailures.Add(1)
				r.log.Warn("cluster: messages from another node not taken; retrying", "stream", xs.Stream, "error", err)
				if !fail(nil) {
					return
				}
			}
		}
		if !failed {
			backoff = 50 * time.Millisecond
			if end { // every stream was read to its end as it was when the read began, and taken
				r.drained.Add(1)
			}
		}
	}
}

// take routes one read of a stream: begun together (one group commit),
// finished in order. Each message is written with a mark that it was
// taken; the stream's position then moves over the marks in order, in one
// more write that also removes them. A message that fails (this node's
// disk is low, say) stops the position: the ones after it that were taken
// keep their marks (ahead), are not taken again when it is retried, also
// after a crash, and the position passes them once it is taken.
func (r *Router) take(ctx context.Context, xs redis.XStream) error {
	stream := xs.Stream
	ahead := r.ahead[stream]
	prev := r.cursors[stream]
	type entry struct {
		id      string
		p       *engine.Pending // nil: nothing to write (damaged, or taken before)
		damaged bool
	}
	entries := make([]entry, 0, len(xs.Messages))
	origin, epoch, originOK := r.streamOrigin(stream) // each entry's identity: origin, epoch, its id
	for _, x := range xs.Messages {
		if ahead[x.ID] {
			entries = append(entries, entry{id: x.ID})
			continue
		}
		raw, _ := x.Values["m"].(string)
		rawScope, _ := x.Values["s"].(string)
		m, err := engine.DecodeMessage([]byte(raw))
		var sc *engine.Scope
		if err == nil {
			sc, err = decodeScope(rawScope)
		}
		if err != nil {
			r.damaged.Add(1)
			r.log.Warn("cluster: a forwarded message does not decode; skipped", "stream", stream, "id", x.ID, "error", err)
			entries = append(entries, entry{id: x.ID, damaged: true})
			continue
		}
		if originOK {
			seq, _ := splitStreamID(x.ID)
			m.SetOrigin(engine.Identity(origin, epoch, seq))
		}
		mark := storage.Set(storage.TakenMarkKey(stream, x.ID), nil)
		entries = append(entries, entry{id: x.ID, p: r.eng.BeginRemote(m, []storage.Op{mark}, sc)})
	}
	var first error
	cur := prev
	var done []storage.Op // the marks the position passes
	for _, e := range entries {
		switch {
		case e.p == nil:
			if first == nil {
				cur = e.id
				if !e.damaged {
					done = append(done, storage.Delete(storage.TakenMarkKey(stream, e.id)))
					delete(ahead, e.id)
				}
			}
		case first != nil:
			if _, err := e.p.Finish(); err == nil {
				if ahead == nil {
					ahead = map[string]bool{}
					r.ahead[stream] = ahead
				}
				ahead[e.id] = true
				r.received.Add(1)
			}
		default:
			if _, err := e.p.Finish(); err != nil {
				first = err
				continue
			}
			cur = e.id
			done = append(done, storage.Delete(storage.TakenMarkKey(stream, e.id)))
			r.received.Add(1)
		}
	}
	if len(ahead) == 0 {
		delete(r.ahead, stream)
	}
	if cur != prev {
		// Not waited for: the marks written with the messages say what was
		// taken, so a position lost in a crash costs a read, not a message.
		r.db.WriteAsync(append(done, storage.Set(storage.CursorKey(stream), []byte(cur)))...)
		r.cursors[stream] = cur
		// Taken for good: the stream need not keep them, and the origin
		// may let go of its copies.
		if ms, _, ok := strings.Cut(cur, "-"); ok {
			if seq, err := strconv.ParseUint(ms, 10, 64); err == nil {
				tctx, cancel := context.WithTimeout(ctx, 2*time.Second)
				p := r.n.rdb.Pipeline()
				p.XTrimMinID(tctx, stream, strconv.FormatUint(seq+1, 10)+"-0")
				p.Set(tctx, r.takenKey(stream), seq, 0)
				_, err := p.Exec(tctx)
				cancel()
				r.n.Report(err)
			}
		}
	}
	return first
}

// publishTaken tells the origins again how far this node took their
// streams (a SET after taking may have been lost with Redis).
func (r *Router) publishTaken(ctx context.Context) {
	if len(r.cursors) == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	p := r.n.rdb.Pipeline()
	for stream, id := range r.cursors {
		if ms, _, ok := strings.Cut(id, "-"); ok {
			p.Set(ctx, r.takenKey(stream), ms, 0)
		}
	}
	_, err := p.Exec(ctx)
	r.n.Report(err)
}

// syncRetained takes the cluster's retained messages this node lacks or
// holds older copies of (a node joining, or back after a long absence).
func (r *Router) syncRetained() {
	ctx, cancel := context.WithTimeout(r.n.ctx, 5*time.Second)
	defer cancel()
	all, err := r.n.rdb.HGetAll(ctx, r.n.Key("retained")).Result()
	r.n.Report(err)
	if err != nil {
		r.log.Warn("cluster: the cluster's retained messages were not read; this node has only its own", "error", err)
		return
	}
	n, failed := 0, 0
	for _, v := range all {
		m, err := engine.DecodeMessage([]byte(v))
		if err != nil {
			r.damaged.Add(1)
			continue
		}
		if err := r.eng.SetRetained(m); err != nil {
			failed++
			continue
		}
		n++
	}
	if failed > 0 {
		r.log.Warn("cluster: some of the cluster's retained messages were not stored here; read again when Redis next comes back",
			"stored", n, "failed", failed)
		return
	}
	r.retainedSynced.Store(true)
	if n > 0 {
		r.log.Info("cluster: retained messages read", "retained", n)
	}
}

// Wants returns the other nodes with a filter (shared or not) matching
// topic now, sorted.
func (r *Router) Wants(topic string) []string {
	ms := new(topics.Matches)
	r.rmu.RLock()
	r.remote.Match(topic, "", ms)
	r.rmu.RUnlock()
	var ids []string
	for _, d := range ms.Direct {
		ids = appendNew(ids, d.Client)
	}
	for _, g := range ms.Shared {
		for _, sub := range g.Members {
			ids = appendNew(ids, sub.Client)
		}
	}
	slices.Sort(ids)
	return ids
}

// Nodes returns the other nodes this one knows of, sorted.
func (r *Router) Nodes() []string {
	r.rmu.RLock()
	defer r.rmu.RUnlock()
	ids := make([]string, 0, len(r.known))
	for id := range r.known {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	return ids
}

// ID is this node's id.
func (r *Router) ID() string { return r.n.ID() }

// NodeUp reports whether node id was alive at the last look (every
// five seconds); a node not looked at yet counts as up.
func (r *Router) NodeUp(id string) bool {
	r.rmu.RLock()
	defer r.rmu.RUnlock()
	a, seen := r.alive[id]
	return a || !seen
}

// Up reports whether Redis answers this node.
func (r *Router) Up() bool { return r.n.Up() }
