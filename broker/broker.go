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
	"math"
	"net"
	"net/http"
	"net/http/pprof"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/beaconmq/beacon/bridge"
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
	mqtt        *mqtt.Server
	db          *storage.DB
	store       *hooks.Store
	drops       *hooks.Drops
	auth        *hooks.Auth
	history     *hooks.History
	codecs      *codec.Rules
	ha          *hooks.HomeAssistant
	webhooks    *hooks.Webhooks
	metricsHook *hooks.Metrics
	presence    *presence

	registry *devices.Registry
	authz    *devices.Authorizer
	tokens   *devices.TokenVerifier
	admin    *bridge.Admin
	guard    *bridge.Guard
	access   *bridge.Access
	rest     *bridge.REST
	streams  *bridge.Streams
	ws       *bridge.WS

	listeners []*tcpListener
	httpLn    net.Listener
	httpSrv   *http.Server
	pprofSrv  *http.Server

	metrics   *prometheus.Registry
	commitDur prometheus.Histogram

	ready        atomic.Bool
	shutdownOnce sync.Once
	shutdownErr  error
}

// New opens the store, builds the engine and binds every listener. Nothing
// is served until Start.
func New(cfg Config, log *slog.Logger) (_ *Broker, err error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	b := &Broker{cfg: cfg, log: log, metrics: prometheus.NewRegistry()}
	b.commitDur = prometheus.NewHistogram(prometheus.HistogramOpts{Name: "beacon_storage_commit_seconds",
		Help:    "Duration of one storage group commit (and its fsync under storage.sync always).",
		Buckets: prometheus.ExponentialBuckets(0.0001, 2.5, 12)})
	b.metrics.MustRegister(b.commitDur, collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	defer func() {
		if err != nil {
			b.closeListeners()
			if b.history != nil {
				_ = b.history.Shutdown(context.Background())
			}
			if b.db != nil {
				_ = b.db.Shutdown(context.Background())
			}
		}
	}()

	b.db, err = storage.Open(storage.Options{
		Dir:          cfg.Storage.Dir,
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

	if err := b.setupAuth(); err != nil {
		return nil, err
	}

	m := cfg.MQTT
	caps := mqtt.NewDefaultServerCapabilities()
	caps.MaximumClients = m.MaxClients
	if caps.MaximumClients == 0 {
		caps.MaximumClients = math.MaxInt64
	}
	caps.MaximumMessageExpiryInterval = int64(m.MaxMessageExpiry / time.Second)
	caps.MaximumClientWritesPending = m.OutboundQueue
	caps.MaximumSessionExpiryInterval = uint32(m.MaxSessionExpiry / time.Second)
	caps.MaximumPacketSize = m.MaxPacketSize
	caps.ReceiveMaximum = m.ReceiveMaximum
	caps.MaximumInflight = m.MaxQueuedMessages
	caps.TopicAliasMaximum = m.MaxTopicAlias
	caps.SharedSubAvailable = boolByte(m.SharedSubs)
	caps.RetainAvailable = boolByte(m.RetainAvailable)
	caps.MaximumQos = m.MaxQoS
	caps.MinimumProtocolVersion = 3
	caps.WildcardSubAvailable = 1
	caps.SubIDAvailable = 1

	engineLog := slog.New(hooks.NewRateLimitHandler(log.Handler(), 10*time.Second)).With("component", "mqtt")
	b.mqtt = mqtt.New(&mqtt.Options{
		Capabilities:           caps,
		Logger:                 engineLog,
		SysTopicResendInterval: int64(m.SysInterval / time.Second),
		InlineClient:           true, // used to route recovered messages and wills, and by the bridges
	})

	// Order matters: the store comes last so that a publish any other hook
	// rejects is never written to the ingress log.
	if err := b.mqtt.AddHook(hooks.NewLimits(hooks.LimitsOptions{
		Server:            b.mqtt,
		KeepaliveMin:      uint16(m.KeepaliveMin / time.Second),
		KeepaliveMax:      uint16(m.KeepaliveMax / time.Second),
		MaxPacketSize:     m.MaxPacketSize,
		TopicAliasMaximum: m.MaxTopicAlias,
	}), nil); err != nil {
		return nil, err
	}
	b.metricsHook, err = hooks.NewMetrics(b.metrics)
	if err != nil {
		return nil, err
	}
	if err := b.mqtt.AddHook(b.metricsHook, nil); err != nil { // before auth: it stamps arrival times
		return nil, err
	}
	b.auth = hooks.NewAuth(hooks.AuthOptions{
		Server:         b.mqtt,
		Registry:       b.registry,
		Authorizer:     b.authz,
		Tokens:         b.tokens,
		Policy:         devices.MaxPayload{Authorizer: b.authz},
		RulesFile:      cfg.Auth.ACLFile != "",
		AllowAnonymous: cfg.Auth.AllowAnonymous,
		FailDelay:      cfg.Auth.FailDelay,
	})
	if err := b.mqtt.AddHook(b.auth, nil); err != nil {
		return nil, err
	}
	b.admin.Kick = func(id string) int {
		n := b.auth.Kick(id)
		if b.streams != nil {
			n += b.streams.KickDevice(id) // streams opened with its old credentials
		}
		return n
	}
	b.drops = hooks.NewDrops()
	if err := b.mqtt.AddHook(b.drops, nil); err != nil {
		return nil, err
	}
	var rules []hooks.HistoryRule
	for _, r := range cfg.History.Rules {
		rules = append(rules, hooks.HistoryRule{Filter: r.Filter, MaxMessages: r.MaxMessages, MaxAge: r.MaxAge})
	}
	b.codecs, err = codec.NewRules(cfg.CodecRules())
	if err != nil {
		return nil, &ConfigError{Key: "codecs", Msg: err.Error()}
	}
	b.history, err = hooks.NewHistory(hooks.HistoryOptions{DB: b.db, Rules: rules, Log: log.With("component", "history"),
		Publisher: b.auth.DeviceOf})
	if err != nil {
		return nil, err
	}
	// Before the store: its record is queued before the store deletes the
	// message from the ingress log.
	if err := b.mqtt.AddHook(b.history, nil); err != nil {
		return nil, err
	}
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
		DeviceOf: b.auth.DeviceOf, Log: log.With("component", "webhooks")})
	if err != nil {
		return nil, &ConfigError{Key: "webhooks", Msg: err.Error()}
	}
	if err := b.mqtt.AddHook(b.webhooks, nil); err != nil { // before the store, as the history
		return nil, err
	}
	b.store = hooks.NewStore(hooks.StoreOptions{
		DB:               b.db,
		MaxSessionExpiry: caps.MaximumSessionExpiryInterval,
		Server:           b.mqtt,
		Identity:         b.auth,
	})
	if err := b.mqtt.AddHook(b.store, nil); err != nil {
		return nil, err
	}
	if ha := cfg.HomeAssistant; ha.Discovery {
		b.ha = hooks.NewHomeAssistant(hooks.HomeAssistantOptions{Server: b.mqtt, Registry: b.registry, Codecs: b.codecs,
			DeviceOf: b.auth.DeviceOf, Prefix: ha.Prefix, StatePrefix: ha.StatePrefix, StatusTopic: ha.StatusTopic, Log: log.With("component", "homeassistant")})
		if err := b.mqtt.AddHook(b.ha, nil); err != nil {
			return nil, err
		}
		b.registry.OnChange(func(c devices.Change) {
			switch {
			case c.Removed:
				b.ha.Forget(c.Device.ID)
			case c.Added:
				b.ha.Announce(c.Device)
			}
		})
	}
	b.presence = newPresence(b.mqtt, log.With("component", "presence"))
	b.registry.OnChange(b.presence.push)

	b.registerMetrics()

	if m.Addr != "" {
		if err := b.listen("tcp", "tcp", "mqtt.addr", m.Addr, nil); err != nil {
			return nil, err
		}
	}
	if m.TLSAddr != "" {
		cert, err := tls.LoadX509KeyPair(m.TLSCert, m.TLSKey)
		if err != nil {
			return nil, &ConfigError{Key: "mqtt.tls_cert", Msg: fmt.Sprintf("load key pair: %v", err)}
		}
		tc := &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
		if err := b.listen("tls", "tls", "mqtt.tls_addr", m.TLSAddr, tc); err != nil {
			return nil, err
		}
	}
	if cfg.HTTP.Addr != "" {
		if err := b.setupHTTP(); err != nil {
			return nil, err
		}
	}
	return b, nil
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
	info := b.mqtt.Info
	gauge := func(name, help string, f func() float64) {
		b.metrics.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: name, Help: help}, f))
	}
	counter := func(name, help string, labels prometheus.Labels, f func() float64) {
		b.metrics.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{Name: name, Help: help, ConstLabels: labels}, f))
	}
	gauge("beacon_retained_messages", "Retained messages.", func() float64 { return float64(atomic.LoadInt64(&info.Retained)) })
	gauge("beacon_inflight_messages", "QoS 1/2 messages held for sessions, unacknowledged or queued.",
		func() float64 { return float64(atomic.LoadInt64(&info.Inflight)) })
	gauge("beacon_sessions", "Sessions, connected or not.", func() float64 { return float64(max(b.mqtt.Clients.Len()-1, 0)) })
	gauge("beacon_subscriptions", "Subscriptions.", func() float64 { return float64(atomic.LoadInt64(&info.Subscriptions)) })
	const dropped = "beacon_messages_dropped_total"
	const droppedHelp = "Messages not delivered, by reason: queue_full (connection buffer, QoS 0), queue_limit (mqtt.max_queued_messages), expired, denied (ACL at delivery), policy."
	counter(dropped, droppedHelp, prometheus.Labels{"reason": "queue_full"}, func() float64 { return float64(b.drops.Stats().QueueFull) })
	counter(dropped, droppedHelp, prometheus.Labels{"reason": "queue_limit"}, func() float64 { return float64(atomic.LoadInt64(&info.InflightDropped)) })
	counter(dropped, droppedHelp, prometheus.Labels{"reason": "expired"}, func() float64 { return float64(b.drops.Stats().Expired) })
	counter(dropped, droppedHelp, prometheus.Labels{"reason": "denied"}, func() float64 { return float64(b.auth.Stats().DeniedDelivery) })
	counter(dropped, droppedHelp, prometheus.Labels{"reason": "policy"}, func() float64 { return float64(b.auth.Stats().PolicyDenied) })
	counter("beacon_auth_failures_total", "Refused CONNECTs (bad credentials, disabled devices, anonymous not allowed).", nil,
		func() float64 { return float64(b.auth.Stats().Failures) })
	const denied = "beacon_acl_denied_total"
	counter(denied, "Actions the ACL refused, by action.", prometheus.Labels{"action": "publish"}, func() float64 { return float64(b.auth.Stats().DeniedPublish) })
	counter(denied, "Actions the ACL refused, by action.", prometheus.Labels{"action": "subscribe"}, func() float64 { return float64(b.auth.Stats().DeniedSubscribe) })
	counter("beacon_storage_commits_total", "Storage group commits.", nil, func() float64 { return float64(b.db.Stats().Commits) })
	counter("beacon_storage_commit_errors_total", "Failed storage group commits.", nil, func() float64 { return float64(b.db.Stats().CommitErrors) })
	counter("beacon_storage_writes_total", "Storage writes (sets and deletes) committed.", nil, func() float64 { return float64(b.db.Stats().Ops) })
	gauge("beacon_history_records", "Messages stored in the history.", func() float64 { return float64(b.history.Stats().Stored) })
	counter("beacon_history_recorded_total", "Messages recorded in the history.", nil, func() float64 { return float64(b.history.Stats().Recorded) })
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
	counter("beacon_stream_refused_total", "SSE streams and polls refused by the per-principal or per-address limits.", nil,
		streams(func(s bridge.StreamStats) int64 { return s.Refused }))
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
	counter("beacon_recovered_messages_total", "Acknowledged messages routed again from the ingress log after a crash.", nil,
		func() float64 { return float64(b.store.Stats().Recovered) })
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
		Open:           func() bool { return !b.auth.Configured() },
		AllowAnonymous: b.cfg.Auth.AllowAnonymous,
	}
	b.rest = &bridge.REST{
		Access:  b.access,
		Server:  b.mqtt,
		Policy:  devices.MaxPayload{Authorizer: b.authz},
		MaxBody: int64(b.cfg.MQTT.MaxPacketSize),
		Log:     b.log.With("component", "rest"),
	}
	b.streams = &bridge.Streams{
		Access:          b.access,
		History:         b.history,
		Server:          b.mqtt,
		Heartbeat:       h.SSEHeartbeat,
		Buffer:          h.SSEBuffer,
		MaxFilters:      h.SSEMaxFilters,
		MaxPerPrincipal: h.SSEMaxStreamsPerPrincipal,
		MaxPerIP:        h.SSEMaxStreamsPerIP,
		PollMaxWait:     h.PollMaxWait,
		Track:           b.metricsHook.Stream,
		Decode:          b.decode,
		DeviceOf: func(clientID string) string {
			if cl, ok := b.mqtt.Clients.Get(clientID); ok {
				return b.auth.DeviceOf(cl)
			}
			return ""
		},
		Log: b.log.With("component", "streams"),
	}
	if b.ws != nil {
		b.ws.SetAddress(ln.Addr().String())
	}
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
	var rules *devices.Rules
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
	b.admin = &bridge.Admin{Registry: b.registry, Tokens: b.tokens, AdminToken: adminToken,
		Reload: b.ReloadACL, Log: b.log.With("component", "admin")}

	configured := b.tokens != nil || a.ACLFile != "" || b.registry.Len() > 0
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
	rules, err := devices.LoadRules(b.cfg.Auth.ACLFile)
	if err != nil {
		b.log.Error("ACL reload failed; keeping the rules in force", "error", err)
		return 0, err
	}
	b.authz.Set(rules)
	b.log.Info("ACL reloaded", "file", b.cfg.Auth.ACLFile, "rules", len(rules.Rules))
	return len(rules.Rules), nil
}

func (b *Broker) listen(id, protocol, key, addr string, tc *tls.Config) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return &ConfigError{Key: key, Msg: err.Error()}
	}
	if tc != nil {
		ln = tls.NewListener(ln, tc)
	}
	b.listeners = append(b.listeners, &tcpListener{id: id, protocol: protocol, ln: ln, connectTimeout: connectTimeout})
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

func boolByte(v bool) byte {
	if v {
		return 1
	}
	return 0
}

// Start restores the stored state, then serves MQTT and HTTP. It returns
// once everything accepts connections.
func (b *Broker) Start() error {
	if err := b.mqtt.Serve(); err != nil {
		return fmt.Errorf("start engine: %w", err)
	}
	started := time.Now()
	st, err := b.store.Restore()
	if err != nil {
		return fmt.Errorf("restore state: %w", err)
	}
	b.log.Info("state restored", "sessions", st.Sessions, "subscriptions", st.Subscriptions,
		"queued", st.Inflight, "retained", st.Retained, "recovered", st.Recovered,
		"expired_sessions", st.Expired, "wills_sent", st.Wills, "took", time.Since(started).Round(time.Millisecond))
	b.presence.start(b.registry)
	if b.ha != nil {
		b.ha.Start()
	}
	b.webhooks.Start()

	for _, l := range b.listeners {
		if err := b.mqtt.AddListener(&shutdownSafe{Listener: l, srv: b.mqtt}); err != nil {
			return fmt.Errorf("add listener %s: %w", l.id, err)
		}
		b.mqtt.Listeners.Serve(l.id, b.mqtt.EstablishConnection)
		b.log.Info("mqtt listening", "listener", l.id, "addr", l.Address())
	}
	if b.ws != nil {
		if err := b.mqtt.AddListener(&shutdownSafe{Listener: b.ws, srv: b.mqtt}); err != nil {
			return fmt.Errorf("add websocket listener: %w", err)
		}
		b.mqtt.Listeners.Serve(b.ws.ID(), b.mqtt.EstablishConnection)
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
	return nil
}

func (b *Broker) warnExposure() {
	for _, a := range []string{b.cfg.MQTT.Addr, b.cfg.MQTT.TLSAddr, b.cfg.HTTP.Addr} {
		if !IsLoopback(a) {
			return // setupAuth has said what it had to
		}
	}
	if !b.auth.Configured() {
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
		bridge.WriteJSON(w, http.StatusOK, map[string]string{"status": "ready"})
	})
	mux.Handle("/api/v1/", b.admin.Handler())
	mux.HandleFunc("GET /api/v1/devices", b.admin.Devices(b.access))
	mux.Handle("GET /api/v1/webhooks", b.admin.Require(b.webhooks.Handler()))
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

// MQTTAddr is the bound address of the listener with the given id ("tcp"
// or "tls"), or "".
func (b *Broker) MQTTAddr(id string) string {
	for _, l := range b.listeners {
		if l.id == id {
			return l.Address()
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

// Server is the engine, for the bridges.
func (b *Broker) Server() *mqtt.Server { return b.mqtt }

// Stats are counters for tests and operators.
type Stats struct {
	Store   hooks.StoreStats
	Drops   hooks.DropStats
	Auth    hooks.AuthStats
	Storage storage.Stats
	// QueueLimitDrops counts QoS 1/2 messages not queued for a session
	// because it already held mqtt.max_queued_messages.
	QueueLimitDrops int64
	History         hooks.HistoryStats
	Streams         bridge.StreamStats
}

// Stats returns the broker's counters.
func (b *Broker) Stats() Stats {
	st := Stats{Store: b.store.Stats(), Drops: b.drops.Stats(), Storage: b.db.Stats(), Auth: b.auth.Stats(),
		QueueLimitDrops: atomic.LoadInt64(&b.mqtt.Info.InflightDropped), History: b.history.Stats()}
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
			}
		} else if b.httpLn != nil {
			_ = b.httpLn.Close()
		}
		b.presence.stop()
		if b.ha != nil {
			b.ha.Shutdown()
		}
		closed := make(chan struct{})
		go func() {
			_ = b.mqtt.Close() // disconnects clients and waits for their goroutines
			close(closed)
		}()
		select {
		case <-closed:
		case <-ctx.Done():
			errs = append(errs, fmt.Errorf("mqtt: clients did not finish: %w", ctx.Err()))
		}
		b.closeListeners() // for a broker that was never started
		if err := b.history.Shutdown(ctx); err != nil {
			errs = append(errs, err)
		}
		if err := b.webhooks.Shutdown(ctx); err != nil {
			errs = append(errs, err)
		}
		if err := b.db.Shutdown(ctx); err != nil {
			errs = append(errs, err)
		}
		b.shutdownErr = errors.Join(errs...)
	})
	return b.shutdownErr
}
