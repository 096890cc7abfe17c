package bridge

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4/jwt"
	"github.com/gorilla/websocket"

	"github.com/beaconmq/beacon/devices"
)

// fakeEngine stands for the engine: it hands each connection to the test
// and, like ServeConn with wait, returns when the connection is closed.
type fakeEngine struct {
	conns chan *wsConn
}

func (f *fakeEngine) ServeConn(nc net.Conn, listener string, wait bool) error {
	c := nc.(*wsConn)
	if listener != WSListener || !wait {
		_ = c.Close()
		return errors.New("served as " + listener + " without wait")
	}
	f.conns <- c
	<-c.done
	return nil
}

type wsFixture struct {
	ws     *WS
	engine *fakeEngine
	url    string
}

const testSecret = "0123456789abcdef0123456789abcdef"

func startWS(t *testing.T, o WSOptions) *wsFixture {
	t.Helper()
	if o.Guard == nil {
		g, err := NewGuard(GuardOptions{AllowMissingOrigin: true, TrustedProxies: []string{"127.0.0.1"}})
		if err != nil {
			t.Fatal(err)
		}
		o.Guard = g
	}
	o.Log = slog.New(slog.DiscardHandler)
	f := &wsFixture{ws: NewWS(o), engine: &fakeEngine{conns: make(chan *wsConn, 4)}}
	f.ws.Serve(f.engine)
	srv := httptest.NewServer(f.ws)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := f.ws.Shutdown(ctx); err != nil {
			t.Errorf("shutdown: %v", err)
		}
		srv.Close()
	})
	f.url = "ws" + strings.TrimPrefix(srv.URL, "http")
	return f
}

// dial opens a client connection and returns it with the server's side.
func (f *wsFixture) dial(t *testing.T, h http.Header) (*websocket.Conn, *wsConn) {
	t.Helper()
	d := websocket.Dialer{Subprotocols: []string{"mqtt"}, HandshakeTimeout: 5 * time.Second}
	cl, resp, err := d.Dial(f.url, h)
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	resp.Body.Close()
	t.Cleanup(func() { cl.Close() })
	select {
	case c := <-f.engine.conns:
		return cl, c
	case <-time.After(5 * time.Second):
		t.Fatal("the connection did not reach the engine")
		return nil, nil
	}
}

// within fails the test unless fn returns within d.
func within(t *testing.T, d time.Duration, what string, fn func()) {
	t.Helper()
	done := make(chan struct{})
	go func() {
		defer close(done)
		fn()
	}()
	select {
	case <-done:
	case <-time.After(d):
		t.Fatalf("%s: still blocked after %v", what, d)
	}
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

func TestWSReadsAnySize(t *testing.T) {
	f := startWS(t, WSOptions{})
	cl, c := f.dial(t, nil)
	big := bytes.Repeat([]byte("0123456789"), 10_000) // 100 kB: many reads of a 4 KiB buffer
	msgs := [][]byte{{0x10}, []byte("ab"), {}, []byte("cdefgh"), big, []byte("tail")}
	var want []byte
	for _, m := range msgs {
		if err := cl.WriteMessage(websocket.BinaryMessage, m); err != nil {
			t.Fatal(err)
		}
		want = append(want, m...)
	}
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := c.Read(nil); n != 0 || err != nil {
		t.Fatalf("empty read: %d %v", n, err)
	}
	// As the engine does: one byte while idle, then through a bufio.Reader.
	var first [1]byte
	if n, err := c.Read(first[:]); n != 1 || err != nil || first[0] != 0x10 {
		t.Fatalf("one-byte read: %d %v %x", n, err, first)
	}
	if n, err := c.Read(first[:]); n != 1 || err != nil || first[0] != 'a' {
		t.Fatalf("one-byte read across a message boundary: %d %v %q", n, err, first)
	}
	got := append([]byte{0x10, 'a'}, make([]byte, len(want)-2)...)
	if _, err := io.ReadFull(bufio.NewReaderSize(c, 4096), got[2:]); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("read %d bytes, not what was sent (%d bytes)", len(got), len(want))
	}
}

func TestWSWriteIsOneBinaryMessage(t *testing.T) {
	f := startWS(t, WSOptions{})
	cl, c := f.dial(t, nil)
	for _, p := range [][]byte{{0x20, 0x02, 0, 0}, bytes.Repeat([]byte{0x30}, 70_000)} {
		if n, err := c.Write(p); n != len(p) || err != nil {
			t.Fatalf("write: %d %v", n, err)
		}
		mt, b, err := cl.ReadMessage()
		if err != nil || mt != websocket.BinaryMessage || !bytes.Equal(b, p) {
			t.Fatalf("client read type %d, %d bytes, %v; want binary, %d bytes", mt, len(b), err, len(p))
		}
	}
	if n, err := c.Write(nil); n != 0 || err != nil {
		t.Fatalf("empty write: %d %v", n, err)
	}
}

func TestWSReadDeadline(t *testing.T) {
	f := startWS(t, WSOptions{})
	_, c := f.dial(t, nil)
	// A deadline set before the read.
	_ = c.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
	start := time.Now()
	var b [1]byte
	if _, err := c.Read(b[:]); !isTimeout(err) {
		t.Fatalf("read past the deadline: %v, want a timeout", err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("timed out after %v", d)
	}

	// A deadline moved while a read waits (the engine's close does this).
	_, c = f.dial(t, nil)
	_ = c.SetDeadline(time.Time{})
	errc := make(chan error, 1)
	go func() {
		_, err := c.Read(b[:])
		errc <- err
	}()
	time.Sleep(20 * time.Millisecond) // let the read block; the result holds either way
	_ = c.SetReadDeadline(time.Now())
	select {
	case err := <-errc:
		if !isTimeout(err) {
			t.Fatalf("pending read after SetReadDeadline(now): %v, want a timeout", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("SetReadDeadline did not end a pending read")
	}
}

// fill writes to a client that does not read until a write fails.
func fill(c *wsConn) error {
	chunk := make([]byte, 1<<20)
	for range 1000 {
		if _, err := c.Write(chunk); err != nil {
			return err
		}
	}
	return errors.New("1 GB written to a client that reads nothing")
}

func TestWSWriteDeadline(t *testing.T) {
	f := startWS(t, WSOptions{})
	_, c := f.dial(t, nil)
	_ = c.SetWriteDeadline(time.Now().Add(100 * time.Millisecond))
	var err error
	within(t, 10*time.Second, "write to a stuck client", func() { err = fill(c) })
	if !isTimeout(err) {
		t.Fatalf("write to a stuck client: %v, want a timeout", err)
	}

	// A deadline set while a write is blocked ends it.
	_, c = f.dial(t, nil)
	errc := make(chan error, 1)
	go func() { errc <- fill(c) }()
	time.Sleep(100 * time.Millisecond) // let the buffers fill; the result holds either way
	_ = c.SetWriteDeadline(time.Now())
	select {
	case err := <-errc:
		if !isTimeout(err) {
			t.Fatalf("pending write after SetWriteDeadline(now): %v, want a timeout", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("SetWriteDeadline did not end a pending write")
	}
}

func TestWSCloseUnblocks(t *testing.T) {
	f := startWS(t, WSOptions{})
	t.Run("read", func(t *testing.T) {
		cl, c := f.dial(t, nil)
		errc := make(chan error, 1)
		go func() {
			var b [1]byte
			_, err := c.Read(b[:])
			errc <- err
		}()
		time.Sleep(20 * time.Millisecond)
		within(t, 2*time.Second, "Close", func() { _ = c.Close() })
		select {
		case err := <-errc:
			if err == nil {
				t.Fatal("read after Close succeeded")
			}
		case <-time.After(5 * time.Second):
			t.Fatal("Close did not end a pending read")
		}
		_ = cl.SetReadDeadline(time.Now().Add(5 * time.Second))
		_, _, err := cl.ReadMessage()
		if !websocket.IsCloseError(err, websocket.CloseNormalClosure) {
			t.Fatalf("client saw %v, want a normal close frame", err)
		}
		if _, err := c.Read(make([]byte, 1)); !errors.Is(err, net.ErrClosed) {
			t.Fatalf("read after Close: %v", err)
		}
		if _, err := c.Write([]byte{0xe0, 0}); !errors.Is(err, net.ErrClosed) {
			t.Fatalf("write after Close: %v", err)
		}
		_ = c.Close() // again: no panic
	})
	t.Run("write", func(t *testing.T) {
		_, c := f.dial(t, nil)
		errc := make(chan error, 1)
		go func() { errc <- fill(c) }()
		time.Sleep(100 * time.Millisecond)
		within(t, 2*time.Second, "Close during a blocked write", func() { _ = c.Close() })
		select {
		case err := <-errc:
			if err == nil {
				t.Fatal("write after Close succeeded")
			}
		case <-time.After(5 * time.Second):
			t.Fatal("Close did not end a pending write")
		}
	})
}

func TestWSPeerFrames(t *testing.T) {
	f := startWS(t, WSOptions{MaxMessageSize: 1024})
	closeCode := func(cl *websocket.Conn) int {
		_ = cl.SetReadDeadline(time.Now().Add(5 * time.Second))
		for {
			if _, _, err := cl.NextReader(); err != nil {
				var ce *websocket.CloseError
				if errors.As(err, &ce) {
					return ce.Code
				}
				return -1
			}
		}
	}
	for _, tc := range []struct {
		name    string
		send    func(*websocket.Conn) error
		wantErr func(error) bool
		code    int // close code the client sees
	}{
		{"close frame reads as EOF", func(cl *websocket.Conn) error {
			return cl.WriteMessage(websocket.CloseMessage, websocket.FormatCloseMessage(websocket.CloseNormalClosure, ""))
		}, func(err error) bool { return err == io.EOF }, websocket.CloseNormalClosure},
		{"text frame", func(cl *websocket.Conn) error { return cl.WriteMessage(websocket.TextMessage, []byte("hi")) },
			func(err error) bool { return errors.Is(err, errTextFrame) }, websocket.CloseUnsupportedData},
		{"oversize message", func(cl *websocket.Conn) error { return cl.WriteMessage(websocket.BinaryMessage, make([]byte, 4096)) },
			func(err error) bool { return errors.Is(err, websocket.ErrReadLimit) }, websocket.CloseMessageTooBig},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cl, c := f.dial(t, nil)
			if err := tc.send(cl); err != nil {
				t.Fatal(err)
			}
			_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
			_, err := c.Read(make([]byte, 16))
			if !tc.wantErr(err) {
				t.Fatalf("read: %v", err)
			}
			if _, again := c.Read(make([]byte, 16)); again == nil {
				t.Fatal("a second read succeeded")
			}
			_ = c.Close()
			if code := closeCode(cl); code != tc.code {
				t.Fatalf("close code %d, want %d", code, tc.code)
			}
		})
	}
}

func TestWSConnIdentity(t *testing.T) {
	tokens, err := devices.NewTokenVerifier(devices.JWTOptions{HS256Secret: []byte(testSecret)})
	if err != nil {
		t.Fatal(err)
	}
	f := startWS(t, WSOptions{Tokens: tokens})
	tok, err := devices.MintHS256([]byte(testSecret), devices.Claims{Claims: jwt.Claims{
		Subject: "panel", Expiry: jwt.NewNumericDate(time.Now().Add(time.Hour))}})
	if err != nil {
		t.Fatal(err)
	}

	_, c := f.dial(t, http.Header{"Authorization": {"Bearer " + tok}, "X-Forwarded-For": {"203.0.113.7, 127.0.0.1"}})
	if p, ok := c.HandshakePrincipal(); !ok || p.Name != "panel" {
		t.Fatalf("handshake principal: %+v %v", p, ok)
	}
	if a := c.RemoteAddr().String(); !strings.HasPrefix(a, "203.0.113.7:") {
		t.Fatalf("remote address behind a trusted proxy: %s", a)
	}
	if _, ok := c.LocalAddr().(*net.TCPAddr); !ok {
		t.Fatalf("local address: %v", c.LocalAddr())
	}

	_, c = f.dial(t, nil)
	if _, ok := c.HandshakePrincipal(); ok {
		t.Fatal("a handshake principal without a token")
	}
	if a := c.RemoteAddr().String(); !strings.HasPrefix(a, "127.0.0.1:") {
		t.Fatalf("remote address: %s", a)
	}
}

func TestWSRefusals(t *testing.T) {
	g, err := NewGuard(GuardOptions{AllowedOrigins: []string{"https://dash.example.com"}, MaxConnsPerIP: 1})
	if err != nil {
		t.Fatal(err)
	}
	f := startWS(t, WSOptions{Guard: g})
	ok := http.Header{"Origin": {"https://dash.example.com"}}
	// try dials; a connection that reaches the engine is returned open.
	try := func(h http.Header, protos ...string) (*websocket.Conn, *wsConn, int) {
		t.Helper()
		if protos == nil {
			protos = []string{"mqtt"}
		}
		d := websocket.Dialer{Subprotocols: protos, HandshakeTimeout: 5 * time.Second}
		cl, resp, err := d.Dial(f.url, h)
		if resp == nil {
			t.Fatalf("dial: %v", err)
		}
		resp.Body.Close()
		if err != nil {
			return nil, nil, resp.StatusCode
		}
		t.Cleanup(func() { cl.Close() })
		return cl, <-f.engine.conns, resp.StatusCode
	}
	// tryUntil dials until the status is want: the slot of a connection
	// that ended is released when its handler returns.
	tryUntil := func(want int) (*websocket.Conn, *wsConn) {
		t.Helper()
		deadline := time.Now().Add(5 * time.Second)
		for {
			cl, c, code := try(ok)
			if code == want {
				return cl, c
			}
			if c != nil {
				_ = c.Close()
			}
			if time.Now().After(deadline) {
				t.Fatalf("status %d, want %d", code, want)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	for _, tc := range []struct {
		name   string
		h      http.Header
		protos []string
		want   int
	}{
		{"cross-site origin", http.Header{"Origin": {"https://evil.example"}}, nil, 403},
		{"missing origin", nil, nil, 403},
		{"no MQTT subprotocol", ok, []string{"chat"}, 400},
		{"token without a verifier", http.Header{"Origin": {"https://dash.example.com"}, "Authorization": {"Bearer x.y.z"}}, nil, 401},
	} {
		if _, _, got := try(tc.h, tc.protos...); got != tc.want {
			t.Errorf("%s: %d, want %d", tc.name, got, tc.want)
		}
	}
	if _, c, got := try(ok, "mqttv3.1"); got != http.StatusSwitchingProtocols {
		t.Errorf("mqttv3.1: %d, want 101", got)
	} else {
		_ = c.Close()
	}
	// The per-address limit counts open connections.
	_, c := tryUntil(http.StatusSwitchingProtocols)
	if _, _, got := try(ok); got != http.StatusTooManyRequests {
		t.Errorf("second connection from one address: %d, want 429", got)
	}
	_ = c.Close()
	_, c = tryUntil(http.StatusSwitchingProtocols)
	_ = c.Close()
}

func TestWSShutdown(t *testing.T) {
	g, _ := NewGuard(GuardOptions{AllowMissingOrigin: true})
	w := NewWS(WSOptions{Guard: g, Log: slog.New(slog.DiscardHandler)})
	srv := httptest.NewServer(w)
	defer srv.Close()
	url := "ws" + strings.TrimPrefix(srv.URL, "http")
	d := websocket.Dialer{Subprotocols: []string{"mqtt"}}
	if _, resp, err := d.Dial(url, nil); err == nil || resp == nil || resp.StatusCode != http.StatusServiceUnavailable {
		t.Fatalf("before Serve: %v %v", err, resp)
	}

	eng := &fakeEngine{conns: make(chan *wsConn, 4)}
	w.Serve(eng)
	cl, resp, err := d.Dial(url, nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	defer cl.Close()
	c := <-eng.conns
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	// Shutdown closes the connection the engine still serves, and waits
	// for its handler.
	if err := w.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	select {
	case <-c.done:
	default:
		t.Fatal("connection still open after Shutdown")
	}
	_ = cl.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, _, err := cl.ReadMessage(); !websocket.IsCloseError(err, websocket.CloseNormalClosure) {
		t.Fatalf("client saw %v, want a close frame", err)
	}
	if _, resp, err := d.Dial(url, nil); err == nil || resp == nil || resp.StatusCode != http.StatusServiceUnavailable {
		t.Fatalf("after Shutdown: %v %v", err, resp)
	}
	if err := w.Shutdown(ctx); err != nil {
		t.Fatalf("second Shutdown: %v", err)
	}
}

// The handler waits for the engine to close the connection after
// ServeConn returns (its last bytes), and closes it itself if it does not.
func TestWSHandlerClosesAfterServeConn(t *testing.T) {
	g, _ := NewGuard(GuardOptions{AllowMissingOrigin: true})
	w := NewWS(WSOptions{Guard: g, WriteTimeout: 100 * time.Millisecond, Log: slog.New(slog.DiscardHandler)})
	served := make(chan *wsConn, 1)
	w.Serve(serveFunc(func(nc net.Conn, _ string, _ bool) error {
		c := nc.(*wsConn)
		_, _ = c.Write([]byte{0xe0, 0}) // a last DISCONNECT, then return without closing
		served <- c
		return nil
	}))
	srv := httptest.NewServer(w)
	defer srv.Close()
	cl, resp, err := (&websocket.Dialer{Subprotocols: []string{"mqtt"}}).Dial("ws"+strings.TrimPrefix(srv.URL, "http"), nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	defer cl.Close()
	_ = cl.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, b, err := cl.ReadMessage(); err != nil || !bytes.Equal(b, []byte{0xe0, 0}) {
		t.Fatalf("last bytes: %x %v", b, err)
	}
	if _, _, err := cl.ReadMessage(); !websocket.IsCloseError(err, websocket.CloseNormalClosure) {
		t.Fatalf("after the last bytes: %v, want a close frame", err)
	}
	<-served
}

type serveFunc func(nc net.Conn, listener string, wait bool) error

func (f serveFunc) ServeConn(nc net.Conn, listener string, wait bool) error {
	return f(nc, listener, wait)
}

func TestWSPings(t *testing.T) {
	f := startWS(t, WSOptions{PingInterval: 10 * time.Millisecond})
	cl, c := f.dial(t, nil)
	pings := make(chan struct{}, 100)
	cl.SetPingHandler(func(string) error {
		pings <- struct{}{}
		return nil
	})
	go func() {
		for {
			if _, _, err := cl.NextReader(); err != nil {
				return
			}
		}
	}()
	for i := range 3 {
		select {
		case <-pings:
		case <-time.After(5 * time.Second):
			t.Fatalf("ping %d did not come", i+1)
		}
	}
	_ = c.Close()
}
