// Package bridge holds Beacon's HTTP surfaces next to MQTT: for now the
// admin API (/api/v1/devices, /api/v1/acl/reload); the browser transports
// (MQTT over WebSocket, SSE, long-poll, REST publish) come here too.
package bridge

import (
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"time"

	"github.com/beaconmq/beacon/devices"
)

// maxAdminBody bounds an admin request body.
const maxAdminBody = 64 << 10

// Admin is the device administration API. Every request needs the
// configured admin token or a JWT whose beacon.role is "admin", sent as
// "Authorization: Bearer <token>" or in the beacon_token cookie.
type Admin struct {
	Registry   *devices.Registry
	Tokens     *devices.TokenVerifier // nil: no JWT
	AdminToken string                 // "": only admin JWTs
	// LocalToken is the credential the broker writes for the CLI on the
	// same machine; it is accepted only from a loopback peer.
	LocalToken string
	// Kick disconnects a device's connections (after disable, rotate, remove).
	Kick func(deviceID string) int
	// Reload re-reads the ACL rules file and returns the number of rules.
	Reload func() (int, error)
	Log    *slog.Logger
	// Guard, when set, checks the Origin of requests authenticated by
	// cookie, which a browser would also send with a cross-site form.
	Guard *Guard
}

// Handler returns the API's routes under /api/v1/.
func (a *Admin) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /api/v1/devices", a.list)
	mux.HandleFunc("POST /api/v1/devices", a.create)
	mux.HandleFunc("GET /api/v1/devices/{id}", a.show)
	mux.HandleFunc("PATCH /api/v1/devices/{id}", a.update)
	mux.HandleFunc("POST /api/v1/devices/{id}/rotate", a.rotate)
	mux.HandleFunc("DELETE /api/v1/devices/{id}", a.remove)
	mux.HandleFunc("POST /api/v1/acl/reload", a.reload)
	return a.authenticate(mux)
}

// apiError is every error body: a message, and the field at fault.
type apiError struct {
	Error string `json:"error"`
	Field string `json:"field,omitempty"`
}

// WriteJSON answers with v as JSON, uncached.
func WriteJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(v)
}

func fail(w http.ResponseWriter, code int, msg string) {
	WriteJSON(w, code, apiError{Error: msg})
}

// TokenCookie is the cookie a browser may carry its token in (set it
// HttpOnly, Secure and SameSite=Strict).
const TokenCookie = "beacon_token"

// RequestToken returns the token of a request: an "Authorization: Bearer"
// header, or else the beacon_token cookie.
func RequestToken(r *http.Request) (string, bool) {
	if h := r.Header.Get("Authorization"); h != "" {
		scheme, tok, ok := strings.Cut(h, " ")
		if !ok || !strings.EqualFold(scheme, "Bearer") || strings.TrimSpace(tok) == "" {
			return "", false
		}
		return strings.TrimSpace(tok), true
	}
	if c, err := r.Cookie(TokenCookie); err == nil && c.Value != "" {
		return c.Value, true
	}
	return "", false
}

func (a *Admin) authenticate(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		tok, ok := RequestToken(r)
		if ok && a.isLocal(r, tok) {
			next.ServeHTTP(w, r)
			return
		}
		if a.AdminToken == "" && a.Tokens == nil {
			fail(w, http.StatusForbidden, "admin API disabled: set auth.admin_token or configure JWT keys")
			return
		}
		if ok && r.Header.Get("Authorization") == "" && !a.sameSite(r) {
			fail(w, http.StatusForbidden, "cookie authentication needs a same-origin request (Origin or Sec-Fetch-Site)")
			return
		}
		if !ok {
			w.Header().Set("WWW-Authenticate", `Bearer realm="beacon"`)
			fail(w, http.StatusUnauthorized, "missing token: send Authorization: Bearer or the beacon_token cookie")
			return
		}
		if a.AdminToken != "" && subtle.ConstantTimeCompare([]byte(tok), []byte(a.AdminToken)) == 1 {
			next.ServeHTTP(w, r)
			return
		}
		if a.Tokens != nil {
			p, err := a.Tokens.Verify(tok, time.Now())
			if err == nil && p.Role == "admin" {
				next.ServeHTTP(w, r)
				return
			}
			if err == nil {
				fail(w, http.StatusForbidden, "token lacks role admin")
				return
			}
			w.Header().Set("WWW-Authenticate", `Bearer realm="beacon", error="invalid_token"`)
			fail(w, http.StatusUnauthorized, err.Error())
			return
		}
		w.Header().Set("WWW-Authenticate", `Bearer realm="beacon", error="invalid_token"`)
		fail(w, http.StatusUnauthorized, "invalid admin token")
	})
}

// loopbackPeer reports whether the request's TCP peer (not a forwarded
// address) is on this machine.
func loopbackPeer(r *http.Request) bool {
	host, _, err := net.SplitHostPort(r.RemoteAddr)
	ip := net.ParseIP(host)
	return err == nil && ip != nil && ip.IsLoopback()
}

// Require guards next with the admin credentials (the admin token or an
// admin JWT), always.
func (a *Admin) Require(next http.Handler) http.Handler { return a.authenticate(next) }

// Protect guards next (the metrics endpoint) with the admin credentials
// when an admin token is configured, and leaves it open otherwise.
func (a *Admin) Protect(next http.Handler) http.Handler {
	if a.AdminToken == "" {
		return next
	}
	return a.authenticate(next)
}

func (a *Admin) sameSite(r *http.Request) bool { return a.Guard != nil && a.Guard.SameSite(r) }

// decode reads a JSON body strictly: size-limited, no unknown fields.
func decode(w http.ResponseWriter, r *http.Request, v any) bool {
	return decodeLimit(w, r, v, maxAdminBody)
}

func decodeLimit(w http.ResponseWriter, r *http.Request, v any, limit int64) bool {
	r.Body = http.MaxBytesReader(w, r.Body, limit)
	dec := json.NewDecoder(r.Body)
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		var tooBig *http.MaxBytesError
		var syntax *json.SyntaxError
		var typ *json.UnmarshalTypeError
		switch {
		case errors.As(err, &tooBig):
			fail(w, http.StatusRequestEntityTooLarge, fmt.Sprintf("body larger than %d bytes", limit))
		case errors.As(err, &typ):
			WriteJSON(w, http.StatusBadRequest, apiError{Error: fmt.Sprintf("%s must be %s", typ.Field, typ.Type), Field: typ.Field})
		case errors.As(err, &syntax), errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, io.EOF):
			fail(w, http.StatusBadRequest, "body is not a JSON object: "+err.Error())
		case strings.HasPrefix(err.Error(), "json: unknown field "):
			field := strings.Trim(strings.TrimPrefix(err.Error(), "json: unknown field "), `"`)
			WriteJSON(w, http.StatusBadRequest, apiError{Error: "unknown field " + field, Field: field})
		default:
			fail(w, http.StatusBadRequest, err.Error())
		}
		return false
	}
	return true
}

func (a *Admin) registryError(w http.ResponseWriter, err error) {
	var fe *devices.FieldError
	switch {
	case errors.As(err, &fe):
		WriteJSON(w, http.StatusUnprocessableEntity, apiError{Error: fe.Error(), Field: fe.Field})
	case errors.Is(err, devices.ErrNotFound):
		fail(w, http.StatusNotFound, err.Error())
	case errors.Is(err, devices.ErrExists):
		WriteJSON(w, http.StatusConflict, apiError{Error: err.Error(), Field: "id"})
	case errors.Is(err, devices.ErrUnavailable):
		fail(w, http.StatusServiceUnavailable, err.Error())
	default:
		a.Log.Error("admin api", "error", err)
		fail(w, http.StatusInternalServerError, "internal error")
	}
}

// onlineParam reads ?online=true|false; nil when absent.
func onlineParam(w http.ResponseWriter, r *http.Request) (online *bool, ok bool) {
	switch r.URL.Query().Get("online") {
	case "":
		return nil, true
	case "true":
		v := true
		return &v, true
	case "false":
		v := false
		return &v, true
	}
	WriteJSON(w, http.StatusBadRequest, apiError{Error: "online must be true or false", Field: "online"})
	return nil, false
}

func (a *Admin) list(w http.ResponseWriter, r *http.Request) {
	online, ok := onlineParam(w, r)
	if !ok {
		return
	}
	WriteJSON(w, http.StatusOK, map[string]any{"devices": a.Registry.List(online)})
}

// isAdmin reports whether r carries the admin token or an admin JWT (by
// header, or by cookie from the same site).
func (a *Admin) isAdmin(r *http.Request) bool {
	tok, ok := RequestToken(r)
	if !ok || (r.Header.Get("Authorization") == "" && !a.sameSite(r)) {
		return false
	}
	if a.AdminToken != "" && subtle.ConstantTimeCompare([]byte(tok), []byte(a.AdminToken)) == 1 || a.isLocal(r, tok) {
		return true
	}
	if a.Tokens != nil {
		p, err := a.Tokens.Verify(tok, time.Now())
		return err == nil && p.Role == "admin"
	}
	return false
}

// isLocal reports whether tok is the local credential, sent in the
// Authorization header by a loopback peer.
func (a *Admin) isLocal(r *http.Request, tok string) bool {
	return a.LocalToken != "" && r.Header.Get("Authorization") != "" && loopbackPeer(r) &&
		subtle.ConstantTimeCompare([]byte(tok), []byte(a.LocalToken)) == 1
}

// Devices serves GET /api/v1/devices: the whole registry for the admin,
// and for anyone else (dashboards) the devices whose presence topic
// $beacon/presence/<id> the rules let them read, so presence is governed
// by the same ACL as the presence stream.
func (a *Admin) Devices(access *Access) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		online, ok := onlineParam(w, r)
		if !ok {
			return
		}
		if a.isAdmin(r) {
			WriteJSON(w, http.StatusOK, map[string]any{"devices": a.Registry.List(online)})
			return
		}
		c, ok := access.Caller(w, r, false)
		if !ok {
			return
		}
		out := []devices.Device{}
		for _, d := range a.Registry.List(online) {
			if c.Allowed(access.Authorizer, devices.Read, "$beacon/presence/"+d.ID) {
				out = append(out, d)
			}
		}
		WriteJSON(w, http.StatusOK, map[string]any{"devices": out})
	}
}

// created is the answer to a create or rotate: the secret is shown once.
type created struct {
	Device devices.Device `json:"device"`
	Secret string         `json:"secret"`
}

func (a *Admin) create(w http.ResponseWriter, r *http.Request) {
	var n devices.NewDevice
	if !decode(w, r, &n) {
		return
	}
	d, secret, err := a.Registry.Add(n)
	if err != nil {
		a.registryError(w, err)
		return
	}
	a.Log.Info("device added", "device", d.ID, "type", d.Type)
	w.Header().Set("Location", "/api/v1/devices/"+d.ID)
	WriteJSON(w, http.StatusCreated, created{Device: d, Secret: secret})
}

func (a *Admin) show(w http.ResponseWriter, r *http.Request) {
	d, err := a.Registry.Get(r.PathValue("id"))
	if err != nil {
		a.registryError(w, err)
		return
	}
	WriteJSON(w, http.StatusOK, d)
}

func (a *Admin) update(w http.ResponseWriter, r *http.Request) {
	var u devices.Update
	if !decode(w, r, &u) {
		return
	}
	id := r.PathValue("id")
	d, err := a.Registry.Update(id, u)
	if err != nil {
		a.registryError(w, err)
		return
	}
	if u.Enabled != nil && !*u.Enabled && a.Kick != nil {
		a.Kick(id)
	}
	a.Log.Info("device updated", "device", id)
	WriteJSON(w, http.StatusOK, d)
}

func (a *Admin) rotate(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	secret, err := a.Registry.Rotate(id)
	if err != nil {
		a.registryError(w, err)
		return
	}
	if a.Kick != nil {
		a.Kick(id)
	}
	d, _ := a.Registry.Get(id)
	a.Log.Info("device secret rotated", "device", id)
	WriteJSON(w, http.StatusOK, created{Device: d, Secret: secret})
}

func (a *Admin) remove(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	if err := a.Registry.Remove(id); err != nil {
		a.registryError(w, err)
		return
	}
	if a.Kick != nil {
		a.Kick(id)
	}
	a.Log.Info("device removed", "device", id)
	w.WriteHeader(http.StatusNoContent)
}

func (a *Admin) reload(w http.ResponseWriter, _ *http.Request) {
	n, err := a.Reload()
	if err != nil {
		fail(w, http.StatusUnprocessableEntity, err.Error())
		return
	}
	WriteJSON(w, http.StatusOK, map[string]int{"rules": n})
}
