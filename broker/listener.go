package broker

import (
	"errors"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/listeners"
	"github.com/mochi-mqtt/server/v2/packets"
)

// tcpListener is our mochi listener for MQTT over TCP and TLS. Unlike
// mochi's, it binds when it is created (so the bound address of ":0" is
// known and a bind error stops startup), gives a connection a deadline to
// send CONNECT (mochi waits forever, so idle sockets would pile up), and
// logs ended connections at debug level rather than as warnings.
type tcpListener struct {
	id             string
	protocol       string
	ln             net.Listener
	connectTimeout time.Duration
	log            *slog.Logger
	end            atomic.Bool
	conns          sync.Map // *lingerConn: every open connection, CONNECT sent or not
}

var _ listeners.Listener = (*tcpListener)(nil)

func (l *tcpListener) ID() string       { return l.id }
func (l *tcpListener) Address() string  { return l.ln.Addr().String() }
func (l *tcpListener) Protocol() string { return l.protocol }

func (l *tcpListener) Init(log *slog.Logger) error {
	l.log = log
	return nil
}

// Serve accepts connections until Close.
func (l *tcpListener) Serve(establish listeners.EstablishFn) {
	var backoff time.Duration
	for {
		conn, err := l.ln.Accept()
		if err != nil {
			if l.end.Load() || errors.Is(err, net.ErrClosed) {
				return
			}
			// Out of file descriptors or similar: wait, do not spin.
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			l.log.Warn("accept failed", "error", err, "retry_in", backoff)
			time.Sleep(backoff)
			continue
		}
		backoff = 0
		if tc, ok := conn.(*net.TCPConn); ok {
			_ = tc.SetNoDelay(true)
		}
		// mochi replaces this deadline with the keep-alive one after CONNECT.
		_ = conn.SetDeadline(time.Now().Add(l.connectTimeout))
		lc := &lingerConn{Conn: conn}
		l.conns.Store(lc, struct{}{})
		if l.end.Load() {
			// Close ran between Accept and Store, so its sweep of conns
			// missed this one: a client it let connect would hold
			// mochi's Close (which waits for every client) until the
			// client left.
			l.conns.Delete(lc)
			lc.Finish(nil)
			return
		}
		go func() {
			defer l.conns.Delete(lc)
			if err := establish(l.id, lc); err != nil {
				l.log.Debug("connection ended", "remote", lc.RemoteAddr().String(), "error", err)
			}
		}()
	}
}

// Close stops accepting and disconnects this listener's clients.
func (l *tcpListener) Close(closeClients listeners.CloseFn) {
	if l.end.CompareAndSwap(false, true) {
		_ = l.ln.Close()
		closeClients(l.id)
		// Connections that never sent CONNECT are not mochi clients yet.
		l.conns.Range(func(k, _ any) bool {
			k.(*lingerConn).Finish(nil)
			return true
		})
	}
}

// shutdownSafe wraps every listener Beacon adds to mochi, around two
// races in mochi's Server.Close:
//
//   - Close hands each listener a callback that disconnects its clients
//     through Clients.GetByListener, which read-locks the clients map and
//     then read-locks it again (Clients.Len). A client connecting or
//     leaving in between (a writer waiting on the lock) blocks the second
//     read lock forever, and the shutdown with it. The listener gets
//     disconnectClients instead, which takes the lock once.
//   - A connection joins the wait group Close waits on from inside
//     EstablishConnection (ClientsWg.Add in attachClient), so one that
//     starts while Close waits races with the Wait (the race detector
//     says so). Here Close returns only once mochi is done with every
//     connection it let in, and no connection is let in after.
type shutdownSafe struct {
	listeners.Listener
	srv    *mqtt.Server
	mu     sync.RWMutex // held for reading while mochi serves a connection
	closed bool         // guarded by mu
}

func (l *shutdownSafe) Serve(establish listeners.EstablishFn) {
	l.Listener.Serve(func(id string, c net.Conn) error {
		l.mu.RLock()
		defer l.mu.RUnlock()
		if l.closed {
			_ = c.Close()
			return net.ErrClosed
		}
		return establish(id, c)
	})
}

// Close closes the listener, which disconnects its clients and closes
// every connection it accepted, then waits until mochi has let go of
// each.
func (l *shutdownSafe) Close(listeners.CloseFn) {
	l.Listener.Close(func(id string) { disconnectClients(l.srv, id) })
	l.mu.Lock()
	l.closed = true
	l.mu.Unlock()
}

// disconnectClients does what mochi's closeListenerClients does: every
// open client of the listener gets a DISCONNECT "server shutting down".
func disconnectClients(srv *mqtt.Server, listener string) {
	for _, cl := range srv.Clients.GetAll() {
		if cl.Net.Listener == listener && !cl.Closed() {
			_ = srv.DisconnectClient(cl, packets.ErrServerShuttingDown)
		}
	}
}

// lingerTime bounds how long a connection mochi has closed stays open for
// a final DISCONNECT from the hooks (see lingerConn).
const lingerTime = 250 * time.Millisecond

// lingerConn lets a hook send MQTT 5 clients the reason their connection
// ends. mochi closes the socket on a read error (malformed packet, packet
// too large, keep-alive timeout) and only then calls OnDisconnect; here a
// Close by mochi only stops reading, and the socket really closes when the
// hook calls Finish or after lingerTime.
type lingerConn struct {
	net.Conn
	mu             sync.Mutex
	closing        bool
	finished       bool
	sentDisconnect bool
	timer          *time.Timer
}

func (c *lingerConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	if len(p) > 0 && p[0] == 0xe0 { // a DISCONNECT from mochi itself
		c.sentDisconnect = true
	}
	c.mu.Unlock()
	return c.Conn.Write(p)
}

// Close stops reads at once and closes the socket later (or in Finish).
func (c *lingerConn) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closing || c.finished {
		return nil
	}
	c.closing = true
	_ = c.Conn.SetReadDeadline(time.Now())
	c.timer = time.AfterFunc(lingerTime, func() { c.Finish(nil) })
	return nil
}

// Finish writes final (unless a DISCONNECT was already sent) and closes
// the socket. It is safe to call more than once.
func (c *lingerConn) Finish(final []byte) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.finished {
		return
	}
	c.finished = true
	if c.timer != nil {
		c.timer.Stop()
	}
	if len(final) > 0 && !c.sentDisconnect {
		_ = c.Conn.SetWriteDeadline(time.Now().Add(time.Second))
		_, _ = c.Conn.Write(final)
	}
	_ = c.Conn.Close()
}
