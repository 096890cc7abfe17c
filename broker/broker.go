// Package broker builds a Beacon broker from a Config: the mochi-mqtt
// engine with explicit capabilities, Beacon's hooks, the durable store,
// the MQTT listeners (TCP, TLS) and the HTTP server, and it owns the order
// in which they start and stop.
package broker

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/beaconmq/beacon/bridge"
	"github.com/beaconmq/beacon/broker/cluster"
	"github.com/beaconmq/beacon/broker/engine"
	"github.com/beaconmq/beacon/broker/topics"
	"github.com/beaconmq/beacon/devices"
	"github.com/beaconmq/beacon/devices/codec"
	"github.com/beaconmq/beacon/hooks"
	"github.com/beaconmq/beacon/storage"
)

// connectTimeout is how long a new connection has to send CONNECT.
const connectTimeout = 10 * time.Second

// Broker is a configured, startable Beacon broker.
type Broker struct {
	cfg         Config
	log         *slog.Logger
	engine      *engine.Server
	db          *storage.DB
	msgLog      *storage.Log
	cluster     *cluster.Node   // nil on a single node
	clusterRt   *cluster.Router // with cluster
	state       *clusterState   // what the cluster shares: nil on a single node
	auth        *auth
	history     *hooks.History
	codecs      *codec.Rules
	ha          *hooks.HomeAssistant
	webhooks    *hooks.Webhooks
	metricsHook *hooks.Metrics
	engineLog   *hooks.RateLimitHandler
	presence    *presence
	loaded      engine.LoadStats

	registry *devices.Registry
	authz    *devices.Authorizer
	tokens   *devices.TokenVerifier
	admin    *bridge.Admin
	guard    *bridge.Guard
	access   *bridge.Access
	rest     *bridge.REST
	streams  *bridge.Streams
	ws       *bridge.WS

	listeners []mqttListener
	httpLn    net.Listener
	httpSrv   *http.Server
	pprofSrv  *http.Server

	metrics   *prometheus.Registry
	commitDur prometheus.Histogram
	stats     *sampler  // rates for /api/v1/stats, from metrics
	started   time.Time // when New ran

	ready        atomic.Bool
	shutdownOnce sync.Once
	shutdownErr  error
}

// mqttListener is a bound MQTT listener ("tcp" or "tls").
type mqttListener struct {
	id string
	ln net.Listener
}

// New opens the store, builds the engine and binds every listener. Nothing
// is served until Start.
func New(cfg Config, log *slog.Logger) (_ *Broker, err error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	b := &Broker{cfg: cfg, log: log, metrics: prometheus.NewRegistry(), started: time.Now()}
	b.commitDur = prometheus.NewHistogram(prometheus.HistogramOpts{Name: "beacon_storage_commit_seconds",
		Help:    "Duration of one storage group commit (and its fsync under storage.sync always).",
		Buckets: prometheus.ExponentialBuckets(0.0001, 2.5, 12)})
	b.metrics.MustRegister(b.commitDur, collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	defer func() {
		if err != nil {
			if b.stats != nil {
				b.stats.close()
			}
			b.closeListeners()
			if b.engine != nil {
				_ = b.engine.Shutdown(context.Background())
			}
			if b.cluster != nil {
				_ = b.cluster.Close()
			}
			if b.msgLog != nil {
				_ = b.msgLog.Shutdown(context.Background())
			}
			if b.db != nil {
				_ = b.db.Shutdown(context.Background())
			}
		}
	}()

	minFree, err := storage.ParseReserve(cfg.Storage.MinFree)
	if err != nil {
		return nil, &ConfigError{Key: "storage.min_free", Msg: err.Error()}
	}
	b.db, err = storage.Open(storage.Options{
		Dir:          cfg.Storage.Dir,
		MinFree:      minFree,
		Sync:         cfg.Storage.Sync,
		SyncInterval: cfg.Storage.SyncInterval,
		GCInterval:   cfg.Storage.GCInterval,
		Logger:       log,
		ObserveCommit: func(d time.Duration) {
			b.commitDur.Observe(d.Seconds())
		},
	})
	if err != nil {
		return nil, err
	}
	// The message log: every accepted message once; history.rules say what
	// it keeps for the browsers beyond what sessions still need.
	var rules []storage.LogRule
	for _, r := range cfg.History.Rules {
		rules = append(rules, storage.LogRule{Filter: r.Filter, MaxMessages: r.MaxMessages, MaxAge: r.MaxAge})
	}
	b.msgLog, err = storage.OpenLog(b.db, storage.LogOptions{Rules: rules, MaxIndexBytes: cfg.History.MaxIndexBytes})
	if err != nil {
		return nil, err
	}

	if err := b.setupCluster(); err != nil {
		return nil, err
	}
	if err := b.setupAuth(); err != nil {
		return nil, err
	}
	b.codecs, err = codec.NewRules(cfg.CodecRules())
	if err != nil {
		return nil, &ConfigError{Key: "codecs", Msg: err.Error()}
	}
	b.metricsHook, err = hooks.NewMetrics(b.metrics)
	if err != nil {
		return nil, err
	}
	b.history, err = hooks.NewHistory(hooks.HistoryOptions{Log: b.msgLog, Logger: log.With("component", "history")})
	if err != nil {
		return nil, err
	}
	b.setupClusterRouter()
	// Always built, also with no webhooks: it clears the outbox of removed ones.
	var whs []hooks.WebhookConfig
	for _, w := range cfg.Webhooks {
		retries := w.MaxRetries
		if retries == 0 {
			retries = -1 // max_retries: 0 means none; the hook reads 0 as its default
		}
		whs = append(whs, hooks.WebhookConfig{Name: w.Name, URL: w.URL, Topics: w.Topics, Secret: w.Secret,
			Timeout: w.Timeout, MaxRetries: retries})
	}
	b.webhooks, err = hooks.NewWebhooks(hooks.WebhooksOptions{DB: b.db, Hooks: whs, Encode: b.encodeEnvelope,
		Log: log.With("component", "webhooks")})
	if err != nil {
		return nil, &ConfigError{Key: "webhooks", Msg: err.Error()}
	}

	m := cfg.MQTT
	b.engineLog = hooks.NewRateLimitHandler(log.Handler(), 10*time.Second)
	b.engine = engine.New(engine.Options{
		Limits: engine.Limits{
			MaxPacketSize:    m.MaxPacketSize,
			ReceiveMaximum:   m.ReceiveMaximum,
			MaxQoS:           m.MaxQoS,
			MaxQoSSet:        true,
			NoRetain:         !m.RetainAvailable,
			NoSharedSubs:     !m.SharedSubs,
			TopicAliasMax:    m.MaxTopicAlias,
			MaxTopicLength:   m.MaxTopicLength,
			MaxTopicLevels:   m.MaxTopicLevels,
			KeepaliveMin:     m.KeepaliveMin,
			KeepaliveMax:     m.KeepaliveMax,
			MaxSessionExpiry: m.MaxSessionExpiry,
			MaxMessageExpiry: m.MaxMessageExpiry,
			MaxQueued:        int(m.MaxQueuedMessages),
			OutboundBudget:   int(max(m.OutboundQueue, 1)) * 1024,
			ConnectTimeout:   connectTimeout,
			MaxClients:       int(m.MaxClients),
		},
		Auth:        b.auth,
		Observer:    (*observer)(b),
		Committer:   b.committer(),
		Cluster:     b.engineCluster(),
		Log:         slog.New(b.engineLog).With("component", "mqtt"),
		Version:     Version,
		SysInterval: m.SysInterval,
		Persistence: &engine.Persistence{DB: b.db, Log: b.msgLog, Identities: b.auth},
	})
	b.admin.Kick = func(id string) int {
		b.auth.revoke(id)
		n := b.engine.Disconnect(func(ci *engine.ClientInfo) bool {
			p, ok := ci.Principal.(*principal)
			return ok && p.Device() == id
		}, 0x87, "not authorized")
		if b.streams != nil {
			n += b.streams.KickDevice(id) // streams opened with its old credentials
		}
		return n
	}
	if ha := cfg.HomeAssistant; ha.Discovery {
		b.ha = hooks.NewHomeAssistant(hooks.HomeAssistantOptions{Publish: b.publishInline, Retained: b.retainedMatching,
			Registry: b.registry, Codecs: b.codecs, Prefix: ha.Prefix, StatePrefix: ha.StatePrefix, StatusTopic: ha.StatusTopic,
			Version: Version, Log: log.With("component", "homeassistant")})
		b.registry.OnChange(func(c devices.Change) {
			switch {
			case c.Removed:
				b.ha.Forget(c.Device.ID)
			case c.Added:
				b.ha.Announce(c.Device)
			}
		})
	}
	b.presence = newPresence(b.publishInline, b.retainedPayload, log.With("component", "presence"))
	b.registry.OnChange(b.presenceFilter(b.presence.push))

	b.registerMetrics()

	if m.Addr != "" {
		if err := b.listen("tcp", "mqtt.addr", m.Addr, nil); err != nil {
			return nil, err
		}
	}
	if m.TLSAddr != "" {
		cert, err := tls.LoadX509KeyPair(m.TLSCert, m.TLSKey)
		if err != nil {
			return nil, &ConfigError{Key: "mqtt.tls_cert", Msg: fmt.Sprintf("load key pair: %v", err)}
		}
		tc := &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
		if err := clientCertConfig(tc, m); err != nil {
			return nil, err
		}
		if err := b.listen("tls", "mqtt.tls_addr", m.TLSAddr, tc); err != nil {
			return nil, err
		}
	}
	if cfg.HTTP.Addr != "" {
		if err := b.setupHTTP(); err != nil {
			return nil, err
		}
	}
	// Last: the sampler reads every metric from its own goroutine, some
	// of them through fields set above (b.streams by setupHTTP).
	b.stats = newSampler(b.metrics)
	return b, nil
}

// Version is the broker's version, reported in $SYS/broker/version; cmd
// sets it from the build.
var Version = "dev"

// publishInline routes a message from the broker itself (presence, Home
// Assistant): authorized by the caller, durable when it returns.
func (b *Broker) publishInline(topic string, payload []byte, retain bool, qos byte) error {
	_, err := b.engine.Publish(&engine.Message{Topic: topic, Payload: payload, Retain: retain, QoS: qos})
	return err
}

// retainedMatching calls fn for each retained message matching filter.
func (b *Broker) retainedMatching(filter string, fn func(topic string, payload []byte) bool) {
	b.engine.Retained(filter, func(m *engine.Message) bool { return fn(m.Topic, m.Payload) })
}

// bridgeEngine is the engine as the browser bridges see it.
type bridgeEngine Broker

var _ bridge.Publisher = (*bridgeEngine)(nil)

func (e *bridgeEngine) Publish(topic string, payload []byte, retain bool, qos byte) error {
	return (*Broker)(e).publishInline(topic, payload, retain, qos)
}

func (e *bridgeEngine) Retained(filter string, fn func(m bridge.RetainedMessage) bool) {
	e.engine.Retained(filter, func(m *engine.Message) bool {
		return fn(bridge.RetainedMessage{Topic: m.Topic, Payload: m.Payload, QoS: m.QoS, Device: m.Device, Created: m.Created})
	})
}

// retainedPayload is the retained message of topic, if any.
func (b *Broker) retainedPayload(topic string) ([]byte, bool) {
	var out []byte
	found := false
	b.engine.Retained(topic, func(m *engine.Message) bool {
		out, found = m.Payload, true
		return false
	})
	return out, found
}

func (b *Broker) webhookNames() []string {
	var out []string
	for _, w := range b.cfg.Webhooks {
		out = append(out, w.Name)
	}
	return out
}

func mergeLabels(l prometheus.Labels, k, v string) prometheus.Labels {
	out := prometheus.Labels{k: v}
	for lk, lv := range l {
		out[lk] = lv
	}
	return out
}

// registerMetrics exposes the engine's, the store's and the hooks'
// counters to Prometheus.
func (b *Broker) registerMetrics() {
	gauge := func(name, help string, f func() float64) {
		b.metrics.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: name, Help: help}, f))
	}
	counter := func(name, help string, labels prometheus.Labels, f func() float64) {
		b.metrics.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{Name: name, Help: help, ConstLabels: labels}, f))
	}
	b.metrics.MustRegister(engineCollector{b.engine})
	const dropped = "beacon_messages_dropped_total"
	const droppedHelp = engineDroppedHelp
	counter(dropped, droppedHelp, prometheus.Labels{"reason": "denied"}, func() float64 { return float64(b.auth.stats().DeniedDelivery) })
	counter(dropped, droppedHelp, prometheus.Labels{"reason": "policy"}, func() float64 { return float64(b.auth.stats().PolicyDenied) })
	counter("beacon_auth_failures_total", "Refused CONNECTs (bad credentials, disabled devices, anonymous not allowed).", nil,
		func() float64 { return float64(b.auth.stats().Failures) })
	const throttled = "beacon_auth_throttled_total"
	const throttledHelp = "Authentications refused before their credential was checked, by reason: address (auth.fail_rate_per_ip), global (auth.fail_rate_global), banned (auth.ban_after); every transport."
	thr := func(f func(devices.ThrottleStats) int64) func() float64 {
		return func() float64 { return float64(f(b.auth.stats().Throttle)) }
	}
	counter(throttled, throttledHelp, prometheus.Labels{"reason": "address"}, thr(func(s devices.ThrottleStats) int64 { return s.Throttled }))
	counter(throttled, throttledHelp, prometheus.Labels{"reason": "global"}, thr(func(s devices.ThrottleStats) int64 { return s.ThrottledGlobal }))
	counter(throttled, throttledHelp, prometheus.Labels{"reason": "banned"}, thr(func(s devices.ThrottleStats) int64 { return s.BannedRefused }))
	counter("beacon_auth_bans_total", "Source addresses banned after auth.ban_after failed authentications in a row.", nil,
		thr(func(s devices.ThrottleStats) int64 { return s.Bans }))
	gauge("beacon_auth_banned_addresses", "Source addresses banned now.", func() float64 { return float64(b.auth.stats().Throttle.Banned) })
	const denied = "beacon_acl_denied_total"
	counter(denied, "Actions the ACL refused, by action.", prometheus.Labels{"action": "publish"}, func() float64 { return float64(b.auth.stats().DeniedPublish) })
	counter(denied, "Actions the ACL refused, by action.", prometheus.Labels{"action": "subscribe"}, func() float64 { return float64(b.auth.stats().DeniedSubscribe) })
	counter("beacon_storage_commits_total", "Storage group commits.", nil, func() float64 { return float64(b.db.Stats().Commits) })
	counter("beacon_storage_commit_errors_total", "Failed storage group commits.", nil, func() float64 { return float64(b.db.Stats().CommitErrors) })
	counter("beacon_storage_writes_total", "Storage writes (sets and deletes) committed.", nil, func() float64 { return float64(b.db.Stats().Ops) })
	gauge("beacon_storage_free_bytes", "Free space on the data directory's volume, as last seen.", func() float64 { return float64(b.db.Space().Free) })
	gauge("beacon_storage_reserve_bytes", "Free space the store keeps (storage.min_free); below it new messages and sessions are refused.",
		func() float64 { return float64(b.db.Space().Reserve) })
	gauge("beacon_storage_space_low", "1 while free space is below the reserve.", func() float64 {
		if b.db.Space().Low {
			return 1
		}
		return 0
	})
	counter("beacon_storage_space_refusals_total", "Writes of new data (messages, sessions) refused because free space was below the reserve.", nil,
		func() float64 { return float64(b.db.Space().Refused) })
	gauge("beacon_history_records", "Messages stored in the history.", func() float64 { return float64(b.history.Stats().Stored) })
	counter("beacon_history_recorded_total", "Messages recorded in the history.", nil, func() float64 { return float64(b.history.Stats().Recorded) })
	gauge("beacon_history_index_bytes", "Memory the history's in-memory index holds (retention entries, references, the newest record of each topic); history.max_index_bytes bounds its retention entries.",
		func() float64 { return float64(b.history.Stats().IndexBytes) })
	counter("beacon_history_index_evicted_total", "Records that left retention early because the index reached history.max_index_bytes.", nil,
		func() float64 { return float64(b.history.Stats().IndexEvicted) })
	counter("beacon_history_trimmed_total", "History records removed by retention (history.rules).", nil,
		func() float64 { return float64(b.history.Stats().Trimmed) })
	counter("beacon_history_failed_total", "History records the store failed to commit (delivered live, missing from replays).", nil,
		func() float64 { return float64(b.history.Stats().Failed) })
	streams := func(f func(bridge.StreamStats) int64) func() float64 {
		return func() float64 {
			if b.streams == nil {
				return 0
			}
			return float64(f(b.streams.Stats()))
		}
	}
	counter("beacon_stream_slow_closed_total", "SSE streams and polls ended because the reader fell behind (http.sse_buffer).", nil,
		streams(func(s bridge.StreamStats) int64 { return s.Slow }))
	counter("beacon_stream_resets_total", "Resumes from an unknown, expired or foreign event id, answered with a reset.", nil,
		streams(func(s bridge.StreamStats) int64 { return s.Resets }))
	for _, r := range []string{"principal", "address", "handshake_rate", "connections_per_address"} {
		counter("beacon_stream_refused_total", "SSE streams and polls refused by a limit, by reason: principal (http.sse_max_streams_per_principal), address (http.sse_max_streams_per_ip), handshake_rate (http.handshakes_per_second), connections_per_address (http.max_conns_per_ip).",
			prometheus.Labels{"reason": r}, streams(func(s bridge.StreamStats) int64 { return s.RefusedBy[r] }))
	}
	for _, r := range []string{"handshake_rate", "connections_per_address"} {
		counter("beacon_ws_refused_total", "MQTT-over-WebSocket handshakes refused by a limit, by reason: handshake_rate (http.handshakes_per_second), connections_per_address (http.max_conns_per_ip).",
			prometheus.Labels{"reason": r}, func() float64 {
				if b.ws == nil {
					return 0
				}
				return float64(b.ws.Refused()[r])
			})
	}
	counter("beacon_log_suppressed_total", "Warnings and errors held back by the rate-limited loggers (each distinct message at most once per 10 s; the next one says how many).", nil,
		func() float64 { return float64(b.engineLog.Suppressed() + b.auth.limiter.Suppressed()) })
	counter("beacon_stream_messages_total", "Messages written to SSE streams and polls.", nil,
		streams(func(s bridge.StreamStats) int64 { return s.Delivered }))
	counter("beacon_codec_decoded_total", "Payloads decoded by the codecs.", nil, func() float64 { d, _ := b.codecs.Stats(); return float64(d) })
	counter("beacon_codec_failures_total", "Payloads a codec matched but could not decode (they flow raw).", nil,
		func() float64 { _, f := b.codecs.Stats(); return float64(f) })
	for _, name := range b.webhookNames() {
		stat := func(f func(hooks.WebhookStats) float64) func() float64 {
			return func() float64 {
				for _, s := range b.webhooks.Stats() {
					if s.Name == name {
						return f(s)
					}
				}
				return 0
			}
		}
		l := prometheus.Labels{"webhook": name}
		const outcomes = "beacon_webhook_deliveries_total"
		const help = "Webhook deliveries by outcome: delivered, failed (an attempt that will be retried), dropped (outbox full), expired (retries exhausted)."
		counter(outcomes, help, mergeLabels(l, "outcome", "delivered"), stat(func(s hooks.WebhookStats) float64 { return float64(s.Delivered) }))
		counter(outcomes, help, mergeLabels(l, "outcome", "failed"), stat(func(s hooks.WebhookStats) float64 { return float64(s.Failed) }))
		counter(outcomes, help, mergeLabels(l, "outcome", "dropped"), stat(func(s hooks.WebhookStats) float64 { return float64(s.Dropped) }))
		counter(outcomes, help, mergeLabels(l, "outcome", "expired"), stat(func(s hooks.WebhookStats) float64 { return float64(s.Expired) }))
		b.metrics.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "beacon_webhook_pending", ConstLabels: l,
			Help: "Messages in a webhook's outbox, not yet delivered."}, stat(func(s hooks.WebhookStats) float64 { return float64(s.Pending) })))
	}
	counter("beacon_log_appended_total", "Messages written to the message log.", nil, func() float64 { return float64(b.msgLog.Stats().Appended) })
	gauge("beacon_log_records", "Records in the message log (history and session queues).", func() float64 { return float64(b.msgLog.Stats().Stored) })
	if r := b.clusterRt; r != nil {
		// One Stats per scrape, not one per metric: it counts what the
		// forwarder holds, which is long while a node is behind.
		var smu sync.Mutex
		var snap cluster.Stats
		var snapAt time.Time
		stats := func() cluster.Stats {
			smu.Lock()
			defer smu.Unlock()
			if time.Since(snapAt) > 500*time.Millisecond {
				snap, snapAt = r.Stats(), time.Now()
			}
			return snap
		}
		cs := func(f func(cluster.Stats) float64) func() float64 { return func() float64 { return f(stats()) } }
		gauge("beacon_cluster_redis_up", "1 while Redis answers; 0 while the node serves only its own clients.", func() float64 {
			if b.cluster.Up() {
				return 1
			}
			return 0
		})
		const fwd = "beacon_cluster_forwarded_total"
		const fwdHelp = "Messages sent to other nodes, once per node: durable (QoS 1/2 and retained, through a Redis stream) or live (QoS 0)."
		counter(fwd, fwdHelp, prometheus.Labels{"kind": "durable"}, cs(func(s cluster.Stats) float64 { return float64(s.Forwarded) }))
		counter(fwd, fwdHelp, prometheus.Labels{"kind": "live"}, cs(func(s cluster.Stats) float64 { return float64(s.ForwardedLive) }))
		const recv = "beacon_cluster_received_total"
		const recvHelp = "Messages taken from other nodes: durable or live."
		counter(recv, recvHelp, prometheus.Labels{"kind": "durable"}, cs(func(s cluster.Stats) float64 { return float64(s.Received) }))
		counter(recv, recvHelp, prometheus.Labels{"kind": "live"}, cs(func(s cluster.Stats) float64 { return float64(s.ReceivedLive) }))
		counter("beacon_cluster_live_dropped_total", "QoS 0 messages for other nodes dropped (Redis away or too slow), once per node.", nil,
			cs(func(s cluster.Stats) float64 { return float64(s.LiveDropped) }))
		counter("beacon_cluster_damaged_total", "Messages from other nodes that did not decode (skipped).", nil,
			cs(func(s cluster.Stats) float64 { return float64(s.Damaged) }))
		counter("beacon_cluster_missing_total", "Messages to forward that were no longer in the log.", nil,
			cs(func(s cluster.Stats) float64 { return float64(s.Missing) }))
		gauge("beacon_cluster_pending", "Durable messages held for other nodes: not yet taken by every destination that is up.",
			cs(func(s cluster.Stats) float64 { return float64(s.Pending) }))
		gauge("beacon_cluster_unsent", "Of those, not yet written to Redis (Redis away or behind).",
			cs(func(s cluster.Stats) float64 { return float64(s.Unsent) }))
		const moved = "beacon_cluster_sessions_moved_total"
		const movedHelp = "Persistent sessions that moved between this node and another: in (a client resumed here) or out."
		counter(moved, movedHelp, prometheus.Labels{"direction": "in"}, cs(func(s cluster.Stats) float64 { return float64(s.MovedIn) }))
		counter(moved, movedHelp, prometheus.Labels{"direction": "out"}, cs(func(s cluster.Stats) float64 { return float64(s.MovedOut) }))
		counter("beacon_cluster_session_moves_refused_total", "CONNECTs refused (0x88) because the node holding the session did not hand it over in time.", nil,
			cs(func(s cluster.Stats) float64 { return float64(s.MoveRefused) }))
	}
}

// encodeEnvelope is the JSON body webhooks receive: the browsers'
// envelope, with decoded readings.
func (b *Broker) encodeEnvelope(topic, device string, payload []byte, qos byte, retain bool, ts int64) []byte {
	e := bridge.NewEnvelope(topic, payload, qos, retain, ts)
	e.Decoded = b.decode(topic, device, payload)
	body, _ := json.Marshal(e)
	return body
}

// decode gives the readings of a payload by the codecs, or nil. A payload
// that does not decode still flows raw; it is counted.
func (b *Broker) decode(topic, device string, payload []byte) map[string]any {
	if b.codecs.Len() == 0 {
		return nil
	}
	v, _ := b.codecs.Decode(topic, b.registry.TypeOf(device), payload)
	return v
}

// units are the units the codec of a topic declares, by field.
func (b *Broker) units(topic, device string) map[string]string {
	var out map[string]string
	for _, f := range b.codecs.Fields(topic, b.registry.TypeOf(device)) {
		if f.Unit != "" {
			if out == nil {
				out = map[string]string{}
			}
			out[f.Name] = f.Unit
		}
	}
	return out
}

// setupHTTP binds the HTTP server and builds the browser bridges.
func (b *Broker) setupHTTP() error {
	h := b.cfg.HTTP
	var err error
	b.guard, err = bridge.NewGuard(bridge.GuardOptions{
		AllowedOrigins:     List(h.AllowedOrigins),
		AllowMissingOrigin: h.AllowMissingOrigin,
		TrustedProxies:     List(h.TrustedProxies),
		MaxConnsPerIP:      h.MaxConnsPerIP,
		HandshakesPerSec:   float64(h.HandshakesPerSec),
		HandshakeBurst:     2 * h.HandshakesPerSec,
	})
	if err != nil {
		key := "http.allowed_origins"
		if strings.Contains(err.Error(), "proxy") {
			key = "http.trusted_proxies"
		}
		return &ConfigError{Key: key, Msg: err.Error()}
	}
	if h.WSPath != "" {
		b.ws = bridge.NewWS(bridge.WSOptions{
			Guard:          b.guard,
			Tokens:         b.tokens,
			Throttle:       b.auth.throttle,
			MaxMessageSize: int64(b.cfg.MQTT.MaxPacketSize),
			Log:            b.log.With("component", "ws"),
		})
	}
	ln, err := net.Listen("tcp", h.Addr)
	if err != nil {
		return &ConfigError{Key: "http.addr", Msg: err.Error()}
	}
	if h.TLSCert != "" {
		cert, err := tls.LoadX509KeyPair(h.TLSCert, h.TLSKey)
		if err != nil {
			_ = ln.Close()
			return &ConfigError{Key: "http.tls_cert", Msg: fmt.Sprintf("load key pair: %v", err)}
		}
		ln = tls.NewListener(ln, &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12,
			NextProtos: []string{"http/1.1"}})
	}
	b.httpLn = ln
	b.admin.Guard = b.guard
	b.access = &bridge.Access{
		Authorizer:     b.authz,
		Registry:       b.registry,
		Tokens:         b.tokens,
		Guard:          b.guard,
		Open:           func() bool { return !b.auth.configured() },
		AllowAnonymous: b.cfg.Auth.AllowAnonymous,
		Throttle:       b.auth.throttle,
		Topics:         topics.Limits{MaxLength: b.cfg.MQTT.MaxTopicLength, MaxLevels: b.cfg.MQTT.MaxTopicLevels},
		AdminToken:     b.admin.AdminToken,
	}
	b.rest = &bridge.REST{
		Access:  b.access,
		Engine:  (*bridgeEngine)(b),
		Policy:  devices.MaxPayload{Authorizer: b.authz},
		MaxBody: int64(b.cfg.MQTT.MaxPacketSize),
		Log:     b.log.With("component", "rest"),
	}
	b.streams = &bridge.Streams{
		Access:          b.access,
		History:         b.history,
		Engine:          (*bridgeEngine)(b),
		Heartbeat:       h.SSEHeartbeat,
		Buffer:          h.SSEBuffer,
		MaxFilters:      h.SSEMaxFilters,
		MaxPerPrincipal: h.SSEMaxStreamsPerPrincipal,
		MaxPerIP:        h.SSEMaxStreamsPerIP,
		PollMaxWait:     h.PollMaxWait,
		Track:           b.metricsHook.Stream,
		Decode:          b.decode,
		Units:           b.units,
		Log:             b.log.With("component", "streams"),
	}
	if b.clusterRt != nil {
		b.streams.Cluster = b.clusterRt // event ids resume on any node
	}
	b.history.SetFrame(b.streams.MessageFrame)
	return nil
}

// setupAuth loads the device registry, the rules and the JWT keys, and
// refuses an exposed listener without authentication.
func (b *Broker) setupAuth() error {
	a := b.cfg.Auth
	var err error
	b.registry, err = devices.OpenRegistry(b.db)
	if err != nil {
		return err
	}
	rules := devices.DefaultRules() // least privilege while no rules file is named
	if a.ACLFile != "" {
		if rules, err = devices.LoadRules(a.ACLFile); err != nil {
			return &ConfigError{Key: "auth.acl_file", Msg: err.Error()}
		}
	}
	b.authz = devices.NewAuthorizer(rules)
	if a.JWTConfigured() {
		secret, err := a.JWTSecretValue()
		if err != nil {
			return err
		}
		b.tokens, err = devices.NewTokenVerifier(devices.JWTOptions{
			HS256Secret: []byte(secret), PublicKeyFiles: a.PublicKeyFiles(), JWKSFile: a.JWKSFile,
			Issuer: a.JWTIssuer, Audience: a.JWTAudience,
		})
		if err != nil {
			return &ConfigError{Key: "auth.jwt_public_keys", Msg: err.Error()}
		}
	}
	adminToken, err := a.AdminTokenValue()
	if err != nil {
		return err
	}
	b.admin = &bridge.Admin{Registry: b.registry, Tokens: b.tokens, AdminToken: adminToken, LocalToken: newLocalToken(),
		Reload: b.ReloadACL, Log: b.log.With("component", "admin")}
	b.auth = &auth{registry: b.registry, authz: b.authz, tokens: b.tokens, policy: devices.MaxPayload{Authorizer: b.authz},
		rulesFile: a.ACLFile != "", allowAnonymous: a.AllowAnonymous, failDelay: a.FailDelay,
		log: b.log.With("component", "auth"), limiter: hooks.NewRateLimiter(10 * time.Second),
		clients: map[string]*principal{}, online: map[string]int{}, certIdentity: b.cfg.MQTT.TLSIdentity,
		throttle: devices.NewThrottle(devices.ThrottleOptions{RatePerAddr: a.FailRatePerIP, Burst: a.FailBurst,
			RateGlobal: a.FailRateGlobal, BurstGlobal: a.FailBurstGlobal, BanAfter: a.BanAfter, BanDuration: a.BanDuration})}

	configured := b.tokens != nil || a.ACLFile != "" || b.registry.Len() > 0 || b.clusterHasDevices()
	for _, key := range []struct{ name, addr string }{
		{"mqtt.addr", b.cfg.MQTT.Addr}, {"mqtt.tls_addr", b.cfg.MQTT.TLSAddr}, {"http.addr", b.cfg.HTTP.Addr},
	} {
		if IsLoopback(key.addr) {
			continue
		}
		switch {
		case !configured && !a.AllowAnonymous:
			return &ConfigError{Key: key.name, Msg: fmt.Sprintf("%s is reachable beyond this machine and no authentication is configured: "+
				"register devices (beacon devices add), configure JWT keys (auth.jwt_secret, auth.jwt_public_keys, auth.jwks_file) "+
				"or rules (auth.acl_file), or set auth.allow_anonymous: true to accept anyone", key.addr)}
		case a.AllowAnonymous:
			b.log.Warn("auth.allow_anonymous is set and a listener is reachable beyond this machine: clients without credentials are admitted",
				"addr", key.addr, "rules_decide", configured)
		}
	}
	return nil
}

// ReloadACL re-reads auth.acl_file. A bad file keeps the rules in force
// and returns the error (file, line, rule). Connections are not disturbed.
func (b *Broker) ReloadACL() (int, error) {
	if b.cfg.Auth.ACLFile == "" {
		return 0, errors.New("no auth.acl_file configured")
	}
	rules, err := b.loadRules()
	if err != nil {
		b.log.Error("ACL reload failed; keeping the rules in force", "error", err)
		return 0, err
	}
	b.authz.Set(rules)
	b.log.Info("ACL reloaded", "file", b.cfg.Auth.ACLFile, "rules", len(rules.Rules))
	b.logRules()
	return len(rules.Rules), nil
}

func (b *Broker) listen(id, key, addr string, tc *tls.Config) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return &ConfigError{Key: key, Msg: err.Error()}
	}
	if tc != nil {
		ln = tls.NewListener(ln, tc)
	}
	b.listeners = append(b.listeners, mqttListener{id: id, ln: ln})
	return nil
}

func (b *Broker) closeListeners() {
	for _, l := range b.listeners {
		_ = l.ln.Close()
	}
	if b.httpLn != nil {
		_ = b.httpLn.Close()
	}
}

// Start restores the stored state, then serves MQTT and HTTP. It returns
// once everything accepts connections.
func (b *Broker) Start() error {
	started := time.Now()
	if err := b.loadCluster(); err != nil {
		return err
	}
	st, err := b.engine.Load()
	if err != nil {
		return fmt.Errorf("restore state: %w", err)
	}
	b.loaded = st
	b.log.Info("state restored", "sessions", st.Sessions, "subscriptions", st.Subscriptions,
		"queued", st.Queued, "inflight", st.Inflight, "retained", st.Retained, "expired_sessions", st.Expired,
		"wills", st.Wills, "missing", st.Missing, "damaged", st.Damaged, "log_records", b.msgLog.Stats().Stored,
		"took", time.Since(started).Round(time.Millisecond))
	if st.Missing > 0 || st.Damaged > 0 {
		b.log.Warn("some stored records could not be restored", "missing_log_records", st.Missing, "damaged_records", st.Damaged)
	}
	up, err := b.upgradeOldStore()
	if err != nil {
		return fmt.Errorf("read the records of an earlier version: %w", err)
	}
	if up.Retained > 0 {
		b.log.Info("retained messages carried over from an earlier version's store", "retained", up.Retained)
	}
	if up.Sessions > 0 {
		b.log.Warn("sessions stored by an earlier version (before Beacon's own engine) are not restored: their clients start clean",
			"sessions", up.Sessions)
	}
	b.logRules()
	b.startClusterState()
	b.startCluster()
	b.presence.start(b.registry)
	if b.ha != nil {
		b.ha.Start()
	}
	b.webhooks.Start()

	for _, l := range b.listeners {
		go func() { _ = b.engine.Serve(l.ln, l.id) }()
		b.log.Info("mqtt listening", "listener", l.id, "addr", l.ln.Addr().String())
	}
	if b.ws != nil {
		b.ws.Serve(b.engine)
	}
	if b.httpLn != nil {
		b.httpSrv = &http.Server{
			Handler:           b.httpHandler(),
			ReadHeaderTimeout: 10 * time.Second,
			ErrorLog:          slog.NewLogLogger(b.log.Handler(), slog.LevelDebug),
		}
		go func() {
			if err := b.httpSrv.Serve(b.httpLn); err != nil && !errors.Is(err, http.ErrServerClosed) {
				b.log.Error("http server", "error", err)
			}
		}()
		if err := b.writeLocalAdmin(); err != nil { // before the line below: once it is logged, the CLI finds the broker
			b.log.Warn("the CLI will not find this broker: local admin file not written", "error", err)
		}
		b.log.Info("http listening", "addr", b.httpLn.Addr().String(), "tls", b.cfg.HTTP.TLSCert != "", "ws_path", b.cfg.HTTP.WSPath)
	}
	if addr := b.cfg.HTTP.PprofAddr; addr != "" {
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			return &ConfigError{Key: "http.pprof_addr", Msg: err.Error()}
		}
		mux := http.NewServeMux()
		mux.HandleFunc("/debug/pprof/", pprof.Index)
		mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
		mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
		mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
		mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
		b.pprofSrv = &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
		go func() { _ = b.pprofSrv.Serve(ln) }()
		b.log.Info("pprof listening", "addr", ln.Addr().String())
	}
	b.warnExposure()
	b.ready.Store(true)
	b.log.Info("beacon ready", b.urls()...)
	return nil
}

// urls are where to connect, as slog key-value pairs: mqtt, mqtts,
// dashboard, websocket (those that are on).
func (b *Broker) urls() []any {
	var kv []any
	for _, l := range b.listeners {
		scheme := "mqtt"
		if l.id == "tls" {
			scheme = "mqtts"
		}
		kv = append(kv, scheme, scheme+"://"+l.ln.Addr().String())
	}
	if b.httpLn != nil {
		web, ws := "http", "ws"
		if b.cfg.HTTP.TLSCert != "" {
			web, ws = "https", "wss"
		}
		if b.cfg.HTTP.Dashboard {
			kv = append(kv, "dashboard", web+"://"+b.httpLn.Addr().String()+"/")
		}
		if b.ws != nil {
			kv = append(kv, "websocket", ws+"://"+b.httpLn.Addr().String()+b.cfg.HTTP.WSPath)
		}
	}
	return kv
}

func (b *Broker) warnExposure() {
	for _, a := range []string{b.cfg.MQTT.Addr, b.cfg.MQTT.TLSAddr, b.cfg.HTTP.Addr} {
		if !IsLoopback(a) {
			return // setupAuth has said what it had to
		}
	}
	if !b.auth.configured() {
		b.log.Info("listening on loopback only, every client anonymous; to expose Beacon configure authentication " +
			"(docs/security.md) and set mqtt.addr / http.addr, e.g. 0.0.0.0:1883")
	}
}

func (b *Broker) httpHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		bridge.WriteJSON(w, http.StatusOK, map[string]string{"status": "ok"})
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, _ *http.Request) {
		if !b.ready.Load() {
			bridge.WriteJSON(w, http.StatusServiceUnavailable, map[string]string{"status": "not ready"})
			return
		}
		if b.cluster != nil {
			if ok, why := b.cluster.Ready(); !ok {
				// Serving its own clients, but cut off from the others.
				bridge.WriteJSON(w, http.StatusServiceUnavailable, map[string]string{"status": "not ready", "reason": why})
				return
			}
		}
		if sp := b.db.Space(); sp.Low {
			// Serving, but refusing new messages: a balancer sends new
			// clients elsewhere.
			bridge.WriteJSON(w, http.StatusServiceUnavailable, map[string]string{"status": "not ready",
				"reason": (&storage.SpaceError{Free: sp.Free, Reserve: sp.Reserve}).Error() + " (storage.min_free)"})
			return
		}
		bridge.WriteJSON(w, http.StatusOK, map[string]string{"status": "ready"})
	})
	mux.Handle("/api/v1/", b.admin.Handler())
	mux.HandleFunc("GET /api/v1/devices", b.admin.Devices(b.access))
	mux.Handle("GET /api/v1/webhooks", b.admin.Require(b.webhooks.Handler()))
	mux.Handle("GET /api/v1/backup", b.admin.Require(http.HandlerFunc(b.serveBackup)))
	b.registerConsole(mux)
	b.rest.Register(mux)
	b.streams.Register(mux)
	mux.Handle("GET /metrics", b.admin.Protect(promhttp.HandlerFor(b.metrics, promhttp.HandlerOpts{})))
	if b.ws != nil {
		mux.Handle(b.cfg.HTTP.WSPath, b.ws)
	}
	if b.cfg.HTTP.Dashboard {
		mux.Handle("/", bridge.Dashboard()) // every path nothing else claims: the page's files, or 404
	}
	return mux
}

// serveBackup streams a consistent backup of the store (beacon backup).
// An error after the first byte cuts the stream short, which a restore
// detects (gzip's checksum and length).
func (b *Broker) serveBackup(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "application/octet-stream")
	w.Header().Set("Content-Disposition", fmt.Sprintf(`attachment; filename="beacon-%s.backup"`, time.Now().UTC().Format("20060102T150405Z")))
	began := time.Now()
	n, err := b.db.Backup(w, Version)
	if err != nil {
		b.log.Error("backup failed", "remote", r.RemoteAddr, "bytes", n, "error", err)
		panic(http.ErrAbortHandler) // the client sees a broken stream, not a short backup that ended cleanly
	}
	b.log.Info("backup served", "remote", r.RemoteAddr, "bytes", n, "took", time.Since(began).Round(time.Millisecond))
}

// MQTTAddr is the bound address of the listener with the given id ("tcp"
// or "tls"), or "".
func (b *Broker) MQTTAddr(id string) string {
	for _, l := range b.listeners {
		if l.id == id {
			return l.ln.Addr().String()
		}
	}
	return ""
}

// HTTPAddr is the bound HTTP address, or "".
func (b *Broker) HTTPAddr() string {
	if b.httpLn == nil {
		return ""
	}
	return b.httpLn.Addr().String()
}

// Registry is the device registry.
func (b *Broker) Registry() *devices.Registry { return b.registry }

// Engine is the MQTT engine.
func (b *Broker) Engine() *engine.Server { return b.engine }

// Stats are counters for tests and operators.
type Stats struct {
	Engine  engine.Stats
	Loaded  engine.LoadStats // what the last start restored
	Auth    AuthStats
	Storage storage.Stats
	Log     storage.LogStats
	// QueueLimitDrops counts QoS 1/2 messages not queued for a session
	// because it already held mqtt.max_queued_messages.
	QueueLimitDrops int64
	History         hooks.HistoryStats
	Streams         bridge.StreamStats
}

// Stats returns the broker's counters.
func (b *Broker) Stats() Stats {
	es := b.engine.Stats()
	st := Stats{Engine: es, Loaded: b.loaded, Storage: b.db.Stats(), Log: b.msgLog.Stats(), Auth: b.auth.stats(),
		QueueLimitDrops: es.Dropped[engine.DropQueueLimit], History: b.history.Stats()}
	if b.streams != nil {
		st.Streams = b.streams.Stats()
	}
	return st
}

// Shutdown stops accepting connections, disconnects clients with "server
// shutting down", commits and closes the store. It is idempotent; ctx
// bounds the whole stop.
func (b *Broker) Shutdown(ctx context.Context) error {
	b.shutdownOnce.Do(func() {
		b.ready.Store(false)
		b.removeLocalAdmin()
		var errs []error
		if b.pprofSrv != nil {
			_ = b.pprofSrv.Close()
		}
		if b.streams != nil {
			b.streams.Close() // the HTTP server waits for open streams
		}
		if b.httpSrv != nil {
			if err := b.httpSrv.Shutdown(ctx); err != nil {
				errs = append(errs, fmt.Errorf("http: %w", err))
				_ = b.httpSrv.Close() // a request still running (a slow backup download) ends now
			}
		} else if b.httpLn != nil {
			_ = b.httpLn.Close()
		}
		b.leaveClusterState(ctx)
		b.presence.stop()
		if b.ha != nil {
			b.ha.Shutdown()
		}
		if err := b.engine.Shutdown(ctx); err != nil {
			errs = append(errs, fmt.Errorf("mqtt: clients did not finish: %w", err))
		}
		if b.ws != nil {
			if err := b.ws.Shutdown(ctx); err != nil { // after the engine: v5 clients got their DISCONNECT
				errs = append(errs, fmt.Errorf("websocket: %w", err))
			}
		}
		b.closeListeners() // for a broker that was never started
		if err := b.history.Shutdown(ctx); err != nil {
			errs = append(errs, err)
		}
		if err := b.webhooks.Shutdown(ctx); err != nil {
			errs = append(errs, err)
		}
		b.stopCluster()
		if err := b.msgLog.Shutdown(ctx); err != nil {
			errs = append(errs, err)
		}
		b.stats.close()
		if err := b.db.Shutdown(ctx); err != nil {
			errs = append(errs, err)
		}
		b.shutdownErr = errors.Join(errs...)
	})
	return b.shutdownErr
}

// observer hears the engine's events for metrics, device presence and the
// extensions (history, Home Assistant).
type observer Broker

var (
	_ engine.Observer       = (*observer)(nil)
	_ engine.SendObserver   = (*observer)(nil)
	_ engine.NumberObserver = (*observer)(nil)
)

// Unrouted: a moved-in session's queued message took seq; the history
// delivers nothing of it, and does not wait for it.
func (o *observer) Unrouted(seq uint64) { o.history.Skip(seq) }

func (o *observer) Connected(ci *engine.ClientInfo) {
	o.metricsHook.Connected(ci.Listener)
	o.auth.connected(ci)
	(*Broker)(o).clusterConnChanged(ci)
	o.logConnected(ci)
}

func (o *observer) Disconnected(ci *engine.ClientInfo, err error) {
	o.metricsHook.Disconnected(ci.Listener, engine.DisconnectReason(err))
	o.auth.disconnected(ci)
	(*Broker)(o).clusterConnChanged(ci)
	o.logDisconnected(ci, err)
}

func (o *observer) Routed(m *engine.Message, _ int) {
	if m.Client != "" && !m.FromNode() { // counted once in the cluster: where it was accepted
		o.metricsHook.Received(m.QoS, len(m.Payload))
	}
	hm := hooks.Message{Seq: m.Seq, Topic: m.Topic, Payload: m.Payload, QoS: m.QoS, Retain: m.Retain,
		Client: m.Client, Device: m.Device, Time: m.Created, Origin: m.Origin()}
	o.history.Feed(&hm)
	if o.ha != nil && !m.FromNode() { // the node that accepted it announces its readings
		o.ha.Observe(&hm)
	}
}

func (o *observer) Dropped(engine.DropReason, string, *engine.Message) {}

func (o *observer) Sent(m *engine.Message, qos byte, live bool) {
	latency := time.Duration(-1)
	if live && m.Created > 0 {
		latency = time.Since(time.Unix(0, m.Created))
	}
	o.metricsHook.Sent(qos, len(m.Payload), latency)
}

// committer joins the webhook outbox to the write that accepts a message.
type committer Broker

// committer is the engine's Committer: none without webhooks, so a
// broker without them does no per-message work for them.
func (b *Broker) committer() engine.Committer {
	if len(b.cfg.Webhooks) == 0 {
		return nil
	}
	return (*committer)(b)
}

func (c *committer) Prepare(m *engine.Message) []storage.Op {
	return c.webhooks.Prepare(c.hookMessage(m))
}

func (c *committer) Committed(m *engine.Message, err error) {
	c.webhooks.Committed(c.hookMessage(m), err)
}

func (c *committer) hookMessage(m *engine.Message) *hooks.Message {
	return &hooks.Message{Seq: m.Seq, Topic: m.Topic, Payload: m.Payload, QoS: m.QoS, Retain: m.Retain,
		Client: m.Client, Device: m.Device, Time: m.Created}
}
