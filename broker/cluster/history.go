package cluster

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/beaconmq/beacon/broker/topics"
	"github.com/beaconmq/beacon/hooks"
)

// Replays for browser readers that resume on another node (bridge's
// cluster cursors): the reader's node asks each other node, on its
// control channel, for pages of that node's own messages after the
// reader's cursor, and the node answers on the asker's channel.
//
//	B (reader here)                          O
//	AwaitInterest: the feed's filters are in Redis
//	PUBLISH ctl:O {page, token, query}  --->  reads B's interest in the
//	                                          filters from Redis (so what
//	                                          it routes from now on goes to
//	                                          B), waits until every message
//	                                          routed before has its seq
//	                                          (fence), takes its log's head
//	                                          as the end
//	B <--- PUBLISH ctl:B {pageok, token, page (or the key holding it)}
//	B: live messages of O up to the end came in the replay: dropped
//
// A page small enough goes in the answer; a larger one (records up to
// the largest packet) in a key of its own that the asker reads and
// deletes, so no answer comes near a pub/sub connection's output limit
// in Redis.

const (
	pageWait    = 5 * time.Second // for an answer
	pagesOut    = 16              // requests a node has out at once
	pagesServed = 4               // requests a node answers at once
	pageInline  = 64 << 10        // a larger page goes by a key of its own
	fenceWait   = 2 * time.Second // bounds the wait for routes under way
)

type pages struct {
	mu      sync.Mutex
	waiting map[string]chan ctlMsg
	pager   func(context.Context, hooks.PageQuery) (hooks.Page, error)
	out     chan struct{}
	serving chan struct{}
}

func (p *pages) init() {
	p.waiting = map[string]chan ctlMsg{}
	p.out = make(chan struct{}, pagesOut)
	p.serving = make(chan struct{}, pagesServed)
}

// SetPager sets how this node answers page queries: from its own
// messages (hooks.History.OwnPage). Without one it answers none.
func (r *Router) SetPager(fn func(context.Context, hooks.PageQuery) (hooks.Page, error)) {
	r.pg.mu.Lock()
	r.pg.pager = fn
	r.pg.mu.Unlock()
}

// Page asks node for a page of its own messages (bridge.ClusterHistory).
func (r *Router) Page(ctx context.Context, node string, q hooks.PageQuery) (hooks.Page, error) {
	ctx, cancel := context.WithTimeout(ctx, pageWait)
	defer cancel()
	select {
	case r.pg.out <- struct{}{}:
		defer func() { <-r.pg.out }()
	case <-ctx.Done():
		return hooks.Page{}, ctx.Err()
	}
	token := newToken()
	ch := make(chan ctlMsg, 1)
	r.pg.mu.Lock()
	r.pg.waiting[token] = ch
	r.pg.mu.Unlock()
	defer func() {
		r.pg.mu.Lock()
		delete(r.pg.waiting, token)
		r.pg.mu.Unlock()
	}()
	deadline, _ := ctx.Deadline()
	wait := max(1, time.Until(deadline).Milliseconds())
	if err := r.sendCtl(ctx, node, ctlMsg{Op: "page", From: r.n.ID(), Token: token, Query: &q, Wait: wait}); err != nil {
		return hooks.Page{}, err
	}
	select {
	case c := <-ch:
		if c.Err != "" {
			return hooks.Page{}, errors.New(c.Err)
		}
		body := []byte(c.Page)
		if c.Key != "" {
			p := r.n.rdb.TxPipeline()
			get := p.Get(ctx, c.Key)
			p.Del(ctx, c.Key)
			if _, err := p.Exec(ctx); err != nil {
				return hooks.Page{}, fmt.Errorf("a page from %s: %w", node, err)
			}
			body = []byte(get.Val())
		}
		var p hooks.Page
		if err := json.Unmarshal(body, &p); err != nil {
			return hooks.Page{}, fmt.Errorf("a page from %s: %w", node, err)
		}
		return p, nil
	case <-ctx.Done():
		return hooks.Page{}, fmt.Errorf("node %s did not answer a replay within %s", node, pageWait)
	}
}

// onPage takes a page request or answer on the control channel.
func (r *Router) onPage(c ctlMsg) {
	switch c.Op {
	case "pageok":
		r.pg.mu.Lock()
		ch := r.pg.waiting[c.Token]
		r.pg.mu.Unlock()
		if ch != nil {
			select {
			case ch <- c:
			default:
			}
		}
	case "page":
		if c.Query == nil || c.From == "" || c.Token == "" {
			return
		}
		r.n.Go(func(ctx context.Context) { r.servePage(ctx, c) })
	}
}

func (r *Router) servePage(ctx context.Context, c ctlMsg) {
	wait := pageWait
	if w := time.Duration(c.Wait) * time.Millisecond; w > 0 && w < wait {
		wait = w // the asker gives up then (a duration: the clocks may differ)
	}
	ctx, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	select {
	case r.pg.serving <- struct{}{}:
		defer func() { <-r.pg.serving }()
	case <-ctx.Done():
		return
	}
	r.pg.mu.Lock()
	pager := r.pg.pager
	r.pg.mu.Unlock()
	reply := ctlMsg{Op: "pageok", Token: c.Token}
	var err error
	if pager == nil {
		err = errors.New("no history here")
	}
	if err == nil && c.Query.Upto == 0 {
		// The replay's end is taken now: what is numbered after it must
		// be forwarded to the asker.
		if err = r.learnInterest(ctx, c.From, c.Query.Filters); err == nil {
			r.fence()
		}
	}
	var p hooks.Page
	if err == nil {
		p, err = pager(ctx, *c.Query)
	}
	var body []byte
	if err == nil {
		for _, rec := range p.Records {
			rec.Origin = r.identity(rec.Seq) // its name in the cluster, as forwarded ones carry it
		}
		body, err = json.Marshal(p)
	}
	if err == nil && len(body) > pageInline {
		reply.Key = r.n.Key("page", c.Token)
		err = r.n.rdb.Set(ctx, reply.Key, body, 2*pageWait).Err()
		body = nil
	}
	reply.Page = body
	if err != nil {
		reply.Err = err.Error()
	}
	if err := r.sendCtl(ctx, c.From, reply); err != nil {
		r.log.Debug("cluster: a replay page was not sent", "node", c.From, "error", err)
	}
}

// learnInterest reads from Redis which of filters node follows, and
// routes to it by them from now on.
func (r *Router) learnInterest(ctx context.Context, node string, filters []string) error {
	if len(filters) == 0 {
		return nil
	}
	vals, err := r.n.rdb.HMGet(ctx, r.n.Key("interest", node), filters...).Result()
	r.n.Report(err)
	if err != nil {
		return err
	}
	r.knowNode(node)
	r.rmu.Lock()
	for i, v := range vals {
		if v != nil && topics.ValidFilter(filters[i]) {
			r.remote.Subscribe(topics.Subscription{Client: node, Filter: filters[i], QoS: 2})
		}
	}
	r.rmu.Unlock()
	return nil
}

// Enter is the engine's: a message is being routed (Leave once it is
// numbered). Two counters, by the parity of a generation that fence
// moves on: fence waits for the old one to empty.
func (r *Router) Enter() uint64 {
	for {
		g := r.fgen.Load()
		r.fcount[g&1].Add(1)
		if r.fgen.Load() == g {
			return g
		}
		// A fence moved on meanwhile: count in the new generation, which
		// a later fence waits for.
		r.fcount[g&1].Add(-1)
	}
}

// Leave is the engine's: the message Enter counted has its seq.
func (r *Router) Leave(g uint64) { r.fcount[g&1].Add(-1) }

// fence waits until every message whose routing began before the call
// has its seq (bounded by fenceWait: a store that stalls longer lets the
// replay end early, which the live feed then misses).
func (r *Router) fence() {
	r.fmuFence.Lock()
	defer r.fmuFence.Unlock()
	old := r.fgen.Add(1) - 1
	deadline := time.Now().Add(fenceWait)
	for r.fcount[old&1].Load() > 0 {
		if time.Now().After(deadline) {
			r.log.Warn("cluster: messages under way did not get their seq in time; a browser replay may miss one", "wait", fenceWait)
			return
		}
		time.Sleep(50 * time.Microsecond)
	}
}
