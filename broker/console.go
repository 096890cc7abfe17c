package broker

import (
	"net/http"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/beaconmq/beacon/bridge"
	"github.com/beaconmq/beacon/broker/engine"
	"github.com/beaconmq/beacon/broker/topics"
)

// The operator console's admin API (issue 14): clients, sessions,
// subscriptions, retained messages and rates. Every route needs the admin
// token (or an admin-role JWT).

func (b *Broker) registerConsole(mux *http.ServeMux) {
	req := func(f http.HandlerFunc) http.Handler { return b.admin.Require(f) }
	mux.Handle("GET /api/v1/clients", req(b.listClients))
	mux.Handle("GET /api/v1/clients/{id}", req(b.showClient))
	mux.Handle("DELETE /api/v1/clients/{id}", req(b.kickClient))
	mux.Handle("GET /api/v1/subscriptions", req(b.listSubscriptions))
	mux.Handle("GET /api/v1/retained/{filter...}", req(b.browseRetained))
	mux.Handle("DELETE /api/v1/retained/{topic...}", req(b.deleteRetained))
	mux.Handle("GET /api/v1/stats", req(b.serveStats))
}

type clientJSON struct {
	ID              string     `json:"id"`
	Username        string     `json:"username,omitempty"`
	Device          string     `json:"device,omitempty"`
	Connected       bool       `json:"connected"`
	Remote          string     `json:"remote,omitempty"`
	Transport       string     `json:"transport,omitempty"`
	ProtocolVersion string     `json:"protocol_version"`
	ConnectedSince  *time.Time `json:"connected_since,omitempty"`
	KeepAlive       int        `json:"keep_alive_s"`
	CleanStart      bool       `json:"clean_start"`
	Persistent      bool       `json:"persistent"`
	SessionExpiry   int64      `json:"session_expiry_s"`
	ExpiresAt       *time.Time `json:"expires_at,omitempty"`
	Subscriptions   int        `json:"subscriptions"`
	Inflight        int        `json:"inflight"`
	Queued          int        `json:"queued"`
	MessagesIn      uint64     `json:"messages_in"`
	MessagesOut     uint64     `json:"messages_out"`
	BytesIn         uint64     `json:"bytes_in"`
	BytesOut        uint64     `json:"bytes_out"`
}

type subscriptionJSON struct {
	Client            string `json:"client"`
	Filter            string `json:"filter"`
	Group             string `json:"group,omitempty"`
	QoS               byte   `json:"qos"`
	NoLocal           bool   `json:"no_local,omitempty"`
	RetainAsPublished bool   `json:"retain_as_published,omitempty"`
	RetainHandling    byte   `json:"retain_handling,omitempty"`
	ID                uint32 `json:"subscription_id,omitempty"`
}

func toClientJSON(d engine.ClientDetail) clientJSON {
	v := map[byte]string{3: "3.1", 4: "3.1.1", 5: "5"}[d.ProtocolVersion]
	c := clientJSON{ID: d.ID, Username: d.Username, Device: d.Device, Connected: d.Connected, Remote: d.Remote,
		Transport: d.Listener, ProtocolVersion: v, KeepAlive: int(d.KeepAlive / time.Second), CleanStart: d.CleanStart,
		Persistent: d.Persistent, SessionExpiry: int64(d.SessionExpiry / time.Second), Subscriptions: d.Subscriptions,
		Inflight: d.Inflight, Queued: d.Queued, MessagesIn: d.MessagesIn, MessagesOut: d.MessagesOut,
		BytesIn: d.BytesIn, BytesOut: d.BytesOut}
	if d.Connected {
		t := d.ConnectedAt.UTC()
		c.ConnectedSince = &t
	}
	if !d.ExpiresAt.IsZero() {
		t := d.ExpiresAt.UTC()
		c.ExpiresAt = &t
	}
	return c
}

func toSubscriptionJSON(s topics.Subscription) subscriptionJSON {
	return subscriptionJSON{Client: s.Client, Filter: s.Filter, Group: s.Group, QoS: s.QoS, NoLocal: s.NoLocal,
		RetainAsPublished: s.RetainAsPublished, RetainHandling: s.RetainHandling, ID: s.ID}
}

// page reads limit (default 100, at most 1000) and offset.
func page(w http.ResponseWriter, r *http.Request) (limit, offset int, ok bool) {
	limit, offset = 100, 0
	for _, p := range []struct {
		name string
		v    *int
		max  int
	}{{"limit", &limit, 1000}, {"offset", &offset, 1 << 30}} {
		s := r.URL.Query().Get(p.name)
		if s == "" {
			continue
		}
		n, err := strconv.Atoi(s)
		if err != nil || n < 0 || n > p.max || (p.name == "limit" && n == 0) {
			bridge.WriteJSON(w, http.StatusBadRequest, map[string]string{"error": p.name + " must be a number from " +
				map[string]string{"limit": "1 to 1000", "offset": "0"}[p.name]})
			return 0, 0, false
		}
		*p.v = n
	}
	return limit, offset, true
}

func window[T any](list []T, limit, offset int) []T {
	if offset >= len(list) {
		return []T{}
	}
	return list[offset:min(len(list), offset+limit)]
}

// listClients: GET /api/v1/clients?q=&connected=true|false&limit=&offset=.
// q matches a substring of the client id, user name, device or remote
// address.
func (b *Broker) listClients(w http.ResponseWriter, r *http.Request) {
	limit, offset, ok := page(w, r)
	if !ok {
		return
	}
	q := strings.ToLower(r.URL.Query().Get("q"))
	conn := r.URL.Query().Get("connected")
	if conn != "" && conn != "true" && conn != "false" {
		bridge.WriteJSON(w, http.StatusBadRequest, map[string]string{"error": "connected must be true or false"})
		return
	}
	var out []clientJSON
	for _, d := range b.engine.Clients() {
		if conn != "" && d.Connected != (conn == "true") {
			continue
		}
		if q != "" && !strings.Contains(strings.ToLower(d.ID+"\x00"+d.Username+"\x00"+d.Device+"\x00"+d.Remote), q) {
			continue
		}
		out = append(out, toClientJSON(d))
	}
	bridge.WriteJSON(w, http.StatusOK, map[string]any{"total": len(out), "offset": offset, "clients": window(out, limit, offset)})
}

func (b *Broker) showClient(w http.ResponseWriter, r *http.Request) {
	d, subs, ok := b.engine.Client(r.PathValue("id"))
	if !ok {
		bridge.WriteJSON(w, http.StatusNotFound, map[string]string{"error": "no such client or session"})
		return
	}
	list := make([]subscriptionJSON, 0, len(subs))
	for _, s := range subs {
		list = append(list, toSubscriptionJSON(s))
	}
	bridge.WriteJSON(w, http.StatusOK, map[string]any{"client": toClientJSON(d), "subscriptions": list})
}

// kickClient: DELETE /api/v1/clients/{id}; ?session=true also discards
// the session.
func (b *Broker) kickClient(w http.ResponseWriter, r *http.Request) {
	discard := false
	switch r.URL.Query().Get("session") {
	case "", "false":
	case "true":
		discard = true
	default:
		bridge.WriteJSON(w, http.StatusBadRequest, map[string]string{"error": "session must be true or false"})
		return
	}
	id := r.PathValue("id")
	if !b.engine.Kick(id, discard) {
		bridge.WriteJSON(w, http.StatusNotFound, map[string]string{"error": "no such client or session"})
		return
	}
	b.log.Info("client kicked by an administrator", "client", id, "session_discarded", discard, "remote", r.RemoteAddr)
	w.WriteHeader(http.StatusNoContent)
}

// listSubscriptions: GET /api/v1/subscriptions?client=&filter=&limit=&offset=;
// filter is a topic filter (exact) or, with match=TOPIC, the ones that
// match a topic.
func (b *Broker) listSubscriptions(w http.ResponseWriter, r *http.Request) {
	limit, offset, ok := page(w, r)
	if !ok {
		return
	}
	qv := r.URL.Query()
	filter, match := qv.Get("filter"), qv.Get("match")
	if match != "" && !topics.ValidTopicName(match) {
		bridge.WriteJSON(w, http.StatusBadRequest, map[string]string{"error": "match must be a topic name"})
		return
	}
	var out []subscriptionJSON
	for _, s := range b.engine.Subscriptions(qv.Get("client")) {
		if (filter != "" && s.Filter != filter) || (match != "" && !topics.Match(s.Filter, match)) {
			continue
		}
		out = append(out, toSubscriptionJSON(s))
	}
	bridge.WriteJSON(w, http.StatusOK, map[string]any{"total": len(out), "offset": offset, "subscriptions": window(out, limit, offset)})
}

// browseRetained: GET /api/v1/retained/{filter...} lists the retained
// messages under a topic filter (a topic lists its own; + and # are
// escaped in a URL as %2B and %23), every one, whatever an ACL would let
// a reader see: it is the administrator's view.
func (b *Broker) browseRetained(w http.ResponseWriter, r *http.Request) {
	limit, offset, ok := page(w, r)
	if !ok {
		return
	}
	filter := r.PathValue("filter")
	if _, _, _, ok := topics.ParseShared(filter); !ok || strings.HasPrefix(filter, "$share/") {
		bridge.WriteJSON(w, http.StatusBadRequest, map[string]string{"error": "not a topic filter (escape + and # as %2B and %23)"})
		return
	}
	out := []bridge.Envelope{}
	b.engine.Retained(filter, func(m *engine.Message) bool {
		e := bridge.NewEnvelope(m.Topic, m.Payload, m.QoS, true, m.Created/int64(time.Millisecond))
		if e.Decoded = b.decode(m.Topic, m.Device, m.Payload); e.Decoded != nil {
			e.Units = b.units(m.Topic, m.Device)
		}
		out = append(out, e)
		return true
	})
	sort.Slice(out, func(i, j int) bool { return out[i].Topic < out[j].Topic })
	bridge.WriteJSON(w, http.StatusOK, map[string]any{"total": len(out), "offset": offset, "messages": window(out, limit, offset)})
}

// deleteRetained: DELETE /api/v1/retained/{topic...} clears a retained
// message (an empty retained publish, stored like any other).
func (b *Broker) deleteRetained(w http.ResponseWriter, r *http.Request) {
	topic := r.PathValue("topic")
	if !topics.ValidTopicName(topic) || strings.ContainsAny(topic, "+#") {
		bridge.WriteJSON(w, http.StatusBadRequest, map[string]string{"error": "not a topic name"})
		return
	}
	found := false
	b.engine.Retained(topic, func(*engine.Message) bool { found = true; return false })
	if !found {
		bridge.WriteJSON(w, http.StatusNotFound, map[string]string{"error": "no retained message on that topic"})
		return
	}
	if _, err := b.engine.Publish(&engine.Message{Topic: topic, Retain: true, QoS: 1}); err != nil {
		bridge.WriteJSON(w, http.StatusServiceUnavailable, map[string]string{"error": err.Error()})
		return
	}
	b.log.Info("retained message cleared by an administrator", "topic", topic, "remote", r.RemoteAddr)
	w.WriteHeader(http.StatusNoContent)
}

// sampler keeps a second-by-second history of the counters /metrics
// exports, for rates over 1 s, 1 min and 15 min: read from the same
// registry, so the two never disagree.
type sampler struct {
	g    prometheus.Gatherer
	mu   sync.Mutex
	ring []sample // oldest first, at most ringLen
	stop chan struct{}
	wg   sync.WaitGroup
}

type sample struct {
	at time.Time
	v  map[string]float64
}

const ringLen = 15*60 + 1

func newSampler(g prometheus.Gatherer) *sampler {
	s := &sampler{g: g, stop: make(chan struct{})}
	s.take()
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		t := time.NewTicker(time.Second)
		defer t.Stop()
		for {
			select {
			case <-s.stop:
				return
			case <-t.C:
				s.take()
			}
		}
	}()
	return s
}

func (s *sampler) close() {
	close(s.stop)
	s.wg.Wait()
}

// take adds a sample to the ring, once a second.
func (s *sampler) take() {
	v, ok := s.gather()
	if !ok {
		return
	}
	s.mu.Lock()
	if len(s.ring) == ringLen {
		copy(s.ring, s.ring[1:])
		s.ring = s.ring[:ringLen-1]
	}
	s.ring = append(s.ring, v)
	s.mu.Unlock()
}

// gather reads the registry: each series as name{label=value,...}, and
// each family's sum as its name.
func (s *sampler) gather() (sample, bool) {
	fams, err := s.g.Gather()
	if err != nil && len(fams) == 0 {
		return sample{}, false
	}
	v := map[string]float64{}
	for _, f := range fams {
		name := f.GetName()
		if !strings.HasPrefix(name, "beacon_") {
			continue
		}
		for _, m := range f.GetMetric() {
			var x float64
			switch {
			case m.Counter != nil:
				x = m.Counter.GetValue()
			case m.Gauge != nil:
				x = m.Gauge.GetValue()
			case m.Histogram != nil:
				v[name+"_sum"] += m.Histogram.GetSampleSum()
				v[name+"_count"] += float64(m.Histogram.GetSampleCount())
				continue
			default:
				continue
			}
			v[name] += x
			if len(m.GetLabel()) == 1 {
				v[name+"{"+labelPair(m.GetLabel()[0])+"}"] += x
			}
		}
	}
	return sample{at: time.Now(), v: v}, true
}

func labelPair(l *dto.LabelPair) string { return l.GetName() + "=" + l.GetValue() }

// rates returns, for each window, the per-second rate of each counter
// from the ring's samples up to last (a sample taken now, not kept: a
// request must not shorten the ring's span), and the seconds it covers.
func (s *sampler) rates(last sample, windows []time.Duration, counters []string) (now map[string]float64, out []map[string]float64, spans []float64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, w := range windows {
		// The newest sample at least w older than the last, or the oldest.
		i := sort.Search(len(s.ring), func(i int) bool { return last.at.Sub(s.ring[i].at) < w }) - 1
		first := last
		if len(s.ring) > 0 {
			first = s.ring[max(i, 0)]
		}
		dt := last.at.Sub(first.at).Seconds()
		r := map[string]float64{}
		for _, c := range counters {
			for k, x := range last.v {
				if k == c || strings.HasPrefix(k, c+"{") {
					if dt > 0 {
						r[k] = (x - first.v[k]) / dt
					} else {
						r[k] = 0
					}
				}
			}
		}
		out = append(out, r)
		spans = append(spans, dt)
	}
	return last.v, out, spans
}

// serveStats: GET /api/v1/stats.
func (b *Broker) serveStats(w http.ResponseWriter, _ *http.Request) {
	last, ok := b.stats.gather() // the numbers as of now
	if !ok {
		bridge.WriteJSON(w, http.StatusServiceUnavailable, map[string]string{"error": "metrics unavailable"})
		return
	}
	windows := []time.Duration{time.Second, time.Minute, 15 * time.Minute}
	names := []string{"1s", "1m", "15m"}
	counters := []string{"beacon_messages_received_total", "beacon_messages_sent_total", "beacon_messages_dropped_total",
		"beacon_connects_total", "beacon_auth_failures_total", "beacon_storage_commit_seconds_sum", "beacon_storage_commit_seconds_count"}
	now, rates, spans := b.stats.rates(last, windows, counters)
	out := map[string]any{}
	rateOut := map[string]any{}
	for i, r := range rates {
		dropped := map[string]float64{}
		for k, x := range r {
			if reason, ok := strings.CutPrefix(k, "beacon_messages_dropped_total{reason="); ok {
				dropped[strings.TrimSuffix(reason, "}")] = x
			}
		}
		wr := map[string]any{"window_s": spans[i], "messages_in_per_s": r["beacon_messages_received_total"],
			"messages_out_per_s": r["beacon_messages_sent_total"], "dropped_per_s": r["beacon_messages_dropped_total"],
			"dropped_per_s_by_reason": dropped, "connects_per_s": r["beacon_connects_total"],
			"auth_failures_per_s": r["beacon_auth_failures_total"]}
		if n := r["beacon_storage_commit_seconds_count"]; n > 0 {
			wr["commit_latency_ms"] = 1000 * r["beacon_storage_commit_seconds_sum"] / n
		}
		rateOut[names[i]] = wr
	}
	out["rates"] = rateOut
	conns := map[string]float64{}
	for k, x := range now {
		if t, ok := strings.CutPrefix(k, "beacon_connections{transport="); ok {
			conns[strings.TrimSuffix(t, "}")] = x
		}
	}
	out["connections"] = conns
	out["sessions"] = now["beacon_sessions"]
	out["subscriptions"] = now["beacon_subscriptions"]
	out["retained"] = now["beacon_retained_messages"]
	out["queued"] = now["beacon_inflight_messages"]
	out["totals"] = map[string]float64{"messages_in": now["beacon_messages_received_total"], "messages_out": now["beacon_messages_sent_total"],
		"dropped": now["beacon_messages_dropped_total"]}
	sp := b.db.Space()
	lsm, vlog := b.db.Size()
	out["storage"] = map[string]any{"bytes": lsm + vlog, "free_bytes": sp.Free, "reserve_bytes": sp.Reserve, "space_low": sp.Low}
	out["version"] = Version
	out["uptime_s"] = time.Since(b.started).Seconds()
	bridge.WriteJSON(w, http.StatusOK, out)
}
