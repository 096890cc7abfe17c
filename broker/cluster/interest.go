package cluster

import (
	"context"
	"strings"
	"time"

	"github.com/beaconmq/beacon/broker/topics"
)

// interestKey names a filter in a node's interest hash: the filter, or
// $share/<group>/<filter> for a shared group.
func interestKey(filter, group string) string {
	if group == "" {
		return filter
	}
	return "$share/" + group + "/" + filter
}

func parseInterestKey(k string) (filter, group string) {
	if rest, ok := strings.CutPrefix(k, "$share/"); ok {
		if g, f, ok := strings.Cut(rest, "/"); ok {
			return f, g
		}
	}
	return k, ""
}

// Interest is the engine's: a filter gained its first local subscriber
// or lost its last. It only counts and marks; the pusher tells Redis.
func (r *Router) Interest(filter, group string, added bool) {
	r.interest(interestKey(filter, group), added)
}

// AddInterest and RemoveInterest count a filter wanted by something
// other than an MQTT session (a browser stream, a webhook), so messages
// to it are forwarded here too.
func (r *Router) AddInterest(filter string)    { r.interest(filter, true) }
func (r *Router) RemoveInterest(filter string) { r.interest(filter, false) }

func (r *Router) interest(key string, added bool) {
	r.imu.Lock()
	n, had := r.local[key]
	if added {
		n++
	} else {
		n--
	}
	switch {
	case n > 0:
		r.local[key] = n
		if !had {
			r.dirty[key] = true
			r.dirtyGen++
		}
	case had:
		delete(r.local, key)
		r.dirty[key] = false
		r.dirtyGen++
	}
	r.imu.Unlock()
	select {
	case r.iwake <- struct{}{}:
	default:
	}
}

// pushInterest keeps this node's interest hash in Redis equal to what
// its clients want: changes as they come, everything again after Redis
// was away.
func (r *Router) pushInterest(ctx context.Context) {
	backoff := 100 * time.Millisecond
	tick := time.NewTicker(5 * time.Second)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-r.iwake:
		case <-tick.C:
			r.refreshNodes(ctx)
		}
		for ctx.Err() == nil {
			err := r.pushOnce(ctx)
			r.n.Report(err)
			if err == nil {
				backoff = 100 * time.Millisecond
				break
			}
			r.fullPush.Store(true)
			select {
			case <-ctx.Done():
				return
			case <-time.After(backoff):
			}
			backoff = min(2*backoff, 2*time.Second)
		}
	}
}

// AwaitInterest is the engine's: it waits until what was reported before
// the call is in Redis (bounded by wait; not at all while Redis is away).
func (r *Router) AwaitInterest(wait time.Duration) {
	r.imu.Lock()
	want := r.dirtyGen
	r.imu.Unlock()
	if !r.n.Up() {
		return
	}
	t := time.NewTimer(wait)
	defer t.Stop()
	for {
		r.imu.Lock()
		done, ch := r.pushedGen >= want, r.pushed
		r.imu.Unlock()
		if done {
			return
		}
		select {
		case <-ch:
		case <-t.C:
			return
		case <-r.n.ctx.Done():
			return
		}
	}
}

// markPushed records that every change up to gen is in Redis.
func (r *Router) markPushed(gen uint64) {
	r.imu.Lock()
	if gen > r.pushedGen {
		r.pushedGen = gen
		close(r.pushed)
		r.pushed = make(chan struct{})
	}
	r.imu.Unlock()
}

func (r *Router) pushOnce(ctx context.Context) error {
	key, ch, self := r.n.Key("interest", r.n.ID()), r.n.Key("interest"), r.n.ID()
	if r.fullPush.Swap(false) {
		r.imu.Lock()
		gen := r.dirtyGen
		all := make([]any, 0, 2*len(r.local))
		for k := range r.local {
			all = append(all, k, "1")
		}
		clear(r.dirty)
		r.imu.Unlock()
		p := r.n.rdb.TxPipeline()
		p.Del(ctx, key)
		if len(all) > 0 {
			p.HSet(ctx, key, all...)
		}
		p.Publish(ctx, ch, self+" *")
		_, err := p.Exec(ctx)
		if err == nil {
			r.markPushed(gen)
		}
		return err
	}
	r.imu.Lock()
	gen := r.dirtyGen
	if len(r.dirty) == 0 {
		r.imu.Unlock()
		r.markPushed(gen)
		return nil
	}
	changes := make(map[string]bool, len(r.dirty))
	for k, v := range r.dirty {
		changes[k] = v
	}
	clear(r.dirty)
	r.imu.Unlock()
	p := r.n.rdb.Pipeline()
	for k, add := range changes {
		if add {
			p.HSet(ctx, key, k, "1")
			p.Publish(ctx, ch, self+" +"+k)
		} else {
			p.HDel(ctx, key, k)
			p.Publish(ctx, ch, self+" -"+k)
		}
	}
	if _, err := p.Exec(ctx); err != nil {
		r.fullPush.Store(true) // which of them arrived is unknown
		return err
	}
	r.markPushed(gen)
	return nil
}

// followInterest learns the other nodes' interest: all of it whenever
// the channel is (re)subscribed, then each change.
func (r *Router) followInterest() {
	r.n.Subscribe(r.n.Key("interest"), func(ctx context.Context) {
		if err := r.readAllInterest(ctx); err != nil {
			r.n.Report(err)
			r.log.Warn("cluster: read the other nodes' interest", "error", err)
		}
	}, func(payload string) {
		id, change, ok := strings.Cut(payload, " ")
		if !ok || id == r.n.ID() || change == "" {
			return
		}
		if change == "!" { // removed from the cluster (Forget)
			r.forgetNode(id)
			return
		}
		r.knowNode(id)
		switch change[0] {
		case '+':
			f, g := parseInterestKey(change[1:])
			r.rmu.Lock()
			r.remote.Subscribe(topics.Subscription{Client: id, Filter: f, Group: g, QoS: 2})
			r.rmu.Unlock()
		case '-':
			f, g := parseInterestKey(change[1:])
			r.rmu.Lock()
			r.remote.Unsubscribe(id, f, g)
			r.rmu.Unlock()
		case '*':
			ctx, cancel := context.WithTimeout(r.n.ctx, 5*time.Second)
			defer cancel()
			r.readInterest(ctx, id)
		}
	})
}

// readAllInterest rebuilds the other nodes' interest from Redis.
func (r *Router) readAllInterest(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	// Every node with an interest hash or a nodes entry, and those known
	// already: after Redis came back empty, a node's entries return one at
	// a time, and one announced before this subscription was made must
	// not be dropped.
	ids := map[string]bool{}
	listed, err := r.n.rdb.HKeys(ctx, r.n.Key("nodes")).Result()
	if err != nil {
		return err
	}
	for _, id := range listed {
		ids[id] = true
	}
	prefix := r.n.Key("interest") + ":"
	iter := r.n.rdb.Scan(ctx, 0, prefix+"*", 1000).Iterator()
	for iter.Next(ctx) {
		ids[strings.TrimPrefix(iter.Val(), prefix)] = true
	}
	if err := iter.Err(); err != nil {
		return err
	}
	r.rmu.RLock()
	for id := range r.known {
		ids[id] = true
	}
	r.rmu.RUnlock()
	delete(ids, r.n.ID())
	x := topics.NewIndex()
	for id := range ids {
		keys, err := r.n.rdb.HKeys(ctx, r.n.Key("interest", id)).Result()
		if err != nil {
			return err
		}
		for _, k := range keys {
			f, g := parseInterestKey(k)
			if topics.ValidFilter(f) {
				x.Subscribe(topics.Subscription{Client: id, Filter: f, Group: g, QoS: 2})
			}
		}
	}
	r.rmu.Lock()
	// A node whose hash is empty now (Redis came back without it) keeps
	// what it was known to want until it pushes again.
	for id := range ids {
		if len(x.Subscriptions(id)) == 0 {
			for _, sub := range r.remote.Subscriptions(id) {
				x.Subscribe(sub)
			}
		}
		r.known[id] = true
	}
	r.remote = x
	r.rmu.Unlock()
	return nil
}

// refreshNodes learns nodes that joined (retained messages go to every
// node, interested or not) and forgets those removed from the nodes hash;
// it notes which are alive (shared groups prefer those).
func (r *Router) refreshNodes(ctx context.Context) {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	ids, err := r.n.rdb.HKeys(ctx, r.n.Key("nodes")).Result()
	if err != nil {
		return
	}
	keys := make([]string, 0, len(ids))
	others := ids[:0]
	for _, id := range ids {
		if id != r.n.ID() {
			others = append(others, id)
			keys = append(keys, r.n.Key("node", id))
		}
	}
	alive := map[string]bool{}
	if len(keys) > 0 {
		vals, err := r.n.rdb.MGet(ctx, keys...).Result()
		if err != nil {
			return
		}
		for i, v := range vals {
			alive[others[i]] = v != nil
		}
	}
	now := time.Now()
	var appeared []string
	r.rmu.Lock()
	for id := range r.known {
		if _, ok := alive[id]; ok {
			delete(r.unlisted, id)
			continue
		}
		// Gone from the nodes hash: removed from the cluster (docs/cluster.md),
		// or Redis came back empty before the node's next heartbeat wrote
		// it again. Forgotten only once missing at every look for a while.
		since, seen := r.unlisted[id]
		if !seen {
			r.unlisted[id] = now
			alive[id] = false
			continue
		}
		if now.Sub(since) < forgetAfter {
			alive[id] = false
			continue
		}
		delete(r.unlisted, id)
		delete(r.known, id)
		r.remote.RemoveClient(id)
	}
	for id := range alive {
		if !r.known[id] {
			appeared = append(appeared, id)
		}
		r.known[id] = true
	}
	r.alive = alive
	r.rmu.Unlock()
	for _, id := range appeared {
		r.readInterest(ctx, id) // what it wants, should its announcement have come before
	}
}

// forgetAfter is how long a node must be missing from the nodes hash
// before the others forget it.
const forgetAfter = 30 * time.Second

// readInterest replaces what this node knows of node id's filters with
// its interest hash.
func (r *Router) readInterest(ctx context.Context, id string) {
	keys, err := r.n.rdb.HKeys(ctx, r.n.Key("interest", id)).Result()
	r.n.Report(err)
	if err != nil {
		return
	}
	r.rmu.Lock()
	r.remote.RemoveClient(id)
	for _, k := range keys {
		if f, g := parseInterestKey(k); topics.ValidFilter(f) {
			r.remote.Subscribe(topics.Subscription{Client: id, Filter: f, Group: g, QoS: 2})
		}
	}
	r.rmu.Unlock()
}

// forgetNode stops routing to node id, removed from the cluster.
func (r *Router) forgetNode(id string) {
	r.rmu.Lock()
	delete(r.known, id)
	delete(r.alive, id)
	delete(r.unlisted, id)
	r.remote.RemoveClient(id)
	r.rmu.Unlock()
}

func (r *Router) knowNode(id string) {
	r.rmu.RLock()
	ok := r.known[id]
	r.rmu.RUnlock()
	if !ok {
		r.rmu.Lock()
		r.known[id] = true
		r.rmu.Unlock()
	}
}
