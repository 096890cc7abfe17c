package cluster

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
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
	BeginRemote(m *engine.Message, ops []storage.Op) *engine.Pending
	SetRetained(m *engine.Message) error
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
	Pending        int    // durable messages waiting to be forwarded
	PendingInStore int    // of those, not held in memory (read back from the log)
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
	imu      sync.Mutex
	local    map[string]int
	dirty    map[string]bool // key -> added
	iwake    chan struct{}
	fullPush atomic.Bool

	// The other nodes' filters: a subscription index whose clients are node ids.
	rmu    sync.RWMutex
	remote *topics.Index
	known  map[string]bool // every other node seen (retained messages go to all)

	// Forwarding, in seq order.
	fmu     sync.Mutex
	pending []*forward
	bodies  int // pending entries holding their message
	fwake   chan struct{}
	live    chan liveMsg

	announced map[string]bool // destinations whose inbox set names our stream (forwarder goroutine)

	// Taking.
	cursors map[string]string // stream -> last id taken (inbox goroutine)

	forwarded, forwardedLive, liveDropped, received, receivedLive, damaged, missing atomic.Uint64
}

type forward struct {
	seq   uint64
	m     *engine.Message // nil: read it back from the log
	nodes []string
	state int8 // 0 writing, 1 committed, -1 failed
}

type liveMsg struct {
	body  []byte
	nodes []string
}

// NewRouter makes the router of node n over the node's log and store.
func NewRouter(n *Node, lg LogStore, db DB) *Router {
	return &Router{n: n, lg: lg, db: db, log: n.log, epoch: lg.Epoch(),
		local: map[string]int{}, dirty: map[string]bool{}, iwake: make(chan struct{}, 1),
		remote: topics.NewIndex(), known: map[string]bool{},
		fwake: make(chan struct{}, 1), live: make(chan liveMsg, 4096),
		announced: map[string]bool{}, cursors: map[string]string{}}
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
		nodes := strings.Fields(string(v))
		if len(nodes) == 0 {
			return nil
		}
		if !r.lg.TryRef(seq) {
			gone = append(gone, storage.Delete(storage.ForwardKey(seq)))
			r.missing.Add(1)
			return nil
		}
		r.pending = append(r.pending, &forward{seq: seq, nodes: nodes, state: 1})
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
		r.cursors[string(k[len(storage.CursorPrefix()):])] = string(v)
		return nil
	})
	return len(r.pending), err
}

// Start begins forwarding and taking, with eng the engine messages from
// other nodes go to. Retained messages the cluster holds that this node
// lacks (or holds older) are taken first, if Redis answers.
func (r *Router) Start(eng Engine) {
	r.eng = eng
	r.fullPush.Store(true)
	r.syncRetained()
	r.n.OnUp(func() {
		r.fullPush.Store(true)
		select {
		case r.iwake <- struct{}{}:
		default:
		}
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
	p, held := len(r.pending), r.bodies
	r.fmu.Unlock()
	return Stats{Forwarded: r.forwarded.Load(), ForwardedLive: r.forwardedLive.Load(), LiveDropped: r.liveDropped.Load(),
		Received: r.received.Load(), ReceivedLive: r.receivedLive.Load(), Damaged: r.damaged.Load(), Missing: r.missing.Load(),
		Pending: p, PendingInStore: p - held}
}

// Route is the engine's: the other nodes a message accepted here goes
// to. A retained message goes to every node (each keeps the cluster's
// retained messages); others to the nodes with a matching filter.
func (r *Router) Route(m *engine.Message) engine.Remote {
	var nodes []string
	r.rmu.RLock()
	if m.Retain {
		for id := range r.known {
			nodes = append(nodes, id)
		}
	} else if r.remote.Len() > 0 {
		ms := matchesPool.Get().(*topics.Matches)
		r.remote.Match(m.Topic, "", ms)
		for i := range ms.Direct {
			nodes = append(nodes, ms.Direct[i].Client)
		}
		for i := range ms.Shared {
			for _, s := range ms.Shared[i].Members {
				nodes = appendNew(nodes, s.Client)
			}
		}
		matchesPool.Put(ms)
	}
	r.rmu.RUnlock()
	if len(nodes) == 0 {
		return nil
	}
	return &route{r: r, nodes: nodes, durable: m.QoS > 0 || m.Retain}
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

// route is one message's way out (engine.Remote).
type route struct {
	r       *Router
	nodes   []string
	durable bool
	f       *forward
}

func (rt *route) Durable() bool { return rt.durable }

// Queued records, in the message's own write, that it is still to be
// forwarded, and queues it in seq order.
func (rt *route) Queued(m *engine.Message, seq uint64) []storage.Op {
	r := rt.r
	f := &forward{seq: seq, m: m, nodes: rt.nodes}
	r.fmu.Lock()
	if r.bodies >= r.n.opts.ForwardBuffer {
		f.m = nil // read back from the log when its turn comes
	} else {
		r.bodies++
	}
	r.pending = append(r.pending, f)
	r.fmu.Unlock()
	rt.f = f
	return []storage.Op{storage.Set(storage.ForwardKey(seq), []byte(strings.Join(rt.nodes, "\n")))}
}

func (rt *route) Done(m *engine.Message, err error) {
	r := rt.r
	if !rt.durable {
		select {
		case r.live <- liveMsg{body: engine.EncodeMessage(m), nodes: rt.nodes}:
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
		rt.f.state = -1 // the engine gave back its reference
	} else {
		rt.f.state = 1
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

// streamKey is the stream of this node's messages to dest.
func (r *Router) streamKey(dest string) string {
	return r.n.Key("fwd", dest, r.n.ID(), strconv.FormatUint(r.epoch, 16))
}

const forwardBatch = 256

// forwardLoop writes committed messages to their destinations' streams
// in seq order, then lets go of their records.
func (r *Router) forwardLoop(ctx context.Context) {
	backoff := 50 * time.Millisecond
	for {
		batch := r.takeBatch()
		if len(batch) == 0 {
			select {
			case <-ctx.Done():
				return
			case <-r.fwake:
			}
			continue
		}
		err := r.send(ctx, batch)
		r.n.Report(err)
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			r.announced = map[string]bool{}
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
				r.bodies--
			}
		}
		r.pending = r.pending[len(batch):]
		if len(r.pending) == 0 {
			r.pending = nil
		}
		r.fmu.Unlock()
		dels := make([]storage.Op, 0, len(batch))
		for _, f := range batch {
			dels = append(dels, storage.Delete(storage.ForwardKey(f.seq)))
		}
		r.db.WriteAsync(dels...)
		for _, f := range batch {
			r.lg.Unref(f.seq)
		}
	}
}

// takeBatch returns the committed messages at the head of the queue
// (dropping failed writes), up to forwardBatch; none while the head's
// write is still going.
func (r *Router) takeBatch() []*forward {
	r.fmu.Lock()
	defer r.fmu.Unlock()
	for len(r.pending) > 0 && r.pending[0].state < 0 {
		if r.pending[0].m != nil {
			r.bodies--
		}
		r.pending = r.pending[1:]
	}
	n := 0
	for n < len(r.pending) && n < forwardBatch && r.pending[n].state == 1 {
		n++
	}
	return append([]*forward(nil), r.pending[:n]...)
}

// send writes one batch in one round trip. An entry a stream already
// has (sent before a crash or a lost reply) is refused by Redis as not
// newer than its last id: that is success.
func (r *Router) send(ctx context.Context, batch []*forward) error {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	p := r.n.rdb.Pipeline()
	var xadds []*redis.StringCmd
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
			body, topic, retain = engine.EncodeLogMessage(&lm), lm.Topic, lm.Retain
		}
		for _, dest := range f.nodes {
			stream := r.streamKey(dest)
			if !r.announced[dest] {
				p.SAdd(ctx, r.n.Key("inbox", dest), stream)
			}
			xadds = append(xadds, p.XAdd(ctx, &redis.XAddArgs{Stream: stream, ID: fmt.Sprintf("%d-0", f.seq), Values: []any{"m", body}}))
		}
		if retain {
			lm, _ := storage.DecodeRetained(body)
			if len(lm.Payload) == 0 {
				p.HDel(ctx, r.n.Key("retained"), topic)
			} else {
				p.HSet(ctx, r.n.Key("retained"), topic, body)
			}
		}
	}
	if len(xadds) == 0 {
		return nil
	}
	_, err := p.Exec(ctx)
	if err != nil && !isStale(err) {
		return err
	}
	for _, c := range xadds {
		if err := c.Err(); err != nil && !isStale(err) {
			return err
		}
	}
	for _, f := range batch {
		for _, dest := range f.nodes {
			r.announced[dest] = true
		}
	}
	r.forwarded.Add(uint64(len(xadds)))
	return nil
}

// isStale is Redis refusing an entry id not above the stream's last.
func isStale(err error) bool {
	return err != nil && strings.Contains(err.Error(), "equal or smaller than the target stream top item")
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
			for _, dest := range lm.nodes {
				p.Publish(sctx, r.n.Key("live", dest), lm.body)
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

// takeLive routes a QoS 0 message another node sent.
func (r *Router) takeLive(payload string) {
	m, err := engine.DecodeMessage([]byte(payload))
	if err != nil {
		r.damaged.Add(1)
		return
	}
	if _, err := r.eng.BeginRemote(m, nil).Finish(); err == nil {
		r.receivedLive.Add(1)
	}
}

// inboxLoop takes the messages other nodes wrote to this node's
// streams, in order, each written here with the stream's new position in
// the same write: taken once, also across crashes.
func (r *Router) inboxLoop(ctx context.Context) {
	var streams []string
	var listed time.Time
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
		if time.Since(listed) > time.Second || len(streams) == 0 {
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
			if len(streams) == 0 {
				select {
				case <-ctx.Done():
					return
				case <-time.After(time.Second):
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
		res, err := r.n.rdb.XRead(ctx, &redis.XReadArgs{Streams: args, Count: forwardBatch, Block: time.Second}).Result()
		if errors.Is(err, redis.Nil) {
			r.n.Report(nil)
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
		backoff = 50 * time.Millisecond
		for _, xs := range res {
			if err := r.take(ctx, xs); err != nil {
				r.log.Warn("cluster: messages from another node not taken; retrying", "stream", xs.Stream, "error", err)
				if !fail(nil) {
					return
				}
			}
		}
	}
}

// take routes one read of a stream: begun together (one group commit),
// finished in order. The cursor moves past the last one taken before
// the first that failed.
func (r *Router) take(ctx context.Context, xs redis.XStream) error {
	var begun []*engine.Pending
	var ids []string
	for _, x := range xs.Messages {
		op := storage.Set(storage.CursorKey(xs.Stream), []byte(x.ID))
		raw, _ := x.Values["m"].(string)
		m, err := engine.DecodeMessage([]byte(raw))
		if err != nil {
			r.damaged.Add(1)
			r.log.Warn("cluster: a forwarded message does not decode; skipped", "stream", xs.Stream, "id", x.ID, "error", err)
			if err := r.db.Write(op); err != nil {
				return err
			}
			r.cursors[xs.Stream] = x.ID
			continue
		}
		begun = append(begun, r.eng.BeginRemote(m, []storage.Op{op}))
		ids = append(ids, x.ID)
	}
	var first error
	for i, p := range begun {
		_, err := p.Finish()
		if err != nil && first == nil {
			first = err
		}
		if first == nil {
			r.cursors[xs.Stream] = ids[i]
			r.received.Add(1)
		}
	}
	if id := r.cursors[xs.Stream]; id != "" {
		// Taken for good: the stream need not keep them.
		tctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		if ms, _, ok := strings.Cut(id, "-"); ok {
			if seq, err := strconv.ParseUint(ms, 10, 64); err == nil {
				_ = r.n.rdb.XTrimMinID(tctx, xs.Stream, strconv.FormatUint(seq+1, 10)+"-0").Err()
			}
		}
		cancel()
	}
	return first
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
	n := 0
	for _, v := range all {
		m, err := engine.DecodeMessage([]byte(v))
		if err != nil {
			r.damaged.Add(1)
			continue
		}
		if err := r.eng.SetRetained(m); err != nil {
			r.log.Warn("cluster: retained message not stored", "error", err)
			return
		}
		n++
	}
	if n > 0 {
		r.log.Info("cluster: retained messages read", "retained", n)
	}
}

// Wants returns the other nodes that want messages on topic now (as
// Route would send a message that is not retained), sorted.
func (r *Router) Wants(topic string) []string {
	rt, _ := r.Route(&engine.Message{Topic: topic}).(*route)
	if rt == nil {
		return nil
	}
	slices.Sort(rt.nodes)
	return rt.nodes
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
