package hooks

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"math/rand/v2"
	"net/http"
	"net/url"
	"strconv"
	"time"

	"github.com/beaconmq/beacon/storage"
)

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
		if !ok || it.state == itemPrepared {
			if !w.await(ctx, h, it.seq, ok) {
				return
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

// await waits for something to deliver: a message queued when the outbox
// is empty (prepared false), or the Committed of the prepared message seq
// at the front, which is never skipped. It returns false on Shutdown.
func (w *Webhooks) await(ctx context.Context, h *webhook, seq uint64, prepared bool) bool {
	var warn <-chan time.Time
	if prepared {
		t := time.NewTimer(commitWaitWarn)
		defer t.Stop()
		warn = t.C
	}
	for {
		select {
		case <-ctx.Done():
			return false
		case <-h.wake:
			return true
		case <-warn:
			w.log.Warn("webhook: deliveries wait for the commit of a prepared message", "webhook", h.cfg.Name,
				"seq", seq, "waited", commitWaitWarn)
			warn = nil
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
	if h.remove(seq) {
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
	cur := h.find(it.seq)
	if cur == nil || cur.state != itemReady { // dropped meanwhile
		h.mu.Unlock()
		return 0, false
	}
	cur.attempts++
	attempts = cur.attempts
	key := storage.OutboxKey(h.cfg.Name, it.seq)
	expired := int(attempts) > h.cfg.MaxRetries
	if expired {
		h.remove(it.seq)
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
			gone := !h.isReady(seq)
			h.mu.Unlock()
			if gone {
				return true
			}
		}
	}
}
