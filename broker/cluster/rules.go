package cluster

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"

	"github.com/redis/go-redis/v9"
)

// Keys of the shared ACL rules, under the prefix:
//
//	acl   string: the text of the rules file last reloaded on any node
//	acl   channel: the rules changed (the payload is the id of the node)

// Rules shares the ACL rules: a reload on one node stores its rules
// file's text in Redis and every node applies it.
type Rules struct {
	n     *Node
	file  []byte                  // this node's rules file at start; nil: none
	apply func(text []byte) error // parses and applies; an error keeps the rules in force
	log   *slog.Logger

	mu      sync.Mutex
	current []byte // the text in force, as the cluster has it; nil: the node's own (file or defaults)
	first   bool   // the first sync is done
	synced  chan struct{}
}

// NewRules follows the cluster's rules: file is the text of this node's
// auth.acl_file (nil without one), apply parses and puts a text in force
// (called on the node's goroutine). Call it before Start of the node.
func NewRules(n *Node, file []byte, apply func(text []byte) error) *Rules {
	r := &Rules{n: n, file: file, apply: apply, log: n.log.With("state", "acl"), synced: make(chan struct{})}
	n.Subscribe(n.Key("acl"), r.sync, func(string) { r.read(n.ctx) })
	return r
}

// Synced is closed once the rules were read from Redis (or published to it).
func (r *Rules) Synced() <-chan struct{} { return r.synced }

// Publish makes text the cluster's rules (a reload on this node: the
// caller has parsed it and applies it itself). While Redis is away it
// fails and nothing changes, so that the nodes do not diverge.
func (r *Rules) Publish(text []byte) error {
	if !r.n.Up() {
		return errors.New("the cluster's redis is unreachable: rules not reloaded, so the nodes do not diverge")
	}
	ctx, cancel := context.WithTimeout(r.n.ctx, opTimeout)
	defer cancel()
	r.mu.Lock()
	defer r.mu.Unlock() // a notice handled meanwhile waits, and finds the text in force
	_, err := r.n.rdb.TxPipelined(ctx, func(p redis.Pipeliner) error {
		p.Set(ctx, r.n.Key("acl"), text, 0)
		p.Publish(ctx, r.n.Key("acl"), r.n.ID())
		return nil
	})
	if err != nil {
		r.n.Report(err)
		return fmt.Errorf("the cluster's redis: %w: rules not reloaded", err)
	}
	r.current = bytes.Clone(text)
	return nil
}

// sync runs at every (re)subscription: a cluster without rules gets this
// node's (those in force after a reload, or its file), otherwise this
// node takes the cluster's.
func (r *Rules) sync(ctx context.Context) {
	ctx, cancel := context.WithTimeout(ctx, opTimeout)
	defer cancel()
	r.mu.Lock()
	offer := r.current
	if offer == nil {
		offer = r.file
	}
	r.mu.Unlock()
	if offer != nil {
		set, err := r.n.rdb.SetNX(ctx, r.n.Key("acl"), offer, 0).Result()
		if err != nil {
			r.n.Report(err)
			r.log.Warn("cluster: rules not shared; tried again at the next reconnect", "error", err)
			return
		}
		if set {
			r.mu.Lock()
			r.current = bytes.Clone(offer)
			r.mu.Unlock()
			_ = r.n.rdb.Publish(ctx, r.n.Key("acl"), r.n.ID()).Err()
			r.log.Info("cluster: this node's rules are the cluster's (it had none)", "bytes", len(offer))
			r.done()
			return
		}
	}
	r.read(ctx)
}

// read applies the cluster's rules if they are not those in force.
func (r *Rules) read(ctx context.Context) {
	ctx, cancel := context.WithTimeout(ctx, opTimeout)
	defer cancel()
	r.mu.Lock()
	defer r.mu.Unlock()
	text, err := r.n.rdb.Get(ctx, r.n.Key("acl")).Bytes()
	switch {
	case errors.Is(err, redis.Nil):
		r.doneLocked() // none yet: the node keeps its own (built-in defaults without a file)
		return
	case err != nil:
		r.n.Report(err)
		r.log.Warn("cluster: rules not read; read again when redis is back", "error", err)
		return
	}
	if (r.current != nil && bytes.Equal(text, r.current)) || (r.current == nil && r.file != nil && bytes.Equal(text, r.file)) {
		r.current = text // in force already (this node's file is the cluster's)
		r.doneLocked()
		return
	}
	if err := r.apply(text); err != nil {
		r.log.Error("cluster: the cluster's rules do not parse; keeping the rules in force", "error", err)
		r.doneLocked()
		return
	}
	r.current = bytes.Clone(text)
	if !r.first && r.file != nil && !bytes.Equal(text, r.file) {
		r.log.Warn("cluster: the cluster's rules differ from this node's auth.acl_file; the cluster's are in force " +
			"(a reload on this node makes its file the cluster's)")
	}
	r.log.Info("cluster: rules applied from the cluster", "bytes", len(text))
	r.doneLocked()
}

func (r *Rules) done() {
	r.mu.Lock()
	r.doneLocked()
	r.mu.Unlock()
}

func (r *Rules) doneLocked() {
	if !r.first {
		r.first = true
		close(r.synced)
	}
}
