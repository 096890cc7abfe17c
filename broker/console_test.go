package broker_test

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"

	bt "github.com/beaconmq/beacon/broker/brokertest"
)

// api calls the admin API and decodes the JSON answer into out (if set).
func adminAPI(t *testing.T, method, url, tok string, out any) int {
	t.Helper()
	req, err := http.NewRequest(method, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	if tok != "" {
		req.Header.Set("Authorization", "Bearer "+tok)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if out != nil && resp.StatusCode == http.StatusOK {
		if err := json.Unmarshal(body, out); err != nil {
			t.Fatalf("%s %s: %v: %s", method, url, err, body)
		}
	}
	return resp.StatusCode
}

type clientList struct {
	Total   int `json:"total"`
	Clients []struct {
		ID            string `json:"id"`
		Connected     bool   `json:"connected"`
		Transport     string `json:"transport"`
		Protocol      string `json:"protocol_version"`
		Subscriptions int    `json:"subscriptions"`
		Queued        int    `json:"queued"`
		MessagesIn    uint64 `json:"messages_in"`
		MessagesOut   uint64 `json:"messages_out"`
		KeepAlive     int    `json:"keep_alive_s"`
	} `json:"clients"`
}

// TestConsoleAPI drives the operator's admin API with real MQTT clients:
// clients (filters, pages), a client's subscriptions, kick with and
// without the session, subscriptions by topic, clearing a retained
// message, and rates from the same registry as /metrics.
func TestConsoleAPI(t *testing.T) {
	cfg := bt.Config(t)
	cfg.Auth.AdminToken = "admin-token-0123456789"
	b := bt.Start(t, cfg)
	base := "http://" + b.HTTPAddr() + "/api/v1"
	tok := cfg.Auth.AdminToken
	mqtt := b.MQTTAddr("tcp")

	expiry := uint32(600)
	sub := bt.Dial(t, mqtt, &paho.Connect{ClientID: "ops-sub", KeepAlive: 45, Properties: &paho.ConnectProperties{SessionExpiryInterval: &expiry}})
	sub.SubscribeT(t, paho.SubscribeOptions{Topic: "ops/#", QoS: 1})
	pub := bt.Dial(t, mqtt, &paho.Connect{ClientID: "ops-pub", CleanStart: true})
	for i := range 10 {
		pub.PublishT(t, &paho.Publish{Topic: fmt.Sprintf("ops/%d", i), QoS: 1, Payload: []byte("x")})
	}
	pub.PublishT(t, &paho.Publish{Topic: "ops/retained", QoS: 1, Retain: true, Payload: []byte("r")})
	sub.WaitMessages(t, 11, 10*time.Second)

	if code := adminAPI(t, "GET", base+"/clients", "", nil); code != http.StatusUnauthorized {
		t.Fatalf("clients without the admin token: %d", code)
	}
	var cl clientList
	if code := adminAPI(t, "GET", base+"/clients", tok, &cl); code != 200 || cl.Total != 2 {
		t.Fatalf("clients: %d %+v", code, cl)
	}
	for _, c := range cl.Clients {
		switch c.ID {
		case "ops-pub":
			if c.MessagesIn != 11 || !c.Connected || c.Transport != "tcp" || c.Protocol != "5" {
				t.Fatalf("publisher: %+v", c)
			}
		case "ops-sub":
			if c.MessagesOut != 11 || c.Subscriptions != 1 || c.KeepAlive != 45 {
				t.Fatalf("subscriber: %+v", c)
			}
		}
	}
	if adminAPI(t, "GET", base+"/clients?q=SUB", tok, &cl); cl.Total != 1 || cl.Clients[0].ID != "ops-sub" {
		t.Fatalf("clients?q=SUB: %+v", cl)
	}
	if adminAPI(t, "GET", base+"/clients?limit=1&offset=1", tok, &cl); cl.Total != 2 || len(cl.Clients) != 1 || cl.Clients[0].ID != "ops-sub" {
		t.Fatalf("clients page 2: %+v", cl)
	}
	if code := adminAPI(t, "GET", base+"/clients?limit=0", tok, nil); code != http.StatusBadRequest {
		t.Fatalf("limit=0: %d", code)
	}

	var one struct {
		Client        struct{ ID string } `json:"client"`
		Subscriptions []struct {
			Filter string `json:"filter"`
			QoS    byte   `json:"qos"`
		} `json:"subscriptions"`
	}
	if code := adminAPI(t, "GET", base+"/clients/ops-sub", tok, &one); code != 200 || len(one.Subscriptions) != 1 || one.Subscriptions[0].Filter != "ops/#" || one.Subscriptions[0].QoS != 1 {
		t.Fatalf("client ops-sub: %d %+v", code, one)
	}
	if code := adminAPI(t, "GET", base+"/clients/nobody", tok, nil); code != http.StatusNotFound {
		t.Fatalf("unknown client: %d", code)
	}
	var subs struct {
		Total int `json:"total"`
	}
	if adminAPI(t, "GET", base+"/subscriptions?match=ops/7", tok, &subs); subs.Total != 1 {
		t.Fatalf("subscriptions matching ops/7: %+v", subs)
	}
	if adminAPI(t, "GET", base+"/subscriptions?match=other", tok, &subs); subs.Total != 0 {
		t.Fatalf("subscriptions matching other: %+v", subs)
	}

	// Kick: the session stays and queues; kick with the session: gone.
	if code := adminAPI(t, "DELETE", base+"/clients/ops-sub", tok, nil); code != http.StatusNoContent {
		t.Fatalf("kick: %d", code)
	}
	bt.WaitFor(t, 10*time.Second, "the kicked client's DISCONNECT", func() bool { return sub.ServerDisconnect() != nil })
	if d := sub.ServerDisconnect(); d.ReasonCode != 0x98 {
		t.Fatalf("kicked with 0x%02X, want 0x98", d.ReasonCode)
	}
	pub.PublishT(t, &paho.Publish{Topic: "ops/away", QoS: 1, Payload: []byte("q")})
	if adminAPI(t, "GET", base+"/clients?connected=false", tok, &cl); cl.Total != 1 || cl.Clients[0].Queued != 1 {
		t.Fatalf("offline sessions after the kick: %+v", cl)
	}
	if code := adminAPI(t, "DELETE", base+"/clients/ops-sub?session=true", tok, nil); code != http.StatusNoContent {
		t.Fatalf("kick and discard: %d", code)
	}
	if code := adminAPI(t, "GET", base+"/clients/ops-sub", tok, nil); code != http.StatusNotFound {
		t.Fatalf("discarded session still listed: %d", code)
	}

	// Browsing and clearing retained messages.
	var ret struct {
		Total    int `json:"total"`
		Messages []struct {
			Topic   string          `json:"topic"`
			Payload json.RawMessage `json:"payload"`
		} `json:"messages"`
	}
	if code := adminAPI(t, "GET", base+"/retained/ops/%23", tok, &ret); code != 200 || ret.Total != 1 || ret.Messages[0].Topic != "ops/retained" {
		t.Fatalf("browse ops/#: %d %+v", code, ret)
	}
	if code := adminAPI(t, "GET", base+"/retained/a/%23/b", tok, nil); code != http.StatusBadRequest {
		t.Fatalf("browse a bad filter: %d", code)
	}
	if code := adminAPI(t, "DELETE", base+"/retained/ops/retained", tok, nil); code != http.StatusNoContent {
		t.Fatalf("delete retained: %d", code)
	}
	if code := adminAPI(t, "DELETE", base+"/retained/ops/retained", tok, nil); code != http.StatusNotFound {
		t.Fatalf("delete retained twice: %d", code)
	}
	r := bt.Dial(t, mqtt, &paho.Connect{ClientID: "ops-reader", CleanStart: true})
	r.SubscribeT(t, paho.SubscribeOptions{Topic: "ops/retained", QoS: 1})
	r.Barrier(t)
	for _, m := range r.Messages() {
		if m.Topic == "ops/retained" {
			t.Fatalf("the cleared retained message was delivered: %q", m.Payload)
		}
	}

	var st struct {
		Rates map[string]struct {
			Window float64 `json:"window_s"`
			In     float64 `json:"messages_in_per_s"`
		} `json:"rates"`
		Totals      map[string]float64 `json:"totals"`
		Connections map[string]float64 `json:"connections"`
		Storage     struct {
			Bytes int64 `json:"bytes"`
		} `json:"storage"`
	}
	if code := adminAPI(t, "GET", base+"/stats", tok, &st); code != 200 {
		t.Fatalf("stats: %d", code)
	}
	if st.Totals["messages_in"] < 12 || st.Connections["tcp"] != 2 || st.Rates["15m"].In <= 0 || st.Rates["1s"].Window <= 0 {
		t.Fatalf("stats: %+v", st)
	}
	// The same numbers as /metrics: one source.
	req, _ := http.NewRequest("GET", "http://"+b.HTTPAddr()+"/metrics", nil)
	req.Header.Set("Authorization", "Bearer "+tok)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	sum := 0.0
	for _, l := range strings.Split(string(body), "\n") {
		if strings.HasPrefix(l, "beacon_messages_received_total{") {
			var v float64
			fmt.Sscan(l[strings.LastIndexByte(l, ' ')+1:], &v)
			sum += v
		}
	}
	if sum != st.Totals["messages_in"] {
		t.Fatalf("/metrics says %v received, /api/v1/stats %v", sum, st.Totals["messages_in"])
	}
}
