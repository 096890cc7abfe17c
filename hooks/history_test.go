package hooks

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/beaconmq/beacon/storage"
)

func openHistory(t *testing.T, dir string, rules ...HistoryRule) (*History, *storage.DB) {
	t.Helper()
	db, err := storage.Open(storage.Options{Dir: dir, Sync: storage.SyncNone})
	if err != nil {
		t.Fatal(err)
	}
	h, err := NewHistory(HistoryOptions{DB: db, Rules: rules, ReserveBlock: 100})
	if err != nil {
		t.Fatal(err)
	}
	return h, db
}

func closeHistory(t *testing.T, h *History, db *storage.DB) {
	t.Helper()
	if err := h.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := db.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
}

func replayAll(t *testing.T, h *History, after uint64, filter string) []string {
	t.Helper()
	var out []string
	err := h.Replay(context.Background(), after, h.Seq(), nil, func(topic string) bool {
		return filter == "" || strings.HasPrefix(topic, filter)
	}, func(r *Record) bool {
		out = append(out, r.Topic+"="+string(r.Payload))
		return true
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func TestHistoryRestartKeepsEpochAndNeverReusesSequences(t *testing.T) {
	dir := t.TempDir()
	h, db := openHistory(t, dir, HistoryRule{Filter: "#", MaxMessages: 100})
	epoch := h.Epoch()
	for i := range 150 { // crosses a reservation block
		h.Publish(&Record{Topic: "a/b", Payload: []byte(fmt.Sprint(i)), QoS: 1}, time.Now())
	}
	handedOut := h.Seq()
	closeHistory(t, h, db)

	h, db = openHistory(t, dir, HistoryRule{Filter: "#", MaxMessages: 100})
	defer closeHistory(t, h, db)
	if h.Epoch() != epoch {
		t.Fatalf("epoch changed across a restart: %s -> %s", epoch, h.Epoch())
	}
	if h.Seq() < handedOut {
		t.Fatalf("sequence went back from %d to %d", handedOut, h.Seq())
	}
	got := replayAll(t, h, handedOut-10, "")
	if len(got) != 10 || got[9] != "a/b=149" {
		t.Fatalf("replay of the last 10 after restart: %v", got)
	}
	// Only the newest 100 were kept: resuming from before them resets.
	var re *ErrReset
	if err := h.CanReplay(handedOut-101, []string{"a/#"}); !errors.As(err, &re) || re.Reason != ResetExpired {
		t.Fatalf("resume from a trimmed position: %v", err)
	}
	if err := h.CanReplay(handedOut-100, []string{"a/#"}); err != nil {
		t.Fatalf("resume from the oldest kept: %v", err)
	}
	if err := h.CanReplay(handedOut-101, []string{"$other/#"}); err != nil {
		t.Fatalf("a filter that cannot overlap the trimmed rule: %v", err)
	}
	if _, err := h.ParseID(h.EventID(handedOut)); err != nil {
		t.Fatal(err)
	}
	if _, err := h.ParseID("ffffffffffff-1"); !errors.As(err, &re) || re.Reason != ResetForeignEpoch {
		t.Fatalf("foreign epoch: %v", err)
	}
}

func TestHistoryRulesAndAge(t *testing.T) {
	h, db := openHistory(t, t.TempDir(),
		HistoryRule{Filter: "fast/#", MaxMessages: 1000, MaxAge: time.Second},
		HistoryRule{Filter: "slow/#", MaxMessages: 2})
	defer closeHistory(t, h, db)
	old := time.Now().Add(-time.Hour)
	h.Publish(&Record{Topic: "fast/x", Payload: []byte("old"), QoS: 0}, old)
	h.Publish(&Record{Topic: "slow/x", Payload: []byte("1"), QoS: 0}, old)
	h.Publish(&Record{Topic: "slow/x", Payload: []byte("2"), QoS: 0}, old)
	h.Publish(&Record{Topic: "slow/x", Payload: []byte("3"), QoS: 0}, time.Now())
	h.Publish(&Record{Topic: "none/x", Payload: []byte("not recorded"), QoS: 0}, time.Now())
	if got := replayAll(t, h, 0, "slow/"); strings.Join(got, " ") != "slow/x=2 slow/x=3" {
		t.Fatalf("count retention: %v", got)
	}
	if got := replayAll(t, h, 0, "none/"); len(got) != 0 {
		t.Fatalf("a message no rule matches was recorded: %v", got)
	}
	deadline := time.Now().Add(10 * time.Second)
	for len(replayAll(t, h, 0, "fast/")) != 0 {
		if time.Now().After(deadline) {
			t.Fatal("age retention did not remove a message an hour old")
		}
		time.Sleep(50 * time.Millisecond)
	}
	rec, ok, err := h.Last(context.Background(), "slow/x")
	if err != nil || !ok || string(rec.Payload) != "3" {
		t.Fatalf("last: %v %v %v", rec, ok, err)
	}
	if _, ok, _ := h.Last(context.Background(), "fast/x"); ok {
		t.Fatal("last value of a trimmed topic")
	}
}

func TestWatchSeesOnlyAfterRegistration(t *testing.T) {
	h, db := openHistory(t, t.TempDir(), HistoryRule{Filter: "#", MaxMessages: 100})
	defer closeHistory(t, h, db)
	h.Publish(&Record{Topic: "t/a", Payload: []byte("before"), QoS: 0}, time.Now())
	w := h.Watch([]string{"t/#", "t/a"}, 4) // overlapping filters: once each
	defer w.Stop()
	h.Publish(&Record{Topic: "t/a", Payload: []byte("after"), QoS: 0}, time.Now())
	h.Publish(&Record{Topic: "u/a", Payload: []byte("other"), QoS: 0}, time.Now())
	if r := <-w.C(); string(r.Payload) != "after" || r.Seq != w.From+1 {
		t.Fatalf("first watched: %+v (from %d)", r, w.From)
	}
	select {
	case r := <-w.C():
		t.Fatalf("unexpected %+v", r)
	default:
	}
	for range 5 {
		h.Publish(&Record{Topic: "t/b", Payload: nil, QoS: 0}, time.Now())
	}
	n := 0
	for range w.C() { // the buffered 4, then closed
		n++
	}
	if n != 4 || !w.Overflowed() {
		t.Fatal("a watch past its buffer was not ended")
	}
}

func BenchmarkHistoryPublish(b *testing.B) {
	db, err := storage.Open(storage.Options{Dir: b.TempDir(), Sync: storage.SyncBatch})
	if err != nil {
		b.Fatal(err)
	}
	h, err := NewHistory(HistoryOptions{DB: db, Rules: []HistoryRule{{Filter: "#", MaxMessages: 10000}}})
	if err != nil {
		b.Fatal(err)
	}
	w := h.Watch([]string{"devices/+/telemetry"}, 1<<20)
	payload := make([]byte, 64)
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		h.Publish(&Record{Topic: "devices/d1/telemetry", Payload: payload, QoS: 1}, time.Now())
		if i%(1<<19) == 0 {
			for len(w.C()) > 0 {
				<-w.C()
			}
		}
	}
	b.StopTimer()
	w.Stop()
	_ = h.Shutdown(context.Background())
	_ = db.Shutdown(context.Background())
}

// Raising a rule's limit across a restart must not turn trimmed history
// into a silent gap, and a restart that trims a great deal at once must
// still start.
func TestHistoryTrimMarkSurvivesRestart(t *testing.T) {
	dir := t.TempDir()
	h, db := openHistory(t, dir, HistoryRule{Filter: "#", MaxMessages: 100})
	for i := range 1000 {
		h.Publish(&Record{Topic: "a", Payload: []byte(fmt.Sprint(i))}, time.Now())
	}
	closeHistory(t, h, db)

	h, db = openHistory(t, dir, HistoryRule{Filter: "#", MaxMessages: 1000}) // raised: no longer full
	var re *ErrReset
	if err := h.CanReplay(50, []string{"#"}); !errors.As(err, &re) || re.Reason != ResetExpired {
		t.Fatalf("resume from a trimmed position after raising the limit: %v", err)
	}
	for i := range 60000 {
		h.Publish(&Record{Topic: "a", Payload: []byte(fmt.Sprint(i))}, time.Now())
	}
	closeHistory(t, h, db)

	h, db = openHistory(t, dir, HistoryRule{Filter: "#", MaxMessages: 10}) // 59,990+ deletes at load
	defer closeHistory(t, h, db)
	if got := replayAll(t, h, 0, ""); len(got) != 10 {
		t.Fatalf("%d records kept, want 10", len(got))
	}
}
