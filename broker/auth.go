package broker

import (
	"bytes"
	"encoding/json"
	"errors"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/beaconmq/beacon/broker/engine"
	"github.com/beaconmq/beacon/devices"
	"github.com/beaconmq/beacon/hooks"
)

// auth authenticates MQTT clients (device secrets, JWTs, a WebSocket
// handshake's JWT, anonymous) for the engine, and gives each connection a
// principal that asks the one devices.Authorizer the HTTP bridges use too,
// for every publish, subscription and delivery.
//
// Modes: while no authentication is configured (no device registered, no
// JWT key, no rules file) every client is allowed everything; the broker
// permits that only on loopback unless auth.allow_anonymous is set. Once
// anything is configured, a client must authenticate (or be anonymous
// where allow_anonymous permits it) and the rules decide, denying what no
// rule allows.
type auth struct {
	registry       *devices.Registry
	authz          *devices.Authorizer
	tokens         *devices.TokenVerifier // nil: no JWT
	policy         devices.PublishPolicy  // nil: none
	rulesFile      bool
	allowAnonymous bool
	failDelay      time.Duration
	log            *slog.Logger
	limiter        *hooks.RateLimiter
	certIdentity   string // mqtt.tls_identity: cn or san
	// throttle limits failed authentication by source address; shared
	// with the HTTP bridges.
	throttle *devices.Throttle

	mu      sync.Mutex
	clients map[string]*principal // by client id: the principal of its session
	online  map[string]int        // device id -> live connections

	failures, checked, deniedPub, deniedSub, deniedRead, policyDenied atomic.Int64
}

var (
	_ engine.Authenticator = (*auth)(nil)
	_ engine.Identities    = (*auth)(nil)
)

// Errors of authentication, for logs.
var (
	ErrAnonymousRefused = errors.New("anonymous access is not allowed")
)

// configured reports whether any authentication is configured.
func (a *auth) configured() bool {
	return a.tokens != nil || a.rulesFile || a.registry.Len() > 0
}

// principal is who a connection or session authenticated as.
type principal struct {
	a       *auth
	p       devices.Principal
	open    bool // admitted while no authentication was configured
	revoked atomic.Bool
}

var (
	_ engine.Principal      = (*principal)(nil)
	_ engine.PublishChecker = (*principal)(nil)
	_ engine.Expirer        = (*principal)(nil)
	_ engine.DeviceNamer    = (*principal)(nil)
)

// Allow implements engine.Principal, counting and logging refusals.
func (p *principal) Allow(act engine.Action, topic string) bool {
	a := p.a
	if p.open {
		// Admitted while nothing was configured: allowed everything only
		// as long as that lasts (the first registered device ends it).
		return !a.configured()
	}
	action := devices.Read
	switch act {
	case engine.ActPublish:
		action = devices.Publish
	case engine.ActSubscribe:
		// A filter without wildcards and a delivered topic name are
		// decided alike: the subscribe rules must match the name.
		if strings.ContainsAny(topic, "+#") {
			action = devices.Subscribe
		}
	}
	var rule *devices.Rule
	ok := !p.revoked.Load() && (p.p.Expires.IsZero() || time.Now().Before(p.p.Expires))
	if ok {
		ok, rule = a.authz.Decide(&p.p, action, topic)
	}
	if ok {
		return true
	}
	switch action {
	case devices.Publish:
		a.deniedPub.Add(1)
	case devices.Subscribe:
		a.deniedSub.Add(1)
	default:
		if act == engine.ActSubscribe {
			a.deniedSub.Add(1)
		} else {
			a.deniedRead.Add(1)
		}
	}
	if act != engine.ActRead {
		// One line per client and action per interval, never the payload.
		if ok, held := a.limiter.Allow("denied " + action.String() + " " + p.p.ClientID); ok {
			a.log.Warn("not authorized", "client", p.p.ClientID, "principal", p.p.Kind.String()+":"+p.p.Name,
				"action", action.String(), "topic", topic, "decided_by", a.authz.Rules().Describe(rule), "suppressed", held)
		}
	}
	return false
}

// CheckPublish implements engine.PublishChecker: the publish policy
// (payload size by device type).
func (p *principal) CheckPublish(topic string, payload []byte) error {
	if p.open || p.a.policy == nil {
		return nil
	}
	err := p.a.policy.CheckPublish(&p.p, topic, payload)
	if err != nil {
		p.a.policyDenied.Add(1)
		if ok, held := p.a.limiter.Allow("policy"); ok {
			p.a.log.Info("publish refused by policy", "client", p.p.ClientID, "topic", topic, "reason", err.Error(), "refused_since_last", held)
		}
	}
	return err
}

// Expires implements engine.Expirer: a JWT's expiry.
func (p *principal) Expires() time.Time { return p.p.Expires }

// Device implements engine.DeviceNamer.
func (p *principal) Device() string {
	if p.open || p.p.Kind != devices.DeviceKind {
		return ""
	}
	return p.p.Name
}

// looksLikeJWT reports whether a password is a compact JWS.
func looksLikeJWT(pw []byte) bool {
	return bytes.HasPrefix(pw, []byte("eyJ")) && bytes.Count(pw, []byte(".")) == 2
}

// handshaker is a connection whose transport proved an identity before
// MQTT started (a JWT in a WebSocket handshake).
type handshaker interface {
	HandshakePrincipal() (devices.Principal, bool)
}

// Authenticate implements engine.Authenticator.
func (a *auth) Authenticate(req *engine.ConnectRequest) (engine.Principal, error) {
	pr := &principal{a: a}
	if !a.configured() {
		pr.open = true
	} else {
		at, _, err := a.throttle.Admit(devices.AddrOf(req.Remote))
		if err != nil {
			// Refused without looking at the credential.
			if ok, held := a.limiter.Allow("throttled"); ok {
				a.log.Warn("connection refused: failed authentication limit", "remote", req.Remote.String(), "client", req.ClientID,
					"reason", err.Error(), "refused_since_last", held)
			}
			if errors.Is(err, devices.ErrAddrBanned) {
				return nil, engine.ErrBanned
			}
			return nil, engine.ErrRateExceeded
		}
		a.checked.Add(1)
		p, err := a.authenticate(req)
		if err != nil {
			if guessed(err) {
				at.Failed()
			} else {
				at.Succeeded()
			}
			a.refused(req, err)
			switch {
			case errors.Is(err, devices.ErrDisabled), errors.Is(err, ErrAnonymousRefused), errors.Is(err, ErrCertUsername):
				return nil, engine.ErrNotAuthorized
			}
			return nil, engine.ErrBadCredentials
		}
		at.Succeeded()
		pr.p = p
	}
	pr.p.ClientID = req.ClientID
	return pr, nil
}

// guessed reports whether a refusal is a wrong credential, which spends
// the address's budget: a disabled device's right secret, a client that
// sent none and a valid client certificate with another username are not.
func guessed(err error) bool {
	return !errors.Is(err, devices.ErrDisabled) && !errors.Is(err, ErrAnonymousRefused) && !errors.Is(err, ErrCertUsername)
}

func (a *auth) authenticate(req *engine.ConnectRequest) (devices.Principal, error) {
	user, pw := req.Username, req.Password
	if p, ok, err := a.certPrincipal(req.Conn, user); ok {
		return p, err
	}
	if hs, ok := req.Conn.(handshaker); ok && user == "" && len(pw) == 0 {
		if p, ok := hs.HandshakePrincipal(); ok {
			return p, nil
		}
	}
	switch {
	case a.tokens != nil && looksLikeJWT(pw):
		return a.tokens.Verify(string(pw), time.Now())
	case user != "":
		d, err := a.registry.Authenticate(user, string(pw))
		if err != nil {
			return devices.Principal{}, err
		}
		return devices.Principal{Kind: devices.DeviceKind, Name: d.ID, DeviceType: d.Type}, nil
	case len(pw) == 0 && a.allowAnonymous:
		return devices.Principal{Kind: devices.Anonymous}, nil
	case len(pw) == 0:
		return devices.Principal{}, ErrAnonymousRefused
	}
	return devices.Principal{}, devices.ErrBadCredentials
}

// refused counts and logs (rate-limited, never the password) a refusal,
// and waits auth.fail_delay: guessing secrets is slow.
func (a *auth) refused(req *engine.ConnectRequest, err error) {
	a.failures.Add(1)
	if ok, held := a.limiter.Allow("auth"); ok {
		a.log.Warn("connection refused", "remote", req.Remote.String(), "client", req.ClientID,
			"username", req.Username, "reason", err.Error(), "refused_since_last", held)
	}
	if a.failDelay > 0 {
		time.Sleep(a.failDelay)
	}
}

// connected remembers the principal of the client id's session (for
// revoke) and marks devices online. Only admitted connections get here.
func (a *auth) connected(ci *engine.ClientInfo) {
	p, ok := ci.Principal.(*principal)
	if !ok {
		return
	}
	a.mu.Lock()
	a.clients[ci.ID] = p
	if p.Device() == "" {
		a.mu.Unlock()
		return
	}
	a.online[p.p.Name]++
	a.mu.Unlock()
	a.registry.SetOnline(p.p.Name, true)
}

// disconnected marks devices offline and forgets the principal of a
// session that ended with its connection.
func (a *auth) disconnected(ci *engine.ClientInfo) {
	p, _ := ci.Principal.(*principal)
	offline := ""
	a.mu.Lock()
	if p != nil && p.Device() != "" {
		a.online[p.p.Name]--
		if a.online[p.p.Name] <= 0 {
			delete(a.online, p.p.Name)
			offline = p.p.Name
		}
	}
	if !ci.Persistent && a.clients[ci.ID] == p {
		delete(a.clients, ci.ID)
	}
	a.mu.Unlock()
	if offline != "" {
		a.registry.SetOnline(offline, false)
	}
}

// revoke withholds deliveries from every session of a device and returns
// its principals (disabled, removed, or given a new secret).
func (a *auth) revoke(deviceID string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, p := range a.clients {
		if p.p.Kind == devices.DeviceKind && p.p.Name == deviceID {
			p.revoked.Store(true)
		}
	}
}

// MarshalPrincipal implements engine.Identities.
func (a *auth) MarshalPrincipal(ep engine.Principal) []byte {
	p, ok := ep.(*principal)
	if !ok || p.open {
		return nil
	}
	b, err := json.Marshal(p.p)
	if err != nil {
		return nil
	}
	return b
}

// RestorePrincipal implements engine.Identities: a session restored from
// storage gets its principal back, so deliveries to it are authorized as
// before the restart.
func (a *auth) RestorePrincipal(client string, data []byte) engine.Principal {
	p := &principal{a: a}
	if len(data) == 0 {
		p.open = !a.configured()
		if !p.open {
			p.revoked.Store(true) // admitted openly before; not any more
		}
	} else if err := json.Unmarshal(data, &p.p); err != nil {
		a.log.Warn("stored principal unreadable: the session gets no deliveries", "client", client, "error", err)
		p.revoked.Store(true)
	}
	p.p.ClientID = client
	a.mu.Lock()
	a.clients[client] = p
	a.mu.Unlock()
	return p
}

// AuthStats are the authentication and authorization counters.
type AuthStats struct {
	Failures, DeniedPublish, DeniedSubscribe, DeniedDelivery, PolicyDenied int64
	// Checked counts MQTT CONNECTs whose credentials were checked (the
	// throttle let them through).
	Checked int64
	// Throttle counts refusals by the failed-authentication limits, of
	// every transport (MQTT, WebSocket, REST, SSE).
	Throttle devices.ThrottleStats
}

func (a *auth) stats() AuthStats {
	return AuthStats{Failures: a.failures.Load(), DeniedPublish: a.deniedPub.Load(), DeniedSubscribe: a.deniedSub.Load(),
		DeniedDelivery: a.deniedRead.Load(), PolicyDenied: a.policyDenied.Load(), Checked: a.checked.Load(),
		Throttle: a.throttle.Stats()}
}

// logRules prints the rules in force, one line each, and what happens
// to clients while no authentication is configured.
func (b *Broker) logRules() {
	if !b.auth.configured() {
		b.log.Info("authentication not configured: every client may do everything (listeners on loopback only); " +
			"once a device is registered or JWT keys are set, the rules below decide")
	}
	rs := b.authz.Rules()
	b.log.Info("rules in force", "source", rs.File, "rules", len(rs.Rules), "unmatched", "denied")
	for i := range rs.Rules {
		b.log.Info("rule", "rule", rs.Describe(&rs.Rules[i]))
	}
}
