package hooks

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/beaconmq/beacon/storage"
)

// webhookBody is what testEncode makes and the receiver reads back.
type webhookBody struct {
	Topic   string `json:"topic"`
	Device  string `json:"device,omitempty"`
	Payload string `json:"payload"`
	QoS     byte   `json:"qos"`
	Retain  bool   `json:"retain"`
	TS      int64  `json:"ts"`
}

func testEncode(topic, device string, payload []byte, qos byte, retain bool, ts int64) []byte {
	b, err := json.Marshal(webhookBody{Topic: topic, Device: device, Payload: string(payload), QoS: qos, Retain: retain, TS: ts})
	if err != nil {
		panic(err)
	}
	return b
}

// delivery is one request the receiver accepted.
type delivery struct {
	webhookBody
	header http.Header
	body   []byte
}

// receiver is a real HTTP endpoint. respond decides the answer to the
// n-th request (from 1) and reports whether it accepted the message.
type receiver struct {
	srv    *httptest.Server
	secret string

	mu       sync.Mutex
	respond  func(n int, w http.ResponseWriter, r *http.Request) bool
	requests int
	tried    []string // payload of every request, answered or not
	got      []delivery
	badSig   int
}

func newReceiver(t *testing.T, secret string, respond func(n int, w http.ResponseWriter, r *http.Request) bool) *receiver {
	t.Helper()
	rc := &receiver{secret: secret, respond: respond}
	rc.srv = httptest.NewServer(http.HandlerFunc(rc.serve))
	t.Cleanup(rc.srv.Close)
	return rc
}

func (rc *receiver) serve(w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(r.Body)
	if err != nil {
		return
	}
	if rc.secret != "" {
		mac := hmac.New(sha256.New, []byte(rc.secret))
		mac.Write(body)
		want := "sha256=" + hex.EncodeToString(mac.Sum(nil))
		if !hmac.Equal([]byte(r.Header.Get("X-Beacon-Signature")), []byte(want)) {
			rc.mu.Lock()
			rc.badSig++
			rc.mu.Unlock()
			http.Error(w, "bad signature", http.StatusUnauthorized)
			return
		}
	}
	d := delivery{header: r.Header.Clone(), body: body}
	if err := json.Unmarshal(body, &d.webhookBody); err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	rc.mu.Lock()
	rc.requests++
	rc.tried = append(rc.tried, d.Payload)
	n, respond := rc.requests, rc.respond
	rc.mu.Unlock()
	if !respond(n, w, r) {
		return
	}
	rc.mu.Lock()
	rc.got = append(rc.got, d)
	rc.mu.Unlock()
}

func (rc *receiver) setRespond(f func(n int, w http.ResponseWriter, r *http.Request) bool) {
	rc.mu.Lock()
	defer rc.mu.Unlock()
	rc.respond = f
}

func (rc *receiver) accepted() []delivery {
	rc.mu.Lock()
	defer rc.mu.Unlock()
	return slices.Clone(rc.got)
}

func (rc *receiver) triedPayloads() []string {
	rc.mu.Lock()
	defer rc.mu.Unlock()
	return slices.Clone(rc.tried)
}

func (rc *receiver) stats() (requests, badSig int) {
	rc.mu.Lock()
	defer rc.mu.Unlock()
	return rc.requests, rc.badSig
}

func respondOK(int, http.ResponseWriter, *http.Request) bool { return true }

func respondStatus(code int) func(int, http.ResponseWriter, *http.Request) bool {
	return func(_ int, w http.ResponseWriter, _ *http.Request) bool {
		w.WriteHeader(code)
		return false
	}
}

// payloads lists the payloads of ds in order.
func payloads(ds []delivery) []string {
	out := make([]string, len(ds))
	for i, d := range ds {
		out[i] = d.Payload
	}
	return out
}

func numbered(from, to int) []string {
	var out []string
	for i := from; i < to; i++ {
		out = append(out, strconv.Itoa(i))
	}
	return out
}

// waitFor polls cond until it holds or timeout passes; what names it in the failure.
func waitFor(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// openWebhookDB opens a store whose Write returns once committed, as the
// engine's does under storage.sync batch.
func openWebhookDB(t *testing.T, dir string) *storage.DB {
	t.Helper()
	db, err := storage.Open(storage.Options{Dir: dir, Sync: storage.SyncBatch, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = db.Shutdown(context.Background()) })
	return db
}

// newTestWebhooks builds and starts webhooks with test defaults: fast
// backoff, retries that outlast any test.
func newTestWebhooks(t *testing.T, db *storage.DB, o WebhooksOptions, start bool) *Webhooks {
	t.Helper()
	o.DB = db
	if o.Encode == nil {
		o.Encode = testEncode
	}
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	if o.BackoffBase == 0 {
		o.BackoffBase, o.BackoffMax = time.Millisecond, 10*time.Millisecond
	}
	w, err := NewWebhooks(o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = w.Shutdown(context.Background()) })
	if start {
		w.Start()
	}
	return w
}

func testMessage(topic, payload string) *Message {
	return &Message{Topic: topic, Payload: []byte(payload), QoS: 1, Client: "c1", Time: time.Now().UnixNano()}
}

// asCommitted is m as the broker hands it to Committed: another Message
// built from the same accepted message, numbered by then.
func asCommitted(m *Message) *Message {
	c := *m
	c.Seq = 1
	return &c
}

// accept does what the engine and the broker do with a message: Prepare,
// one write of the message's ops, Committed with the write's result.
func accept(t *testing.T, db *storage.DB, w *Webhooks, m *Message) {
	t.Helper()
	ops := w.Prepare(m)
	var err error
	if len(ops) > 0 {
		err = db.Write(ops...)
	}
	w.Committed(asCommitted(m), err)
	if err != nil {
		t.Fatal(err)
	}
}

func publishTo(t *testing.T, db *storage.DB, w *Webhooks, topic, payload string) {
	t.Helper()
	accept(t, db, w, testMessage(topic, payload))
}

// barrier returns once every write queued before is committed.
func barrier(t *testing.T, db *storage.DB) {
	t.Helper()
	if err := db.Write(); err != nil {
		t.Fatal(err)
	}
}

// outboxRecords counts the records (not marks) stored for a webhook once
// every queued write is committed.
func outboxRecords(t *testing.T, db *storage.DB, name string) int {
	t.Helper()
	barrier(t, db)
	n := 0
	err := db.Scan(storage.OutboxPrefix(name), func(key, _ []byte) error {
		if _, _, ok := storage.ParseOutboxKey(key); ok {
			n++
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return n
}

func statsOf(t *testing.T, w *Webhooks, name string) WebhookStats {
	t.Helper()
	for _, s := range w.Stats() {
		if s.Name == name {
			return s
		}
	}
	t.Fatalf("no webhook %q", name)
	return WebhookStats{}
}

const forever = 1 << 30 // MaxRetries that no test exhausts

func TestWebhooksDeliverSignedInOrder(t *testing.T) {
	signed := newReceiver(t, "s3cret", respondOK)
	plain := newReceiver(t, "", respondOK)
	db := openWebhookDB(t, t.TempDir())
	w := newTestWebhooks(t, db, WebhooksOptions{Hooks: []WebhookConfig{
		{Name: "signed", URL: signed.srv.URL + "/hook", Secret: "s3cret", Topics: []string{"sensors/+/temp", "$beacon/presence/#"}},
		{URL: plain.srv.URL, Topics: []string{"#"}}, // default name webhook-1
	}}, true)

	m := testMessage("sensors/a/temp", "1")
	m.Device, m.Time = "dev-a", time.Date(2030, 1, 2, 3, 4, 5, 6e6, time.UTC).UnixNano()
	accept(t, db, w, m)
	publishTo(t, db, w, "sensors/a/hum", "2")
	publishTo(t, db, w, "$beacon/presence/dev1", "3")
	publishTo(t, db, w, "alerts/fire", "4")
	if ops := w.Prepare(testMessage("$SYS/broker/uptime", "x")); ops != nil {
		t.Errorf("Prepare of a message no webhook matches: %d ops, want nil", len(ops))
	}
	for i := 5; i < 25; i++ {
		publishTo(t, db, w, "sensors/b/temp", strconv.Itoa(i))
	}

	wantSigned := append([]string{"1", "3"}, numbered(5, 25)...)
	wantPlain := append([]string{"1", "2", "4"}, numbered(5, 25)...) // no $ topic through "#"
	waitFor(t, 5*time.Second, "deliveries", func() bool {
		return len(signed.accepted()) >= len(wantSigned) && len(plain.accepted()) >= len(wantPlain)
	})
	if got := payloads(signed.accepted()); !slices.Equal(got, wantSigned) {
		t.Errorf("signed webhook got %v, want %v", got, wantSigned)
	}
	if got := payloads(plain.accepted()); !slices.Equal(got, wantPlain) {
		t.Errorf("plain webhook got %v, want %v", got, wantPlain)
	}
	if _, bad := signed.stats(); bad != 0 {
		t.Errorf("%d requests with a bad signature", bad)
	}
	if first := signed.accepted()[0]; first.Device != "dev-a" || first.TS != time.Date(2030, 1, 2, 3, 4, 5, 6e6, time.UTC).UnixMilli() {
		t.Errorf("first body: device %q ts %d, want the message's device and time in milliseconds", first.Device, first.TS)
	}

	for _, tc := range []struct {
		name string
		rc   *receiver
		sig  bool
	}{{"signed", signed, true}, {"webhook-1", plain, false}} {
		var last uint64
		for i, d := range tc.rc.accepted() {
			h := d.header
			if h.Get("Content-Type") != "application/json" || h.Get("User-Agent") != "beacon-webhook" || h.Get("X-Beacon-Attempt") != "1" {
				t.Errorf("%s #%d: headers %v", tc.name, i, h)
			}
			if got := h.Get("X-Beacon-Signature") != ""; got != tc.sig {
				t.Errorf("%s #%d: signature present %v, want %v", tc.name, i, got, tc.sig)
			}
			id, ok := strings.CutPrefix(h.Get("X-Beacon-Delivery"), tc.name+"-")
			seq, err := strconv.ParseUint(id, 10, 64)
			if !ok || err != nil || seq <= last {
				t.Errorf("%s #%d: delivery id %q after sequence %d", tc.name, i, h.Get("X-Beacon-Delivery"), last)
			}
			last = seq
			if d.QoS != 1 || d.TS == 0 {
				t.Errorf("%s #%d: body %s", tc.name, i, d.body)
			}
		}
	}
	// The receiver answered the last request before the webhook counted
	// it and removed its outbox record: wait for both.
	waitFor(t, 5*time.Second, "the last delivery recorded", func() bool {
		s := statsOf(t, w, "signed")
		return s.Delivered == int64(len(wantSigned)) && s.Pending == 0 && outboxRecords(t, db, "signed") == 0
	})
	s := statsOf(t, w, "signed")
	if s.Delivered != int64(len(wantSigned)) || s.Failed != 0 || s.Pending != 0 || s.LastStatus != 200 || s.LastSuccess.IsZero() {
		t.Errorf("stats: %+v", s)
	}
	if n := outboxRecords(t, db, "signed"); n != 0 {
		t.Errorf("%d records left in the outbox after delivery", n)
	}
}

// deliveryIDs lists the sequences of the X-Beacon-Delivery ids of ds.
func deliveryIDs(t *testing.T, name string, ds []delivery) []uint64 {
	t.Helper()
	out := make([]uint64, len(ds))
	for i, d := range ds {
		id, ok := strings.CutPrefix(d.header.Get("X-Beacon-Delivery"), name+"-")
		seq, err := strconv.ParseUint(id, 10, 64)
		if !ok || err != nil {
			t.Fatalf("delivery %d: id %q", i, d.header.Get("X-Beacon-Delivery"))
		}
		out[i] = seq
	}
	return out
}

func TestWebhooksWaitForALowerSequenceToCommit(t *testing.T) {
	rc := newReceiver(t, "", respondOK)
	db := openWebhookDB(t, t.TempDir())
	w := newTestWebhooks(t, db, WebhooksOptions{Hooks: []WebhookConfig{{Name: "o", URL: rc.srv.URL, Topics: []string{"#"}}}}, true)

	// Two publishers: a prepares first, but b's write commits first.
	a, b := testMessage("t", "a"), testMessage("t", "b")
	opsA, opsB := w.Prepare(a), w.Prepare(b)
	if err := db.Write(opsB...); err != nil {
		t.Fatal(err)
	}
	w.Committed(asCommitted(b), nil)
	// The delivery goroutine must wait for a's outcome, not send b. A
	// short look for a request that must not come.
	time.Sleep(50 * time.Millisecond)
	if n, _ := rc.stats(); n != 0 {
		t.Fatalf("%d requests before the lower sequence committed: %v", n, rc.triedPayloads())
	}
	if s := statsOf(t, w, "o"); s.Pending != 1 {
		t.Errorf("pending %d, want 1 (b stored, a not yet)", s.Pending)
	}
	if err := db.Write(opsA...); err != nil {
		t.Fatal(err)
	}
	w.Committed(a, nil)
	waitFor(t, 5*time.Second, "2 deliveries", func() bool { return len(rc.accepted()) == 2 })
	got := rc.accepted()
	if p := payloads(got); !slices.Equal(p, []string{"a", "b"}) {
		t.Errorf("delivered %v, want [a b]", p)
	}
	if ids := deliveryIDs(t, "o", got); ids[0] >= ids[1] {
		t.Errorf("delivery ids %v not increasing", ids)
	}
}

func TestWebhooksFailedCommitDeliversNothing(t *testing.T) {
	rc := newReceiver(t, "", respondOK)
	db := openWebhookDB(t, t.TempDir())
	w := newTestWebhooks(t, db, WebhooksOptions{Hooks: []WebhookConfig{{Name: "f", URL: rc.srv.URL, Topics: []string{"#"}}}}, true)

	a, b, c := testMessage("t", "a"), testMessage("t", "b"), testMessage("t", "c")
	w.Prepare(a)
	opsB, opsC := w.Prepare(b), w.Prepare(c)
	// a's write failed: nothing of it was stored, and the deliveries
	// waiting for it go on.
	w.Committed(a, errors.New("write failed"))
	for _, x := range []struct {
		m   *Message
		ops []storage.Op
	}{{b, opsB}, {c, opsC}} {
		if err := db.Write(x.ops...); err != nil {
			t.Fatal(err)
		}
		w.Committed(x.m, nil)
	}
	waitFor(t, 5*time.Second, "2 deliveries", func() bool { return statsOf(t, w, "f").Delivered == 2 })
	if p := payloads(rc.accepted()); !slices.Equal(p, []string{"b", "c"}) {
		t.Errorf("delivered %v, want [b c]", p)
	}
	if s := statsOf(t, w, "f"); s.Pending != 0 || s.Failed != 0 || s.Dropped != 0 {
		t.Errorf("stats: %+v", s)
	}
	if n := outboxRecords(t, db, "f"); n != 0 {
		t.Errorf("%d records left", n)
	}
}

func TestWebhooksCommittedFindsItsPrepare(t *testing.T) {
	rc := newReceiver(t, "", respondOK)
	db := openWebhookDB(t, t.TempDir())
	w := newTestWebhooks(t, db, WebhooksOptions{Hooks: []WebhookConfig{{Name: "k", URL: rc.srv.URL, Topics: []string{"#"}}}}, true)

	// Three messages of one client, topic and nanosecond (the broker's
	// own publishes from several goroutines can be). Committed gets copies,
	// c's with a copy of the payload too, and out of order; the failed
	// write is c's.
	now := time.Now().UnixNano()
	msgs := []*Message{testMessage("t", "a"), testMessage("t", "b"), testMessage("t", "c")}
	var ops [][]storage.Op
	for _, m := range msgs {
		m.Client, m.Time = "", now
		ops = append(ops, w.Prepare(m))
	}
	c := asCommitted(msgs[2])
	c.Payload = []byte("c")
	w.Committed(c, errors.New("write failed"))
	for _, i := range []int{0, 1} {
		if err := db.Write(ops[i]...); err != nil {
			t.Fatal(err)
		}
	}
	w.Committed(asCommitted(msgs[1]), nil)
	w.Committed(asCommitted(msgs[0]), nil)

	waitFor(t, 5*time.Second, "2 deliveries", func() bool { return statsOf(t, w, "k").Delivered == 2 })
	if p := payloads(rc.accepted()); !slices.Equal(p, []string{"a", "b"}) {
		t.Errorf("delivered %v, want [a b]", p)
	}
	if n := outboxRecords(t, db, "k"); n != 0 {
		t.Errorf("%d records left", n)
	}
}

func TestWebhooksConcurrentPublishersDeliverInCommitOrder(t *testing.T) {
	all := newReceiver(t, "", respondOK)
	even := newReceiver(t, "k", respondOK)
	db := openWebhookDB(t, t.TempDir())
	w := newTestWebhooks(t, db, WebhooksOptions{Hooks: []WebhookConfig{
		{Name: "all", URL: all.srv.URL, Topics: []string{"p/#"}},
		{Name: "even", URL: even.srv.URL, Topics: []string{"p/+/even"}, Secret: "k"},
	}}, true)

	const publishers, each = 8, 60
	var mu sync.Mutex
	committed := map[string]bool{} // payloads whose write committed
	var wg sync.WaitGroup
	for g := range publishers {
		wg.Go(func() {
			for i := range each {
				kind := "odd"
				if i%2 == 0 {
					kind = "even"
				}
				payload := fmt.Sprintf("%d-%03d", g, i)
				m := testMessage("p/"+strconv.Itoa(g)+"/"+kind, payload)
				ops := w.Prepare(m)
				if i%4 == 1 {
					time.Sleep(time.Duration(g*50) * time.Microsecond) // let other publishers' writes overtake
				}
				if i%9 == 4 { // a write that fails: nothing stored, nothing delivered
					w.Committed(asCommitted(m), errors.New("write failed"))
					continue
				}
				err := db.Write(ops...)
				w.Committed(asCommitted(m), err)
				if err != nil {
					t.Error(err)
					return
				}
				mu.Lock()
				committed[payload] = true
				mu.Unlock()
			}
		})
	}
	wg.Wait()

	for _, tc := range []struct {
		name string
		rc   *receiver
		keep func(payload string) bool
	}{
		{"all", all, func(string) bool { return true }},
		{"even", even, func(p string) bool { i, _ := strconv.Atoi(p[strings.IndexByte(p, '-')+1:]); return i%2 == 0 }},
	} {
		var want []string
		for p := range committed {
			if tc.keep(p) {
				want = append(want, p)
			}
		}
		waitFor(t, 10*time.Second, tc.name+" deliveries", func() bool { return len(tc.rc.accepted()) >= len(want) })
		got := tc.rc.accepted()
		// In sequence order, none skipped, none of a failed write.
		if ids := deliveryIDs(t, tc.name, got); !slices.IsSorted(ids) || len(slices.Compact(slices.Clone(ids))) != len(ids) {
			t.Errorf("%s: delivery ids out of order: %v", tc.name, ids)
		}
		p := payloads(got)
		if gotSet := slices.Sorted(slices.Values(p)); !slices.Equal(gotSet, slices.Sorted(slices.Values(want))) {
			t.Errorf("%s: delivered %d messages, want the %d committed ones", tc.name, len(p), len(want))
		}
		// Each publisher's messages in its order.
		last := map[string]string{}
		for _, x := range p {
			g := x[:strings.IndexByte(x, '-')]
			if x <= last[g] {
				t.Errorf("%s: %s delivered after %s", tc.name, x, last[g])
			}
			last[g] = x
		}
		if n, bad := tc.rc.stats(); n != len(want) || bad != 0 {
			t.Errorf("%s: %d requests (%d badly signed), want %d", tc.name, n, bad, len(want))
		}
		if n := outboxRecords(t, db, tc.name); n != 0 {
			t.Errorf("%s: %d records left", tc.name, n)
		}
	}
}

func TestWebhooksPreparedWritesSurviveACrash(t *testing.T) {
	rc := newReceiver(t, "", respondOK)
	dir := t.TempDir()
	hooks := []WebhookConfig{{Name: "c", URL: rc.srv.URL, Topics: []string{"#"}}}
	db := openWebhookDB(t, dir)
	w := newTestWebhooks(t, db, WebhooksOptions{Hooks: hooks}, false)

	// The engine wrote the message with its outbox records, acknowledged
	// it, and died before Committed; another message's write never made
	// it.
	kept := testMessage("t", "kept")
	ops := append(w.Prepare(kept), storage.Set([]byte("test/message"), kept.Payload)) // the message, in the same write
	if err := db.Write(ops...); err != nil {
		t.Fatal(err)
	}
	w.Prepare(testMessage("t", "lost"))
	if err := w.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := db.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}

	db = openWebhookDB(t, dir)
	w = newTestWebhooks(t, db, WebhooksOptions{Hooks: hooks}, true)
	waitFor(t, 5*time.Second, "the delivery", func() bool { return statsOf(t, w, "c").Delivered == 1 })
	if p := payloads(rc.accepted()); !slices.Equal(p, []string{"kept"}) {
		t.Errorf("delivered %v after the restart, want [kept]", p)
	}
	if s := statsOf(t, w, "c"); s.Pending != 0 {
		t.Errorf("stats: %+v", s)
	}
}

func TestWebhooksFailedWriteKeepsTheMarkAndTheDrops(t *testing.T) {
	rc := newReceiver(t, "", respondOK)
	dir := t.TempDir()
	hooks := []WebhookConfig{{Name: "m", URL: rc.srv.URL, Topics: []string{"#"}}}
	db := openWebhookDB(t, dir)
	w := newTestWebhooks(t, db, WebhooksOptions{Hooks: hooks, MaxOutbox: 2}, false)
	publishTo(t, db, w, "t", "a")
	publishTo(t, db, w, "t", "b")

	// Use up the block of sequences reserved at the start with writes
	// that fail; the next Prepare reserves the next block, and drops a
	// to make room.
	fail := errors.New("write failed")
	for range outboxReserveBlock - 2 {
		m := testMessage("t", "x")
		w.Prepare(m)
		w.Committed(m, fail)
	}
	m := testMessage("t", "c")
	w.Prepare(m)
	w.Committed(m, fail) // neither the new mark nor the delete of a was stored with it
	barrier(t, db)
	mark, err := db.Get(storage.OutboxMarkKey("m"))
	if err != nil || len(mark) != 8 || binary.BigEndian.Uint64(mark) != 2*outboxReserveBlock {
		t.Errorf("mark %x (%v), want %d", mark, err, 2*outboxReserveBlock)
	}
	if n := outboxRecords(t, db, "m"); n != 1 {
		t.Errorf("%d records stored, want 1 (b)", n)
	}
	if s := statsOf(t, w, "m"); s.Pending != 1 || s.Dropped != 1 {
		t.Errorf("stats: %+v", s)
	}

	// After a restart, b is delivered, and the next message's id is
	// past every sequence handed out before.
	if err := w.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
	w = newTestWebhooks(t, db, WebhooksOptions{Hooks: hooks, MaxOutbox: 2}, true)
	publishTo(t, db, w, "t", "d")
	waitFor(t, 5*time.Second, "2 deliveries", func() bool { return len(rc.accepted()) == 2 })
	got := rc.accepted()
	if p := payloads(got); !slices.Equal(p, []string{"b", "d"}) {
		t.Errorf("delivered %v, want [b d]", p)
	}
	if ids := deliveryIDs(t, "m", got); ids[1] <= outboxReserveBlock+1 {
		t.Errorf("delivery id %d handed out again (ids %v)", ids[1], ids)
	}
}

func TestWebhooksRetryAfterFailures(t *testing.T) {
	rc := newReceiver(t, "", func(n int, w http.ResponseWriter, r *http.Request) bool {
		switch n {
		case 1:
			w.WriteHeader(http.StatusInternalServerError)
			return false
		case 2: // no answer within the timeout
			select {
			case <-r.Context().Done():
			case <-time.After(10 * time.Second):
			}
			return false
		case 3: // connection closed without an answer
			conn, _, err := http.NewResponseController(w).Hijack()
			if err == nil {
				_ = conn.Close()
			}
			return false
		}
		return true
	})
	db := openWebhookDB(t, t.TempDir())
	w := newTestWebhooks(t, db, WebhooksOptions{Hooks: []WebhookConfig{
		{Name: "flaky", URL: rc.srv.URL, Topics: []string{"t/#"}, Timeout: 200 * time.Millisecond},
	}}, true)
	for i := range 5 {
		publishTo(t, db, w, "t/x", strconv.Itoa(i))
	}
	waitFor(t, 10*time.Second, "5 deliveries", func() bool { return statsOf(t, w, "flaky").Delivered == 5 })

	got := rc.accepted()
	if p := payloads(got); !slices.Equal(p, numbered(0, 5)) {
		t.Errorf("delivered %v, want 0..4 in order", p)
	}
	if a := got[0].header.Get("X-Beacon-Attempt"); a != "4" {
		t.Errorf("first message delivered on attempt %s, want 4", a)
	}
	if id := got[0].header.Get("X-Beacon-Delivery"); id != "flaky-1" {
		t.Errorf("first delivery id %q", id)
	}
	s := statsOf(t, w, "flaky")
	if s.Failed != 3 || s.Expired != 0 || s.Pending != 0 || s.LastStatus != 200 || s.LastError == "" || s.LastFailure.IsZero() {
		t.Errorf("stats: %+v", s)
	}
	if requests, _ := rc.stats(); requests != 8 {
		t.Errorf("%d requests, want 3 failures and 5 deliveries", requests)
	}
}

func TestWebhooksSurviveRestart(t *testing.T) {
	rc := newReceiver(t, "", respondStatus(http.StatusServiceUnavailable))
	dir := t.TempDir()
	hooks := []WebhookConfig{{Name: "down", URL: rc.srv.URL, Topics: []string{"#"}, MaxRetries: forever}}

	db := openWebhookDB(t, dir)
	w := newTestWebhooks(t, db, WebhooksOptions{Hooks: hooks}, true)
	for i := range 100 {
		publishTo(t, db, w, "t", strconv.Itoa(i))
	}
	waitFor(t, 5*time.Second, "a failed attempt", func() bool { return statsOf(t, w, "down").Failed > 0 })
	restart := func() {
		t.Helper()
		if err := w.Shutdown(context.Background()); err != nil {
			t.Fatal(err)
		}
		if err := w.Shutdown(context.Background()); err != nil { // idempotent
			t.Fatal(err)
		}
		if err := db.Shutdown(context.Background()); err != nil {
			t.Fatal(err)
		}
		db = openWebhookDB(t, dir)
		w = newTestWebhooks(t, db, WebhooksOptions{Hooks: hooks}, false)
	}
	restart()

	if s := statsOf(t, w, "down"); s.Pending != 100 {
		t.Fatalf("%d messages pending after restart, want 100", s.Pending)
	}
	rc.setRespond(respondOK)
	w.Start()
	waitFor(t, 10*time.Second, "100 deliveries", func() bool { return statsOf(t, w, "down").Delivered == 100 })
	got := rc.accepted()
	if p := payloads(got); !slices.Equal(p, numbered(0, 100)) {
		t.Fatalf("delivered %d messages %v, want 0..99 in order", len(p), p)
	}
	if n := outboxRecords(t, db, "down"); n != 0 {
		t.Errorf("%d records left after delivery", n)
	}
	if a, _ := strconv.Atoi(got[0].header.Get("X-Beacon-Attempt")); a < 2 {
		t.Errorf("attempt count not kept across the restart: attempt %d", a)
	}

	// With the outbox empty, a restart must not hand out a delivery id
	// again: receivers dedupe on it.
	lastID := got[len(got)-1].header.Get("X-Beacon-Delivery")
	restart()
	w.Start()
	publishTo(t, db, w, "t", "after")
	waitFor(t, 5*time.Second, "the delivery after the second restart", func() bool { return len(rc.accepted()) == 101 })
	last, _ := strconv.ParseUint(strings.TrimPrefix(lastID, "down-"), 10, 64)
	next, _ := strconv.ParseUint(strings.TrimPrefix(rc.accepted()[100].header.Get("X-Beacon-Delivery"), "down-"), 10, 64)
	if next <= last {
		t.Errorf("delivery id %d reused after a restart (last before: %d)", next, last)
	}
}

func TestWebhooksBoundedOutbox(t *testing.T) {
	rc := newReceiver(t, "", respondStatus(http.StatusServiceUnavailable))
	db := openWebhookDB(t, t.TempDir())
	w := newTestWebhooks(t, db, WebhooksOptions{
		MaxOutbox: 10,
		Hooks:     []WebhookConfig{{Name: "small", URL: rc.srv.URL, Topics: []string{"#"}, MaxRetries: forever}},
	}, true)
	for i := range 25 {
		publishTo(t, db, w, "t", strconv.Itoa(i))
	}
	if s := statsOf(t, w, "small"); s.Dropped != 15 || s.Pending != 10 {
		t.Fatalf("stats after 25 messages into an outbox of 10: %+v", s)
	}
	if n := outboxRecords(t, db, "small"); n != 10 {
		t.Fatalf("%d records stored, want 10", n)
	}
	// A request in flight when its message is dropped may still arrive:
	// turn the receiver on once the deliveries have moved on to the kept
	// messages.
	waitFor(t, 5*time.Second, "an attempt at a kept message", func() bool {
		tried := rc.triedPayloads()
		return len(tried) > 0 && tried[len(tried)-1] == "15"
	})
	rc.setRespond(respondOK)
	waitFor(t, 5*time.Second, "the outbox to drain", func() bool { return statsOf(t, w, "small").Pending == 0 })
	if p, want := payloads(rc.accepted()), numbered(15, 25); !slices.Equal(p, want) {
		t.Errorf("delivered %v, want exactly %v", p, want)
	}
	if s := statsOf(t, w, "small"); s.Delivered != 10 || s.Dropped != 15 || s.Expired != 0 {
		t.Errorf("stats: %+v", s)
	}
}

func TestWebhooksExpireAfterRetries(t *testing.T) {
	rc := newReceiver(t, "", respondStatus(http.StatusInternalServerError))
	db := openWebhookDB(t, t.TempDir())
	w := newTestWebhooks(t, db, WebhooksOptions{
		Hooks: []WebhookConfig{{Name: "broken", URL: rc.srv.URL, Topics: []string{"#"}, MaxRetries: 2}},
	}, true)
	for i := range 3 {
		publishTo(t, db, w, "t", strconv.Itoa(i))
	}
	waitFor(t, 5*time.Second, "3 expired messages", func() bool { return statsOf(t, w, "broken").Expired == 3 })
	s := statsOf(t, w, "broken")
	if s.Failed != 9 || s.Pending != 0 || s.Delivered != 0 || s.LastStatus != 500 || !strings.Contains(s.LastError, "500") {
		t.Errorf("stats: %+v", s)
	}
	if requests, _ := rc.stats(); requests != 9 {
		t.Errorf("%d requests, want 3 attempts for each of 3 messages", requests)
	}
	if n := outboxRecords(t, db, "broken"); n != 0 {
		t.Errorf("%d records left after expiry", n)
	}
}

func TestWebhooksDoNotFollowRedirects(t *testing.T) {
	target := newReceiver(t, "", respondOK)
	rc := newReceiver(t, "", func(_ int, w http.ResponseWriter, r *http.Request) bool {
		http.Redirect(w, r, target.srv.URL, http.StatusTemporaryRedirect)
		return false
	})
	db := openWebhookDB(t, t.TempDir())
	w := newTestWebhooks(t, db, WebhooksOptions{
		Client: &http.Client{}, // one that would follow: the webhooks must not
		Hooks:  []WebhookConfig{{Name: "moved", URL: rc.srv.URL, Topics: []string{"#"}, MaxRetries: -1}},
	}, true)
	publishTo(t, db, w, "t", "x")
	waitFor(t, 5*time.Second, "the message to expire", func() bool { return statsOf(t, w, "moved").Expired == 1 })
	if s := statsOf(t, w, "moved"); s.Failed != 1 || s.LastStatus != http.StatusTemporaryRedirect {
		t.Errorf("stats: %+v", s)
	}
	if n, _ := target.stats(); n != 0 {
		t.Errorf("the redirect was followed")
	}
}

func TestWebhooksDropOutboxOfRemovedWebhook(t *testing.T) {
	rc := newReceiver(t, "", respondStatus(http.StatusServiceUnavailable))
	dir := t.TempDir()
	db := openWebhookDB(t, dir)
	w := newTestWebhooks(t, db, WebhooksOptions{Hooks: []WebhookConfig{
		{Name: "kept", URL: rc.srv.URL, Topics: []string{"#"}},
		{Name: "removed", URL: rc.srv.URL, Topics: []string{"#"}},
	}}, false)
	for i := range 5 {
		publishTo(t, db, w, "t", strconv.Itoa(i))
	}
	if err := w.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
	// More than one transaction can delete.
	const extra = 30000
	for i := 0; i < extra; i += 1000 {
		var ops []storage.Op
		for j := i; j < i+1000; j++ {
			rec := storage.AppendOutbox(nil, &storage.OutboxRecord{Body: []byte(`{}`)})
			ops = append(ops, storage.Set(storage.OutboxKey("removed", uint64(1000+j)), rec))
		}
		if err := db.Write(ops...); err != nil {
			t.Fatal(err)
		}
	}
	if err := db.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
	db = openWebhookDB(t, dir)
	w = newTestWebhooks(t, db, WebhooksOptions{
		MaxOutbox: 3, // smaller than before: the oldest go at load
		Hooks:     []WebhookConfig{{Name: "kept", URL: rc.srv.URL, Topics: []string{"#"}}},
	}, false)
	if s := statsOf(t, w, "kept"); s.Pending != 3 || s.Dropped != 2 {
		t.Errorf("kept webhook: %+v, want 3 pending and 2 dropped", s)
	}
	if n := outboxRecords(t, db, "kept"); n != 3 {
		t.Errorf("kept webhook: %d records stored, want 3", n)
	}
	n := 0
	if err := db.Scan(storage.OutboxPrefix("removed"), func(_, _ []byte) error { n++; return nil }); err != nil {
		t.Fatal(err)
	}
	if n != 0 {
		t.Errorf("%d keys left of a webhook no longer configured", n)
	}
}

func TestNewWebhooksValidates(t *testing.T) {
	db := openWebhookDB(t, t.TempDir())
	ok := WebhookConfig{URL: "https://example.com/hook", Topics: []string{"a/#"}}
	with := func(f func(*WebhookConfig)) []WebhookConfig { c := ok; f(&c); return []WebhookConfig{c} }
	for _, tc := range []struct {
		name  string
		hooks []WebhookConfig
		want  string // in the error; "" for none
	}{
		{"valid", with(func(c *WebhookConfig) { c.Topics = []string{"a/+/b", "#", "$beacon/presence/#"} }), ""},
		{"scheme", with(func(c *WebhookConfig) { c.URL = "ftp://example.com" }), "webhooks[0].url"},
		{"no host", with(func(c *WebhookConfig) { c.URL = "http:///path" }), "webhooks[0].url"},
		{"unparsable url", with(func(c *WebhookConfig) { c.URL = "http://[::1" }), "webhooks[0].url"},
		{"no topics", with(func(c *WebhookConfig) { c.Topics = nil }), "webhooks[0].topics"},
		{"hash not last", with(func(c *WebhookConfig) { c.Topics = []string{"a/#/b"} }), "webhooks[0].topics"},
		{"partial wildcard", with(func(c *WebhookConfig) { c.Topics = []string{"a/b+"} }), "webhooks[0].topics"},
		{"empty filter", with(func(c *WebhookConfig) { c.Topics = []string{""} }), "webhooks[0].topics"},
		{"nul in name", with(func(c *WebhookConfig) { c.Name = "a\x00b" }), "webhooks[0].name"},
		{"duplicate names", []WebhookConfig{ok, {Name: "webhook-0", URL: ok.URL, Topics: ok.Topics}}, "webhooks[1].name"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			w, err := NewWebhooks(WebhooksOptions{DB: db, Hooks: tc.hooks, Encode: testEncode})
			switch {
			case tc.want == "" && err != nil:
				t.Fatalf("unexpected error: %v", err)
			case tc.want == "":
				_ = w.Shutdown(context.Background())
			case err == nil || !strings.Contains(err.Error(), tc.want):
				t.Fatalf("error %v, want one naming %s", err, tc.want)
			}
		})
	}
	if _, err := NewWebhooks(WebhooksOptions{DB: db, Hooks: []WebhookConfig{ok}}); err == nil {
		t.Error("no error without an encoder")
	}
}

func TestWebhooksHandler(t *testing.T) {
	db := openWebhookDB(t, t.TempDir())
	w := newTestWebhooks(t, db, WebhooksOptions{Hooks: []WebhookConfig{{
		Name: "h", URL: "https://user:pass@example.com/hook?token=topsecret", Secret: "hmac-key", Topics: []string{"#"},
	}}}, false)
	publishTo(t, db, w, "t", "x")

	rec := httptest.NewRecorder()
	w.Handler().ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/api/v1/webhooks", nil))
	if rec.Code != http.StatusOK || rec.Header().Get("Content-Type") != "application/json" {
		t.Fatalf("GET: %d %v", rec.Code, rec.Header())
	}
	body := rec.Body.String()
	for _, secret := range []string{"topsecret", "user", "pass", "hmac-key"} {
		if strings.Contains(body, secret) {
			t.Errorf("stats show %q: %s", secret, body)
		}
	}
	var out struct {
		Webhooks []WebhookStats `json:"webhooks"`
	}
	if err := json.Unmarshal(rec.Body.Bytes(), &out); err != nil {
		t.Fatal(err)
	}
	if len(out.Webhooks) != 1 || out.Webhooks[0].Name != "h" || out.Webhooks[0].Pending != 1 ||
		out.Webhooks[0].URL != "https://xxxxx@example.com/hook?token=xxxxx" {
		t.Errorf("GET: %s", body)
	}

	rec = httptest.NewRecorder()
	w.Handler().ServeHTTP(rec, httptest.NewRequest(http.MethodPost, "/api/v1/webhooks", nil))
	if rec.Code != http.StatusMethodNotAllowed {
		t.Errorf("POST: %d", rec.Code)
	}
}

func BenchmarkWebhooksPrepare(b *testing.B) {
	db, err := storage.Open(storage.Options{Dir: b.TempDir(), Sync: storage.SyncBatch, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		b.Fatal(err)
	}
	w, err := NewWebhooks(WebhooksOptions{
		DB:     db,
		Encode: testEncode,
		Log:    slog.New(slog.DiscardHandler),
		Hooks: []WebhookConfig{
			{Name: "match", URL: "http://127.0.0.1:9/", Topics: []string{"alerts/+/fire", "devices/+/telemetry"}},
			{Name: "other", URL: "http://127.0.0.1:9/", Topics: []string{"billing/#"}},
		},
	})
	if err != nil {
		b.Fatal(err)
	}
	// Not started and nothing written: the outbox fills to MaxOutbox in
	// memory, then every message also drops the oldest, the steady state
	// of an endpoint that is down. The write itself is the engine's.
	for _, bc := range []struct{ name, topic string }{
		{"matching", "devices/d1/telemetry"}, // prepared for "match", skipped by "other"
		{"none", "devices/d1/status"},        // skipped by both
	} {
		b.Run(bc.name, func(b *testing.B) {
			m := &Message{Topic: bc.topic, QoS: 1, Time: time.Now().UnixNano(),
				Payload: []byte(fmt.Sprintf(`{"t":21.5,"h":40,"pad":%q}`, strings.Repeat("x", 32)))}
			b.ReportAllocs()
			for b.Loop() {
				w.Prepare(m)
				w.Committed(m, nil)
			}
		})
	}
	_ = w.Shutdown(context.Background())
	_ = db.Shutdown(context.Background())
}
