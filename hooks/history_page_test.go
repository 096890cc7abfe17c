package hooks

import (
	"context"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/beaconmq/beacon/storage"
)

// appendRec appends a message to e's log as the engine would: its own
// (origin "") or forwarded by another node (origin set), QoS qos.
func (e *histEnv) appendRec(t *testing.T, topic, payload, origin string, qos byte) uint64 {
	t.Helper()
	seq, err := e.log.Append(&storage.LogMessage{Topic: topic, Payload: []byte(payload), QoS: qos, Origin: origin})
	if err != nil {
		t.Fatal(err)
	}
	e.log.Release(seq)
	return seq
}

func pagePayloads(p Page) []string {
	var out []string
	for _, r := range p.Records {
		out = append(out, string(r.Payload))
	}
	return out
}

// OwnPage gives this node's own records after a position, by path, in
// pages, and never another node's.
func TestOwnPage(t *testing.T) {
	e := openHistEnv(t, t.TempDir(), HistoryOptions{}, storage.LogRule{Filter: "#", MaxMessages: 1000})
	ctx := context.Background()
	var seqs []uint64
	for i := range 10 {
		seqs = append(seqs, e.appendRec(t, "t/x", fmt.Sprint("own", i), "", byte(i%2)))
		e.appendRec(t, "t/x", fmt.Sprint("fwd", i), storage.Identity("b", 7, uint64(i+1)), 1)
	}
	e.appendRec(t, "other", "not matched", "", 1)
	epoch := EpochTag(e.log.Epoch())

	p, err := e.h.OwnPage(ctx, PageQuery{Filters: []string{"t/#"}})
	if err != nil || p.Reset != "" || p.More || p.Epoch != epoch || p.Upto != e.log.Head() {
		t.Fatalf("from the start: %+v, %v", p, err)
	}
	if got := pagePayloads(p); len(got) != 10 || got[0] != "own0" || got[9] != "own9" {
		t.Fatalf("from the start: %q", got)
	}
	// Seen: QoS 0 up to own4 (seq of own4), the others up to own7.
	q := PageQuery{Filters: []string{"t/#"}, Known: true, Epoch: epoch, After0: seqs[4], After1: seqs[7]}
	p, _ = e.h.OwnPage(ctx, q)
	if got := pagePayloads(p); !slices.Equal(got, []string{"own6", "own8", "own9"}) {
		t.Fatalf("after QoS 0 own4 and QoS 1 own7: %q", got)
	}
	// Pages of 3, continued as bridge does.
	q = PageQuery{Filters: []string{"t/#"}, Limit: 3}
	var all []string
	for range 10 {
		p, _ = e.h.OwnPage(ctx, q)
		all = append(all, pagePayloads(p)...)
		if !p.More {
			break
		}
		q.Known, q.Epoch, q.Upto = true, p.Epoch, p.Upto
		q.After0, q.After1 = max(q.After0, p.Next), max(q.After1, p.Next)
	}
	if len(all) != 10 || all[9] != "own9" {
		t.Fatalf("in pages of 3: %q", all)
	}
	// A later message is past the first page's end.
	e.appendRec(t, "t/x", "late", "", 1)
	p, _ = e.h.OwnPage(ctx, PageQuery{Filters: []string{"t/#"}, Known: true, Epoch: epoch, After0: seqs[9], After1: seqs[9], Upto: p.Upto})
	if len(p.Records) != 0 {
		t.Fatalf("past Upto: %q", pagePayloads(p))
	}
	// Since: nothing accepted before it.
	p, _ = e.h.OwnPage(ctx, PageQuery{Filters: []string{"t/#"}, Since: time.Now().Add(time.Hour).UnixMilli()})
	if len(p.Records) != 0 {
		t.Fatalf("since an hour ahead: %q", pagePayloads(p))
	}
	// Positions that cannot be replayed from.
	if p, _ = e.h.OwnPage(ctx, PageQuery{Filters: []string{"t/#"}, Known: true, Epoch: epoch + 1}); p.Reset != ResetForeignEpoch {
		t.Fatalf("another epoch: %+v", p)
	}
	if p, _ = e.h.OwnPage(ctx, PageQuery{Filters: []string{"t/#"}, Known: true, Epoch: epoch, After1: e.log.Head() + 5}); p.Reset != ResetUnknown {
		t.Fatalf("from the future: %+v", p)
	}
}

// A position retention has passed is a reset, not a silent gap.
func TestOwnPageExpired(t *testing.T) {
	e := openHistEnv(t, t.TempDir(), HistoryOptions{}, storage.LogRule{Filter: "#", MaxMessages: 5})
	first := e.appendRec(t, "t/x", "m0", "", 1)
	for i := 1; i < 50; i++ {
		e.appendRec(t, "t/x", fmt.Sprint("m", i), "", 1)
	}
	waitTrimmed(t, e, first)
	p, err := e.h.OwnPage(context.Background(), PageQuery{Filters: []string{"t/x"}, Known: true, Epoch: EpochTag(e.log.Epoch()), After0: first, After1: first})
	if err != nil || p.Reset != ResetExpired {
		t.Fatalf("after a trimmed position: %+v, %v", p, err)
	}
}

func waitTrimmed(t *testing.T, e *histEnv, seq uint64) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for e.log.OldestFor("t/x") <= seq+1 {
		if time.Now().After(deadline) {
			t.Fatalf("seq %d not trimmed (oldest %d)", seq, e.log.OldestFor("t/x"))
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// A seq skipped (numbered for a moved session's queue, not routed here)
// holds nothing back and goes to no watch.
func TestHistorySkip(t *testing.T) {
	e := openHistEnv(t, t.TempDir(), HistoryOptions{GapWait: time.Hour}, storage.LogRule{Filter: "#"})
	w := e.h.Watch([]string{"#"}, 16)
	defer w.Stop()
	moved := e.appendRec(t, "t", "a moved session's message", "", 1)
	next := e.publish(t, "t", "next")
	e.h.Skip(moved)
	if r := receive(t, w, 1)[0]; r.Seq != next {
		t.Fatalf("got seq %d, want %d", r.Seq, next)
	}
	none(t, w)
	if s := e.h.Stats(); s.Skipped != 0 || s.Held != 0 {
		t.Fatalf("stats %+v", s)
	}
}
