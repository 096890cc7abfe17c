package hooks

import (
	"context"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/beaconmq/beacon/storage"
)

// histEnv is a history on a real log in a temporary directory.
type histEnv struct {
	dir   string
	db    *storage.DB
	log   *storage.Log
	h     *History
	once  sync.Once
	rules []storage.LogRule
}

// openHistEnv opens the DB, the log with rules (trimming started, as the
// broker does once sessions are restored) and a History in dir; it is
// closed when the test ends unless closed before.
func openHistEnv(t *testing.T, dir string, opts HistoryOptions, rules ...storage.LogRule) *histEnv {
	t.Helper()
	db, err := storage.Open(storage.Options{Dir: dir, Sync: storage.SyncNone})
	if err != nil {
		t.Fatal(err)
	}
	l, err := storage.OpenLog(db, storage.LogOptions{Rules: rules, ReserveBlock: 100})
	if err != nil {
		_ = db.Shutdown(context.Background())
		t.Fatal(err)
	}
	l.StartTrimming()
	opts.Log = l
	h, err := NewHistory(opts)
	if err != nil {
		t.Fatal(err)
	}
	e := &histEnv{dir: dir, db: db, log: l, h: h, rules: rules}
	t.Cleanup(func() { e.close(t) })
	return e
}

// close shuts the history, the log and the DB down, in that order.
func (e *histEnv) close(t *testing.T) {
	t.Helper()
	e.once.Do(func() {
		ctx := context.Background()
		if err := errors.Join(e.h.Shutdown(ctx), e.log.Shutdown(ctx), e.db.Shutdown(ctx)); err != nil {
			t.Error(err)
		}
	})
}

// reopen closes e and opens the same directory again with the same rules.
func (e *histEnv) reopen(t *testing.T, opts HistoryOptions) *histEnv {
	t.Helper()
	e.close(t)
	return openHistEnv(t, e.dir, opts, e.rules...)
}

// accept does what the engine does with a message before it feeds it:
// append it to the log if a rule keeps its topic (and release it), else
// only number it. It returns the message to Feed.
func (e *histEnv) accept(t testing.TB, topic, payload string) *Message {
	t.Helper()
	lm := &storage.LogMessage{Topic: topic, Payload: []byte(payload), QoS: 1}
	if e.log.Keeps(topic) {
		seq, err := e.log.Append(lm)
		if err != nil {
			t.Fatal(err)
		}
		e.log.Release(seq)
	} else if e.log.Number(lm) == 0 {
		t.Fatal("not numbered")
	}
	return &Message{Seq: lm.Seq, Topic: topic, Payload: lm.Payload, QoS: lm.QoS, Time: lm.Time}
}

// publish accepts and feeds a message.
func (e *histEnv) publish(t testing.TB, topic, payload string) uint64 {
	t.Helper()
	m := e.accept(t, topic, payload)
	e.h.Feed(m)
	return m.Seq
}

// replay returns "topic=payload" of the records Replay gives in (after,
// upto] under filters.
func (e *histEnv) replay(t *testing.T, after, upto uint64, filters ...string) ([]string, error) {
	t.Helper()
	var out []string
	err := e.h.Replay(context.Background(), after, upto, filters, matchAny(filters), func(r *Record) bool {
		out = append(out, r.Topic+"="+string(r.Payload))
		return true
	})
	return out, err
}

func matchAny(filters []string) func(string) bool {
	return func(topic string) bool {
		for _, f := range filters {
			if topicMatches(f, topic) {
				return true
			}
		}
		return false
	}
}

func topicMatches(filter, topic string) bool {
	fl, tl := strings.Split(filter, "/"), strings.Split(topic, "/")
	for i, f := range fl {
		if f == "#" {
			return true
		}
		if i >= len(tl) || f != "+" && f != tl[i] {
			return false
		}
	}
	return len(fl) == len(tl)
}

// receive takes n records from w within a few seconds.
func receive(t *testing.T, w *Watch, n int) []*Record {
	t.Helper()
	var out []*Record
	timeout := time.After(5 * time.Second)
	for len(out) < n {
		select {
		case r, ok := <-w.C():
			if !ok {
				t.Fatalf("watch ended after %d of %d records", len(out), n)
			}
			out = append(out, r)
		case <-timeout:
			t.Fatalf("%d of %d records within 5s", len(out), n)
		}
	}
	return out
}

// none checks that w has nothing waiting.
func none(t *testing.T, w *Watch) {
	t.Helper()
	select {
	case r := <-w.C():
		t.Fatalf("unexpected record %d %s", r.Seq, r.Topic)
	default:
	}
}

func seqsOf(rs []*Record) []uint64 {
	out := make([]uint64, len(rs))
	for i, r := range rs {
		out[i] = r.Seq
	}
	return out
}

func wantReset(t *testing.T, err error, reason string) {
	t.Helper()
	var re *ErrReset
	if !errors.As(err, &re) || re.Reason != reason {
		t.Fatalf("got %v, want a reset %q", err, reason)
	}
}

func TestWatchGetsFeedInSeqOrder(t *testing.T) {
	e := openHistEnv(t, t.TempDir(), HistoryOptions{}, storage.LogRule{Filter: "#"})
	before := e.publish(t, "t/a", "before")
	w := e.h.Watch([]string{"t/#", "t/a"}, 16) // overlapping filters: once each
	defer w.Stop()
	if w.From != before {
		t.Fatalf("From %d, want the head %d", w.From, before)
	}
	m1, m2, m3 := e.accept(t, "t/a", "1"), e.accept(t, "u/x", "not watched"), e.accept(t, "t/b", "3")
	e.h.Feed(m3)
	e.h.Feed(m2)
	none(t, w) // 3 waits for 1
	if s := e.h.Stats(); s.Held != 2 {
		t.Fatalf("held %d, want 2", s.Held)
	}
	e.h.Feed(m1)
	if got := seqsOf(receive(t, w, 2)); !slices.Equal(got, []uint64{m1.Seq, m3.Seq}) {
		t.Fatalf("got seqs %v, want %d %d", got, m1.Seq, m3.Seq)
	}
	e.h.Feed(m3) // fed twice: dropped
	none(t, w)
	if s := e.h.Stats(); s.Held != 0 || s.Skipped != 0 || s.Watchers != 1 {
		t.Fatalf("stats %+v", s)
	}
}

// A record that goes to many watches is framed once, and every watch
// gets the same frame; records nobody watches are not framed.
func TestHistoryFramesARecordOnce(t *testing.T) {
	e := openHistEnv(t, t.TempDir(), HistoryOptions{}, storage.LogRule{Filter: "#"})
	var framed atomic.Int64
	e.h.SetFrame(func(r *Record) []byte {
		framed.Add(1)
		return []byte("frame " + string(r.Payload))
	})
	var ws []*Watch
	for _, f := range []string{"t/a", "t/#", "#", "t/+"} {
		w := e.h.Watch([]string{f}, 16)
		defer w.Stop()
		ws = append(ws, w)
	}
	e.h.Feed(e.accept(t, "t/a", "one"))
	e.h.Feed(e.accept(t, "u/b", "two")) // only "#" watches it
	for i, w := range ws {
		recs := receive(t, w, 1)
		if string(recs[0].Frame) != "frame one" {
			t.Fatalf("watch %d: frame %q", i, recs[0].Frame)
		}
	}
	if got := receive(t, ws[2], 1); string(got[0].Frame) != "frame two" {
		t.Fatalf("frame %q", got[0].Frame)
	}
	if n := framed.Load(); n != 2 {
		t.Fatalf("framed %d times for 2 records", n)
	}
}

func TestHistoryGivesUpOnASeqNeverFed(t *testing.T) {
	e := openHistEnv(t, t.TempDir(), HistoryOptions{GapWait: 50 * time.Millisecond}, storage.LogRule{Filter: "#"})
	w := e.h.Watch([]string{"#"}, 16)
	defer w.Stop()
	lost := e.accept(t, "t", "its route failed")
	start := time.Now()
	e.h.Feed(e.accept(t, "t", "next"))
	r := receive(t, w, 1)[0]
	if string(r.Payload) != "next" || time.Since(start) < 50*time.Millisecond {
		t.Fatalf("got %q after %v, want next after the gap wait", r.Payload, time.Since(start))
	}
	if s := e.h.Stats(); s.Skipped != 1 || s.Held != 0 {
		t.Fatalf("stats %+v", s)
	}
	e.h.Feed(lost) // late after all: delivered, once
	if r := receive(t, w, 1)[0]; r.Seq != lost.Seq {
		t.Fatalf("late record %d, want %d", r.Seq, lost.Seq)
	}
	e.h.Feed(lost)
	none(t, w)
	if s := e.h.Stats(); s.Late != 1 {
		t.Fatalf("stats %+v", s)
	}
}

// Publishers append and feed concurrently, out of seq order; streams open
// at random moments, replay what they are behind by, follow live, and
// disconnect and resume from the id of the last event they saw. Every
// stream must see every recorded message after its start position exactly
// once, and every live-only message fed after it registered.
func TestHistorySeamNoGapNoDuplicate(t *testing.T) {
	e := openHistEnv(t, t.TempDir(), HistoryOptions{}, storage.LogRule{Filter: "rec/#"})
	const publishers, perPublisher, streams = 6, 250, 8
	filters := []string{"rec/#", "live/#"}

	var mu sync.Mutex
	topicOf := map[uint64]string{} // every published seq
	var maxFed uint64
	overtaken := 0 // messages fed after a higher seq
	var wg sync.WaitGroup
	for p := range publishers {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(p), 1))
			for i := range perPublisher {
				topic := fmt.Sprintf("rec/%d", p)
				if i%3 == 0 {
					topic = fmt.Sprintf("live/%d", p) // numbered only
				}
				m := e.accept(t, topic, fmt.Sprint(i))
				mu.Lock()
				topicOf[m.Seq] = topic
				mu.Unlock()
				// Routing takes a while, and publishers overtake each other.
				if rng.IntN(4) == 0 {
					time.Sleep(time.Duration(rng.IntN(300)) * time.Microsecond)
				}
				mu.Lock()
				if m.Seq < maxFed {
					overtaken++
				}
				maxFed = max(maxFed, m.Seq)
				mu.Unlock()
				e.h.Feed(m)
			}
		})
	}

	type result struct {
		start    uint64 // the position it started from (as if resuming)
		from1    uint64 // the first watch's From
		cut      uint64 // the id of the last event before the disconnect
		from2    uint64 // the second watch's From; MaxUint64 if the first saw the end
		seen     []uint64
		liveSeqs [][]uint64
		err      error
	}
	results := make([]*result, streams)
	var swg sync.WaitGroup
	for s := range streams {
		res := &result{}
		results[s] = res
		swg.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(s), 2))
			time.Sleep(time.Duration(rng.IntN(20)) * time.Millisecond)
			res.start = e.log.Head() / 2
			// follow replays from after and follows live until it has
			// taken stopAfter live events (0: until the end message), as
			// the SSE bridge does; last is the id of its last event.
			follow := func(after uint64, stopAfter int) (from, last uint64, end bool, err error) {
				w := e.h.Watch(filters, 1<<14)
				defer w.Stop()
				if err := e.h.CanReplay(after, filters); err != nil {
					return 0, 0, false, err
				}
				last = after
				err = e.h.Replay(context.Background(), after, w.From, filters, matchAny(filters), func(r *Record) bool {
					res.seen = append(res.seen, r.Seq)
					last = r.Seq
					end = end || r.Topic == "rec/end"
					return true
				})
				if err != nil || end {
					return w.From, last, end, err
				}
				var live []uint64
				defer func() { res.liveSeqs = append(res.liveSeqs, live) }()
				for n := 0; stopAfter == 0 || n < stopAfter; n++ {
					select {
					case r, ok := <-w.C():
						if !ok {
							return 0, 0, false, errors.New("watch ended")
						}
						res.seen = append(res.seen, r.Seq)
						live = append(live, r.Seq)
						last = r.Seq
						if r.Topic == "rec/end" {
							return w.From, last, true, nil
						}
					case <-time.After(10 * time.Second):
						return 0, 0, false, fmt.Errorf("stalled after %d live events", n)
					}
				}
				return w.From, last, false, nil
			}
			var end bool
			var err error
			res.from2 = math.MaxUint64
			if res.from1, res.cut, end, err = follow(res.start, 1+rng.IntN(200)); err != nil || end {
				res.err = err
				return
			}
			if res.from2, _, _, err = follow(res.cut, 0); err != nil {
				res.err = err
			}
		})
	}
	wg.Wait()
	endSeq := e.publish(t, "rec/end", "")
	swg.Wait()
	topicOf[endSeq] = "rec/end"
	if overtaken == 0 {
		t.Fatal("every message was fed in seq order: the test proves nothing")
	}
	t.Logf("%d of %d messages fed after a higher seq", overtaken, len(topicOf))

	for i, res := range results {
		if res.err != nil {
			t.Fatalf("stream %d: %v", i, res.err)
		}
		for _, live := range res.liveSeqs {
			if !slices.IsSorted(live) {
				t.Fatalf("stream %d: live events out of seq order: %v", i, live)
			}
		}
		got := map[uint64]bool{}
		for _, seq := range res.seen {
			if got[seq] {
				t.Fatalf("stream %d: seq %d twice", i, seq)
			}
			got[seq] = true
		}
		for seq, topic := range topicOf {
			var want bool
			if strings.HasPrefix(topic, "rec/") {
				want = seq > res.start
			} else {
				// Live only: seen by the first watch up to its last event,
				// and by the second after it registered.
				want = seq > res.from1 && seq <= res.cut || seq > res.from2
			}
			if want && !got[seq] {
				t.Fatalf("stream %d (start %d, from %d, cut %d, from %d): missed %d %s", i, res.start, res.from1, res.cut, res.from2, seq, topic)
			}
			if !want && got[seq] {
				t.Fatalf("stream %d (start %d, from %d, cut %d, from %d): got %d %s it should not", i, res.start, res.from1, res.cut, res.from2, seq, topic)
			}
		}
	}
	if s := e.h.Stats(); s.Skipped != 0 || s.Held != 0 || s.Overflows != 0 {
		t.Fatalf("stats %+v", s)
	}
}

func TestHistoryResets(t *testing.T) {
	e := openHistEnv(t, t.TempDir(), HistoryOptions{},
		storage.LogRule{Filter: "a/#", MaxMessages: 5}, storage.LogRule{Filter: "b/#"})
	for i := range 20 {
		e.publish(t, "a/x", fmt.Sprint(i))
	}
	head := e.log.Head()

	other := openHistEnv(t, t.TempDir(), HistoryOptions{})
	for _, tc := range []struct{ name, id, reason string }{
		{"malformed", "nope", ResetUnknown},
		{"not a number", e.h.EventID(3) + "x", ResetUnknown},
		{"from the future", e.h.EventID(head + 5), ResetUnknown},
		{"another log", other.h.EventID(1), ResetForeignEpoch},
		{"the history before the log", "0123456789ab-5", ResetForeignEpoch},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := e.h.ParseID(tc.id)
			wantReset(t, err, tc.reason)
		})
	}
	if seq, err := e.h.ParseID(e.h.EventID(head)); err != nil || seq != head {
		t.Fatalf("own id: %d %v", seq, err)
	}

	// The count rule kept the last 5: resuming from before them resets.
	wantReset(t, e.h.CanReplay(head-6, []string{"a/#"}), ResetExpired)
	wantReset(t, e.h.CanReplay(0, []string{"#"}), ResetExpired)
	wantReset(t, e.h.CanReplay(head+1, []string{"a/#"}), ResetUnknown)
	if err := e.h.CanReplay(head-5, []string{"a/#"}); err != nil {
		t.Fatalf("resume from before the oldest kept: %v", err)
	}
	if err := e.h.CanReplay(0, []string{"b/#", "c"}); err != nil {
		t.Fatalf("filters no trimmed rule overlaps: %v", err)
	}
	got, err := e.replay(t, 0, head, "a/#")
	wantReset(t, err, ResetExpired)
	if len(got) != 0 {
		t.Fatalf("a reset replay gave records: %v", got)
	}
	got, err = e.replay(t, head-5, head, "a/#")
	if err != nil || strings.Join(got, " ") != "a/x=15 a/x=16 a/x=17 a/x=18 a/x=19" {
		t.Fatalf("replay of the kept: %v %v", got, err)
	}
}

func TestHistoryRecordsAndLiveOnly(t *testing.T) {
	e := openHistEnv(t, t.TempDir(), HistoryOptions{}, storage.LogRule{Filter: "rec/#"})
	for _, tc := range []struct {
		filter string
		want   bool
	}{{"rec/#", true}, {"rec/a", true}, {"rec/+/b", true}, {"#", false}, {"other/x", false}} {
		if got := e.h.Records(tc.filter); got != tc.want {
			t.Errorf("Records(%q) = %v, want %v", tc.filter, got, tc.want)
		}
	}
	w := e.h.Watch([]string{"#"}, 16)
	defer w.Stop()
	e.publish(t, "rec/a", "kept")
	e.publish(t, "other/x", "numbered only")
	// Stored for a session only (not released yet): no rule records it.
	seq, err := e.log.Append(&storage.LogMessage{Topic: "other/y", Payload: []byte("for a session")})
	if err != nil {
		t.Fatal(err)
	}
	defer e.log.Release(seq)
	e.h.Feed(&Message{Seq: seq, Topic: "other/y", Payload: []byte("for a session")})
	if got := receive(t, w, 3); got[1].Topic != "other/x" || got[2].Topic != "other/y" {
		t.Fatalf("live: %v", seqsOf(got))
	}
	got, err := e.replay(t, 0, e.log.Head(), "#")
	if err != nil || strings.Join(got, " ") != "rec/a=kept" {
		t.Fatalf("replay: %v %v", got, err)
	}
}

func TestHistoryLast(t *testing.T) {
	dir := t.TempDir()
	rules := []storage.LogRule{{Filter: "t/#"}, {Filter: "cnt/#", MaxMessages: 2}}
	e := openHistEnv(t, dir, HistoryOptions{}, rules...)
	ctx := context.Background()
	last := func(e *histEnv, topic string) string {
		t.Helper()
		rec, ok, err := e.h.Last(ctx, topic)
		switch {
		case err != nil:
			t.Fatal(err)
		case !ok:
			return "none"
		case rec.Topic != topic:
			t.Fatalf("Last(%q) gave %q", topic, rec.Topic)
		}
		return string(rec.Payload)
	}
	e.publish(t, "t/a", "1")
	e.publish(t, "t/b", "1")
	e.publish(t, "t/a", "2")
	e.publish(t, "x/y", "no rule")
	e.publish(t, "cnt/a", "1")
	for range 3 {
		e.publish(t, "cnt/b", "1") // trims cnt/a
	}
	for topic, want := range map[string]string{"t/a": "2", "t/b": "1", "t/c": "none", "x/y": "none", "cnt/a": "none", "cnt/b": "1"} {
		if got := last(e, topic); got != want {
			t.Errorf("before restart: Last(%q) = %s, want %s", topic, got, want)
		}
	}

	// After a restart the index is rebuilt from the log; with room for
	// two topics, the others are found by reading the log.
	e = e.reopen(t, HistoryOptions{LastTopics: 4})
	for i := range 10 {
		e.publish(t, fmt.Sprintf("t/n%d", i), fmt.Sprint(i))
	}
	for topic, want := range map[string]string{"t/a": "2", "t/b": "1", "t/n0": "0", "t/n9": "9", "t/zz": "none", "cnt/b": "1"} {
		if got := last(e, topic); got != want {
			t.Errorf("after restart: Last(%q) = %s, want %s", topic, got, want)
		}
	}
}

func TestWatchTooSlowIsEnded(t *testing.T) {
	e := openHistEnv(t, t.TempDir(), HistoryOptions{}, storage.LogRule{Filter: "#"})
	w := e.h.Watch([]string{"t/#"}, 4)
	defer w.Stop()
	for range 5 {
		e.publish(t, "t/b", "")
	}
	n := 0
	for range w.C() { // the buffered 4, then closed
		n++
	}
	select {
	case <-w.Ended():
	default:
		t.Fatal("Ended not closed with C")
	}
	if s := e.h.Stats(); n != 4 || !w.Overflowed() || s.Overflows != 1 || s.Watchers != 0 {
		t.Fatalf("%d received, overflowed %v, stats %+v", n, w.Overflowed(), s)
	}
	e.publish(t, "t/b", "") // an ended watch is not fed
}

func TestHistoryRestartResumes(t *testing.T) {
	e := openHistEnv(t, t.TempDir(), HistoryOptions{}, storage.LogRule{Filter: "#", MaxMessages: 100})
	var seqs []uint64
	for i := range 10 {
		seqs = append(seqs, e.publish(t, "a/b", fmt.Sprint(i)))
	}
	id := e.h.EventID(seqs[6])

	e = e.reopen(t, HistoryOptions{})
	seq, err := e.h.ParseID(id)
	if err != nil || seq != seqs[6] {
		t.Fatalf("an id from before the restart: %d %v", seq, err)
	}
	w := e.h.Watch([]string{"a/#"}, 16)
	defer w.Stop()
	if err := e.h.CanReplay(seq, []string{"a/#"}); err != nil {
		t.Fatal(err)
	}
	got, err := e.replay(t, seq, w.From, "a/#")
	if err != nil || strings.Join(got, " ") != "a/b=7 a/b=8 a/b=9" {
		t.Fatalf("replay after the restart: %v %v", got, err)
	}
	next := e.publish(t, "a/b", "new")
	if r := receive(t, w, 1)[0]; next <= seqs[9] || r.Seq != next {
		t.Fatalf("live after the restart: seq %d (last before %d), got %d", next, seqs[9], r.Seq)
	}
}

func TestHistoryShutdown(t *testing.T) {
	e := openHistEnv(t, t.TempDir(), HistoryOptions{}, storage.LogRule{Filter: "#"})
	w := e.h.Watch([]string{"#"}, 4)
	e.accept(t, "a", "never fed") // the next one is held behind it
	e.h.Feed(e.accept(t, "a", "held"))
	if s := e.h.Stats(); s.Held != 1 {
		t.Fatalf("stats %+v", s)
	}
	if err := e.h.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := e.h.Shutdown(context.Background()); err != nil {
		t.Fatal("second shutdown:", err)
	}
	if _, ok := <-w.C(); ok || w.Overflowed() {
		t.Fatal("a watch outlived the history, or was counted as slow")
	}
	after := e.h.Watch([]string{"#"}, 4)
	if _, ok := <-after.C(); ok {
		t.Fatal("a watch after shutdown is open")
	}
	after.Stop()
	w.Stop()
	e.h.Feed(e.accept(t, "a", "after")) // ignored
}

func BenchmarkHistoryFeed(b *testing.B) {
	db, err := storage.Open(storage.Options{Dir: b.TempDir(), Sync: storage.SyncNone})
	if err != nil {
		b.Fatal(err)
	}
	l, err := storage.OpenLog(db, storage.LogOptions{})
	if err != nil {
		b.Fatal(err)
	}
	h, err := NewHistory(HistoryOptions{Log: l})
	if err != nil {
		b.Fatal(err)
	}
	w := h.Watch([]string{"devices/+/telemetry"}, 1<<20)
	payload := make([]byte, 64)
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		m := &Message{Topic: "devices/d1/telemetry", Payload: payload, QoS: 1}
		lm := storage.LogMessage{Topic: m.Topic}
		m.Seq = l.Number(&lm)
		h.Feed(m)
		if i%(1<<19) == 0 {
			for len(w.C()) > 0 {
				<-w.C()
			}
		}
	}
	b.StopTimer()
	w.Stop()
	ctx := context.Background()
	_ = errors.Join(h.Shutdown(ctx), l.Shutdown(ctx), db.Shutdown(ctx))
}
