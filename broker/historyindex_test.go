package broker_test

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"

	"github.com/beaconmq/beacon/broker"
	bt "github.com/beaconmq/beacon/broker/brokertest"
)

// Many distinct long topics: the history index stays under
// history.max_index_bytes, the oldest records leave retention first, and
// the index's size is a metric.
func TestHistoryIndexBounded(t *testing.T) {
	const bound = 64 << 10 // 4,096 records
	b, addr := startBroker(t, func(c *broker.Config) {
		c.History.Rules = []broker.HistoryRuleConfig{{Filter: "#", MaxMessages: 1_000_000, MaxAge: time.Hour}}
		c.History.MaxIndexBytes = bound
	})
	pub := bt.Dial(t, addr, &paho.Connect{ClientID: "many-topics", CleanStart: true})
	pad := strings.Repeat("x", 1000)
	const n = 6000
	for i := range n {
		pub.PublishT(t, &paho.Publish{Topic: fmt.Sprintf("long/%d/%s", i, pad), QoS: 0, Payload: []byte("v")})
	}
	pub.Barrier(t) // one more, QoS 1: everything before it is recorded
	bt.WaitFor(t, 10*time.Second, "the oldest records to leave retention", func() bool {
		return b.Stats().History.Stored <= bound/16
	})
	st := b.Stats()
	if st.Log.IndexEntryBytes > bound || st.History.IndexEvicted < n-bound/16 {
		t.Fatalf("index entries %d bytes (bound %d), %d evicted", st.Log.IndexEntryBytes, bound, st.History.IndexEvicted)
	}
	_, body := scrape(t, "http://"+b.HTTPAddr()+"/metrics", "")
	// The retention entries (bounded), in 8 KiB chunks, and ~40 bytes per
	// topic in the index of each topic's newest record (which keeps up to
	// 65,536 topics, no strings).
	if v, max := metric(t, body, "beacon_history_index_bytes"), float64(2*bound+n*40); v <= 0 || v > max {
		t.Fatalf("beacon_history_index_bytes = %v, want within (0, %v]", v, max)
	}
	if v := metric(t, body, "beacon_history_index_evicted_total"); v < n-bound/16 {
		t.Fatalf("beacon_history_index_evicted_total = %v", v)
	}
}
