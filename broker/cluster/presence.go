package cluster

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/beaconmq/beacon/devices"
)

// Keys of device presence, under the prefix:
//
//	presence   hash: device id -> JSON {"<node id>": live connections, ...}
//	presence   channel: a device id whose entry changed

// presenceScript sets one node's count of a device (ARGV[3]) and drops the entries of nodes that are gone (ARGV[4...]), in one
// step, and returns the device's total connections before and after: the
// one caller that sees it go from 0 or to 0 is the one that says so.
var presenceScript = redis.NewScript(`
local v = redis.call('HGET', KEYS[1], ARGV[1])
local m = {}
if v then m = cjson.decode(v) end
local before = 0
for _, c in pairs(m) do before = before + c end
local n = tonumber(ARGV[3])
if n > 0 then m[ARGV[2]] = n else m[ARGV[2]] = nil end
for i = 4, #ARGV do m[ARGV[i]] = nil end
local after = 0
for _, c in pairs(m) do after = after + c end
if after == 0 then redis.call('HDEL', KEYS[1], ARGV[1]) else redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(m)) end
if v == false or before ~= after or after == 0 then redis.call('PUBLISH', KEYS[2], ARGV[1]) end
return {before, after, after - math.max(n, 0)}
`)

// PresenceOptions configure Presence.
type PresenceOptions struct {
	Registry *devices.Registry
	// Count is this node's live connections of a device; Counts all of
	// them by device (devices without one left out).
	Count  func(device string) int
	Counts func() map[string]int
	// Publish says a device went online or offline cluster-wide; it is
	// called by exactly one node for each such change (the node whose
	// update, or whose removal of a dead node's entries, made it), or by
	// each node for its own changes while Redis is away. It must not block.
	Publish func(device string, online bool)
	// Check is how often the entries of nodes that died are looked for
	// (twice the node's heartbeat if 0).
	Check time.Duration
}

// Presence keeps a device online in every node's registry while any node
// has a connection of it.
type Presence struct {
	n    *Node
	opts PresenceOptions
	log  *slog.Logger

	wmu sync.Mutex // one write of this node's counts at a time, the count read under it

	mu      sync.Mutex
	dirty   map[string]struct{}
	leaving bool
	wake    chan struct{}
	synced  chan struct{}
	once    sync.Once
}

// NewPresence follows presence cluster-wide; call it before Start of the node.
func NewPresence(n *Node, opts PresenceOptions) *Presence {
	if opts.Check <= 0 {
		opts.Check = 2 * n.opts.Heartbeat
	}
	p := &Presence{n: n, opts: opts, log: n.log.With("state", "presence"), dirty: map[string]struct{}{},
		wake: make(chan struct{}, 1), synced: make(chan struct{})}
	n.Subscribe(n.Key("presence"), func(ctx context.Context) { p.sync(ctx, true) }, p.changed)
	n.Go(p.write)
	n.Go(p.watch)
	return p
}

// Synced is closed after the first full read of presence from Redis.
func (p *Presence) Synced() <-chan struct{} { return p.synced }

// Changed tells that a connection of device came or went on this node.
// It does not block: the count is written by the node's goroutine.
func (p *Presence) Changed(device string) {
	p.mu.Lock()
	p.dirty[device] = struct{}{}
	p.mu.Unlock()
	select {
	case p.wake <- struct{}{}:
	default:
	}
}

func (p *Presence) write(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-p.wake:
		}
		p.mu.Lock()
		batch := p.dirty
		p.dirty = map[string]struct{}{}
		leaving := p.leaving
		p.mu.Unlock()
		if leaving || len(batch) == 0 {
			continue
		}
		for id := range batch {
			if !p.n.Up() {
				p.fallback(id)
				continue // written by the resync when Redis is back
			}
			if err := p.set(ctx, id, false); err != nil {
				p.n.Report(err)
				p.fallback(id)
			}
		}
	}
}

// fallback says what this node knows while Redis is away.
func (p *Presence) fallback(id string) {
	if d, err := p.opts.Registry.Get(id); err == nil {
		p.opts.Publish(id, d.Online)
	}
}

// set writes this node's count of device id now (0 when it leaves),
// drops the entries of the dead nodes, and publishes a cluster-wide change
// it made. The count is read under wmu, so a later connection change is
// written after it, never before.
func (p *Presence) set(ctx context.Context, id string, leave bool, dead ...string) error {
	ctx, cancel := context.WithTimeout(ctx, opTimeout)
	defer cancel()
	p.wmu.Lock()
	defer p.wmu.Unlock()
	p.mu.Lock()
	left := p.leaving
	p.mu.Unlock()
	if left && !leave {
		return nil
	}
	count := 0
	if !leave {
		count = p.opts.Count(id)
	}
	args := append([]any{id, p.n.ID(), count}, toAny(dead)...)
	res, err := presenceScript.Run(ctx, p.n.rdb, []string{p.n.Key("presence"), p.n.Key("presence")}, args...).Int64Slice()
	if err != nil {
		return err
	}
	if len(res) == 3 {
		// What the other nodes have, as of this write: a device that
		// moved here from another node (or away) is not taken for offline
		// until that node's announcement arrives.
		p.opts.Registry.SetRemoteOnline(id, res[2] > 0)
		switch before, after := res[0], res[1]; {
		case before == 0 && after > 0:
			p.opts.Publish(id, true)
		case before > 0 && after == 0:
			p.opts.Publish(id, false)
		}
	}
	return nil
}

func toAny(s []string) []any {
	out := make([]any, len(s))
	for i, v := range s {
		out[i] = v
	}
	return out
}

// changed follows one device's entry (changed by any node).
func (p *Presence) changed(id string) {
	ctx, cancel := context.WithTimeout(p.n.ctx, opTimeout)
	defer cancel()
	v, err := p.n.rdb.HGet(ctx, p.n.Key("presence"), id).Result()
	if errors.Is(err, redis.Nil) {
		v, err = "", nil
	}
	if err != nil {
		p.n.Report(err)
		return
	}
	p.opts.Registry.SetRemoteOnline(id, p.elsewhere(decodeCounts(v), nil))
}

func decodeCounts(v string) map[string]int {
	m := map[string]int{}
	if v != "" {
		_ = json.Unmarshal([]byte(v), &m)
	}
	return m
}

// elsewhere reports whether a node other than this one (and not dead) has
// a connection.
func (p *Presence) elsewhere(m map[string]int, dead map[string]bool) bool {
	for node, c := range m {
		if node != p.n.ID() && c > 0 && !dead[node] {
			return true
		}
	}
	return false
}

// watch looks for the entries of nodes that died (their liveness key
// expired) and removes them, and writes this node's counts again where
// Redis lost or missed them.
//
// The whole hash is read only when a node that was alive is gone, when
// this node's own key was missing, and once a minute besides; otherwise a
// check costs one look at the nodes.
func (p *Presence) watch(ctx context.Context) {
	t := time.NewTicker(p.opts.Check)
	defer t.Stop()
	var prev map[string]NodeInfo
	last := time.Now()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if !p.n.Up() {
			prev = nil
			continue
		}
		nctx, cancel := context.WithTimeout(ctx, opTimeout)
		alive, err := p.n.Nodes(nctx)
		cancel()
		if err != nil {
			p.n.Report(err)
			prev = nil
			continue
		}
		_, self := alive[p.n.ID()]
		full := prev == nil || !self || time.Since(last) > time.Minute
		for id := range prev {
			if _, ok := alive[id]; !ok {
				full = true
			}
		}
		prev = alive
		if full {
			p.sync(ctx, false)
			last = time.Now()
		}
	}
}

// sync reads every entry: this node's counts are written where they
// differ, the dead nodes' entries dropped, and the registry told where
// devices are online elsewhere.
func (p *Presence) sync(ctx context.Context, first bool) {
	p.mu.Lock()
	leaving := p.leaving
	p.mu.Unlock()
	if leaving {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, 2*opTimeout)
	defer cancel()
	alive, err := p.n.Nodes(ctx)
	if err != nil {
		p.n.Report(err)
		return
	}
	all, err := p.n.rdb.HGetAll(ctx, p.n.Key("presence")).Result()
	if err != nil {
		p.n.Report(err)
		return
	}
	local := p.opts.Counts()
	remote := map[string]bool{}
	for id, v := range all {
		m := decodeCounts(v)
		var dead []string
		deadSet := map[string]bool{}
		for node := range m {
			if _, ok := alive[node]; !ok && node != p.n.ID() {
				dead = append(dead, node)
				deadSet[node] = true
			}
		}
		if len(dead) > 0 || m[p.n.ID()] != local[id] {
			if err := p.set(ctx, id, false, dead...); err != nil {
				p.n.Report(err)
				return
			}
			if len(dead) > 0 {
				p.log.Info("cluster: presence of nodes that are gone removed", "device", id, "nodes", dead)
			}
		}
		remote[id] = p.elsewhere(m, deadSet)
	}
	for id, c := range local {
		if _, ok := all[id]; !ok && c > 0 {
			if err := p.set(ctx, id, false); err != nil {
				p.n.Report(err)
				return
			}
		}
	}
	for _, d := range p.opts.Registry.List(nil) {
		p.opts.Registry.SetRemoteOnline(d.ID, remote[d.ID])
	}
	if first {
		p.once.Do(func() { close(p.synced) })
	}
}

// Leave removes this node's entries (a clean shutdown): the devices that
// had no connection elsewhere go offline, said by this node. Later
// connection changes are not written.
func (p *Presence) Leave(ctx context.Context) error {
	p.mu.Lock()
	p.leaving = true
	p.mu.Unlock()
	if !p.n.Up() {
		return errors.New("redis unreachable: this node's presence expires with its liveness key")
	}
	all, err := p.n.rdb.HGetAll(ctx, p.n.Key("presence")).Result()
	if err != nil {
		return err
	}
	for id, v := range all {
		if _, ok := decodeCounts(v)[p.n.ID()]; ok {
			if err := p.set(ctx, id, true); err != nil {
				return err
			}
		}
	}
	return nil
}
