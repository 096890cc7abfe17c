package broker_test

import (
	"io"
	"net/http"
	"regexp"
	"strconv"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"

	bt "github.com/beaconmq/beacon/broker/brokertest"
)

// metric returns the value of the first sample whose line starts with name
// (labels included), or -1.
func metric(t *testing.T, body, name string) float64 {
	t.Helper()
	m := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(name) + ` ([0-9.e+-]+)$`).FindStringSubmatch(body)
	if m == nil {
		return -1
	}
	v, _ := strconv.ParseFloat(m[1], 64)
	return v
}

func scrape(t *testing.T, url, tok string) (int, string) {
	t.Helper()
	req, _ := http.NewRequest("GET", url, nil)
	if tok != "" {
		req.Header.Set("Authorization", "Bearer "+tok)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func TestMetrics(t *testing.T) {
	b, addr := startBroker(t, nil)
	sub := bt.Dial(t, addr, &paho.Connect{ClientID: "m-sub", CleanStart: true})
	sub.SubscribeT(t, paho.SubscribeOptions{Topic: "m/#", QoS: 1})
	pub := bt.Dial(t, addr, &paho.Connect{ClientID: "m-pub", CleanStart: true})
	for range 10 {
		pub.PublishT(t, &paho.Publish{Topic: "m/x", QoS: 1, Payload: []byte("12345")})
	}
	pub.PublishT(t, &paho.Publish{Topic: "m/r", QoS: 0, Retain: true, Payload: []byte("r")})
	sub.WaitMessages(t, 11, 5*time.Second)

	url := "http://" + b.HTTPAddr() + "/metrics"
	var body string
	bt.WaitFor(t, 5*time.Second, "counters to settle", func() bool {
		_, body = scrape(t, url, "")
		return metric(t, body, `beacon_messages_sent_total{qos="1"}`) >= 10
	})
	for _, c := range []struct {
		name string
		min  float64
	}{
		{`beacon_connections{transport="tcp"}`, 2},
		{`beacon_connects_total{transport="tcp"}`, 2},
		{`beacon_messages_received_total{qos="1"}`, 10},
		{`beacon_payload_bytes_received_total{qos="1"}`, 50},
		{`beacon_messages_sent_total{qos="1"}`, 10},
		{`beacon_publish_to_deliver_seconds_count`, 11},
		{`beacon_storage_commit_seconds_count`, 1},
		{`beacon_retained_messages`, 1},
		{`beacon_sessions`, 2},
		{`beacon_messages_dropped_total{reason="queue_full"}`, 0},
		{`go_goroutines`, 1},
	} {
		if v := metric(t, body, c.name); v < c.min {
			t.Errorf("%s = %v, want at least %v", c.name, v, c.min)
		}
	}
	_ = sub.Disconnect(&paho.Disconnect{})
	bt.WaitFor(t, 5*time.Second, "the disconnect to be counted", func() bool {
		_, body = scrape(t, url, "")
		return metric(t, body, `beacon_disconnects_total{reason="client",transport="tcp"}`) == 1
	})
}

func TestMetricsNeedAdminTokenWhenConfigured(t *testing.T) {
	e := startAuth(t, nil)
	url := "http://" + e.b.HTTPAddr() + "/metrics"
	if code, _ := scrape(t, url, ""); code != 401 {
		t.Fatalf("unauthenticated scrape: %d", code)
	}
	if code, body := scrape(t, url, adminToken); code != 200 || metric(t, body, "beacon_auth_failures_total") < 0 {
		t.Fatalf("scrape with the admin token: %d", code)
	}
}
