// Package brokertest has helpers for tests that run a real Beacon broker on
// 127.0.0.1 with ephemeral ports and talk to it with real clients:
// paho.golang (MQTT 5), a raw MQTT 3.1.1/5 client built on mochi's packet
// codec, and third-party command-line tools.
package brokertest

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"runtime/pprof"
	"sync"
	"testing"
	"time"

	pahopackets "github.com/eclipse/paho.golang/packets"
	"github.com/eclipse/paho.golang/paho"
	"github.com/gorilla/websocket"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/beaconmq/beacon/broker"
)

// Config returns a configuration for tests: ephemeral loopback ports, data
// in a fresh temporary directory, quiet logs.
func Config(t testing.TB) broker.Config {
	t.Helper()
	cfg := broker.Default()
	cfg.MQTT.Addr = "127.0.0.1:0"
	cfg.HTTP.Addr = "127.0.0.1:0"
	cfg.Storage.Dir = t.TempDir()
	cfg.MQTT.SysInterval = time.Second
	return cfg
}

// Logger returns a logger that writes to the test log at warn level and
// above (BEACON_TEST_LOG=debug shows everything).
func Logger(t testing.TB) *slog.Logger {
	level := slog.LevelWarn
	if os.Getenv("BEACON_TEST_LOG") == "debug" {
		level = slog.LevelDebug
	}
	return slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: level}))
}

type testWriter struct{ t testing.TB }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(string(p))
	return len(p), nil
}

// Start runs a broker with cfg until the test ends.
func Start(t testing.TB, cfg broker.Config) *broker.Broker {
	t.Helper()
	return StartWithLogger(t, cfg, Logger(t))
}

// StartWithLogger is Start with the broker's logger given: fuzz targets
// need one that does not write to the test log.
func StartWithLogger(t testing.TB, cfg broker.Config, log *slog.Logger) *broker.Broker {
	t.Helper()
	b, err := broker.New(cfg, log)
	if err != nil {
		t.Fatalf("new broker: %v", err)
	}
	if err := b.Start(); err != nil {
		t.Fatalf("start broker: %v", err)
	}
	t.Cleanup(func() { Stop(t, b) })
	return b
}

// Stop shuts b down gracefully.
func Stop(t testing.TB, b *broker.Broker) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	if err := b.Shutdown(ctx); err != nil {
		// What is stuck: every goroutine's stack, for the test log.
		var dump bytes.Buffer
		_ = pprof.Lookup("goroutine").WriteTo(&dump, 2)
		t.Errorf("shutdown: %v\n%s", err, dump.String())
	}
}

// WaitFor polls cond until it holds or timeout passes, then fails the test
// with what.
func WaitFor(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		if cond() {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// Client is a paho.golang MQTT 5 client that records what it receives.
type Client struct {
	*paho.Client
	Connack *paho.Connack

	mu           sync.Mutex
	msgs         []*paho.Publish
	disconnected *paho.Disconnect
	barrier      bool
}

// Dial connects a paho client. cp.ClientID and the rest come from the
// caller; a zero KeepAlive becomes 30s.
func Dial(t testing.TB, addr string, cp *paho.Connect) *Client {
	t.Helper()
	c, err := TryDial(addr, cp)
	if err != nil {
		t.Fatalf("connect %q to %s: %v", cp.ClientID, addr, err)
	}
	t.Cleanup(func() { _ = c.Disconnect(&paho.Disconnect{}) })
	return c
}

// TryDial is Dial without the test: it returns the error (a refused
// CONNACK included).
func TryDial(addr string, cp *paho.Connect) (*Client, error) {
	conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return nil, err
	}
	return connectPaho(conn, cp)
}

// TryDialFrom is TryDial from a given local address (e.g. 127.0.0.2),
// for tests of per-address limits.
func TryDialFrom(local, addr string, cp *paho.Connect) (*Client, error) {
	la, err := net.ResolveTCPAddr("tcp", local+":0")
	if err != nil {
		return nil, err
	}
	d := net.Dialer{Timeout: 5 * time.Second, LocalAddr: la}
	conn, err := d.Dial("tcp", addr)
	if err != nil {
		return nil, err
	}
	return connectPaho(conn, cp)
}

// connectPaho runs an MQTT 5 session over conn.
func connectPaho(conn net.Conn, cp *paho.Connect) (*Client, error) {
	c := &Client{}
	c.Client = paho.NewClient(paho.ClientConfig{
		Conn: conn,
		OnPublishReceived: []func(paho.PublishReceived) (bool, error){func(pr paho.PublishReceived) (bool, error) {
			c.mu.Lock()
			c.msgs = append(c.msgs, pr.Packet)
			c.mu.Unlock()
			return true, nil
		}},
		OnServerDisconnect: func(d *paho.Disconnect) {
			c.mu.Lock()
			c.disconnected = d
			c.mu.Unlock()
		},
		OnClientError: func(error) {},
		PacketTimeout: 10 * time.Second,
	})
	if cp.KeepAlive == 0 {
		cp.KeepAlive = 30
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ca, err := c.Connect(ctx, cp)
	c.Connack = ca
	if err != nil {
		_ = conn.Close()
		return c, err
	}
	return c, nil
}

// Messages returns a copy of what was received so far.
func (c *Client) Messages() []*paho.Publish {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]*paho.Publish(nil), c.msgs...)
}

// Count is the number of messages received.
func (c *Client) Count() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.msgs)
}

// ServerDisconnect is the DISCONNECT the server sent, if any.
func (c *Client) ServerDisconnect() *paho.Disconnect {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.disconnected
}

// WaitMessages waits until n messages have arrived and returns them.
func (c *Client) WaitMessages(t testing.TB, n int, timeout time.Duration) []*paho.Publish {
	t.Helper()
	WaitFor(t, timeout, fmt.Sprintf("%d messages (have %d)", n, c.Count()), func() bool { return c.Count() >= n })
	return c.Messages()
}

// Subscribe subscribes and fails the test unless every filter is granted.
func (c *Client) SubscribeT(t testing.TB, opts ...paho.SubscribeOptions) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	sa, err := c.Subscribe(ctx, &paho.Subscribe{Subscriptions: opts})
	if err != nil {
		t.Fatalf("subscribe: %v", err)
	}
	for i, rc := range sa.Reasons {
		if rc >= 0x80 {
			t.Fatalf("subscribe %q refused: reason 0x%02x", opts[i].Topic, rc)
		}
	}
}

// PublishT publishes and fails the test on error.
func (c *Client) PublishT(t testing.TB, p *paho.Publish) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	r, err := c.Publish(ctx, p)
	if err != nil {
		t.Fatalf("publish %q: %v", p.Topic, err)
	}
	if r != nil && r.ReasonCode >= 0x80 {
		t.Fatalf("publish %q refused: reason 0x%02x", p.Topic, r.ReasonCode)
	}
}

// Barrier returns once the broker has finished routing everything c
// published before. mochi acknowledges a QoS 1/2 publish before routing
// it, so a PUBACK alone does not say that a later subscriber will not see
// the message live; c's packets are processed in order, so once c receives
// its own barrier message, every earlier publish of c has been routed.
func (c *Client) Barrier(t testing.TB) {
	t.Helper()
	topic := "beacon-test/barrier/" + c.ClientID()
	c.mu.Lock()
	subscribed := c.barrier
	c.barrier = true
	c.mu.Unlock()
	if !subscribed {
		// mochi refuses a SUBSCRIBE whose packet id equals one of its own
		// outbound messages still in flight to this client (0x91; MQTT
		// says the two sides number independently), so try again until
		// those flows are done.
		WaitFor(t, 10*time.Second, "the barrier subscription", func() bool {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			sa, err := c.Subscribe(ctx, &paho.Subscribe{Subscriptions: []paho.SubscribeOptions{{Topic: topic, QoS: 1}}})
			return err == nil && len(sa.Reasons) == 1 && sa.Reasons[0] < 0x80
		})
	}
	seen := func() int {
		c.mu.Lock()
		defer c.mu.Unlock()
		n := 0
		for _, m := range c.msgs {
			if m.Topic == topic {
				n++
			}
		}
		return n
	}
	before := seen()
	c.PublishT(t, &paho.Publish{Topic: topic, QoS: 1, Payload: []byte("barrier")})
	WaitFor(t, 10*time.Second, "barrier", func() bool { return seen() > before })
}

// Raw is a bare MQTT connection that sends and reads packets encoded with
// mochi's codec, for MQTT 3.1.1 and for bytes no well-behaved client sends.
type Raw struct {
	Conn    net.Conn
	r       *bufio.Reader
	Version byte
}

// DialRaw opens a TCP connection without sending anything.
func DialRaw(t testing.TB, addr string, version byte) *Raw {
	t.Helper()
	conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatalf("dial %s: %v", addr, err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	return &Raw{Conn: conn, r: bufio.NewReader(conn), Version: version}
}

// Send encodes and writes pk.
func (c *Raw) Send(t testing.TB, pk packets.Packet) {
	t.Helper()
	pk.ProtocolVersion = c.Version
	buf := new(bytes.Buffer)
	var err error
	switch pk.FixedHeader.Type {
	case packets.Connect:
		pk.Connect.ProtocolName = []byte("MQTT")
		err = pk.ConnectEncode(buf)
	case packets.Publish:
		err = pk.PublishEncode(buf)
	case packets.Puback:
		err = pk.PubackEncode(buf)
	case packets.Pubrec:
		err = pk.PubrecEncode(buf)
	case packets.Pubrel:
		err = pk.PubrelEncode(buf)
	case packets.Pubcomp:
		err = pk.PubcompEncode(buf)
	case packets.Subscribe:
		err = pk.SubscribeEncode(buf)
	case packets.Pingreq:
		err = pk.PingreqEncode(buf)
	case packets.Disconnect:
		err = pk.DisconnectEncode(buf)
	default:
		t.Fatalf("raw client cannot encode packet type %d", pk.FixedHeader.Type)
	}
	if err != nil {
		t.Fatalf("encode: %v", err)
	}
	c.Write(t, buf.Bytes())
}

// Write sends bytes as they are.
func (c *Raw) Write(t testing.TB, b []byte) {
	t.Helper()
	_ = c.Conn.SetWriteDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Conn.Write(b); err != nil {
		t.Fatalf("write: %v", err)
	}
}

// Read reads the next packet, waiting at most timeout.
func (c *Raw) Read(timeout time.Duration) (packets.Packet, error) {
	var pk packets.Packet
	_ = c.Conn.SetReadDeadline(time.Now().Add(timeout))
	b, err := c.r.ReadByte()
	if err != nil {
		return pk, err
	}
	if err := pk.FixedHeader.Decode(b); err != nil {
		return pk, err
	}
	n, _, err := packets.DecodeLength(c.r)
	if err != nil {
		return pk, err
	}
	pk.FixedHeader.Remaining = n
	body := make([]byte, n)
	if _, err := io.ReadFull(c.r, body); err != nil {
		return pk, err
	}
	pk.ProtocolVersion = c.Version
	switch pk.FixedHeader.Type {
	case packets.Connack:
		err = pk.ConnackDecode(body)
	case packets.Publish:
		err = pk.PublishDecode(body)
	case packets.Puback:
		err = pk.PubackDecode(body)
	case packets.Pubrec:
		err = pk.PubrecDecode(body)
	case packets.Pubrel:
		err = pk.PubrelDecode(body)
	case packets.Pubcomp:
		err = pk.PubcompDecode(body)
	case packets.Suback:
		err = pk.SubackDecode(body)
	case packets.Pingresp:
	case packets.Disconnect:
		err = pk.DisconnectDecode(body)
	default:
		err = fmt.Errorf("unexpected packet type %d", pk.FixedHeader.Type)
	}
	return pk, err
}

// Expect reads the next packet and fails unless it has type typ.
func (c *Raw) Expect(t testing.TB, typ byte) packets.Packet {
	t.Helper()
	pk, err := c.Read(10 * time.Second)
	if err != nil {
		t.Fatalf("read packet (want type %d): %v", typ, err)
	}
	if pk.FixedHeader.Type != typ {
		t.Fatalf("got packet type %d, want %d (%+v)", pk.FixedHeader.Type, typ, pk)
	}
	return pk
}

// Closed waits until the server closes the connection, skipping any
// packets it sends first, and returns the last packet read.
func (c *Raw) Closed(t testing.TB, timeout time.Duration) (last packets.Packet) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		pk, err := c.Read(time.Until(deadline))
		if err != nil {
			if ne, ok := err.(net.Error); ok && ne.Timeout() {
				break
			}
			return last // EOF or reset: closed
		}
		last = pk
	}
	t.Fatalf("connection still open after %s", timeout)
	return last
}

// RequireTool returns the path of a command-line tool. A missing tool fails
// the test under CI (CI=true) and skips it elsewhere; `make test` installs
// every tool the tests use.
func RequireTool(t testing.TB, name, debianPackage string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err == nil {
		return p
	}
	msg := fmt.Sprintf("%s not found: install the Debian package %s (make test does)", name, debianPackage)
	if os.Getenv("CI") != "" {
		t.Fatal(msg)
	}
	t.Skip(msg)
	return ""
}

// WSConn adapts a client-side WebSocket to the byte stream an MQTT client
// library expects: writes become binary messages, reads concatenate them.
type WSConn struct {
	*websocket.Conn
	r io.Reader
}

// DialWS performs an MQTT-over-WebSocket handshake. header may carry
// Origin, Authorization or cookies.
func DialWS(url string, header http.Header, subprotocols ...string) (*WSConn, *http.Response, error) {
	if subprotocols == nil {
		subprotocols = []string{"mqtt"}
	}
	d := websocket.Dialer{Subprotocols: subprotocols, HandshakeTimeout: 5 * time.Second}
	c, resp, err := d.Dial(url, header)
	if err != nil {
		return nil, resp, err
	}
	return &WSConn{Conn: c}, resp, nil
}

func (c *WSConn) Read(p []byte) (int, error) {
	for {
		if c.r == nil {
			_, r, err := c.NextReader()
			if err != nil {
				return 0, err
			}
			c.r = r
		}
		n, err := c.r.Read(p)
		if err == io.EOF {
			c.r = nil
			if n > 0 {
				return n, nil
			}
			continue
		}
		return n, err
	}
}

func (c *WSConn) Write(p []byte) (int, error) {
	if err := c.WriteMessage(websocket.BinaryMessage, p); err != nil {
		return 0, err
	}
	return len(p), nil
}

func (c *WSConn) SetDeadline(t time.Time) error {
	if err := c.SetReadDeadline(t); err != nil {
		return err
	}
	return c.SetWriteDeadline(t)
}

// DialPahoWS connects a paho client over an established WebSocket.
func DialPahoWS(t testing.TB, ws *WSConn, cp *paho.Connect) *Client {
	t.Helper()
	c, err := connectPaho(pahopackets.NewThreadSafeConn(ws), cp)
	if err != nil {
		t.Fatalf("connect %q over websocket: %v", cp.ClientID, err)
	}
	t.Cleanup(func() { _ = c.Disconnect(&paho.Disconnect{}) })
	return c
}

// TryDialConn runs an MQTT 5 CONNECT over an established WebSocket and
// returns the refusal, if any.
func TryDialConn(ws *WSConn, cp *paho.Connect) (*Client, error) {
	return connectPaho(pahopackets.NewThreadSafeConn(ws), cp)
}
