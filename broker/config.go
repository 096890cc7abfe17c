package broker

import (
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"reflect"
	"sort"
	"strconv"
	"strings"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/beaconmq/beacon/devices"
	"github.com/beaconmq/beacon/devices/codec"
	"github.com/beaconmq/beacon/storage"
)

// Config is the whole broker configuration. The zero value is not usable;
// start from Default. Every field is documented, with its default, in
// docs/configuration.md.
type Config struct {
	MQTT    MQTTConfig    `yaml:"mqtt"`
	HTTP    HTTPConfig    `yaml:"http"`
	Auth    AuthConfig    `yaml:"auth"`
	Storage StorageConfig `yaml:"storage"`
	History HistoryConfig `yaml:"history"`
	// Codecs declare payload formats, so streams, webhooks and Home
	// Assistant get decoded readings: the first rule matching a message
	// decides.
	Codecs        []CodecRuleConfig   `yaml:"codecs"`
	HomeAssistant HomeAssistantConfig `yaml:"homeassistant"`
	// Webhooks receive matching messages by HTTP POST, from a persisted
	// outbox.
	Webhooks []WebhookConfig `yaml:"webhooks"`
	Log      LogConfig       `yaml:"log"`
	// Cluster joins several nodes through Redis; off (one node) unless
	// cluster.redis_url is set.
	Cluster ClusterConfig `yaml:"cluster"`
}

// ClusterConfig joins this node to others sharing one Redis (docs/cluster.md).
type ClusterConfig struct {
	RedisURL          string        `yaml:"redis_url"`           // redis://[user@]host:port/db, rediss:// for TLS; "" = one node
	RedisPasswordFile string        `yaml:"redis_password_file"` // file holding the Redis password (rather than one in the URL)
	NodeID            string        `yaml:"node_id"`             // this node's name, unique in the cluster; "" = the host name
	Prefix            string        `yaml:"prefix"`              // prefix of every Redis key Beacon uses
	ForwardBuffer     int           `yaml:"forward_buffer"`      // messages for other nodes held in memory; beyond it they wait in the store
	Heartbeat         time.Duration `yaml:"heartbeat"`           // how often a node renews its presence; it is gone after 3 missed
}

// On reports whether the node is part of a cluster.
func (c ClusterConfig) On() bool { return c.RedisURL != "" }

// WebhookConfig is one HTTP endpoint for the messages matching topics.
type WebhookConfig struct {
	Name       string        `yaml:"name"`        // required, unique: names its outbox, metrics and logs
	URL        string        `yaml:"url"`         // http or https
	Topics     []string      `yaml:"topics"`      // topic filters; list $beacon/presence/# for online/offline events
	Secret     string        `yaml:"secret"`      // HMAC-SHA256 key: X-Beacon-Signature: sha256=<hex>
	Timeout    time.Duration `yaml:"timeout"`     // per attempt
	MaxRetries int           `yaml:"max_retries"` // attempts after the first before a message is dropped; 0: none
}

func (w *WebhookConfig) setDefaults() { *w = WebhookConfig{Timeout: 10 * time.Second, MaxRetries: 10} }

// HomeAssistantConfig configures Home Assistant MQTT discovery.
type HomeAssistantConfig struct {
	Discovery   bool   `yaml:"discovery"`    // publish discovery configs for decoded device readings
	Prefix      string `yaml:"prefix"`       // Home Assistant's discovery prefix
	StatePrefix string `yaml:"state_prefix"` // where each device's decoded readings are published as JSON
	StatusTopic string `yaml:"status_topic"` // a device's birth/will topic (online/offline), %u for its id; "" for none
}

// CodecRuleConfig is one payload format: for messages on topics matching
// filter and, when device_type is set, published by a device of that type.
type CodecRuleConfig struct {
	Filter     string        `yaml:"filter"`
	DeviceType string        `yaml:"device_type"`
	Format     string        `yaml:"format"` // json, cbor, packed, raw
	Endian     string        `yaml:"endian"` // packed: big (default) or little
	Fields     []codec.Field `yaml:"fields"`
	// Commands a device of device_type can be told: Home Assistant
	// controls publishing to devices/<id>/cmd/<name>.
	Commands []codec.Command `yaml:"commands"`
}

// CodecRules converts the codecs section for codec.NewRules.
func (c *Config) CodecRules() []codec.Rule {
	var out []codec.Rule
	for _, r := range c.Codecs {
		out = append(out, codec.Rule{Filter: r.Filter, DeviceType: r.DeviceType,
			Config: codec.Config{Format: r.Format, Endian: r.Endian, Fields: r.Fields}, Commands: r.Commands})
	}
	return out
}

// HistoryConfig says which messages the broker records for replay to
// browsers (SSE, long-poll, /api/v1/topics/last).
type HistoryConfig struct {
	// Rules in order: a message is kept under the first rule whose filter
	// matches it; a message no rule matches is not recorded. An empty list
	// records nothing.
	Rules []HistoryRuleConfig `yaml:"rules"`
	// MaxIndexBytes bounds the in-memory retention index (16 bytes per
	// recorded message): beyond it the oldest records leave retention.
	MaxIndexBytes int64 `yaml:"max_index_bytes"`
}

// HistoryRuleConfig keeps the newest max_messages messages matching
// filter, none older than max_age (0 = no age limit).
type HistoryRuleConfig struct {
	Filter      string        `yaml:"filter"`
	MaxMessages int           `yaml:"max_messages"`
	MaxAge      time.Duration `yaml:"max_age"`
}

// setDefaults fills a list element before its YAML keys are applied.
func (r *HistoryRuleConfig) setDefaults() {
	*r = HistoryRuleConfig{MaxMessages: 10000, MaxAge: 24 * time.Hour}
}

// AuthConfig configures authentication and authorization. Authentication
// counts as configured once a device is registered, a JWT key is set or a
// rules file is named; from then on every client must authenticate (or be
// anonymous where allow_anonymous says so) and the rules decide.
type AuthConfig struct {
	AllowAnonymous bool          `yaml:"allow_anonymous"`  // admit clients without credentials (as subject "anonymous")
	ACLFile        string        `yaml:"acl_file"`         // rules file; reloaded on SIGHUP and POST /api/v1/acl/reload
	AdminToken     string        `yaml:"admin_token"`      // bearer token for /api/v1 admin endpoints (at least 16 bytes)
	AdminTokenFile string        `yaml:"admin_token_file"` // file holding the admin token
	JWTSecret      string        `yaml:"jwt_secret"`       // HS256 secret (at least 32 bytes)
	JWTSecretFile  string        `yaml:"jwt_secret_file"`  // file holding the HS256 secret
	JWTPublicKeys  string        `yaml:"jwt_public_keys"`  // comma-separated PEM files: RS256, ES256, EdDSA keys or certificates
	JWKSFile       string        `yaml:"jwks_file"`        // JSON Web Key Set file with public keys
	JWTIssuer      string        `yaml:"jwt_issuer"`       // required "iss" when set
	JWTAudience    string        `yaml:"jwt_audience"`     // required "aud" when set
	FailDelay      time.Duration `yaml:"fail_delay"`       // delay before refusing bad credentials
	// Failed authentication throttling (docs/operations.md, Limits).
	FailRatePerIP   float64       `yaml:"fail_rate_per_ip"`  // failed authentications per second a source address regains; 0 = no per-address limit
	FailBurst       int           `yaml:"fail_burst"`        // failed authentications a source address may make at once
	FailRateGlobal  float64       `yaml:"fail_rate_global"`  // failures per second, broker-wide, of addresses that failed before; 0 = none
	FailBurstGlobal int           `yaml:"fail_burst_global"` // of those, at once
	BanAfter        int           `yaml:"ban_after"`         // consecutive failures that ban a source address; 0 = never
	BanDuration     time.Duration `yaml:"ban_duration"`      // how long a ban lasts
}

// secretKeys are printed redacted by config print.
var secretKeys = map[string]bool{"auth.admin_token": true, "auth.jwt_secret": true, "webhooks[].secret": true}

func readSecret(value, file, key string) (string, error) {
	if file == "" {
		return value, nil
	}
	b, err := os.ReadFile(file)
	if err != nil {
		return "", &ConfigError{Key: key + "_file", Msg: err.Error()}
	}
	return strings.TrimSpace(string(b)), nil
}

// AdminTokenValue is the admin token from admin_token or admin_token_file.
func (a AuthConfig) AdminTokenValue() (string, error) {
	return readSecret(a.AdminToken, a.AdminTokenFile, "auth.admin_token")
}

// JWTSecretValue is the HS256 secret from jwt_secret or jwt_secret_file.
func (a AuthConfig) JWTSecretValue() (string, error) {
	return readSecret(a.JWTSecret, a.JWTSecretFile, "auth.jwt_secret")
}

// PublicKeyFiles splits jwt_public_keys.
func (a AuthConfig) PublicKeyFiles() []string { return List(a.JWTPublicKeys) }

// JWTConfigured reports whether any JWT key source is set.
func (a AuthConfig) JWTConfigured() bool {
	return a.JWTSecret != "" || a.JWTSecretFile != "" || a.JWTPublicKeys != "" || a.JWKSFile != ""
}

// MQTTConfig configures the MQTT listeners and the engine's capabilities.
type MQTTConfig struct {
	Addr              string        `yaml:"addr"`                // TCP listener; "" disables it
	TLSAddr           string        `yaml:"tls_addr"`            // TLS listener; needs tls_cert and tls_key
	TLSCert           string        `yaml:"tls_cert"`            // PEM certificate chain file
	TLSKey            string        `yaml:"tls_key"`             // PEM private key file
	MaxPacketSize     uint32        `yaml:"max_packet_size"`     // bytes, inbound and announced to v5 clients
	MaxClients        int64         `yaml:"max_clients"`         // concurrent connections; 0 = unlimited
	MaxSessionExpiry  time.Duration `yaml:"max_session_expiry"`  // cap for v5, lifetime for v3 persistent sessions
	MaxMessageExpiry  time.Duration `yaml:"max_message_expiry"`  // cap on message expiry; 0 = messages never expire unless the publisher says so
	MaxQueuedMessages uint16        `yaml:"max_queued_messages"` // QoS 1/2 messages kept per session (inflight + queued)
	ReceiveMaximum    uint16        `yaml:"receive_maximum"`     // inbound QoS 1/2 messages unacknowledged per client
	MaxTopicAlias     uint16        `yaml:"max_topic_alias"`     // topic aliases per v5 client; 0 disables them
	MaxTopicLength    int           `yaml:"max_topic_length"`    // bytes in a topic name or filter (the spec's cap is 65535)
	MaxTopicLevels    int           `yaml:"max_topic_levels"`    // levels in a topic name or filter; 0 = no limit
	OutboundQueue     int32         `yaml:"outbound_queue"`      // KiB queued per connection before QoS 0 messages are dropped (the outbound byte budget)
	KeepaliveMin      time.Duration `yaml:"keepalive_min"`       // lowest keep-alive accepted; 0 = none
	KeepaliveMax      time.Duration `yaml:"keepalive_max"`       // highest keep-alive accepted; 0 = none
	MaxQoS            byte          `yaml:"max_qos"`             // 0, 1 or 2
	RetainAvailable   bool          `yaml:"retain_available"`    // accept retained messages
	SharedSubs        bool          `yaml:"shared_subscriptions"`
	SysInterval       time.Duration `yaml:"sys_interval"` // $SYS topic refresh period

	// TLS client certificates on tls_addr: a certificate signed by
	// tls_client_ca proves the device named by its identity (cn: the
	// subject's common name, the default; san: its first DNS name).
	TLSClientCA          string `yaml:"tls_client_ca"`           // PEM file of the CAs that sign client certificates
	TLSRequireClientCert bool   `yaml:"tls_require_client_cert"` // refuse TLS handshakes without a client certificate
	TLSIdentity          string `yaml:"tls_identity"`            // cn or san ("" is cn)
}

// HTTPConfig configures the HTTP server: health checks, the admin API and
// the browser bridges (MQTT over WebSocket at ws_path).
type HTTPConfig struct {
	Addr               string `yaml:"addr"`                  // "" disables it
	TLSCert            string `yaml:"tls_cert"`              // serve HTTPS (and wss://) with this PEM certificate chain
	TLSKey             string `yaml:"tls_key"`               // and this PEM key
	WSPath             string `yaml:"ws_path"`               // MQTT over WebSocket; "" disables it
	AllowedOrigins     string `yaml:"allowed_origins"`       // comma-separated scheme://host[:port]; same origin is always allowed
	AllowMissingOrigin bool   `yaml:"allow_missing_origin"`  // admit requests without Origin (non-browser clients); default true
	TrustedProxies     string `yaml:"trusted_proxies"`       // comma-separated IPs/CIDRs whose X-Forwarded-For is believed
	MaxConnsPerIP      int    `yaml:"max_conns_per_ip"`      // browser connections per client address; 0 = unlimited
	HandshakesPerSec   int    `yaml:"handshakes_per_second"` // per client address (bursts of twice that); 0 = unlimited
	PprofAddr          string `yaml:"pprof_addr"`            // Go profiling endpoints (/debug/pprof/); "" = off. Keep it on loopback.
	Dashboard          bool   `yaml:"dashboard"`             // serve the live dashboard at /

	SSEHeartbeat              time.Duration `yaml:"sse_heartbeat"`                 // comment sent on idle streams
	SSEBuffer                 int           `yaml:"sse_buffer"`                    // messages buffered per stream before it is closed as too slow
	SSEMaxFilters             int           `yaml:"sse_max_filters"`               // topic filters per stream or poll
	SSEMaxStreamsPerPrincipal int           `yaml:"sse_max_streams_per_principal"` // open streams and polls per user or device; 0 = unlimited
	SSEMaxStreamsPerIP        int           `yaml:"sse_max_streams_per_ip"`        // open streams and polls per client address; 0 = unlimited
	PollMaxWait               time.Duration `yaml:"poll_max_wait"`                 // longest wait a long-poll may ask for
}

// List splits a comma-separated setting.
func List(s string) []string {
	var out []string
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f != "" {
			out = append(out, f)
		}
	}
	return out
}

// StorageConfig configures the embedded database.
type StorageConfig struct {
	Dir          string             `yaml:"dir"`
	Sync         storage.SyncPolicy `yaml:"sync"`
	SyncInterval time.Duration      `yaml:"sync_interval"`
	GCInterval   time.Duration      `yaml:"gc_interval"`
	// MinFree is the free space kept on the data directory's volume:
	// "512MiB", "5%", or "5%,512MiB" (whichever is smaller); "" is 5% or
	// 512 MiB, whichever is smaller.
	MinFree string `yaml:"min_free"`
}

// LogConfig configures logging.
type LogConfig struct {
	Level  string `yaml:"level"`  // debug, info, warn, error
	Format string `yaml:"format"` // text, json
	// Connections logs connects, subscriptions and disconnects at INFO,
	// like mosquitto -v (never credentials or payloads).
	Connections bool `yaml:"connections"`
}

// Default returns the configuration used when nothing is set: loopback
// only, data in ./beacon-data.
func Default() Config {
	return Config{
		MQTT: MQTTConfig{
			Addr:              "127.0.0.1:1883",
			MaxPacketSize:     1 << 20,
			MaxSessionExpiry:  7 * 24 * time.Hour,
			MaxQueuedMessages: 1000,
			ReceiveMaximum:    100,
			MaxTopicAlias:     1024,
			MaxTopicLength:    1024,
			MaxTopicLevels:    128,
			OutboundQueue:     1024,
			MaxQoS:            2,
			RetainAvailable:   true,
			SharedSubs:        true,
			SysInterval:       10 * time.Second,
		},
		HTTP: HTTPConfig{Addr: "127.0.0.1:8080", WSPath: "/mqtt", MaxConnsPerIP: 256, HandshakesPerSec: 20, Dashboard: true, AllowMissingOrigin: true,
			SSEHeartbeat: 15 * time.Second, SSEBuffer: 1024, SSEMaxFilters: 32, SSEMaxStreamsPerPrincipal: 32,
			SSEMaxStreamsPerIP: 64, PollMaxWait: 60 * time.Second},
		HomeAssistant: HomeAssistantConfig{Prefix: "homeassistant", StatePrefix: "beacon/state", StatusTopic: "devices/%u/status"},
		History: HistoryConfig{Rules: []HistoryRuleConfig{{Filter: "#", MaxMessages: 10000, MaxAge: 24 * time.Hour},
			{Filter: "$beacon/presence/#", MaxMessages: 10000, MaxAge: 24 * time.Hour}}, MaxIndexBytes: 64 << 20},
		Auth: AuthConfig{FailDelay: time.Second, FailRatePerIP: 0.2, FailBurst: 5, FailRateGlobal: 20, FailBurstGlobal: 100,
			BanAfter: 10, BanDuration: 5 * time.Minute},
		Storage: StorageConfig{Dir: "beacon-data", Sync: storage.SyncBatch, SyncInterval: time.Second, GCInterval: 5 * time.Minute},
		Log:     LogConfig{Level: "info", Format: "text"},
		Cluster: ClusterConfig{Prefix: "beacon:", ForwardBuffer: 10000, Heartbeat: 2 * time.Second},
	}
}

// ConfigError is a configuration problem, named by key and, when it came
// from a file, by file and line.
type ConfigError struct {
	File string
	Line int
	Key  string
	Msg  string
}

func (e *ConfigError) Error() string {
	switch {
	case e.File != "" && e.Line > 0:
		return fmt.Sprintf("%s:%d: %s: %s", e.File, e.Line, e.Key, e.Msg)
	case e.File != "":
		return fmt.Sprintf("%s: %s: %s", e.File, e.Key, e.Msg)
	default:
		return fmt.Sprintf("%s: %s", e.Key, e.Msg)
	}
}

// Source records where each key's value came from, so validation errors
// can point at the file line.
type Source struct {
	File  string
	lines map[string]int
	from  map[string]string // key -> "file", "env BEACON_X", "flag --x"
}

// Load builds the configuration: defaults, then the YAML file (if path is
// not ""), then BEACON_* environment variables, then overrides (flag
// values by key, e.g. "mqtt.addr"). It validates the result.
func Load(path string, environ []string, overrides map[string]string) (Config, error) {
	cfg := Default()
	src := &Source{File: path, lines: map[string]int{}, from: map[string]string{}}
	if path != "" {
		data, err := os.ReadFile(path)
		if err != nil {
			return cfg, fmt.Errorf("read config: %w", err)
		}
		if err := decodeYAML(data, &cfg, src); err != nil {
			return cfg, err
		}
		resolveFilePaths(&cfg, path, src.lines)
	}
	keys := configKeys()
	for _, kv := range environ {
		name, val, ok := strings.Cut(kv, "=")
		if !ok || !strings.HasPrefix(name, "BEACON_") {
			continue
		}
		key, known := envKeys(keys)[name]
		if !known {
			return cfg, &ConfigError{Key: name, Msg: "unknown environment variable (see docs/configuration.md)"}
		}
		if err := setKey(&cfg, key, val); err != nil {
			return cfg, &ConfigError{Key: name, Msg: err.Error()}
		}
		src.from[key] = "env " + name
	}
	names := make([]string, 0, len(overrides))
	for k := range overrides {
		names = append(names, k)
	}
	sort.Strings(names)
	for _, key := range names {
		if err := setKey(&cfg, key, overrides[key]); err != nil {
			return cfg, &ConfigError{Key: key, Msg: err.Error()}
		}
		src.from[key] = "flag"
	}
	if err := cfg.Validate(); err != nil {
		var ce *ConfigError
		if errors.As(err, &ce) {
			if how := src.from[ce.Key]; how != "" {
				ce.Msg += " (set by " + how + ")"
			} else if line, ok := src.lines[ce.Key]; ok {
				ce.File, ce.Line = src.File, line
			}
		}
		return cfg, err
	}
	return cfg, nil
}

// decodeYAML decodes data into cfg key by key, so that an unknown key or a
// bad value is reported with its dotted name and line.
func decodeYAML(data []byte, cfg *Config, src *Source) error {
	var doc yaml.Node
	if err := yaml.Unmarshal(data, &doc); err != nil {
		return &ConfigError{File: src.File, Key: "(file)", Msg: err.Error()}
	}
	if len(doc.Content) == 0 {
		return nil // empty file
	}
	return decodeNode(doc.Content[0], reflect.ValueOf(cfg).Elem(), "", src)
}

func decodeNode(n *yaml.Node, v reflect.Value, prefix string, src *Source) error {
	if n.Kind != yaml.MappingNode {
		key := strings.TrimSuffix(prefix, ".")
		if key == "" {
			key = "(file)"
		}
		return &ConfigError{File: src.File, Line: n.Line, Key: key, Msg: "expected a mapping of keys"}
	}
	fields := yamlFields(v.Type())
	for i := 0; i+1 < len(n.Content); i += 2 {
		k, val := n.Content[i], n.Content[i+1]
		key := prefix + k.Value
		idx, ok := fields[k.Value]
		if !ok {
			return &ConfigError{File: src.File, Line: k.Line, Key: key, Msg: "unknown key" + suggest(k.Value, fields)}
		}
		f := v.Field(idx)
		src.lines[key] = k.Line
		if f.Kind() == reflect.Slice {
			if err := decodeList(val, f, key, src); err != nil {
				return err
			}
			continue
		}
		if f.Kind() == reflect.Struct && f.Type() != reflect.TypeOf(time.Duration(0)) {
			if err := decodeNode(val, f, key+".", src); err != nil {
				return err
			}
			continue
		}
		if val.Kind != yaml.ScalarNode {
			return &ConfigError{File: src.File, Line: val.Line, Key: key, Msg: "expected a single value"}
		}
		if err := setValue(f, val.Value); err != nil {
			return &ConfigError{File: src.File, Line: val.Line, Key: key, Msg: err.Error()}
		}
	}
	return nil
}

// decodeList decodes a YAML sequence into a slice of strings or of
// structs; elements are named key[i] in errors.
func decodeList(n *yaml.Node, f reflect.Value, key string, src *Source) error {
	if n.Kind != yaml.SequenceNode {
		return &ConfigError{File: src.File, Line: n.Line, Key: key, Msg: "expected a list"}
	}
	out := reflect.MakeSlice(f.Type(), 0, len(n.Content))
	for i, item := range n.Content {
		name := fmt.Sprintf("%s[%d]", key, i)
		src.lines[name] = item.Line
		e := reflect.New(f.Type().Elem())
		if d, ok := e.Interface().(interface{ setDefaults() }); ok {
			d.setDefaults()
		}
		if e.Elem().Kind() == reflect.Struct {
			if err := decodeNode(item, e.Elem(), name+".", src); err != nil {
				return err
			}
		} else {
			if item.Kind != yaml.ScalarNode {
				return &ConfigError{File: src.File, Line: item.Line, Key: name, Msg: "expected a single value"}
			}
			if err := setValue(e.Elem(), item.Value); err != nil {
				return &ConfigError{File: src.File, Line: item.Line, Key: name, Msg: err.Error()}
			}
		}
		out = reflect.Append(out, e.Elem())
	}
	if out.Len() == 0 {
		out = reflect.Zero(f.Type()) // [] and nothing are the same: none
	}
	f.Set(out)
	return nil
}

// suggest names the known key closest to a misspelt one.
func suggest(name string, fields map[string]int) string {
	best, bestDist := "", max(2, len(name)/3)+1 // close enough to be a typo
	for f := range fields {
		if d := editDistance(name, f); d < bestDist || (d == bestDist && f < best) {
			best, bestDist = f, d
		}
	}
	if best == "" {
		return ""
	}
	return fmt.Sprintf(" (did you mean %q?)", best)
}

// editDistance is the Levenshtein distance between a and b.
func editDistance(a, b string) int {
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev, cur = cur, prev
	}
	return prev[len(b)]
}

func yamlFields(t reflect.Type) map[string]int {
	m := make(map[string]int, t.NumField())
	for i := 0; i < t.NumField(); i++ {
		if tag := t.Field(i).Tag.Get("yaml"); tag != "" && tag != "-" {
			m[strings.Split(tag, ",")[0]] = i
		}
	}
	return m
}

// configKeys lists every leaf key ("mqtt.addr", ...) in declaration order.
func configKeys() []string {
	var keys []string
	var walk func(t reflect.Type, prefix string)
	walk = func(t reflect.Type, prefix string) {
		for i := 0; i < t.NumField(); i++ {
			f := t.Field(i)
			name := strings.Split(f.Tag.Get("yaml"), ",")[0]
			if f.Type.Kind() == reflect.Struct && f.Type != reflect.TypeOf(time.Duration(0)) {
				walk(f.Type, prefix+name+".")
				continue
			}
			if f.Type.Kind() == reflect.Slice {
				continue // lists are set in the file only (ListKeys)
			}
			keys = append(keys, prefix+name)
		}
	}
	walk(reflect.TypeOf(Config{}), "")
	return keys
}

// ListKeys are the keys holding lists: set in the YAML file only.
func ListKeys() []string { return []string{"history.rules", "codecs", "webhooks"} }

// EnvName is the environment variable that sets key: "mqtt.tls_addr" is
// BEACON_MQTT_TLS_ADDR.
func EnvName(key string) string {
	return "BEACON_" + strings.ToUpper(strings.ReplaceAll(key, ".", "_"))
}

func envKeys(keys []string) map[string]string {
	m := make(map[string]string, len(keys))
	for _, k := range keys {
		m[EnvName(k)] = k
	}
	return m
}

// setKey sets the leaf key (dotted) from its text form.
func setKey(cfg *Config, key, val string) error {
	v := reflect.ValueOf(cfg).Elem()
	parts := strings.Split(key, ".")
	for _, p := range parts {
		if v.Kind() != reflect.Struct {
			return fmt.Errorf("unknown key %q", key)
		}
		idx, ok := yamlFields(v.Type())[p]
		if !ok {
			return fmt.Errorf("unknown key %q", key)
		}
		v = v.Field(idx)
	}
	return setValue(v, val)
}

func setValue(v reflect.Value, s string) error {
	s = strings.TrimSpace(s)
	if v.Type() == reflect.TypeOf(time.Duration(0)) {
		d, err := time.ParseDuration(s)
		if err != nil {
			return fmt.Errorf("invalid duration %q (use e.g. 30s, 5m, 168h)", s)
		}
		v.SetInt(int64(d))
		return nil
	}
	switch v.Kind() {
	case reflect.String:
		v.SetString(s)
	case reflect.Bool:
		b, err := strconv.ParseBool(s)
		if err != nil {
			return fmt.Errorf("invalid boolean %q (use true or false)", s)
		}
		v.SetBool(b)
	case reflect.Float64:
		f, err := strconv.ParseFloat(s, 64)
		if err != nil {
			return fmt.Errorf("invalid number %q", s)
		}
		v.SetFloat(f)
	case reflect.Int, reflect.Int32, reflect.Int64:
		n, err := strconv.ParseInt(s, 10, v.Type().Bits())
		if err != nil {
			return fmt.Errorf("invalid integer %q for a %d-bit value", s, v.Type().Bits())
		}
		v.SetInt(n)
	case reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		n, err := strconv.ParseUint(s, 10, v.Type().Bits())
		if err != nil {
			return fmt.Errorf("invalid number %q (0 to %d)", s, uint64(1)<<v.Type().Bits()-1)
		}
		v.SetUint(n)
	default:
		return fmt.Errorf("unsupported type %s", v.Type())
	}
	return nil
}

// Validate checks every value and names the first bad key.
func (c *Config) Validate() error {
	bad := func(key, format string, a ...any) error {
		return &ConfigError{Key: key, Msg: fmt.Sprintf(format, a...)}
	}
	m := &c.MQTT
	if m.Addr == "" && m.TLSAddr == "" {
		return bad("mqtt.addr", "no MQTT listener: set mqtt.addr or mqtt.tls_addr")
	}
	if err := checkAddr(m.Addr); err != nil {
		return bad("mqtt.addr", "%v", err)
	}
	if err := checkAddr(m.TLSAddr); err != nil {
		return bad("mqtt.tls_addr", "%v", err)
	}
	if m.TLSAddr != "" && (m.TLSCert == "" || m.TLSKey == "") {
		return bad("mqtt.tls_addr", "needs mqtt.tls_cert and mqtt.tls_key")
	}
	if m.TLSAddr == "" && (m.TLSCert != "" || m.TLSKey != "") {
		return bad("mqtt.tls_cert", "set mqtt.tls_addr to serve TLS with this certificate")
	}
	if err := m.validateClientCerts(); err != nil {
		return err
	}
	for key, f := range map[string]string{"mqtt.tls_cert": m.TLSCert, "mqtt.tls_key": m.TLSKey} {
		if f == "" {
			continue
		}
		if _, err := os.Stat(f); err != nil {
			return bad(key, "%v", err)
		}
	}
	if m.MaxPacketSize < 64 || m.MaxPacketSize > 268435455 {
		return bad("mqtt.max_packet_size", "%d is outside 64..268435455 bytes", m.MaxPacketSize)
	}
	if m.MaxClients < 0 {
		return bad("mqtt.max_clients", "must not be negative")
	}
	if m.MaxSessionExpiry < time.Second || m.MaxSessionExpiry > time.Duration(1<<32-1)*time.Second {
		return bad("mqtt.max_session_expiry", "%s is outside 1s..4294967295s", m.MaxSessionExpiry)
	}
	if m.MaxMessageExpiry < 0 {
		return bad("mqtt.max_message_expiry", "must not be negative")
	}
	if m.MaxQueuedMessages < 1 {
		return bad("mqtt.max_queued_messages", "must be at least 1")
	}
	if m.ReceiveMaximum == 0 {
		return bad("mqtt.receive_maximum", "must be at least 1")
	}
	if m.OutboundQueue < 1 {
		return bad("mqtt.outbound_queue", "must be at least 1")
	}
	if m.MaxTopicLength < 1 || m.MaxTopicLength > 65535 {
		return bad("mqtt.max_topic_length", "%d is outside 1..65535", m.MaxTopicLength)
	}
	if m.MaxTopicLevels < 0 {
		return bad("mqtt.max_topic_levels", "must not be negative")
	}
	for key, d := range map[string]time.Duration{"mqtt.keepalive_min": m.KeepaliveMin, "mqtt.keepalive_max": m.KeepaliveMax} {
		if d < 0 || d > 65535*time.Second || d%time.Second != 0 {
			return bad(key, "%s is not a whole number of seconds in 0..65535s", d)
		}
	}
	if m.KeepaliveMax > 0 && m.KeepaliveMin > m.KeepaliveMax {
		return bad("mqtt.keepalive_min", "greater than mqtt.keepalive_max")
	}
	if m.MaxQoS > 2 {
		return bad("mqtt.max_qos", "%d is not 0, 1 or 2", m.MaxQoS)
	}
	if m.SysInterval < time.Second {
		return bad("mqtt.sys_interval", "must be at least 1s")
	}
	if err := checkAddr(c.HTTP.Addr); err != nil {
		return bad("http.addr", "%v", err)
	}
	h := &c.HTTP
	if (h.TLSCert == "") != (h.TLSKey == "") {
		return bad("http.tls_cert", "set both http.tls_cert and http.tls_key")
	}
	for key, f := range map[string]string{"http.tls_cert": h.TLSCert, "http.tls_key": h.TLSKey} {
		if f == "" {
			continue
		}
		if _, err := os.Stat(f); err != nil {
			return bad(key, "%v", err)
		}
	}
	if h.WSPath != "" && (!strings.HasPrefix(h.WSPath, "/") || strings.HasPrefix(h.WSPath, "/api/") || h.WSPath == "/healthz" || h.WSPath == "/readyz") {
		return bad("http.ws_path", "%q must start with / and not clash with /api/, /healthz or /readyz", h.WSPath)
	}
	if err := checkAddr(h.PprofAddr); err != nil {
		return bad("http.pprof_addr", "%v", err)
	}
	if h.PprofAddr != "" && !IsLoopback(h.PprofAddr) {
		return bad("http.pprof_addr", "%s is not a loopback address: profiles expose memory contents", h.PprofAddr)
	}
	if h.MaxConnsPerIP < 0 {
		return bad("http.max_conns_per_ip", "must not be negative")
	}
	if h.HandshakesPerSec < 0 {
		return bad("http.handshakes_per_second", "must not be negative")
	}
	if err := c.Auth.validate(); err != nil {
		return err
	}
	for key, v := range map[string]int{"http.sse_buffer": h.SSEBuffer, "http.sse_max_filters": h.SSEMaxFilters} {
		if v < 1 || v > 65536 {
			return bad(key, "%d is outside 1..65536", v)
		}
	}
	for key, v := range map[string]int{"http.sse_max_streams_per_principal": h.SSEMaxStreamsPerPrincipal, "http.sse_max_streams_per_ip": h.SSEMaxStreamsPerIP} {
		if v < 0 {
			return bad(key, "must not be negative")
		}
	}
	if h.SSEHeartbeat < time.Second {
		return bad("http.sse_heartbeat", "must be at least 1s")
	}
	if h.PollMaxWait < time.Second || h.PollMaxWait > 10*time.Minute {
		return bad("http.poll_max_wait", "%s is outside 1s..10m", h.PollMaxWait)
	}
	if m := c.History.MaxIndexBytes; m < 0 || m > 0 && m < 64<<10 {
		return bad("history.max_index_bytes", "%d is below 65536 (0 turns the bound off)", m)
	}
	for i, r := range c.History.Rules {
		key := fmt.Sprintf("history.rules[%d]", i)
		if r.Filter == "" || !validFilter(r.Filter) {
			return bad(key+".filter", "%q is not a topic filter (e.g. devices/+/telemetry or #)", r.Filter)
		}
		if r.MaxMessages < 1 {
			return bad(key+".max_messages", "must be at least 1")
		}
		if r.MaxAge < 0 {
			return bad(key+".max_age", "must not be negative (0 = no age limit)")
		}
	}
	for i, r := range c.Codecs {
		key := fmt.Sprintf("codecs[%d]", i)
		if !validFilter(r.Filter) || r.Filter == "" {
			return bad(key+".filter", "%q is not a topic filter (e.g. devices/+/telemetry)", r.Filter)
		}
	}
	if _, err := codec.NewRules(c.CodecRules()); err != nil {
		var ce *codec.ConfigError
		if errors.As(err, &ce) {
			return bad("codecs"+ce.Key, "%s", ce.Msg)
		}
		return bad("codecs", "%v", err)
	}
	if ha := c.HomeAssistant; ha.Discovery {
		if !validFilter(ha.Prefix) || ha.Prefix == "" || strings.ContainsAny(ha.Prefix, "+#") {
			return bad("homeassistant.prefix", "%q is not a topic prefix", ha.Prefix)
		}
		if !validFilter(ha.StatePrefix) || ha.StatePrefix == "" || strings.ContainsAny(ha.StatePrefix, "+#") || strings.HasPrefix(ha.StatePrefix, "$") {
			return bad("homeassistant.state_prefix", "%q is not a topic prefix", ha.StatePrefix)
		}
		if len(c.Codecs) == 0 {
			return bad("homeassistant.discovery", "needs codecs: discovery describes the readings codecs decode")
		}
		if st := strings.ReplaceAll(ha.StatusTopic, "%u", "x"); ha.StatusTopic != "" && (!validFilter(st) || strings.ContainsAny(st, "+#")) {
			return bad("homeassistant.status_topic", "%q is not a topic name (%%u stands for the device id)", ha.StatusTopic)
		}
	}
	names := map[string]bool{}
	for i, w := range c.Webhooks {
		key := fmt.Sprintf("webhooks[%d]", i)
		switch {
		case w.Name == "":
			return bad(key+".name", "required: it names the webhook's outbox, metrics and logs")
		case names[w.Name]:
			return bad(key+".name", "%q is used twice", w.Name)
		}
		names[w.Name] = true
		if u, err := url.Parse(w.URL); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			return bad(key+".url", "%q is not an http or https URL", w.URL)
		}
		if len(w.Topics) == 0 {
			return bad(key+".topics", "at least one topic filter is needed")
		}
		for j, f := range w.Topics {
			if f == "" || !validFilter(f) {
				return bad(fmt.Sprintf("%s.topics[%d]", key, j), "%q is not a topic filter", f)
			}
		}
		if w.Timeout <= 0 || w.Timeout > 5*time.Minute {
			return bad(key+".timeout", "%s is outside 1ns..5m", w.Timeout)
		}
		if w.MaxRetries < 0 {
			return bad(key+".max_retries", "must be 0 (no retries) or more")
		}
	}
	if c.Storage.Dir == "" {
		return bad("storage.dir", "must not be empty")
	}
	if !c.Storage.Sync.Valid() {
		return bad("storage.sync", "%q is not always, batch or none", c.Storage.Sync)
	}
	if c.Storage.SyncInterval < time.Millisecond {
		return bad("storage.sync_interval", "must be at least 1ms")
	}
	if _, err := storage.ParseReserve(c.Storage.MinFree); err != nil {
		return bad("storage.min_free", "%v", err)
	}
	if c.Storage.GCInterval < time.Second {
		return bad("storage.gc_interval", "must be at least 1s")
	}
	if err := c.Cluster.validate(); err != nil {
		return err
	}
	switch c.Log.Level {
	case "debug", "info", "warn", "error":
	default:
		return bad("log.level", "%q is not debug, info, warn or error", c.Log.Level)
	}
	switch c.Log.Format {
	case "text", "json":
	default:
		return bad("log.format", "%q is not text or json", c.Log.Format)
	}
	return nil
}

func (a AuthConfig) validate() error {
	bad := func(key, format string, args ...any) error {
		return &ConfigError{Key: key, Msg: fmt.Sprintf(format, args...)}
	}
	if a.AdminToken != "" && a.AdminTokenFile != "" {
		return bad("auth.admin_token", "set auth.admin_token or auth.admin_token_file, not both")
	}
	if a.JWTSecret != "" && a.JWTSecretFile != "" {
		return bad("auth.jwt_secret", "set auth.jwt_secret or auth.jwt_secret_file, not both")
	}
	for key, f := range map[string]string{"auth.acl_file": a.ACLFile, "auth.admin_token_file": a.AdminTokenFile,
		"auth.jwt_secret_file": a.JWTSecretFile, "auth.jwks_file": a.JWKSFile} {
		if f == "" {
			continue
		}
		if _, err := os.Stat(f); err != nil {
			return bad(key, "%v", err)
		}
	}
	for _, f := range a.PublicKeyFiles() {
		if _, err := os.Stat(f); err != nil {
			return bad("auth.jwt_public_keys", "%v", err)
		}
	}
	tok, err := a.AdminTokenValue()
	if err != nil {
		return err
	}
	if tok != "" && len(tok) < 16 {
		return bad("auth.admin_token", "too short: use at least 16 random bytes (e.g. openssl rand -hex 32)")
	}
	sec, err := a.JWTSecretValue()
	if err != nil {
		return err
	}
	if sec != "" && len(sec) < 32 {
		return bad("auth.jwt_secret", "too short: HS256 needs at least 32 bytes (e.g. openssl rand -hex 32)")
	}
	if a.FailDelay < 0 || a.FailDelay > 10*time.Second {
		return bad("auth.fail_delay", "%s is outside 0s..10s", a.FailDelay)
	}
	switch {
	case a.FailRatePerIP < 0:
		return bad("auth.fail_rate_per_ip", "must not be negative (0 turns the per-address limit off)")
	case a.FailRatePerIP > 0 && a.FailBurst < 1:
		return bad("auth.fail_burst", "must be at least 1 while auth.fail_rate_per_ip is set")
	case a.FailRateGlobal < 0:
		return bad("auth.fail_rate_global", "must not be negative (0 turns the global limit off)")
	case a.FailRateGlobal > 0 && a.FailBurstGlobal < 1:
		return bad("auth.fail_burst_global", "must be at least 1 while auth.fail_rate_global is set")
	case a.BanAfter < 0:
		return bad("auth.ban_after", "must not be negative (0 turns bans off)")
	case a.BanAfter > 0 && (a.BanDuration <= 0 || a.BanDuration > 24*time.Hour):
		return bad("auth.ban_duration", "%s is outside 1s..24h", a.BanDuration)
	}
	return nil
}

func checkAddr(addr string) error {
	if addr == "" {
		return nil
	}
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("%q is not host:port", addr)
	}
	if _, err := strconv.ParseUint(port, 10, 16); err != nil {
		return fmt.Errorf("%q: port %q is not 0..65535", addr, port)
	}
	if host != "" && net.ParseIP(host) == nil && strings.ContainsAny(host, " /") {
		return fmt.Errorf("%q: bad host", addr)
	}
	return nil
}

// IsLoopback reports whether addr binds only loopback interfaces.
func IsLoopback(addr string) bool {
	if addr == "" {
		return true
	}
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// YAML renders the configuration as a YAML document.
func (c Config) YAML() ([]byte, error) {
	// Durations print as "168h0m0s" strings, which Load reads back; paths
	// as absolute ones, which mean the same from any file.
	c = c.absPaths()
	return yaml.Marshal(c.asMap())
}

func (c Config) asMap() yaml.Node {
	var root yaml.Node
	root.Kind = yaml.MappingNode
	var add func(parent *yaml.Node, v reflect.Value, prefix string)
	add = func(parent *yaml.Node, v reflect.Value, prefix string) {
		t := v.Type()
		for i := 0; i < t.NumField(); i++ {
			name := strings.Split(t.Field(i).Tag.Get("yaml"), ",")[0]
			f := v.Field(i)
			parent.Content = append(parent.Content, &yaml.Node{Kind: yaml.ScalarNode, Value: name})
			if f.Kind() == reflect.Struct && f.Type() != reflect.TypeOf(time.Duration(0)) {
				child := &yaml.Node{Kind: yaml.MappingNode}
				add(child, f, prefix+name+".")
				parent.Content = append(parent.Content, child)
				continue
			}
			if f.Kind() == reflect.Slice {
				seq := &yaml.Node{Kind: yaml.SequenceNode}
				for j := 0; j < f.Len(); j++ {
					if e := f.Index(j); e.Kind() == reflect.Struct {
						child := &yaml.Node{Kind: yaml.MappingNode}
						add(child, e, prefix+name+"[].")
						seq.Content = append(seq.Content, child)
					} else {
						seq.Content = append(seq.Content, &yaml.Node{Kind: yaml.ScalarNode, Value: fmt.Sprint(e.Interface()), Style: yaml.DoubleQuotedStyle})
					}
				}
				if len(seq.Content) == 0 {
					seq.Style = yaml.FlowStyle
				}
				parent.Content = append(parent.Content, seq)
				continue
			}
			if prefix+name == "webhooks[].url" || prefix+name == "cluster.redis_url" {
				parent.Content = append(parent.Content, &yaml.Node{Kind: yaml.ScalarNode, Value: redactURL(f.String()), Style: yaml.DoubleQuotedStyle})
				continue
			}
			if secretKeys[prefix+name] && f.String() != "" {
				parent.Content = append(parent.Content, &yaml.Node{Kind: yaml.ScalarNode, Value: "",
					Style: yaml.DoubleQuotedStyle, LineComment: "set, not printed"})
				continue
			}
			val := fmt.Sprint(f.Interface())
			if d, ok := f.Interface().(time.Duration); ok {
				val = d.String()
			}
			node := &yaml.Node{Kind: yaml.ScalarNode, Value: val}
			if f.Kind() == reflect.String {
				node.Style = yaml.DoubleQuotedStyle
			}
			parent.Content = append(parent.Content, node)
		}
	}
	add(&root, reflect.ValueOf(c), "")
	return root
}

// redactURL hides the credentials and query values of a URL (a webhook's
// may carry a token) for printing.
func redactURL(raw string) string {
	u, err := url.Parse(raw)
	if err != nil {
		return "(unparsable URL, not printed)"
	}
	if u.User != nil {
		u.User = url.User("xxxxx")
	}
	if u.RawQuery != "" {
		q := u.Query()
		for k := range q {
			q[k] = []string{"xxxxx"}
		}
		u.RawQuery = q.Encode()
	}
	return u.String()
}

// validFilter reports whether f is an MQTT topic filter.
func validFilter(f string) bool { return devices.ValidFilter(f) == nil }

// validateClientCerts checks the TLS client-certificate keys.
func (m *MQTTConfig) validateClientCerts() error {
	switch {
	case m.TLSClientCA != "" && m.TLSAddr == "":
		return &ConfigError{Key: "mqtt.tls_client_ca", Msg: "set mqtt.tls_addr: client certificates are checked on the TLS listener"}
	case m.TLSRequireClientCert && m.TLSClientCA == "":
		return &ConfigError{Key: "mqtt.tls_require_client_cert", Msg: "needs mqtt.tls_client_ca, the CAs that sign client certificates"}
	case m.TLSIdentity != "" && m.TLSIdentity != "cn" && m.TLSIdentity != "san":
		return &ConfigError{Key: "mqtt.tls_identity", Msg: fmt.Sprintf("%q is not cn or san", m.TLSIdentity)}
	}
	if m.TLSClientCA != "" {
		if _, err := os.Stat(m.TLSClientCA); err != nil {
			return &ConfigError{Key: "mqtt.tls_client_ca", Msg: err.Error()}
		}
	}
	return nil
}
