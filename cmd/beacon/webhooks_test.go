package main

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"

	bt "github.com/beaconmq/beacon/broker/brokertest"
)

// TestWebhooksSurviveSIGKILL: a receiver that fails its first attempts,
// and a broker SIGKILLed while delivering: every acknowledged message
// arrives at least once, signed.
func TestWebhooksSurviveSIGKILL(t *testing.T) {
	const secret = "webhook-secret-for-the-test"
	var (
		mu        sync.Mutex
		requests  int
		got       = map[string]int{}
		badSigs   int
		deliverID = map[string]bool{}
	)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		mac := hmac.New(sha256.New, []byte(secret))
		mac.Write(body)
		mu.Lock()
		defer mu.Unlock()
		requests++
		if requests <= 3 {
			http.Error(w, "not yet", http.StatusServiceUnavailable)
			return
		}
		if r.Header.Get("X-Beacon-Signature") != "sha256="+hex.EncodeToString(mac.Sum(nil)) {
			badSigs++
			http.Error(w, "bad signature", http.StatusUnauthorized)
			return
		}
		var e struct{ Topic, Payload string }
		if err := json.Unmarshal(body, &e); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		got[e.Payload]++
		deliverID[r.Header.Get("X-Beacon-Delivery")] = true
		time.Sleep(5 * time.Millisecond) // a receiver with some work to do
	}))
	defer srv.Close()
	count := func() int {
		mu.Lock()
		defer mu.Unlock()
		return len(got)
	}

	conf := filepath.Join(t.TempDir(), "beacon.yaml")
	err := os.WriteFile(conf, []byte(fmt.Sprintf(`webhooks:
  - name: test
    url: %s/hook
    topics: ["wh/#"]
    secret: %q
    timeout: 2s
    max_retries: 1000
`, srv.URL, secret)), 0o600)
	if err != nil {
		t.Fatal(err)
	}
	data := t.TempDir()
	p := startBeacon(t, data, "--config", conf)
	pub := bt.Dial(t, p.mqtt, &paho.Connect{ClientID: "pub", CleanStart: true})
	for i := range 200 {
		pub.PublishT(t, &paho.Publish{Topic: "wh/x", QoS: 1, Payload: []byte(fmt.Sprintf("m%d", i))})
	}
	bt.WaitFor(t, 60*time.Second, "some deliveries", func() bool { return count() >= 20 })
	p.kill(t)
	before := count()

	p = startBeacon(t, data, "--config", conf)
	pub = bt.Dial(t, p.mqtt, &paho.Connect{ClientID: "pub", CleanStart: true})
	for i := 200; i < 250; i++ {
		pub.PublishT(t, &paho.Publish{Topic: "wh/x", QoS: 1, Payload: []byte(fmt.Sprintf("m%d", i))})
	}
	pub.PublishT(t, &paho.Publish{Topic: "other", QoS: 1, Payload: []byte("not for the webhook")})
	bt.WaitFor(t, 60*time.Second, "all 250 messages delivered", func() bool { return count() >= 250 })
	mu.Lock()
	defer mu.Unlock()
	dups := 0
	for i := range 250 {
		n := got[fmt.Sprintf("m%d", i)]
		if n == 0 {
			t.Errorf("m%d never delivered", i)
		}
		dups += n - 1
	}
	if got["not for the webhook"] > 0 {
		t.Error("a message outside the webhook's topics was delivered")
	}
	if badSigs > 0 {
		t.Errorf("%d deliveries with a bad signature", badSigs)
	}
	t.Logf("%d delivered before SIGKILL, 250 after restart; %d requests, %d duplicates (at least once), %d delivery ids",
		before, requests, dups, len(deliverID))
}
