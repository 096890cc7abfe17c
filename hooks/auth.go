package hooks

import (
	"bytes"
	"encoding/json"
	"errors"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/beaconmq/beacon/devices"
)

// Auth authenticates MQTT clients (device secrets, JWTs, anonymous) and
// authorizes every publish, subscription and delivery through the one
// devices.Authorizer that the HTTP bridges use too.
//
// Modes: while no authentication is configured (no device registered, no
// JWT key, no rules file) every client is allowed everything; the broker
// permits that only on loopback unless auth.allow_anonymous is set. Once
// anything is configured, a client must authenticate (or be anonymous
// where allow_anonymous permits it) and the rules decide, denying what no
// rule allows.
type Auth struct {
	mqtt.HookBase
	opts AuthOptions

	mu      sync.Mutex
	clients map[*mqtt.Client]*conn
	online  map[string]int // device id -> live connections

	failures     atomic.Int64
	deniedPub    atomic.Int64
	deniedSub    atomic.Int64
	deniedRead   atomic.Int64
	policyDenied atomic.Int64
	limiter      *RateLimiter
}

// conn is what the hook knows of one client.
type conn struct {
	p       devices.Principal
	open    bool // admitted while no authentication was configured
	revoked atomic.Bool
	timer   *time.Timer
	counted bool // counted in online
}

// AuthOptions configures NewAuth.
type AuthOptions struct {
	Server         *mqtt.Server
	Registry       *devices.Registry
	Authorizer     *devices.Authorizer
	Tokens         *devices.TokenVerifier // nil: no JWT
	Policy         devices.PublishPolicy  // nil: none
	RulesFile      bool                   // a rules file is configured
	AllowAnonymous bool
	FailDelay      time.Duration // wait before refusing bad credentials
}

// NewAuth returns the authentication and authorization hook.
func NewAuth(opts AuthOptions) *Auth {
	return &Auth{opts: opts, clients: map[*mqtt.Client]*conn{}, online: map[string]int{},
		limiter: NewRateLimiter(10 * time.Second)}
}

var _ mqtt.Hook = (*Auth)(nil)

// ID implements mqtt.Hook.
func (h *Auth) ID() string { return "beacon-auth" }

var authEvents = eventSet(mqtt.OnConnect, mqtt.OnConnectAuthenticate, mqtt.OnACLCheck, mqtt.OnPublish,
	mqtt.OnSessionEstablished, mqtt.OnDisconnect, mqtt.OnClientExpired)

// Provides implements mqtt.Hook.
func (h *Auth) Provides(b byte) bool { return authEvents[b] }

// Configured reports whether any authentication is configured.
func (h *Auth) Configured() bool {
	return h.opts.Tokens != nil || h.opts.RulesFile || h.opts.Registry.Len() > 0
}

// looksLikeJWT reports whether a password is a compact JWS.
func looksLikeJWT(pw []byte) bool {
	return bytes.HasPrefix(pw, []byte("eyJ")) && bytes.Count(pw, []byte(".")) == 2
}

// v3 CONNACK return codes; SendConnack passes codes below 0x80 through.
var (
	v3BadCredentials = packets.Code{Code: 0x04, Reason: "bad user name or password"}
	v3NotAuthorized  = packets.Code{Code: 0x05, Reason: "not authorized"}
)

// OnConnect authenticates the client; a refusal is answered here with the
// right CONNACK code (mochi would only ever send "bad username or
// password").
func (h *Auth) OnConnect(cl *mqtt.Client, pk packets.Packet) error {
	c := &conn{}
	if !h.Configured() {
		c.open = true
	} else {
		p, err := h.authenticate(cl, pk)
		if err != nil {
			h.refuse(cl, pk, err)
			return err
		}
		c.p = p
		c.p.ClientID = cl.ID
		// mochi publishes a will without asking the ACL or the policy, so
		// the will is authorized here, as a publish, before it is accepted
		// (as Mosquitto does).
		if pk.Connect.WillFlag {
			allowed := h.opts.Authorizer.Allowed(&c.p, devices.Publish, pk.Connect.WillTopic)
			if allowed && h.opts.Policy != nil {
				allowed = h.opts.Policy.CheckPublish(&c.p, pk.Connect.WillTopic, pk.Connect.WillPayload) == nil
			}
			if !allowed {
				h.deniedPub.Add(1)
				h.refuse(cl, pk, ErrWillRefused)
				return ErrWillRefused
			}
		}
	}
	c.p.ClientID = cl.ID
	old, hasOld := h.opts.Server.Clients.Get(cl.ID)
	h.mu.Lock()
	h.clients[cl] = c
	// An offline session this connection is about to take over (one
	// restored from storage never gets an OnDisconnect) is forgotten here.
	if hasOld && old != cl && old.Closed() {
		delete(h.clients, old)
	}
	h.mu.Unlock()
	return nil
}

// Errors of authentication, for logs.
var (
	ErrAnonymousRefused = errors.New("anonymous access is not allowed")
	ErrWillRefused      = errors.New("the will's topic or payload is not allowed for this client")
)

// handshaker is a connection whose transport proved an identity before
// MQTT started (a JWT in a WebSocket handshake).
type handshaker interface {
	HandshakePrincipal() (devices.Principal, bool)
}

func (h *Auth) authenticate(cl *mqtt.Client, pk packets.Packet) (devices.Principal, error) {
	user, pw := string(pk.Connect.Username), pk.Connect.Password
	if hs, ok := cl.Net.Conn.(handshaker); ok && user == "" && len(pw) == 0 {
		if p, ok := hs.HandshakePrincipal(); ok {
			return p, nil
		}
	}
	switch {
	case h.opts.Tokens != nil && looksLikeJWT(pw):
		return h.opts.Tokens.Verify(string(pw), time.Now())
	case user != "":
		d, err := h.opts.Registry.Authenticate(user, string(pw))
		if err != nil {
			return devices.Principal{}, err
		}
		return devices.Principal{Kind: devices.DeviceKind, Name: d.ID, DeviceType: d.Type}, nil
	case len(pw) == 0 && h.opts.AllowAnonymous:
		return devices.Principal{Kind: devices.Anonymous}, nil
	case len(pw) == 0:
		return devices.Principal{}, ErrAnonymousRefused
	}
	return devices.Principal{}, devices.ErrBadCredentials
}

func (h *Auth) refuse(cl *mqtt.Client, pk packets.Packet, err error) {
	h.failures.Add(1)
	if ok, held := h.limiter.Allow("auth"); ok {
		h.Log.Warn("connection refused", "remote", cl.Net.Remote, "client", cl.ID,
			"username", string(pk.Connect.Username), "reason", err.Error(), "refused_since_last", held)
	}
	denied := errors.Is(err, devices.ErrDisabled) || errors.Is(err, ErrAnonymousRefused) || errors.Is(err, ErrWillRefused)
	code := packets.ErrBadUsernameOrPassword
	switch {
	case cl.Properties.ProtocolVersion < 5 && denied:
		code = v3NotAuthorized
	case cl.Properties.ProtocolVersion < 5:
		code = v3BadCredentials
	case denied:
		code = packets.ErrNotAuthorized
	}
	// A short, fixed delay makes guessing secrets slow.
	if d := h.opts.FailDelay; d > 0 {
		time.Sleep(d)
	}
	_ = h.opts.Server.SendConnack(cl, code, false, nil)
}

// OnConnectAuthenticate admits what OnConnect authenticated.
func (h *Auth) OnConnectAuthenticate(cl *mqtt.Client, _ packets.Packet) bool {
	return h.conn(cl) != nil
}

func (h *Auth) conn(cl *mqtt.Client) *conn {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.clients[cl]
}

// allowed asks the authorizer for cl, counting refusals.
func (h *Auth) allowed(cl *mqtt.Client, action devices.Action, topic string) bool {
	c := h.conn(cl)
	if c == nil {
		return false
	}
	if c.open {
		// Admitted while nothing was configured: allowed everything only
		// as long as that lasts (the first registered device ends it).
		return !h.Configured()
	}
	ok := !c.revoked.Load() &&
		(c.p.Expires.IsZero() || time.Now().Before(c.p.Expires)) &&
		h.opts.Authorizer.Allowed(&c.p, action, topic)
	if !ok {
		switch action {
		case devices.Publish:
			h.deniedPub.Add(1)
		case devices.Subscribe:
			h.deniedSub.Add(1)
		default:
			h.deniedRead.Add(1)
		}
		if action != devices.Read {
			if ok, held := h.limiter.Allow("denied " + action.String()); ok {
				h.Log.Info("not authorized", "client", cl.ID, "principal", c.p.Kind.String()+":"+c.p.Name,
					"action", action.String(), "topic", topic, "denied_since_last", held)
			}
		}
	}
	return ok
}

// OnACLCheck authorizes subscriptions (filters), deliveries (topic names)
// and MQTT 5 publishes. v3.1.1 publishes are decided in OnPublish, so that
// a refused one is acknowledged and dropped as the 3.1.1 spec allows rather
// than disconnecting the client (mochi's choice).
func (h *Auth) OnACLCheck(cl *mqtt.Client, topic string, write bool) bool {
	if write {
		if cl.Properties.ProtocolVersion < 5 {
			return true
		}
		return h.allowed(cl, devices.Publish, topic)
	}
	if strings.ContainsAny(topic, "+#") || strings.HasPrefix(topic, "$share/") {
		return h.allowed(cl, devices.Subscribe, topic)
	}
	// A filter without wildcards and a delivered topic name are decided
	// alike: the subscribe rules must match the name.
	return h.allowed(cl, devices.Read, topic)
}

// errPolicy is the v5 reason for a publish the policy refuses.
var errPolicy = packets.Code{Code: 0x83, Reason: "refused by policy: payload too large for this device type"}

// OnPublish refuses v3.1.1 publishes the ACL denies (acknowledged and
// dropped) and applies the publish policy.
func (h *Auth) OnPublish(cl *mqtt.Client, pk packets.Packet) (packets.Packet, error) {
	if cl.Net.Inline {
		return pk, nil // the bridges authorize before they publish
	}
	drop := func() (packets.Packet, error) {
		if pk.FixedHeader.Qos == 0 {
			return pk, packets.ErrRejectPacket
		}
		return pk, packets.CodeSuccessIgnore // acknowledged, not delivered
	}
	if cl.Properties.ProtocolVersion < 5 && !h.allowed(cl, devices.Publish, pk.TopicName) {
		return drop()
	}
	c := h.conn(cl)
	if h.opts.Policy == nil || c == nil || c.open {
		return pk, nil
	}
	if err := h.opts.Policy.CheckPublish(&c.p, pk.TopicName, pk.Payload); err != nil {
		h.policyDenied.Add(1)
		if ok, held := h.limiter.Allow("policy"); ok {
			h.Log.Info("publish refused by policy", "client", cl.ID, "topic", pk.TopicName, "reason", err.Error(), "refused_since_last", held)
		}
		switch {
		case cl.Properties.ProtocolVersion < 5 || pk.FixedHeader.Qos == 0:
			return drop()
		case pk.FixedHeader.Qos == 2:
			// mochi would answer a QoS 2 refusal with a PUBACK; PUBREC it is.
			_ = cl.WritePacket(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Pubrec},
				PacketID: pk.PacketID, ReasonCode: errPolicy.Code, Properties: packets.Properties{ReasonString: errPolicy.Reason}})
			return pk, packets.ErrRejectPacket
		}
		return pk, errPolicy
	}
	return pk, nil
}

// OnSessionEstablished marks devices online and schedules the disconnect
// of a JWT client when its token expires.
func (h *Auth) OnSessionEstablished(cl *mqtt.Client, _ packets.Packet) {
	c := h.conn(cl)
	if c == nil || c.open {
		return
	}
	if c.p.Kind == devices.DeviceKind {
		h.mu.Lock()
		h.online[c.p.Name]++
		c.counted = true
		h.mu.Unlock()
		h.opts.Registry.SetOnline(c.p.Name, true)
	}
	if !c.p.Expires.IsZero() {
		h.mu.Lock()
		c.timer = time.AfterFunc(time.Until(c.p.Expires), func() { h.expire(cl) })
		h.mu.Unlock()
	}
}

// expire ends a connection whose token has expired: MQTT 5 clients get
// DISCONNECT "not authorized".
func (h *Auth) expire(cl *mqtt.Client) {
	if cl.Closed() {
		return
	}
	h.Log.Info("token expired: disconnecting", "client", cl.ID, "remote", cl.Net.Remote)
	if cl.Properties.ProtocolVersion == 5 {
		_ = h.opts.Server.DisconnectClient(cl, packets.ErrNotAuthorized)
		return
	}
	cl.Stop(packets.ErrNotAuthorized)
}

// OnDisconnect stops the expiry timer and marks devices offline. The
// principal stays while the session does: deliveries to an offline
// session are authorized too.
func (h *Auth) OnDisconnect(cl *mqtt.Client, _ error, expire bool) {
	h.mu.Lock()
	c, ok := h.clients[cl]
	if !ok {
		h.mu.Unlock()
		return
	}
	if c.timer != nil {
		c.timer.Stop()
	}
	offline := ""
	if c.counted {
		c.counted = false
		h.online[c.p.Name]--
		if h.online[c.p.Name] <= 0 {
			delete(h.online, c.p.Name)
			offline = c.p.Name
		}
	}
	if expire || takenOver(cl) {
		delete(h.clients, cl)
	}
	h.mu.Unlock()
	if offline != "" {
		h.opts.Registry.SetOnline(offline, false)
	}
}

// OnClientExpired forgets an expired session.
func (h *Auth) OnClientExpired(cl *mqtt.Client) {
	h.mu.Lock()
	delete(h.clients, cl)
	h.mu.Unlock()
}

// Kick disconnects every connection of a device and withholds deliveries
// from its sessions (used when a device is disabled, removed or rotated).
func (h *Auth) Kick(deviceID string) int {
	var live []*mqtt.Client
	h.mu.Lock()
	for cl, c := range h.clients {
		if c.p.Kind == devices.DeviceKind && c.p.Name == deviceID {
			c.revoked.Store(true)
			if !cl.Closed() {
				live = append(live, cl)
			}
		}
	}
	h.mu.Unlock()
	for _, cl := range live {
		if cl.Properties.ProtocolVersion == 5 {
			_ = h.opts.Server.DisconnectClient(cl, packets.ErrNotAuthorized)
		} else {
			cl.Stop(packets.ErrNotAuthorized)
		}
	}
	return len(live)
}

// IdentityOf is the principal of cl in the form stored with its session.
func (h *Auth) IdentityOf(cl *mqtt.Client) []byte {
	c := h.conn(cl)
	if c == nil || c.open {
		return nil
	}
	b, err := json.Marshal(c.p)
	if err != nil {
		return nil
	}
	return b
}

// RestoreIdentity gives a session restored from storage its principal, so
// that deliveries to it are authorized as before the restart.
func (h *Auth) RestoreIdentity(cl *mqtt.Client, data []byte) {
	c := &conn{}
	if len(data) == 0 {
		c.open = !h.Configured()
	} else if err := json.Unmarshal(data, &c.p); err != nil {
		h.Log.Warn("stored principal unreadable: the session gets no deliveries", "client", cl.ID, "error", err)
		c.revoked.Store(true)
	}
	c.p.ClientID = cl.ID
	h.mu.Lock()
	h.clients[cl] = c
	h.mu.Unlock()
}

// AuthStats are the hook's counters.
type AuthStats struct {
	Failures, DeniedPublish, DeniedSubscribe, DeniedDelivery, PolicyDenied int64
}

// Stats returns the counters.
func (h *Auth) Stats() AuthStats {
	return AuthStats{Failures: h.failures.Load(), DeniedPublish: h.deniedPub.Load(), DeniedSubscribe: h.deniedSub.Load(),
		DeniedDelivery: h.deniedRead.Load(), PolicyDenied: h.policyDenied.Load()}
}

// DeviceOf is the id of the registered device cl authenticated as, or "".
func (h *Auth) DeviceOf(cl *mqtt.Client) string {
	if cl == nil {
		return ""
	}
	c := h.conn(cl)
	if c == nil || c.open || c.p.Kind != devices.DeviceKind {
		return ""
	}
	return c.p.Name
}
