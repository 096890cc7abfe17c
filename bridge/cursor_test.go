package bridge

import (
	"strings"
	"testing"

	"github.com/beaconmq/beacon/hooks"
	"github.com/beaconmq/beacon/storage"
)

func TestCursorRoundTrip(t *testing.T) {
	c := cursor{since: 1764612345678, pos: map[string]nodePos{
		"a":          {epoch: 0xdeadbeef, s0: 5, s1: 9},
		"node-2.lan": {epoch: 1, s0: 100, s1: 100},
	}}
	id := c.String()
	if want := "c1~mingmo26~a:deadbeef:9:5~node-2.lan:1:2s"; id != want {
		t.Fatalf("String: %q, want %q", id, want)
	}
	got, err := parseCursor(id)
	if err != nil || got.since != c.since || len(got.pos) != 2 || got.pos["a"] != c.pos["a"] || got.pos["node-2.lan"] != c.pos["node-2.lan"] {
		t.Fatalf("parse %q: %+v, %v", id, got, err)
	}
	for _, bad := range []string{"", "c1~", "c1~zz~", "c1~1~a", "c1~1~a:1", "c1~1~:1:1", "c1~1~a:x:1", "c1~1~a:1:1:1:1",
		"c1~1~a:1:1~a:1:2", "c1~-1", "c1~1~a:100000000:1", "0123456789abcdef-1", "c1~1~" + strings.Repeat("a", 5000) + ":1:1"} {
		if _, err := parseCursor(bad); err == nil {
			t.Errorf("%q parses", bad)
		}
	}
}

// A feed moves its cursor per node and path, and drops what its replay
// had.
func TestClusterFeedLive(t *testing.T) {
	f := &clusterFeed{self: "b", epoch: 2, keeps: func(string) bool { return true }, cur: cursor{since: 1, pos: map[string]nodePos{}}, done: map[string]nodePos{"a": {epoch: 7, s1: 10}}}
	rec := func(origin string, seq uint64, qos byte) *hooks.Record {
		return &hooks.Record{Seq: seq, Origin: origin, QoS: qos}
	}
	if _, ok := f.live(rec(storage.Identity("a", 7, 10), 50, 1)); ok {
		t.Fatal("a message the replay had went live")
	}
	id, ok := f.live(rec(storage.Identity("a", 7, 11), 51, 0))
	if !ok || id != "c1~1~a:7:0:b" {
		t.Fatalf("after a QoS 0 message of a: %q %v", id, ok)
	}
	id, _ = f.live(rec(storage.Identity("a", 7, 12), 52, 1))
	if id != "c1~1~a:7:c:b" {
		t.Fatalf("after a QoS 1 message of a: %q", id)
	}
	id, _ = f.live(rec("", 53, 0))
	if id != "c1~1~a:7:c:b~b:2:1h" {
		t.Fatalf("after an own message: %q", id)
	}
	// A new epoch of a starts over.
	id, _ = f.live(rec(storage.Identity("a", 8, 1), 54, 1))
	if id != "c1~1~a:8:1:0~b:2:1h" {
		t.Fatalf("after a's new epoch: %q", id)
	}
}
