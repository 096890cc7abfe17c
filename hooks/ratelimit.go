package hooks

import (
	"context"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"
)

// RateLimiter lets one event per key through per interval and counts the
// ones it holds back.
type RateLimiter struct {
	every time.Duration
	mu    sync.Mutex
	last  map[string]time.Time
	held  map[string]int64
	total atomic.Int64 // events held back since start
}

// Suppressed counts the events held back since the limiter was made.
func (r *RateLimiter) Suppressed() int64 { return r.total.Load() }

// NewRateLimiter returns a limiter that allows one event per key per every.
func NewRateLimiter(every time.Duration) *RateLimiter {
	return &RateLimiter{every: every, last: map[string]time.Time{}, held: map[string]int64{}}
}

// Allow reports whether an event for key may be logged now and how many
// were held back since the last one that was.
func (r *RateLimiter) Allow(key string) (bool, int64) {
	now := time.Now()
	r.mu.Lock()
	defer r.mu.Unlock()
	if t, ok := r.last[key]; ok && now.Sub(t) < r.every {
		r.held[key]++
		r.total.Add(1)
		return false, 0
	}
	if len(r.last) >= maxLimiterKeys {
		r.prune(now)
	}
	r.last[key] = now
	n := r.held[key]
	delete(r.held, key)
	return true, n
}

// maxLimiterKeys bounds a limiter keyed by something clients choose
// (client ids): past it, keys whose interval has passed are forgotten.
const maxLimiterKeys = 4096

func (r *RateLimiter) prune(now time.Time) {
	for k, t := range r.last {
		if now.Sub(t) >= r.every {
			delete(r.last, k)
			delete(r.held, k)
		}
	}
}

// RateLimitHandler wraps a slog.Handler so that each distinct warning or
// error message is logged at most once per interval; the number held back
// is added to the next one as "suppressed". mochi logs some conditions
// (such as a full session queue) once per message; this keeps a flood out
// of the log without hiding it.
type RateLimitHandler struct {
	slog.Handler
	limiter *RateLimiter
}

// NewRateLimitHandler wraps h.
func NewRateLimitHandler(h slog.Handler, every time.Duration) *RateLimitHandler {
	return &RateLimitHandler{Handler: h, limiter: NewRateLimiter(every)}
}

// Handle implements slog.Handler.
func (h *RateLimitHandler) Handle(ctx context.Context, r slog.Record) error {
	if r.Level < slog.LevelWarn {
		return h.Handler.Handle(ctx, r)
	}
	ok, suppressed := h.limiter.Allow(r.Message)
	if !ok {
		return nil
	}
	if suppressed > 0 {
		r.AddAttrs(slog.Int64("suppressed", suppressed))
	}
	return h.Handler.Handle(ctx, r)
}

// Suppressed counts the records held back since the handler was made.
func (h *RateLimitHandler) Suppressed() int64 { return h.limiter.Suppressed() }

// WithAttrs implements slog.Handler.
func (h *RateLimitHandler) WithAttrs(attrs []slog.Attr) slog.Handler {
	return &RateLimitHandler{Handler: h.Handler.WithAttrs(attrs), limiter: h.limiter}
}

// WithGroup implements slog.Handler.
func (h *RateLimitHandler) WithGroup(name string) slog.Handler {
	return &RateLimitHandler{Handler: h.Handler.WithGroup(name), limiter: h.limiter}
}
