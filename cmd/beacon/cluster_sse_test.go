package main

import (
	"encoding/json"
	"fmt"
	"net/http"
	"slices"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"

	bt "github.com/beaconmq/beacon/broker/brokertest"
	"github.com/beaconmq/beacon/broker/cluster/clustertest"
)

// TestClusterSSEResumesAfterSIGKILL: a browser stream on node a follows
// messages of a and b; a is SIGKILLed, and the stream comes back on b with
// its last id while a is down: b's messages since come again, and a's part
// is reported not replayed. Once a is back, the same id on b replays a's
// messages the stream had not seen, too (they were in a's store).
func TestClusterSSEResumesAfterSIGKILL(t *testing.T) {
	rds := clustertest.StartRedis(t)
	dataA := t.TempDir()
	a := clusterNode(t, rds.URL(), "a", dataA)
	b := clusterNode(t, rds.URL(), "b", t.TempDir())
	pubA := bt.Dial(t, a.mqtt, &paho.Connect{ClientID: "pub-a", CleanStart: true})
	pubB := bt.Dial(t, b.mqtt, &paho.Connect{ClientID: "pub-b", CleanStart: true})

	open := func(p *proc, lastID string) *bt.SSE {
		t.Helper()
		h := http.Header{}
		if lastID != "" {
			h.Set("Last-Event-ID", lastID)
		}
		s, resp := bt.OpenSSE(t, "http://"+p.http+"/events?topic=plant/%23", h)
		if s == nil {
			t.Fatalf("GET /events: %d", resp.StatusCode)
		}
		return s
	}
	payload := func(ev bt.Event) string {
		var env struct{ Payload json.RawMessage }
		ev.JSON(t, &env)
		var s string
		_ = json.Unmarshal(env.Payload, &s)
		return s
	}
	s := open(a, "")
	s.Until(t, "ready", 10*time.Second)
	// b forwards to a once a's stream is its interest: probe until then.
	bt.WaitFor(t, 30*time.Second, "b's messages reach a's stream", func() bool {
		pubB.PublishT(t, &paho.Publish{Topic: "plant/probe", QoS: 1, Payload: []byte("probe")})
		ev, err := s.Next(500 * time.Millisecond)
		return err == nil && ev.Name == "message" && payload(ev) == "probe"
	})
	last := ""
	for i := range 5 {
		pubA.PublishT(t, &paho.Publish{Topic: "plant/a", QoS: 1, Payload: []byte(fmt.Sprint("a-seen-", i))})
		pubB.PublishT(t, &paho.Publish{Topic: "plant/b", QoS: 1, Payload: []byte(fmt.Sprint("b-seen-", i))})
	}
	for got := 0; got < 10; {
		ev := s.NextT(t, 20*time.Second)
		if ev.Name == "message" && payload(ev) != "probe" {
			got++
			last = ev.ID
		}
	}
	s.Close()
	// Published while nobody follows: only in each publisher's store.
	for i := range 3 {
		pubA.PublishT(t, &paho.Publish{Topic: "plant/a", QoS: 1, Payload: []byte(fmt.Sprint("a-unseen-", i))})
		pubB.PublishT(t, &paho.Publish{Topic: "plant/b", QoS: 1, Payload: []byte(fmt.Sprint("b-unseen-", i))})
	}
	a.kill(t)

	// On b while a is down: b's part, and a reset for a.
	s = open(b, last)
	var got []string
	var resetNode string
	for {
		ev := s.NextT(t, 20*time.Second)
		if ev.Name == "reset" {
			var r struct{ Reason, Node string }
			ev.JSON(t, &r)
			if r.Reason != "node_unavailable" {
				t.Fatalf("reset %s", ev.Data)
			}
			resetNode = r.Node
		}
		if ev.Name == "message" {
			got = append(got, payload(ev))
		}
		if ev.Name == "ready" {
			break
		}
	}
	s.Close()
	if fmt.Sprint(got) != "[b-unseen-0 b-unseen-1 b-unseen-2]" || resetNode != "a" {
		t.Fatalf("resumed on b with a down: %q, reset for %q", got, resetNode)
	}

	// a is back: the same id on b now has a's part too.
	clusterNode(t, rds.URL(), "a", dataA) // a again, on its store
	bt.WaitFor(t, 30*time.Second, "b sees a up", func() bool {
		s := open(b, last)
		defer s.Close()
		var got []string
		for {
			ev := s.NextT(t, 20*time.Second)
			switch ev.Name {
			case "reset":
				return false
			case "message":
				got = append(got, payload(ev))
			case "ready":
				want := "[a-unseen-0 a-unseen-1 a-unseen-2 b-unseen-0 b-unseen-1 b-unseen-2]"
				if slices.Sort(got); fmt.Sprint(got) != want {
					t.Fatalf("resumed on b with a back: %q, want %s", got, want)
				}
				return true
			}
		}
	})
}
