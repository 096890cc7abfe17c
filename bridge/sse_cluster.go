package bridge

import (
	"context"
	"errors"
	"slices"
	"sync"
	"time"

	"github.com/beaconmq/beacon/hooks"
)

// ClusterHistory is what a node of a cluster gives the browser feeds:
// the other nodes' own messages, for a reader that resumes here from a
// cursor made elsewhere (cursor.go).
type ClusterHistory interface {
	ID() string      // this node
	Nodes() []string // the other nodes known
	NodeUp(id string) bool
	Up() bool // Redis answers
	// AwaitInterest waits (bounded) until the filters this node's feeds
	// follow are in Redis, so other nodes forward what matches them.
	AwaitInterest(wait time.Duration)
	// Page asks node for a page of its own messages (hooks.OwnPage); it
	// makes sure node forwards what the filters match here before it
	// takes the page's end.
	Page(ctx context.Context, node string, q hooks.PageQuery) (hooks.Page, error)
}

// Reasons a node's part of a cluster cursor cannot be replayed, beside
// the hooks.Reset ones.
const ResetNodeUnavailable = "node_unavailable" // the node is down or did not answer: its messages since are not replayed

// nodeReset is a node whose messages after the cursor were not replayed,
// and why.
type nodeReset struct {
	Node   string `json:"node"`
	Reason string `json:"reason"`
}

// clusterFeed is a reader's cursor while it reads on this node.
type clusterFeed struct {
	self  string
	epoch uint32
	keeps func(topic string) bool // a history rule records the topic: a replay has it
	cur   cursor
	// done is, per node, the seq a replay from the node covered: a live
	// message up to it was replayed already.
	done map[string]nodePos
}

// newFeed starts the cursor of a reader that resumes from lastID (""
// for a new reader) on a watch at from. reset says why lastID cannot be
// resumed from; the reader then starts from now.
func (s *Streams) newFeed(lastID string, from uint64) (f *clusterFeed, replay bool, reset string) {
	f = &clusterFeed{self: s.Cluster.ID(), epoch: hooks.EpochTag(s.History.Epoch()), keeps: s.History.Keeps, done: map[string]nodePos{}}
	fresh := func() {
		// As for a SUBACK: what the other nodes accept once the feed's
		// filters reached them comes here.
		s.Cluster.AwaitInterest(2 * time.Second)
		f.cur = cursor{since: time.Now().UnixMilli(), pos: map[string]nodePos{}}
		f.cur.through(f.self, f.epoch, from)
	}
	switch {
	case lastID == "":
		fresh()
		return f, false, ""
	case isCursor(lastID):
		c, err := parseCursor(lastID)
		if err != nil {
			s.resets.Add(1)
			fresh()
			return f, false, hooks.ResetUnknown
		}
		f.cur = c
		return f, true, ""
	}
	// An id of this node from before it joined the cluster: its place
	// here, and the other nodes' messages since its time.
	seq, err := s.History.ParseID(lastID)
	if err == nil {
		err = s.History.CanReplay(seq, nil)
	}
	var re *hooks.ErrReset
	if errors.As(err, &re) {
		s.resets.Add(1)
		fresh()
		return f, false, re.Reason
	}
	since, ok := s.History.TimeOf(seq)
	if !ok {
		since = time.Now().UnixMilli()
	}
	f.cur = cursor{since: since, pos: map[string]nodePos{}}
	f.cur.through(f.self, f.epoch, seq)
	return f, true, ""
}

// live reports whether a live record goes to the reader (it was not
// replayed), moving the cursor over it; id is the cursor after it.
func (f *clusterFeed) live(rec *hooks.Record) (id string, ok bool) {
	node, ep, seq, own, parsed := originOf(rec, f.self, f.epoch)
	if !parsed {
		return f.cur.String(), true
	}
	// A replay has only recorded messages: one no rule records is live
	// only.
	if d, replayed := f.done[node]; replayed && d.epoch == ep && seq <= d.s1 && f.keeps(rec.Topic) {
		return "", false
	}
	f.cur.seen(node, ep, seq, hooks.Crosses0(rec), own)
	return f.cur.String(), true
}

// pageSource reads one node's own messages after the cursor, a page at
// a time.
type pageSource struct {
	node  string
	q     hooks.PageQuery
	page  hooks.Page
	i     int
	last  uint64 // the seq of the last record taken from it
	epoch uint32 // of the node's log, from its last page
	err   error  // the node did not answer
	get   func(ctx context.Context, q hooks.PageQuery) (hooks.Page, error)
}

func (p *pageSource) fetch(ctx context.Context) {
	page, err := p.get(ctx, p.q)
	if err != nil {
		p.err = err // the last page stays: what was taken of it counts
		return
	}
	p.page, p.epoch, p.i = page, page.Epoch, 0
}

// head is the source's next record, fetching the next page if needed;
// nil once it is done (or failed: err).
func (p *pageSource) head(ctx context.Context) *hooks.Record {
	for p.err == nil && p.page.Reset == "" {
		if p.i < len(p.page.Records) {
			return p.page.Records[p.i]
		}
		if !p.page.More {
			return nil
		}
		p.q.Known, p.q.Epoch, p.q.Upto = true, p.page.Epoch, p.page.Upto
		p.q.After0, p.q.After1 = max(p.q.After0, p.page.Next), max(p.q.After1, p.page.Next)
		p.fetch(ctx)
	}
	return nil
}

// replay calls fn for every message of every node the reader has not
// seen and filters match, this node's own up to upto (the watch's From),
// each node's in its order and all merged by time, with the cursor after
// each; it returns the nodes that could not be replayed. An error is
// this node's log failing, or ctx ending.
func (s *Streams) replay(ctx context.Context, f *clusterFeed, filters []string, upto uint64, fn func(rec *hooks.Record, id string) bool) ([]nodeReset, error) {
	var resets []nodeReset
	own := &pageSource{node: f.self, q: f.cur.query(f.self, filters), get: func(ctx context.Context, q hooks.PageQuery) (hooks.Page, error) {
		return s.History.OwnPage(ctx, q)
	}}
	own.q.Upto = upto
	sources := []*pageSource{own}
	// The nodes of the cluster: a node the cursor names that is not one
	// (removed, or never was) is dropped from it.
	names := s.Cluster.Nodes()
	for n := range f.cur.pos {
		if n == f.self || slices.Contains(names, n) {
			continue
		}
		if !s.Cluster.Up() {
			// Redis away: this node may not know the others yet. The
			// part is kept, and reported.
			resets = append(resets, nodeReset{Node: n, Reason: ResetNodeUnavailable})
			continue
		}
		delete(f.cur.pos, n)
	}
	if len(names) > 0 {
		// What this node's feed follows must reach the others before
		// they take their replay's end: what they accept after it is
		// forwarded here.
		s.Cluster.AwaitInterest(2 * time.Second)
	}
	for _, n := range names {
		if !s.Cluster.NodeUp(n) {
			resets = append(resets, nodeReset{Node: n, Reason: ResetNodeUnavailable})
			continue
		}
		node := n
		sources = append(sources, &pageSource{node: n, q: f.cur.query(n, filters), get: func(ctx context.Context, q hooks.PageQuery) (hooks.Page, error) {
			return s.Cluster.Page(ctx, node, q)
		}})
	}
	var wg sync.WaitGroup
	for _, src := range sources {
		wg.Add(1)
		go func() {
			defer wg.Done()
			src.fetch(ctx)
		}()
	}
	wg.Wait()
	if own.err != nil {
		return nil, own.err
	}
	for {
		var next *pageSource
		var rec *hooks.Record
		for _, src := range sources {
			r := src.head(ctx)
			if r != nil && (rec == nil || r.TS < rec.TS) {
				next, rec = src, r
			}
		}
		if own.err != nil {
			return nil, own.err
		}
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		if next == nil {
			break
		}
		next.i++
		next.last = rec.Seq
		f.cur.through(next.node, next.page.Epoch, rec.Seq)
		if !fn(rec, f.cur.String()) {
			return resets, ctx.Err()
		}
	}
	var unanswered []string
	for _, src := range sources {
		switch {
		case src.err != nil:
			resets = append(resets, nodeReset{Node: src.node, Reason: ResetNodeUnavailable})
			unanswered = append(unanswered, src.node)
			if src.last > 0 {
				// What came of it before the failure is not sent again live.
				f.done[src.node] = nodePos{epoch: src.epoch, s1: src.last}
			}
			continue
		case src.page.Reset != "":
			resets = append(resets, nodeReset{Node: src.node, Reason: src.page.Reset})
			f.cur.reset(src.node, src.page.Epoch, src.page.Upto)
		}
		// Everything of the node up to the replay's end is seen now; live
		// messages up to it came in the replay.
		f.cur.through(src.node, src.page.Epoch, src.page.Upto)
		f.done[src.node] = nodePos{epoch: src.page.Epoch, s1: src.page.Upto}
	}
	if len(resets) > 0 {
		s.resets.Add(1)
	}
	if len(unanswered) > 0 {
		s.warnUnanswered(unanswered)
	}
	return resets, nil
}

// warnUnanswered logs nodes that did not answer a replay, at most once
// every 10 s (a storm of readers resuming while a node is down would
// otherwise log once per reader).
func (s *Streams) warnUnanswered(nodes []string) {
	now := time.Now().UnixNano()
	last := s.unansweredAt.Load()
	if now-last < int64(10*time.Second) || !s.unansweredAt.CompareAndSwap(last, now) {
		s.unansweredSuppressed.Add(1)
		return
	}
	s.Log.Warn("cluster replay: nodes did not answer; their messages after the readers' cursors are not replayed",
		"nodes", nodes, "suppressed", s.unansweredSuppressed.Swap(0))
}
