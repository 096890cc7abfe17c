package broker_test

import (
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"

	"github.com/beaconmq/beacon/broker"
	bt "github.com/beaconmq/beacon/broker/brokertest"
)

func TestWebhookStateInAdminAPIAndMetrics(t *testing.T) {
	var (
		mu     sync.Mutex
		bodies []string
	)
	recv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		mu.Lock()
		bodies = append(bodies, string(b))
		mu.Unlock()
	}))
	defer recv.Close()
	cfg := bt.Config(t)
	cfg.Auth.AdminToken = adminToken
	cfg.Webhooks = []broker.WebhookConfig{{Name: "ops", URL: recv.URL + "/in?key=hidden", Topics: []string{"alerts/#"}, Secret: "s",
		Timeout: 5 * time.Second, MaxRetries: 3}}
	b := bt.Start(t, cfg)
	pub := bt.Dial(t, b.MQTTAddr("tcp"), &paho.Connect{ClientID: "pub", CleanStart: true})
	pub.PublishT(t, &paho.Publish{Topic: "alerts/door", QoS: 1, Payload: []byte(`{"open":true}`)})
	pub.PublishT(t, &paho.Publish{Topic: "other", QoS: 1, Payload: []byte("x")})
	bt.WaitFor(t, 10*time.Second, "the delivery", func() bool { mu.Lock(); defer mu.Unlock(); return len(bodies) == 1 })
	var e envelope
	if err := json.Unmarshal([]byte(bodies[0]), &e); err != nil || e.Topic != "alerts/door" || string(e.Payload) != `{"open":true}` {
		t.Fatalf("body %s: %v", bodies[0], err)
	}

	base := "http://" + b.HTTPAddr() + "/api/v1/webhooks"
	if code, _ := api(t, "GET", base, "", nil); code != 401 {
		t.Errorf("webhook state without the admin token: %d", code)
	}
	var st struct {
		Webhooks []struct {
			Name      string `json:"name"`
			URL       string `json:"url"`
			Delivered int64  `json:"delivered"`
			Pending   int    `json:"pending"`
		} `json:"webhooks"`
	}
	bt.WaitFor(t, 5*time.Second, "delivered counted", func() bool {
		code, body := api(t, "GET", base, adminToken, nil)
		raw, _ := json.Marshal(body)
		_ = json.Unmarshal(raw, &st)
		return code == 200 && len(st.Webhooks) == 1 && st.Webhooks[0].Delivered == 1
	})
	if w := st.Webhooks[0]; w.Name != "ops" || w.Pending != 0 || strings.Contains(w.URL, "hidden") {
		t.Errorf("state: %+v (the URL's query must be redacted)", w)
	}
	_, metrics := scrape(t, "http://"+b.HTTPAddr()+"/metrics", adminToken)
	if !strings.Contains(metrics, `beacon_webhook_deliveries_total{outcome="delivered",webhook="ops"} 1`) ||
		!strings.Contains(metrics, `beacon_webhook_pending{webhook="ops"} 0`) {
		t.Errorf("webhook metrics:\n%s", grepLines(metrics, "webhook"))
	}
}

// A will goes through the same path as any publish: MQTT subscribers, the
// SSE stream, the history and webhooks all see it (on mochi it reached
// MQTT subscribers only).
func TestWillReachesStreamsAndWebhooks(t *testing.T) {
	var (
		mu     sync.Mutex
		bodies []string
	)
	recv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		mu.Lock()
		bodies = append(bodies, string(b))
		mu.Unlock()
	}))
	defer recv.Close()
	cfg := bt.Config(t)
	cfg.Webhooks = []broker.WebhookConfig{{Name: "status", URL: recv.URL, Topics: []string{"devices/+/status"}, Secret: "s",
		Timeout: 5 * time.Second, MaxRetries: 3}}
	b := bt.Start(t, cfg)
	s, resp := bt.OpenSSE(t, "http://"+b.HTTPAddr()+"/events?topic=devices/%2B/status", nil)
	if s == nil {
		t.Fatalf("GET /events: %d", resp.StatusCode)
	}
	defer s.Close()
	s.Until(t, "ready", 5*time.Second)

	dev := bt.Dial(t, b.MQTTAddr("tcp"), &paho.Connect{ClientID: "dev-w", CleanStart: true,
		WillMessage: &paho.WillMessage{Topic: "devices/dev-w/status", Payload: []byte("offline"), QoS: 1}})
	dev.TerminateConnectionForTest() // vanish without DISCONNECT

	ev := s.NextT(t, 10*time.Second)
	var e envelope
	ev.JSON(t, &e)
	if e.Topic != "devices/dev-w/status" || string(e.Payload) != `"offline"` {
		t.Fatalf("SSE event for the will: %+v (payload %s)", e, e.Payload)
	}
	bt.WaitFor(t, 10*time.Second, "the will's webhook delivery", func() bool { mu.Lock(); defer mu.Unlock(); return len(bodies) == 1 })
	mu.Lock()
	defer mu.Unlock()
	var w envelope
	if err := json.Unmarshal([]byte(bodies[0]), &w); err != nil || w.Topic != "devices/dev-w/status" {
		t.Fatalf("webhook body %s: %v", bodies[0], err)
	}
}
