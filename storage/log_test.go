package storage_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"reflect"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/beaconmq/beacon/storage"
)

// openLogDB opens a DB in dir that is shut down when the test ends.
func openLogDB(t testing.TB, dir string, policy storage.SyncPolicy) *storage.DB {
	t.Helper()
	db, err := storage.Open(storage.Options{Dir: dir, Sync: policy})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = db.Shutdown(context.Background()) })
	return db
}

// openLog opens the log of db, shut down when the test ends (before the
// DB: cleanups run last in, first out).
func openLog(t testing.TB, db *storage.DB, opts storage.LogOptions) *storage.Log {
	t.Helper()
	l, err := storage.OpenLog(db, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = l.Shutdown(context.Background()) })
	return l
}

// barrier returns once everything queued to db before it is committed.
func barrier(t testing.TB, db *storage.DB) {
	t.Helper()
	if err := db.Commit(); err != nil {
		t.Fatal(err)
	}
}

// checkFor calls f until it returns nil or total has passed; f's last
// error says what was seen at the deadline.
func checkFor(t testing.TB, total, sleep time.Duration, f func() error) {
	t.Helper()
	deadline := time.Now().Add(total)
	for {
		err := f()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal(err)
		}
		time.Sleep(sleep)
	}
}

// fakeClock is a settable clock for LogOptions.Now.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func newFakeClock() *fakeClock { return &fakeClock{t: time.Unix(1_700_000_000, 0)} }

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

func appendMsg(t testing.TB, l *storage.Log, topic string, payload string) uint64 {
	t.Helper()
	seq, err := l.Append(&storage.LogMessage{Topic: topic, Payload: []byte(payload), QoS: 1})
	if err != nil {
		t.Fatal(err)
	}
	return seq
}

// stored lists the seqs Read returns.
func stored(t testing.TB, l *storage.Log) []uint64 {
	t.Helper()
	var out []uint64
	if err := l.Read(0, 0, func(m *storage.LogMessage) bool { out = append(out, m.Seq); return true }); err != nil {
		t.Fatal(err)
	}
	return out
}

func seqs(from, to uint64) []uint64 {
	var out []uint64
	for s := from; s <= to; s++ {
		out = append(out, s)
	}
	return out
}

func equalMessage(a, b storage.LogMessage) bool {
	return a.Seq == b.Seq && a.Time == b.Time && a.Topic == b.Topic && bytes.Equal(a.Payload, b.Payload) &&
		a.QoS == b.QoS && a.Retain == b.Retain && a.Client == b.Client && a.Device == b.Device &&
		a.Expiry == b.Expiry && bytes.Equal(a.Props, b.Props) && a.Origin == b.Origin
}

func sampleLogMessages() []storage.LogMessage {
	return []storage.LogMessage{
		{Topic: "a/b", Payload: []byte("hello"), QoS: 1},
		{Topic: "t", QoS: 0},
		{Topic: "sensors/1/temp", Payload: []byte{0, 1, 2, 0xff}, QoS: 2, Retain: true, Client: "c1", Device: "dev-1",
			Expiry: 1_800_000_000, Props: []byte{0x03, 0x00, 0x04, 'j', 's', 'o', 'n'}, Time: 42},
		{Topic: "$SYS/broker", Payload: bytes.Repeat([]byte("x"), 100_000), Client: "broker-internal", Time: -5},
		{Topic: strings.Repeat("long/", 1000), Payload: []byte("y"), Props: []byte{1}},
	}
}

func TestLogAppendGetRead(t *testing.T) {
	for _, policy := range []storage.SyncPolicy{storage.SyncAlways, storage.SyncBatch, storage.SyncNone} {
		t.Run(string(policy), func(t *testing.T) {
			clock := newFakeClock()
			db := openLogDB(t, t.TempDir(), policy)
			l := openLog(t, db, storage.LogOptions{Now: clock.Now})
			if l.Epoch() == 0 || l.Head() != 0 {
				t.Fatalf("epoch %x head %d", l.Epoch(), l.Head())
			}
			var want []storage.LogMessage
			for i, m := range sampleLogMessages() {
				seq, err := l.Append(&m)
				if err != nil {
					t.Fatal(err)
				}
				if seq != uint64(i+1) || m.Seq != seq {
					t.Fatalf("append %d: seq %d (m.Seq %d)", i, seq, m.Seq)
				}
				if m.Time == 0 {
					t.Fatalf("append %d: time not set", i)
				}
				want = append(want, m)
			}
			if want[0].Time != clock.Now().UnixNano() || want[2].Time != 42 {
				t.Fatalf("times %d %d", want[0].Time, want[2].Time)
			}
			for _, w := range want {
				got, err := l.Get(w.Seq)
				if err != nil {
					t.Fatalf("get %d: %v", w.Seq, err)
				}
				if !equalMessage(got, w) {
					t.Fatalf("get %d:\n got %+v\nwant %+v", w.Seq, got, w)
				}
			}
			var got []storage.LogMessage
			if err := l.Read(0, 0, func(m *storage.LogMessage) bool { got = append(got, *m); return true }); err != nil {
				t.Fatal(err)
			}
			if len(got) != len(want) {
				t.Fatalf("read %d messages, want %d", len(got), len(want))
			}
			for i := range want {
				if !equalMessage(got[i], want[i]) {
					t.Fatalf("read %d:\n got %+v\nwant %+v", i, got[i], want[i])
				}
			}
			for _, seq := range []uint64{0, 6, 1 << 40} {
				if _, err := l.Get(seq); !errors.Is(err, storage.ErrLogNotFound) {
					t.Fatalf("get %d: %v, want ErrLogNotFound", seq, err)
				}
			}
			s := l.Stats()
			if s.Stored != 5 || s.Appended != 5 || s.Head != 5 || s.Pending != 5 {
				t.Fatalf("stats %+v", s)
			}
		})
	}
}

// The methods broker/engine's Log interface asks of the log (declared
// there; repeated here, as storage cannot import the engine).
var _ interface {
	AppendWith(m *storage.LogMessage, extra func(seq uint64) []storage.Op) (uint64, error)
	Number(m *storage.LogMessage) uint64
	Keeps(topic string) bool
	Get(seq uint64) (storage.LogMessage, error)
	Ref(seq uint64)
	Unref(seq uint64)
	Release(seq uint64)
	StartTrimming()
} = (*storage.Log)(nil)

func TestLogAppendWith(t *testing.T) {
	db := openLogDB(t, t.TempDir(), storage.SyncBatch)
	l := openLog(t, db, storage.LogOptions{Rules: []storage.LogRule{{Filter: "kept/#"}}})
	queueKey := func(seq uint64) []byte { return fmt.Appendf(nil, "test-queue\x00%d", seq) }
	appendMsg(t, l, "kept/a", "")
	var got uint64
	seq, err := l.AppendWith(&storage.LogMessage{Topic: "q"}, func(seq uint64) []storage.Op {
		got = seq
		return []storage.Op{storage.Set(queueKey(seq), []byte("entry")), storage.Set(queueKey(seq+1000), nil)}
	})
	if err != nil {
		t.Fatal(err)
	}
	if seq != 2 || got != seq {
		t.Fatalf("seq %d, extra saw %d", seq, got)
	}
	if v, err := db.Get(queueKey(seq)); err != nil || string(v) != "entry" {
		t.Fatalf("extra op: %q %v", v, err)
	}
	if _, err := l.Get(seq); err != nil {
		t.Fatal(err)
	}
	if seq, err := l.AppendWith(&storage.LogMessage{Topic: "q"}, nil); err != nil || seq != 3 {
		t.Fatalf("without extra: %d %v", seq, err)
	}
	for topic, want := range map[string]bool{"kept": true, "kept/x/y": true, "q": false, "$SYS/kept": false} {
		if l.Keeps(topic) != want {
			t.Errorf("Keeps(%q) = %v", topic, !want)
		}
	}
}

// AppendQueued returns before the write is durable; the record is read
// (Get waits for it) and survives a clean shutdown, in seq order with
// waited appends.
func TestLogAppendQueued(t *testing.T) {
	dir := t.TempDir()
	db, err := storage.Open(storage.Options{Dir: dir, Sync: storage.SyncBatch})
	if err != nil {
		t.Fatal(err)
	}
	l, err := storage.OpenLog(db, storage.LogOptions{Rules: []storage.LogRule{{Filter: "#"}}})
	if err != nil {
		t.Fatal(err)
	}
	var seqs []uint64
	for i := range 200 {
		m := &storage.LogMessage{Topic: "t", Payload: []byte(fmt.Sprint(i))}
		var seq uint64
		if i%10 == 9 {
			seq, err = l.AppendWith(m, nil)
		} else {
			seq, err = l.AppendQueued(m, nil)
		}
		if err != nil {
			t.Fatal(err)
		}
		seqs = append(seqs, seq)
	}
	if m, err := l.Get(seqs[150]); err != nil || string(m.Payload) != "150" {
		t.Fatalf("get %d: %q %v", seqs[150], m.Payload, err)
	}
	_ = l.Shutdown(context.Background())
	_ = db.Shutdown(context.Background())

	db2 := openLogDB(t, dir, storage.SyncBatch)
	l2 := openLog(t, db2, storage.LogOptions{Rules: []storage.LogRule{{Filter: "#"}}})
	var got []string
	if err := l2.Read(0, 0, func(m *storage.LogMessage) bool { got = append(got, string(m.Payload)); return true }); err != nil {
		t.Fatal(err)
	}
	if len(got) != 200 || got[0] != "0" || got[199] != "199" {
		t.Fatalf("read back %d records (%v ... )", len(got), got[:min(3, len(got))])
	}
	for i, p := range got {
		if p != fmt.Sprint(i) {
			t.Fatalf("record %d is %q: out of order", i, p)
		}
	}
}

func TestLogReadWindows(t *testing.T) {
	db := openLogDB(t, t.TempDir(), storage.SyncBatch)
	l := openLog(t, db, storage.LogOptions{})
	for i := 0; i < 10; i++ {
		appendMsg(t, l, "a", fmt.Sprint(i))
	}
	numbered := l.Number(&storage.LogMessage{Topic: "q0"}) // 11: not stored
	appendMsg(t, l, "a", "12")
	if numbered != 11 {
		t.Fatalf("numbered %d", numbered)
	}
	tests := []struct {
		name        string
		after, upto uint64
		stopAt      uint64
		want        []uint64
	}{
		{"all", 0, 0, 0, append(seqs(1, 10), 12)},
		{"window", 3, 6, 0, seqs(4, 6)},
		{"after the end", 12, 0, 0, nil},
		{"after equals upto", 5, 5, 0, nil},
		{"after beyond upto", 7, 5, 0, nil},
		{"numbered seq skipped", 9, 12, 0, []uint64{10, 12}},
		{"upto a numbered seq", 9, 11, 0, []uint64{10}},
		{"upto beyond head", 10, 100, 0, []uint64{12}},
		{"stop early", 0, 0, 3, seqs(1, 3)},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var got []uint64
			err := l.Read(tc.after, tc.upto, func(m *storage.LogMessage) bool {
				got = append(got, m.Seq)
				return m.Seq != tc.stopAt
			})
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(got, tc.want) {
				t.Fatalf("read (%d, %d]: %v, want %v", tc.after, tc.upto, got, tc.want)
			}
		})
	}
}

func TestLogAppendBatch(t *testing.T) {
	db := openLogDB(t, t.TempDir(), storage.SyncBatch)
	l := openLog(t, db, storage.LogOptions{})
	appendMsg(t, l, "first", "")
	// More records and bytes than one write holds: split in order.
	var ms []*storage.LogMessage
	for i := 0; i < 3000; i++ {
		ms = append(ms, &storage.LogMessage{Topic: "batch", Payload: bytes.Repeat([]byte{byte(i)}, 1000)})
	}
	if err := l.AppendBatch(ms); err != nil {
		t.Fatal(err)
	}
	for i, m := range ms {
		if m.Seq != uint64(i+2) {
			t.Fatalf("message %d: seq %d", i, m.Seq)
		}
	}
	if got := stored(t, l); !slices.Equal(got, seqs(1, 3001)) {
		t.Fatalf("stored %d records (%v...)", len(got), got[:min(len(got), 5)])
	}
	if err := l.AppendBatch(nil); err != nil {
		t.Fatal(err)
	}
	if err := l.AppendBatch([]*storage.LogMessage{{Topic: "x", QoS: 3}}); err == nil {
		t.Fatal("QoS 3 appended")
	}
}

// TestLogConcurrentAppend: seqs from many appenders are unique and each
// appender's increase; a reader following Head sees every seq in order
// without a gap while appends are in flight.
func TestLogConcurrentAppend(t *testing.T) {
	for _, policy := range []storage.SyncPolicy{storage.SyncBatch, storage.SyncNone} {
		t.Run(string(policy), func(t *testing.T) {
			const writers, each = 8, 500
			db := openLogDB(t, t.TempDir(), policy)
			l := openLog(t, db, storage.LogOptions{ReserveBlock: 64}) // reservations on the way too
			var wg sync.WaitGroup
			got := make([][]uint64, writers)
			errs := make(chan error, writers+1)
			var stop atomic.Bool
			readerDone := make(chan struct{})
			go func() { // follows Head, checks every record is there
				defer close(readerDone)
				var pos uint64
				for pos < writers*each {
					upto := l.Head()
					if upto == pos {
						// Nothing new (and upto 0 would mean "Head at the call").
						runtime.Gosched()
						continue
					}
					err := l.Read(pos, upto, func(m *storage.LogMessage) bool {
						if m.Seq != pos+1 {
							errs <- fmt.Errorf("reader at %d got %d (upto %d)", pos, m.Seq, upto)
							stop.Store(true)
							return false
						}
						pos = m.Seq
						return true
					})
					if err != nil || stop.Load() {
						errs <- err
						return
					}
					if pos != upto {
						errs <- fmt.Errorf("read up to %d stopped at %d", upto, pos)
						return
					}
				}
			}()
			for w := 0; w < writers; w++ {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for i := 0; i < each; i++ {
						seq, err := l.Append(&storage.LogMessage{Topic: fmt.Sprintf("w/%d", w), Payload: []byte{byte(i)}})
						if err != nil {
							errs <- err
							return
						}
						got[w] = append(got[w], seq)
					}
				}()
			}
			wg.Wait()
			<-readerDone
			close(errs)
			for err := range errs {
				if err != nil {
					t.Fatal(err)
				}
			}
			var all []uint64
			for w, s := range got {
				if !slices.IsSorted(s) {
					t.Fatalf("writer %d: seqs not increasing", w)
				}
				all = append(all, s...)
			}
			slices.Sort(all)
			if !slices.Equal(all, seqs(1, writers*each)) {
				t.Fatalf("seqs not 1..%d without duplicates", writers*each)
			}
			var read []uint64
			err := l.Read(0, 0, func(m *storage.LogMessage) bool {
				read = append(read, m.Seq)
				if want := fmt.Sprintf("w/%d", slices.IndexFunc(got, func(s []uint64) bool { return slices.Contains(s, m.Seq) })); m.Topic != want {
					t.Errorf("seq %d: topic %q, want %q", m.Seq, m.Topic, want)
				}
				return true
			})
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(read, all) {
				t.Fatalf("read %d records, not 1..%d in order", len(read), writers*each)
			}
		})
	}
}

// TestLogReopenWithoutShutdown: the log is not shut down, only the DB (a
// crash of everything above storage): no seq is handed out twice, the
// epoch stays, every append that returned is readable.
func TestLogReopenWithoutShutdown(t *testing.T) {
	for _, policy := range []storage.SyncPolicy{storage.SyncAlways, storage.SyncBatch, storage.SyncNone} {
		t.Run(string(policy), func(t *testing.T) {
			dir := t.TempDir()
			db, err := storage.Open(storage.Options{Dir: dir, Sync: policy})
			if err != nil {
				t.Fatal(err)
			}
			l, err := storage.OpenLog(db, storage.LogOptions{ReserveBlock: 4})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = l.Shutdown(context.Background()) })
			epoch := l.Epoch()
			var appended []uint64
			for i := 0; i < 30; i++ {
				if i%3 == 0 {
					l.Number(&storage.LogMessage{Topic: "live"})
					continue
				}
				appended = append(appended, appendMsg(t, l, "kept", fmt.Sprint(i)))
			}
			seen := l.Number(&storage.LogMessage{Topic: "live"}) // the last seq is a numbered one
			if err := db.Shutdown(context.Background()); err != nil {
				t.Fatal(err)
			}

			db = openLogDB(t, dir, policy)
			l2 := openLog(t, db, storage.LogOptions{ReserveBlock: 4})
			if l2.Epoch() != epoch {
				t.Fatalf("epoch %x, was %x", l2.Epoch(), epoch)
			}
			if l2.Head() < seen {
				t.Fatalf("head %d below the last seq seen %d", l2.Head(), seen)
			}
			if seq := appendMsg(t, l2, "kept", "after"); seq <= seen {
				t.Fatalf("seq %d reused (last seen %d)", seq, seen)
			}
			if got := stored(t, l2); !slices.Equal(got[:len(got)-1], appended) {
				t.Fatalf("stored %v, want %v and one more", got, appended)
			}
		})
	}
}

// TestLogSurvivesSIGKILL kills a process that appends and numbers from
// several goroutines: after the restart the epoch is the same, every
// append that returned (under SyncBatch) is readable, and no seq the
// process handed out is handed out again.
func TestLogSurvivesSIGKILL(t *testing.T) {
	if dir := os.Getenv("BEACON_LOG_CRASH_DIR"); dir != "" {
		crashChild(dir)
		return
	}
	if testing.Short() {
		t.Skip("starts a process")
	}
	dir := t.TempDir()
	cmd := exec.Command(os.Args[0], "-test.run=^TestLogSurvivesSIGKILL$", "-test.count=1")
	cmd.Env = append(os.Environ(), "BEACON_LOG_CRASH_DIR="+dir)
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var epoch, maxSeen uint64
	var appended []uint64
	sc := bufio.NewScanner(out)
	for lines := 0; lines < 2000 && sc.Scan(); lines++ {
		kind, v, ok := strings.Cut(sc.Text(), " ")
		n, err := strconv.ParseUint(v, 10, 64)
		if !ok || err != nil {
			continue
		}
		switch kind {
		case "epoch":
			epoch = n
		case "a":
			appended = append(appended, n)
		}
		if kind == "a" || kind == "n" {
			maxSeen = max(maxSeen, n)
		}
	}
	if err := cmd.Process.Kill(); err != nil { // SIGKILL
		t.Fatal(err)
	}
	_ = cmd.Wait()
	if epoch == 0 || len(appended) < 100 {
		t.Fatalf("child printed epoch %x and %d appends", epoch, len(appended))
	}

	db := openLogDB(t, dir, storage.SyncBatch)
	l := openLog(t, db, storage.LogOptions{ReserveBlock: 16})
	if l.Epoch() != epoch {
		t.Fatalf("epoch %x, was %x", l.Epoch(), epoch)
	}
	for _, seq := range appended {
		if _, err := l.Get(seq); err != nil {
			t.Fatalf("acknowledged append %d: %v", seq, err)
		}
	}
	if seq := appendMsg(t, l, "after", ""); seq <= maxSeen {
		t.Fatalf("seq %d handed out again (child saw up to %d)", seq, maxSeen)
	}
	if n := l.Number(&storage.LogMessage{}); n <= maxSeen {
		t.Fatalf("numbered %d, handed out before", n)
	}
}

// crashChild appends until it is killed, printing each seq it got.
func crashChild(dir string) {
	db, err := storage.Open(storage.Options{Dir: dir, Sync: storage.SyncBatch})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	l, err := storage.OpenLog(db, storage.LogOptions{ReserveBlock: 16})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	var mu sync.Mutex
	say := func(kind string, v uint64) {
		mu.Lock()
		defer mu.Unlock()
		fmt.Fprintf(os.Stdout, "%s %d\n", kind, v)
	}
	say("epoch", l.Epoch())
	for g := 0; g < 4; g++ {
		go func() {
			for i := 0; ; i++ {
				if i%3 == 0 {
					say("n", l.Number(&storage.LogMessage{Topic: "live"}))
					continue
				}
				seq, err := l.Append(&storage.LogMessage{Topic: "crash", Payload: []byte("payload")})
				if err != nil {
					fmt.Fprintln(os.Stderr, err)
					os.Exit(2)
				}
				say("a", seq)
			}
		}()
	}
	select {}
}

func TestLogRuleValidation(t *testing.T) {
	db := openLogDB(t, t.TempDir(), storage.SyncBatch)
	tests := []struct {
		name string
		rule storage.LogRule
		want string // in the error; "" = valid
	}{
		{"plain", storage.LogRule{Filter: "a/b", MaxMessages: 1}, ""},
		{"wildcards", storage.LogRule{Filter: "a/+/#", MaxAge: time.Hour}, ""},
		{"no limits", storage.LogRule{Filter: "#"}, ""},
		{"empty", storage.LogRule{Filter: ""}, "empty"},
		{"hash inside", storage.LogRule{Filter: "a/#/b"}, "last level"},
		{"partial wildcard", storage.LogRule{Filter: "a/b+"}, "whole levels"},
		{"shared", storage.LogRule{Filter: "$share/g/a"}, "shared"},
		{"nul", storage.LogRule{Filter: "a\x00b"}, "U+0000"},
		{"negative", storage.LogRule{Filter: "a", MaxBytes: -1}, "negative"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			l, err := storage.OpenLog(db, storage.LogOptions{Rules: []storage.LogRule{tc.rule}})
			if l != nil {
				_ = l.Shutdown(context.Background())
			}
			switch {
			case tc.want == "" && err != nil:
				t.Fatalf("rejected: %v", err)
			case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
				t.Fatalf("error %v, want one saying %q", err, tc.want)
			}
		})
	}
}

func TestLogIDs(t *testing.T) {
	db := openLogDB(t, t.TempDir(), storage.SyncBatch)
	l := openLog(t, db, storage.LogOptions{})
	for i := 0; i < 3; i++ {
		appendMsg(t, l, "a", "")
	}
	for _, seq := range []uint64{0, 1, 3} {
		id := l.FormatID(seq)
		got, err := l.ParseID(id)
		if err != nil || got != seq {
			t.Fatalf("ParseID(FormatID(%d) = %q) = %d, %v", seq, id, got, err)
		}
	}
	if id := l.FormatID(3); len(id) != 18 || id[16] != '-' || !strings.HasSuffix(id, "-3") {
		t.Fatalf("id %q: not 16 hex digits, a dash and the seq", id)
	}
	foreign := fmt.Sprintf("%016x-2", l.Epoch()^1)
	tests := []struct {
		id   string
		want error
	}{
		{l.FormatID(4), storage.ErrLogIDFuture},
		{fmt.Sprintf("%x-%d", l.Epoch(), uint64(1<<64-1)), storage.ErrLogIDFuture},
		{strings.ToUpper(l.FormatID(2)), nil},
		{foreign, storage.ErrLogIDForeign},
		{"a1b2c3d4e5f6-2", storage.ErrLogIDForeign}, // the history's format
		{"", storage.ErrLogIDMalformed},
		{"-", storage.ErrLogIDMalformed},
		{"12", storage.ErrLogIDMalformed},
		{"-12", storage.ErrLogIDMalformed},
		{"abc-", storage.ErrLogIDMalformed},
		{"xyz-1", storage.ErrLogIDMalformed},
		{"abc-1x", storage.ErrLogIDMalformed},
		{"abc--1", storage.ErrLogIDMalformed},
		{"abc-+1", storage.ErrLogIDMalformed},
		{"0x1f-1", storage.ErrLogIDMalformed},
		{"11111111111111111-1", storage.ErrLogIDMalformed}, // 17 hex digits
		{"abc-99999999999999999999999", storage.ErrLogIDMalformed},
		{"abc-1 ", storage.ErrLogIDMalformed},
		{"\x00-\x00", storage.ErrLogIDMalformed},
	}
	for _, tc := range tests {
		_, err := l.ParseID(tc.id)
		if !errors.Is(err, tc.want) && !(err == nil && tc.want == nil) {
			t.Errorf("ParseID(%q) = %v, want %v", tc.id, err, tc.want)
		}
	}
}

func TestLogDamagedRecords(t *testing.T) {
	dir := t.TempDir()
	db, err := storage.Open(storage.Options{Dir: dir})
	if err != nil {
		t.Fatal(err)
	}
	l, err := storage.OpenLog(db, storage.LogOptions{Rules: []storage.LogRule{{Filter: "#"}}})
	if err != nil {
		t.Fatal(err)
	}
	storage.SetLegacyLogWrites(l, true) // records under their own keys, damaged below
	for i := 0; i < 4; i++ {
		appendMsg(t, l, "ok", fmt.Sprint(i))
	}
	_ = l.Shutdown(context.Background())
	good := storage.EncodeLogMessage(nil, &storage.LogMessage{Topic: "t", Payload: []byte("p")})
	damage := []storage.Op{
		storage.Set(storage.LogKey(2), []byte{}),                 // empty
		storage.Set(storage.LogKey(3), good[:len(good)-1]),       // truncated
		storage.Set(storage.LogKey(9), []byte{99, 0, 0, 0, 0}),   // unknown version
		storage.Set(append(storage.LogKey(5), 'x'), good),        // bad key
		storage.Set(storage.LogKey(6), append(good[:2:2], 0xff)), // bad varint
	}
	if err := db.Write(damage...); err != nil {
		t.Fatal(err)
	}
	if err := db.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}

	db = openLogDB(t, dir, storage.SyncBatch)
	l = openLog(t, db, storage.LogOptions{Rules: []storage.LogRule{{Filter: "#"}}})
	storage.SetLegacyLogWrites(l, true)
	if st := l.Stats(); st.Damaged != 5 || st.Stored != 2 {
		t.Fatalf("stats %+v", st)
	}
	if got := stored(t, l); !slices.Equal(got, []uint64{1, 4}) {
		t.Fatalf("read %v", got)
	}
	if _, err := l.Get(3); !errors.Is(err, storage.ErrCorrupt) {
		t.Fatalf("get of a damaged record: %v", err)
	}
	if seq := appendMsg(t, l, "ok", ""); seq <= 9 {
		t.Fatalf("seq %d reuses a damaged record's", seq)
	}
	l.StartTrimming()
	checkFor(t, 5*time.Second, 20*time.Millisecond, func() error {
		barrier(t, db)
		n := 0
		err := db.Scan(storage.LogKey(0)[:2], func(_, _ []byte) error { n++; return nil })
		if err != nil || n != 3 {
			return fmt.Errorf("%d keys in the log, want 3 (%v)", n, err)
		}
		return nil
	})
}

func TestLogShutdown(t *testing.T) {
	db := openLogDB(t, t.TempDir(), storage.SyncBatch)
	l := openLog(t, db, storage.LogOptions{})
	appendMsg(t, l, "a", "")
	for i := 0; i < 2; i++ {
		if err := l.Shutdown(context.Background()); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := l.Append(&storage.LogMessage{Topic: "a"}); !errors.Is(err, storage.ErrClosed) {
		t.Fatalf("append after shutdown: %v", err)
	}
	if seq := l.Number(&storage.LogMessage{Topic: "a"}); seq != 0 {
		t.Fatalf("numbered %d after shutdown", seq)
	}
	if m, err := l.Get(1); err != nil || m.Topic != "a" {
		t.Fatalf("get after shutdown: %+v %v", m, err)
	}
}

func TestLogAppendAfterDBClosed(t *testing.T) {
	db, err := storage.Open(storage.Options{Dir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	l := openLog(t, db, storage.LogOptions{ReserveBlock: 2})
	appendMsg(t, l, "a", "")
	if err := db.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 3; i++ { // past the reservation too
		if _, err := l.Append(&storage.LogMessage{Topic: "a"}); !errors.Is(err, storage.ErrClosed) {
			t.Fatalf("append %d after the DB closed: %v", i, err)
		}
	}
}

func TestLogMessageRoundTrip(t *testing.T) {
	fromNode := storage.LogMessage{Topic: "from/b", Payload: []byte("z"), QoS: 1, Client: "c2", Device: "dev-2", Origin: "b/1f/2a"}
	for _, m := range append(sampleLogMessages(), fromNode) {
		b := storage.EncodeLogMessage(nil, &m)
		got, err := storage.DecodeLogMessage(b)
		if err != nil {
			t.Fatal(err)
		}
		m.Seq = 0
		if !equalMessage(got, m) {
			t.Fatalf("got %+v\nwant %+v", got, m)
		}
		for i := range b { // every truncation is an error, never a panic
			if _, err := storage.DecodeLogMessage(b[:i]); !errors.Is(err, storage.ErrCorrupt) {
				t.Fatalf("truncated at %d: %v", i, err)
			}
		}
	}
	small := storage.EncodeLogMessage(nil, &storage.LogMessage{Topic: "t", QoS: 1})
	if len(small) != 6 { // version, flags, time 0, topic length, topic, payload length
		t.Fatalf("a message with a 1-byte topic takes %d bytes: % x", len(small), small)
	}
}

func FuzzDecodeLogMessage(f *testing.F) {
	for _, m := range sampleLogMessages() {
		f.Add(storage.EncodeLogMessage(nil, &m))
	}
	f.Add([]byte{})
	f.Add([]byte{1, 0xff})
	f.Add([]byte{1, 3, 0, 0, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := storage.DecodeLogMessage(b)
		if err != nil {
			if !errors.Is(err, storage.ErrCorrupt) {
				t.Fatalf("error %v does not wrap ErrCorrupt", err)
			}
			return
		}
		again, err := storage.DecodeLogMessage(storage.EncodeLogMessage(nil, &m))
		if err != nil {
			t.Fatalf("re-encoded message does not decode: %v", err)
		}
		if !reflect.DeepEqual(normalized(again), normalized(m)) {
			t.Fatalf("round trip changed %+v to %+v", m, again)
		}
	})
}

func normalized(m storage.LogMessage) storage.LogMessage {
	if len(m.Payload) == 0 {
		m.Payload = nil
	}
	if len(m.Props) == 0 {
		m.Props = nil
	}
	return m
}

// TestLogFirstSince: the first record of a time window, per the rules the
// filters overlap; Head+1 when the window is empty.
func TestLogFirstSince(t *testing.T) {
	db := openLogDB(t, t.TempDir(), storage.SyncBatch)
	l := openLog(t, db, storage.LogOptions{Rules: []storage.LogRule{{Filter: "a/#"}, {Filter: "b/#"}}})
	base := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC).UnixNano()
	var seqs []uint64
	for i := range 10 {
		topic := "a/x"
		if i%2 == 1 {
			topic = "b/x"
		}
		seq, err := l.AppendWith(&storage.LogMessage{Topic: topic, Payload: []byte("p"), Time: base + int64(i)*int64(time.Minute)}, nil)
		if err != nil {
			t.Fatal(err)
		}
		seqs = append(seqs, seq)
	}
	at := func(i int) int64 { return base + int64(i)*int64(time.Minute) }
	if got := l.FirstSince(at(4), "a/#"); got != seqs[4] {
		t.Fatalf("a/# since minute 4: %d, want %d", got, seqs[4])
	}
	if got := l.FirstSince(at(4), "b/#"); got != seqs[5] {
		t.Fatalf("b/# since minute 4: %d, want %d", got, seqs[5])
	}
	if got := l.FirstSince(at(4), "#"); got != seqs[4] {
		t.Fatalf("# since minute 4: %d, want %d", got, seqs[4])
	}
	if got := l.FirstSince(at(20), "#"); got != l.Head()+1 {
		t.Fatalf("a window after everything: %d, want %d", got, l.Head()+1)
	}
	if got := l.FirstSince(at(0), "c/#"); got != l.Head()+1 {
		t.Fatalf("no rule for c/#: %d", got)
	}
}

// blockFirsts lists the first seqs of the log's stored blocks.
func blockFirsts(t testing.TB, db *storage.DB) []uint64 {
	t.Helper()
	var out []uint64
	prefix := storage.LogBlockPrefix()
	err := db.Scan(prefix, func(key, _ []byte) error {
		out = append(out, binary.BigEndian.Uint64(key[len(prefix):]))
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// TestLogBlocksConcurrentReopen: appenders of every kind (durable,
// queued, started and waited for later, with extra ops, numbered only)
// share blocks; after a reopen (with and without the log's Shutdown)
// every stored seq reads back exactly once, in order, with its extra ops.
func TestLogBlocksConcurrentReopen(t *testing.T) {
	for _, policy := range []storage.SyncPolicy{storage.SyncBatch, storage.SyncNone} {
		for _, shutdown := range []bool{true, false} {
			t.Run(fmt.Sprintf("%s/shutdown=%v", policy, shutdown), func(t *testing.T) {
				const writers, each = 8, 400
				dir := t.TempDir()
				db, err := storage.Open(storage.Options{Dir: dir, Sync: policy})
				if err != nil {
					t.Fatal(err)
				}
				l, err := storage.OpenLog(db, storage.LogOptions{ReserveBlock: 256, Rules: []storage.LogRule{{Filter: "#"}}})
				if err != nil {
					t.Fatal(err)
				}
				var mu sync.Mutex
				var appended, withExtra []uint64
				var wg sync.WaitGroup
				errs := make(chan error, writers)
				for w := 0; w < writers; w++ {
					wg.Add(1)
					go func() {
						defer wg.Done()
						var mine, extras []uint64
						var waits []func() error
						for i := 0; i < each; i++ {
							m := &storage.LogMessage{Topic: fmt.Sprintf("w/%d", w), Payload: fmt.Appendf(nil, "%d/%d", w, i)}
							var seq uint64
							var err error
							switch i % 5 {
							case 0:
								seq, err = l.Append(m)
							case 1:
								seq, err = l.AppendQueued(m, nil)
							case 2:
								var wait func() error
								seq, wait, err = l.AppendStart(m, nil)
								waits = append(waits, wait)
							case 3:
								seq, err = l.AppendWith(m, func(seq uint64) []storage.Op {
									return []storage.Op{storage.Set(fmt.Appendf(nil, "test/extra/%020d", seq), []byte("x"))}
								})
								extras = append(extras, seq)
							case 4:
								l.Number(m)
								continue
							}
							if err != nil {
								errs <- err
								return
							}
							mine = append(mine, seq)
						}
						for _, wait := range waits {
							if err := wait(); err != nil {
								errs <- err
								return
							}
						}
						mu.Lock()
						appended, withExtra = append(appended, mine...), append(withExtra, extras...)
						mu.Unlock()
					}()
				}
				wg.Wait()
				close(errs)
				for err := range errs {
					t.Fatal(err)
				}
				if shutdown {
					if err := l.Shutdown(context.Background()); err != nil {
						t.Fatal(err)
					}
				}
				if err := db.Shutdown(context.Background()); err != nil {
					t.Fatal(err)
				}
				_ = l.Shutdown(context.Background())

				slices.Sort(appended)
				db = openLogDB(t, dir, policy)
				l = openLog(t, db, storage.LogOptions{Rules: []storage.LogRule{{Filter: "#"}}})
				var read []uint64
				err = l.Read(0, 0, func(m *storage.LogMessage) bool {
					read = append(read, m.Seq)
					return true
				})
				if err != nil {
					t.Fatal(err)
				}
				if !slices.Equal(read, appended) {
					t.Fatalf("read %d records, want the %d appended, once each in order", len(read), len(appended))
				}
				for _, seq := range appended[:50] {
					if _, err := l.Get(seq); err != nil {
						t.Fatalf("get %d: %v", seq, err)
					}
				}
				if n := count(t, db, []byte("test/extra/")); n != len(withExtra) {
					t.Fatalf("%d extra ops stored, want %d", n, len(withExtra))
				}
				for _, seq := range withExtra {
					if _, err := db.Get(fmt.Appendf(nil, "test/extra/%020d", seq)); err != nil {
						t.Fatalf("extra op of %d: %v", seq, err)
					}
				}
				if n := count(t, db, storage.LogKey(0)[:2]); n != 0 {
					t.Fatalf("%d per-record keys written", n)
				}
				t.Logf("%d records in %d blocks", len(appended), len(blockFirsts(t, db)))
			})
		}
	}
}

// TestLogBlocks: a batch shares blocks; a record larger than a block is
// one by itself; Get and Read find records anywhere in a block.
func TestLogBlocks(t *testing.T) {
	db := openLogDB(t, t.TempDir(), storage.SyncBatch)
	l := openLog(t, db, storage.LogOptions{Rules: []storage.LogRule{{Filter: "#"}}})
	var ms []*storage.LogMessage
	for i := 0; i < 200; i++ {
		ms = append(ms, &storage.LogMessage{Topic: "sensors/" + strconv.Itoa(i), Payload: bytes.Repeat([]byte{byte(i)}, 64)})
	}
	if err := l.AppendBatch(ms); err != nil {
		t.Fatal(err)
	}
	// 200 records of ~80 bytes, in blocks of at most 4 KiB.
	if n := len(blockFirsts(t, db)); n < 2 || n > 8 {
		t.Fatalf("200 records in %d blocks", n)
	}
	big := appendMsg(t, l, "big", strings.Repeat("b", 10_000))
	after := appendMsg(t, l, "after", "a")
	if got := blockFirsts(t, db); !slices.Contains(got, big) || !slices.Contains(got, after) {
		t.Fatalf("blocks %v: the big record and the next append are not blocks of their own", got)
	}
	for _, m := range ms {
		got, err := l.Get(m.Seq)
		if err != nil || got.Topic != m.Topic || !bytes.Equal(got.Payload, m.Payload) {
			t.Fatalf("get %d: %v %q", m.Seq, err, got.Topic)
		}
	}
	if m, err := l.Get(big); err != nil || len(m.Payload) != 10_000 {
		t.Fatalf("get big: %v", err)
	}
	for _, after := range []uint64{0, 1, 37, 150, 199, 200} {
		var got []uint64
		err := l.Read(after, 120, func(m *storage.LogMessage) bool { got = append(got, m.Seq); return true })
		if err != nil {
			t.Fatal(err)
		}
		if want := seqs(after+1, 120); !slices.Equal(got, want) {
			t.Fatalf("read (%d, 120]: %v", after, got)
		}
	}
	if _, err := l.Get(l.Head() + 1); !errors.Is(err, storage.ErrLogNotFound) {
		t.Fatalf("get past head: %v", err)
	}
	// An append with more ops than a block's write takes is a block of its own.
	var many []storage.Op
	for i := 0; i < 600; i++ {
		many = append(many, storage.Set(fmt.Appendf(nil, "test/many/%d", i), []byte("q")))
	}
	withMany, err := l.AppendWith(&storage.LogMessage{Topic: "many"}, func(uint64) []storage.Op { return many })
	if err != nil {
		t.Fatal(err)
	}
	if n := count(t, db, []byte("test/many/")); n != 600 {
		t.Fatalf("%d of 600 extra ops stored", n)
	}
	if m, err := l.Get(withMany); err != nil || m.Topic != "many" {
		t.Fatalf("get %d: %v", withMany, err)
	}
	n := l.Number(&storage.LogMessage{Topic: "live"})
	last := appendMsg(t, l, "last", "")
	if _, err := l.Get(n); !errors.Is(err, storage.ErrLogNotFound) {
		t.Fatalf("get of a numbered seq: %v", err)
	}
	if _, err := l.Get(last); err != nil {
		t.Fatal(err)
	}
}

// TestLogPerRecordKeys: a store written before blocks (one key per
// record) opens and reads as before, mixed with the blocks written after
// it, and retention trims both.
func TestLogPerRecordKeys(t *testing.T) {
	dir := t.TempDir()
	db, err := storage.Open(storage.Options{Dir: dir})
	if err != nil {
		t.Fatal(err)
	}
	l, err := storage.OpenLog(db, storage.LogOptions{})
	if err != nil {
		t.Fatal(err)
	}
	storage.SetLegacyLogWrites(l, true)
	var want []uint64
	for i := 0; i < 6; i++ {
		if i == 2 {
			l.Number(&storage.LogMessage{Topic: "live"})
		}
		want = append(want, appendMsg(t, l, "old", strconv.Itoa(i)))
	}
	if err := l.AppendBatch([]*storage.LogMessage{{Topic: "old", Payload: []byte("b1")}, {Topic: "old", Payload: []byte("b2")}}); err != nil {
		t.Fatal(err)
	}
	want = append(want, want[len(want)-1]+1, want[len(want)-1]+2)
	_ = l.Shutdown(context.Background())
	if err := db.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}

	db = openLogDB(t, dir, storage.SyncBatch)
	if n, b := count(t, db, storage.LogKey(0)[:2]), len(blockFirsts(t, db)); n != 8 || b != 0 {
		t.Fatalf("%d per-record keys and %d blocks written by the old layout", n, b)
	}
	l = openLog(t, db, storage.LogOptions{})
	for i := 0; i < 3; i++ {
		want = append(want, appendMsg(t, l, "new", strconv.Itoa(i)))
	}
	if n, b := count(t, db, storage.LogKey(0)[:2]), len(blockFirsts(t, db)); n != 8 || b == 0 {
		t.Fatalf("%d per-record keys and %d blocks after new appends", n, b)
	}
	check := func(l *storage.Log, want []uint64) {
		t.Helper()
		if got := stored(t, l); !slices.Equal(got, want) {
			t.Fatalf("read %v, want %v", got, want)
		}
		for _, after := range want {
			var got []uint64
			if err := l.Read(after-1, 0, func(m *storage.LogMessage) bool { got = append(got, m.Seq); return false }); err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(got, []uint64{after}) {
				t.Fatalf("read after %d: %v", after-1, got)
			}
			m, err := l.Get(after)
			if err != nil {
				t.Fatalf("get %d: %v", after, err)
			}
			if m.Topic != "old" && m.Topic != "new" {
				t.Fatalf("get %d: topic %q", after, m.Topic)
			}
		}
	}
	check(l, want)
	_ = l.Shutdown(context.Background())

	// Reopened with a rule keeping the newest 4: both kinds are trimmed.
	l = openLog(t, db, storage.LogOptions{Rules: []storage.LogRule{{Filter: "#", MaxMessages: 4}}})
	check(l, want)
	l.StartTrimming()
	l.TrimNow()
	barrier(t, db)
	check(l, want[len(want)-4:])
	if n := count(t, db, storage.LogKey(0)[:2]); n != 1 {
		t.Fatalf("%d per-record keys left, want 1", n)
	}
	if _, err := l.Get(want[0]); !errors.Is(err, storage.ErrLogNotFound) {
		t.Fatalf("get of a trimmed per-record key: %v", err)
	}
}

// TestLogDamagedBlocks: a block that does not decode is skipped (and
// deleted once trimming starts); a damaged record inside a block is
// skipped, the others of the block read.
func TestLogDamagedBlocks(t *testing.T) {
	dir := t.TempDir()
	db, err := storage.Open(storage.Options{Dir: dir})
	if err != nil {
		t.Fatal(err)
	}
	l, err := storage.OpenLog(db, storage.LogOptions{Rules: []storage.LogRule{{Filter: "#"}}})
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 3; i++ {
		appendMsg(t, l, "ok", strconv.Itoa(i))
	}
	_ = l.Shutdown(context.Background())
	good := storage.EncodeLogMessage(nil, &storage.LogMessage{Topic: "t", Payload: []byte("p")})
	// Block 10: records 10 (good), 11 (truncated), 12 (good).
	blk := []byte{1}
	for i, rec := range [][]byte{good, good[:len(good)-1], good} {
		blk = binary.AppendUvarint(blk, uint64(min(i, 1)))
		blk = binary.AppendUvarint(blk, uint64(len(rec)))
		blk = append(blk, rec...)
	}
	damage := []storage.Op{
		storage.Set(storage.LogBlockKey(10), blk),
		storage.Set(storage.LogBlockKey(20), []byte{9, 0, 1, 1}),                                          // unknown version
		storage.Set(storage.LogBlockKey(30), append([]byte{1, 0, 200}, good...)),                          // length past the end
		storage.Set(append(storage.LogBlockKey(40), 'x'), append([]byte{1, 0, byte(len(good))}, good...)), // bad key
	}
	if err := db.Write(damage...); err != nil {
		t.Fatal(err)
	}
	if err := db.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}

	db = openLogDB(t, dir, storage.SyncBatch)
	l = openLog(t, db, storage.LogOptions{Rules: []storage.LogRule{{Filter: "#"}}})
	if st := l.Stats(); st.Damaged != 4 || st.Stored != 5 {
		t.Fatalf("stats %+v", st)
	}
	if got := stored(t, l); !slices.Equal(got, []uint64{1, 2, 3, 10, 12}) {
		t.Fatalf("read %v", got)
	}
	if _, err := l.Get(11); !errors.Is(err, storage.ErrCorrupt) {
		t.Fatalf("get of a damaged record in a block: %v", err)
	}
	if seq := appendMsg(t, l, "ok", ""); seq <= 12 {
		t.Fatalf("seq %d reuses a stored one", seq)
	}
	l.StartTrimming()
	checkFor(t, 5*time.Second, 20*time.Millisecond, func() error {
		barrier(t, db)
		if n := count(t, db, storage.LogBlockPrefix()); n != 5 { // 1..3, 10, the new one
			return fmt.Errorf("%d blocks, want 5", n)
		}
		return nil
	})
}

// TestVerifyLogBlocks: verify reads every record of every block, and
// reports a block with a record that does not decode.
func TestVerifyLogBlocks(t *testing.T) {
	dir := t.TempDir()
	db, err := storage.Open(storage.Options{Dir: dir})
	if err != nil {
		t.Fatal(err)
	}
	l, err := storage.OpenLog(db, storage.LogOptions{Rules: []storage.LogRule{{Filter: "#"}}})
	if err != nil {
		t.Fatal(err)
	}
	if err := l.AppendBatch([]*storage.LogMessage{{Topic: "a"}, {Topic: "b", Payload: []byte("p")}}); err != nil {
		t.Fatal(err)
	}
	_ = l.Shutdown(context.Background())
	if err := db.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
	r, err := storage.Verify(dir)
	if err != nil {
		t.Fatal(err)
	}
	if !r.OK() || r.Records["log-blocks"] != 1 {
		t.Fatalf("verify of a good store: %+v", r)
	}

	db = openLogDB(t, dir, storage.SyncBatch)
	good := storage.EncodeLogMessage(nil, &storage.LogMessage{Topic: "t"})
	bad := append([]byte{1, 0, byte(len(good))}, good...)
	bad = append(bad, 1, 2, 0xee, 0xff) // a second record, seq 101, that does not decode
	if err := db.Write(storage.Set(storage.LogBlockKey(100), bad)); err != nil {
		t.Fatal(err)
	}
	if err := db.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
	if r, err = storage.Verify(dir); err != nil {
		t.Fatal(err)
	}
	if r.OK() || r.Records["log-blocks"] != 2 || r.Damaged["log-blocks"] != 1 || !strings.Contains(r.Problems[0], "record 101") {
		t.Fatalf("verify of a damaged block: %+v", r)
	}
}

// TestLogBlockKeepsWriteOrder: an append commits after every write queued
// before it, also when the block it joins was queued before that write (a
// session's DeletePrefix, then a queue entry of its successor).
func TestLogBlockKeepsWriteOrder(t *testing.T) {
	db := openLogDB(t, t.TempDir(), storage.SyncNone)
	l := openLog(t, db, storage.LogOptions{})
	set := func(key string) func(uint64) []storage.Op {
		return func(uint64) []storage.Op { return []storage.Op{storage.Set([]byte(key), []byte("v"))} }
	}
	busy := make([]storage.Op, 4000) // keeps the committer at work while the appends queue
	for i := range busy {
		busy[i] = storage.Set(fmt.Appendf(nil, "busy/%d", i), make([]byte, 200))
	}
	for round := 0; round < 20; round++ {
		prefix := fmt.Sprintf("order/%d/", round)
		db.WriteAsync(busy...)
		if _, err := l.AppendQueued(&storage.LogMessage{Topic: "t"}, set(prefix+"before")); err != nil {
			t.Fatal(err)
		}
		db.WriteAsync(storage.DeletePrefix([]byte(prefix)))
		if _, err := l.AppendQueued(&storage.LogMessage{Topic: "t"}, set(prefix+"after")); err != nil {
			t.Fatal(err)
		}
		barrier(t, db)
		if _, err := db.Get([]byte(prefix + "after")); err != nil {
			t.Fatalf("round %d: the entry appended after the delete: %v", round, err)
		}
		if _, err := db.Get([]byte(prefix + "before")); !errors.Is(err, storage.ErrNotFound) {
			t.Fatalf("round %d: the entry appended before the delete: %v", round, err)
		}
	}
}

func FuzzLogBlock(f *testing.F) {
	good := storage.EncodeLogMessage(nil, &storage.LogMessage{Topic: "t", Payload: []byte("p")})
	blk := []byte{1, 0, byte(len(good))}
	blk = append(blk, good...)
	blk = append(blk, 3, byte(len(good)))
	blk = append(blk, good...)
	f.Add(blk)
	f.Add([]byte{1})
	f.Add([]byte{1, 0, 0xff, 0xff, 0xff, 0xff, 0x0f})
	f.Fuzz(func(t *testing.T, b []byte) {
		_ = storage.CheckLogBlock(storage.LogBlockKey(7), b) // must not panic
	})
}
