package cluster

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/beaconmq/beacon/broker/engine"
	"github.com/beaconmq/beacon/hooks"
	"github.com/beaconmq/beacon/storage"
)

// Sessions move between nodes (the engine's half is in engine/move.go):
//
//	new node (a CONNECT resuming a session)     old node (owner)
//	HGET owner <client> -> old
//	PUBLISH ctl:<old> {move, token}  -------->  MoveOut: 0x8E to the client,
//	                                            SET move:<token>:state
//	GET move:<token>:state  <----------------
//	moveIn (durable), then commit:
//	  SET movedone:<token> new NX, HSET owner
//	PUBLISH ctl:<old> {committed} ---------->  Commit: drops what the state
//	CONNACK (session present)                   carried; the tail (what it
//	                                            queues since) goes to
//	XRANGE move:<token>  <-------------------- XADD move:<token>, held until
//	MoveInFlights, SET movetaken:<token>        movetaken says so; after the
//	                                            grace it stops matching, then
//	                                            ends the session: XADD end
//
// The commit is one SET NX: the old node, not hearing of a commit in
// moveRevert, sets the same key for itself and keeps the session. Both
// nodes keep a record of the move in their store, so a restart of
// either resumes its half.

const (
	moveWait   = 5 * time.Second  // how long a CONNECT waits for the owner's state
	moveRevert = 15 * time.Second // how long the owner waits for the commit
	moveGrace  = 5 * time.Second  // the owner keeps matching this long after it, for what was on its way
	moveSettle = time.Second      // and ends the session this long after it stopped matching
	moveKeep   = time.Hour        // how long Redis keeps a move's keys
	movePoll   = 50 * time.Millisecond
	tailBatch  = 128
	// tailAnnounce is how long a tail may wait untaken before the old
	// node tells the new one about it again.
	tailAnnounce = 10 * time.Second
)

// ctlMsg is a request on a node's control channel.
type ctlMsg struct {
	Op     string `json:"op"` // "move", "drop", "committed", "tail"; "page", "pageok" (history.go)
	Client string `json:"c,omitempty"`
	From   string `json:"f,omitempty"`
	Token  string `json:"t,omitempty"`
	// Replay pages (history.go).
	Query *hooks.PageQuery `json:"q,omitempty"`
	Wait  int64            `json:"w,omitempty"`  // ms the asker waits for the answer
	Page  json.RawMessage  `json:"pg,omitempty"` // the answer, or
	Key   string           `json:"k,omitempty"`  // the key holding it
	Err   string           `json:"e,omitempty"`
}

// moveRecord is a node's stored record of a move under way.
type moveRecord struct {
	Client    string `json:"c"`
	Peer      string `json:"p"`           // the other node
	At        int64  `json:"a,omitempty"` // unix seconds it began (a decision older than moveKeep/2 is not made again)
	Out       bool   `json:"o,omitempty"` // this node is the old one (committed, sending the tail)
	Pending   bool   `json:"w,omitempty"` // the old one, before it knows the outcome
	Cursor    string `json:"k,omitempty"` // the new one: the last tail entry taken
	Gen       uint64 `json:"g,omitempty"` // the new one: the generation of the session the tail goes to
	Merged    bool   `json:"m,omitempty"` // the new one: that session was here before the move
	Committed bool   `json:"d,omitempty"` // the new one: the commit won
	Tail      bool   `json:"t,omitempty"` // the new one: a tail alone (a node back from down), no commit
}

// stale reports whether a move began so long ago that Redis may have
// forgotten its outcome (its keys live moveKeep).
func (rec moveRecord) stale() bool {
	return rec.At != 0 && time.Since(time.Unix(rec.At, 0)) > moveKeep/2
}

// MoveStats count sessions moved.
type MoveStats struct {
	In, Out, Refused uint64
}

type moves struct {
	mu               sync.Mutex
	committed        map[string]chan struct{} // token -> closed when the new node said it committed
	resume           map[string]moveRecord    // from Load, started by Start
	taking           map[string]moveRecord    // tokens whose tail a goroutine here takes
	superseded       map[string]bool          // of those, the ones whose old node sends the rest under a new token
	in, out, refused atomic.Uint64
}

var errNotHandedOver = errors.New("the node holding the session did not hand it over")

func (r *Router) ownerKey() string            { return r.n.Key("owner") }
func (r *Router) ctlKey(node string) string   { return r.n.Key("ctl", node) }
func (r *Router) moveKey(token string) string { return r.n.Key("move", token) }

func newToken() string {
	var b [12]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// sendCtl publishes a request to node; it fails if node is not listening.
func (r *Router) sendCtl(ctx context.Context, node string, c ctlMsg) error {
	b, _ := json.Marshal(c)
	n, err := r.n.rdb.Publish(ctx, r.ctlKey(node), b).Result()
	r.n.Report(err)
	if err == nil && n == 0 {
		err = fmt.Errorf("node %s is not listening", node)
	}
	return err
}

// Claim is the engine's (Cluster.Claim): see the top of this file.
func (r *Router) Claim(client string, clean, persistent bool) (*engine.MovedSession, func(gen uint64, merged bool) error, error) {
	ctx, cancel := context.WithTimeout(r.n.ctx, moveWait)
	defer cancel()
	self := r.n.ID()
	owner, err := r.n.rdb.HGet(ctx, r.ownerKey(), client).Result()
	if errors.Is(err, redis.Nil) {
		owner, err = "", nil
	}
	r.n.Report(err)
	if err != nil {
		// Redis away: the session here, if any, serves (cluster.md).
		return nil, nil, nil
	}
	if owner == self {
		return nil, nil, nil
	}
	if owner != "" && clean {
		// The old session ends: the owner is told, and the drop set
		// keeps it for an owner that does not hear it (down, restarting).
		err := r.n.rdb.SAdd(ctx, r.dropKey(owner), client).Err()
		r.n.Report(err)
		if err != nil {
			return nil, nil, fmt.Errorf("the end of the session on node %s was not recorded: %w", owner, err)
		}
		_ = r.sendCtl(ctx, owner, ctlMsg{Op: "drop", Client: client, From: self})
		r.setOwner(ctx, client)
		return nil, nil, nil
	}
	if owner == "" || !r.NodeUp(owner) {
		// A node that is down keeps what it holds; when it returns it
		// sends its queue here (resumeOrphans).
		r.setOwner(ctx, client)
		return nil, nil, nil
	}
	token := newToken()
	if err := r.sendCtl(ctx, owner, ctlMsg{Op: "move", Client: client, From: self, Token: token}); err != nil {
		r.mv.refused.Add(1)
		return nil, nil, fmt.Errorf("%w: %v", errNotHandedOver, err)
	}
	var raw string
	for {
		raw, err = r.n.rdb.Get(ctx, r.moveKey(token)+":state").Result()
		if err == nil {
			break
		}
		if !errors.Is(err, redis.Nil) {
			r.n.Report(err)
		}
		select {
		case <-ctx.Done():
			r.mv.refused.Add(1)
			return nil, nil, fmt.Errorf("%w within %s", errNotHandedOver, moveWait)
		case <-time.After(movePoll):
		}
	}
	if raw == "none" {
		r.setOwner(ctx, client)
		return nil, nil, nil
	}
	st := &engine.MovedSession{}
	if err := json.Unmarshal([]byte(raw), st); err != nil {
		r.damaged.Add(1)
		return nil, nil, fmt.Errorf("%w: its state does not decode: %v", errNotHandedOver, err)
	}
	commit := func(gen uint64, merged bool) error {
		// The old node matches for the session until a grace after the
		// commit: the session's filters here reach Redis first.
		r.AwaitInterest(2 * time.Second)
		// Recorded before the commit: a restart in between asks Redis who
		// won (resumeMoves).
		rec := moveRecord{Client: client, Peer: owner, Gen: gen, Merged: merged, At: time.Now().Unix()}
		if err := r.writeMove(token, rec); err != nil {
			r.mv.refused.Add(1)
			return err
		}
		won, err := r.decide(token, client, time.Now().Add(2*moveWait))
		if err != nil {
			// Redis did not say: the session here waits (0x88 meanwhile)
			// until it does.
			r.mv.refused.Add(1)
			r.n.Go(func(ctx context.Context) { r.settle(ctx, token, rec) })
			return fmt.Errorf("%w: %v", engine.ErrUndecided, err)
		}
		if !won {
			r.mv.refused.Add(1)
			r.n.Go(func(ctx context.Context) { r.forgetLost(ctx, token, rec) })
			return fmt.Errorf("%w: it took the session back", errNotHandedOver)
		}
		r.committed(token, rec)
		return nil
	}
	return st, commit, nil
}

// decide runs the commit (commitScript, which may run again: it says
// the same) until Redis answers or deadline passes.
func (r *Router) decide(token, client string, deadline time.Time) (won bool, err error) {
	for {
		ctx, cancel := context.WithTimeout(r.n.ctx, 2*time.Second)
		var n int
		n, err = commitScript.Run(ctx, r.n.rdb, []string{r.n.Key("movedone", token), r.ownerKey()},
			r.n.ID(), client, int(moveKeep/time.Second)).Int()
		cancel()
		r.n.Report(err)
		if err == nil {
			return n == 1, nil
		}
		if r.n.ctx.Err() != nil || time.Now().After(deadline) {
			return false, err
		}
		time.Sleep(movePoll)
	}
}

// committed: this node holds the session now; its tail is taken here.
func (r *Router) committed(token string, rec moveRecord) {
	rec.Committed = true
	if err := r.writeMove(token, rec); err != nil {
		r.log.Warn("cluster: a moved session's record was not stored", "client", rec.Client, "error", err)
	}
	ctx, cancel := context.WithTimeout(r.n.ctx, moveWait)
	_ = r.sendCtl(ctx, rec.Peer, ctlMsg{Op: "committed", Client: rec.Client, From: r.n.ID(), Token: token})
	cancel()
	r.mv.in.Add(1)
	r.n.Go(func(ctx context.Context) { r.takeTail(ctx, token, rec) })
}

// settle decides a move whose commit Redis did not answer, then lets the
// session here go on (won) or ends it.
func (r *Router) settle(ctx context.Context, token string, rec moveRecord) {
	for ctx.Err() == nil {
		var won bool
		var err error
		if rec.stale() {
			// Too old to run the commit again (its key may be gone, and
			// SET NX would win): what Redis still says, else lost.
			var who string
			who, err = r.n.rdb.Get(ctx, r.n.Key("movedone", token)).Result()
			if errors.Is(err, redis.Nil) {
				// Forgotten: the owner hash, which the commit set with it,
				// says (as the old node's settleOut reads it).
				who, err = r.n.rdb.HGet(ctx, r.ownerKey(), rec.Client).Result()
				if errors.Is(err, redis.Nil) {
					who, err = "", nil
				}
			}
			won = who == r.n.ID()
		} else {
			won, err = r.decide(token, rec.Client, time.Now().Add(time.Minute))
		}
		if err != nil {
			r.n.Report(err)
			time.Sleep(time.Second)
			continue
		}
		r.eng.SettleMove(rec.Client, rec.Gen, won, rec.Merged)
		if won {
			r.committed(token, rec)
		} else {
			r.forgetLost(ctx, token, rec)
		}
		return
	}
}

// forgetLost removes the record of a move this node lost, once the
// session it made for it is gone (its removal is queued first).
func (r *Router) forgetLost(ctx context.Context, token string, rec moveRecord) {
	for ctx.Err() == nil && !rec.Merged && r.eng.SessionGen(rec.Client) == rec.Gen && rec.Gen != 0 {
		time.Sleep(movePoll)
	}
	_ = r.db.Write(storage.Delete(storage.MoveKey(token)))
}

// commitScript decides a move for the new node, unless the old node took
// the session back first: KEYS movedone, owner; ARGV node, client, ttl.
var commitScript = redis.NewScript(`
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[3]) then
  redis.call('HSET', KEYS[2], ARGV[2], ARGV[1])
  return 1
end
if redis.call('GET', KEYS[1]) == ARGV[1] then return 1 end
return 0
`)

func (r *Router) dropKey(node string) string { return r.n.Key("drop", node) }

func (r *Router) setOwner(ctx context.Context, client string) {
	r.n.Report(r.n.rdb.HSet(ctx, r.ownerKey(), client, r.n.ID()).Err())
}

func (r *Router) writeMove(token string, rec moveRecord) error {
	b, _ := json.Marshal(rec)
	return r.db.Write(storage.Set(storage.MoveKey(token), b))
}

// onCtl takes a request on this node's control channel.
func (r *Router) onCtl(payload string) {
	var c ctlMsg
	if json.Unmarshal([]byte(payload), &c) != nil {
		return
	}
	if c.Op == "page" || c.Op == "pageok" {
		r.onPage(c)
		return
	}
	if c.Client == "" {
		return
	}
	switch c.Op {
	case "move":
		r.n.Go(func(ctx context.Context) { r.moveOut(ctx, c) })
	case "drop":
		r.dropSession(r.n.ctx, c.Client)
	case "committed":
		r.mv.mu.Lock()
		if ch := r.mv.committed[c.Token]; ch != nil {
			close(ch)
			delete(r.mv.committed, c.Token)
		}
		r.mv.mu.Unlock()
	case "tail":
		r.mv.mu.Lock()
		_, taking := r.mv.taking[c.Token]
		for token, rec := range r.mv.taking {
			// The old node restarted without its record of an earlier
			// move of this session: what it had not sent comes now.
			if token != c.Token && rec.Client == c.Client && rec.Peer == c.From {
				r.mv.superseded[token] = true
			}
		}
		r.mv.mu.Unlock()
		if taking {
			return
		}
		rec := moveRecord{Client: c.Client, Peer: c.From, Gen: r.eng.SessionGen(c.Client), Tail: true, At: time.Now().Unix()}
		if err := r.writeMove(c.Token, rec); err != nil {
			r.log.Warn("cluster: a session's tail from another node was not recorded", "client", c.Client, "error", err)
			return
		}
		r.n.Go(func(ctx context.Context) { r.takeTail(ctx, c.Token, rec) })
	}
}

// moveOut hands a session here to the node that asked for it.
func (r *Router) moveOut(ctx context.Context, c ctlMsg) {
	stateKey := r.moveKey(c.Token) + ":state"
	mv, err := r.eng.MoveOut(c.Client)
	if errors.Is(err, engine.ErrNoSession) {
		r.n.Report(r.n.rdb.Set(ctx, stateKey, "none", moveKeep).Err())
		return
	}
	if err != nil {
		return // moving to another node: this claim times out, and the client tries again
	}
	ch := make(chan struct{})
	r.mv.mu.Lock()
	r.mv.committed[c.Token] = ch
	r.mv.mu.Unlock()
	defer func() {
		r.mv.mu.Lock()
		delete(r.mv.committed, c.Token)
		r.mv.mu.Unlock()
	}()
	// Recorded before the state goes: a restart before the outcome is
	// known asks Redis (resumeMoves).
	pending := moveRecord{Client: c.Client, Peer: c.From, Out: true, Pending: true, At: time.Now().Unix(), Gen: mv.Gen()}
	if err := r.writeMove(c.Token, pending); err != nil {
		mv.Cancel()
		return
	}
	b, _ := json.Marshal(mv.State())
	deadline := time.Now().Add(moveRevert)
	if err := r.n.rdb.Set(ctx, stateKey, b, moveKeep).Err(); err != nil {
		// It may have reached Redis: take the session back the only way
		// that excludes a commit.
		r.n.Report(err)
		deadline = time.Now()
	}
	doneKey := r.n.Key("movedone", c.Token)
	for {
		select {
		case <-ctx.Done():
			return // shutting down: the session stays, offline, in the store
		case <-ch:
		case <-time.After(100 * time.Millisecond):
		}
		who, err := r.n.rdb.Get(ctx, doneKey).Result()
		if err != nil && !errors.Is(err, redis.Nil) {
			r.n.Report(err)
			continue // undecided while Redis is away
		}
		if who == c.From {
			break
		}
		if time.Now().Before(deadline) {
			continue
		}
		ok, err := r.n.rdb.SetNX(ctx, doneKey, r.n.ID(), moveKeep).Result()
		r.n.Report(err)
		if err != nil {
			continue
		}
		if ok {
			mv.Cancel()
			_ = r.db.Write(storage.Delete(storage.MoveKey(c.Token)))
			r.n.rdb.Del(ctx, stateKey)
			r.log.Warn("cluster: a session move was not taken up; the session stays here", "client", c.Client, "node", c.From)
			return
		}
	}
	mv.Commit()
	rec := moveRecord{Client: c.Client, Peer: c.From, Out: true, Gen: mv.Gen()}
	if err := r.writeMove(c.Token, rec); err != nil {
		r.log.Warn("cluster: a moved session's record was not stored", "client", c.Client, "error", err)
	}
	r.n.rdb.Del(ctx, stateKey)
	r.mv.out.Add(1)
	r.sendTail(ctx, mv, c.Token, c.From, moveGrace)
}

// sendTail sends what a moved session still queues here to its new node
// until it stops matching here, grace after the move and once this node
// has taken everything other nodes had sent it by then, and has nothing
// left.
func (r *Router) sendTail(ctx context.Context, mv *engine.Moving, token, to string, grace time.Duration) {
	stream := r.moveKey(token)
	takenKey := r.n.Key("movetaken", token)
	type sent struct {
		id string
		b  *engine.TailBatch
	}
	var held []sent
	progress := time.Now() // when the new node last took some of the tail (or it was announced)
	stopAt := time.Now().Add(grace)
	var endAt time.Time
	drained := int64(-1) // the inbox's count of drained reads once the grace passed
	for ctx.Err() == nil {
		for {
			b := mv.Tail(tailBatch)
			if b == nil {
				break
			}
			body, _ := json.Marshal(b.Flights)
			p := r.n.rdb.Pipeline()
			add := p.XAdd(ctx, &redis.XAddArgs{Stream: stream, Values: []string{"f", string(body)}})
			p.Expire(ctx, stream, moveKeep)
			_, err := p.Exec(ctx)
			id := add.Val()
			r.n.Report(err)
			if err != nil {
				b.Return()
				break
			}
			held = append(held, sent{id: id, b: b})
		}
		if len(held) > 0 {
			taken, err := r.n.rdb.Get(ctx, takenKey).Result()
			if err == nil {
				for len(held) > 0 && !streamIDAfter(held[0].id, taken) {
					held[0].b.Taken()
					held = held[1:]
					progress = time.Now()
				}
			}
			if len(held) > 0 && time.Since(progress) > tailAnnounce {
				// The new node is not taking it (it gave up while this one
				// was down, or restarted without its record): tell it again.
				_ = r.sendCtl(ctx, to, ctlMsg{Op: "tail", Client: mv.Client(), From: r.n.ID(), Token: token})
				progress = time.Now()
			}
		}
		if endAt.IsZero() && !time.Now().Before(stopAt) {
			switch d := r.drained.Load(); {
			case drained < 0:
				drained = d
			case d > drained+1: // a read that began after the grace (the one under way may have begun before)
				mv.StopMatching()
				endAt = time.Now().Add(moveSettle)
			}
		}
		if !endAt.IsZero() && !time.Now().Before(endAt) && len(held) == 0 && !r.takingFor(mv.Client()) && mv.Finish() {
			p := r.n.rdb.Pipeline()
			p.XAdd(ctx, &redis.XAddArgs{Stream: stream, Values: []string{"end", "1"}})
			p.Expire(ctx, stream, moveKeep)
			_, err := p.Exec(ctx)
			r.n.Report(err)
			if err == nil {
				if err := r.db.Write(storage.Delete(storage.MoveKey(token))); err != nil {
					r.log.Warn("cluster: a finished move's record was not removed", "client", mv.Client(), "error", err)
				}
				r.log.Debug("cluster: session moved", "client", mv.Client(), "node", to)
				return
			}
		}
		select {
		case <-ctx.Done():
		case <-time.After(movePoll):
		}
	}
}

// takeTail takes a moved session's tail from its old node into the
// session here, until the old node ends it (an old node that is down
// ends it when it returns), or until the old node sends the rest under
// a new token.
func (r *Router) takeTail(ctx context.Context, token string, rec moveRecord) {
	r.mv.mu.Lock()
	if _, dup := r.mv.taking[token]; dup {
		r.mv.mu.Unlock()
		return
	}
	r.mv.taking[token] = rec
	r.mv.mu.Unlock()
	defer func() {
		r.mv.mu.Lock()
		delete(r.mv.taking, token)
		delete(r.mv.superseded, token)
		r.mv.mu.Unlock()
	}()
	stream := r.moveKey(token)
	takenKey := r.n.Key("movetaken", token)
	cursor := rec.Cursor
	if cursor == "" {
		// A tail announced again (this node had lost its record): from
		// where it was taken.
		cursor = "0"
		if v, err := r.n.rdb.Get(ctx, takenKey).Result(); err == nil {
			cursor = v
		}
	}
	confirmed := ""     // the cursor Redis is known to have in movetaken
	heard := time.Now() // the last entry
	finish := func() {
		r.eng.MoveInDone(rec.Client)
		if err := r.db.Write(storage.Delete(storage.MoveKey(token))); err != nil {
			r.log.Warn("cluster: a finished move's record was not removed", "client", rec.Client, "error", err)
		}
	}
	for ctx.Err() == nil {
		xs, err := r.n.rdb.XRangeN(ctx, stream, "("+cursor, "+", 16).Result()
		r.n.Report(err)
		for _, x := range xs {
			if _, end := x.Values["end"]; end {
				finish()
				p := r.n.rdb.Pipeline()
				p.Del(ctx, stream, takenKey)
				_, _ = p.Exec(ctx)
				return
			}
			var fl []engine.MovedFlight
			raw, _ := x.Values["f"].(string)
			if err := json.Unmarshal([]byte(raw), &fl); err != nil {
				r.damaged.Add(1)
				r.log.Warn("cluster: a moved session's messages do not decode; skipped", "client", rec.Client, "id", x.ID, "error", err)
			}
			next := rec
			next.Cursor = x.ID
			b, _ := json.Marshal(next)
			if err := r.eng.MoveInFlights(rec.Client, rec.Gen, fl, []storage.Op{storage.Set(storage.MoveKey(token), b)}); err != nil {
				r.takeFailures.Add(1)
				break // again after a pause
			}
			cursor = x.ID
			heard = time.Now()
		}
		if time.Since(heard) > moveKeep {
			// Redis has forgotten the tail by now (its keys live that long).
			r.log.Warn("cluster: a moved session's tail did not end; what its old node still holds is not delivered",
				"client", rec.Client, "node", rec.Peer)
			finish()
			return
		}
		if cursor != confirmed && cursor != "0" {
			// Said again until Redis has it: the old node lets go of what
			// it holds by it.
			if err := r.n.rdb.Set(ctx, takenKey, cursor, moveKeep).Err(); err == nil {
				confirmed = cursor
			} else {
				r.n.Report(err)
			}
		}
		r.mv.mu.Lock()
		superseded := r.mv.superseded[token]
		r.mv.mu.Unlock()
		if superseded && err == nil && len(xs) == 0 {
			finish()
			return
		}
		wait := movePoll
		if !r.NodeUp(rec.Peer) {
			wait = time.Second // it sends the rest when it returns
		}
		select {
		case <-ctx.Done():
		case <-time.After(wait):
		}
	}
}

// takingFor reports whether this node takes a tail for client: a session
// moving away from here waits for it before it ends.
func (r *Router) takingFor(client string) bool {
	r.mv.mu.Lock()
	var peers []string
	for _, rec := range r.mv.taking {
		if rec.Client == client {
			peers = append(peers, rec.Peer)
		}
	}
	r.mv.mu.Unlock()
	for _, p := range peers {
		if r.NodeUp(p) { // a tail from a node that is down is not waited for
			return true
		}
	}
	return false
}

// processDrops ends the sessions in this node's drop set; false if Redis
// did not answer.
func (r *Router) processDrops(ctx context.Context) bool {
	drops, err := r.n.rdb.SMembers(ctx, r.dropKey(r.n.ID())).Result()
	r.n.Report(err)
	if err != nil {
		return false
	}
	for _, client := range drops {
		r.dropSession(ctx, client)
	}
	return true
}

// dropSession ends a session here whose client started clean on another
// node, and clears it from this node's drop set.
func (r *Router) dropSession(ctx context.Context, client string) {
	if r.eng.DropSession(client) {
		r.log.Info("cluster: session ended: its client started a clean one on another node", "client", client)
	}
	r.n.Report(r.n.rdb.SRem(ctx, r.dropKey(r.n.ID()), client).Err())
}

// streamIDAfter reports whether stream entry id a comes after b ("" is
// before every id).
func streamIDAfter(a, b string) bool {
	if b == "" {
		return true
	}
	am, as := splitStreamID(a)
	bm, bs := splitStreamID(b)
	return am > bm || (am == bm && as > bs)
}

func splitStreamID(id string) (uint64, uint64) {
	ms, seq, _ := strings.Cut(id, "-")
	a, _ := strconv.ParseUint(ms, 10, 64)
	b, _ := strconv.ParseUint(seq, 10, 64)
	return a, b
}

// loadMoves reads the moves a previous run left under way.
func (r *Router) loadMoves() error {
	return r.db.Scan(storage.MovePrefix(), func(k, v []byte) error {
		var rec moveRecord
		if json.Unmarshal(v, &rec) != nil || rec.Client == "" {
			return nil
		}
		r.mv.resume[string(k[len(storage.MovePrefix()):])] = rec
		return nil
	})
}

// resumeMoves goes on with them: the new node's half takes the tail
// again from where it was (once it knows its commit won), the old node's
// sends what it still holds; a half whose outcome it did not know asks
// Redis, its session refusing CONNECTs meanwhile. The old node's halves
// go first: a session both took in and sent on is the outgoing one's.
func (r *Router) resumeMoves(ctx context.Context) {
	var in []string
	for token, rec := range r.mv.resume {
		if !rec.Out {
			in = append(in, token)
			continue
		}
		r.resumeOutgoing(ctx, token, rec)
	}
	for _, token := range in {
		token, rec := token, r.mv.resume[token]
		if rec.Committed || rec.Tail {
			r.n.Go(func(ctx context.Context) { r.takeTail(ctx, token, rec) })
			continue
		}
		r.eng.HoldMove(rec.Client, rec.Gen)
		r.n.Go(func(ctx context.Context) { r.settle(ctx, token, rec) })
	}
	r.mv.resume = nil
}

// resumeOutgoing goes on with a move out of this node after a restart
// (before anything else takes sessions out: MoveOut here, the rest on
// its own goroutine).
func (r *Router) resumeOutgoing(ctx context.Context, token string, rec moveRecord) {
	mv, err := r.eng.MoveOut(rec.Client)
	if err == nil && rec.Gen != 0 && mv.Gen() != rec.Gen {
		mv.Cancel() // another session of the client id: not this move's
		err = engine.ErrNoSession
	}
	switch {
	case err != nil:
		// Gone here (expired, or ended as the node died): the new node's
		// taker hears the end.
		if rec.Pending {
			_ = r.db.Write(storage.Delete(storage.MoveKey(token)))
		} else {
			r.n.Go(func(ctx context.Context) { r.endTail(ctx, token) })
		}
	case rec.Pending:
		r.n.Go(func(ctx context.Context) { r.settleOut(ctx, mv, token, rec) })
	default:
		mv.Resume()
		r.resumeOut(ctx, mv, token, rec)
	}
}

// resumeOut sends the rest of a tail after a restart to the session's
// owner: the node it moved to, told again (it may have given up on it),
// or, if the session has moved on from there, its owner now, under a
// new token.
func (r *Router) resumeOut(ctx context.Context, mv *engine.Moving, token string, rec moveRecord) {
	owner, err := r.n.rdb.HGet(ctx, r.ownerKey(), rec.Client).Result()
	if err == nil && owner != "" && owner != rec.Peer && owner != r.n.ID() {
		r.endTail(ctx, token)
		token, rec.Peer = newToken(), owner
		if err := r.writeMove(token, rec); err != nil {
			r.log.Warn("cluster: a moved session's record was not stored", "client", rec.Client, "error", err)
		}
	}
	_ = r.sendCtl(ctx, rec.Peer, ctlMsg{Op: "tail", Client: rec.Client, From: r.n.ID(), Token: token})
	// What was on its way here before the restart is in this node's
	// streams still: the grace again.
	r.n.Go(func(ctx context.Context) { r.sendTail(ctx, mv, token, rec.Peer, moveGrace) })
}

// settleOut decides a move the old node had begun before a restart: it
// keeps the session (its SET NX wins) or sends what it holds as the tail,
// less what the state it had sent carried.
func (r *Router) settleOut(ctx context.Context, mv *engine.Moving, token string, rec moveRecord) {
	doneKey := r.n.Key("movedone", token)
	for ctx.Err() == nil {
		var kept bool
		var err error
		if rec.stale() {
			// Redis may have forgotten: the owner says who has it.
			var owner string
			owner, err = r.n.rdb.HGet(ctx, r.ownerKey(), rec.Client).Result()
			if errors.Is(err, redis.Nil) {
				owner, err = "", nil
			}
			kept = owner != rec.Peer
		} else {
			var ok bool
			ok, err = r.n.rdb.SetNX(ctx, doneKey, r.n.ID(), moveKeep).Result()
			kept = ok
			if err == nil && !ok {
				var who string
				who, err = r.n.rdb.Get(ctx, doneKey).Result()
				kept = who == r.n.ID()
			}
		}
		if err != nil {
			if !errors.Is(err, redis.Nil) {
				r.n.Report(err)
			}
			time.Sleep(time.Second)
			continue
		}
		if kept {
			mv.Cancel()
			_ = r.db.Write(storage.Delete(storage.MoveKey(token)))
			return
		}
		// The new node has what the state carried.
		raw, err := r.n.rdb.Get(ctx, r.moveKey(token)+":state").Result()
		if err != nil && !errors.Is(err, redis.Nil) {
			r.n.Report(err)
			time.Sleep(time.Second)
			continue
		}
		if err == nil {
			st := &engine.MovedSession{}
			if json.Unmarshal([]byte(raw), st) == nil {
				known := map[string]bool{}
				for _, f := range st.Flights {
					if f.Origin != "" {
						known[f.Origin] = true
					}
				}
				mv.CommitKnown(known)
			}
		}
		mv.Resume()
		rec.Pending = false
		if err := r.writeMove(token, rec); err != nil {
			r.log.Warn("cluster: a moved session's record was not stored", "client", rec.Client, "error", err)
		}
		r.mv.out.Add(1)
		r.resumeOut(ctx, mv, token, rec)
		return
	}
}

// endTail ends a tail whose session is gone here, until Redis takes it.
func (r *Router) endTail(ctx context.Context, token string) {
	stream := r.moveKey(token)
	for ctx.Err() == nil {
		p := r.n.rdb.Pipeline()
		p.XAdd(ctx, &redis.XAddArgs{Stream: stream, Values: []string{"end", "1"}})
		p.Expire(ctx, stream, moveKeep)
		_, err := p.Exec(ctx)
		r.n.Report(err)
		if err == nil {
			_ = r.db.Write(storage.Delete(storage.MoveKey(token)))
			return
		}
		time.Sleep(time.Second)
	}
}

// resumeOrphans ends the sessions here whose clients started clean
// elsewhere meanwhile (the drop set), and hands those that another node
// owns now (a client that moved while this node was down) their queue:
// it goes to the owner as a tail, and the session ends here.
func (r *Router) resumeOrphans(ctx context.Context) {
	if !r.processDrops(ctx) {
		return // Redis away: the sessions stay; the next start looks again
	}
	ids := r.eng.OfflineSessions()
	if len(ids) == 0 {
		return
	}
	owners, err := r.n.rdb.HMGet(ctx, r.ownerKey(), ids...).Result()
	r.n.Report(err)
	if err != nil {
		return
	}
	self := r.n.ID()
	for i, o := range owners {
		owner, _ := o.(string)
		if owner == "" || owner == self {
			continue
		}
		mv, err := r.eng.MoveOut(ids[i])
		if err != nil {
			continue // moving already (a resumed move)
		}
		mv.Resume()
		token := newToken()
		if err := r.sendCtl(ctx, owner, ctlMsg{Op: "tail", Client: ids[i], From: self, Token: token}); err != nil {
			mv.Cancel() // tried again at the next start
			continue
		}
		rec := moveRecord{Client: ids[i], Peer: owner, Out: true, Gen: mv.Gen()}
		if err := r.writeMove(token, rec); err != nil {
			r.log.Warn("cluster: a moved session's record was not stored", "client", ids[i], "error", err)
		}
		r.log.Info("cluster: a session here moved to another node while this one was away; its queue follows it",
			"client", ids[i], "node", owner)
		r.n.Go(func(ctx context.Context) { r.sendTail(ctx, mv, token, owner, moveGrace) })
	}
}
