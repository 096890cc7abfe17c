package broker

import (
	"errors"
	"log/slog"
	"net"
	"sync/atomic"
	"time"

	"github.com/mochi-mqtt/server/v2/listeners"
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
		go func() {
			if err := establish(l.id, conn); err != nil {
				l.log.Debug("connection ended", "remote", conn.RemoteAddr().String(), "error", err)
			}
		}()
	}
}

// Close stops accepting and disconnects this listener's clients.
func (l *tcpListener) Close(closeClients listeners.CloseFn) {
	if l.end.CompareAndSwap(false, true) {
		_ = l.ln.Close()
		closeClients(l.id)
	}
}
