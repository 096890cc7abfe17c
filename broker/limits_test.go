package broker_test

import (
	"net/http"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"

	"github.com/beaconmq/beacon/broker"
	bt "github.com/beaconmq/beacon/broker/brokertest"
)

// Every limiter's refusals are counted with their reason.
func TestLimiterRefusalsCounted(t *testing.T) {
	b, addr := startBroker(t, func(c *broker.Config) {
		c.HTTP.HandshakesPerSec = 1 // bursts of 2
		c.HTTP.SSEMaxStreamsPerIP = 1
		c.HTTP.MaxConnsPerIP = 3
		c.MQTT.MaxClients = 1
	})
	events := "http://" + b.HTTPAddr() + "/events?topic=a/%23"
	metrics := "http://" + b.HTTPAddr() + "/metrics"
	count := func(name string) float64 {
		_, body := scrape(t, metrics, "")
		return metric(t, body, name)
	}

	// Per-address streams: the first stream is open, the second refused.
	s, resp := bt.OpenSSE(t, events, nil)
	if s == nil {
		t.Fatalf("first stream: %d", resp.StatusCode)
	}
	if _, resp := bt.OpenSSE(t, events, nil); resp.StatusCode != http.StatusTooManyRequests {
		t.Fatalf("second stream from one address: %d, want 429", resp.StatusCode)
	}
	if v := count(`beacon_stream_refused_total{reason="address"}`); v != 1 {
		t.Fatalf(`stream_refused{address} = %v, want 1`, v)
	}
	// The handshake rate: 2 handshakes spent, the next ones refused.
	refused := 0
	for range 5 {
		if _, resp := bt.OpenSSE(t, events, nil); resp.StatusCode == http.StatusTooManyRequests {
			refused++
		}
	}
	if v := count(`beacon_stream_refused_total{reason="handshake_rate"}`) + count(`beacon_stream_refused_total{reason="address"}`); v != float64(refused+1) {
		t.Fatalf("stream refusals counted %v, %d refused", v, refused+1)
	}
	if v := count(`beacon_stream_refused_total{reason="handshake_rate"}`); v < 1 {
		t.Fatalf(`stream_refused{handshake_rate} = %v, want some`, v)
	}
	// WebSocket handshakes share the rate (one may pass if a second went
	// by: try until one is refused).
	wsRefused := 0
	for i := 0; i < 10 && wsRefused == 0; i++ {
		ws, resp, err := bt.DialWS("ws://"+b.HTTPAddr()+"/mqtt", origin("http://"+b.HTTPAddr()))
		switch {
		case err == nil:
			_ = ws.Close()
		case resp != nil && resp.StatusCode == http.StatusTooManyRequests:
			wsRefused++
		default:
			t.Fatalf("WebSocket handshake: %v", err)
		}
	}
	if v := count(`beacon_ws_refused_total{reason="handshake_rate"}`); v != float64(wsRefused) || v == 0 {
		t.Fatalf(`ws_refused{handshake_rate} = %v, %d refused`, v, wsRefused)
	}

	// mqtt.max_clients: the second connection gets 0x89.
	bt.Dial(t, addr, &paho.Connect{ClientID: "first", CleanStart: true})
	c, err := bt.TryDial(addr, &paho.Connect{ClientID: "second", CleanStart: true})
	if err == nil || c.Connack == nil || c.Connack.ReasonCode != 0x89 {
		t.Fatalf("second MQTT connection: %v, want 0x89", err)
	}
	bt.WaitFor(t, 5*time.Second, "the refusal to be counted", func() bool {
		return count(`beacon_connections_refused_total{reason="max_clients"}`) == 1
	})
}

// Log lines held back by the rate-limited loggers are counted.
func TestLogSuppressedCounted(t *testing.T) {
	e := startAuth(t, nil)
	for range 3 {
		if _, err := bt.TryDial(e.addr, creds("g", "d1", "wrong")); err == nil {
			t.Fatal("wrong secret admitted")
		}
	}
	_, body := scrape(t, "http://"+e.b.HTTPAddr()+"/metrics", adminToken)
	if v := metric(t, body, `beacon_log_suppressed_total`); v < 2 {
		t.Fatalf("beacon_log_suppressed_total = %v, want at least 2 (3 refusals in 10 s, one logged)", v)
	}
}
