package brokertest

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"
)

// Event is one server-sent event.
type Event struct {
	ID   string // "" when the event has no id line
	Name string // "message" when the event has no event line
	Data string
}

// JSON decodes the event's data into v.
func (e Event) JSON(t testing.TB, v any) {
	t.Helper()
	if err := json.Unmarshal([]byte(e.Data), v); err != nil {
		t.Fatalf("event %q data %q: %v", e.Name, e.Data, err)
	}
}

// SSE is an open server-sent events stream, parsed as the HTML standard
// says (comments skipped, multi-line data joined).
type SSE struct {
	Resp   *http.Response
	events chan Event
	errc   chan error
	cancel context.CancelFunc
}

// OpenSSE requests url with header and, on 200, starts reading events.
// A non-200 response is returned with its body unread and a nil stream.
func OpenSSE(t testing.TB, url string, header http.Header) (*SSE, *http.Response) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	req, err := http.NewRequestWithContext(ctx, "GET", url, nil)
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	for k, v := range header {
		req.Header[k] = v
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		cancel()
		t.Fatalf("GET %s: %v", url, err)
	}
	if resp.StatusCode != http.StatusOK {
		t.Cleanup(func() { resp.Body.Close(); cancel() })
		return nil, resp
	}
	s := &SSE{Resp: resp, events: make(chan Event, 1<<16), errc: make(chan error, 1), cancel: cancel}
	go s.read()
	t.Cleanup(s.Close)
	return s, resp
}

func (s *SSE) read() {
	defer close(s.events)
	sc := bufio.NewScanner(s.Resp.Body)
	sc.Buffer(make([]byte, 64<<10), 4<<20)
	var ev Event
	var data []string
	for sc.Scan() {
		line := sc.Text()
		if line == "" {
			if len(data) > 0 {
				ev.Data = strings.Join(data, "\n")
				if ev.Name == "" {
					ev.Name = "message"
				}
				s.events <- ev
			}
			ev, data = Event{}, nil
			continue
		}
		if strings.HasPrefix(line, ":") {
			continue
		}
		field, value, _ := strings.Cut(line, ":")
		value = strings.TrimPrefix(value, " ")
		switch field {
		case "id":
			ev.ID = value
		case "event":
			ev.Name = value
		case "data":
			data = append(data, value)
		}
	}
	s.errc <- sc.Err()
}

// ErrEnded is returned by Next once the stream has ended.
var ErrEnded = errors.New("stream ended")

// Next returns the next event, or ErrEnded, or an error after timeout.
func (s *SSE) Next(timeout time.Duration) (Event, error) {
	select {
	case ev, ok := <-s.events:
		if !ok {
			return Event{}, ErrEnded
		}
		return ev, nil
	case <-time.After(timeout):
		return Event{}, fmt.Errorf("no event within %s", timeout)
	}
}

// NextT is Next that fails the test on an error.
func (s *SSE) NextT(t testing.TB, timeout time.Duration) Event {
	t.Helper()
	ev, err := s.Next(timeout)
	if err != nil {
		t.Fatal(err)
	}
	return ev
}

// Until reads events until one named name, returning those before it and
// it.
func (s *SSE) Until(t testing.TB, name string, timeout time.Duration) (before []Event, ev Event) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		ev, err := s.Next(time.Until(deadline))
		if err != nil {
			t.Fatalf("waiting for event %q after %d events: %v", name, len(before), err)
		}
		if ev.Name == name {
			return before, ev
		}
		before = append(before, ev)
	}
}

// Close ends the stream from the client's side.
func (s *SSE) Close() {
	s.cancel()
	s.Resp.Body.Close()
}
