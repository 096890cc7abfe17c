package bridge

import (
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gorilla/websocket"
	"github.com/mochi-mqtt/server/v2/listeners"

	"github.com/beaconmq/beacon/devices"
)

// WSOptions configures NewWS.
type WSOptions struct {
	Guard          *Guard
	Tokens         *devices.TokenVerifier // nil: no JWT
	MaxMessageSize int64                  // read limit per WebSocket message: the max packet size
	PingInterval   time.Duration          // WebSocket pings; default 30s
	WriteTimeout   time.Duration          // per write; default 10s
	Log            *slog.Logger
}

// WS is MQTT over WebSocket: an http.Handler for the upgrade, and the
// mochi listener through which the upgraded connections enter the broker.
type WS struct {
	opts     WSOptions
	upgrader websocket.Upgrader
	mu       sync.RWMutex
	est      listeners.EstablishFn
	closed   atomic.Bool
	address  string
	conns    sync.Map // *wsConn: every open connection, CONNECT sent or not
}

// connectTimeout is how long a new connection has to send CONNECT.
const connectTimeout = 10 * time.Second

var _ listeners.Listener = (*WS)(nil)

// NewWS returns the bridge.
func NewWS(o WSOptions) *WS {
	if o.PingInterval <= 0 {
		o.PingInterval = 30 * time.Second
	}
	if o.WriteTimeout <= 0 {
		o.WriteTimeout = 10 * time.Second
	}
	w := &WS{opts: o}
	w.upgrader = websocket.Upgrader{
		HandshakeTimeout: 10 * time.Second,
		Subprotocols:     subprotocols,
		CheckOrigin:      func(*http.Request) bool { return true }, // checked before Upgrade, with a clear answer
	}
	return w
}

// subprotocols are the MQTT WebSocket subprotocols, in order of preference.
var subprotocols = []string{"mqtt", "mqttv3.1"}

// SetAddress records the HTTP address, for mochi's listener logs.
func (w *WS) SetAddress(a string) { w.address = a }

// ID implements listeners.Listener.
func (w *WS) ID() string { return "ws" }

// Address implements listeners.Listener.
func (w *WS) Address() string { return w.address }

// Protocol implements listeners.Listener.
func (w *WS) Protocol() string { return "ws" }

// Init implements listeners.Listener.
func (w *WS) Init(*slog.Logger) error { return nil }

// Serve implements listeners.Listener: connections come from ServeHTTP.
func (w *WS) Serve(est listeners.EstablishFn) {
	w.mu.Lock()
	w.est = est
	w.mu.Unlock()
}

// Close implements listeners.Listener.
func (w *WS) Close(closeClients listeners.CloseFn) {
	if w.closed.CompareAndSwap(false, true) {
		closeClients(w.ID())
		// Connections that never sent CONNECT are not mochi clients yet.
		w.conns.Range(func(k, _ any) bool {
			k.(*wsConn).Finish(nil)
			return true
		})
	}
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
	w.mu.RLock()
	est := w.est
	w.mu.RUnlock()
	if est == nil || w.closed.Load() {
		httpError(rw, http.StatusServiceUnavailable, "broker not ready")
		return
	}
	if !websocket.IsWebSocketUpgrade(r) {
		httpError(rw, http.StatusBadRequest, "this endpoint speaks MQTT over WebSocket: send a WebSocket upgrade offering subprotocol mqtt")
		return
	}
	if !w.opts.Guard.CheckOrigin(r) {
		w.opts.Log.Info("websocket refused: origin not allowed", "origin", r.Header.Get("Origin"), "remote", r.RemoteAddr)
		httpError(rw, http.StatusForbidden, "origin not allowed (http.allowed_origins)")
		return
	}
	if !offersMQTT(r) {
		httpError(rw, http.StatusBadRequest, "no MQTT subprotocol offered: use Sec-WebSocket-Protocol: mqtt (or mqttv3.1)")
		return
	}
	client := w.opts.Guard.ClientAddr(r)
	release, status, reason := w.opts.Guard.Admit(client.Addr())
	if release == nil {
		httpError(rw, status, reason)
		return
	}
	defer release()

	var principal *devices.Principal
	if tok, ok := RequestToken(r); ok {
		if w.opts.Tokens == nil {
			httpError(rw, http.StatusUnauthorized, "tokens are not configured on this broker")
			return
		}
		p, err := w.opts.Tokens.Verify(tok, time.Now())
		if err != nil {
			rw.Header().Set("WWW-Authenticate", `Bearer realm="beacon", error="invalid_token"`)
			httpError(rw, http.StatusUnauthorized, err.Error())
			return
		}
		principal = &p
	}

	c, err := w.upgrader.Upgrade(rw, r, nil)
	if err != nil {
		return // the upgrader has answered
	}
	if w.opts.MaxMessageSize > 0 {
		c.SetReadLimit(w.opts.MaxMessageSize)
	}
	conn := newWSConn(c, tcpAddr(client), principal, w.opts.PingInterval, w.opts.WriteTimeout)
	w.conns.Store(conn, struct{}{})
	defer w.conns.Delete(conn)
	// mochi replaces this deadline with the keep-alive one after CONNECT.
	_ = c.SetReadDeadline(time.Now().Add(connectTimeout))
	if w.closed.Load() { // Close ran between the check above and Store
		conn.Finish(nil)
		return
	}
	if err := est(w.ID(), conn); err != nil {
		w.opts.Log.Debug("websocket connection ended", "remote", client.String(), "error", err)
	}
	conn.Finish(nil)
}

// wsConn is a WebSocket connection seen as the byte stream mochi expects:
// binary messages in, one binary message per write out. Like the TCP
// listener's connections, Close only stops reading; the hooks finish it
// (with a last DISCONNECT for MQTT 5 clients) or a timer does.
type wsConn struct {
	ws           *websocket.Conn
	remote       net.Addr
	principal    *devices.Principal
	writeTimeout time.Duration

	readMu sync.Mutex
	reader io.Reader

	writeMu        sync.Mutex
	mu             sync.Mutex
	closing        bool
	finished       bool
	sentDisconnect bool
	ping           *time.Timer
	linger         *time.Timer
}

func newWSConn(ws *websocket.Conn, remote net.Addr, p *devices.Principal, ping, writeTimeout time.Duration) *wsConn {
	c := &wsConn{ws: ws, remote: remote, principal: p, writeTimeout: writeTimeout}
	// Pongs need no handler: reading them keeps the connection alive, and a
	// dead peer fails a later ping's write. A timer, not a goroutine, per
	// connection.
	var schedule func()
	schedule = func() {
		c.mu.Lock()
		defer c.mu.Unlock()
		if c.finished {
			return
		}
		c.ping = time.AfterFunc(ping, func() {
			if err := c.ws.WriteControl(websocket.PingMessage, nil, time.Now().Add(c.writeTimeout)); err != nil {
				c.Finish(nil)
				return
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

func (c *wsConn) Read(p []byte) (int, error) {
	c.readMu.Lock()
	defer c.readMu.Unlock()
	for {
		if c.reader == nil {
			mt, r, err := c.ws.NextReader()
			if err != nil {
				return 0, err
			}
			if mt != websocket.BinaryMessage {
				c.closeWith(websocket.CloseUnsupportedData, "binary frames only")
				return 0, errTextFrame
			}
			c.reader = r
		}
		n, err := c.reader.Read(p)
		if errors.Is(err, io.EOF) {
			c.reader = nil
			if n > 0 {
				return n, nil
			}
			continue
		}
		return n, err
	}
}

func (c *wsConn) Write(p []byte) (int, error) {
	c.writeMu.Lock()
	defer c.writeMu.Unlock()
	if len(p) > 0 && p[0] == 0xe0 {
		c.mu.Lock()
		c.sentDisconnect = true
		c.mu.Unlock()
	}
	_ = c.ws.SetWriteDeadline(time.Now().Add(c.writeTimeout))
	if err := c.ws.WriteMessage(websocket.BinaryMessage, p); err != nil {
		return 0, err
	}
	return len(p), nil
}

func (c *wsConn) closeWith(code int, reason string) {
	_ = c.ws.WriteControl(websocket.CloseMessage, websocket.FormatCloseMessage(code, reason), time.Now().Add(time.Second))
}

// Close stops reads; the socket closes in Finish (or after a moment).
func (c *wsConn) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closing || c.finished {
		return nil
	}
	c.closing = true
	_ = c.ws.SetReadDeadline(time.Now())
	c.linger = time.AfterFunc(250*time.Millisecond, func() { c.Finish(nil) })
	return nil
}

// Finish writes final (an MQTT DISCONNECT, unless one was sent), a close
// frame, and closes the socket. It is safe to call more than once.
func (c *wsConn) Finish(final []byte) {
	c.mu.Lock()
	if c.finished {
		c.mu.Unlock()
		return
	}
	c.finished = true
	if c.linger != nil {
		c.linger.Stop()
	}
	if c.ping != nil {
		c.ping.Stop()
	}
	sent := c.sentDisconnect
	c.mu.Unlock()
	if len(final) > 0 && !sent {
		_, _ = c.Write(final)
	}
	c.closeWith(websocket.CloseNormalClosure, "")
	_ = c.ws.Close()
}

func (c *wsConn) LocalAddr() net.Addr                { return c.ws.LocalAddr() }
func (c *wsConn) RemoteAddr() net.Addr               { return c.remote }
func (c *wsConn) SetDeadline(t time.Time) error      { return c.ws.SetReadDeadline(t) }
func (c *wsConn) SetReadDeadline(t time.Time) error  { return c.ws.SetReadDeadline(t) }
func (c *wsConn) SetWriteDeadline(t time.Time) error { return nil } // every write has its own

var _ net.Conn = (*wsConn)(nil)
