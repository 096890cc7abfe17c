package bridge

import (
	"context"
	"errors"
	"log/slog"
	"testing"
	"time"

	"github.com/beaconmq/beacon/hooks"
	"github.com/beaconmq/beacon/storage"
)

// scriptedPeer is the other node of a cluster as replay sees it, failing
// on its second page: a failure at that exact point is what this test is
// about, and real nodes cannot be made to fail there on cue (the cluster
// tests in broker run real ones).
type scriptedPeer struct {
	calls int
}

func (c *scriptedPeer) ID() string                  { return "a" }
func (c *scriptedPeer) Nodes() []string             { return []string{"o"} }
func (c *scriptedPeer) NodeUp(string) bool          { return true }
func (c *scriptedPeer) Up() bool                    { return true }
func (c *scriptedPeer) AwaitInterest(time.Duration) {}
func (c *scriptedPeer) Page(ctx context.Context, node string, q hooks.PageQuery) (hooks.Page, error) {
	c.calls++
	if c.calls == 1 {
		// first page of node o (epoch tag 7): two records, more to come
		return hooks.Page{Epoch: 7, Upto: 100, More: true, Next: 11, Records: []*hooks.Record{
			{Seq: 10, Topic: "t", TS: 1, Origin: storage.Identity("o", 7, 10)},
			{Seq: 11, Topic: "t", TS: 2, Origin: storage.Identity("o", 7, 11)},
		}}, nil
	}
	return hooks.Page{}, errors.New("node o did not answer")
}

// A node that fails on its second page: what its first page replayed is
// not sent again live, and the node is reported.
func TestReplayNodeFailingMidwayIsNotSentTwice(t *testing.T) {
	db, err := storage.Open(storage.Options{Dir: t.TempDir(), Sync: storage.SyncNone})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Shutdown(context.Background())
	l, err := storage.OpenLog(db, storage.LogOptions{Rules: []storage.LogRule{{Filter: "#"}}, ReserveBlock: 100})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Shutdown(context.Background())
	h, err := hooks.NewHistory(hooks.HistoryOptions{Log: l})
	if err != nil {
		t.Fatal(err)
	}
	defer h.Shutdown(context.Background())
	s := &Streams{History: h, Cluster: &scriptedPeer{}, Log: slog.Default()}
	f := &clusterFeed{self: "a", epoch: hooks.EpochTag(h.Epoch()), keeps: h.Keeps, done: map[string]nodePos{},
		cur: cursor{since: 0, pos: map[string]nodePos{}}}
	var got []uint64
	resets, err := s.replay(context.Background(), f, []string{"#"}, 0, func(rec *hooks.Record, id string) bool {
		got = append(got, rec.Seq)
		return true
	})
	if err != nil || len(got) != 2 || len(resets) != 1 || resets[0] != (nodeReset{Node: "o", Reason: ResetNodeUnavailable}) {
		t.Fatalf("replayed %v, resets %v, %v", got, resets, err)
	}
	live := &hooks.Record{Seq: 11, Topic: "t", Origin: storage.Identity("o", 7, 11)}
	if _, ok := f.live(live); ok {
		t.Fatalf("seq 11 of o was replayed and is delivered again live (done[o] = %+v)", f.done["o"])
	}
}
