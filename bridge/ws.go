package bridge

import (
	"bufio"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gorilla/websocket"

	"github.com/beaconmq/beacon/devices"
)

// ConnServer is the engine as the WebSocket bridge needs it: something
// that serves an MQTT connection over any net.Conn.
type ConnServer interface {
	// ServeConn serves one connection; with wait it returns when the
	// connection ends.
	ServeConn(nc net.Conn, listener string, wait bool) error
}

// WSListener is the listener name the WebSocket connections are served
// under, for the engine's logs and metrics.
const WSListener = "ws"

// WSOptions configures NewWS.
type WSOptions struct {
	Guard          *Guard
	Tokens         *devices.TokenVerifier // nil: no JWT
	Throttle       *devices.Throttle      // failed authentications by client address, shared with MQTT; nil: none
	MaxMessageSize int64                  // read limit per WebSocket message: the max packet size
	PingInterval   time.Duration          // WebSocket pings; default 30s
	// WriteTimeout bounds a WebSocket ping and, once the engine is done
	// with a connection, the writing of its last bytes; default 10s. The
	// engine sets its own deadline on every write.
	WriteTimeout time.Duration
	Log          *slog.Logger
}

// WS is MQTT over WebSocket: an http.Handler that upgrades the handshake
// and hands the connection, as a byte stream, to the engine.
type WS struct {
	opts     WSOptions
	upgrader websocket.Upgrader

	mu     sync.Mutex
	srv    ConnServer
	closed bool
	conns  map[*wsConn]struct{} // every upgraded connection still open
	active sync.WaitGroup       // handlers running; Add only under mu while !closed

	refusedRate, refusedConns atomic.Int64 // handshakes the Guard refused, by reason
}

// Refused counts the handshakes the Guard refused, by reason:
// "handshake_rate" (http.handshakes_per_second) and
// "connections_per_address" (http.max_conns_per_ip).
func (w *WS) Refused() map[string]int64 {
	return map[string]int64{"handshake_rate": w.refusedRate.Load(), "connections_per_address": w.refusedConns.Load()}
}

// NewWS returns the bridge. It answers handshakes with 503 until Serve.
func NewWS(o WSOptions) *WS {
	if o.PingInterval <= 0 {
		o.PingInterval = 30 * time.Second
	}
	if o.WriteTimeout <= 0 {
		o.WriteTimeout = 10 * time.Second
	}
	w := &WS{opts: o, conns: map[*wsConn]struct{}{}}
	w.upgrader = websocket.Upgrader{
		HandshakeTimeout: 10 * time.Second,
		Subprotocols:     subprotocols,
		CheckOrigin:      func(*http.Request) bool { return true }, // checked before Upgrade, with a clear answer
		// A write buffer only while writing: an idle connection holds none.
		WriteBufferPool: &sync.Pool{},
	}
	return w
}

// subprotocols are the MQTT WebSocket subprotocols, in order of preference.
var subprotocols = []string{"mqtt", "mqttv3.1"}

// Serve starts handing upgraded connections to srv (the engine), under
// the listener name WSListener.
func (w *WS) Serve(srv ConnServer) {
	w.mu.Lock()
	w.srv = srv
	w.mu.Unlock()
}

// Shutdown refuses new handshakes, closes every open connection and waits,
// within ctx, for their handlers to return. Call it after the engine's
// Shutdown, which says goodbye to MQTT 5 clients; what is left (a
// connection the engine refused or has not registered yet) is cut here.
// It is idempotent.
func (w *WS) Shutdown(ctx context.Context) error {
	w.mu.Lock()
	w.closed = true
	open := make([]*wsConn, 0, len(w.conns))
	for c := range w.conns {
		open = append(open, c)
	}
	w.mu.Unlock()
	for _, c := range open {
		_ = c.Close()
	}
	done := make(chan struct{})
	go func() {
		w.active.Wait()
		close(done)
	}()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// enter counts a handler in, unless the bridge is not serving.
func (w *WS) enter() (ConnServer, bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.srv == nil || w.closed {
		return nil, false
	}
	w.active.Add(1)
	return w.srv, true
}

// track records an upgraded connection, unless Shutdown has begun.
func (w *WS) track(c *wsConn) bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.closed {
		return false
	}
	w.conns[c] = struct{}{}
	return true
}

func (w *WS) untrack(c *wsConn) {
	w.mu.Lock()
	delete(w.conns, c)
	w.mu.Unlock()
}

func httpError(rw http.ResponseWriter, code int, msg string) {
	rw.Header().Set("Content-Type", "text/plain; charset=utf-8")
	rw.Header().Set("X-Content-Type-Options", "nosniff")
	rw.WriteHeader(code)
	_, _ = io.WriteString(rw, msg+"\n")
}

func offersMQTT(r *http.Request) bool {
	for _, p := range websocket.Subprotocols(r) {
		for _, s := range subprotocols {
			if p == s {
				return true
			}
		}
	}
	return false
}

// ServeHTTP upgrades an MQTT-over-WebSocket handshake and serves the
// connection until it ends. Everything that can be refused is refused
// before the upgrade, with a status and a reason.
func (w *WS) ServeHTTP(rw http.ResponseWriter, r *http.Request) {
	srv, ok := w.enter()
	if !ok {
		httpError(rw, http.StatusServiceUnavailable, "broker not ready")
		return
	}
	defer w.active.Done()
	if !websocket.IsWebSocketUpgrade(r) {
		httpError(rw, http.StatusBadRequest, "this endpoint speaks MQTT over WebSocket: send a WebSocket upgrade offering subprotocol mqtt")
		return
	}
	if !w.opts.Guard.CheckOrigin(r) {
		w.opts.Log.Info("websocket refused: origin not allowed", "origin", r.Header.Get("Origin"), "remote", r.RemoteAddr)
		httpError(rw, http.StatusForbidden, w.opts.Guard.OriginRefusal(r))
		return
	}
	if !offersMQTT(r) {
		httpError(rw, http.StatusBadRequest, "no MQTT subprotocol offered: use Sec-WebSocket-Protocol: mqtt (or mqttv3.1)")
		return
	}
	client := w.opts.Guard.ClientAddr(r)
	release, status, reason := w.opts.Guard.Admit(client.Addr())
	if release == nil {
		if RefusalLabel(reason) == "handshake_rate" {
			w.refusedRate.Add(1)
		} else {
			w.refusedConns.Add(1)
		}
		httpError(rw, status, reason)
		return
	}
	defer release() // when the connection ends: the per-address limit counts open connections

	var principal *devices.Principal
	if tok, ok := RequestToken(r); ok {
		if w.opts.Tokens == nil {
			httpError(rw, http.StatusUnauthorized, "tokens are not configured on this broker")
			return
		}
		at, ok := admitAuth(w.opts.Throttle, client.Addr(), rw, func(code int, msg string) { httpError(rw, code, msg) })
		if !ok {
			return
		}
		p, err := w.opts.Tokens.Verify(tok, time.Now())
		if err != nil {
			at.Failed()
			rw.Header().Set("WWW-Authenticate", `Bearer realm="beacon", error="invalid_token"`)
			httpError(rw, http.StatusUnauthorized, err.Error())
			return
		}
		at.Succeeded()
		principal = &p
	}

	hj := &hijacker{ResponseWriter: rw}
	ws, err := w.upgrader.Upgrade(hj, r, nil)
	if err != nil {
		return // the upgrader has answered
	}
	if w.opts.MaxMessageSize > 0 {
		ws.SetReadLimit(w.opts.MaxMessageSize)
	}
	c := newWSConn(ws, hj.nc, tcpAddr(client), principal, w.opts.PingInterval, w.opts.WriteTimeout)
	if !w.track(c) { // Shutdown ran since enter
		_ = c.Close()
		return
	}
	defer w.untrack(c)
	if err := srv.ServeConn(c, WSListener, true); err != nil {
		w.opts.Log.Debug("websocket connection not served", "remote", client.String(), "error", err)
	}
	// The engine closes the socket once its last bytes (a DISCONNECT) are
	// written; do not cut them, but do not wait for ever either.
	t := time.NewTimer(w.opts.WriteTimeout)
	defer t.Stop()
	select {
	case <-c.done:
	case <-t.C:
	}
	_ = c.Close()
}

// hijacker hands gorilla the hijacked socket wrapped in a socket, which
// arbitrates its write deadline.
type hijacker struct {
	http.ResponseWriter
	nc *socket
}

func (h *hijacker) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	hj, ok := h.ResponseWriter.(http.Hijacker)
	if !ok {
		return nil, nil, errors.New("websocket: response does not implement http.Hijacker")
	}
	nc, brw, err := hj.Hijack()
	if err != nil {
		return nil, nil, err
	}
	h.nc = &socket{Conn: nc}
	return h.nc, brw, nil
}

// socket is the network connection under gorilla. gorilla sets a write
// deadline before each frame it writes, from a field it reads without a
// lock; wsConn's write deadline must also reach a write in progress. So
// while wsConn writes a message, its deadline replaces gorilla's, and
// outside (pings, close frames) gorilla's own applies.
type socket struct {
	net.Conn
	mu      sync.Mutex
	writing bool      // wsConn is writing a message
	dl      time.Time // wsConn's write deadline
}

// SetWriteDeadline is gorilla's.
func (s *socket) SetWriteDeadline(t time.Time) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.writing {
		t = s.dl
	}
	return s.Conn.SetWriteDeadline(t)
}

// setWriteDeadline is wsConn's.
func (s *socket) setWriteDeadline(t time.Time) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.dl = t
	if s.writing {
		return s.Conn.SetWriteDeadline(t)
	}
	return nil
}

func (s *socket) setWriting(on bool) {
	s.mu.Lock()
	s.writing = on
	s.mu.Unlock()
}

// wsConn is a WebSocket connection seen as the byte stream the engine
// reads and writes: binary messages in (a read returns bytes of one
// message, whatever their framing), one binary message per write out.
// Deadlines behave as net.Conn's, for pending calls too; as with
// gorilla/websocket, a read or write that fails (a timeout included)
// fails every later one. Close unblocks a pending Read and Write.
type wsConn struct {
	ws          *websocket.Conn
	nc          *socket
	remote      net.Addr
	principal   *devices.Principal
	ctlTimeout  time.Duration // pings and the close frame
	done        chan struct{} // closed by Close
	closeOnce   sync.Once
	readMu      sync.Mutex // one Read at a time
	reader      io.Reader  // the message being read; under readMu
	readErr     error      // ends every later Read; under readMu
	writeMu     sync.Mutex // one Write at a time
	pingMu      sync.Mutex
	ping        *time.Timer // under pingMu
	pingStopped bool        // under pingMu
}

// closeFrameTimeout bounds the close frame Close sends: a peer that does
// not take it within this is cut without it.
const closeFrameTimeout = 100 * time.Millisecond

func newWSConn(ws *websocket.Conn, nc *socket, remote net.Addr, p *devices.Principal, ping, ctlTimeout time.Duration) *wsConn {
	c := &wsConn{ws: ws, nc: nc, remote: remote, principal: p, ctlTimeout: ctlTimeout, done: make(chan struct{})}
	// Pongs need no handler: they are read (and dropped) by a pending
	// Read, and a dead peer fails a later ping's write. A timer, not a
	// goroutine, per connection. A message being written is bounded by
	// its own deadline: the ping waits for the next round.
	var schedule func()
	schedule = func() {
		c.pingMu.Lock()
		defer c.pingMu.Unlock()
		if c.pingStopped {
			return
		}
		c.ping = time.AfterFunc(ping, func() {
			if c.writeMu.TryLock() {
				err := c.ws.WriteControl(websocket.PingMessage, nil, time.Now().Add(c.ctlTimeout))
				c.writeMu.Unlock()
				if err != nil {
					_ = c.Close()
					return
				}
			}
			schedule()
		})
	}
	schedule()
	return c
}

// HandshakePrincipal is the identity the HTTP handshake proved (a JWT in
// the Authorization header or the beacon_token cookie), if any.
func (c *wsConn) HandshakePrincipal() (devices.Principal, bool) {
	if c.principal == nil {
		return devices.Principal{}, false
	}
	return *c.principal, true
}

var errTextFrame = errors.New("websocket: text frame received; MQTT uses binary frames")

func (c *wsConn) isClosed() bool {
	select {
	case <-c.done:
		return true
	default:
		return false
	}
}

// Read reads bytes of the current binary message, moving on to the next
// message when it is used up. A close frame from the peer reads as io.EOF.
func (c *wsConn) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	c.readMu.Lock()
	defer c.readMu.Unlock()
	for {
		switch {
		case c.isClosed():
			return 0, net.ErrClosed
		case c.readErr != nil:
			return 0, c.readErr
		}
		if c.reader == nil {
			mt, r, err := c.ws.NextReader()
			if err != nil {
				var ce *websocket.CloseError
				if errors.As(err, &ce) {
					err = io.EOF // the peer closed, as a TCP FIN
				}
				c.readErr = err
				return 0, err
			}
			if mt != websocket.BinaryMessage {
				c.readErr = errTextFrame
				_ = c.ws.WriteControl(websocket.CloseMessage,
					websocket.FormatCloseMessage(websocket.CloseUnsupportedData, "binary frames only"), time.Now().Add(c.ctlTimeout))
				return 0, errTextFrame
			}
			c.reader = r
		}
		n, err := c.reader.Read(p)
		if errors.Is(err, io.EOF) {
			c.reader = nil // the end of a message, not of the stream
			err = nil
		}
		if n > 0 || err != nil {
			return n, err
		}
	}
}

// Write sends p as one binary message, within the write deadline.
func (c *wsConn) Write(p []byte) (int, error) {
	c.writeMu.Lock()
	defer c.writeMu.Unlock()
	if c.isClosed() {
		return 0, net.ErrClosed
	}
	if len(p) == 0 {
		return 0, nil
	}
	c.nc.setWriting(true)
	defer c.nc.setWriting(false)
	if err := c.ws.WriteMessage(websocket.BinaryMessage, p); err != nil {
		if c.isClosed() {
			err = net.ErrClosed
		}
		return 0, err
	}
	return len(p), nil
}

// Close sends a close frame if no write is in progress and the peer
// takes it at once, then closes the socket, which ends a pending Read or
// Write. It is safe to call more than once and from any goroutine.
func (c *wsConn) Close() error {
	c.closeOnce.Do(func() {
		close(c.done)
		c.pingMu.Lock()
		c.pingStopped = true
		if c.ping != nil {
			c.ping.Stop()
		}
		c.pingMu.Unlock()
		if c.writeMu.TryLock() {
			_ = c.ws.WriteControl(websocket.CloseMessage, websocket.FormatCloseMessage(websocket.CloseNormalClosure, ""),
				time.Now().Add(closeFrameTimeout))
			c.writeMu.Unlock()
		}
		_ = c.ws.Close()
	})
	return nil
}

func (c *wsConn) LocalAddr() net.Addr  { return c.ws.LocalAddr() }
func (c *wsConn) RemoteAddr() net.Addr { return c.remote }

func (c *wsConn) SetDeadline(t time.Time) error {
	_ = c.SetWriteDeadline(t)
	return c.SetReadDeadline(t)
}

func (c *wsConn) SetReadDeadline(t time.Time) error  { return c.nc.SetReadDeadline(t) }
func (c *wsConn) SetWriteDeadline(t time.Time) error { return c.nc.setWriteDeadline(t) }

var _ net.Conn = (*wsConn)(nil)
