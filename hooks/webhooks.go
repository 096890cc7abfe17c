package hooks

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/beaconmq/beacon/devices"
	"github.com/beaconmq/beacon/storage"
)

// WebhookConfig is one HTTP endpoint that receives the messages matching
// its topic filters.
type WebhookConfig struct {
	// Name is unique among the webhooks and names the webhook's outbox in
	// the store, its metrics and its log lines. Default "webhook-<index>"
	// (0-based position in the list): give every webhook a name, or
	// reordering the list hands one webhook's undelivered messages to
	// another.
	Name string
	// URL is the http or https endpoint the messages are POSTed to.
	URL string
	// Topics are MQTT topic filters (+ and # allowed). As in MQTT, a
	// leading wildcard does not match $ topics: list "$beacon/presence/#"
	// to get device online/offline events.
	Topics []string
	// Secret, when set, signs every body with HMAC-SHA256, sent as
	// "X-Beacon-Signature: sha256=<hex>".
	Secret string
	// Timeout bounds one attempt, response included. Default 10s.
	Timeout time.Duration
	// MaxRetries is how many attempts follow a failed first one before
	// the message is dropped and counted as expired. Default 10; negative:
	// no retries.
	MaxRetries int
}

// WebhooksOptions configure NewWebhooks.
type WebhooksOptions struct {
	DB    *storage.DB
	Hooks []WebhookConfig
	// Encode makes the JSON body of a message. Called once per message
	// that matches any webhook; the result is kept, so it must not be a
	// buffer Encode reuses.
	// device is the registered device that published it (Message.Device)
	// or ""; tsMillis is when the broker accepted it, unix milliseconds.
	// It runs in Prepare, on the publisher's path: keep it quick.
	Encode func(topic, device string, payload []byte, qos byte, retain bool, tsMillis int64) []byte
	// MaxOutbox is how many undelivered messages a webhook keeps; when it
	// is full the oldest is dropped (if its request is in flight, it may
	// still arrive). Default 10,000. Bodies are kept in memory too, so it
	// bounds memory at MaxOutbox times the largest body per webhook.
	MaxOutbox int
	// Client sends the requests. Default: a client of its own. Redirects
	// are never followed (a 3xx is a failure), also with a client given
	// here.
	Client *http.Client
	Log    *slog.Logger
	// BackoffBase and BackoffMax bound the wait between attempts: it
	// doubles from BackoffBase up to BackoffMax and a uniformly random
	// part of it is waited (full jitter). Defaults 1s and 5m.
	BackoffBase, BackoffMax time.Duration
}

// WebhookStats describe one webhook, for the admin API and metrics.
type WebhookStats struct {
	Name        string    `json:"name"`
	URL         string    `json:"url"`                   // with user info and query values redacted
	Pending     int       `json:"pending"`               // messages in the outbox
	Delivered   int64     `json:"delivered"`             // messages answered with 2xx since start
	Failed      int64     `json:"failed"`                // failed attempts since start
	Dropped     int64     `json:"dropped"`               // messages dropped because the outbox was full
	Expired     int64     `json:"expired"`               // messages dropped after their last retry
	LastStatus  int       `json:"last_status,omitempty"` // HTTP status of the last attempt; 0 when it got none
	LastError   string    `json:"last_error,omitempty"`  // why the last failed attempt failed
	LastSuccess time.Time `json:"last_success,omitzero"` // when an attempt last succeeded
	LastFailure time.Time `json:"last_failure,omitzero"` // when an attempt last failed
}

// Webhooks POSTs accepted messages to HTTP endpoints, at least once and
// in order per webhook, across restarts.
//
// It takes part in the write that accepts a message: Prepare returns a
// record for the outbox of every webhook whose filters match, to be
// committed in the same atomic write as the message, and Committed hands
// the records to the webhooks' delivery goroutines once that write
// committed. An acknowledged message is therefore in the outbox, and a
// message whose write failed in no outbox. Each delivery goroutine POSTs
// its outbox one message at a time, in sequence order, and deletes each
// record once answered with 2xx. A sequence reserved by Prepare is not
// delivered before its Committed arrived, nor skipped: the goroutine
// waits for it, so deliveries follow commit order even when concurrent
// publishers' writes commit out of the order of their Prepare.
//
// Every request carries "X-Beacon-Delivery: <name>-<seq>", unique per
// webhook and never reused (sequences are reserved in the store in
// blocks), so receivers can dedupe retries.
type Webhooks struct {
	db          *storage.DB
	log         *slog.Logger
	encode      func(topic, device string, payload []byte, qos byte, retain bool, tsMillis int64) []byte
	client      *http.Client
	maxOutbox   int
	backoffBase time.Duration
	backoffMax  time.Duration
	hooks       []*webhook

	ctx    context.Context // cancelled by Shutdown: stops deliveries
	cancel context.CancelFunc
	mu     sync.Mutex
	state  int // webhooksNew, webhooksStarted, webhooksStopped
	wg     sync.WaitGroup
}

const (
	webhooksNew = iota
	webhooksStarted
	webhooksStopped
)

// Webhook defaults and limits.
const (
	defaultWebhookTimeout = 10 * time.Second
	defaultWebhookRetries = 10
	defaultMaxOutbox      = 10000
	// maxResponseDrain is how much of a response body is read (and
	// discarded) so the connection can be reused.
	maxResponseDrain = 64 << 10
	// outboxReserveBlock is how many delivery sequences are reserved in
	// the store at a time.
	outboxReserveBlock = 1 << 16
	// dropLogEvery spaces the warnings about a full outbox.
	dropLogEvery = 10 * time.Second
	// commitWaitWarn is how long a delivery goroutine waits for the
	// Committed of a prepared message before it says so: the broker must
	// follow every Prepare with a Committed of the same *Message.
	commitWaitWarn = time.Minute
)

// webhook is the state of one endpoint.
type webhook struct {
	cfg     WebhookConfig // defaults applied
	url     string        // redacted, for logs and stats
	filters [][]string
	wake    chan struct{} // buffered 1: something was queued or dropped

	mu        sync.Mutex
	seq       uint64 // last sequence handed out
	reserved  uint64 // sequences up to this are reserved in the store
	items     []outboxItem
	head      int // items[head:] are in sequence order: prepared, ready or gone
	ready     int // items ready for delivery: the messages in the outbox
	preparing map[preparedKey][]prepared
	nprepared int // prepared items: the entries of preparing

	failing     bool
	lastStatus  int
	lastErr     string
	lastSuccess time.Time
	lastFailure time.Time
	unlogged    int64 // drops not yet logged
	lastDropLog time.Time

	delivered atomic.Int64
	failed    atomic.Int64
	dropped   atomic.Int64
	expired   atomic.Int64
}

// outboxItem is a message of the outbox. body is shared by every webhook
// the message matched and never modified.
type outboxItem struct {
	seq      uint64
	created  int64
	attempts uint32
	state    itemState
	body     []byte
}

// itemState is where an outbox item stands.
type itemState uint8

const (
	itemPrepared itemState = iota // sequence reserved by Prepare; its write has not committed yet
	itemReady                     // stored: to deliver
	itemGone                      // delivered, dropped, expired, or its write failed
)

// prepared is what Committed needs of a Prepare: the sequence reserved,
// and whether the write also carried the webhook's mark and deletes of
// dropped records (written again on their own if the write failed).
type prepared struct {
	seq     uint64
	payload []byte // the message's, to tell apart messages of one key
	mark    bool
	drops   []uint64
}

// preparedKey finds the Prepare of a message in Committed. Not the
// *Message: the broker may build a Message for each call from the same
// accepted message (whose Seq is only known by Committed).
type preparedKey struct {
	topic, client string
	time          int64
}

// NewWebhooks checks the configuration and loads the outboxes from the
// store: undelivered messages of configured webhooks are queued again;
// those of webhooks no longer configured are deleted.
func NewWebhooks(o WebhooksOptions) (*Webhooks, error) {
	if o.DB == nil {
		return nil, errors.New("webhooks: no store")
	}
	if o.Encode == nil && len(o.Hooks) > 0 {
		return nil, errors.New("webhooks: no body encoder")
	}
	if o.MaxOutbox <= 0 {
		o.MaxOutbox = defaultMaxOutbox
	}
	if o.BackoffBase <= 0 {
		o.BackoffBase = time.Second
	}
	if o.BackoffMax <= 0 {
		o.BackoffMax = 5 * time.Minute
	}
	o.BackoffMax = max(o.BackoffMax, o.BackoffBase)
	if o.Log == nil {
		o.Log = slog.Default()
	}
	client := &http.Client{}
	if o.Client != nil {
		c := *o.Client // a shallow copy shares the transport
		client = &c
	}
	client.CheckRedirect = func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }

	ctx, cancel := context.WithCancel(context.Background())
	w := &Webhooks{
		db:          o.DB,
		log:         o.Log,
		encode:      o.Encode,
		client:      client,
		maxOutbox:   o.MaxOutbox,
		backoffBase: o.BackoffBase,
		backoffMax:  o.BackoffMax,
		ctx:         ctx,
		cancel:      cancel,
	}
	names := map[string]bool{}
	for i, c := range o.Hooks {
		h, err := newWebhook(i, c)
		if err != nil {
			cancel()
			return nil, err
		}
		if names[h.cfg.Name] {
			cancel()
			return nil, fmt.Errorf("webhooks[%d].name: %q is used twice", i, h.cfg.Name)
		}
		names[h.cfg.Name] = true
		w.hooks = append(w.hooks, h)
	}
	if err := w.load(); err != nil {
		cancel()
		return nil, err
	}
	return w, nil
}

func newWebhook(i int, c WebhookConfig) (*webhook, error) {
	if c.Name == "" {
		c.Name = "webhook-" + strconv.Itoa(i)
	}
	key := func(field string) string { return fmt.Sprintf("webhooks[%d].%s", i, field) }
	for _, r := range c.Name {
		if r < 0x20 || r == 0x7f {
			return nil, fmt.Errorf("%s: %q has a control character", key("name"), c.Name)
		}
	}
	if len(c.Name) > 200 {
		return nil, fmt.Errorf("%s: longer than 200 bytes", key("name"))
	}
	u, err := url.Parse(c.URL)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", key("url"), err)
	}
	if u.Scheme != "http" && u.Scheme != "https" {
		return nil, fmt.Errorf("%s: scheme %q is not http or https", key("url"), u.Scheme)
	}
	if u.Host == "" {
		return nil, fmt.Errorf("%s: no host", key("url"))
	}
	if len(c.Topics) == 0 {
		return nil, fmt.Errorf("%s: at least one topic filter is needed", key("topics"))
	}
	h := &webhook{url: redactURL(u), wake: make(chan struct{}, 1), preparing: map[preparedKey][]prepared{}}
	for _, f := range c.Topics {
		if err := devices.ValidFilter(f); err != nil {
			return nil, fmt.Errorf("%s: %w", key("topics"), err)
		}
		h.filters = append(h.filters, strings.Split(f, "/"))
	}
	if c.Timeout <= 0 {
		c.Timeout = defaultWebhookTimeout
	}
	switch {
	case c.MaxRetries == 0:
		c.MaxRetries = defaultWebhookRetries
	case c.MaxRetries < 0:
		c.MaxRetries = 0
	}
	h.cfg = c
	return h, nil
}

// redactURL is u for logs and the admin API, with its user info and
// query values (often tokens) replaced.
func redactURL(u *url.URL) string {
	c := *u
	if c.User != nil {
		c.User = url.User("xxxxx")
	}
	if c.RawQuery != "" {
		q := c.Query()
		for k := range q {
			q[k] = []string{"xxxxx"}
		}
		c.RawQuery = q.Encode()
	}
	return c.Redacted()
}

// load reads the outbox of every webhook, deletes what belongs to no
// configured webhook or does not fit MaxOutbox, and reserves a block of
// sequences per webhook.
func (w *Webhooks) load() error {
	byName := make(map[string]*webhook, len(w.hooks))
	for _, h := range w.hooks {
		byName[h.cfg.Name] = h
	}
	stale := map[string]int{} // name -> records
	var ops []storage.Op
	err := w.db.Scan(storage.OutboxPrefix(""), func(key, value []byte) error {
		if name, seq, ok := storage.ParseOutboxKey(key); ok {
			h := byName[name]
			if h == nil {
				stale[name]++
				ops = append(ops, storage.Delete(bytes.Clone(key)))
				return nil
			}
			h.seq = max(h.seq, seq)
			rec, err := storage.DecodeOutbox(value)
			if err != nil {
				w.log.Warn("webhook: dropping a corrupt outbox record", "webhook", name, "seq", seq, "error", err)
				ops = append(ops, storage.Delete(bytes.Clone(key)))
				return nil
			}
			h.items = append(h.items, outboxItem{seq: seq, created: rec.Created, attempts: rec.Attempts, state: itemReady, body: rec.Body})
			h.ready++
			return nil
		}
		if name, ok := storage.ParseOutboxMarkKey(key); ok {
			if h := byName[name]; h == nil {
				stale[name] += 0 // known, even without records
				ops = append(ops, storage.Delete(bytes.Clone(key)))
			} else if len(value) == 8 {
				h.seq = max(h.seq, binary.BigEndian.Uint64(value))
			}
			return nil
		}
		ops = append(ops, storage.Delete(bytes.Clone(key)))
		return nil
	})
	if err != nil {
		return fmt.Errorf("webhooks: load outbox: %w", err)
	}
	for name, n := range stale {
		w.log.Warn("webhook: deleting the outbox of a webhook no longer configured", "webhook", name, "records", n)
	}
	for _, h := range w.hooks {
		if n := h.ready - w.maxOutbox; n > 0 {
			for range n {
				ops = append(ops, storage.Delete(storage.OutboxKey(h.cfg.Name, h.dropOldest())))
			}
			h.compact()
			h.dropped.Add(int64(n))
			w.log.Warn("webhook: outbox over max_outbox at start, dropped the oldest", "webhook", h.cfg.Name, "dropped", n)
		}
		h.reserved = h.seq + outboxReserveBlock
		ops = append(ops, storage.Set(storage.OutboxMarkKey(h.cfg.Name), binary.BigEndian.AppendUint64(nil, h.reserved)))
		if n := h.ready; n > 0 {
			w.log.Info("webhook: undelivered messages loaded", "webhook", h.cfg.Name, "pending", n)
		}
	}
	// In pieces: a removed webhook or a shrunk max_outbox can mean more
	// deletes than one transaction takes.
	for len(ops) > 0 {
		n := min(len(ops), 4096)
		if err := w.db.Write(ops[:n]...); err != nil {
			return fmt.Errorf("webhooks: store outbox: %w", err)
		}
		ops = ops[n:]
	}
	return nil
}

// Stats returns the state of every webhook, in configuration order.
func (w *Webhooks) Stats() []WebhookStats {
	out := make([]WebhookStats, 0, len(w.hooks))
	for _, h := range w.hooks {
		h.mu.Lock()
		s := WebhookStats{
			Name:        h.cfg.Name,
			URL:         h.url,
			Pending:     h.ready,
			LastStatus:  h.lastStatus,
			LastError:   h.lastErr,
			LastSuccess: h.lastSuccess,
			LastFailure: h.lastFailure,
		}
		h.mu.Unlock()
		s.Delivered = h.delivered.Load()
		s.Failed = h.failed.Load()
		s.Dropped = h.dropped.Load()
		s.Expired = h.expired.Load()
		out = append(out, s)
	}
	return out
}

// Handler answers GET with {"webhooks": [stats...]}. It does no
// authentication: mount it behind the admin API's.
func (w *Webhooks) Handler() http.Handler {
	return http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
		rw.Header().Set("Content-Type", "application/json")
		rw.Header().Set("Cache-Control", "no-store")
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			rw.Header().Set("Allow", "GET, HEAD")
			rw.WriteHeader(http.StatusMethodNotAllowed)
			_ = json.NewEncoder(rw).Encode(map[string]string{"error": "method not allowed"})
			return
		}
		_ = json.NewEncoder(rw).Encode(struct {
			Webhooks []WebhookStats `json:"webhooks"`
		}{w.Stats()})
	})
}
