package hooks

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
)

// Limits applies per-connection limits and repairs that mochi leaves to
// its embedder: keep-alive bounds, the CONNACK properties that tell v5
// clients the maximum packet size and topic alias maximum, the order of
// resent messages, the reason code of a DISCONNECT, and the send quota.
type Limits struct {
	mqtt.HookBase
	server *mqtt.Server
	opts   LimitsOptions
	// displaced holds, per client, an outbound message whose packet id an
	// inbound QoS 1 PUBLISH is reusing (see OnPacketRead).
	displaced sync.Map // *mqtt.Client -> packets.Packet
}

// LimitsOptions configures NewLimits.
type LimitsOptions struct {
	Server            *mqtt.Server
	KeepaliveMin      uint16 // seconds; 0 = no lower bound
	KeepaliveMax      uint16 // seconds; 0 = no upper bound
	MaxPacketSize     uint32
	TopicAliasMaximum uint16
}

// NewLimits returns the limits hook.
func NewLimits(opts LimitsOptions) *Limits { return &Limits{server: opts.Server, opts: opts} }

var _ mqtt.Hook = (*Limits)(nil)

// ErrKeepaliveRefused is returned from OnConnect when a v3.1.1 client asks
// for a keep-alive outside the configured bounds (v5 clients are told the
// server's value instead).
var ErrKeepaliveRefused = errors.New("keep-alive outside the allowed range")

// ID implements mqtt.Hook.
func (h *Limits) ID() string { return "beacon-limits" }

var limitsEvents = eventSet(mqtt.OnConnect, mqtt.OnPacketRead, mqtt.OnPacketProcessed, mqtt.OnQosComplete, mqtt.OnPacketEncode, mqtt.OnPacketSent,
	mqtt.OnSessionEstablished, mqtt.OnDisconnect)

// Provides implements mqtt.Hook.
func (h *Limits) Provides(b byte) bool { return limitsEvents[b] }

// finisher is implemented by the broker's connections: Finish writes a
// last packet (unless the engine already sent a DISCONNECT) and closes.
type finisher interface{ Finish(final []byte) }

// OnDisconnect tells an MQTT 5 client why the broker closed its connection
// when mochi closed it on a read error without saying so: a malformed
// packet (0x81), a protocol error (0x82), a packet too large (0x95), a
// keep-alive timeout (0x8D).
func (h *Limits) OnDisconnect(cl *mqtt.Client, err error, _ bool) {
	h.displaced.Delete(cl) // a PUBLISH mochi refused before processing it
	f, ok := cl.Net.Conn.(finisher)
	if !ok {
		return
	}
	var final []byte
	if code, ok := disconnectReason(err); ok && cl.Properties.ProtocolVersion == 5 {
		pk := packets.Packet{
			FixedHeader:     packets.FixedHeader{Type: packets.Disconnect},
			ProtocolVersion: 5,
			ReasonCode:      code.Code,
			Properties:      packets.Properties{ReasonString: code.Reason},
		}
		var buf bytes.Buffer
		if pk.DisconnectEncode(&buf) == nil {
			final = buf.Bytes()
		}
	}
	f.Finish(final)
}

func disconnectReason(err error) (packets.Code, bool) {
	var code packets.Code
	var ne net.Error
	switch {
	case err == nil:
		return code, false
	case errors.As(err, &code):
		return code, code.Code >= packets.ErrUnspecifiedError.Code
	case errors.As(err, &ne) && ne.Timeout():
		return packets.ErrKeepAliveTimeout, true
	}
	return code, false
}

// OnConnect enforces keep-alive bounds and sets the outbound window.
func (h *Limits) OnConnect(cl *mqtt.Client, _ packets.Packet) error {
	ka := cl.State.Keepalive
	want := ka
	if h.opts.KeepaliveMax > 0 && (ka == 0 || ka > h.opts.KeepaliveMax) {
		want = h.opts.KeepaliveMax
	}
	if ka != 0 && ka < h.opts.KeepaliveMin {
		want = h.opts.KeepaliveMin
	}
	if want != ka {
		if cl.Properties.ProtocolVersion < 5 {
			// v3.1.1 has no way to tell the client; refuse as Mosquitto does.
			_ = h.server.SendConnack(cl, packets.ErrClientIdentifierNotValid, false, nil)
			return fmt.Errorf("%w: client %q asked for %ds", ErrKeepaliveRefused, cl.ID, ka)
		}
		cl.State.Keepalive = want
		cl.State.ServerKeepalive = true // [MQTT-3.2.2-21]: sent as Server Keep Alive
	}

	disableSendQuota(cl)
	return nil
}

// Outbound flow control is off. mochi v2.7.9's send quota (the v5 receive
// maximum) holds QoS 1/2 messages beyond the window as "pending" and
// releases one per packet the client sends, but (1) it deletes a released
// message from the inflight map, so the client's PUBACK never reopens the
// window and the session stalls, and (2) Inflight.NextImmediate takes the
// inflight read lock twice, which deadlocks against any concurrent writer
// (a publisher adding a message, a session take-over). With the quota at
// zero neither path runs: QoS 1/2 messages go straight to the connection's
// writer, TCP backpressure paces them, and a session holds at most
// mqtt.max_queued_messages unacknowledged messages.

// Resend order. On reconnect mochi resends a session's stored messages
// sorted by uint16(Created), Created being in seconds: messages queued in
// the same second go out in random order (and the order breaks every 18
// hours). Right after the CONNACK, and before that resend, OnPacketSent
// gives every stored packet a stand-in Created whose low 16 bits follow the
// real order, keeping the real one in the packet's ReasonCodes (unused by
// PUBLISH and PUBREL); OnSessionEstablished, which mochi calls after the
// resend, puts the real values back.

const orderMark = 0xfe

func realCreated(pk *packets.Packet) (int64, bool) {
	if len(pk.ReasonCodes) == 9 && pk.ReasonCodes[0] == orderMark {
		return int64(binary.BigEndian.Uint64(pk.ReasonCodes[1:])), true
	}
	return pk.Created, false
}

// sortByAge orders packets as they were queued: by creation time, then by
// packet id, which grows per message (wrapping at 65535).
func sortByAge(pks []packets.Packet) {
	sort.Slice(pks, func(i, j int) bool {
		ci, _ := realCreated(&pks[i])
		cj, _ := realCreated(&pks[j])
		if ci != cj {
			return ci < cj
		}
		return int16(pks[i].PacketID-pks[j].PacketID) < 0
	})
}

// OnPacketSent prepares the resend order after a CONNACK that resumes a
// session.
func (h *Limits) OnPacketSent(cl *mqtt.Client, pk packets.Packet, _ []byte) {
	if pk.FixedHeader.Type != packets.Connack || !pk.SessionPresent {
		return
	}
	disableSendQuota(cl) // a take-over has just reset it
	if cl.State.Inflight.Len() < 2 {
		return
	}
	all := cl.State.Inflight.GetAll(false)
	sortByAge(all)
	// Stand-ins start at the next multiple of 65536 seconds: their low 16
	// bits count up from 0 without wrapping, and lying in the future they
	// can never look older than mqtt.max_message_expiry.
	base := time.Now().Unix()&^0xffff + 0x10000
	for i, p := range all {
		real, _ := realCreated(&p)
		p.ReasonCodes = binary.BigEndian.AppendUint64([]byte{orderMark}, uint64(real))
		p.Created = base + int64(i)
		cl.State.Inflight.Set(p)
	}
}

// OnSessionEstablished restores the real creation times.
func (h *Limits) OnSessionEstablished(cl *mqtt.Client, _ packets.Packet) {
	for _, p := range cl.State.Inflight.GetAll(false) {
		if real, ok := realCreated(&p); ok {
			p.Created, p.ReasonCodes = real, nil
			cl.State.Inflight.Set(p)
		}
	}
}

// disableSendQuota turns mochi's outbound window off for cl (see above).
// Props.ReceiveMaximum is what mochi resets the quota to when a session is
// taken over, so it goes to zero too.
func disableSendQuota(cl *mqtt.Client) {
	cl.Properties.Props.ReceiveMaximum = 0
	cl.State.Inflight.ResetSendQuota(0)
}

// OnPacketRead answers a resent QoS 2 PUBLISH as the spec requires. A
// client that did not get our PUBREC sends the PUBLISH again (DUP); until
// its PUBREL the broker must answer PUBREC again and deliver nothing twice
// [MQTT-4.3.3-9]. mochi answers 0x91 "packet identifier in use" instead,
// which an MQTT 5 client takes as a refusal of the message. So the PUBREC
// goes out here, and mochi is handed a PUBACK for packet id 0, which it
// ignores.
//
// It also protects outbound messages from inbound packet ids. mochi keeps
// both directions' QoS flows in one map keyed by packet id, and client and
// broker number their packets independently, so a client that publishes
// with id 1 while the broker's message 1 to it awaits its PUBACK makes
// mochi delete that message's state: it would never be resent. For QoS 1
// the outbound entry is put aside here and put back in OnPacketProcessed.
func (h *Limits) OnPacketRead(cl *mqtt.Client, pk packets.Packet) (packets.Packet, error) {
	if pk.FixedHeader.Type != packets.Publish || pk.FixedHeader.Qos == 0 {
		return pk, nil
	}
	prev, ok := cl.State.Inflight.Get(pk.PacketID)
	if !ok {
		return pk, nil
	}
	if pk.FixedHeader.Qos == 1 && (prev.FixedHeader.Type == packets.Publish || prev.FixedHeader.Type == packets.Pubrel) {
		h.displaced.Store(cl, prev)
		return pk, nil
	}
	if pk.FixedHeader.Qos != 2 || prev.FixedHeader.Type != packets.Pubrec {
		return pk, nil
	}
	if err := cl.WritePacket(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Pubrec}, PacketID: pk.PacketID}); err != nil {
		return pk, err
	}
	return packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Puback}, ProtocolVersion: pk.ProtocolVersion}, nil
}

// OnQosComplete puts back an outbound message an inbound QoS 1 PUBLISH
// displaced (see OnPacketRead), as soon as mochi has dropped the inbound
// flow: right after the PUBACK, before routing, so that a client that
// reconnects at once finds it in its session.
func (h *Limits) OnQosComplete(cl *mqtt.Client, pk packets.Packet) {
	if pk.FixedHeader.Type == packets.Puback {
		h.restoreDisplaced(cl)
	}
}

// OnPacketProcessed puts back a displaced outbound message if
// OnQosComplete did not (a PUBLISH refused on the way).
func (h *Limits) OnPacketProcessed(cl *mqtt.Client, pk packets.Packet, _ error) {
	if pk.FixedHeader.Type == packets.Publish {
		h.restoreDisplaced(cl)
	}
}

func (h *Limits) restoreDisplaced(cl *mqtt.Client) {
	v, ok := h.displaced.LoadAndDelete(cl)
	if !ok {
		return
	}
	prev := v.(packets.Packet)
	if _, taken := cl.State.Inflight.Get(prev.PacketID); !taken && cl.State.Inflight.Set(prev) {
		atomic.AddInt64(&h.server.Info.Inflight, 1)
	}
}

// OnPacketEncode adds the limits mochi does not announce to a v5 CONNACK.
//
// It also covers the moment a PUBACK to an inbound QoS 1 PUBLISH that
// displaced an outbound message goes out: mochi holds the PUBACK in the
// packet id's slot until just after writing it, and a client that
// reconnects in that instant would inherit the PUBACK instead of the
// message. So the message takes the slot back before the PUBACK is
// written (mochi then clears the slot, and OnQosComplete restores it).
func (h *Limits) OnPacketEncode(cl *mqtt.Client, pk packets.Packet) packets.Packet {
	if pk.FixedHeader.Type == packets.Puback {
		if v, ok := h.displaced.Load(cl); ok {
			if prev := v.(packets.Packet); prev.PacketID == pk.PacketID {
				cl.State.Inflight.Set(prev)
			}
		}
		return pk
	}
	if pk.FixedHeader.Type != packets.Connack || cl.Properties.ProtocolVersion != 5 || pk.ReasonCode != 0 {
		return pk
	}
	pk.Properties.MaximumPacketSize = h.opts.MaxPacketSize
	pk.Properties.TopicAliasMaximum = h.opts.TopicAliasMaximum
	return pk
}

// Drops counts messages the broker does not deliver and logs them at a
// bounded rate, so that no drop is silent and a flood cannot flood the log.
type Drops struct {
	mqtt.HookBase
	queueFull atomic.Int64
	expired   atomic.Int64
	limiter   *RateLimiter
}

// NewDrops returns the drop accounting hook.
func NewDrops() *Drops { return &Drops{limiter: NewRateLimiter(10 * time.Second)} }

var _ mqtt.Hook = (*Drops)(nil)

// ID implements mqtt.Hook.
func (h *Drops) ID() string { return "beacon-drops" }

var dropsEvents = eventSet(mqtt.OnPublishDropped, mqtt.OnQosDropped)

// Provides implements mqtt.Hook.
func (h *Drops) Provides(b byte) bool { return dropsEvents[b] }

// OnPublishDropped counts a message dropped because the client's outbound
// queue was full.
func (h *Drops) OnPublishDropped(cl *mqtt.Client, pk packets.Packet) {
	n := h.queueFull.Add(1)
	if ok, suppressed := h.limiter.Allow("queue_full"); ok {
		h.Log.Warn("message dropped: client outbound queue full",
			"client", cl.ID, "topic", pk.TopicName, "qos", pk.FixedHeader.Qos,
			"dropped_total", n, "suppressed", suppressed)
	}
}

// OnQosDropped counts a QoS 1/2 message that expired before delivery.
func (h *Drops) OnQosDropped(cl *mqtt.Client, pk packets.Packet) {
	if takenOver(cl) {
		return // moved to the connection that took the session over, not dropped
	}
	n := h.expired.Add(1)
	if ok, suppressed := h.limiter.Allow("expired"); ok {
		h.Log.Info("inflight message dropped: expired or refused by client",
			"client", cl.ID, "packet_id", pk.PacketID, "dropped_total", n, "suppressed", suppressed)
	}
}

// DropStats are the drop counters.
type DropStats struct {
	QueueFull int64 // outbound queue full (mochi: MessagesDropped)
	Expired   int64 // QoS 1/2 messages expired or refused with an error code
}

// Stats returns the drop counters.
func (h *Drops) Stats() DropStats {
	return DropStats{QueueFull: h.queueFull.Load(), Expired: h.expired.Load()}
}

// RateLimiter lets one event per key through per interval and counts the
// ones it holds back.
type RateLimiter struct {
	every time.Duration
	mu    sync.Mutex
	last  map[string]time.Time
	held  map[string]int64
}

// NewRateLimiter returns a limiter that allows one event per key per every.
func NewRateLimiter(every time.Duration) *RateLimiter {
	return &RateLimiter{every: every, last: map[string]time.Time{}, held: map[string]int64{}}
}

// Allow reports whether an event for key may be logged now and how many
// were held back since the last one that was.
func (r *RateLimiter) Allow(key string) (bool, int64) {
	now := time.Now()
	r.mu.Lock()
	defer r.mu.Unlock()
	if t, ok := r.last[key]; ok && now.Sub(t) < r.every {
		r.held[key]++
		return false, 0
	}
	r.last[key] = now
	n := r.held[key]
	delete(r.held, key)
	return true, n
}

// RateLimitHandler wraps a slog.Handler so that each distinct warning or
// error message is logged at most once per interval; the number held back
// is added to the next one as "suppressed". mochi logs some conditions
// (such as a full session queue) once per message; this keeps a flood out
// of the log without hiding it.
type RateLimitHandler struct {
	slog.Handler
	limiter *RateLimiter
}

// NewRateLimitHandler wraps h.
func NewRateLimitHandler(h slog.Handler, every time.Duration) *RateLimitHandler {
	return &RateLimitHandler{Handler: h, limiter: NewRateLimiter(every)}
}

// Handle implements slog.Handler.
func (h *RateLimitHandler) Handle(ctx context.Context, r slog.Record) error {
	if r.Level < slog.LevelWarn {
		return h.Handler.Handle(ctx, r)
	}
	ok, suppressed := h.limiter.Allow(r.Message)
	if !ok {
		return nil
	}
	if suppressed > 0 {
		r.AddAttrs(slog.Int64("suppressed", suppressed))
	}
	return h.Handler.Handle(ctx, r)
}

// WithAttrs implements slog.Handler.
func (h *RateLimitHandler) WithAttrs(attrs []slog.Attr) slog.Handler {
	return &RateLimitHandler{Handler: h.Handler.WithAttrs(attrs), limiter: h.limiter}
}

// WithGroup implements slog.Handler.
func (h *RateLimitHandler) WithGroup(name string) slog.Handler {
	return &RateLimitHandler{Handler: h.Handler.WithGroup(name), limiter: h.limiter}
}
