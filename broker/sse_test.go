package broker_test

import (
	"bufio"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"

	"github.com/beaconmq/beacon/broker"
	bt "github.com/beaconmq/beacon/broker/brokertest"
	"github.com/beaconmq/beacon/broker/engine"
	"github.com/beaconmq/beacon/devices"
	"github.com/beaconmq/beacon/devices/codec"
)

// envelope is the JSON form of a message on the SSE stream and polls.
type envelope struct {
	ID       string          `json:"id"`
	Topic    string          `json:"topic"`
	Payload  json.RawMessage `json:"payload"`
	Encoding string          `json:"encoding"`
	QoS      byte            `json:"qos"`
	Retain   bool            `json:"retain"`
	TS       int64           `json:"ts"`
}

func (e envelope) text(t *testing.T) string {
	t.Helper()
	var s string
	if err := json.Unmarshal(e.Payload, &s); err != nil {
		t.Fatalf("payload of %s is not a string: %s", e.Topic, e.Payload)
	}
	return s
}

func envelopeOf(t *testing.T, ev bt.Event) envelope {
	t.Helper()
	if ev.Name != "message" {
		t.Fatalf("event %q (%s), want a message", ev.Name, ev.Data)
	}
	var e envelope
	ev.JSON(t, &e)
	return e
}

// waitRecorded waits until the history holds n messages: routed, so a
// stream opened now sees them as past, not live.
func waitRecorded(t *testing.T, b *broker.Broker, n int64) {
	t.Helper()
	bt.WaitFor(t, 5*time.Second, fmt.Sprintf("%d messages recorded", n), func() bool { return b.Stats().History.Recorded >= n })
}

func eventsURL(b *broker.Broker, params ...string) string {
	q := url.Values{}
	for i := 0; i+1 < len(params); i += 2 {
		q.Add(params[i], params[i+1])
	}
	return "http://" + b.HTTPAddr() + "/events?" + q.Encode()
}

func TestSSERetainedThenLive(t *testing.T) {
	b := bt.Start(t, bt.Config(t))
	pub := bt.Dial(t, b.MQTTAddr("tcp"), &paho.Connect{ClientID: "pub", CleanStart: true})
	pub.PublishT(t, &paho.Publish{Topic: "home/t1", QoS: 1, Retain: true, Payload: []byte(`{"temp": 21.5}`)})
	pub.PublishT(t, &paho.Publish{Topic: "home/bin", QoS: 1, Retain: true, Payload: []byte{0, 1, 2, 0xff}})
	waitRecorded(t, b, 2) // PUBACK comes before routing: else they could also arrive live

	s, resp := bt.OpenSSE(t, eventsURL(b, "topic", "home/#"), nil)
	if s == nil {
		t.Fatalf("GET /events: %d", resp.StatusCode)
	}
	for k, want := range map[string]string{"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"} {
		if got := resp.Header.Get(k); got != want {
			t.Errorf("%s: %q, want %q", k, got, want)
		}
	}
	retained, ready := s.Until(t, "ready", 5*time.Second)
	if len(retained) != 2 {
		t.Fatalf("retained snapshot: %v", retained)
	}
	bin, t1 := envelopeOf(t, retained[0]), envelopeOf(t, retained[1])
	if bin.Topic != "home/bin" || bin.Encoding != "base64" || !bin.Retain || string(bin.Payload) != `"`+base64.StdEncoding.EncodeToString([]byte{0, 1, 2, 0xff})+`"` {
		t.Errorf("binary retained message: %+v", bin)
	}
	if t1.Topic != "home/t1" || t1.Encoding != "json" || string(t1.Payload) != `{"temp":21.5}` || !t1.Retain {
		t.Errorf("JSON retained message: %+v (payload %s)", t1, t1.Payload)
	}
	if ready.ID == "" {
		t.Error("the ready event carries no id to resume from")
	}

	pub.PublishT(t, &paho.Publish{Topic: "other/x", QoS: 0, Payload: []byte("not for this stream")})
	pub.PublishT(t, &paho.Publish{Topic: "home/t2", QoS: 1, Payload: []byte("hello\nworld")})
	ev := s.NextT(t, 5*time.Second)
	e := envelopeOf(t, ev)
	if e.Topic != "home/t2" || e.Encoding != "utf8" || e.text(t) != "hello\nworld" || e.Retain || e.QoS != 1 || ev.ID == "" || e.ID != ev.ID {
		t.Fatalf("live message: %+v (event id %q)", e, ev.ID)
	}
	if e.TS < time.Now().Add(-time.Minute).UnixMilli() || e.TS > time.Now().UnixMilli() {
		t.Errorf("ts %d is not the time of routing in milliseconds", e.TS)
	}

	for _, bad := range []struct{ query, want string }{
		{"", "topic"},
		{"topic=a/%23/b", "not a topic filter"},
		{"topic=%24share/g/x", "not a topic filter"},
	} {
		resp, err := http.Get("http://" + b.HTTPAddr() + "/events?" + bad.query)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 400 || !strings.Contains(string(body), bad.want) {
			t.Errorf("?%s: %d %s", bad.query, resp.StatusCode, body)
		}
	}
}

// TestSSEReplaySeam cuts the stream again and again while one publisher
// sends 10,000 numbered messages: resuming with Last-Event-ID must give
// every message exactly once, in order.
func TestSSEReplaySeam(t *testing.T) {
	b := bt.Start(t, bt.Config(t))
	const n = 10000
	var (
		got        []int
		last       string
		reconnects int
		started    = make(chan struct{})
		pubErr     atomic.Value
	)
	go func() {
		<-started
		c, err := bt.TryDial(b.MQTTAddr("tcp"), &paho.Connect{ClientID: "seam-pub", CleanStart: true})
		if err != nil {
			pubErr.Store(err)
			return
		}
		for i := range n {
			if _, err := c.Publish(context.Background(), &paho.Publish{Topic: fmt.Sprintf("seam/%d", i%7), QoS: 0, Payload: []byte("n" + strconv.Itoa(i))}); err != nil {
				pubErr.Store(err)
				return
			}
		}
	}()
	deadline := time.Now().Add(90 * time.Second)
	cut := 0
	for len(got) < n && time.Now().Before(deadline) {
		h := http.Header{}
		if last != "" {
			h.Set("Last-Event-ID", last)
		}
		s, resp := bt.OpenSSE(t, eventsURL(b, "topic", "seam/#"), h)
		if s == nil {
			t.Fatalf("reconnect: %d", resp.StatusCode)
		}
		reconnects++
		if last == "" {
			_, ready := s.Until(t, "ready", 5*time.Second)
			last = ready.ID
			close(started)
		}
		// Cut after a varying number of messages, mid-replay or live.
		cut = (cut*7 + 311) % 1500
		for read := 0; read < cut+50 && len(got) < n; read++ {
			ev, err := s.Next(10 * time.Second)
			if err != nil {
				break // a slow reader is disconnected: resume
			}
			if ev.Name == "reset" {
				t.Fatalf("reset while resuming from %q: %s", last, ev.Data)
			}
			if ev.Name != "message" {
				continue
			}
			e := envelopeOf(t, ev)
			v, _ := strconv.Atoi(strings.TrimPrefix(e.text(t), "n"))
			got = append(got, v)
			last = ev.ID
		}
		s.Close()
		if err, _ := pubErr.Load().(error); err != nil {
			t.Fatal(err)
		}
	}
	if len(got) != n {
		t.Fatalf("got %d of %d messages in %d connections", len(got), n, reconnects)
	}
	for i, v := range got {
		if v != i {
			t.Fatalf("message %d is %d: a gap or a duplicate at a seam (%d connections)", i, v, reconnects)
		}
	}
	t.Logf("%d messages in order over %d connections; %d streams closed as too slow", n, reconnects, b.Stats().Streams.Slow)
}

func TestSSEResets(t *testing.T) {
	cfg := bt.Config(t)
	cfg.History.Rules = []broker.HistoryRuleConfig{{Filter: "r/#", MaxMessages: 5}}
	b := bt.Start(t, cfg)
	pub := bt.Dial(t, b.MQTTAddr("tcp"), &paho.Connect{ClientID: "pub", CleanStart: true})

	s, _ := bt.OpenSSE(t, eventsURL(b, "topic", "r/#"), nil)
	_, ready := s.Until(t, "ready", 5*time.Second)
	first := ready.ID
	s.Close()
	epoch, _, _ := strings.Cut(first, "-")

	resume := func(id, wantReset string) *bt.SSE {
		t.Helper()
		h := http.Header{}
		h.Set("Last-Event-ID", id)
		s, resp := bt.OpenSSE(t, eventsURL(b, "topic", "r/#"), h)
		if s == nil {
			t.Fatalf("resume from %q: %d", id, resp.StatusCode)
		}
		ev := s.NextT(t, 5*time.Second)
		if wantReset == "" {
			if ev.Name == "reset" {
				t.Fatalf("resume from %q: unexpected reset %s", id, ev.Data)
			}
			return s
		}
		var r struct {
			Reason string `json:"reason"`
			LastID string `json:"last_event_id"`
		}
		if ev.Name == "reset" {
			ev.JSON(t, &r)
		}
		if ev.Name != "reset" || r.Reason != wantReset || r.LastID == "" || resp.Header.Get("Beacon-Last-Event-ID") != r.LastID {
			t.Fatalf("resume from %q: first event %q %s, header %q; want reset %q", id, ev.Name, ev.Data, resp.Header.Get("Beacon-Last-Event-ID"), wantReset)
		}
		return s
	}
	resume("not-an-id", "unknown").Close()
	resume("0123456789ab-1", "foreign_epoch").Close()
	resume(epoch+"-999999999", "unknown").Close()

	for i := range 3 {
		pub.PublishT(t, &paho.Publish{Topic: "r/a", QoS: 1, Payload: []byte(strconv.Itoa(i))})
	}
	bt.WaitFor(t, 5*time.Second, "3 recorded", func() bool { return b.Stats().History.Recorded >= 3 })
	s = resume(first, "") // nothing trimmed yet: a plain replay
	s.Close()
	for i := 3; i < 20; i++ {
		pub.PublishT(t, &paho.Publish{Topic: "r/a", QoS: 1, Payload: []byte(strconv.Itoa(i))})
	}
	// PUBACK comes before routing: wait until all 20 are recorded.
	bt.WaitFor(t, 5*time.Second, "20 recorded", func() bool { return b.Stats().History.Recorded >= 20 })
	// Only the last 5 are kept: resuming from before them is a reset, and
	// the stream then goes on live.
	s = resume(first, "expired")
	s.Until(t, "ready", 5*time.Second)
	pub.PublishT(t, &paho.Publish{Topic: "r/b", QoS: 1, Payload: []byte("after reset")})
	if e := envelopeOf(t, s.NextT(t, 5*time.Second)); e.text(t) != "after reset" {
		t.Fatalf("after reset: %+v", e)
	}
	// A topic no rule records cannot have a trimmed gap: no reset.
	resume(first+"", "expired").Close()
	h := http.Header{}
	h.Set("Last-Event-ID", first)
	pub.PublishT(t, &paho.Publish{Topic: "unrecorded/state", QoS: 1, Retain: true, Payload: []byte("kept")})
	s, _ = bt.OpenSSE(t, eventsURL(b, "topic", "unrecorded/#"), h)
	// Nothing to replay there, so its retained state comes again, and the
	// ready event says the filter is not replayed.
	before, ready := s.Until(t, "ready", 5*time.Second)
	var rd struct {
		NotReplayed []string `json:"not_replayed"`
	}
	ready.JSON(t, &rd)
	if len(before) != 1 || envelopeOf(t, before[0]).Topic != "unrecorded/state" || len(rd.NotReplayed) != 1 || rd.NotReplayed[0] != "unrecorded/#" {
		t.Fatalf("unrecorded filter: %v then %s", before, ready.Data)
	}
	// The header wins over the query parameter.
	s, _ = bt.OpenSSE(t, eventsURL(b, "topic", "r/#", "last_event_id", "garbage"), h)
	if ev := s.NextT(t, 5*time.Second); ev.Name != "reset" {
		t.Fatalf("header id (expired) should win over the query: %q", ev.Name)
	}
	if b.Stats().Streams.Resets < 5 {
		t.Errorf("resets counted: %d", b.Stats().Streams.Resets)
	}
}

func TestSSEAuthorization(t *testing.T) {
	e := startAuth(t, nil)
	b := e.b
	dev := bt.Dial(t, e.addr, creds("d1", "d1", e.dev))
	dev.PublishT(t, &paho.Publish{Topic: "devices/d1/state", QoS: 1, Retain: true, Payload: []byte("on")})
	dev.PublishT(t, &paho.Publish{Topic: "devices/d1/secrets/key", QoS: 1, Retain: true, Payload: []byte("hunter2")})
	waitRecorded(t, b, 2)
	viewer := token(t, "alice", "viewer", time.Hour, nil, nil)

	for _, tc := range []struct {
		name   string
		url    string
		header http.Header
		want   int
		body   string
	}{
		{"no credentials", eventsURL(b, "topic", "devices/#"), nil, 401, "authentication required"},
		{"bad token", eventsURL(b, "topic", "devices/#", "access_token", "nope"), nil, 401, ""},
		{"filter not allowed", eventsURL(b, "topic", "devices/#", "topic", "home/#", "access_token", viewer), nil, 403, `home/#`},
		{"cross-site origin", eventsURL(b, "topic", "devices/#", "access_token", viewer), http.Header{"Origin": {"https://evil.example"}}, 403, "origin"},
	} {
		s, resp := bt.OpenSSE(t, tc.url, tc.header)
		if s != nil {
			t.Errorf("%s: stream opened", tc.name)
			continue
		}
		body, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != tc.want || !strings.Contains(string(body), tc.body) {
			t.Errorf("%s: %d %s, want %d naming %q", tc.name, resp.StatusCode, body, tc.want, tc.body)
		}
	}

	// The viewer's wildcard crosses the secrets deny rule: nothing from
	// there, retained, live or replayed.
	s, _ := bt.OpenSSE(t, eventsURL(b, "topic", "devices/#", "access_token", viewer), nil)
	retained, ready := s.Until(t, "ready", 5*time.Second)
	if len(retained) != 1 || envelopeOf(t, retained[0]).Topic != "devices/d1/state" {
		t.Fatalf("retained for the viewer: %v", retained)
	}
	dev.PublishT(t, &paho.Publish{Topic: "devices/d1/secrets/key", QoS: 1, Payload: []byte("hunter3")})
	dev.PublishT(t, &paho.Publish{Topic: "devices/d1/state", QoS: 1, Payload: []byte("off")})
	if e := envelopeOf(t, s.NextT(t, 5*time.Second)); e.Topic != "devices/d1/state" {
		t.Fatalf("live: got %s", e.Topic)
	}
	s.Close()
	recorded := b.Stats().History.Recorded
	dev.PublishT(t, &paho.Publish{Topic: "devices/d1/secrets/key", QoS: 1, Payload: []byte("hunter4")})
	dev.PublishT(t, &paho.Publish{Topic: "devices/d1/state", QoS: 1, Payload: []byte("dim")})
	bt.WaitFor(t, 5*time.Second, "both recorded", func() bool { return b.Stats().History.Recorded >= recorded+2 })
	h := http.Header{}
	h.Set("Last-Event-ID", ready.ID)
	s, _ = bt.OpenSSE(t, eventsURL(b, "topic", "devices/#", "access_token", viewer), h)
	replayed, _ := s.Until(t, "ready", 5*time.Second)
	var topics []string
	for _, ev := range replayed {
		topics = append(topics, envelopeOf(t, ev).Topic)
	}
	if strings.Join(topics, " ") != "devices/d1/state devices/d1/state" {
		t.Fatalf("replay for the viewer: %v", topics)
	}

	// A device's stream ends when the device is disabled.
	h = http.Header{}
	h.Set("Authorization", "Basic "+base64.StdEncoding.EncodeToString([]byte("d1:"+e.dev)))
	ds, resp := bt.OpenSSE(t, eventsURL(b, "topic", "devices/d1/cmd/#"), h)
	if ds == nil {
		t.Fatalf("device stream: %d", resp.StatusCode)
	}
	ds.Until(t, "ready", 5*time.Second)
	if code, _ := api(t, "PATCH", "http://"+b.HTTPAddr()+"/api/v1/devices/d1", adminToken, map[string]any{"enabled": false}); code != 200 {
		t.Fatalf("disable d1: %d", code)
	}
	for {
		_, err := ds.Next(5 * time.Second)
		if err == bt.ErrEnded {
			break
		}
		if err != nil {
			t.Fatalf("the disabled device's stream is still open: %v", err)
		}
	}

	// A token that expires closes the stream.
	short := token(t, "bob", "viewer", 2*time.Second, nil, nil)
	s, _ = bt.OpenSSE(t, eventsURL(b, "topic", "devices/#", "access_token", short), nil)
	if _, ev := s.Until(t, "error", 10*time.Second); !strings.Contains(ev.Data, "expired") {
		t.Fatalf("expiry: %s", ev.Data)
	}
	if _, err := s.Next(5 * time.Second); err != bt.ErrEnded {
		t.Fatalf("stream still open after the token expired: %v", err)
	}
}

// TestSSESlowReader: a client that stops reading is disconnected once its
// buffer is full; the broker and other readers go on.
func TestSSESlowReader(t *testing.T) {
	cfg := bt.Config(t)
	cfg.HTTP.SSEBuffer = 8
	b := bt.Start(t, cfg)

	conn, err := net.Dial("tcp", b.HTTPAddr())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	req, _ := http.NewRequest("GET", eventsURL(b, "topic", "slow/#"), nil)
	if err := req.Write(conn); err != nil {
		t.Fatal(err)
	}
	stalled, err := http.ReadResponse(bufio.NewReader(conn), req)
	if err != nil || stalled.StatusCode != 200 {
		t.Fatalf("stalled stream: %v %v", stalled, err)
	}
	pub := bt.Dial(t, b.MQTTAddr("tcp"), &paho.Connect{ClientID: "pub", CleanStart: true})
	payload := []byte(strings.Repeat("x", 64<<10))
	bt.WaitFor(t, 60*time.Second, "the stalled stream to be closed", func() bool {
		for range 20 {
			pub.PublishT(t, &paho.Publish{Topic: "slow/x", QoS: 1, Payload: payload})
		}
		return b.Stats().Streams.Slow >= 1
	})
	// The stalled client, reading again, finds its stream cut: the end of
	// the chunked body or of the connection, not a wait.
	_ = conn.SetReadDeadline(time.Now().Add(30 * time.Second))
	if n, err := io.Copy(io.Discard, stalled.Body); err != nil && !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Fatalf("stalled stream not closed after %d bytes: %v (stats %+v)", n, err, b.Stats().Streams)
	}
	// The broker goes on serving streams. The burst above was acked before
	// it was routed: let it be routed first, or its tail arrives live.
	pub.Barrier(t)
	s, _ := bt.OpenSSE(t, eventsURL(b, "topic", "slow/#"), nil)
	s.Until(t, "ready", 5*time.Second)
	pub.PublishT(t, &paho.Publish{Topic: "slow/y", QoS: 1, Payload: []byte("after")})
	if e := envelopeOf(t, s.NextT(t, 5*time.Second)); e.Topic != "slow/y" {
		t.Fatalf("after the slow reader: got %s (id %s, %d bytes), want slow/y", e.Topic, e.ID, len(e.Payload))
	}
	bt.WaitFor(t, 5*time.Second, "the stalled stream to be released", func() bool { return b.Stats().Streams.SSE == 1 })
}

type pollBody struct {
	Messages []envelope `json:"messages"`
	Cursor   string     `json:"cursor"`
	Reset    string     `json:"reset"`
}

func poll(t *testing.T, b *broker.Broker, params ...string) (int, pollBody) {
	t.Helper()
	u := strings.Replace(eventsURL(b, params...), "/events?", "/poll?", 1)
	resp, err := http.Get(u)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var p pollBody
	_ = json.NewDecoder(resp.Body).Decode(&p)
	return resp.StatusCode, p
}

func TestLongPoll(t *testing.T) {
	b := bt.Start(t, bt.Config(t))
	pub := bt.Dial(t, b.MQTTAddr("tcp"), &paho.Connect{ClientID: "pub", CleanStart: true})
	pub.PublishT(t, &paho.Publish{Topic: "p/state", QoS: 1, Retain: true, Payload: []byte("ready")})
	bt.WaitFor(t, 5*time.Second, "recorded", func() bool { return b.Stats().History.Recorded >= 1 })

	code, p := poll(t, b, "topic", "p/#")
	if code != 200 || len(p.Messages) != 1 || !p.Messages[0].Retain || p.Cursor == "" {
		t.Fatalf("first poll: %d %+v", code, p)
	}
	cursor := p.Cursor

	// Nothing new: wait=0 answers at once with the same cursor.
	if code, p := poll(t, b, "topic", "p/#", "cursor", cursor, "wait", "0"); code != 200 || len(p.Messages) != 0 || p.Cursor != cursor {
		t.Fatalf("empty poll: %d %+v", code, p)
	}
	// A waiting poll returns when a message arrives.
	done := make(chan pollBody, 1)
	go func() {
		_, p := poll(t, b, "topic", "p/#", "cursor", cursor, "wait", "30")
		done <- p
	}()
	bt.WaitFor(t, 10*time.Second, "the poll to wait", func() bool { return b.Stats().Streams.Polls == 1 })
	pub.PublishT(t, &paho.Publish{Topic: "p/x", QoS: 1, Payload: []byte("one")})
	select {
	case p = <-done:
	case <-time.After(20 * time.Second):
		t.Fatal("the waiting poll did not return")
	}
	if len(p.Messages) != 1 || p.Messages[0].text(t) != "one" || p.Cursor != p.Messages[0].ID {
		t.Fatalf("woken poll: %+v", p)
	}
	cursor = p.Cursor

	// Missed messages come at once, in pages of limit.
	recorded := b.Stats().History.Recorded
	for _, s := range []string{"two", "three", "four"} {
		pub.PublishT(t, &paho.Publish{Topic: "p/x", QoS: 1, Payload: []byte(s)})
	}
	bt.WaitFor(t, 5*time.Second, "3 recorded", func() bool { return b.Stats().History.Recorded >= recorded+3 })
	_, p = poll(t, b, "topic", "p/#", "cursor", cursor, "limit", "2")
	if len(p.Messages) != 2 || p.Messages[1].text(t) != "three" || p.Cursor != p.Messages[1].ID {
		t.Fatalf("page 1: %+v", p)
	}
	_, p = poll(t, b, "topic", "p/#", "cursor", p.Cursor)
	if len(p.Messages) != 1 || p.Messages[0].text(t) != "four" {
		t.Fatalf("page 2: %+v", p)
	}

	if code, p := poll(t, b, "topic", "p/#", "cursor", "bogus"); code != 200 || p.Reset != "unknown" || len(p.Messages) != 1 || !p.Messages[0].Retain {
		t.Fatalf("bad cursor: %d %+v", code, p)
	}
	for _, bad := range [][]string{{"topic", "p/#", "wait", "600"}, {"topic", "p/#", "wait", "x"}, {"topic", "p/#", "limit", "0"}, {}} {
		if code, _ := poll(t, b, bad...); code != 400 {
			t.Errorf("%v: %d, want 400", bad, code)
		}
	}
}

func TestTopicsLast(t *testing.T) {
	b := bt.Start(t, bt.Config(t))
	pub := bt.Dial(t, b.MQTTAddr("tcp"), &paho.Connect{ClientID: "pub", CleanStart: true})
	pub.PublishT(t, &paho.Publish{Topic: "sensors/a", QoS: 1, Payload: []byte(`{"v":1}`)})
	pub.PublishT(t, &paho.Publish{Topic: "sensors/a", QoS: 0, Payload: []byte(`{"v":2}`)})
	base := "http://" + b.HTTPAddr() + "/api/v1/topics/last?topic="
	var e envelope
	bt.WaitFor(t, 5*time.Second, "the last value", func() bool {
		code, body := api(t, "GET", base+"sensors/a", "", nil)
		if code != 200 {
			return false
		}
		raw, _ := json.Marshal(body)
		_ = json.Unmarshal(raw, &e)
		return string(e.Payload) == `{"v":2}`
	})
	if e.ID == "" || e.Topic != "sensors/a" || e.Encoding != "json" {
		t.Fatalf("last: %+v", e)
	}
	if code, _ := api(t, "GET", base+"sensors/none", "", nil); code != 404 {
		t.Errorf("unknown topic: %d", code)
	}
	if code, body := api(t, "GET", base+"sensors/%2B", "", nil); code != 400 || body["field"] != "topic" {
		t.Errorf("wildcard: %d %v", code, body)
	}
}

func TestPresenceStream(t *testing.T) {
	e := startAuth(t, nil)
	// Registering d1, d2 and off published their presence from the
	// presence goroutine, after Add returned: wait until all three are
	// routed, or they can arrive live after ready.
	waitRecorded(t, e.b, 3)
	ops := token(t, "ops", "ops", time.Hour, nil, []string{"$beacon/presence/#"})
	s, _ := bt.OpenSSE(t, eventsURL(e.b, "topic", "$beacon/presence/#", "access_token", ops), nil)
	before, _ := s.Until(t, "ready", 5*time.Second)
	// Devices added after the start get their first presence message when
	// they first connect; none is online yet.
	for _, ev := range before {
		var p broker.PresenceEvent
		_ = json.Unmarshal(envelopeOf(t, ev).Payload, &p)
		if p.Online {
			t.Errorf("retained presence says online before any connection: %s", ev.Data)
		}
	}
	d1 := bt.Dial(t, e.addr, creds("d1", "d1", e.dev))
	next := func() broker.PresenceEvent {
		t.Helper()
		env := envelopeOf(t, s.NextT(t, 5*time.Second))
		var p broker.PresenceEvent
		if err := json.Unmarshal(env.Payload, &p); err != nil || env.Topic != broker.PresencePrefix+p.Device {
			t.Fatalf("presence message %s %s: %v", env.Topic, env.Payload, err)
		}
		return p
	}
	if p := next(); p.Device != "d1" || !p.Online {
		t.Fatalf("connect: %+v", p)
	}
	code, body := api(t, "GET", "http://"+e.b.HTTPAddr()+"/api/v1/devices?online=true", adminToken, nil)
	if list, _ := body["devices"].([]any); code != 200 || len(list) != 1 {
		t.Fatalf("online devices: %d %v", code, body)
	}
	_ = d1.Disconnect(&paho.Disconnect{})
	if p := next(); p.Device != "d1" || p.Online {
		t.Fatalf("disconnect: %+v", p)
	}
}

func TestSSEDecodedReadings(t *testing.T) {
	e := startAuth(t, func(c *broker.Config) {
		c.Codecs = []broker.CodecRuleConfig{
			{Filter: "devices/+/json", DeviceType: "thermostat", Format: "json"},
			{Filter: "devices/+/frame", Format: "packed", Endian: "little", Fields: []codec.Field{
				{Name: "temperature", Type: "int16", Scale: 0.01, Unit: "°C"},
				{Name: "humidity", Type: "uint8", Scale: 0.5},
			}},
		}
	})
	ops := token(t, "ops", "ops", time.Hour, nil, nil)
	s, _ := bt.OpenSSE(t, eventsURL(e.b, "topic", "devices/#", "access_token", ops), nil)
	s.Until(t, "ready", 5*time.Second)
	d1 := bt.Dial(t, e.addr, creds("d1", "d1", e.dev))                                                   // a thermostat
	d2 := bt.Dial(t, e.addr, creds("d2", "d2", e.dev2))                                                  // no type
	d1.PublishT(t, &paho.Publish{Topic: "devices/d1/frame", QoS: 1, Payload: []byte{0x6d, 0x08, 0x5b}})  // 2157, 91
	d1.PublishT(t, &paho.Publish{Topic: "devices/d1/json", QoS: 1, Payload: []byte(`{"sp":2,"m":"e"}`)}) // thermostats may send 16 bytes
	d2.PublishT(t, &paho.Publish{Topic: "devices/d2/json", QoS: 1, Payload: []byte(`{"setpoint": 5}`)})  // not a thermostat: no codec
	d1.PublishT(t, &paho.Publish{Topic: "devices/d1/frame", QoS: 1, Payload: []byte{0x01}})              // too short: flows raw

	type decodedEnv struct {
		envelope
		Decoded map[string]any    `json:"decoded"`
		Units   map[string]string `json:"units"`
	}
	// Two clients: their messages may be routed in either order.
	got := map[string]decodedEnv{}
	for range 4 {
		var d decodedEnv
		s.NextT(t, 5*time.Second).JSON(t, &d)
		got[d.Topic+" "+string(d.Payload)] = d
	}
	frame := base64.StdEncoding.EncodeToString([]byte{0x6d, 0x08, 0x5b})
	if d := got[`devices/d1/frame "`+frame+`"`]; d.Encoding != "base64" || d.Decoded["temperature"] != 21.57 || d.Decoded["humidity"] != 45.5 ||
		len(d.Units) != 1 || d.Units["temperature"] != "°C" {
		t.Errorf("packed frame: %+v", d)
	}
	if d := got[`devices/d1/json {"sp":2,"m":"e"}`]; d.Decoded["sp"] != 2.0 || len(d.Decoded) != 1 || d.Units != nil {
		t.Errorf("thermostat JSON: %+v", d)
	}
	if d, ok := got[`devices/d2/json {"setpoint":5}`]; !ok || d.Decoded != nil {
		t.Errorf("a rule for another device type decoded: %+v", d)
	}
	if d, ok := got[`devices/d1/frame "AQ=="`]; !ok || d.Decoded != nil {
		t.Errorf("undecodable frame: %+v (all: %v)", d, got)
	}
	_, body := scrape(t, "http://"+e.b.HTTPAddr()+"/metrics", adminToken)
	if !strings.Contains(body, "beacon_codec_failures_total 1") || !strings.Contains(body, "beacon_codec_decoded_total 2") {
		t.Errorf("codec metrics:\n%s", grepLines(body, "beacon_codec"))
	}
}

func grepLines(s, substr string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, substr) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

func TestSSEHeartbeatAndRetryHint(t *testing.T) {
	cfg := bt.Config(t)
	cfg.HTTP.SSEHeartbeat = time.Second
	b := bt.Start(t, cfg)
	resp, err := http.Get(eventsURL(b, "topic", "quiet/#"))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	r := bufio.NewReader(resp.Body)
	var lines []string
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		l, err := r.ReadString('\n')
		if err != nil {
			t.Fatalf("after %q: %v", lines, err)
		}
		lines = append(lines, strings.TrimRight(l, "\n"))
		if strings.HasPrefix(l, ": heartbeat") {
			break
		}
	}
	if lines[0] != "retry: 3000" || !strings.HasPrefix(lines[len(lines)-1], ": heartbeat") {
		t.Fatalf("stream began %q: want the retry hint first and a heartbeat comment when idle", lines)
	}
}

// A device connected when the broker stops is not left "online" in its
// retained presence after the restart.
func TestPresenceCorrectedAtStart(t *testing.T) {
	cfg := bt.Config(t)
	cfg.Auth.AllowAnonymous = true
	b := bt.Start(t, cfg)
	_, secret, err := b.Registry().Add(devices.NewDevice{ID: "p1"})
	if err != nil {
		t.Fatal(err)
	}
	bt.Dial(t, b.MQTTAddr("tcp"), &paho.Connect{ClientID: "p1", CleanStart: true, Username: "p1", UsernameFlag: true,
		Password: []byte(secret), PasswordFlag: true})
	online := func(b *broker.Broker) (bool, bool) {
		var msgs []*engine.Message
		b.Engine().Retained(broker.PresencePrefix+"p1", func(m *engine.Message) bool { msgs = append(msgs, m); return true })
		if len(msgs) != 1 {
			return false, false
		}
		var e broker.PresenceEvent
		_ = json.Unmarshal(msgs[0].Payload, &e)
		return e.Online, true
	}
	bt.WaitFor(t, 5*time.Second, "p1 online", func() bool { on, _ := online(b); return on })
	bt.Stop(t, b)

	b = bt.Start(t, cfg)
	if on, ok := online(b); !ok || on {
		t.Fatalf("after a restart, p1's retained presence: online=%v present=%v", on, ok)
	}
}
