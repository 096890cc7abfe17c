package broker_test

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"
	"github.com/go-jose/go-jose/v4/jwt"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/beaconmq/beacon/broker"
	bt "github.com/beaconmq/beacon/broker/brokertest"
	"github.com/beaconmq/beacon/devices"
)

const testRules = `
rules:
  - subjects: [device]
    actions: [publish]
    topics: ["devices/%u/#"]
    effect: allow
  - subjects: [device]
    actions: [subscribe]
    topics: ["devices/%u/cmd/#"]
    effect: allow
  - subjects: ["role:viewer"]
    actions: [subscribe]
    topics: ["devices/#", "$beacon/presence/d1"]
    effect: allow
  - subjects: [all]
    actions: [subscribe]
    topics: ["devices/+/secrets/#"]
    effect: deny
  - subjects: ["role:ops"]
    actions: [all]
    topics: ["#"]
    effect: allow
max_payload:
  thermostat: 16
`

const (
	jwtSecret  = "test-secret-0123456789-0123456789"
	adminToken = "admin-token-0123456789"
)

type authEnv struct {
	b        *broker.Broker
	addr     string
	rules    string
	dev      string // secret of device "d1" (type thermostat)
	dev2     string // secret of device "d2"
	disabled string // secret of disabled device "off"
}

func startAuth(t *testing.T, mutate func(*broker.Config)) *authEnv {
	t.Helper()
	cfg := bt.Config(t)
	rules := filepath.Join(t.TempDir(), "acl.yaml")
	if err := os.WriteFile(rules, []byte(testRules), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg.Auth.ACLFile = rules
	cfg.Auth.JWTSecret = jwtSecret
	cfg.Auth.AdminToken = adminToken
	cfg.Auth.FailDelay = 0
	cfg.Auth.FailBurst = 1000 // these tests count refusals, not the failed-authentication limit (throttle_test.go)
	if mutate != nil {
		mutate(&cfg)
	}
	b := bt.Start(t, cfg)
	e := &authEnv{b: b, addr: b.MQTTAddr("tcp"), rules: rules}
	add := func(id, typ string) string {
		_, s, err := b.Registry().Add(devices.NewDevice{ID: id, Type: typ})
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	e.dev, e.dev2, e.disabled = add("d1", "thermostat"), add("d2", ""), add("off", "")
	off := false
	if _, err := b.Registry().Update("off", devices.Update{Enabled: &off}); err != nil {
		t.Fatal(err)
	}
	return e
}

func token(t *testing.T, sub, role string, ttl time.Duration, pub, subs []string) string {
	t.Helper()
	var c devices.Claims
	c.Subject = sub
	c.Expiry = jwt.NewNumericDate(time.Now().Add(ttl))
	c.Beacon = &devices.BeaconClaims{Role: role, Pub: pub, Sub: subs}
	tok, err := devices.MintHS256([]byte(jwtSecret), c)
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

func creds(id, user, pass string) *paho.Connect {
	return &paho.Connect{ClientID: id, CleanStart: true, Username: user, UsernameFlag: user != "",
		Password: []byte(pass), PasswordFlag: pass != ""}
}

func TestAuthRefusals(t *testing.T) {
	e := startAuth(t, nil)
	if _, err := bt.TryDial(e.addr, creds("ok", "d1", e.dev)); err != nil {
		t.Fatalf("device with its secret: %v", err)
	}
	v5 := []struct {
		name       string
		user, pass string
		want       byte
	}{
		{"wrong secret", "d1", "nope", 0x86},
		{"unknown device", "ghost", e.dev, 0x86},
		{"disabled device", "off", e.disabled, 0x87},
		{"anonymous", "", "", 0x87},
		{"expired token", "", token(t, "u", "ops", -time.Hour, nil, nil), 0x86},
		{"token signed by someone else", "", "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln", 0x86},
	}
	for _, tc := range v5 {
		t.Run("v5 "+tc.name, func(t *testing.T) {
			c, err := bt.TryDial(e.addr, creds("c", tc.user, tc.pass))
			if err == nil || c.Connack == nil || c.Connack.ReasonCode != tc.want {
				t.Fatalf("got %v (connack %+v), want refusal 0x%02x", err, c.Connack, tc.want)
			}
		})
	}
	v3 := []struct {
		name       string
		user, pass string
		want       byte
	}{
		{"wrong secret", "d1", "nope", 0x04},
		{"disabled device", "off", e.disabled, 0x05},
		{"anonymous", "", "", 0x05},
	}
	for _, tc := range v3 {
		t.Run("v3.1.1 "+tc.name, func(t *testing.T) {
			r := bt.DialRaw(t, e.addr, 4)
			r.Send(t, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect},
				Connect: packets.ConnectParams{ClientIdentifier: "v3", Clean: true, Keepalive: 30,
					Username: []byte(tc.user), UsernameFlag: tc.user != "", Password: []byte(tc.pass), PasswordFlag: tc.pass != ""}})
			if ack := r.Expect(t, packets.Connack); ack.ReasonCode != tc.want {
				t.Fatalf("connack 0x%02x, want 0x%02x", ack.ReasonCode, tc.want)
			}
			r.Closed(t, 5*time.Second)
		})
	}
	if n := e.b.Stats().Auth.Failures; n != int64(len(v5)+len(v3)) {
		t.Fatalf("%d authentication failures counted, want %d", n, len(v5)+len(v3))
	}
}

func TestDevicePresence(t *testing.T) {
	e := startAuth(t, nil)
	c, err := bt.TryDial(e.addr, creds("p", "d1", e.dev))
	if err != nil {
		t.Fatal(err)
	}
	bt.WaitFor(t, 5*time.Second, "d1 online", func() bool { d, _ := e.b.Registry().Get("d1"); return d.Online })
	_ = c.Disconnect(&paho.Disconnect{})
	bt.WaitFor(t, 5*time.Second, "d1 offline", func() bool { d, _ := e.b.Registry().Get("d1"); return !d.Online && !d.LastSeen.IsZero() })
}

func TestACLEnforcedOnEveryAction(t *testing.T) {
	e := startAuth(t, nil)
	ops := bt.Dial(t, e.addr, creds("ops", "", token(t, "ops", "ops", time.Hour, nil, nil)))
	ops.PublishT(t, &paho.Publish{Topic: "devices/d1/secrets/key", QoS: 1, Retain: true, Payload: []byte("hidden")})
	ops.PublishT(t, &paho.Publish{Topic: "devices/d1/state", QoS: 1, Retain: true, Payload: []byte("visible")})
	ops.Barrier(t)

	dev := bt.Dial(t, e.addr, creds("dev", "d1", e.dev))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	// Publish: own subtree yes, another device's no (v5: PUBACK 0x87).
	if r, err := dev.Publish(ctx, &paho.Publish{Topic: "devices/d1/t", QoS: 1, Payload: []byte("1")}); err != nil || r.ReasonCode != 0 {
		t.Fatalf("own topic: %v %+v", err, r)
	}
	if r, err := dev.Publish(ctx, &paho.Publish{Topic: "devices/d2/t", QoS: 1, Payload: []byte("1")}); err == nil && r.ReasonCode != 0x87 {
		t.Fatalf("another device's topic: %+v, want 0x87", r)
	}
	// Subscribe: a reason code per filter.
	sa, err := dev.Subscribe(ctx, &paho.Subscribe{Subscriptions: []paho.SubscribeOptions{
		{Topic: "devices/d1/cmd/#", QoS: 1}, {Topic: "devices/#", QoS: 1}, {Topic: "devices/d2/cmd/#", QoS: 1}}})
	if sa == nil { // paho also returns an error when any filter is refused
		t.Fatal(err)
	}
	if len(sa.Reasons) != 3 || sa.Reasons[0] != 1 || sa.Reasons[1] != 0x87 || sa.Reasons[2] != 0x87 {
		t.Fatalf("suback reasons %v, want [1 0x87 0x87]", sa.Reasons)
	}

	// A viewer's wildcard crosses the secrets deny: retained and live
	// messages from the denied part never arrive.
	viewer := bt.Dial(t, e.addr, creds("viewer", "", token(t, "alice", "viewer", time.Hour, nil, nil)))
	viewer.SubscribeT(t, paho.SubscribeOptions{Topic: "devices/#", QoS: 1})
	ops.PublishT(t, &paho.Publish{Topic: "devices/d2/secrets/pin", QoS: 1, Payload: []byte("1234")})
	ops.PublishT(t, &paho.Publish{Topic: "devices/d2/state", QoS: 1, Payload: []byte("on")})
	msgs := viewer.WaitMessages(t, 2, 5*time.Second) // devices/d1/state (retained) and devices/d2/state
	ops.PublishT(t, &paho.Publish{Topic: "devices/d2/marker", QoS: 1, Payload: []byte("m")})
	msgs = viewer.WaitMessages(t, len(msgs)+1, 5*time.Second)
	for _, m := range msgs {
		if strings.Contains(m.Topic, "/secrets/") {
			t.Fatalf("viewer received %q through a wildcard that crosses a deny rule", m.Topic)
		}
	}
	if e.b.Stats().Auth.DeniedDelivery < 2 {
		t.Fatalf("withheld deliveries not counted: %+v", e.b.Stats().Auth)
	}
	// Nobody may subscribe to the denied part directly.
	sa, _ = viewer.Subscribe(ctx, &paho.Subscribe{Subscriptions: []paho.SubscribeOptions{{Topic: "devices/d1/secrets/#", QoS: 1}}})
	if sa == nil || sa.Reasons[0] != 0x87 {
		t.Fatalf("subscription inside a deny rule: %+v", sa)
	}
}

func TestV3DeniedPublishIsAcknowledgedAndDropped(t *testing.T) {
	e := startAuth(t, nil)
	ops := bt.Dial(t, e.addr, creds("ops", "", token(t, "ops", "ops", time.Hour, nil, nil)))
	ops.SubscribeT(t, paho.SubscribeOptions{Topic: "devices/#", QoS: 1})

	r := bt.DialRaw(t, e.addr, 4)
	r.Send(t, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect},
		Connect: packets.ConnectParams{ClientIdentifier: "v3dev", Clean: true, Keepalive: 30,
			Username: []byte("d1"), UsernameFlag: true, Password: []byte(e.dev), PasswordFlag: true}})
	r.Expect(t, packets.Connack)
	r.Send(t, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, PacketID: 5,
		TopicName: "devices/d2/t", Payload: []byte("forged")})
	if ack := r.Expect(t, packets.Puback); ack.PacketID != 5 {
		t.Fatalf("puback for %d", ack.PacketID)
	}
	r.Send(t, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, PacketID: 6,
		TopicName: "devices/d1/t", Payload: []byte("real")})
	r.Expect(t, packets.Puback)
	m := ops.WaitMessages(t, 1, 5*time.Second)[0]
	if m.Topic != "devices/d1/t" {
		t.Fatalf("the denied publish was delivered: %q", m.Topic)
	}
	if n := e.b.Stats().Auth.DeniedPublish; n != 1 {
		t.Fatalf("denied publishes counted: %d, want 1", n)
	}
}

func TestTokenExpiryDisconnects(t *testing.T) {
	e := startAuth(t, nil)
	c, err := bt.TryDial(e.addr, creds("short", "", token(t, "brief", "ops", 2*time.Second, nil, nil)))
	if err != nil {
		t.Fatal(err)
	}
	bt.WaitFor(t, 10*time.Second, "DISCONNECT at token expiry", func() bool { return c.ServerDisconnect() != nil })
	if rc := c.ServerDisconnect().ReasonCode; rc != 0x87 {
		t.Fatalf("disconnect reason 0x%02x, want 0x87 not authorized", rc)
	}
}

func TestJWTClaimsGrant(t *testing.T) {
	e := startAuth(t, nil)
	ha := bt.Dial(t, e.addr, creds("ha", "", token(t, "homeassistant", "", time.Hour, []string{"home/cmd/#"}, []string{"home/#"})))
	ha.SubscribeT(t, paho.SubscribeOptions{Topic: "home/#", QoS: 1})
	ha.PublishT(t, &paho.Publish{Topic: "home/cmd/light", QoS: 1, Payload: []byte("on")})
	if m := ha.WaitMessages(t, 1, 5*time.Second)[0]; m.Topic != "home/cmd/light" {
		t.Fatalf("got %q", m.Topic)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if r, err := ha.Publish(ctx, &paho.Publish{Topic: "home/state", QoS: 1, Payload: []byte("x")}); err == nil && r.ReasonCode != 0x87 {
		t.Fatalf("publish beyond the token's claims: %+v", r)
	}
}

func TestMaxPayloadPolicy(t *testing.T) {
	e := startAuth(t, nil)
	ops := bt.Dial(t, e.addr, creds("ops", "", token(t, "ops", "ops", time.Hour, nil, nil)))
	ops.SubscribeT(t, paho.SubscribeOptions{Topic: "devices/#", QoS: 1})
	dev := bt.Dial(t, e.addr, creds("therm", "d1", e.dev))
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	for _, qos := range []byte{1, 2} {
		r, err := dev.Publish(ctx, &paho.Publish{Topic: "devices/d1/t", QoS: qos, Payload: make([]byte, 17)})
		if err == nil && (r == nil || r.ReasonCode != 0x83) {
			t.Fatalf("QoS %d: 17 bytes from a thermostat (limit 16): %+v", qos, r)
		}
	}
	dev.PublishT(t, &paho.Publish{Topic: "devices/d1/t", QoS: 0, Payload: make([]byte, 17)})
	dev.PublishT(t, &paho.Publish{Topic: "devices/d1/t", QoS: 1, Payload: make([]byte, 16)})
	m := ops.WaitMessages(t, 1, 5*time.Second)[0]
	if len(m.Payload) != 16 {
		t.Fatalf("an oversize payload was delivered: %d bytes", len(m.Payload))
	}
	if n := e.b.Stats().Auth.PolicyDenied; n != 3 {
		t.Fatalf("policy refusals counted: %d, want 3", n)
	}
}

func TestACLReloadKeepsConnections(t *testing.T) {
	e := startAuth(t, nil)
	dev := bt.Dial(t, e.addr, creds("dev", "d1", e.dev))
	dev.PublishT(t, &paho.Publish{Topic: "devices/d1/t", QoS: 1, Payload: []byte("before")})

	// A broken file keeps the rules in force, and says where it is broken.
	if err := os.WriteFile(e.rules, []byte("rules:\n  - subjects: [devce]\n    actions: [publish]\n    topics: [x]\n    effect: allow\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := e.b.ReloadACL(); err == nil || !strings.Contains(err.Error(), "acl.yaml:2: rule 1: unknown subject") {
		t.Fatalf("bad reload: %v", err)
	}
	dev.PublishT(t, &paho.Publish{Topic: "devices/d1/t", QoS: 1, Payload: []byte("old rules")})

	// A good file takes effect on the open connection.
	if err := os.WriteFile(e.rules, []byte("rules:\n  - subjects: [device]\n    actions: [publish]\n    topics: [\"other/%u\"]\n    effect: allow\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if n, err := e.b.ReloadACL(); err != nil || n != 1 {
		t.Fatalf("reload: %d %v", n, err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if r, err := dev.Publish(ctx, &paho.Publish{Topic: "devices/d1/t", QoS: 1, Payload: []byte("x")}); r == nil || r.ReasonCode != 0x87 {
		t.Fatalf("after reload the old grant still works: %v %+v", err, r)
	}
	dev.PublishT(t, &paho.Publish{Topic: "other/d1", QoS: 1, Payload: []byte("new rules")})
	if dev.ServerDisconnect() != nil {
		t.Fatal("reload disconnected the client")
	}
}

func TestExposedListenerNeedsAuth(t *testing.T) {
	cfg := bt.Config(t)
	cfg.MQTT.Addr = "0.0.0.0:0"
	_, err := broker.New(cfg, bt.Logger(t))
	if err == nil || !strings.Contains(err.Error(), "mqtt.addr") || !strings.Contains(err.Error(), "no authentication is configured") {
		t.Fatalf("exposed without auth: %v", err)
	}
	cfg.HTTP.Addr, cfg.MQTT.Addr = "0.0.0.0:0", "127.0.0.1:0"
	if _, err := broker.New(cfg, bt.Logger(t)); err == nil || !strings.Contains(err.Error(), "http.addr") {
		t.Fatalf("HTTP exposed without auth: %v", err)
	}
	for name, mutate := range map[string]func(*broker.Config){
		"allow_anonymous": func(c *broker.Config) { c.Auth.AllowAnonymous = true },
		"jwt":             func(c *broker.Config) { c.Auth.JWTSecret = jwtSecret },
	} {
		c := bt.Config(t)
		c.MQTT.Addr = "0.0.0.0:0"
		mutate(&c)
		b, err := broker.New(c, bt.Logger(t))
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		_ = b.Shutdown(context.Background())
	}
}

func TestAnonymousUnderRules(t *testing.T) {
	e := startAuth(t, func(c *broker.Config) { c.Auth.AllowAnonymous = true })
	anon := bt.Dial(t, e.addr, &paho.Connect{ClientID: "anon", CleanStart: true})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	sa, err := anon.Subscribe(ctx, &paho.Subscribe{Subscriptions: []paho.SubscribeOptions{{Topic: "devices/#", QoS: 1}}})
	if sa == nil || sa.Reasons[0] != 0x87 {
		t.Fatalf("anonymous is admitted but no rule allows it anything: %v %+v", err, sa)
	}
}

func api(t *testing.T, method, url, tok string, body any) (int, map[string]any) {
	t.Helper()
	var rd io.Reader
	if s, ok := body.(string); ok {
		rd = strings.NewReader(s)
	} else if body != nil {
		b, _ := json.Marshal(body)
		rd = bytes.NewReader(b)
	}
	req, _ := http.NewRequest(method, url, rd)
	if tok != "" {
		req.Header.Set("Authorization", "Bearer "+tok)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	out := map[string]any{}
	_ = json.NewDecoder(resp.Body).Decode(&out)
	return resp.StatusCode, out
}

func TestAdminAPI(t *testing.T) {
	e := startAuth(t, nil)
	base := "http://" + e.b.HTTPAddr() + "/api/v1"

	for _, tc := range []struct {
		name, tok string
		want      int
	}{
		{"no token", "", 401},
		{"wrong token", "nope", 401},
		{"token without role admin", token(t, "bob", "viewer", time.Hour, nil, nil), 403},
		{"expired admin token", token(t, "root", "admin", -time.Hour, nil, nil), 401},
		{"admin token", adminToken, 200},
		{"admin JWT", token(t, "root", "admin", time.Hour, nil, nil), 200},
	} {
		if code, _ := api(t, "GET", base+"/devices/d1", tc.tok, nil); code != tc.want {
			t.Errorf("%s: %d, want %d", tc.name, code, tc.want)
		}
	}
	// The device list is also the dashboards' presence view: anyone gets
	// the devices whose $beacon/presence/<id> the rules let them read.
	ids := func(body map[string]any) []string {
		var out []string
		list, _ := body["devices"].([]any)
		for _, d := range list {
			out = append(out, d.(map[string]any)["id"].(string))
		}
		return out
	}
	if code, body := api(t, "GET", base+"/devices", token(t, "bob", "viewer", time.Hour, nil, nil), nil); code != 200 || !slices.Equal(ids(body), []string{"d1"}) {
		t.Errorf("viewer's device list: %d %v, want only d1", code, body)
	}
	if code, body := api(t, "GET", base+"/devices", adminToken, nil); code != 200 || len(ids(body)) != 3 {
		t.Errorf("admin's device list: %d %v, want all 3", code, body)
	}
	if code, body := api(t, "GET", base+"/devices?online=maybe", adminToken, nil); code != 400 || body["field"] != "online" {
		t.Errorf("online=maybe: %d %v", code, body)
	}
	// A browser carries its token in an HttpOnly cookie; the request must
	// come from a page of the broker's own origin (no cross-site forms).
	for _, tc := range []struct {
		name, header, value string
		want                int
	}{
		{"same origin", "Origin", "http://" + e.b.HTTPAddr(), 200},
		{"Sec-Fetch-Site same-origin", "Sec-Fetch-Site", "same-origin", 200},
		{"cross-site", "Origin", "https://evil.example", 403},
		{"no origin at all", "", "", 403},
	} {
		req, _ := http.NewRequest("GET", base+"/devices", nil)
		req.AddCookie(&http.Cookie{Name: "beacon_token", Value: token(t, "root", "admin", time.Hour, nil, nil)})
		if tc.header != "" {
			req.Header.Set(tc.header, tc.value)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != tc.want {
			t.Errorf("cookie, %s: %d, want %d", tc.name, resp.StatusCode, tc.want)
		}
	}

	code, body := api(t, "POST", base+"/devices", adminToken, map[string]any{"id": "lamp", "type": "light", "tags": map[string]string{"room": "hall"}})
	secret, _ := body["secret"].(string)
	if code != 201 || secret == "" {
		t.Fatalf("create: %d %v", code, body)
	}
	if dev, _ := body["device"].(map[string]any); dev["secret_hash"] != nil {
		t.Fatal("the API returned the secret hash")
	}
	for _, tc := range []struct {
		name  string
		body  any
		code  int
		field string
	}{
		{"bad id", map[string]any{"id": "a/b"}, 422, "id"},
		{"bad type", map[string]any{"id": "x", "type": "a b"}, 422, "type"},
		{"unknown field", map[string]any{"id": "x", "colour": "red"}, 400, "colour"},
		{"wrong type", map[string]any{"id": 5}, 400, "id"},
		{"duplicate", map[string]any{"id": "lamp"}, 409, "id"},
		{"not json", "{", 400, ""},
		{"too large", `{"id":"x","name":"` + strings.Repeat("n", 70<<10) + `"}`, 413, ""},
	} {
		code, body := api(t, "POST", base+"/devices", adminToken, tc.body)
		if code != tc.code || (tc.field != "" && body["field"] != tc.field) {
			t.Errorf("%s: %d %v, want %d naming %q", tc.name, code, body, tc.code, tc.field)
		}
	}

	lamp := bt.Dial(t, e.addr, creds("lamp", "lamp", secret))
	// Marked online once the session is established, just after CONNACK.
	bt.WaitFor(t, 5*time.Second, "lamp online", func() bool {
		_, body = api(t, "GET", base+"/devices/lamp", adminToken, nil)
		return body["online"] == true
	})
	code, body = api(t, "GET", base+"/devices/lamp", adminToken, nil)
	if code != 200 || body["online"] != true || body["type"] != "light" {
		t.Fatalf("show: %d %v", code, body)
	}
	if code, body := api(t, "GET", base+"/devices?online=true", adminToken, nil); code != 200 || len(body["devices"].([]any)) != 1 {
		t.Fatalf("online list: %d %v", code, body)
	}
	// Disabling a device closes its connection.
	if code, _ := api(t, "PATCH", base+"/devices/lamp", adminToken, map[string]any{"enabled": false}); code != 200 {
		t.Fatalf("disable: %d", code)
	}
	bt.WaitFor(t, 5*time.Second, "the disabled device's DISCONNECT", func() bool { return lamp.ServerDisconnect() != nil })
	if _, err := bt.TryDial(e.addr, creds("lamp", "lamp", secret)); err == nil {
		t.Fatal("a disabled device connected")
	}
	api(t, "PATCH", base+"/devices/lamp", adminToken, map[string]any{"enabled": true})
	code, body = api(t, "POST", base+"/devices/lamp/rotate", adminToken, nil)
	newSecret, _ := body["secret"].(string)
	if code != 200 || newSecret == "" || newSecret == secret {
		t.Fatalf("rotate: %d %v", code, body)
	}
	if _, err := bt.TryDial(e.addr, creds("lamp", "lamp", secret)); err == nil {
		t.Fatal("the old secret works after rotation")
	}
	if _, err := bt.TryDial(e.addr, creds("lamp", "lamp", newSecret)); err != nil {
		t.Fatalf("the new secret: %v", err)
	}
	if code, _ := api(t, "DELETE", base+"/devices/lamp", adminToken, nil); code != 204 {
		t.Fatalf("delete: %d", code)
	}
	if code, _ := api(t, "GET", base+"/devices/lamp", adminToken, nil); code != 404 {
		t.Fatalf("after delete: %d", code)
	}
	if code, body := api(t, "POST", base+"/acl/reload", adminToken, nil); code != 200 || body["rules"] != float64(5) {
		t.Fatalf("acl reload: %d %v", code, body)
	}
}

func TestWillIsAuthorizedAsAPublish(t *testing.T) {
	e := startAuth(t, nil)
	withWill := func(topic string) *paho.Connect {
		c := creds("willdev", "d1", e.dev)
		c.WillMessage = &paho.WillMessage{Topic: topic, Payload: []byte("forged"), QoS: 1}
		return c
	}
	c, err := bt.TryDial(e.addr, withWill("devices/d2/cmd/unlock"))
	if err == nil || c.Connack == nil || c.Connack.ReasonCode != 0x87 {
		t.Fatalf("a will on another device's topic: %v %+v, want CONNACK 0x87", err, c.Connack)
	}
	if _, err := bt.TryDial(e.addr, withWill("devices/d1/status")); err != nil {
		t.Fatalf("a will on the device's own topic: %v", err)
	}
}
