// Package cluster joins Beacon nodes that share one Redis (or Valkey):
// each node publishes the topic filters its clients want, learns the
// others', and forwards an accepted message only to the nodes that want
// it, once per node. docs/cluster.md has the design and its guarantees.
//
// Redis keys, all under Options.Prefix (default "beacon:"):
//
//	nodes                      hash: node id -> JSON NodeInfo
//	node:<id>                  string with a TTL: the node is alive
//	interest:<id>              hash: filter ($share/<g>/<f> for a group) -> "1"
//	interest                   channel: "<id> +<filter>", "<id> -<filter>", "<id> *"
//	fwd:<dest>:<origin>:<ep>   stream: QoS 1/2 (and retained) messages from
//	                           origin (log epoch ep) to dest; id = origin's log seq
//	inbox:<dest>               set: the fwd streams that have entries for dest
//	live:<dest>                channel: QoS 0 messages for dest
//	retained                   hash: topic -> the retained message (log record)
package cluster

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
)

// Options configure a node.
type Options struct {
	URL       string // redis:// or rediss://
	Password  string // overrides one in URL when set
	NodeID    string
	Prefix    string        // "beacon:" if empty
	Heartbeat time.Duration // 2s if 0
	// ForwardBuffer is how many messages for other nodes are held in
	// memory (10,000 if 0); beyond it they are read back from the log.
	ForwardBuffer int
	Info          NodeInfo // what the node tells the others about itself
	Logger        *slog.Logger
}

// NodeInfo is what a node publishes about itself in the nodes hash.
type NodeInfo struct {
	ID      string `json:"id"`
	Version string `json:"version,omitempty"`
	MQTT    string `json:"mqtt,omitempty"` // its MQTT listener
	HTTP    string `json:"http,omitempty"` // its HTTP listener
	Started int64  `json:"started"`        // unix seconds
	Epoch   uint64 `json:"epoch"`          // its message log's epoch
}

// Node is this broker's membership of a cluster. Its Redis connection
// reconnects by itself; while Redis is away the node serves its own
// clients and reports not ready.
type Node struct {
	opts Options
	rdb  *redis.Client
	log  *slog.Logger

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	up      atomic.Bool  // the last Redis round trip succeeded
	lastErr atomic.Value // string: why it did not
	downAt  atomic.Int64 // unix nanoseconds Redis went away; 0 while up

	mu      sync.Mutex
	onUp    []func() // called (in a goroutine of the node) whenever Redis comes back
	started bool
}

// Open parses the options and makes the client; it does not wait for
// Redis (Start does not either: the node comes up not ready and
// connects by itself).
func Open(opts Options) (*Node, error) {
	if opts.Prefix == "" {
		opts.Prefix = "beacon:"
	}
	if opts.Heartbeat <= 0 {
		opts.Heartbeat = 2 * time.Second
	}
	if opts.ForwardBuffer <= 0 {
		opts.ForwardBuffer = 10000
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.NodeID == "" || strings.ContainsAny(opts.NodeID, ": \t\n") {
		return nil, fmt.Errorf("cluster: node id %q", opts.NodeID)
	}
	redisLogOnce.Do(func() { redis.SetLogger(redisLog{opts.Logger.With("component", "redis-client")}) })
	rdb, err := newClient(opts)
	if err != nil {
		return nil, err
	}
	n := &Node{opts: opts, rdb: rdb, log: opts.Logger}
	n.opts.Info.ID = opts.NodeID
	n.lastErr.Store("not connected yet")
	n.downAt.Store(time.Now().UnixNano())
	n.ctx, n.cancel = context.WithCancel(context.Background())
	return n, nil
}

// ID is this node's id.
func (n *Node) ID() string { return n.opts.NodeID }

// Client is the Redis client, shared by everything cluster-wide (the
// device registry, rules, presence).
func (n *Node) Client() *redis.Client { return n.rdb }

// Key names a Redis key or channel under the cluster's prefix.
func (n *Node) Key(parts ...string) string { return n.opts.Prefix + strings.Join(parts, ":") }

// Context ends when the node closes.
func (n *Node) Context() context.Context { return n.ctx }

// Ready reports whether Redis answers, and why not.
func (n *Node) Ready() (bool, string) {
	if n.up.Load() {
		return true, ""
	}
	return false, "redis: " + n.lastErr.Load().(string)
}

// Up reports whether the last Redis round trip succeeded.
func (n *Node) Up() bool { return n.up.Load() }

// OnUp registers fn to run each time Redis comes back after being away
// (and once at the first connection): the moment to publish again what
// Redis may have lost or what others missed. fn runs on whichever
// goroutine saw Redis answer again: it must be quick.
func (n *Node) OnUp(fn func()) {
	n.mu.Lock()
	n.onUp = append(n.onUp, fn)
	n.mu.Unlock()
}

// SetInfo updates what the node publishes about itself (before Start).
func (n *Node) SetInfo(fn func(*NodeInfo)) {
	n.mu.Lock()
	fn(&n.opts.Info)
	n.mu.Unlock()
}

// Start begins the heartbeat. Everything else (interest, forwarding, the
// inbox) is started by its own type.
func (n *Node) Start() {
	n.mu.Lock()
	if n.started {
		n.mu.Unlock()
		return
	}
	n.started = true
	n.opts.Info.Started = time.Now().Unix()
	n.mu.Unlock()
	n.wg.Add(1)
	go n.heartbeat()
}

// Go runs fn on a goroutine the node waits for at Close.
func (n *Node) Go(fn func(ctx context.Context)) {
	n.wg.Add(1)
	go func() {
		defer n.wg.Done()
		fn(n.ctx)
	}()
}

// heartbeat renews the node's liveness key and watches Redis.
func (n *Node) heartbeat() {
	defer n.wg.Done()
	t := time.NewTicker(n.opts.Heartbeat)
	defer t.Stop()
	for {
		n.beat()
		select {
		case <-n.ctx.Done():
			return
		case <-t.C:
		}
	}
}

func (n *Node) beat() {
	ctx, cancel := context.WithTimeout(n.ctx, n.opts.Heartbeat)
	defer cancel()
	n.mu.Lock()
	info, _ := json.Marshal(n.opts.Info)
	n.mu.Unlock()
	_, err := n.rdb.TxPipelined(ctx, func(p redis.Pipeliner) error {
		p.HSet(ctx, n.Key("nodes"), n.opts.NodeID, info)
		p.Set(ctx, n.Key("node", n.opts.NodeID), n.opts.Info.Started, 3*n.opts.Heartbeat)
		return nil
	})
	n.Report(err)
}

// Report records the outcome of a Redis round trip (from any user of the
// client): the first failure marks the node not ready and logs once; the
// first success after it runs the OnUp functions.
func (n *Node) Report(err error) {
	if err != nil {
		if errors.Is(err, context.Canceled) && n.ctx.Err() != nil {
			return
		}
		n.lastErr.Store(err.Error())
		if n.up.CompareAndSwap(true, false) {
			n.downAt.Store(time.Now().UnixNano())
			n.log.Warn("cluster: redis unreachable: serving local clients only, cross-node traffic waits", "error", err)
		}
		return
	}
	if n.up.CompareAndSwap(false, true) {
		down := time.Duration(time.Now().UnixNano() - n.downAt.Swap(0))
		n.log.Info("cluster: redis reachable", "node", n.opts.NodeID, "after", down.Round(time.Millisecond).String())
		n.mu.Lock()
		fns := append([]func(){}, n.onUp...)
		n.mu.Unlock()
		for _, fn := range fns {
			fn()
		}
	}
}

// Nodes returns the nodes alive now (this one included when Redis has
// its key), by id.
func (n *Node) Nodes(ctx context.Context) (map[string]NodeInfo, error) {
	all, err := n.rdb.HGetAll(ctx, n.Key("nodes")).Result()
	if err != nil {
		return nil, err
	}
	ids := make([]string, 0, len(all))
	keys := make([]string, 0, len(all))
	for id := range all {
		ids = append(ids, id)
		keys = append(keys, n.Key("node", id))
	}
	alive := map[string]NodeInfo{}
	if len(keys) == 0 {
		return alive, nil
	}
	vals, err := n.rdb.MGet(ctx, keys...).Result()
	if err != nil {
		return nil, err
	}
	for i, v := range vals {
		if v == nil {
			continue
		}
		var info NodeInfo
		if json.Unmarshal([]byte(all[ids[i]]), &info) == nil {
			alive[ids[i]] = info
		}
	}
	return alive, nil
}

// Subscribe follows a Redis channel until the node closes: onMsg gets
// each message's payload; onSync runs whenever the subscription is made
// (at first and after every reconnect), when messages may have been
// missed and state must be read again. Both run on one goroutine. The
// connection is pinged when quiet, and made again when a ping goes
// unanswered (a half-open connection would otherwise go silent).
func (n *Node) Subscribe(channel string, onSync func(ctx context.Context), onMsg func(payload string)) {
	n.Go(func(ctx context.Context) {
		for ctx.Err() == nil {
			n.follow(ctx, channel, onSync, onMsg)
			select {
			case <-ctx.Done():
			case <-time.After(200 * time.Millisecond):
			}
		}
	})
}

// pubsubQuiet is how long a subscription may hear nothing before it is
// pinged; after three such periods without a word it is made again.
const pubsubQuiet = 2 * time.Second

func (n *Node) follow(ctx context.Context, channel string, onSync func(ctx context.Context), onMsg func(payload string)) {
	ps := n.rdb.Subscribe(ctx, channel)
	stop := context.AfterFunc(ctx, func() { _ = ps.Close() }) // Receive does not watch ctx
	defer stop()
	defer ps.Close()
	heard := time.Now()
	for {
		msg, err := ps.ReceiveTimeout(ctx, pubsubQuiet)
		if ctx.Err() != nil {
			return
		}
		switch m := msg.(type) {
		case *redis.Subscription:
			if m.Kind == "subscribe" && onSync != nil {
				onSync(ctx)
			}
			heard = time.Now() // after onSync, which may take a while
		case *redis.Message:
			heard = time.Now()
			onMsg(m.Payload)
		case *redis.Pong:
			heard = time.Now()
		default:
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				if time.Since(heard) > 3*pubsubQuiet {
					n.Report(fmt.Errorf("subscription to %s went silent", channel))
					return // a new connection
				}
				_ = ps.Ping(ctx)
				continue
			}
			if err != nil {
				n.Report(err)
				select { // go-redis reconnects on the next Receive
				case <-ctx.Done():
					return
				case <-time.After(200 * time.Millisecond):
				}
			}
		}
	}
}

// Close leaves the cluster: the node's liveness key is removed (others
// see it gone at once) and its goroutines end.
func (n *Node) Close() error {
	n.mu.Lock()
	started := n.started
	n.mu.Unlock()
	if started && n.up.Load() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		_ = n.rdb.Del(ctx, n.Key("node", n.opts.NodeID)).Err()
		cancel()
	}
	n.cancel()
	n.wg.Wait()
	return n.rdb.Close()
}

// IsSentinelURL reports whether a cluster.redis_url names Redis Sentinels
// (a master_name parameter) rather than one Redis.
func IsSentinelURL(raw string) bool {
	u, err := url.Parse(raw)
	return err == nil && u.Query().Has("master_name")
}

// newClient connects to the Redis of opts.URL: one server, or through
// Sentinels (?master_name=...&addr=sentinel2:26379...) to whichever
// server they name master, following failovers.
func newClient(opts Options) (*redis.Client, error) {
	// No silent retries: a command that met a restarted Redis must fail,
	// so the forwarder knows the streams may have lost entries.
	const (
		dial, read, write  = 2 * time.Second, 3 * time.Second, 3 * time.Second
		minBackoff, maxBkf = 50 * time.Millisecond, time.Second
	)
	name := "beacon:" + opts.NodeID
	if IsSentinelURL(opts.URL) {
		fo, err := redis.ParseFailoverURL(opts.URL)
		if err != nil {
			return nil, fmt.Errorf("cluster: redis url: %w", err)
		}
		// The URL's credentials are the Sentinels'; the servers' password
		// is cluster.redis_password_file's.
		fo.Password = opts.Password
		if fo.TLSConfig != nil && fo.TLSConfig.MinVersion == 0 {
			fo.TLSConfig.MinVersion = tls.VersionTLS12
		}
		fo.ClientName = name
		fo.DialTimeout, fo.ReadTimeout, fo.WriteTimeout = dial, read, write
		fo.MaxRetries, fo.MinRetryBackoff, fo.MaxRetryBackoff = -1, minBackoff, maxBkf
		return redis.NewFailoverClient(fo), nil
	}
	ro, err := redis.ParseURL(opts.URL)
	if err != nil {
		return nil, fmt.Errorf("cluster: redis url: %w", err)
	}
	if opts.Password != "" {
		ro.Password = opts.Password
	}
	if ro.TLSConfig != nil && ro.TLSConfig.MinVersion == 0 {
		ro.TLSConfig.MinVersion = tls.VersionTLS12
	}
	ro.ClientName = name
	ro.DialTimeout, ro.ReadTimeout, ro.WriteTimeout = dial, read, write
	ro.MaxRetries, ro.MinRetryBackoff, ro.MaxRetryBackoff = -1, minBackoff, maxBkf
	return redis.NewClient(ro), nil
}

// redisLog takes go-redis's own messages (a dial that failed, a
// Sentinel naming a new master) into the node's log at debug: the node
// reports Redis's state itself (Report).
type redisLog struct{ l *slog.Logger }

func (r redisLog) Printf(ctx context.Context, format string, v ...any) {
	r.l.Log(ctx, slog.LevelDebug, fmt.Sprintf(format, v...))
}

var redisLogOnce sync.Once
