package hooks

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

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
	// device is the registered device that published it, or "".
	Encode func(topic, device string, payload []byte, qos byte, retain bool, tsMillis int64) []byte
	// DeviceOf, when set, names the registered device behind a client.
	DeviceOf func(cl *mqtt.Client) string
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

// Webhooks POSTs routed messages to HTTP endpoints, at least once and in
// order per webhook, across restarts.
//
// OnPublished queues a record of every matching message in the webhook's
// outbox in the store (without waiting for the commit) and wakes the
// webhook's delivery goroutine, which POSTs the outbox one message at a
// time and deletes each record once answered with 2xx. Add the hook before
// the Store hook: its records are then queued before the store deletes the
// message from the ingress log, so a crash cannot lose an acknowledged
// QoS 1/2 message (it may deliver it twice: a message routed again from
// the ingress log is queued again, under a new delivery id).
//
// Every request carries "X-Beacon-Delivery: <name>-<seq>", unique per
// webhook and never reused (sequences are reserved in the store in
// blocks), so receivers can dedupe retries.
type Webhooks struct {
	mqtt.HookBase
	db          *storage.DB
	log         *slog.Logger
	encode      func(topic, device string, payload []byte, qos byte, retain bool, tsMillis int64) []byte
	deviceOf    func(cl *mqtt.Client) string
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
)

var _ mqtt.Hook = (*Webhooks)(nil)

// webhook is the state of one endpoint.
type webhook struct {
	cfg     WebhookConfig // defaults applied
	url     string        // redacted, for logs and stats
	filters [][]string
	wake    chan struct{} // buffered 1: something was queued or dropped

	mu          sync.Mutex
	seq         uint64 // last sequence handed out
	reserved    uint64 // sequences up to this are reserved in the store
	items       []outboxItem
	head        int // items[head:] are pending, oldest first
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

// outboxItem is a pending message. body is shared by every webhook the
// message matched and never modified.
type outboxItem struct {
	seq      uint64
	created  int64
	attempts uint32
	body     []byte
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
		deviceOf:    o.DeviceOf,
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
	h := &webhook{url: redactURL(u), wake: make(chan struct{}, 1)}
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
			h.items = append(h.items, outboxItem{seq: seq, created: rec.Created, attempts: rec.Attempts, body: rec.Body})
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
		if n := h.pending() - w.maxOutbox; n > 0 {
			for range n {
				ops = append(ops, storage.Delete(storage.OutboxKey(h.cfg.Name, h.pop().seq)))
			}
			h.dropped.Add(int64(n))
			w.log.Warn("webhook: outbox over max_outbox at start, dropped the oldest", "webhook", h.cfg.Name, "dropped", n)
		}
		h.reserved = h.seq + outboxReserveBlock
		ops = append(ops, storage.Set(storage.OutboxMarkKey(h.cfg.Name), binary.BigEndian.AppendUint64(nil, h.reserved)))
		if n := h.pending(); n > 0 {
			w.log.Info("webhook: undelivered messages loaded", "webhook", h.cfg.Name, "pending", n)
		}
	}
	// In pieces: a removed webhook or a shrunk max_outbox can mean more
	// deletes than one transaction takes.
	for len(ops) > 0 {
		n := min(len(ops), 4096)
		if err := w.db.Commit(ops[:n]...); err != nil {
			return fmt.Errorf("webhooks: store outbox: %w", err)
		}
		ops = ops[n:]
	}
	return nil
}

// ID implements mqtt.Hook.
func (w *Webhooks) ID() string { return "beacon-webhooks" }

// Provides implements mqtt.Hook.
func (w *Webhooks) Provides(b byte) bool { return b == mqtt.OnPublished && len(w.hooks) > 0 }

// OnPublished queues a routed message for every webhook whose filters
// match its topic.
func (w *Webhooks) OnPublished(cl *mqtt.Client, pk packets.Packet) {
	if pk.Ignore || pk.FixedHeader.Type != packets.Publish {
		return
	}
	var body []byte
	var ts int64
	encoded := false
	for _, h := range w.hooks {
		if !h.matches(pk.TopicName) {
			continue
		}
		if !encoded {
			ts = time.Now().UnixMilli()
			device := ""
			if w.deviceOf != nil {
				device = w.deviceOf(cl)
			}
			body = w.encode(pk.TopicName, device, pk.Payload, pk.FixedHeader.Qos, pk.FixedHeader.Retain, ts)
			encoded = true
		}
		w.enqueue(h, body, ts)
	}
}

func (h *webhook) matches(topic string) bool {
	for _, f := range h.filters {
		if devices.MatchesTopic(f, topic) {
			return true
		}
	}
	return false
}

// enqueue adds a message to h's outbox, dropping the oldest when full.
// The store write is queued under h.mu: a delivery (and the delete of its
// record) cannot overtake it.
func (w *Webhooks) enqueue(h *webhook, body []byte, created int64) {
	rec := storage.AppendOutbox(make([]byte, 0, storage.OutboxRecordSize(len(body))), &storage.OutboxRecord{Created: created, Body: body})
	name := h.cfg.Name
	h.mu.Lock()
	w.reserve(h)
	h.seq++
	h.items = append(h.items, outboxItem{seq: h.seq, created: created, body: body})
	ops := []storage.Op{storage.Set(storage.OutboxKey(name, h.seq), rec)}
	var logDrops int64
	if h.pending() > w.maxOutbox {
		for h.pending() > w.maxOutbox {
			ops = append(ops, storage.Delete(storage.OutboxKey(name, h.pop().seq)))
			h.dropped.Add(1)
			h.unlogged++
		}
		if now := time.Now(); now.Sub(h.lastDropLog) >= dropLogEvery {
			h.lastDropLog = now
			logDrops, h.unlogged = h.unlogged, 0
		}
	}
	w.db.WriteAsync(ops...)
	h.mu.Unlock()
	h.signal()
	if logDrops > 0 {
		w.log.Warn("webhook: outbox full, dropped the oldest messages", "webhook", name, "url", h.url,
			"dropped", logDrops, "max_outbox", w.maxOutbox)
	}
}

// reserve makes sure the next sequence is reserved in the store, so it is
// never handed out again after a crash. One commit per block. Called with
// h.mu held.
func (w *Webhooks) reserve(h *webhook) {
	if h.seq < h.reserved {
		return
	}
	next := h.seq + outboxReserveBlock
	if err := w.db.Commit(storage.Set(storage.OutboxMarkKey(h.cfg.Name), binary.BigEndian.AppendUint64(nil, next))); err != nil {
		w.log.Error("webhook: reserve delivery sequences", "webhook", h.cfg.Name, "error", err)
		return
	}
	h.reserved = next
}

func (h *webhook) signal() {
	select {
	case h.wake <- struct{}{}:
	default:
	}
}

// pending is the number of messages in the outbox. Called with h.mu held.
func (h *webhook) pending() int { return len(h.items) - h.head }

// pop removes the oldest message. Called with h.mu held.
func (h *webhook) pop() outboxItem {
	it := h.items[h.head]
	h.items[h.head] = outboxItem{}
	h.head++
	switch {
	case h.head == len(h.items):
		h.items, h.head = h.items[:0], 0
	case h.head > 1024 && h.head*2 >= len(h.items):
		n := copy(h.items, h.items[h.head:])
		clear(h.items[n:])
		h.items, h.head = h.items[:n], 0
	}
	return it
}

// front returns the oldest message.
func (h *webhook) front() (outboxItem, bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.pending() == 0 {
		return outboxItem{}, false
	}
	return h.items[h.head], true
}

// isFront reports whether seq is still the oldest message. Called with
// h.mu held.
func (h *webhook) isFront(seq uint64) bool {
	return h.pending() > 0 && h.items[h.head].seq == seq
}

// Start starts one delivery goroutine per webhook. Call it once the
// broker has restored its state; messages queued before are delivered
// then.
func (w *Webhooks) Start() {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.state != webhooksNew {
		return
	}
	w.state = webhooksStarted
	for _, h := range w.hooks {
		w.wg.Add(1)
		go w.run(h)
	}
}

// Shutdown stops the deliveries, cancelling requests in flight. Messages
// not delivered stay in the store for the next start (a message whose
// request was cancelled may have arrived: it is sent again). Call it after
// the engine has stopped and before the store closes. It is idempotent.
func (w *Webhooks) Shutdown(ctx context.Context) error {
	w.mu.Lock()
	w.state = webhooksStopped
	w.mu.Unlock()
	w.cancel()
	stopped := make(chan struct{})
	go func() { w.wg.Wait(); close(stopped) }()
	select {
	case <-stopped:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("webhooks: %w", ctx.Err())
	}
}

// run delivers h's outbox in order, one message at a time, until Shutdown.
func (w *Webhooks) run(h *webhook) {
	defer w.wg.Done()
	ctx := w.ctx
	var mac hash.Hash
	if h.cfg.Secret != "" {
		mac = hmac.New(sha256.New, []byte(h.cfg.Secret))
	}
	for {
		it, ok := h.front()
		if !ok {
			select {
			case <-ctx.Done():
				return
			case <-h.wake:
			}
			continue
		}
		status, err := w.post(ctx, h, mac, it)
		if err == nil {
			w.delivered(h, it.seq, status)
			continue
		}
		if ctx.Err() != nil {
			return // shutting down: not a failure of the endpoint
		}
		attempts, retry := w.failed(h, it, status, err)
		if retry && !w.sleep(ctx, h, it.seq, w.backoff(attempts)) {
			return
		}
	}
}

// post makes one attempt to deliver it. A nil error is a 2xx answer.
func (w *Webhooks) post(ctx context.Context, h *webhook, mac hash.Hash, it outboxItem) (int, error) {
	ctx, cancel := context.WithTimeout(ctx, h.cfg.Timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, h.cfg.URL, bytes.NewReader(it.body))
	if err != nil {
		return 0, err
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("User-Agent", "beacon-webhook")
	req.Header.Set("X-Beacon-Delivery", h.cfg.Name+"-"+strconv.FormatUint(it.seq, 10))
	req.Header.Set("X-Beacon-Attempt", strconv.FormatUint(uint64(it.attempts)+1, 10))
	if mac != nil {
		mac.Reset()
		mac.Write(it.body)
		req.Header.Set("X-Beacon-Signature", "sha256="+hex.EncodeToString(mac.Sum(nil)))
	}
	resp, err := w.client.Do(req)
	if err != nil {
		// The url.Error would repeat the URL, query and all.
		if ue := (*url.Error)(nil); errors.As(err, &ue) {
			err = ue.Err
		}
		if errors.Is(err, context.DeadlineExceeded) {
			err = fmt.Errorf("no response within %s", h.cfg.Timeout)
		}
		return 0, err
	}
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, maxResponseDrain))
	_ = resp.Body.Close()
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		return resp.StatusCode, fmt.Errorf("status %s", resp.Status)
	}
	return resp.StatusCode, nil
}

// delivered removes a delivered message from the outbox (unless it was
// dropped meanwhile).
func (w *Webhooks) delivered(h *webhook, seq uint64, status int) {
	h.mu.Lock()
	recovered := h.failing
	h.failing = false
	h.lastStatus = status
	h.lastSuccess = time.Now()
	if h.isFront(seq) {
		h.pop()
		h.delivered.Add(1)
		w.db.WriteAsync(storage.Delete(storage.OutboxKey(h.cfg.Name, seq)))
	}
	h.mu.Unlock()
	if recovered {
		w.log.Info("webhook: delivering again", "webhook", h.cfg.Name, "url", h.url)
	}
}

// failed records a failed attempt and says whether to retry after the
// given number of attempts; a message out of retries is dropped.
func (w *Webhooks) failed(h *webhook, it outboxItem, status int, err error) (attempts uint32, retry bool) {
	h.failed.Add(1)
	h.mu.Lock()
	first := !h.failing
	h.failing = true
	h.lastStatus = status
	h.lastErr = err.Error()
	h.lastFailure = time.Now()
	if !h.isFront(it.seq) { // dropped meanwhile
		h.mu.Unlock()
		return 0, false
	}
	cur := &h.items[h.head]
	cur.attempts++
	attempts = cur.attempts
	key := storage.OutboxKey(h.cfg.Name, it.seq)
	expired := int(attempts) > h.cfg.MaxRetries
	if expired {
		h.pop()
		h.expired.Add(1)
		w.db.WriteAsync(storage.Delete(key))
	} else {
		// Keep the count across restarts, so retries stay bounded.
		rec := &storage.OutboxRecord{Attempts: attempts, Created: it.created, Body: it.body}
		w.db.WriteAsync(storage.Set(key, storage.AppendOutbox(make([]byte, 0, storage.OutboxRecordSize(len(it.body))), rec)))
	}
	h.mu.Unlock()

	switch {
	case expired:
		w.log.Warn("webhook: giving up on a message", "webhook", h.cfg.Name, "url", h.url, "seq", it.seq,
			"attempts", attempts, "status", status, "error", err)
	case first:
		w.log.Warn("webhook: delivery failed, retrying", "webhook", h.cfg.Name, "url", h.url, "seq", it.seq,
			"status", status, "error", err)
	default:
		w.log.Debug("webhook: delivery failed", "webhook", h.cfg.Name, "seq", it.seq, "attempts", attempts,
			"status", status, "error", err)
	}
	return attempts, !expired
}

// backoff is the wait after the given number of failed attempts:
// uniformly random up to BackoffBase * 2^(attempts-1), capped at
// BackoffMax.
func (w *Webhooks) backoff(attempts uint32) time.Duration {
	d := w.backoffBase
	for i := uint32(1); i < attempts && d < w.backoffMax; i++ {
		d *= 2
	}
	d = min(d, w.backoffMax)
	return time.Duration(rand.Int64N(int64(d) + 1))
}

// sleep waits d before the next attempt at seq; it returns early when seq
// was dropped meanwhile, and false on Shutdown.
func (w *Webhooks) sleep(ctx context.Context, h *webhook, seq uint64, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return false
		case <-t.C:
			return true
		case <-h.wake:
			h.mu.Lock()
			gone := !h.isFront(seq)
			h.mu.Unlock()
			if gone {
				return true
			}
		}
	}
}

// Stats returns the state of every webhook, in configuration order.
func (w *Webhooks) Stats() []WebhookStats {
	out := make([]WebhookStats, 0, len(w.hooks))
	for _, h := range w.hooks {
		h.mu.Lock()
		s := WebhookStats{
			Name:        h.cfg.Name,
			URL:         h.url,
			Pending:     h.pending(),
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
