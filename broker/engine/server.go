package engine

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/beaconmq/beacon/broker/topics"
)

// Server is the MQTT engine. Build it with New, feed it connections with
// Serve (a listener) or ServeConn (one connection, e.g. from the
// WebSocket bridge), publish from inside the broker with Publish, and stop
// it with Shutdown.
type Server struct {
	opts Options
	lim  Limits
	log  *slog.Logger
	now  func() time.Time

	index    *topics.Index
	retained *topics.Retained[*Message]
	retMu    sync.Mutex // orders retained updates (setRetained, retainDecide)
	// retPending are retained updates decided (written in seq order) and
	// not yet applied, by topic: the newest (guarded by retMu).
	retPending map[string]*Message
	// retTomb are the versions of recently cleared topics (guarded by retMu).
	retTomb map[string]*Message

	mu        sync.RWMutex
	sessions  map[string]*session
	conns     map[*conn]struct{}
	listeners []net.Listener
	closing   bool

	wg       sync.WaitGroup // connection readers and accept loops
	sharedRR atomic.Uint64
	stats    counters
	// statsMu guards statsScratch, the sessions Stats counts: kept from
	// call to call, so a scrape of a broker with many sessions makes no
	// garbage of their size (metrics are gathered every second).
	statsMu      sync.Mutex
	statsScratch []*session
	store        *store // nil: in memory only
	sentObs      SendObserver
	numObs       NumberObserver
	subObs       SubscriptionObserver
	started      time.Time
	done         chan struct{} // closed by Shutdown
	startOnce    sync.Once
	stopOnce     sync.Once
	idleOnce     sync.Once
	idleStop     sync.Once
	idle         atomic.Pointer[idlePoller] // nil until a connection idles
}

type counters struct {
	connections   atomic.Int64 // open now
	maxConns      atomic.Int64 // most open at once
	bytesIn       atomic.Int64
	bytesOut      atomic.Int64
	accepted      atomic.Int64
	received      atomic.Int64 // PUBLISH packets received
	sent          atomic.Int64 // PUBLISH packets queued to connections
	slowConsumers atomic.Int64
	stalls        atomic.Int64 // publishers held back for a subscriber's socket
	stallTimeouts atomic.Int64 // of which ran out (the QoS 0 message was dropped)
	idle          atomic.Int64 // connections parked in the idle poller
	refusedBusy   atomic.Int64 // connections refused beyond Limits.MaxClients
	dropped       sync.Map     // DropReason -> *atomic.Int64
}

// New returns a Server with opts.
func New(opts Options) *Server {
	opts.Limits.defaults()
	if opts.Log == nil {
		opts.Log = slog.Default()
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	s := &Server{
		opts:     opts,
		lim:      opts.Limits,
		log:      opts.Log,
		now:      opts.Now,
		index:    topics.NewIndex(),
		retained: topics.NewRetained[*Message](),
		sessions: map[string]*session{},
		conns:    map[*conn]struct{}{},
		started:  opts.Now(),
		done:     make(chan struct{}),
	}
	if cl := opts.Cluster; cl != nil {
		s.index.OnFilter = cl.Interest
	}
	s.sentObs, _ = opts.Observer.(SendObserver)
	s.numObs, _ = opts.Observer.(NumberObserver)
	s.subObs, _ = opts.Observer.(SubscriptionObserver)
	if p := opts.Persistence; p != nil {
		s.store = &store{db: p.DB, log: p.Log, ids: p.Identities, nt: newNotifier(), gen: uint64(opts.Now().UnixNano())}
	}
	return s
}

// startLoops starts the background work (expiry sweeper, $SYS) once the
// server is put to use: by Load or the first Serve or ServeConn, so that
// nothing is routed while the embedder is still wiring its observers.
func (s *Server) startLoops() {
	s.startOnce.Do(func() {
		s.mu.Lock()
		defer s.mu.Unlock()
		if s.closing {
			return
		}
		s.wg.Add(1)
		go s.sweepExpired(time.Second, s.done)
		if s.opts.SysInterval > 0 {
			s.wg.Add(1)
			go s.sysLoop(s.opts.SysInterval, s.done)
		}
	})
}

// ErrServerClosed is returned by Serve and ServeConn after Shutdown.
var ErrServerClosed = errors.New("engine: server closed")

// Serve accepts connections from ln until ln is closed or the server shuts
// down. listener names the listener in ClientInfo ("tcp", "tls", ...).
func (s *Server) Serve(ln net.Listener, listener string) error {
	s.startLoops()
	s.mu.Lock()
	if s.closing {
		s.mu.Unlock()
		return ErrServerClosed
	}
	s.listeners = append(s.listeners, ln)
	s.wg.Add(1)
	s.mu.Unlock()
	defer s.wg.Done()
	var backoff time.Duration
	for {
		nc, err := ln.Accept()
		if err != nil {
			if s.isClosing() || errors.Is(err, net.ErrClosed) {
				return nil
			}
			// Out of file descriptors or similar: wait, do not spin.
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			s.log.Warn("accept failed", "listener", listener, "error", err, "retry_in", backoff)
			time.Sleep(backoff)
			continue
		}
		backoff = 0
		if tc, ok := nc.(*net.TCPConn); ok {
			_ = tc.SetNoDelay(true)
		}
		_ = s.ServeConn(nc, listener, false)
	}
}

// ServeConn serves one connection. With wait it returns when the
// connection ends; otherwise at once.
func (s *Server) ServeConn(nc net.Conn, listener string, wait bool) error {
	s.startLoops()
	c := newConn(s, nc, listener)
	s.mu.Lock()
	if s.closing {
		s.mu.Unlock()
		_ = nc.Close()
		return ErrServerClosed
	}
	if s.lim.MaxClients > 0 && len(s.conns) >= s.lim.MaxClients {
		s.mu.Unlock()
		s.stats.refusedBusy.Add(1)
		// CONNACK "server busy" needs the CONNECT; read it with a short deadline.
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			c.refuseBusy()
		}()
		return nil
	}
	s.conns[c] = struct{}{}
	s.wg.Add(1)
	s.mu.Unlock()
	s.stats.accepted.Add(1)
	if n := s.stats.connections.Add(1); n > s.stats.maxConns.Load() {
		s.stats.maxConns.Store(n)
	}
	if wait {
		// The caller owns nc until ServeConn returns: never idle away.
		c.noPark = true
		s.run(c)
		return nil
	}
	go s.run(c)
	return nil
}

func (s *Server) run(c *conn) {
	if !c.serve() {
		s.finish(c)
	}
}

// finish forgets an ended connection.
func (s *Server) finish(c *conn) {
	if p := s.idle.Load(); p != nil && c.in.watched.Load() {
		p.forget(c)
	}
	s.mu.Lock()
	delete(s.conns, c)
	s.mu.Unlock()
	s.stats.connections.Add(-1)
	s.wg.Done()
}

// idlePoller returns the poller of idle connections, started on first
// use; nil if the system has none or the server is shutting down.
func (s *Server) idlePoller() *idlePoller {
	s.idleOnce.Do(func() {
		s.mu.Lock()
		defer s.mu.Unlock()
		if s.closing {
			return
		}
		p, err := newIdlePoller(s.log)
		if err != nil {
			s.log.Warn("idle connections keep their reader goroutine", "error", err)
			return
		}
		s.idle.Store(p)
	})
	return s.idle.Load()
}

func (s *Server) isClosing() bool {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.closing
}

// Shutdown stops accepting, disconnects every client (v5: "server shutting
// down"), and waits for the connections to end or ctx to be done. Wills
// of the disconnected clients are not sent (a broker restart is not a
// client failure). It is idempotent.
func (s *Server) Shutdown(ctx context.Context) error {
	s.mu.Lock()
	first := !s.closing
	s.closing = true
	lns := s.listeners
	conns := make([]*conn, 0, len(s.conns))
	for c := range s.conns {
		conns = append(conns, c)
	}
	s.mu.Unlock()
	if first {
		close(s.done)
		for _, ln := range lns {
			_ = ln.Close()
		}
	}
	for _, c := range conns {
		c.close(errShutdown, codeServerShuttingDown, "server shutting down")
	}
	// No will or expiry fires from here on: a stop is not a client failure.
	s.mu.Lock()
	for _, ss := range s.sessions {
		ss.mu.Lock()
		if ss.willTimer != nil {
			ss.willTimer.Stop()
		}
		if ss.expireTimer != nil {
			ss.expireTimer.Stop()
		}
		ss.mu.Unlock()
	}
	s.mu.Unlock()
	done := make(chan struct{})
	go func() {
		s.wg.Wait()
		close(done)
	}()
	var err error
	select {
	case <-done:
	case <-ctx.Done():
		err = ctx.Err()
	}
	if s.store != nil {
		s.stopOnce.Do(s.store.nt.stop)
	}
	s.idleOnce.Do(func() {}) // none starts from now on
	if p := s.idle.Load(); p != nil {
		s.idleStop.Do(p.stop)
	}
	return err
}

var errShutdown = errors.New("server shutting down")

// session returns the session of a client id, or nil.
func (s *Server) session(id string) *session {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.sessions[id]
}

func (s *Server) dropped(r DropReason, client string, m *Message) {
	v, ok := s.stats.dropped.Load(r)
	if !ok {
		v, _ = s.stats.dropped.LoadOrStore(r, new(atomic.Int64))
	}
	v.(*atomic.Int64).Add(1)
	if o := s.opts.Observer; o != nil {
		o.Dropped(r, client, m)
	}
}

// Stats are the engine's counters.
type Stats struct {
	Connections   int64 // open now
	Accepted      int64 // connections accepted since start
	Sessions      int   // sessions, connected or not
	Subscriptions int
	Retained      int
	Received      int64 // PUBLISH packets received from clients
	Sent          int64 // PUBLISH packets sent to clients
	SlowConsumers int64 // connections closed because a write timed out
	Stalls        int64 // QoS 0 deliveries a publisher waited for (a subscriber's outbound budget was full)
	StallTimeouts int64 // of which waited Limits.PublisherStall in vain (and were dropped as queue_full)
	Idle          int   // connections idle in the idle poller (no reader goroutine)
	Inflight      int   // outbound QoS 1/2 messages in flight or queued, all sessions
	Dropped       map[DropReason]int64
	// RefusedMaxClients counts connections refused (CONNACK 0x89 / 3.1.1
	// 0x03) because Limits.MaxClients were open.
	RefusedMaxClients int64
}

// Stats returns the counters.
func (s *Server) Stats() Stats {
	st := Stats{
		Connections:   s.stats.connections.Load(),
		Accepted:      s.stats.accepted.Load(),
		Received:      s.stats.received.Load(),
		Sent:          s.stats.sent.Load(),
		SlowConsumers: s.stats.slowConsumers.Load(),
		Stalls:        s.stats.stalls.Load(),
		StallTimeouts: s.stats.stallTimeouts.Load(),
		Idle:          int(s.stats.idle.Load()),
		Subscriptions: s.index.Len(),
		Retained:      s.retained.Len(),
		Dropped:       map[DropReason]int64{},
	}
	st.RefusedMaxClients = s.stats.refusedBusy.Load()
	s.statsMu.Lock()
	s.mu.RLock()
	st.Sessions = len(s.sessions)
	sess := s.statsScratch[:0]
	for _, ss := range s.sessions {
		sess = append(sess, ss)
	}
	s.mu.RUnlock()
	for _, ss := range sess {
		ss.mu.Lock()
		st.Inflight += len(ss.out) + len(ss.queue)
		ss.mu.Unlock()
	}
	clear(sess) // ended sessions are not held for the next call
	if cap(sess) > 2*st.Sessions+1024 {
		sess = nil // after a storm of sessions that ended
	}
	s.statsScratch = sess[:0]
	s.statsMu.Unlock()
	s.stats.dropped.Range(func(k, v any) bool {
		st.Dropped[k.(DropReason)] = v.(*atomic.Int64).Load()
		return true
	})
	return st
}
