package hooks

import (
	"bytes"
	"log/slog"
	"strings"
	"testing"
	"time"
)

func TestRateLimitHandler(t *testing.T) {
	var buf bytes.Buffer
	log := slog.New(NewRateLimitHandler(slog.NewTextHandler(&buf, nil), time.Hour)).With("component", "mqtt")
	for range 5 {
		log.Warn("client store quota reached", "client", "a")
	}
	log.Warn("another warning")
	log.Info("info is never limited")
	log.Info("info is never limited")
	out := buf.String()
	if n := strings.Count(out, "client store quota reached"); n != 1 {
		t.Fatalf("repeated warning logged %d times, want 1:\n%s", n, out)
	}
	if !strings.Contains(out, "another warning") || strings.Count(out, "info is never limited") != 2 {
		t.Fatalf("unexpected output:\n%s", out)
	}
}

func TestRateLimiterCountsHeldBack(t *testing.T) {
	r := NewRateLimiter(20 * time.Millisecond)
	if ok, _ := r.Allow("k"); !ok {
		t.Fatal("first event held back")
	}
	for range 3 {
		if ok, _ := r.Allow("k"); ok {
			t.Fatal("event within the interval let through")
		}
	}
	time.Sleep(25 * time.Millisecond) // the interval is the behaviour under test
	ok, held := r.Allow("k")
	if !ok || held != 3 {
		t.Fatalf("after the interval: ok=%v held=%d, want true 3", ok, held)
	}
}
