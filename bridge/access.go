package bridge

import (
	"crypto/subtle"
	"errors"
	"math"
	"net/http"
	"net/netip"
	"strconv"
	"time"

	"github.com/beaconmq/beacon/broker/topics"
	"github.com/beaconmq/beacon/devices"
)

// Access turns an HTTP request into the principal it acts as, for the
// REST API and the streams: a JWT (Bearer header, beacon_token cookie or,
// where allowed, access_token query parameter), a device by HTTP Basic
// with its id and secret, or anonymous. The same Authorizer as for MQTT
// then decides every action.
type Access struct {
	Authorizer     *devices.Authorizer
	Registry       *devices.Registry
	Tokens         *devices.TokenVerifier
	Guard          *Guard
	Open           func() bool // true while no authentication is configured: everything is allowed
	AllowAnonymous bool
	AdminToken     string // auth.admin_token: as a Bearer token it may read everything (the operator console)
	// Throttle limits failed authentications by client address, shared
	// with MQTT; nil: none.
	Throttle *devices.Throttle
	// Topics are mqtt.max_topic_length and max_topic_levels, for the topic
	// names and filters of requests (400 beyond them).
	Topics topics.Limits
}

// admitAuth asks the throttle whether a request from addr may have its
// credential checked; if not it answers 429 with Retry-After, through
// write, and returns false.
func admitAuth(t *devices.Throttle, addr netip.Addr, w http.ResponseWriter, write func(code int, msg string)) (*devices.Attempt, bool) {
	at, wait, err := t.Admit(addr)
	if err == nil {
		return at, true
	}
	w.Header().Set("Retry-After", strconv.Itoa(int(math.Ceil(max(wait, time.Second).Seconds()))))
	write(http.StatusTooManyRequests, err.Error())
	return nil, false
}

// Caller is who makes a request; Open means no authentication is
// configured, so every action is allowed.
type Caller struct {
	P    devices.Principal
	Open bool
}

// Allowed asks the authorizer.
func (c *Caller) Allowed(a *devices.Authorizer, action devices.Action, topic string) bool {
	return c.Open || a.Allowed(&c.P, action, topic)
}

// Key names the caller for per-principal limits: "" for anonymous and
// open callers, which are limited per address only.
func (c *Caller) Key() string {
	if c.Open || c.P.Kind == devices.Anonymous {
		return ""
	}
	return string(c.P.Kind) + ":" + c.P.Name
}

// Caller authenticates r, or answers it with 401/403 and returns false.
// queryToken allows an access_token query parameter (EventSource cannot
// set headers); it is never logged.
func (a *Access) Caller(w http.ResponseWriter, r *http.Request, queryToken bool) (*Caller, bool) {
	if r.Header.Get("Origin") != "" && !a.Guard.CheckOrigin(r) {
		fail(w, http.StatusForbidden, a.Guard.OriginRefusal(r))
		return nil, false
	}
	tok, ok := RequestToken(r)
	fromQuery := false
	if !ok && queryToken {
		if t := r.URL.Query().Get("access_token"); t != "" {
			tok, ok, fromQuery = t, true, true
		}
	}
	if ok {
		if r.Header.Get("Authorization") == "" && !fromQuery && !a.Guard.SameSite(r) {
			fail(w, http.StatusForbidden, "cookie authentication needs a same-origin request (Origin or Sec-Fetch-Site)")
			return nil, false
		}
		at, ok := admitAuth(a.Throttle, a.Guard.ClientAddr(r).Addr(), w, func(code int, msg string) { fail(w, code, msg) })
		if !ok {
			return nil, false
		}
		if !fromQuery && a.AdminToken != "" && subtle.ConstantTimeCompare([]byte(tok), []byte(a.AdminToken)) == 1 {
			at.Succeeded()
			return &Caller{Open: true}, true // the administrator reads everything
		}
		if a.Tokens == nil {
			at.Failed() // a wrong admin token, or a JWT this broker cannot check
			fail(w, http.StatusUnauthorized, "tokens are not configured on this broker")
			return nil, false
		}
		p, err := a.Tokens.Verify(tok, time.Now())
		if err != nil {
			at.Failed()
			w.Header().Set("WWW-Authenticate", `Bearer realm="beacon", error="invalid_token"`)
			fail(w, http.StatusUnauthorized, err.Error())
			return nil, false
		}
		at.Succeeded()
		return &Caller{P: p}, true
	}
	if id, secret, ok := r.BasicAuth(); ok {
		at, ok := admitAuth(a.Throttle, a.Guard.ClientAddr(r).Addr(), w, func(code int, msg string) { fail(w, code, msg) })
		if !ok {
			return nil, false
		}
		d, err := a.Registry.Authenticate(id, secret)
		if err != nil {
			code := http.StatusUnauthorized
			if errors.Is(err, devices.ErrDisabled) {
				code = http.StatusForbidden
				at.Succeeded() // the right secret of a disabled device: no guess
			} else {
				at.Failed()
			}
			w.Header().Set("WWW-Authenticate", `Basic realm="beacon"`)
			fail(w, code, err.Error())
			return nil, false
		}
		at.Succeeded()
		return &Caller{P: devices.Principal{Kind: devices.DeviceKind, Name: d.ID, DeviceType: d.Type}}, true
	}
	switch {
	case a.Open():
		return &Caller{Open: true}, true
	case a.AllowAnonymous:
		return &Caller{P: devices.Principal{Kind: devices.Anonymous}}, true
	}
	w.Header().Set("WWW-Authenticate", `Bearer realm="beacon"`)
	fail(w, http.StatusUnauthorized, "authentication required: a Bearer token, the beacon_token cookie, or a device's id and secret (HTTP Basic)")
	return nil, false
}
