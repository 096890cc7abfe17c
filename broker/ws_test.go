package broker_test

import (
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"
	"github.com/gorilla/websocket"

	"github.com/beaconmq/beacon/broker"
	bt "github.com/beaconmq/beacon/broker/brokertest"
)

func wsURL(b *broker.Broker) string { return "ws://" + b.HTTPAddr() + "/mqtt" }

func origin(o string) http.Header { return http.Header{"Origin": {o}} }

func TestWebSocketMQTT(t *testing.T) {
	b, addr := startBroker(t, nil)
	sameOrigin := origin("http://" + b.HTTPAddr())
	for _, qos := range []byte{0, 1, 2} {
		t.Run(fmt.Sprintf("qos%d", qos), func(t *testing.T) {
			ws, resp, err := bt.DialWS(wsURL(b), sameOrigin)
			if err != nil {
				t.Fatal(err)
			}
			if p := resp.Header.Get("Sec-WebSocket-Protocol"); p != "mqtt" {
				t.Fatalf("subprotocol %q not echoed", p)
			}
			topic := fmt.Sprintf("ws/qos%d", qos)
			browser := bt.DialPahoWS(t, ws, &paho.Connect{ClientID: "browser-" + topic, CleanStart: true, KeepAlive: 30})
			browser.SubscribeT(t, paho.SubscribeOptions{Topic: "ws/#", QoS: 2})
			// From a TCP device to the browser and back.
			dev := bt.Dial(t, addr, &paho.Connect{ClientID: "dev-" + topic, CleanStart: true})
			dev.SubscribeT(t, paho.SubscribeOptions{Topic: "back/#", QoS: 2})
			dev.PublishT(t, &paho.Publish{Topic: topic, QoS: qos, Payload: []byte("to browser")})
			if m := browser.WaitMessages(t, 1, 5*time.Second)[0]; string(m.Payload) != "to browser" || m.QoS != qos {
				t.Fatalf("browser got %q at QoS %d", m.Payload, m.QoS)
			}
			browser.PublishT(t, &paho.Publish{Topic: "back/x", QoS: qos, Payload: []byte("from browser")})
			if m := dev.WaitMessages(t, 1, 5*time.Second)[0]; string(m.Payload) != "from browser" {
				t.Fatalf("device got %q", m.Payload)
			}
		})
	}

	t.Run("retained and will", func(t *testing.T) {
		dev := bt.Dial(t, addr, &paho.Connect{ClientID: "ret-dev", CleanStart: true})
		dev.PublishT(t, &paho.Publish{Topic: "wsret/state", QoS: 1, Retain: true, Payload: []byte("on")})
		dev.Barrier(t)
		ws, _, err := bt.DialWS(wsURL(b), sameOrigin)
		if err != nil {
			t.Fatal(err)
		}
		browser := bt.DialPahoWS(t, ws, &paho.Connect{ClientID: "ret-browser", CleanStart: true, KeepAlive: 30,
			WillMessage: &paho.WillMessage{Topic: "wsret/browser", Payload: []byte("gone"), QoS: 1}})
		browser.SubscribeT(t, paho.SubscribeOptions{Topic: "wsret/state", QoS: 1})
		if m := browser.WaitMessages(t, 1, 5*time.Second)[0]; !m.Retain || string(m.Payload) != "on" {
			t.Fatalf("retained over websocket: %q retain=%v", m.Payload, m.Retain)
		}
		watcher := bt.Dial(t, addr, &paho.Connect{ClientID: "ret-watch", CleanStart: true})
		watcher.SubscribeT(t, paho.SubscribeOptions{Topic: "wsret/browser", QoS: 1})
		_ = ws.UnderlyingConn().Close() // the tab is killed: no close frame, no DISCONNECT
		if m := watcher.WaitMessages(t, 1, 10*time.Second)[0]; m.Topic != "wsret/browser" {
			t.Fatalf("will after an abrupt close: %q", m.Topic)
		}
	})
}

func TestWebSocketRefusals(t *testing.T) {
	b, _ := startBroker(t, func(c *broker.Config) {
		c.HTTP.AllowedOrigins = "https://dash.example.com"
		c.HTTP.AllowMissingOrigin = false // admitted by default; refused when asked
		c.MQTT.MaxPacketSize = 1024
	})
	url := wsURL(b)
	for _, tc := range []struct {
		name   string
		header http.Header
		protos []string
		want   int
	}{
		{"cross-site origin", origin("https://evil.example"), nil, 403},
		{"missing origin (http.allow_missing_origin: false)", nil, nil, 403},
		{"no MQTT subprotocol", origin("https://dash.example.com"), []string{"chat"}, 400},
		{"invalid token", http.Header{"Origin": {"https://dash.example.com"}, "Authorization": {"Bearer nope"}}, nil, 401},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, resp, err := bt.DialWS(url, tc.header, tc.protos...)
			if err == nil || resp == nil || resp.StatusCode != tc.want {
				code := 0
				if resp != nil {
					code = resp.StatusCode
				}
				t.Fatalf("handshake: %v, status %d, want %d", err, code, tc.want)
			}
		})
	}
	if _, _, err := bt.DialWS(url, origin("https://dash.example.com")); err != nil {
		t.Fatalf("allowed origin: %v", err)
	}
	if _, _, err := bt.DialWS(url, origin("https://dash.example.com"), "mqttv3.1"); err != nil {
		t.Fatalf("subprotocol mqttv3.1: %v", err)
	}
	resp, err := http.Get("http://" + b.HTTPAddr() + "/mqtt")
	if err != nil || resp.StatusCode != 400 {
		t.Fatalf("plain GET: %v %v", err, resp)
	}
	resp.Body.Close()

	closeCode := func(ws *bt.WSConn) int {
		_ = ws.SetReadDeadline(time.Now().Add(5 * time.Second))
		for {
			if _, _, err := ws.NextReader(); err != nil {
				var ce *websocket.CloseError
				if errAs(err, &ce) {
					return ce.Code
				}
				return -1
			}
		}
	}
	t.Run("text frame", func(t *testing.T) {
		ws, _, err := bt.DialWS(url, origin("https://dash.example.com"))
		if err != nil {
			t.Fatal(err)
		}
		_ = ws.WriteMessage(websocket.TextMessage, []byte("hello"))
		if code := closeCode(ws); code != websocket.CloseUnsupportedData {
			t.Fatalf("close code %d, want 1003", code)
		}
	})
	t.Run("oversize frame", func(t *testing.T) {
		ws, _, err := bt.DialWS(url, origin("https://dash.example.com"))
		if err != nil {
			t.Fatal(err)
		}
		_ = ws.WriteMessage(websocket.BinaryMessage, make([]byte, 4096))
		if code := closeCode(ws); code != websocket.CloseMessageTooBig {
			t.Fatalf("close code %d, want 1009", code)
		}
	})
}

func errAs(err error, target **websocket.CloseError) bool {
	ce, ok := err.(*websocket.CloseError)
	if ok {
		*target = ce
	}
	return ok
}

func TestWebSocketClientAddressAndLimits(t *testing.T) {
	b, _ := startBroker(t, func(c *broker.Config) {
		c.HTTP.AllowMissingOrigin = true
		c.HTTP.TrustedProxies = "127.0.0.1"
		c.HTTP.MaxConnsPerIP = 2
	})
	url := wsURL(b)
	ws, _, err := bt.DialWS(url, http.Header{"X-Forwarded-For": {"203.0.113.7, 127.0.0.1"}})
	if err != nil {
		t.Fatal(err)
	}
	bt.DialPahoWS(t, ws, &paho.Connect{ClientID: "proxied", CleanStart: true, KeepAlive: 30})
	si, ok := b.Engine().Session("proxied")
	if !ok || !strings.HasPrefix(si.Remote, "203.0.113.7:") {
		t.Fatalf("client address behind a trusted proxy: %q", si.Remote)
	}
	// Limits count the real client address: two from 203.0.113.8 fit, a third does not.
	h := http.Header{"X-Forwarded-For": {"203.0.113.8"}}
	for i := range 2 {
		if _, _, err := bt.DialWS(url, h); err != nil {
			t.Fatalf("connection %d: %v", i, err)
		}
	}
	if _, resp, err := bt.DialWS(url, h); err == nil || resp == nil || resp.StatusCode != http.StatusTooManyRequests {
		t.Fatalf("third connection from one address: %v %v", err, resp)
	}
}

func TestWebSocketHandshakeIdentity(t *testing.T) {
	e := startAuth(t, func(c *broker.Config) { c.HTTP.AllowMissingOrigin = true })
	url := "ws://" + e.b.HTTPAddr() + "/mqtt"
	tok := token(t, "panel", "viewer", time.Hour, nil, nil)

	// The token in the handshake identifies the client: no MQTT credentials needed.
	ws, _, err := bt.DialWS(url, http.Header{"Authorization": {"Bearer " + tok}})
	if err != nil {
		t.Fatal(err)
	}
	viewer := bt.DialPahoWS(t, ws, &paho.Connect{ClientID: "panel", CleanStart: true, KeepAlive: 30})
	viewer.SubscribeT(t, paho.SubscribeOptions{Topic: "devices/#", QoS: 1})
	// ... or an HttpOnly cookie.
	ws2, _, err := bt.DialWS(url, http.Header{"Cookie": {"beacon_token=" + tok}})
	if err != nil {
		t.Fatal(err)
	}
	bt.DialPahoWS(t, ws2, &paho.Connect{ClientID: "panel2", CleanStart: true, KeepAlive: 30})
	// ... or the MQTT password, as over TCP.
	ws3, _, err := bt.DialWS(url, nil)
	if err != nil {
		t.Fatal(err)
	}
	bt.DialPahoWS(t, ws3, creds("dev-ws", "d1", e.dev))
	// Without any, the broker refuses as over TCP.
	ws4, _, err := bt.DialWS(url, nil)
	if err != nil {
		t.Fatal(err)
	}
	if c, err := bt.TryDialConn(ws4, &paho.Connect{ClientID: "nobody", CleanStart: true, KeepAlive: 30}); err == nil || c.Connack.ReasonCode != 0x87 {
		t.Fatalf("anonymous over websocket: %v", err)
	}
}
