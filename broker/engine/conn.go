package engine

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
)

// conn is one network connection. Its reader goroutine decodes and
// handles packets in order; writes are appended to out under outMu and
// written by a flusher goroutine that runs only while there is something
// to write, so many packets leave in one write and a connection that is
// idle holds neither a writer goroutine nor a write buffer.
type conn struct {
	srv      *Server
	nc       net.Conn
	listener string
	remote   string
	in       input // the read side; the reader goroutine owns it

	// An idle connection's reader returns and the idle poller resumes it
	// (Limits.IdleAfter). parked is set by the reader under outMu and
	// cleared by whoever resumes it; stopRead (set once closing) makes the
	// reader stop waiting for input; kaExpired is set by the poller when
	// an idle connection's keep-alive (kaDeadline, unix nanos) ran out.
	parked     atomic.Bool
	stopRead   atomic.Bool
	kaExpired  atomic.Bool
	kaDeadline atomic.Int64
	noPark     bool             // never parks (ServeConn with wait, or the poller failed)
	replyHeld  bool             // reply queued bytes without starting the flusher (reader only)
	pending    []pendingPublish // PUBLISHes written and not yet delivered (reader only)
	pendingErr error            // a store failure finishPending met inside a handler (reader only)

	// Set by CONNECT, read-only afterwards (the reader goroutine owns them).
	version   byte
	clientID  string
	username  string
	device    string
	principal Principal
	sess      *session
	keepalive time.Duration
	maxOut    uint32 // the client's Maximum Packet Size; 0 = unlimited
	aliasMax  uint16 // inbound topic aliases accepted
	aliases   map[uint16]string
	// Outbound topic aliases (v5 clients that announce a Topic Alias
	// Maximum): assigned in wire order, under outMu.
	outAliasMax    uint16
	outAliases     map[string]uint16
	problem        bool // the client accepts reason strings (v5 Request Problem Information)
	will           *Message
	willDelay      time.Duration
	stopTimer      func() bool // stops the credentials-expiry timer
	sessionPresent bool
	persistent     bool
	cleanStart     bool
	connectedAt    time.Time
	takenOver      atomic.Bool
	traffic        traffic

	outMu     sync.Mutex
	out       []byte        // bytes queued for the socket
	spare     []byte        // the buffer of the previous write, reused
	writing   int           // bytes handed to the socket and not yet written
	flushing  bool          // a flusher goroutine runs
	closing   bool          // no more writes accepted; the socket closes once out is written
	closed    bool          // the socket is closed
	needPump  bool          // the session waits for the budget to free
	drained   chan struct{} // closed when a write completes; made by a publisher waiting for room
	stalled   bool          // a publisher waited PublisherStall for room in vain; cleared by the next write
	closeErr  error         // why the connection is closing
	finalSent bool          // a DISCONNECT was queued
	v5bye     bool          // a v5 session is attached: close sends a DISCONNECT
	byeReason bool          // and it may carry a reason string
	done      chan struct{}
}

func newConn(srv *Server, nc net.Conn, listener string) *conn {
	c := &conn{
		srv:      srv,
		nc:       nc,
		listener: listener,
		remote:   nc.RemoteAddr().String(),
		done:     make(chan struct{}),
	}
	c.in.init(nc)
	return c
}

// errSlowConsumer closes a connection whose socket did not take a write
// within the write timeout.
var errSlowConsumer = errors.New("slow consumer: write timed out")

// queue appends what fn encodes to the outbound bytes and makes sure a
// flusher runs. It reports false once the connection is closing.
func (c *conn) queue(fn func([]byte) []byte) bool {
	c.outMu.Lock()
	if c.closing {
		c.outMu.Unlock()
		return false
	}
	c.out = fn(c.out)
	c.kickLocked()
	c.outMu.Unlock()
	return true
}

// reply queues a packet that answers one the reader handled (an ack, a
// PINGRESP). While more input is buffered, the write waits for the rest
// of the batch: a client that sent many packets in one write gets their
// acks in one write. The reader flushes held replies before it waits for
// more input (armRead). Only the reader calls it.
func (c *conn) reply(fn func([]byte) []byte) {
	c.outMu.Lock()
	defer c.outMu.Unlock()
	if c.closing {
		return
	}
	c.out = fn(c.out)
	if c.in.buffered() > 0 {
		c.replyHeld = true
		return
	}
	c.replyHeld = false
	c.kickLocked()
}

// flushReplies writes the replies reply held back.
func (c *conn) flushReplies() {
	if !c.replyHeld {
		return
	}
	c.replyHeld = false
	c.outMu.Lock()
	c.kickLocked()
	c.outMu.Unlock()
}

// encodePublish appends a PUBLISH of m, with a topic alias where the
// client accepts them: the first PUBLISH of a topic carries topic and a
// new alias, later ones the alias alone. Callers hold outMu.
func (c *conn) encodePublish(b []byte, m *Message, d *delivery) []byte {
	if c.outAliasMax > 0 && len(m.Topic) > 2 {
		if a, ok := c.outAliases[m.Topic]; ok {
			d.alias, d.noTopic = a, true
		} else if sz, _, _ := publishSize(m, c.version, d); len(c.outAliases) < int(c.outAliasMax) &&
			(c.maxOut == 0 || uint32(sz+3) <= c.maxOut) { // the alias property must fit too
			if c.outAliases == nil {
				c.outAliases = map[string]uint16{}
			}
			a := uint16(len(c.outAliases) + 1)
			c.outAliases[strings.Clone(m.Topic)] = a // m.Topic may point into a whole packet's buffer
			d.alias = a
		}
	}
	return appendPublish(b, m, c.version, d)
}

// pending is the number of bytes queued and being written. Callers hold
// outMu.
func (c *conn) pendingLocked() int { return len(c.out) + c.writing }

// hasRoom reports whether n more bytes fit in the outbound budget; if not,
// the session is pumped again once the socket drains.
func (c *conn) hasRoom(n int) bool {
	c.outMu.Lock()
	defer c.outMu.Unlock()
	if c.closing {
		return false
	}
	if c.pendingLocked() == 0 || c.pendingLocked()+n <= c.srv.lim.OutboundBudget {
		return true
	}
	c.needPump = true
	return false
}

// queueIfRoom queues a packet of size n unless it would pass the
// outbound budget (an empty queue always takes one packet).
func (c *conn) queueIfRoom(n int, fn func([]byte) []byte) bool {
	c.outMu.Lock()
	defer c.outMu.Unlock()
	if c.closing {
		return false
	}
	if p := c.pendingLocked(); p > 0 && p+n > c.srv.lim.OutboundBudget {
		return false
	}
	c.out = fn(c.out)
	c.kickLocked()
	return true
}

func (c *conn) kickLocked() {
	if !c.flushing && len(c.out) > 0 {
		c.flushing = true
		go c.flush()
	}
}

// flush writes queued bytes until none are left, then exits.
func (c *conn) flush() {
	for {
		c.outMu.Lock()
		if len(c.out) == 0 || c.closed {
			c.flushing = false
			shut := c.closing && c.markClosedLocked()
			// Idle: keep no buffers.
			c.out, c.spare = nil, nil
			c.outMu.Unlock()
			if shut {
				_ = c.nc.Close()
			}
			return
		}
		buf := c.out
		c.out = c.spare[:0]
		c.spare = nil
		c.writing = len(buf)
		c.outMu.Unlock()

		// In chunks, so publishers waiting for room (awaitRoom) see the
		// socket drain, and the write timeout bounds a chunk: a slow
		// consumer is one that takes no chunk in WriteTimeout.
		var err error
		for off := 0; off < len(buf) && err == nil; {
			end := min(off+writeChunk, len(buf))
			_ = c.nc.SetWriteDeadline(time.Now().Add(c.srv.lim.WriteTimeout))
			var n int
			n, err = c.nc.Write(buf[off:end])
			off += n
			c.srv.stats.bytesOut.Add(int64(n))
			c.traffic.bytesOut.Add(uint64(n))
			if off < len(buf) && err == nil {
				c.outMu.Lock()
				c.writing = len(buf) - off
				c.progressLocked()
				c.outMu.Unlock()
			}
		}

		c.outMu.Lock()
		c.writing = 0
		c.progressLocked()
		if cap(buf) <= 64<<10 {
			c.spare = buf[:0]
		}
		pump := c.needPump && !c.closing && c.pendingLocked() <= c.srv.lim.OutboundBudget/2
		if pump {
			c.needPump = false
		}
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				err = errSlowConsumer
				c.srv.stats.slowConsumers.Add(1)
			}
			if c.closeErr == nil {
				c.closeErr = err
			}
			c.closing = true
			c.stopReadingLocked()
			c.flushing = false
			shut := c.markClosedLocked()
			c.outMu.Unlock()
			if shut {
				_ = c.nc.Close()
			}
			return
		}
		c.outMu.Unlock()
		if pump && c.sess != nil {
			c.sess.pump(c)
		}
	}
}

// writeChunk is the most the flusher hands the socket in one write.
const writeChunk = 64 << 10

// progressLocked tells publishers waiting for room that the socket took
// bytes. Callers hold outMu.
func (c *conn) progressLocked() {
	c.stalled = false
	if c.drained != nil {
		close(c.drained)
		c.drained = nil
	}
}

// awaitRoom holds a publisher back until a QoS 0 delivery of n bytes fits
// the outbound budget, at most until deadline. It reports whether it
// fits, and whether the publisher waited: it does not wait if an earlier
// wait ran out and the socket has taken nothing since (a stuck consumer
// costs its publishers one stall, not one per message). Callers hold no
// lock.
func (c *conn) awaitRoom(n int, deadline time.Time) (fits, waited bool) {
	var timer *time.Timer
	defer func() {
		if timer != nil {
			timer.Stop()
		}
	}()
	for {
		c.outMu.Lock()
		p := c.pendingLocked()
		if c.closing || p == 0 || p+n <= c.srv.lim.OutboundBudget {
			c.outMu.Unlock()
			return true, waited
		}
		if c.stalled {
			c.outMu.Unlock()
			return false, waited
		}
		if c.drained == nil {
			c.drained = make(chan struct{})
		}
		ch := c.drained
		c.kickLocked() // bytes held by reply (this may be the publisher's own connection)
		c.outMu.Unlock()
		if timer == nil {
			d := time.Until(deadline)
			if d <= 0 {
				c.noteStalled()
				return false, true
			}
			timer = time.NewTimer(d)
			waited = true
		}
		select {
		case <-ch:
		case <-timer.C:
			c.noteStalled()
			return false, true
		}
	}
}

// noteStalled marks that a publisher waited for room in vain.
func (c *conn) noteStalled() {
	c.outMu.Lock()
	c.stalled = true
	c.outMu.Unlock()
}

// markClosedLocked marks the socket closed and reports whether the caller
// is the one to close it, after releasing outMu: closing a TLS or
// WebSocket connection writes (close_notify, a close frame), and no I/O
// happens under the lock.
func (c *conn) markClosedLocked() bool {
	if c.closed {
		return false
	}
	c.closed = true
	return true
}

// close ends the connection: a v5 client that has connected is told why
// with a DISCONNECT (code 0 = none sent), queued bytes are written first
// (bounded by the write timeout), then the socket closes.
func (c *conn) close(cause error, code byte, reason string) {
	if c.closeLocked(cause, code, reason) {
		_ = c.nc.Close()
	}
}

// closeLocked does close's work under outMu and reports whether the
// socket is to be closed now.
func (c *conn) closeLocked(cause error, code byte, reason string) bool {
	c.outMu.Lock()
	defer c.outMu.Unlock()
	if c.closing {
		return false
	}
	if c.closeErr == nil {
		c.closeErr = cause
	}
	if code != 0 && c.v5bye && !c.finalSent {
		c.finalSent = true
		if !c.byeReason {
			reason = ""
		}
		c.out = appendDisconnect(c.out, code, reason)
	}
	c.closing = true
	c.stopReadingLocked()
	if len(c.out) == 0 && c.writing == 0 {
		return c.markClosedLocked()
	}
	c.kickLocked()
	// A write in progress is bounded by its deadline; make sure the
	// reader does not wait for more input meanwhile.
	_ = c.nc.SetReadDeadline(time.Now())
	return false
}

// reasonString is reason if the client accepts reason strings.
func (c *conn) reasonString(reason string) string {
	if c.problem {
		return reason
	}
	return ""
}

// appendDisconnect encodes a v5 DISCONNECT.
func appendDisconnect(b []byte, code byte, reason string) []byte {
	propLen := 0
	if reason != "" {
		propLen = 3 + len(reason)
	}
	b = appendVarint(append(b, packets.Disconnect<<4), 1+varintLen(propLen)+propLen)
	b = appendVarint(append(b, code), propLen)
	if reason != "" {
		b = appendString(append(b, packets.PropReasonString), reason)
	}
	return b
}

// protoError is a violation found while reading or handling a packet: the
// v5 reason code to disconnect with and what to tell.
type protoError struct {
	code   byte
	reason string
}

func (e *protoError) Error() string { return fmt.Sprintf("%s (0x%02x)", e.reason, e.code) }

func protoErr(code byte, reason string) error { return &protoError{code: code, reason: reason} }

// Reason codes (MQTT 5.0 section 2.4) the engine sends.
const (
	codeSuccess              = 0x00
	codeNoMatchingSubs       = 0x10
	codeNoSubscription       = 0x11
	codeUnspecified          = 0x80
	codeMalformed            = 0x81
	codeProtocolError        = 0x82
	codeImplementation       = 0x83
	codeUnsupportedVersion   = 0x84
	codeIDRejected           = 0x85
	codeBadCredentials       = 0x86
	codeNotAuthorized        = 0x87
	codeServerUnavailable    = 0x88
	codeServerBusy           = 0x89
	codeBanned               = 0x8A
	codeServerShuttingDown   = 0x8B
	codeBadAuthMethod        = 0x8C
	codeKeepAliveTimeout     = 0x8D
	codeSessionTakenOver     = 0x8E
	codeFilterInvalid        = 0x8F
	codeTopicInvalid         = 0x90
	codeIDInUse              = 0x91
	codeIDNotFound           = 0x92
	codeReceiveMaxExceeded   = 0x93
	codeTopicAliasInvalid    = 0x94
	codePacketTooLarge       = 0x95
	codeQuotaExceeded        = 0x97
	codeAdminAction          = 0x98
	codeRetainNotSupported   = 0x9A
	codeQoSNotSupported      = 0x9B
	codeSharedNotSupported   = 0x9E
	codeConnRateExceeded     = 0x9F
	codeSubIDsNotSupported   = 0xA1
	codeWildcardNotSupported = 0xA2
)

// packetPool holds decoded packets: a packet is large (about 800 bytes),
// and keeping it off the reader's stack keeps an idle connection's stack
// small.
var packetPool = sync.Pool{New: func() any { return new(packets.Packet) }}

// readPacket reads and decodes one packet into a pooled packet (return it
// with putPacket). A decoded packet's strings and slices point into a
// buffer of its own, which the handlers may keep.
func (c *conn) readPacket() (*packets.Packet, error) {
	pk := packetPool.Get().(*packets.Packet)
	*pk = packets.Packet{}
	if err := c.readInto(pk); err != nil {
		putPacket(pk)
		return nil, err
	}
	return pk, nil
}

func putPacket(pk *packets.Packet) {
	*pk = packets.Packet{}
	packetPool.Put(pk)
}

func (c *conn) readInto(pk *packets.Packet) (err error) {
	hb, err := c.nextByte()
	if err != nil {
		return err
	}
	if err := pk.FixedHeader.Decode(hb); err != nil {
		return protoErr(codeMalformed, "malformed fixed header")
	}
	n, _, err := packets.DecodeLength(&c.in)
	if err != nil {
		if errors.Is(err, io.EOF) || isTimeout(err) {
			return err
		}
		return protoErr(codeMalformed, "malformed remaining length")
	}
	max := c.srv.lim.MaxPacketSize
	if uint64(n)+1+uint64(varintLen(n)) > uint64(max) {
		return protoErr(codePacketTooLarge, "packet larger than the maximum packet size")
	}
	pk.FixedHeader.Remaining = n
	body := make([]byte, n)
	if err := c.in.readFull(body); err != nil {
		return err
	}
	c.srv.stats.bytesIn.Add(int64(1 + varintLen(n) + n))
	c.traffic.bytesIn.Add(uint64(1 + varintLen(n) + n))
	if c.version == 0 && pk.FixedHeader.Type != packets.Connect {
		return protoErr(codeProtocolError, "the first packet must be CONNECT")
	}
	pk.ProtocolVersion = c.version
	if pk.FixedHeader.Type == packets.Connect && c.version == 0 {
		// The version is in the packet; the property check needs it.
		if off := propertiesOffset(packets.Connect, 0, body); off > 0 && off-4 < len(body) && body[off-4] == 5 {
			if err := checkDuplicateProps(packets.Connect, 0, body); err != nil {
				return connectErr{code: codeProtocolError, version: 5, reason: err.Error()}
			}
		}
	} else if c.version == 5 {
		if err := checkDuplicateProps(pk.FixedHeader.Type, pk.FixedHeader.Qos, body); err != nil {
			code := byte(codeProtocolError)
			if errors.Is(err, errBadProperties) {
				code = codeMalformed
			}
			return protoErr(code, err.Error())
		}
	}
	if err := decode(pk, body); err != nil {
		if pk.FixedHeader.Type == packets.Connect && c.version == 0 {
			return connectErr{code: codeMalformed, version: pk.ProtocolVersion, reason: "malformed CONNECT"}
		}
		var code packets.Code
		if errors.As(err, &code) && code.Code >= 0x80 {
			return protoErr(code.Code, code.Reason)
		}
		return protoErr(codeMalformed, "malformed packet")
	}
	return nil
}

// nextByte reads the first byte of a packet. A connection with nothing
// buffered waits holding no read buffer (see input).
func (c *conn) nextByte() (byte, error) {
	if c.in.buffered() > 0 {
		return c.in.ReadByte()
	}
	if c.in.rc == nil {
		c.in.release()
	}
	c.in.atStart = true
	b, err := c.in.ReadByte()
	c.in.atStart = false
	return b, err
}

func (c *conn) releaseReader() { c.in.release() }

// armRead runs before the reader waits for bytes once the connection is
// up: the read deadline is the keep-alive (1.5 times the client's, from
// now), or, at a packet boundary of a plain socket that may idle, the
// moment to hand the connection to the idle poller.
func (c *conn) armRead(atStart bool) error {
	c.flushReplies()
	if len(c.pending) > 0 {
		// Deliver and acknowledge what was read before waiting for more.
		if err := c.finishPending(); err != nil {
			return err
		}
	}
	c.flushReplies() // what answers the bytes read so far leaves before any wait
	if c.stopRead.Load() {
		return errClosing
	}
	if c.kaExpired.Load() {
		return os.ErrDeadlineExceeded
	}
	now := time.Now()
	var ka, d time.Time
	if c.keepalive > 0 {
		ka = now.Add(c.keepalive * 3 / 2)
		d = ka
	}
	c.in.parkArmed = false
	if idle := c.srv.lim.IdleAfter; atStart && !c.noPark && c.in.rc != nil && idle > 0 {
		if c.traffic.msgsIn.Load() == 0 && c.traffic.msgsOut.Load() == 0 {
			idle = min(idle, firstIdleAfter) // nothing published either way yet
		}
		if p := now.Add(idle); ka.IsZero() || p.Before(ka) {
			d, c.in.parkArmed = p, true
			var kaNanos int64
			if !ka.IsZero() {
				kaNanos = ka.UnixNano()
			}
			c.kaDeadline.Store(kaNanos)
		}
	}
	c.in.setDeadline(d)
	if c.stopRead.Load() { // closing raced the deadline: do not wait
		return errClosing
	}
	return nil
}

// park hands an idle connection to the idle poller; the reader goroutine
// returns at once if it reports true, and must not touch c afterwards.
func (c *conn) park() bool {
	p := c.srv.idlePoller()
	if p == nil {
		c.noPark = true
		return false
	}
	c.outMu.Lock()
	defer c.outMu.Unlock()
	if c.closing {
		return false
	}
	c.parked.Store(true)
	c.srv.stats.idle.Add(1)
	if err := p.add(c); err != nil {
		if !c.parked.CompareAndSwap(true, false) {
			return true // the poller's sweep resumed it meanwhile: that reader goes on
		}
		c.srv.stats.idle.Add(-1)
		c.noPark = true
		c.srv.log.Warn("idle connection stays with its reader", "remote", c.remote, "error", err)
		return false
	}
	return true
}

// unpark resumes a parked connection's reader (on input, on an expired
// keep-alive, or because it is closing); a connection not parked is left
// alone.
func (c *conn) unpark(expired bool) {
	if c.parked.CompareAndSwap(true, false) {
		c.srv.stats.idle.Add(-1)
		if expired {
			c.kaExpired.Store(true)
		}
		go c.resume()
	}
}

// stopReadingLocked makes the reader stop waiting for input, resuming it
// if it is parked. Callers hold outMu and set closing.
func (c *conn) stopReadingLocked() {
	c.stopRead.Store(true)
	c.unpark(false)
}

// decode runs mochi's decoder for the packet type; a decoder that panics
// on a short buffer reports a malformed packet instead.
func decode(pk *packets.Packet, body []byte) (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = packets.ErrMalformedPacket
		}
	}()
	switch pk.FixedHeader.Type {
	case packets.Connect:
		return pk.ConnectDecode(body)
	case packets.Publish:
		return pk.PublishDecode(body)
	case packets.Puback:
		return pk.PubackDecode(body)
	case packets.Pubrec:
		return pk.PubrecDecode(body)
	case packets.Pubrel:
		return pk.PubrelDecode(body)
	case packets.Pubcomp:
		return pk.PubcompDecode(body)
	case packets.Subscribe:
		return pk.SubscribeDecode(body)
	case packets.Unsubscribe:
		return pk.UnsubscribeDecode(body)
	case packets.Pingreq:
		if len(body) != 0 {
			return packets.ErrMalformedPacket
		}
		return nil
	case packets.Disconnect:
		return pk.DisconnectDecode(body)
	case packets.Auth:
		return pk.AuthDecode(body)
	}
	return packets.ErrProtocolViolation // CONNACK, SUBACK, ... from a client, or type 0
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}
