package hooks

import (
	"bytes"
	"context"
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

// Limits applies per-connection limits that mochi leaves to its embedder:
// keep-alive bounds, an outbound QoS 1/2 window for clients that announce
// none (every v3.1.1 client), and the CONNACK properties that tell v5
// clients the maximum packet size and topic alias maximum.
type Limits struct {
	mqtt.HookBase
	server *mqtt.Server
	opts   LimitsOptions
}

// LimitsOptions configures NewLimits.
type LimitsOptions struct {
	Server            *mqtt.Server
	MaxInflight       uint16 // outbound QoS 1/2 messages in flight per client
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

// Provides implements mqtt.Hook.
func (h *Limits) Provides(b byte) bool {
	return bytes.Contains([]byte{mqtt.OnConnect, mqtt.OnPacketEncode, mqtt.OnPacketProcessed,
		mqtt.OnSessionEstablished, mqtt.OnDisconnect}, []byte{b})
}

// finisher is implemented by the broker's connections: Finish writes a
// last packet (unless the engine already sent a DISCONNECT) and closes.
type finisher interface{ Finish(final []byte) }

// OnDisconnect tells an MQTT 5 client why the broker closed its connection
// when mochi closed it on a read error without saying so: a malformed
// packet (0x81), a protocol error (0x82), a packet too large (0x95), a
// keep-alive timeout (0x8D).
func (h *Limits) OnDisconnect(cl *mqtt.Client, err error, _ bool) {
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

	if w := h.opts.MaxInflight; w > 0 {
		rm := cl.Properties.Props.ReceiveMaximum
		if rm == 0 || rm > w {
			cl.Properties.Props.ReceiveMaximum = w
			cl.State.Inflight.ResetSendQuota(int32(w))
		}
	}
	return nil
}

// Outbound flow control. mochi v2.7.9 holds QoS 1/2 messages beyond a
// client's window in its inflight map marked "pending" (Expiry -1) and
// releases one per packet the client sends, but it then deletes the
// released message from the inflight map: the client's PUBACK no longer
// finds it, the window never reopens and the session stalls after a few
// windows' worth of messages (and a reconnect no longer resends it). So
// Beacon releases pending messages itself, in order, as the window opens,
// keeps them tracked, and leaves mochi's own release nothing to do.

// OnPacketProcessed releases pending messages into the open window after
// every packet a client sends (PUBACK and PUBCOMP open it).
func (h *Limits) OnPacketProcessed(cl *mqtt.Client, _ packets.Packet, err error) {
	if err == nil {
		h.releasePending(cl, false)
	}
}

// OnSessionEstablished accounts for the messages mochi resent on reconnect:
// it resends every stored message, pending ones included.
func (h *Limits) OnSessionEstablished(cl *mqtt.Client, _ packets.Packet) {
	h.releasePending(cl, true)
}

func (h *Limits) releasePending(cl *mqtt.Client, alreadySent bool) {
	window := int(cl.Properties.Props.ReceiveMaximum)
	if window == 0 || cl.State.Inflight.Len() == 0 {
		return
	}
	var pending []packets.Packet
	sent := 0
	for _, pk := range cl.State.Inflight.GetAll(false) {
		switch {
		case pk.FixedHeader.Type == packets.Publish && pk.Expiry < 0:
			pending = append(pending, pk)
		case pk.FixedHeader.Type == packets.Publish || pk.FixedHeader.Type == packets.Pubrel:
			sent++
		}
	}
	if len(pending) == 0 {
		return
	}
	sort.Slice(pending, func(i, j int) bool { // oldest first: packet ids grow per message
		if pending[i].Created != pending[j].Created {
			return pending[i].Created < pending[j].Created
		}
		return int16(pending[i].PacketID-pending[j].PacketID) < 0
	})
	maxExpiry := h.server.Options.Capabilities.MaximumMessageExpiryInterval
	for _, pk := range pending {
		if !alreadySent && sent >= window {
			break
		}
		pk.Expiry = messageExpiry(pk, maxExpiry)
		cl.State.Inflight.Set(pk) // stays tracked until the client acknowledges it
		if !alreadySent {
			if err := cl.WritePacket(pk); err != nil {
				return
			}
		}
		sent++
	}
	// Align mochi's send quota with what is really in flight, so that new
	// messages queue (rather than go out) exactly while the window is full.
	cl.State.Inflight.ResetSendQuota(int32(window))
	for range min(sent, window) {
		cl.State.Inflight.DecreaseSendQuota()
	}
}

// messageExpiry recomputes the expiry time mochi overwrote with -1.
func messageExpiry(pk packets.Packet, maxInterval int64) int64 {
	e := int64(pk.Properties.MessageExpiryInterval)
	if maxInterval > 0 && (e == 0 || maxInterval < e) {
		e = maxInterval
	}
	if e == 0 {
		return 0
	}
	return pk.Created + e
}

// OnPacketEncode adds the limits mochi does not announce to a v5 CONNACK.
func (h *Limits) OnPacketEncode(cl *mqtt.Client, pk packets.Packet) packets.Packet {
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

// Provides implements mqtt.Hook.
func (h *Drops) Provides(b byte) bool {
	return bytes.Contains([]byte{mqtt.OnPublishDropped, mqtt.OnQosDropped}, []byte{b})
}

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
