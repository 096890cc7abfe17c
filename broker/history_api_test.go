package broker_test

import (
	"encoding/json"
	"fmt"
	"net/http"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"

	bt "github.com/beaconmq/beacon/broker/brokertest"
)

// TestHistoryAPI: GET /api/v1/history gives the recorded messages under
// filters since a time, oldest first, the newest limit of them, with the
// ids a stream would give, and refuses bad parameters.
func TestHistoryAPI(t *testing.T) {
	b := bt.Start(t, bt.Config(t))
	pub := bt.Dial(t, b.MQTTAddr("tcp"), &paho.Connect{ClientID: "hist-pub", CleanStart: true})
	for i := range 30 {
		pub.PublishT(t, &paho.Publish{Topic: fmt.Sprintf("hist/%d", i%3), QoS: 1, Payload: []byte(fmt.Sprintf(`{"n": %d}`, i))})
	}
	pub.PublishT(t, &paho.Publish{Topic: "other/x", QoS: 1, Payload: []byte(`{"n": -1}`)})
	base := "http://" + b.HTTPAddr() + "/api/v1/history"
	type resp struct {
		Messages []struct {
			ID      string `json:"id"`
			Topic   string `json:"topic"`
			Payload struct {
				N int `json:"n"`
			} `json:"payload"`
			TS int64 `json:"ts"`
		} `json:"messages"`
		Last string `json:"last_event_id"`
	}
	get := func(q string) (int, resp) {
		t.Helper()
		var out resp
		r, err := http.Get(base + "?" + q)
		if err != nil {
			t.Fatal(err)
		}
		defer r.Body.Close()
		if r.StatusCode == 200 {
			if err := json.NewDecoder(r.Body).Decode(&out); err != nil {
				t.Fatal(err)
			}
		}
		return r.StatusCode, out
	}
	bt.WaitFor(t, 10*time.Second, "30 recorded", func() bool {
		_, r := get("topic=hist/%23&since=1h&limit=100")
		return len(r.Messages) == 30
	})
	code, r := get("topic=hist/%23&since=1h&limit=10")
	if code != 200 || len(r.Messages) != 10 || r.Last == "" {
		t.Fatalf("limit 10: %d %d messages", code, len(r.Messages))
	}
	for i, m := range r.Messages {
		if m.Payload.N != 20+i || m.ID == "" || m.Topic != fmt.Sprintf("hist/%d", (20+i)%3) {
			t.Fatalf("message %d: %+v (want the newest 10, oldest first)", i, m)
		}
	}
	if _, r := get("topic=hist/1&topic=other/%23&since=1h"); len(r.Messages) != 11 {
		t.Fatalf("hist/1 and other/#: %d messages, want 10 + 1", len(r.Messages))
	}
	future := time.Now().Add(time.Hour).UTC().Format(time.RFC3339)
	if _, r := get("topic=hist/%23&since=" + future); len(r.Messages) != 0 {
		t.Fatalf("since the future: %d", len(r.Messages))
	}
	for _, q := range []string{"topic=hist/%23&since=yesterday", "topic=hist/%23&limit=0", "since=1h", "topic=a/%23/b"} {
		if code, _ := get(q); code != http.StatusBadRequest {
			t.Fatalf("%s: %d, want 400", q, code)
		}
	}
}
