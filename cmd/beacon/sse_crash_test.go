package main

import (
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"

	bt "github.com/beaconmq/beacon/broker/brokertest"
)

// TestSSEResumeAfterSIGKILL: a browser that read part of a stream resumes
// with its Last-Event-ID from a broker that was SIGKILLed and restarted,
// and gets every acknowledged message it had not seen, in order.
func TestSSEResumeAfterSIGKILL(t *testing.T) {
	data := t.TempDir()
	p := startBeacon(t, data)
	url := "http://" + p.http + "/events?topic=k%2F%23"
	s, resp := bt.OpenSSE(t, url, nil)
	if s == nil {
		t.Fatalf("GET /events: %d", resp.StatusCode)
	}
	s.Until(t, "ready", 10*time.Second)

	pub := bt.Dial(t, p.mqtt, &paho.Connect{ClientID: "pub", CleanStart: true})
	publish := func(from, to int) {
		for i := from; i < to; i++ {
			pub.PublishT(t, &paho.Publish{Topic: fmt.Sprintf("k/%d", i%3), QoS: 1, Payload: []byte(fmt.Sprintf("m%d", i))})
		}
	}
	publish(0, 100)
	var last string
	for i := range 40 {
		ev := s.NextT(t, 10*time.Second)
		var e struct{ Payload string }
		_ = json.Unmarshal([]byte(ev.Data), &e)
		if e.Payload != fmt.Sprintf("m%d", i) {
			t.Fatalf("event %d: %s", i, ev.Data)
		}
		last = ev.ID
	}
	s.Close()
	p.kill(t)

	p = startBeacon(t, data)
	pub = bt.Dial(t, p.mqtt, &paho.Connect{ClientID: "pub", CleanStart: true})
	publish(100, 150)
	// PUBACK precedes routing: wait until m149 is routed (so recorded),
	// or it can reach the resumed stream live, after ready.
	pub.Barrier(t)
	url = "http://" + p.http + "/events?topic=k%2F%23"
	h := http.Header{}
	h.Set("Last-Event-ID", last)
	s, resp = bt.OpenSSE(t, url, h)
	if s == nil {
		t.Fatalf("resume: %d", resp.StatusCode)
	}
	replayed, _ := s.Until(t, "ready", 10*time.Second)
	seen := map[string]int{}
	var order []string
	for _, ev := range replayed {
		if ev.Name == "reset" {
			t.Fatalf("reset after the restart: %s", ev.Data)
		}
		var e struct{ Payload string }
		_ = json.Unmarshal([]byte(ev.Data), &e)
		if seen[e.Payload]++; seen[e.Payload] == 1 {
			order = append(order, e.Payload)
		}
	}
	var want []string
	for i := 40; i < 150; i++ {
		want = append(want, fmt.Sprintf("m%d", i))
	}
	if strings.Join(order, " ") != strings.Join(want, " ") {
		t.Fatalf("after the restart, replay from the last id read gave\n%v\nwant m40..m149 in order", order)
	}
	if len(replayed) != len(want) {
		// A message recorded just before the kill whose routing was not
		// yet marked done is routed again at the restart (at least once).
		t.Logf("%d duplicates in the replay", len(replayed)-len(want))
	}
	_ = pub.Disconnect(&paho.Disconnect{})
}
