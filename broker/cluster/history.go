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
//	                                          it accepts from now on goes to
//	                                          B), waits for routes under way,
//	                                          takes its log's head as the end
//	B <--- PUBLISH ctl:B {pageok, token, page}
//	B: live messages of O up to the end came in the replay: dropped
//
// Pages are small (hooks: 512 records, 512 KiB) and a node has few
// requests out at once, so a reconnect storm cannot fill a pub/sub
// connection's output buffer in Redis.

const (
	pageWait = 5 * time.Second // for an answer
	// routeSettle is how long a node waits, once it knows a reader's
	// interest, before it takes its replay's end: a message routed just
	// before (without the interest) and numbered just after would be in
	// neither the replay nor the live feed.
	routeSettle = 50 * time.Millisecond
	pagesOut    = 4 // requests a node has out at once
	pagesServed = 2 // requests a node answers at once
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
	if err := r.sendCtl(ctx, node, ctlMsg{Op: "page", From: r.n.ID(), Token: token, Query: &q}); err != nil {
		return hooks.Page{}, err
	}
	select {
	case c := <-ch:
		if c.Err != "" {
			return hooks.Page{}, errors.New(c.Err)
		}
		var p hooks.Page
		if err := json.Unmarshal(c.Page, &p); err != nil {
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
	ctx, cancel := context.WithTimeout(ctx, pageWait)
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
		// The replay's end is taken now: what is accepted after it must
		// be forwarded to the asker.
		if err = r.learnInterest(ctx, c.From, c.Query.Filters); err == nil {
			time.Sleep(routeSettle)
		}
	}
	var p hooks.Page
	if err == nil {
		p, err = pager(ctx, *c.Query)
	}
	if err == nil {
		reply.Page, err = json.Marshal(p)
	}
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
