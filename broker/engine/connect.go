package engine

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/beaconmq/beacon/broker/topics"
)

// connectErr refuses a CONNECT: a CONNACK with code (the v5 code, mapped
// for 3.1.1 clients; 0 = close without CONNACK), then the socket closes.
type connectErr struct {
	code    byte
	version byte
	reason  string
}

func (e connectErr) Error() string {
	return fmt.Sprintf("connect refused: %s (0x%02x)", e.reason, e.code)
}

// v3Code maps a v5 CONNACK code to the 3.1.1 return code; 0 means the
// 3.1.1 client gets no CONNACK, only a closed connection (MQTT-3.1.4-1).
func v3Code(code byte) byte {
	switch code {
	case codeUnsupportedVersion:
		return 0x01
	case codeIDRejected:
		return 0x02
	case codeServerUnavailable, codeServerBusy, codeQuotaExceeded, codeServerShuttingDown:
		return 0x03
	case codeBadCredentials:
		return 0x04
	case codeNotAuthorized, codeBanned, codeConnRateExceeded:
		return 0x05
	}
	return 0
}

var (
	errTakenOver  = errors.New("session taken over")
	errDisconnect = errors.New("client disconnected")
	errExpired    = errors.New("credentials expired")
)

// serve reads the CONNECT, then every packet until the connection ends
// (false) or idles (true: the idle poller resumes it).
func (c *conn) serve() bool {
	_ = c.nc.SetReadDeadline(time.Now().Add(c.srv.lim.ConnectTimeout))
	pk, err := c.readPacket()
	if err == nil {
		if pk.FixedHeader.Type != packets.Connect {
			err = protoErr(codeProtocolError, "the first packet must be CONNECT")
		} else {
			err = c.connect(pk)
		}
		putPacket(pk)
	}
	if err != nil {
		var ce connectErr
		if errors.As(err, &ce) {
			c.refuse(ce)
		}
		c.close(err, 0, "")
		c.releaseReader()
		c.srv.log.Debug("connection refused", "remote", c.remote, "listener", c.listener, "error", err)
		return false
	}
	return c.serveLoop()
}

// serveLoop reads packets until the connection ends or idles. It reports
// true if the connection was handed to the idle poller.
func (c *conn) serveLoop() bool {
	cause, graceful := c.loop()
	if cause == errParked {
		return true
	}
	// Accepted messages are delivered even if the connection ends before
	// their acks can go out.
	_ = c.finishPending()
	c.releaseReader()
	c.end(cause, graceful)
	return false
}

// resume continues an idle connection's reader.
func (c *conn) resume() {
	if !c.serveLoop() {
		c.srv.finish(c)
	}
}

// refuse sends the CONNACK of a refused CONNECT.
func (c *conn) refuse(ce connectErr) {
	code := ce.code
	if ce.version < 5 {
		code = v3Code(code)
		if code == 0 {
			return
		}
	}
	pk := &packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connack}, ProtocolVersion: ce.version, ReasonCode: code}
	if ce.version == 5 && ce.reason != "" {
		pk.Properties.ReasonString = ce.reason
	}
	var buf bytes.Buffer
	if pk.ConnackEncode(&buf) == nil {
		c.queue(func(b []byte) []byte { return append(b, buf.Bytes()...) })
	}
}

// refuseBusy answers a connection beyond Limits.MaxClients.
func (c *conn) refuseBusy() {
	_ = c.nc.SetReadDeadline(time.Now().Add(c.srv.lim.ConnectTimeout))
	pk, err := c.readPacket()
	if err == nil {
		if pk.FixedHeader.Type == packets.Connect {
			c.refuse(connectErr{code: codeServerBusy, version: pk.ProtocolVersion, reason: "too many connections"})
		}
		putPacket(pk)
	}
	c.close(ErrServerBusy, 0, "")
	c.releaseReader()
}

// connect validates, authenticates and admits a CONNECT.
func (c *conn) connect(pk *packets.Packet) error {
	cn := &pk.Connect
	v := pk.ProtocolVersion
	switch {
	case bytes.Equal(cn.ProtocolName, []byte("MQTT")) && (v == 4 || v == 5):
	case bytes.Equal(cn.ProtocolName, []byte("MQIsdp")) && v == 3:
	case bytes.Equal(cn.ProtocolName, []byte("MQTT")) || bytes.Equal(cn.ProtocolName, []byte("MQIsdp")):
		// A level we do not speak: answer as 3.1.1 does (0x01), which
		// every client version can read (MQTT-3.1.2-2).
		return connectErr{code: codeUnsupportedVersion, version: 4, reason: "unsupported protocol version"}
	default:
		return connectErr{code: 0, version: 4, reason: "not MQTT"}
	}
	refuse := func(code byte, reason string) error { return connectErr{code: code, version: v, reason: reason} }
	if code := pk.ConnectValidate(); code.Code >= 0x80 {
		if code.Code == packets.ErrClientIdentifierNotValid.Code {
			return refuse(codeIDRejected, code.Reason)
		}
		return refuse(codeMalformed, code.Reason)
	}
	props := &pk.Properties
	if v == 5 && props.AuthenticationMethod != "" {
		return refuse(codeBadAuthMethod, "enhanced authentication is not supported")
	}
	c.version = v
	c.problem = v == 5 && (!props.RequestProblemInfoFlag || props.RequestProblemInfo == 1)

	// Client identifier.
	id := cn.ClientIdentifier
	assigned := false
	if id == "" {
		if v < 5 && !cn.Clean {
			return refuse(codeIDRejected, "an empty client id needs a clean session")
		}
		id = "auto-" + randomID()
		assigned = true
	} else {
		id = strings.Clone(id)
	}

	// Keep-alive bounds.
	ka := time.Duration(cn.Keepalive) * time.Second
	want := ka
	if max := c.srv.lim.KeepaliveMax; max > 0 && (ka == 0 || ka > max) {
		want = max
	}
	if min := c.srv.lim.KeepaliveMin; ka != 0 && ka < min {
		want = min
	}
	if want != ka && v < 5 {
		return refuse(codeIDRejected, "keep-alive outside the allowed range")
	}

	// The will.
	var will *Message
	var willDelay time.Duration
	if cn.WillFlag {
		if !topics.ValidTopicName(cn.WillTopic) || c.srv.topicOverLimit(cn.WillTopic) {
			return refuse(codeTopicInvalid, "the will topic is not a valid topic name here")
		}
		if cn.WillQos > c.srv.lim.MaxQoS {
			return refuse(codeQoSNotSupported, "will QoS not supported")
		}
		if cn.WillRetain && c.srv.lim.NoRetain {
			return refuse(codeRetainNotSupported, "retained messages are not supported")
		}
		wp := &cn.WillProperties
		if strings.ContainsAny(wp.ResponseTopic, "+#") {
			return refuse(codeProtocolError, "the will's response topic has wildcards")
		}
		will = &Message{
			Topic: strings.Clone(cn.WillTopic), Payload: cn.WillPayload, QoS: cn.WillQos, Retain: cn.WillRetain,
			Client: id, PayloadFormat: wp.PayloadFormat, PayloadFormatSet: wp.PayloadFormatFlag,
			ContentType: wp.ContentType, ResponseTopic: wp.ResponseTopic, CorrelationData: wp.CorrelationData, User: wp.User,
		}
		if wp.MessageExpiryInterval > 0 {
			will.Expiry = int64(wp.MessageExpiryInterval) // relative until sent
		}
		willDelay = time.Duration(wp.WillDelayInterval) * time.Second
	}

	// Authentication.
	var p Principal = AllowAll{}
	if a := c.srv.opts.Auth; a != nil {
		req := &ConnectRequest{ClientID: cn.ClientIdentifier, Username: string(cn.Username), Password: cn.Password,
			PasswordSet: cn.PasswordFlag, ProtocolVersion: v, Listener: c.listener, Remote: c.nc.RemoteAddr(), Conn: c.nc, Will: will}
		if assigned {
			req.ClientID = id
		}
		got, err := a.Authenticate(req)
		if err != nil {
			switch {
			case errors.Is(err, ErrNotAuthorized):
				return refuse(codeNotAuthorized, "not authorized")
			case errors.Is(err, ErrBanned):
				return refuse(codeBanned, "banned")
			case errors.Is(err, ErrServerBusy):
				return refuse(codeServerBusy, "server busy")
			case errors.Is(err, ErrQuotaExceeded):
				return refuse(codeQuotaExceeded, "quota exceeded")
			case errors.Is(err, ErrRateExceeded):
				return refuse(codeConnRateExceeded, "connection rate exceeded")
			}
			return refuse(codeBadCredentials, "bad user name or password")
		}
		if got != nil {
			p = got
		}
	}
	if will != nil {
		if !p.Allow(ActPublish, will.Topic) || reservedTopic(will.Topic) {
			return refuse(codeNotAuthorized, "the will's topic is not allowed for this client")
		}
		if pc, ok := p.(PublishChecker); ok && pc.CheckPublish(will.Topic, will.Payload) != nil {
			return refuse(codeNotAuthorized, "the will's payload is not allowed for this client")
		}
	}
	c.clientID, c.username, c.principal = id, string(cn.Username), p
	if dn, ok := p.(DeviceNamer); ok {
		c.device = dn.Device()
	}
	c.keepalive = want
	c.maxOut = props.MaximumPacketSize
	if v == 5 {
		c.outAliasMax = props.TopicAliasMaximum
	}
	c.aliasMax = c.srv.lim.TopicAliasMax
	c.will, c.willDelay = will, willDelay
	c.cleanStart, c.connectedAt = cn.Clean, c.srv.now()

	// Session.
	expiry := time.Duration(0)
	if v == 5 {
		expiry = time.Duration(props.SessionExpiryInterval) * time.Second
	} else if !cn.Clean {
		expiry = c.srv.lim.MaxSessionExpiry
	}
	capped := false
	if expiry > c.srv.lim.MaxSessionExpiry {
		expiry, capped = c.srv.lim.MaxSessionExpiry, true
	}
	recvMax := props.ReceiveMaximum
	if v < 5 || recvMax == 0 {
		recvMax = 65535
	}

	ack := &packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connack}, ProtocolVersion: v}
	if v == 5 {
		ap := &ack.Properties
		ap.ReceiveMaximum = c.srv.lim.ReceiveMaximum
		ap.MaximumPacketSize = c.srv.lim.MaxPacketSize
		ap.TopicAliasMaximum = c.srv.lim.TopicAliasMax
		if c.srv.lim.MaxQoS < 2 {
			ap.MaximumQos, ap.MaximumQosFlag = c.srv.lim.MaxQoS, true
		}
		if c.srv.lim.NoRetain {
			ap.RetainAvailable, ap.RetainAvailableFlag = 0, true
		}
		if c.srv.lim.NoSharedSubs {
			ap.SharedSubAvailable, ap.SharedSubAvailableFlag = 0, true
		}
		if assigned {
			ap.AssignedClientID = id
		}
		if want != ka {
			ap.ServerKeepAlive, ap.ServerKeepAliveFlag = uint16(want/time.Second), true
		}
		if capped {
			ap.SessionExpiryInterval, ap.SessionExpiryIntervalFlag = uint32(expiry/time.Second), true
		}
	}
	if expiry > 0 {
		if err := c.srv.roomForSession(id, cn.Clean); err != nil {
			return refuse(codeQuotaExceeded, err.Error())
		}
	}
	if err := c.srv.claim(id, assigned, cn.Clean, expiry > 0, p); err != nil {
		c.srv.log.Warn("connect refused: the session is on another node", "client", id, "error", err)
		return refuse(codeServerUnavailable, "the session is on another node and was not handed over; try again")
	}
	err := c.srv.attach(c, attachReq{clean: cn.Clean, expiry: expiry, recvMax: recvMax, connack: ack})
	if err != nil {
		return err
	}
	if e, ok := p.(Expirer); ok {
		if t := e.Expires(); !t.IsZero() {
			timer := time.AfterFunc(time.Until(t), func() { c.close(errExpired, codeNotAuthorized, "credentials expired") })
			c.stopTimer = timer.Stop
		}
	}
	c.srv.log.Debug("client connected", "client", id, "remote", c.remote, "listener", c.listener, "version", v)
	if o := c.srv.opts.Observer; o != nil {
		o.Connected(c.info())
	}
	return nil
}

func (c *conn) info() *ClientInfo {
	return &ClientInfo{ID: c.clientID, Username: c.username, Listener: c.listener, Remote: c.remote,
		ProtocolVersion: c.version, Principal: c.principal, SessionPresent: c.sessionPresent, Persistent: c.persistent,
		CleanStart: c.cleanStart, KeepAlive: c.keepalive}
}

func randomID() string {
	var b [12]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// reservedTopic reports whether only the broker may publish to topic.
func reservedTopic(topic string) bool {
	return strings.HasPrefix(topic, "$SYS/") || topic == "$SYS" || strings.HasPrefix(topic, "$beacon/")
}

// roomForSession refuses a new persistent session while the store's
// volume is below its reserve (storage.ErrNoSpace); a client resuming
// the session it has may connect, so its queue drains.
func (s *Server) roomForSession(id string, clean bool) error {
	if s.store == nil {
		return nil
	}
	r, ok := s.store.db.(roomer)
	if !ok {
		return nil
	}
	if ss := s.session(id); ss != nil && !clean {
		ss.mu.Lock()
		resumes := !ss.discarded
		ss.mu.Unlock()
		if resumes {
			return nil
		}
	}
	return r.Room(256)
}

// claim takes client's session from another node of the cluster when
// it holds it (Cluster.Claim), before attach finds it here.
func (s *Server) claim(client string, assigned, clean, persistent bool, p Principal) error {
	cl := s.opts.Cluster
	if cl == nil || assigned { // an id made here is nobody else's
		return nil
	}
	if sess := s.session(client); sess != nil {
		sess.mu.Lock()
		moving := sess.moving != nil
		sess.mu.Unlock()
		if moving {
			return ErrMoving // it is still leaving for another node: the client tries again
		}
	}
	moved, commit, err := cl.Claim(client, clean, persistent)
	if err != nil || moved == nil {
		return err
	}
	// The session is held (refusing CONNECTs, not moving out) from
	// moveIn until the commit is decided.
	merged, gen, err := s.moveIn(client, moved, p)
	if err == nil {
		err = commit(gen, merged)
	}
	switch {
	case err == nil:
		s.release(client, gen)
	case errors.Is(err, ErrUndecided):
		// Settled later (SettleMove), held meanwhile.
	case errors.Is(err, ErrMoving):
	case merged:
		// A session that was here already keeps what it took in (the
		// other node kept its copy too): a later move of the same
		// messages skips them (seen).
		s.release(client, gen)
	default:
		s.dropMovedIn(client, gen)
	}
	return err
}

type attachReq struct {
	clean   bool
	expiry  time.Duration
	recvMax uint16
	connack *packets.Packet
}

// attach gives c its session: a new one, or the stored one of its client
// id (taking it over from a connection that still holds it). The CONNACK
// is queued under the session's lock before anything else can be sent to
// c, then the flows in flight are resent.
func (s *Server) attach(c *conn, r attachReq) error {
	s.mu.Lock()
	if s.closing {
		s.mu.Unlock()
		return connectErr{code: codeServerShuttingDown, version: c.version, reason: "server shutting down"}
	}
	id := c.clientID
	var oldConn *conn
	sess := s.sessions[id]
	present := false
	if sess != nil {
		sess.mu.Lock()
		if sess.moving != nil {
			sess.mu.Unlock()
			s.mu.Unlock()
			return connectErr{code: codeServerUnavailable, version: c.version, reason: "the session is moving to another node"}
		}
		oldConn = sess.conn
		sess.conn = nil
		if sess.expireTimer != nil {
			sess.expireTimer.Stop()
			sess.expireTimer = nil
		}
		if sess.willTimer != nil {
			// A new connection before the will delay passed: no will (MQTT-3.1.3-9).
			sess.willTimer.Stop()
			sess.willTimer = nil
		}
		sess.will = nil
		if r.clean || sess.discarded {
			sess.dropStoredLocked()
			sess.discardLocked()
			sess.mu.Unlock()
			s.index.RemoveClient(id)
			sess = nil
		} else {
			// Kept locked until c holds it: a message routed meanwhile
			// waits for the lock, then finds c (with its CONNACK queued).
			present = true
		}
	}
	if sess == nil {
		sess = newSession(s, id)
		if s.store != nil {
			s.store.gen++
			sess.gen = s.store.gen
		}
		sess.mu.Lock()
	}
	sess.principal = c.principal
	sess.version = c.version
	sess.expiry = r.expiry
	sess.persistent = r.expiry > 0
	if s.store != nil {
		if sess.persistent {
			// Ordered under s.mu with the records of this client id's
			// previous and next sessions.
			s.store.async(nil, s.store.sessionOp(sess, 0, c.will, c.willDelay))
			sess.recorded = true
		} else {
			sess.dropStoredLocked()
		}
	}
	sess.recvMax = r.recvMax
	sess.maxOut = c.maxOut
	sess.conn = c
	s.sessions[id] = sess
	c.sess = sess
	c.sessionPresent = present
	c.persistent = sess.persistent
	r.connack.SessionPresent = present
	var buf bytes.Buffer
	_ = r.connack.ConnackEncode(&buf)
	c.queue(func(b []byte) []byte { return append(b, buf.Bytes()...) })
	// From now on a close tells a v5 client why (after the CONNACK).
	c.outMu.Lock()
	c.v5bye, c.byeReason = c.version == 5, c.problem
	c.outMu.Unlock()
	s.mu.Unlock()

	sess.resendLocked(c)
	sess.pumpLocked()
	sess.mu.Unlock()

	if oldConn != nil {
		oldConn.takeOver()
	}
	return nil
}

// takeOver closes a connection whose session another connection (here
// or on another node) took: 0x8E for a v5 client.
func (c *conn) takeOver() {
	c.takenOver.Store(true)
	c.close(errTakenOver, codeSessionTakenOver, "session taken over")
}

// discardLocked ends a session's life: queued and inflight messages are
// dropped. Callers hold mu and remove its subscriptions.
func (s *session) discardLocked() {
	s.discarded = true
	s.out, s.byID, s.queue, s.expiring = nil, nil, nil, 0
	s.inQoS2 = map[uint16]struct{}{}
}
