package bridge

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"net/http"
	"net/netip"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/beaconmq/beacon/broker/topics"
	"github.com/beaconmq/beacon/devices"
	"github.com/beaconmq/beacon/hooks"
	"github.com/beaconmq/beacon/storage"
)

// Streams serves the browser feeds: the SSE stream GET /events, the
// long-poll GET /poll and GET /api/v1/topics/last. Each feed is a watch on
// the broker's history: retained messages first (for a new reader), or a
// replay of what the reader missed (for one that resumes from an id), then
// live messages, with no gap and no duplicate between replay and live.
type Streams struct {
	*Access
	History *hooks.History
	Engine  Retainer // the retained messages
	// Cluster, on a node of a cluster, makes event ids cluster cursors
	// that resume on any node (cursor.go); nil on a single node.
	Cluster ClusterHistory

	Heartbeat       time.Duration // comment sent on an idle stream
	Retry           time.Duration // reconnection delay suggested to EventSource
	Buffer          int           // messages buffered per feed before it is ended as too slow
	MaxFilters      int           // filters per feed
	MaxPerPrincipal int           // open feeds per user or device; 0 = unlimited
	MaxPerIP        int           // open feeds per client address; 0 = unlimited
	PollMaxWait     time.Duration // longest wait a poll may ask for
	WriteTimeout    time.Duration // a write to a stuck client gives up after this
	// Decode, when set, gives the decoded fields of a payload for the
	// envelope (the codec for the topic and the publishing device, "" when
	// not a device).
	Decode func(topic, device string, payload []byte) map[string]any
	// Units, when set, gives the units the codec declares for the decoded
	// fields of a topic (and publishing device).
	Units func(topic, device string) map[string]string
	// Track, when set, is told of feeds opening (+1) and closing (-1) by
	// transport ("sse", "poll"), for the connection metrics.
	Track func(transport string, delta int)
	Log   *slog.Logger

	mu    sync.Mutex
	byKey map[string]int
	byIP  map[netip.Addr]int
	kicks map[string]map[*context.CancelFunc]struct{}
	done  chan struct{}
	once  sync.Once

	sseOpen  atomic.Int64
	pollOpen atomic.Int64
	opened   atomic.Int64
	slow     atomic.Int64
	resets   atomic.Int64
	// unansweredAt (unix ns) and unansweredSuppressed rate-limit the
	// warning of nodes that did not answer a replay.
	unansweredAt, unansweredSuppressed atomic.Int64
	refused                            atomic.Int64
	delivered                          atomic.Int64
	// refusals by reason: the per-principal and per-address stream limits,
	// and the Guard's handshake rate and connections per address.
	refusedPrincipal, refusedAddr, refusedRate, refusedConns atomic.Int64
}

// Register adds the routes to mux.
func (s *Streams) Register(mux *http.ServeMux) {
	s.done = make(chan struct{})
	s.byKey = map[string]int{}
	s.byIP = map[netip.Addr]int{}
	s.kicks = map[string]map[*context.CancelFunc]struct{}{}
	if s.WriteTimeout == 0 {
		s.WriteTimeout = 10 * time.Second
	}
	if s.Retry == 0 {
		s.Retry = 3 * time.Second
	}
	mux.HandleFunc("GET /events", s.events)
	mux.HandleFunc("OPTIONS /events", s.preflight)
	mux.HandleFunc("GET /poll", s.poll)
	mux.HandleFunc("OPTIONS /poll", s.preflight)
	mux.HandleFunc("GET /api/v1/topics/last", s.last)
	mux.HandleFunc("GET /api/v1/history", s.history)
}

// Close ends every open stream and poll (before the HTTP server shuts
// down, which waits for them).
func (s *Streams) Close() {
	s.once.Do(func() {
		if s.done != nil {
			close(s.done)
		}
	})
}

// KickDevice ends every stream and poll of a device (disabled, removed or
// given a new secret): it authenticated with credentials no longer valid.
func (s *Streams) KickDevice(id string) int {
	key := string(devices.DeviceKind) + ":" + id
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for cancel := range s.kicks[key] {
		(*cancel)()
		n++
	}
	return n
}

// StreamStats are the feeds' counters.
type StreamStats struct {
	SSE       int64 // open SSE streams
	Polls     int64 // polls waiting
	Opened    int64 // feeds opened since start
	Slow      int64 // feeds ended because the reader fell behind
	Resets    int64 // resumes refused with a reset (unknown, expired or foreign id)
	Refused   int64 // feeds refused by any limit (the sum of RefusedBy)
	Delivered int64 // messages written to feeds
	// RefusedBy counts refusals by reason: "principal"
	// (http.sse_max_streams_per_principal), "address"
	// (http.sse_max_streams_per_ip), "handshake_rate"
	// (http.handshakes_per_second), "connections_per_address"
	// (http.max_conns_per_ip).
	RefusedBy map[string]int64
}

// Stats returns the counters.
func (s *Streams) Stats() StreamStats {
	return StreamStats{SSE: s.sseOpen.Load(), Polls: s.pollOpen.Load(), Opened: s.opened.Load(), Slow: s.slow.Load(),
		Resets: s.resets.Load(), Refused: s.refused.Load(), Delivered: s.delivered.Load(),
		RefusedBy: map[string]int64{"principal": s.refusedPrincipal.Load(), "address": s.refusedAddr.Load(),
			"handshake_rate": s.refusedRate.Load(), "connections_per_address": s.refusedConns.Load()}}
}

func (s *Streams) track(transport string, delta int) {
	if s.Track != nil {
		s.Track(transport, delta)
	}
}

// cors answers a cross-origin request from an allowed origin (Caller has
// refused the others) so the browser lets the page read the response.
func (s *Streams) cors(w http.ResponseWriter, r *http.Request) {
	origin := r.Header.Get("Origin")
	if origin == "" {
		return
	}
	w.Header().Set("Access-Control-Allow-Origin", origin)
	w.Header().Set("Access-Control-Allow-Credentials", "true")
	w.Header().Set("Access-Control-Expose-Headers", "Beacon-Last-Event-ID")
	w.Header().Add("Vary", "Origin")
}

// preflight answers CORS preflights from allowed origins only.
func (s *Streams) preflight(w http.ResponseWriter, r *http.Request) {
	if r.Header.Get("Origin") == "" {
		fail(w, http.StatusForbidden, "a CORS preflight needs an Origin header")
		return
	}
	if !s.Guard.CheckOrigin(r) {
		fail(w, http.StatusForbidden, s.Guard.OriginRefusal(r))
		return
	}
	s.cors(w, r)
	w.Header().Set("Access-Control-Allow-Methods", "GET")
	w.Header().Set("Access-Control-Allow-Headers", "Authorization, Last-Event-ID, Cache-Control")
	w.Header().Set("Access-Control-Max-Age", "600")
	w.WriteHeader(http.StatusNoContent)
}

// filters reads and authorizes the topic parameters.
func (s *Streams) filters(w http.ResponseWriter, r *http.Request, c *Caller) ([]string, bool) {
	raw := r.URL.Query()["topic"]
	if len(raw) == 0 {
		WriteJSON(w, http.StatusBadRequest, apiError{Error: "name at least one topic filter: ?topic=devices/%2B/telemetry", Field: "topic"})
		return nil, false
	}
	if len(raw) > s.MaxFilters {
		WriteJSON(w, http.StatusBadRequest, apiError{Error: "more than " + strconv.Itoa(s.MaxFilters) + " topic filters (http.sse_max_filters)", Field: "topic"})
		return nil, false
	}
	seen := map[string]bool{}
	var out []string
	for _, f := range raw {
		// A stream is no member of a share group: "$share/..." is refused.
		if _, _, shared, ok := topics.ParseShared(f); !ok || shared {
			WriteJSON(w, http.StatusBadRequest, apiError{Error: "not a topic filter: " + strconv.Quote(f), Field: "topic"})
			return nil, false
		}
		if err := s.Topics.Check(f); err != nil {
			WriteJSON(w, http.StatusBadRequest, apiError{Error: err.Error(), Field: "topic"})
			return nil, false
		}
		if !c.Allowed(s.Authorizer, devices.Subscribe, f) {
			WriteJSON(w, http.StatusForbidden, apiError{Error: "not authorized to subscribe to " + strconv.Quote(f), Field: "topic"})
			return nil, false
		}
		if !seen[f] {
			seen[f] = true
			out = append(out, f)
		}
	}
	return out, true
}

// acquire counts a feed (transport "sse" or "poll") against the
// per-principal and per-address limits, and in the gauges. The context it
// returns ends with the request, or when Kick ends the caller's feeds.
func (s *Streams) acquire(w http.ResponseWriter, r *http.Request, c *Caller, transport string) (ctx context.Context, release func(), ok bool) {
	open := &s.sseOpen
	if transport == "poll" {
		open = &s.pollOpen
	}
	addr := s.Guard.ClientAddr(r).Addr()
	key := c.Key()
	s.mu.Lock()
	defer s.mu.Unlock()
	switch {
	case key != "" && s.MaxPerPrincipal > 0 && s.byKey[key] >= s.MaxPerPrincipal:
		s.refused.Add(1)
		s.refusedPrincipal.Add(1)
		fail(w, http.StatusTooManyRequests, "too many open streams for this principal (http.sse_max_streams_per_principal)")
		return nil, nil, false
	case s.MaxPerIP > 0 && s.byIP[addr] >= s.MaxPerIP:
		s.refused.Add(1)
		s.refusedAddr.Add(1)
		fail(w, http.StatusTooManyRequests, "too many open streams from this address (http.sse_max_streams_per_ip)")
		return nil, nil, false
	}
	ctx, cancel := context.WithCancel(r.Context())
	if key != "" {
		s.byKey[key]++
		if s.kicks[key] == nil {
			s.kicks[key] = map[*context.CancelFunc]struct{}{}
		}
		s.kicks[key][&cancel] = struct{}{}
	}
	s.byIP[addr]++
	s.opened.Add(1)
	open.Add(1)
	s.track(transport, 1)
	var once sync.Once
	return ctx, func() {
		once.Do(func() {
			cancel()
			open.Add(-1)
			s.track(transport, -1)
			s.mu.Lock()
			defer s.mu.Unlock()
			if key != "" {
				if s.byKey[key]--; s.byKey[key] <= 0 {
					delete(s.byKey, key)
				}
				delete(s.kicks[key], &cancel)
				if len(s.kicks[key]) == 0 {
					delete(s.kicks, key)
				}
			}
			if s.byIP[addr]--; s.byIP[addr] <= 0 {
				delete(s.byIP, addr)
			}
		})
	}, true
}

// matcher returns a function telling whether a topic matches any filter.
func matcher(filters []string) func(string) bool {
	split := make([][]string, len(filters))
	for i, f := range filters {
		split[i] = strings.Split(f, "/")
	}
	return func(topic string) bool {
		levels := strings.Split(topic, "/")
		for _, f := range split {
			if devices.Matches(f, levels) {
				return true
			}
		}
		return false
	}
}

// resume parses the position a reader resumes from. reset is the reason
// it cannot, or "".
func (s *Streams) resume(id string, filters []string) (seq uint64, reset string) {
	seq, err := s.History.ParseID(id)
	if err == nil {
		err = s.History.CanReplay(seq, filters)
	}
	var re *hooks.ErrReset
	if errors.As(err, &re) {
		s.resets.Add(1)
		return 0, re.Reason
	}
	return seq, ""
}

// retained lists the retained messages under filters the caller may read,
// by topic.
func (s *Streams) retained(c *Caller, filters []string) []Envelope {
	seen := map[string]bool{}
	var out []Envelope
	for _, f := range filters {
		s.Engine.Retained(f, func(m RetainedMessage) bool {
			if !seen[m.Topic] && c.Allowed(s.Authorizer, devices.Read, m.Topic) {
				seen[m.Topic] = true
				out = append(out, s.envelope("", m.Topic, m.Device, m.Payload, m.QoS, true, m.Created/int64(time.Millisecond)))
			}
			return true
		})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Topic < out[j].Topic })
	return out
}

func (s *Streams) envelope(id, topic, device string, payload []byte, qos byte, retain bool, ts int64) Envelope {
	e := NewEnvelope(topic, payload, qos, retain, ts)
	e.ID = id
	if s.Decode != nil {
		e.Decoded = s.Decode(topic, device, payload)
		if e.Decoded != nil && s.Units != nil {
			e.Units = s.Units(topic, device)
		}
	}
	return e
}

func (s *Streams) recordEnvelope(rec *hooks.Record) Envelope {
	// Retain is what a live MQTT subscriber sees: false. Only the snapshot
	// of retained messages is marked retained.
	return s.envelope(s.messageID(rec), rec.Topic, rec.Device, rec.Payload, rec.QoS, false, rec.TS)
}

// messageID is the id of a record in its envelope: its event id on a
// single node; in a cluster its identity there, the same on every node
// (the event id is the reader's cursor).
func (s *Streams) messageID(rec *hooks.Record) string {
	switch {
	case s.Cluster == nil:
		return s.History.EventID(rec.Seq)
	case rec.Origin != "":
		return rec.Origin
	default:
		return storage.Identity(s.Cluster.ID(), s.History.Epoch(), rec.Seq)
	}
}

// position is the event id of a reader at seq of this log (a single
// node) or at its cursor (a cluster).
func (s *Streams) position(f *clusterFeed, seq uint64) string {
	if f != nil {
		return f.cur.String()
	}
	return s.History.EventID(seq)
}

// sseWriter writes events to one stream.
type sseWriter struct {
	w       http.ResponseWriter
	rc      *http.ResponseController
	timeout time.Duration
	ended   <-chan struct{} // the watch ended: write no more
	buf     bytes.Buffer
}

func (sw *sseWriter) event(id, name string, data any) error {
	b, err := json.Marshal(data) // one line: Marshal compacts embedded JSON
	if err != nil {
		return err
	}
	if id != "" {
		sw.buf.WriteString("id: ")
		sw.buf.WriteString(id)
		sw.buf.WriteByte('\n')
	}
	sw.buf.WriteString("event: ")
	sw.buf.WriteString(name)
	sw.buf.WriteString("\ndata: ")
	sw.buf.Write(b)
	sw.buf.WriteString("\n\n")
	return nil
}

func (sw *sseWriter) comment(text string) {
	sw.buf.WriteString(": ")
	sw.buf.WriteString(text)
	sw.buf.WriteString("\n\n")
}

// flush sends what is buffered, within the write timeout.
func (sw *sseWriter) flush() error {
	if sw.buf.Len() == 0 {
		return nil
	}
	_ = sw.rc.SetWriteDeadline(time.Now().Add(sw.timeout))
	select {
	case <-sw.ended:
		return errors.New("feed ended")
	default:
	}
	_, err := sw.w.Write(sw.buf.Bytes())
	sw.buf.Reset()
	if err == nil {
		err = sw.rc.Flush()
	}
	return err
}

// events serves GET /events?topic=F...: an SSE stream.
func (s *Streams) events(w http.ResponseWriter, r *http.Request) {
	c, ok := s.Caller(w, r, true)
	if !ok {
		return
	}
	filters, ok := s.filters(w, r, c)
	if !ok {
		return
	}
	admitted, code, reason := s.Guard.Admit(s.Guard.ClientAddr(r).Addr())
	if admitted == nil {
		s.refused.Add(1)
		if RefusalLabel(reason) == "handshake_rate" {
			s.refusedRate.Add(1)
		} else {
			s.refusedConns.Add(1)
		}
		fail(w, code, reason)
		return
	}
	defer admitted()
	ctx, release, ok := s.acquire(w, r, c, "sse")
	if !ok {
		return
	}
	defer release()

	lastID := r.Header.Get("Last-Event-ID")
	if lastID == "" {
		lastID = r.URL.Query().Get("last_event_id")
	}
	watch := s.History.Watch(filters, s.Buffer)
	defer watch.Stop()
	defer func() {
		// Ended for falling behind, whether it noticed from the feed or
		// from a write that timed out meanwhile.
		if watch.Overflowed() {
			s.slow.Add(1)
			s.Log.Debug("sse stream too slow: closed", "remote", s.Guard.ClientAddr(r).String(), "buffer", s.Buffer)
		}
	}()
	var from uint64
	var feed *clusterFeed
	reset, replay := "", lastID != ""
	switch {
	case s.Cluster != nil:
		feed, replay, reset = s.newFeed(lastID, watch.From)
	case lastID != "":
		from, reset = s.resume(lastID, filters)
		replay = reset == ""
	}

	h := w.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-cache")
	h.Set("X-Accel-Buffering", "no")
	s.cors(w, r)
	if reset != "" {
		h.Set("Beacon-Last-Event-ID", s.position(feed, watch.From))
	}
	w.WriteHeader(http.StatusOK)
	sw := &sseWriter{w: w, rc: http.NewResponseController(w), timeout: s.WriteTimeout, ended: watch.Ended()}
	// A reader that fell behind is cut at once, even in the middle of a
	// write to it that is blocked.
	handlerDone := make(chan struct{})
	defer close(handlerDone)
	go func() {
		select {
		case <-watch.Ended():
			_ = sw.rc.SetWriteDeadline(time.Now())
		case <-handlerDone:
		}
	}()
	sw.buf.WriteString("retry: " + strconv.FormatInt(s.Retry.Milliseconds(), 10) + "\n\n")

	if reset != "" {
		_ = sw.event("", "reset", map[string]string{"reason": reset, "last_event_id": s.position(feed, watch.From)})
	}
	var notReplayed []string
	if feed != nil && replay {
		var werr error
		resets, err := s.replay(ctx, feed, filters, watch.From, func(rec *hooks.Record, id string) bool {
			s.writeRecordID(sw, c, rec, id)
			if sw.buf.Len() >= 64<<10 {
				werr = sw.flush()
			}
			return werr == nil
		})
		if err != nil || werr != nil {
			if err != nil && ctx.Err() == nil {
				s.Log.Error("sse replay", "error", err)
			}
			return
		}
		for _, nr := range resets {
			_ = sw.event("", "reset", map[string]string{"reason": nr.Reason, "node": nr.Node, "last_event_id": feed.cur.String()})
		}
		notReplayed = s.unrecorded(filters)
		for _, e := range s.retained(c, notReplayed) {
			_ = sw.event("", "message", e)
		}
	}
	if feed == nil && replay {
		var werr error
		err := s.History.Replay(ctx, from, watch.From, filters, matcher(filters), func(rec *hooks.Record) bool {
			s.writeRecord(sw, c, rec)
			if sw.buf.Len() >= 64<<10 {
				werr = sw.flush()
			}
			return werr == nil
		})
		var re *hooks.ErrReset
		switch {
		case errors.As(err, &re):
			// Retention caught up with the position between the check
			// above and the replay's snapshot: a reset all the same.
			s.resets.Add(1)
			reset = re.Reason
			_ = sw.event("", "reset", map[string]string{"reason": reset, "last_event_id": s.History.EventID(watch.From)})
		case err != nil || werr != nil:
			if err != nil && ctx.Err() == nil {
				s.Log.Error("sse replay", "error", err)
			}
			return
		default:
			// Filters no history rule wholly records cannot be replayed:
			// their retained messages come again, and the ready event
			// names them.
			notReplayed = s.unrecorded(filters)
			for _, e := range s.retained(c, notReplayed) {
				_ = sw.event("", "message", e)
			}
		}
	}
	if lastID == "" || reset != "" {
		for _, e := range s.retained(c, filters) {
			_ = sw.event("", "message", e)
		}
	}
	ready := s.position(feed, watch.From)
	_ = sw.event(ready, "ready", readyEvent{LastEventID: ready, NotReplayed: notReplayed})
	if sw.flush() != nil {
		return
	}

	var expired <-chan time.Time
	if !c.P.Expires.IsZero() {
		t := time.NewTimer(time.Until(c.P.Expires))
		defer t.Stop()
		expired = t.C
	}
	heartbeat := time.NewTicker(s.Heartbeat)
	defer heartbeat.Stop()
	for {
		select {
		case rec, ok := <-watch.C():
			if !ok {
				return // overflowed (counted below) or shutting down
			}
			s.writeLive(sw, c, feed, rec)
			// Take what else is waiting, then write once.
		drain:
			for sw.buf.Len() < 64<<10 {
				select {
				case rec, ok := <-watch.C():
					if !ok {
						break drain // seen again, and handled, above
					}
					s.writeLive(sw, c, feed, rec)
				default:
					break drain
				}
			}
			if sw.flush() != nil {
				return
			}
			heartbeat.Reset(s.Heartbeat)
		case <-heartbeat.C:
			sw.comment("heartbeat")
			if sw.flush() != nil {
				return
			}
		case <-expired:
			_ = sw.event("", "error", apiError{Error: "token expired"})
			_ = sw.flush()
			return
		case <-ctx.Done():
			return
		case <-s.done:
			return
		}
	}
}

func (s *Streams) writeRecord(sw *sseWriter, c *Caller, rec *hooks.Record) {
	s.writeRecordID(sw, c, rec, "")
}

// writeLive writes a live record: in a cluster after moving the reader's
// cursor over it (and not at all if the replay had it).
func (s *Streams) writeLive(sw *sseWriter, c *Caller, f *clusterFeed, rec *hooks.Record) {
	if f == nil {
		s.writeRecord(sw, c, rec)
		return
	}
	if id, ok := f.live(rec); ok {
		s.writeRecordID(sw, c, rec, id)
	}
}

// writeRecordID writes a record's message event; id is its event id in
// a cluster (the frame and envelope then carry none of their own).
func (s *Streams) writeRecordID(sw *sseWriter, c *Caller, rec *hooks.Record, id string) {
	if !c.Allowed(s.Authorizer, devices.Read, rec.Topic) {
		return // a wildcard never leaks a denied topic
	}
	switch {
	case rec.Frame != nil:
		if id != "" {
			sw.buf.WriteString("id: ")
			sw.buf.WriteString(id)
			sw.buf.WriteByte('\n')
		}
		sw.buf.Write(rec.Frame) // encoded once for every stream (MessageFrame)
	case id != "":
		_ = sw.event(id, "message", s.recordEnvelope(rec))
	default:
		e := s.recordEnvelope(rec)
		_ = sw.event(e.ID, "message", e)
	}
	s.delivered.Add(1)
}

// MessageFrame is the SSE message event of a live record, the same bytes
// for every stream that may read it: the history makes it once per
// record (hooks.History.SetFrame), so a thousand streams cost one
// envelope, one codec decode and one JSON encoding per message.
func (s *Streams) MessageFrame(rec *hooks.Record) []byte {
	e := s.recordEnvelope(rec)
	id := e.ID
	if s.Cluster != nil {
		id = "" // each reader's cursor: writeRecordID
	}
	var sw sseWriter
	if sw.event(id, "message", e) != nil {
		return nil
	}
	return sw.buf.Bytes()
}

// pollResponse is the body of a long-poll.
type pollResponse struct {
	Messages    []Envelope `json:"messages"`
	Cursor      string     `json:"cursor"`                 // pass as cursor= on the next poll
	Reset       string     `json:"reset,omitempty"`        // why the cursor given could not be resumed from
	NotReplayed []string   `json:"not_replayed,omitempty"` // filters no history rule records: their retained messages are included instead
	// ResetNodes, in a cluster, are the nodes whose messages after the
	// cursor were not replayed, and why.
	ResetNodes []nodeReset `json:"reset_nodes,omitempty"`
}

// readyEvent is the data of the ready event.
type readyEvent struct {
	LastEventID string   `json:"last_event_id"`
	NotReplayed []string `json:"not_replayed,omitempty"` // filters no history rule records: their retained messages were sent instead
}

// unrecorded lists the filters that no history rule records wholly.
func (s *Streams) unrecorded(filters []string) []string {
	var out []string
	for _, f := range filters {
		if !s.History.Records(f) {
			out = append(out, f)
		}
	}
	return out
}

// poll serves GET /poll?topic=F...&cursor=ID&wait=25: the messages after
// the cursor at once if there are any, else the first ones to arrive
// within wait seconds.
func (s *Streams) poll(w http.ResponseWriter, r *http.Request) {
	c, ok := s.Caller(w, r, true)
	if !ok {
		return
	}
	filters, ok := s.filters(w, r, c)
	if !ok {
		return
	}
	q := r.URL.Query()
	wait := min(25*time.Second, s.PollMaxWait)
	if v := q.Get("wait"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 0 || time.Duration(n)*time.Second > s.PollMaxWait {
			WriteJSON(w, http.StatusBadRequest, apiError{Error: "wait must be 0.." + strconv.Itoa(int(s.PollMaxWait/time.Second)) + " seconds (http.poll_max_wait)", Field: "wait"})
			return
		}
		wait = time.Duration(n) * time.Second
	}
	limit := 1000
	if v := q.Get("limit"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 || n > 1000 {
			WriteJSON(w, http.StatusBadRequest, apiError{Error: "limit must be 1..1000", Field: "limit"})
			return
		}
		limit = n
	}
	ctx, release, ok := s.acquire(w, r, c, "poll")
	if !ok {
		return
	}
	defer release()
	s.cors(w, r)

	watch := s.History.Watch(filters, s.Buffer)
	defer watch.Stop()
	defer func() {
		if watch.Overflowed() {
			s.slow.Add(1)
		}
	}()
	resp := pollResponse{Messages: []Envelope{}}
	cursor := q.Get("cursor")
	var from uint64
	var feed *clusterFeed
	replay := cursor != ""
	switch {
	case s.Cluster != nil:
		feed, replay, resp.Reset = s.newFeed(cursor, watch.From)
	case cursor != "":
		from, resp.Reset = s.resume(cursor, filters)
		replay = resp.Reset == ""
	}
	resp.Cursor = s.position(feed, watch.From)
	if resp.Reset != "" {
		w.Header().Set("Beacon-Last-Event-ID", resp.Cursor)
	}
	if feed != nil && replay {
		full := false
		resets, err := s.replay(ctx, feed, filters, watch.From, func(rec *hooks.Record, id string) bool {
			if len(resp.Messages) == limit {
				full = true
				return false
			}
			if c.Allowed(s.Authorizer, devices.Read, rec.Topic) {
				resp.Messages = append(resp.Messages, s.recordEnvelope(rec))
			}
			resp.Cursor = id
			return true
		})
		if err != nil {
			if ctx.Err() == nil {
				s.Log.Error("poll replay", "error", err)
				fail(w, http.StatusServiceUnavailable, "history unavailable")
			}
			return
		}
		if !full {
			resp.Cursor = feed.cur.String()
			resp.ResetNodes = resets
			resp.NotReplayed = s.unrecorded(filters)
			resp.Messages = append(resp.Messages, s.retained(c, resp.NotReplayed)...)
		}
	}
	if feed == nil && replay {
		full := false
		err := s.History.Replay(ctx, from, watch.From, filters, matcher(filters), func(rec *hooks.Record) bool {
			if len(resp.Messages) == limit {
				full = true
				return false
			}
			if c.Allowed(s.Authorizer, devices.Read, rec.Topic) {
				resp.Messages = append(resp.Messages, s.recordEnvelope(rec))
			}
			resp.Cursor = s.History.EventID(rec.Seq)
			return true
		})
		var re *hooks.ErrReset
		switch {
		case errors.As(err, &re):
			s.resets.Add(1)
			resp.Reset = re.Reason
			resp.Messages, resp.Cursor = resp.Messages[:0], s.History.EventID(watch.From)
			w.Header().Set("Beacon-Last-Event-ID", resp.Cursor)
		case err != nil:
			if ctx.Err() == nil {
				s.Log.Error("poll replay", "error", err)
				fail(w, http.StatusServiceUnavailable, "history unavailable")
			}
			return
		case !full:
			resp.Cursor = s.History.EventID(watch.From)
			// As for SSE: what no rule records comes as retained.
			resp.NotReplayed = s.unrecorded(filters)
			resp.Messages = append(resp.Messages, s.retained(c, resp.NotReplayed)...)
		}
	}
	if cursor == "" || resp.Reset != "" {
		resp.Messages = append(resp.Messages, s.retained(c, filters)...)
	}
	if len(resp.Messages) == 0 && resp.Reset == "" && wait > 0 {
		s.waitPoll(ctx, c, watch, feed, wait, limit, &resp)
	}
	s.delivered.Add(int64(len(resp.Messages)))
	WriteJSON(w, http.StatusOK, resp)
}

// waitPoll waits for the first readable messages of watch and takes what
// else is ready with them.
func (s *Streams) waitPoll(ctx context.Context, c *Caller, watch *hooks.Watch, f *clusterFeed, wait time.Duration, limit int, resp *pollResponse) {
	timer := time.NewTimer(wait)
	defer timer.Stop()
	take := func(rec *hooks.Record) {
		id := ""
		if f == nil {
			id = s.History.EventID(rec.Seq)
		} else if id, _ = f.live(rec); id == "" {
			return // the replay had it
		}
		if c.Allowed(s.Authorizer, devices.Read, rec.Topic) {
			resp.Messages = append(resp.Messages, s.recordEnvelope(rec))
		}
		resp.Cursor = id
	}
	for len(resp.Messages) == 0 {
		select {
		case rec, ok := <-watch.C():
			if !ok {
				return // overflowed or shutting down: the cursor is still right
			}
			take(rec)
		case <-timer.C:
			return
		case <-ctx.Done():
			return
		case <-s.done:
			return
		}
	}
	for len(resp.Messages) < limit {
		select {
		case rec, ok := <-watch.C():
			if !ok {
				return
			}
			take(rec)
		default:
			return
		}
	}
}

// last serves GET /api/v1/topics/last?topic=T: the newest recorded
// message on a topic.
func (s *Streams) last(w http.ResponseWriter, r *http.Request) {
	c, ok := s.Caller(w, r, false)
	if !ok {
		return
	}
	topic := r.URL.Query().Get("topic")
	if !topics.ValidTopicName(topic) {
		WriteJSON(w, http.StatusBadRequest, apiError{Error: "topic must be a topic name (no wildcards)", Field: "topic"})
		return
	}
	if err := s.Topics.Check(topic); err != nil {
		WriteJSON(w, http.StatusBadRequest, apiError{Error: err.Error(), Field: "topic"})
		return
	}
	if !c.Allowed(s.Authorizer, devices.Read, topic) {
		WriteJSON(w, http.StatusForbidden, apiError{Error: "not authorized to read " + strconv.Quote(topic), Field: "topic"})
		return
	}
	rec, found, err := s.History.Last(r.Context(), topic)
	switch {
	case err != nil:
		s.Log.Error("topics/last", "error", err)
		fail(w, http.StatusServiceUnavailable, "history unavailable")
	case !found:
		WriteJSON(w, http.StatusNotFound, apiError{Error: "nothing recorded on " + strconv.Quote(topic) + " (see history.rules)", Field: "topic"})
	default:
		WriteJSON(w, http.StatusOK, s.recordEnvelope(rec))
	}
}
