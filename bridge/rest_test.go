package bridge

import (
	"encoding/json"
	"errors"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/beaconmq/beacon/broker/topics"
	"github.com/beaconmq/beacon/devices"
)

// fakePublisher is the engine as REST and Streams see it.
type fakePublisher struct {
	retained  []RetainedMessage
	published []RetainedMessage
	fail      error
}

func (f *fakePublisher) Publish(topic string, payload []byte, retain bool, qos byte) error {
	f.published = append(f.published, RetainedMessage{Topic: topic, Payload: payload, QoS: qos})
	return f.fail
}

func (f *fakePublisher) Retained(filter string, fn func(m RetainedMessage) bool) {
	for _, m := range f.retained {
		if topics.Match(filter, m.Topic) && !fn(m) {
			return
		}
	}
}

func openAccess(t *testing.T) *Access {
	t.Helper()
	g, err := NewGuard(GuardOptions{AllowMissingOrigin: true})
	if err != nil {
		t.Fatal(err)
	}
	return &Access{Authorizer: devices.NewAuthorizer(nil), Guard: g, Open: func() bool { return true }}
}

func TestRESTRetained(t *testing.T) {
	created := time.Date(2025, 1, 2, 3, 4, 5, 678_000_000, time.UTC)
	eng := &fakePublisher{retained: []RetainedMessage{
		{Topic: "home/b", Payload: []byte("on"), QoS: 1, Created: created.UnixNano()},
		{Topic: "home/a", Payload: []byte(`{"t":1}`), Created: created.UnixNano()},
		{Topic: "other/x", Payload: []byte("x")},
	}}
	h := &REST{Access: openAccess(t), Engine: eng, MaxBody: 1024, Log: slog.New(slog.DiscardHandler)}
	mux := http.NewServeMux()
	h.Register(mux)
	get := func(filter string) (int, []Envelope) {
		t.Helper()
		rec := httptest.NewRecorder()
		mux.ServeHTTP(rec, httptest.NewRequest("GET", "/api/v1/retained?topic="+url.QueryEscape(filter), nil))
		var body struct{ Messages []Envelope }
		_ = json.Unmarshal(rec.Body.Bytes(), &body)
		return rec.Code, body.Messages
	}
	code, msgs := get("home/#")
	if code != 200 || len(msgs) != 2 || msgs[0].Topic != "home/a" || msgs[1].Topic != "home/b" {
		t.Fatalf("home/#: %d %+v", code, msgs)
	}
	if m := msgs[1]; !m.Retain || m.QoS != 1 || m.TS != created.UnixMilli() || string(m.Payload) != `"on"` {
		t.Errorf("envelope: %+v, want retained, QoS 1, ts %d", m, created.UnixMilli())
	}
	for _, bad := range []string{"", "a/#/b", "a+", "$share/g", "$share//a", "a\x00b"} {
		if code, _ := get(bad); code != 400 {
			t.Errorf("filter %q: %d, want 400", bad, code)
		}
	}
}

func TestRESTPublish(t *testing.T) {
	eng := &fakePublisher{}
	h := &REST{Access: openAccess(t), Engine: eng, MaxBody: 1024, Log: slog.New(slog.DiscardHandler)}
	mux := http.NewServeMux()
	h.Register(mux)
	post := func(body string) int {
		rec := httptest.NewRecorder()
		req := httptest.NewRequest("POST", "/api/v1/publish", strings.NewReader(body))
		req.Header.Set("Content-Type", "application/json")
		mux.ServeHTTP(rec, req)
		return rec.Code
	}
	if code := post(`{"topic":"a/b","payload":"hi","qos":1,"retain":true}`); code != 200 {
		t.Fatalf("publish: %d", code)
	}
	if len(eng.published) != 1 || eng.published[0].Topic != "a/b" || string(eng.published[0].Payload) != "hi" || eng.published[0].QoS != 1 {
		t.Fatalf("published: %+v", eng.published)
	}
	eng.fail = errors.New("disk full")
	if code := post(`{"topic":"a/b","payload":"hi"}`); code != 500 {
		t.Errorf("failed publish: %d, want 500", code)
	}
}

func TestStreamFiltersAndRetained(t *testing.T) {
	eng := &fakePublisher{retained: []RetainedMessage{
		{Topic: "devices/d1/t", Payload: []byte("21"), Device: "d1", Created: 5_000_000},
		{Topic: "devices/d2/t", Payload: []byte("22")},
	}}
	var decodedFor []string
	s := &Streams{Access: openAccess(t), Engine: eng, MaxFilters: 4,
		Decode: func(topic, device string, _ []byte) map[string]any {
			decodedFor = append(decodedFor, topic+"@"+device)
			return nil
		}}
	c := &Caller{Open: true}
	filters := func(q string) (int, []string) {
		rec := httptest.NewRecorder()
		out, _ := s.filters(rec, httptest.NewRequest("GET", "/events?"+q, nil), c)
		return rec.Code, out
	}
	if code, f := filters("topic=devices/%2B/t&topic=devices/d1/t&topic=devices/%2B/t"); code != 200 || len(f) != 2 {
		t.Fatalf("filters: %d %v", code, f)
	}
	for _, bad := range []string{"", "topic=", "topic=a/%23/b", "topic=%24share/g/x", "topic=%24share/g", "topic=a&topic=b&topic=c&topic=d&topic=e"} {
		if code, _ := filters(bad); code != 400 {
			t.Errorf("?%s: %d, want 400", bad, code)
		}
	}
	// Two filters matching one topic list it once; the publishing device picks the codec.
	out := s.retained(c, []string{"devices/#", "devices/d1/t"})
	if len(out) != 2 || out[0].Topic != "devices/d1/t" || out[0].TS != 5 || !out[0].Retain {
		t.Fatalf("retained: %+v", out)
	}
	if strings.Join(decodedFor, " ") != "devices/d1/t@d1 devices/d2/t@" {
		t.Errorf("decoded for %v", decodedFor)
	}
}
