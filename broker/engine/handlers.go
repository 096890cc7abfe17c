package engine

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/beaconmq/beacon/broker/topics"
	"github.com/beaconmq/beacon/storage"
)

const (
	pubackType  = packets.Puback
	pubrecType  = packets.Pubrec
	pubcompType = packets.Pubcomp
)

// loop reads and handles packets until the connection ends. It returns
// why, and whether the client ended it with a normal DISCONNECT (no will).
func (c *conn) loop() (error, bool) {
	c.in.arm = c.armRead
	for {
		pk, err := c.readPacket()
		if errors.Is(err, errIdle) {
			if c.park() {
				return errParked, false
			}
			if !c.isClosing() {
				continue // waits with its reader from now on
			}
			err = errClosing
		}
		var reason byte
		if err == nil && c.isClosing() {
			// Closed by the server (a takeover, a kick): bytes still
			// buffered belong to a connection that no longer holds the
			// session.
			putPacket(pk)
			return errClosing, false
		}
		if err == nil {
			err = c.handle(pk)
			if err == nil && c.pendingErr != nil {
				// A pending PUBLISH finished on the way failed to store.
				err, c.pendingErr = c.pendingErr, nil
			}
			reason = pk.ReasonCode
			putPacket(pk)
		}
		if err == nil {
			continue
		}
		var pe *protoError
		switch {
		case errors.Is(err, errDisconnect):
			return err, reason != packets.CodeDisconnectWillMessage.Code
		case errors.As(err, &pe):
			c.close(err, pe.code, pe.reason)
		case isTimeout(err) && !c.isClosing():
			c.close(err, codeKeepAliveTimeout, "keep alive timeout")
			err = errKeepAlive
		case errors.Is(err, io.EOF):
			err = io.ErrUnexpectedEOF // closed without DISCONNECT
		}
		return err, false
	}
}

var (
	errKeepAlive = errors.New("keep-alive timeout")
	errClosing   = errors.New("connection closing")
)

func (c *conn) isClosing() bool {
	c.outMu.Lock()
	defer c.outMu.Unlock()
	return c.closing
}

// handle dispatches one packet after CONNECT.
func (c *conn) handle(pk *packets.Packet) error {
	if len(c.pending) > 0 && (pk.FixedHeader.Type != packets.Publish || pk.FixedHeader.Qos == 0) {
		if err := c.finishPending(); err != nil {
			return err
		}
	}
	switch pk.FixedHeader.Type {
	case packets.Publish:
		return c.publish(pk)
	case packets.Puback, packets.Pubcomp:
		c.sess.ack(c, pk.FixedHeader.Type, pk.PacketID, false)
		return nil
	case packets.Pubrec:
		return c.pubrec(pk)
	case packets.Pubrel:
		return c.pubrel(pk)
	case packets.Subscribe:
		return c.subscribe(pk)
	case packets.Unsubscribe:
		return c.unsubscribe(pk)
	case packets.Pingreq:
		c.reply(func(b []byte) []byte { return append(b, hdrPingresp, 0) })
		return nil
	case packets.Disconnect:
		return c.disconnect(pk)
	case packets.Connect:
		return protoErr(codeProtocolError, "second CONNECT")
	case packets.Auth:
		return protoErr(codeProtocolError, "AUTH without an authentication method")
	}
	return protoErr(codeProtocolError, "unexpected packet type")
}

// publish handles an inbound PUBLISH: validate, authorize, accept (route),
// then acknowledge.
func (c *conn) publish(pk *packets.Packet) error {
	c.srv.stats.received.Add(1)
	c.traffic.msgsIn.Add(1)
	fh := &pk.FixedHeader
	v5 := c.version == 5
	lim := &c.srv.lim
	switch {
	case fh.Qos > 0 && pk.PacketID == 0:
		return protoErr(codeProtocolError, "QoS 1/2 PUBLISH without a packet identifier")
	case fh.Qos > lim.MaxQoS:
		return protoErr(codeQoSNotSupported, "QoS not supported")
	case fh.Retain && lim.NoRetain:
		return protoErr(codeRetainNotSupported, "retained messages are not supported")
	}
	topic := pk.TopicName
	props := &pk.Properties
	if c.srv.topicOverLimit(topic) {
		// Refused before anything keeps it (an alias, a retained entry).
		// The name is well formed but not accepted here: v5 QoS 1/2 get
		// PUBACK/PUBREC 0x90 (MQTT 5.0 3.4.2.1, 3.5.2.1); QoS 0 has no
		// ack, so DISCONNECT 0x90 (3.14.2.1) rather than a silent drop;
		// 3.1.1 has no way to say no, so the connection is closed
		// (MQTT-3.3.5-2) rather than the message acknowledged and lost.
		c.srv.dropped(DropTopicLimit, c.clientID, nil)
		const why = "topic name longer or deeper than this server accepts (mqtt.max_topic_length, mqtt.max_topic_levels)"
		if v5 && fh.Qos > 0 {
			c.refusePublish(pk, codeTopicInvalid, why)
			return nil
		}
		return protoErr(codeTopicInvalid, why)
	}
	if v5 {
		switch {
		case len(props.SubscriptionIdentifier) > 0:
			return protoErr(codeProtocolError, "subscription identifier in a PUBLISH from a client")
		case strings.ContainsAny(props.ResponseTopic, "+#"):
			return protoErr(codeProtocolError, "response topic with wildcards")
		case props.TopicAliasFlag:
			a := props.TopicAlias
			if a == 0 || a > c.aliasMax {
				return protoErr(codeTopicAliasInvalid, "topic alias out of range")
			}
			if topic != "" {
				if c.aliases == nil {
					c.aliases = map[uint16]string{}
				}
				c.aliases[a] = strings.Clone(topic)
			} else if t, ok := c.aliases[a]; ok {
				topic = t
			} else {
				return protoErr(codeProtocolError, "topic alias not set on this connection")
			}
		}
	}
	if topic == "" {
		return protoErr(codeProtocolError, "PUBLISH without a topic name")
	}
	if strings.ContainsAny(topic, "+#") {
		return protoErr(codeProtocolError, "wildcards in a topic name") // MQTT-3.3.2-2
	}
	if !topics.ValidTopicName(topic) {
		return protoErr(codeMalformed, "invalid topic name")
	}
	sess := c.sess
	if fh.Qos == 2 {
		// Check and reserve the id in one step: a resend of the same
		// message on a new connection (while this one is still being
		// accepted) must find it.
		sess.mu.Lock()
		_, dup := sess.inQoS2[pk.PacketID]
		n := len(sess.inQoS2)
		gone := sess.discarded
		if !dup && !gone && n < int(lim.ReceiveMaximum) {
			sess.inQoS2[pk.PacketID] = struct{}{}
		}
		sess.mu.Unlock()
		switch {
		case gone:
			return errTakenOver
		case dup:
			// Received before and PUBREC'd: acknowledge again, do not route twice.
			c.ackPublish(pk, 0, "")
			return nil
		case n >= int(lim.ReceiveMaximum):
			return protoErr(codeReceiveMaxExceeded, "receive maximum exceeded")
		}
	}

	// Authorization.
	denied := ""
	switch {
	case reservedTopic(topic):
		denied = "topic reserved for the broker"
	case !c.principal.Allow(ActPublish, topic):
		denied = "not authorized"
	}
	if denied != "" {
		c.srv.dropped(DropDenied, c.clientID, nil)
		c.refusePublish(pk, codeNotAuthorized, denied)
		return nil
	}
	if pc, ok := c.principal.(PublishChecker); ok {
		if err := pc.CheckPublish(topic, pk.Payload); err != nil {
			c.srv.dropped(DropPolicy, c.clientID, nil)
			c.refusePublish(pk, codeImplementation, "refused by policy: "+err.Error())
			return nil
		}
	}

	now := c.srv.now()
	m := fromPacket(pk, topic, c.clientID, now.UnixNano())
	m.Device = c.device
	if exp := c.srv.messageExpiry(props.MessageExpiryInterval); exp > 0 {
		m.Expiry = now.Unix() + int64(exp/time.Second)
	}
	var in *inbound
	if fh.Qos == 2 {
		in = &inbound{sess: sess, id: pk.PacketID}
	}
	// A durable PUBLISH is acknowledged once its write is: the write is
	// queued now and waited for with those of the PUBLISHes after it in
	// the same read (finishPending), so one publisher's messages share a
	// group commit. QoS 0, and anything without a store, finishes at once.
	c.pending = append(c.pending, pendingPublish{a: c.srv.beginAccept(m, in), qos: fh.Qos, id: pk.PacketID})
	if fh.Qos == 0 || c.srv.store == nil || len(c.pending) >= maxPending {
		return c.finishPending()
	}
	return nil
}

// pendingPublish is an inbound PUBLISH whose write is queued: it is
// delivered and acknowledged by finishPending, in order.
type pendingPublish struct {
	a   *acceptance
	qos byte
	id  uint16
}

// maxPending bounds the PUBLISHes of one connection between their write
// and their delivery.
const maxPending = 64

// finishPending waits for the writes of the pending PUBLISHes, delivers
// them and acknowledges them, in the order they arrived. The reader calls
// it before it waits for input, before handling any other packet (acks
// leave in order; a SUBSCRIBE sees the retained message just published),
// and when the connection ends.
func (c *conn) finishPending() error {
	var failed error
	for i := range c.pending {
		p := c.pending[i]
		c.pending[i] = pendingPublish{}
		if _, err := c.srv.finishAccept(p.a); err != nil {
			// Not stored, so not accepted: the client sends it again.
			c.releaseInboundID(p.qos, p.id)
			var se *storage.SpaceError
			if errors.As(err, &se) {
				// The disk is short of space: refused before anything
				// was written. QoS 0 is dropped (counted); v5 is told
				// with 0x97; a 3.1.1 client, which cannot be told, is
				// closed below and sends it again later.
				if p.qos == 0 {
					continue
				}
				if c.version == 5 && failed == nil {
					c.ackID(p.qos, p.id, codeQuotaExceeded, se.Error())
					continue
				}
			} else {
				c.srv.log.Error("publish not stored", "client", c.clientID, "error", err)
			}
			if c.version < 5 || p.qos == 0 {
				if failed == nil {
					failed = fmt.Errorf("store: %w", err)
				}
				continue
			}
			c.ackID(p.qos, p.id, codeUnspecified, "not stored")
			continue
		}
		if failed == nil {
			c.ackID(p.qos, p.id, 0, "")
		}
	}
	c.pending = c.pending[:0]
	if cap(c.pending) > 8 {
		c.pending = nil // an idle connection keeps no large slice
	}
	return failed
}

// releaseInbound forgets the reserved id of an inbound QoS 2 message that
// was not accepted.
func (c *conn) releaseInbound(pk *packets.Packet) {
	c.releaseInboundID(pk.FixedHeader.Qos, pk.PacketID)
}

func (c *conn) releaseInboundID(qos byte, id uint16) {
	if qos == 2 {
		c.sess.mu.Lock()
		delete(c.sess.inQoS2, id)
		c.sess.mu.Unlock()
	}
}

// topicOverLimit reports whether a topic name or filter is longer or has
// more levels than Limits.MaxTopicLength and MaxTopicLevels allow.
func (s *Server) topicOverLimit(t string) bool {
	return len(t) > s.lim.MaxTopicLength || (s.lim.MaxTopicLevels > 0 && strings.Count(t, "/") >= s.lim.MaxTopicLevels)
}

// messageExpiry is the expiry to apply to a message whose publisher asked
// for interval seconds (0 = none), under Limits.MaxMessageExpiry.
func (s *Server) messageExpiry(interval uint32) time.Duration {
	d := time.Duration(interval) * time.Second
	if max := s.lim.MaxMessageExpiry; max > 0 && (d == 0 || d > max) {
		d = max
	}
	return d
}

// refusePublish answers a PUBLISH that is not accepted: v5 QoS 1/2 get
// the reason; QoS 0 and 3.1.1 publishes are acknowledged and dropped
// (3.1.1 has no way to say no).
func (c *conn) refusePublish(pk *packets.Packet, code byte, reason string) {
	if pk.FixedHeader.Qos == 0 {
		return
	}
	if c.version < 5 {
		// Acknowledged and dropped; a QoS 2 flow keeps its reserved id
		// until the PUBREL.
		c.ackPublish(pk, 0, "")
		return
	}
	// A v5 PUBREC with a failure code ends the QoS 2 flow: no PUBREL follows.
	c.releaseInbound(pk)
	c.ackPublish(pk, code, reason)
}

// ackPublish acknowledges a PUBLISH that is not pending, after the
// pending ones (acks leave in the order the PUBLISHes came).
func (c *conn) ackPublish(pk *packets.Packet, code byte, reason string) {
	if pk.FixedHeader.Qos == 0 {
		return
	}
	if len(c.pending) > 0 {
		if err := c.finishPending(); err != nil {
			// The connection closes (loop) and this ack does not go out:
			// the client resends from the message that failed.
			c.pendingErr = err
			return
		}
	}
	c.ackID(pk.FixedHeader.Qos, pk.PacketID, code, reason)
}

func (c *conn) ackID(qos byte, id uint16, code byte, reason string) {
	hdr := byte(hdrPuback)
	switch qos {
	case 0:
		return
	case 2:
		hdr = hdrPubrec
	}
	reason = c.reasonString(reason)
	c.reply(func(b []byte) []byte { return appendAck(b, hdr, c.version, id, code, reason) })
}

// pubrec handles the client's PUBREC of an outbound QoS 2 message.
func (c *conn) pubrec(pk *packets.Packet) error {
	id := pk.PacketID
	if c.version == 5 && pk.ReasonCode >= 0x80 {
		// The client refused the message: the flow ends here.
		c.sess.ack(c, pubrecType, id, true)
		return nil
	}
	if !c.sess.released(c, id) {
		code := byte(codeIDNotFound)
		c.queue(func(b []byte) []byte { return appendAck(b, hdrPubrel, c.version, id, code, "") })
	}
	return nil
}

// pubrel releases an inbound QoS 2 message: PUBCOMP.
func (c *conn) pubrel(pk *packets.Packet) error {
	id := pk.PacketID
	c.sess.mu.Lock()
	_, ok := c.sess.inQoS2[id]
	delete(c.sess.inQoS2, id)
	persistent := c.sess.persistent
	c.sess.mu.Unlock()
	if ok && persistent && c.srv.store != nil {
		// Gone before PUBCOMP: a later PUBLISH reusing the id is a new message.
		if err := c.srv.store.db.Write(storage.Delete(storage.InboundKey(c.clientID, id))); err != nil {
			return fmt.Errorf("store: %w", err)
		}
	}
	code := byte(codeSuccess)
	if !ok {
		code = codeIDNotFound
	}
	c.reply(func(b []byte) []byte { return appendAck(b, hdrPubcomp, c.version, id, code, "") })
	return nil
}

// subscribe handles SUBSCRIBE: SUBACK, then the retained messages of the
// granted filters.
func (c *conn) subscribe(pk *packets.Packet) error {
	if pk.PacketID == 0 {
		return protoErr(codeMalformed, "SUBSCRIBE without a packet identifier")
	}
	if len(pk.Filters) == 0 {
		return protoErr(codeProtocolError, "SUBSCRIBE without filters")
	}
	var subID uint32
	if ids := pk.Properties.SubscriptionIdentifier; len(ids) > 0 {
		if len(ids) > 1 || ids[0] <= 0 || ids[0] > 268435455 {
			return protoErr(codeProtocolError, "invalid subscription identifier")
		}
		subID = uint32(ids[0])
	}
	lim := &c.srv.lim
	codes := make([]byte, len(pk.Filters))
	type retainedReq struct {
		filter string
		qos    byte
	}
	var sendRetained []retainedReq
	var added []topics.Subscription
	fail := func(i int, code byte) {
		if c.version < 5 {
			code = 0x80
		}
		codes[i] = code
	}
	for i, f := range pk.Filters {
		if f.RetainHandling > 2 {
			return protoErr(codeProtocolError, "retain handling 3")
		}
		filter, group := f.Filter, ""
		if strings.HasPrefix(filter, "$share/") {
			g, inner, _, ok := topics.ParseShared(filter)
			switch {
			case !ok:
				fail(i, codeFilterInvalid)
				continue
			case f.NoLocal && c.version == 5:
				return protoErr(codeProtocolError, "no local on a shared subscription")
			case lim.NoSharedSubs:
				fail(i, codeSharedNotSupported)
				continue
			}
			filter, group = inner, g
		} else if !topics.ValidFilter(filter) {
			fail(i, codeFilterInvalid)
			continue
		}
		if c.srv.topicOverLimit(filter) {
			c.srv.dropped(DropTopicLimit, c.clientID, nil)
			fail(i, codeFilterInvalid)
			continue
		}
		if !c.principal.Allow(ActSubscribe, filter) {
			c.srv.dropped(DropDenied, c.clientID, nil)
			fail(i, codeNotAuthorized)
			continue
		}
		qos := min(f.Qos, lim.MaxQoS)
		sub := topics.Subscription{
			Client: c.clientID, Filter: strings.Clone(filter), Group: strings.Clone(group), QoS: qos,
			NoLocal: f.NoLocal && c.version == 5, RetainAsPublished: f.RetainAsPublished && c.version == 5,
			RetainHandling: f.RetainHandling, ID: subID,
		}
		if c.version < 5 {
			sub.RetainHandling = 0
		}
		replaced := c.srv.index.Subscribe(sub)
		codes[i] = qos
		added = append(added, sub)
		if group == "" && (sub.RetainHandling == 0 || (sub.RetainHandling == 1 && !replaced)) {
			sendRetained = append(sendRetained, retainedReq{sub.Filter, qos})
		}
	}
	if err := c.srv.storeSubs(c.sess, added, nil); err != nil {
		return fmt.Errorf("store: %w", err)
	}
	if cl := c.srv.opts.Cluster; cl != nil && len(added) > 0 {
		// Before the SUBACK: the other nodes are told of a new filter, so
		// what they accept from now on comes here.
		cl.AwaitInterest(interestWait)
	}
	c.observeSubs(pk, codes, false)
	ack := &packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Suback}, ProtocolVersion: c.version,
		PacketID: pk.PacketID, ReasonCodes: codes}
	var buf bytes.Buffer
	_ = ack.SubackEncode(&buf)
	c.queue(func(b []byte) []byte { return append(b, buf.Bytes()...) })

	var ids []uint32
	if subID > 0 {
		ids = []uint32{subID}
	}
	for _, r := range sendRetained {
		c.srv.retained.Match(r.filter, func(topic string, m *Message) bool {
			if m.expired(c.srv.now().Unix()) {
				return true
			}
			if !c.principal.Allow(ActRead, topic) {
				c.srv.dropped(DropDenied, c.clientID, m)
				return true
			}
			c.sess.deliverRetained(m, min(m.QoS, r.qos), ids)
			return true
		})
	}
	return nil
}

// unsubscribe handles UNSUBSCRIBE.
func (c *conn) unsubscribe(pk *packets.Packet) error {
	if pk.PacketID == 0 {
		return protoErr(codeMalformed, "UNSUBSCRIBE without a packet identifier")
	}
	if len(pk.Filters) == 0 {
		return protoErr(codeProtocolError, "UNSUBSCRIBE without filters")
	}
	codes := make([]byte, len(pk.Filters))
	var removed []topics.Subscription
	for i, f := range pk.Filters {
		filter, group := f.Filter, ""
		if strings.HasPrefix(filter, "$share/") {
			g, inner, _, ok := topics.ParseShared(filter)
			if !ok {
				codes[i] = codeFilterInvalid
				continue
			}
			filter, group = inner, g
		} else if !topics.ValidFilter(filter) {
			codes[i] = codeFilterInvalid
			continue
		}
		if !c.srv.index.Unsubscribe(c.clientID, filter, group) {
			codes[i] = codeNoSubscription
			continue
		}
		removed = append(removed, topics.Subscription{Filter: filter, Group: group})
	}
	_ = c.srv.storeSubs(c.sess, nil, removed)
	c.observeSubs(pk, codes, true)
	if c.version < 5 {
		codes = nil
	}
	ack := &packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Unsuback}, ProtocolVersion: c.version,
		PacketID: pk.PacketID, ReasonCodes: codes}
	var buf bytes.Buffer
	_ = ack.UnsubackEncode(&buf)
	c.queue(func(b []byte) []byte { return append(b, buf.Bytes()...) })
	return nil
}

// disconnect handles the client's DISCONNECT.
func (c *conn) disconnect(pk *packets.Packet) error {
	if c.version == 5 && pk.Properties.SessionExpiryIntervalFlag {
		sess := c.sess
		sess.mu.Lock()
		was := sess.expiry
		if was == 0 && pk.Properties.SessionExpiryInterval > 0 {
			sess.mu.Unlock()
			return protoErr(codeProtocolError, "session expiry set on DISCONNECT after 0 at CONNECT")
		}
		sess.expiry = min(time.Duration(pk.Properties.SessionExpiryInterval)*time.Second, c.srv.lim.MaxSessionExpiry)
		sess.persistent = sess.expiry > 0
		sess.mu.Unlock()
	}
	c.close(errDisconnect, 0, "")
	return errDisconnect
}

// sendQoS0 queues a QoS 0 delivery if the connection has room for it.
// Without room it is dropped and counted, unless full is given: then
// nothing is counted, *full is set to the size, and the caller may wait
// for room (awaitRoom) and try again. Callers hold the session's lock.
func (c *conn) sendQoS0(m *Message, retain bool, subIDs []uint32, live bool, full *int) bool {
	d := delivery{retain: retain, subIDs: subIDs, expiry: c.srv.remainingExpiry(m)}
	size, _, _ := publishSize(m, c.version, &d)
	if c.maxOut > 0 && uint32(size) > c.maxOut {
		c.srv.dropped(DropTooLarge, c.clientID, m)
		return false
	}
	if !c.queueIfRoom(size, func(b []byte) []byte { return c.encodePublish(b, m, &d) }) {
		if full != nil {
			*full = size
			return false
		}
		c.srv.dropped(DropQueueFull, c.clientID, m)
		return false
	}
	c.srv.stats.sent.Add(1)
	c.traffic.msgsOut.Add(1)
	if so := c.srv.sentObs; so != nil {
		so.Sent(m, 0, live)
	}
	return true
}

// end runs once the reader stops: the session is detached (and ended
// unless persistent), the will is published or scheduled, observers told.
func (c *conn) end(cause error, graceful bool) {
	c.close(cause, 0, "")
	c.outMu.Lock()
	if c.closeErr != nil {
		// Closed by the server (shutdown, takeover, kick, slow consumer):
		// that is why the read failed.
		cause = c.closeErr
	}
	c.outMu.Unlock()
	if c.stopTimer != nil {
		c.stopTimer()
	}
	s := c.srv
	sess := c.sess
	var will *Message
	s.mu.Lock()
	sess.mu.Lock()
	current := sess.conn == c
	if current {
		sess.conn = nil
	}
	if c.will != nil && !graceful && !errors.Is(cause, errShutdown) {
		switch {
		case c.willDelay == 0, current && !sess.persistent, !current && sess.discarded:
			will = c.will
		case current:
			sess.will = c.will
			sess.willTimer = time.AfterFunc(min(c.willDelay, sess.expiry), func() { s.sendDelayedWill(sess) })
		}
		// Taken over by a connection that keeps the session: the will
		// waits for a delay that the new connection cancelled.
	}
	if current {
		if !sess.persistent {
			sess.dropStoredLocked()
			sess.discardLocked()
			if s.sessions[sess.id] == sess {
				delete(s.sessions, sess.id)
			}
		} else {
			sess.expireAt = s.now().Add(sess.expiry)
			if s.store != nil {
				s.store.async(nil, s.store.sessionOp(sess, sess.expireAt.Add(-sess.expiry).Unix(), sess.will, c.willDelay))
				sess.recorded = true
			}
			if !s.closing {
				sess.expireTimer = time.AfterFunc(sess.expiry, func() { s.expire(sess) })
			}
		}
	}
	sess.mu.Unlock()
	if current && !sess.persistent {
		s.index.RemoveClient(sess.id)
	}
	s.mu.Unlock()
	if will != nil {
		s.publishWill(will)
	}
	s.log.Debug("client disconnected", "client", c.clientID, "remote", c.remote, "cause", cause)
	if o := s.opts.Observer; o != nil {
		o.Disconnected(c.info(), cause)
	}
	close(c.done) // Kick waits for it
}

// sendDelayedWill publishes a will whose delay passed while its session
// stayed offline.
func (s *Server) sendDelayedWill(sess *session) {
	sess.mu.Lock()
	w := sess.will
	if sess.conn != nil {
		w = nil
	}
	sess.will, sess.willTimer = nil, nil
	if w != nil && s.store != nil && sess.recorded && !sess.discarded {
		// Sent: the record keeps it no longer (a restart must not send it again).
		s.store.async(nil, s.store.sessionOp(sess, sess.expireAt.Add(-sess.expiry).Unix(), nil, 0))
	}
	sess.mu.Unlock()
	if w != nil {
		s.publishWill(w)
	}
}

// expire ends an offline persistent session whose expiry passed; a will
// still waiting for its delay goes now (the session ended first).
func (s *Server) expire(sess *session) {
	s.mu.Lock()
	sess.mu.Lock()
	if sess.conn != nil || sess.discarded || s.sessions[sess.id] != sess || (sess.moving != nil && sess.moving.held) {
		sess.mu.Unlock()
		s.mu.Unlock()
		return
	}
	sess.dropStoredLocked()
	sess.discardLocked()
	delete(s.sessions, sess.id)
	w := sess.will
	if sess.willTimer != nil {
		sess.willTimer.Stop()
	}
	sess.will, sess.willTimer = nil, nil
	sess.mu.Unlock()
	s.index.RemoveClient(sess.id)
	s.mu.Unlock()
	if w != nil {
		s.publishWill(w)
	}
}

// storeSubs records subscriptions added to and removed from a persistent
// session; additions are durable before the SUBACK.
func (s *Server) storeSubs(sess *session, added, removed []topics.Subscription) error {
	if s.store == nil || (len(added) == 0 && len(removed) == 0) {
		return nil
	}
	sess.mu.Lock()
	persistent := sess.persistent
	sess.mu.Unlock()
	if !persistent {
		return nil
	}
	ops := make([]storage.Op, 0, len(added)+len(removed))
	for i := range added {
		ops = append(ops, subOp(sess.id, &added[i]))
	}
	for _, r := range removed {
		ops = append(ops, storage.Delete(storage.SubKey(sess.id, r.Group, r.Filter)))
	}
	if len(added) == 0 {
		s.store.async(nil, ops...)
		return nil
	}
	return s.store.db.Write(ops...)
}
