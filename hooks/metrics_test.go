package hooks

import (
	"fmt"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

func TestMetrics(t *testing.T) {
	reg := prometheus.NewPedanticRegistry()
	m, err := NewMetrics(reg)
	if err != nil {
		t.Fatal(err)
	}
	m.Connected("tcp")
	m.Connected("tcp")
	m.Connected("ws")
	m.Disconnected("tcp", DisconnectClient)
	m.Disconnected("ws", DisconnectTakenOver)
	m.Stream("sse", +1)
	m.Stream("sse", +1)
	m.Stream("sse", -1)
	m.Received(1, 5)
	m.Received(1, 7)
	m.Received(0, 3)
	m.Received(3, 100) // not a QoS: not counted
	m.Sent(1, 5, 2*time.Millisecond)
	m.Sent(0, 3, 0)
	m.Sent(2, 4, -1) // not measured: counted, no latency

	got := gatherMetrics(t, reg)
	for name, want := range map[string]float64{
		`beacon_connections{transport="tcp"}`:                          1,
		`beacon_connections{transport="ws"}`:                           0,
		`beacon_connections{transport="sse"}`:                          1,
		`beacon_connects_total{transport="tcp"}`:                       2,
		`beacon_connects_total{transport="ws"}`:                        1,
		`beacon_connects_total{transport="sse"}`:                       2,
		`beacon_disconnects_total{reason="client",transport="tcp"}`:    1,
		`beacon_disconnects_total{reason="taken_over",transport="ws"}`: 1,
		`beacon_messages_received_total{qos="0"}`:                      1,
		`beacon_messages_received_total{qos="1"}`:                      2,
		`beacon_messages_received_total{qos="2"}`:                      0,
		`beacon_payload_bytes_received_total{qos="0"}`:                 3,
		`beacon_payload_bytes_received_total{qos="1"}`:                 12,
		`beacon_payload_bytes_received_total{qos="2"}`:                 0,
		`beacon_messages_sent_total{qos="0"}`:                          1,
		`beacon_messages_sent_total{qos="1"}`:                          1,
		`beacon_messages_sent_total{qos="2"}`:                          1,
		`beacon_payload_bytes_sent_total{qos="0"}`:                     3,
		`beacon_payload_bytes_sent_total{qos="1"}`:                     5,
		`beacon_payload_bytes_sent_total{qos="2"}`:                     4,
		`beacon_publish_to_deliver_seconds_count`:                      2,
		`beacon_publish_to_deliver_seconds_sum`:                        0.002,
	} {
		if v, ok := got[name]; !ok || v != want {
			t.Errorf("%s = %v (present %v), want %v", name, v, ok, want)
		}
		delete(got, name)
	}
	for name, v := range got {
		t.Errorf("unexpected sample %s = %v", name, v)
	}
}

// gatherMetrics flattens what reg exposes into name{labels} -> value, as
// in the text format (labels sorted by name; a histogram as its _count
// and _sum).
func gatherMetrics(t *testing.T, reg prometheus.Gatherer) map[string]float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]float64{}
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			var labels []string
			for _, l := range m.GetLabel() {
				labels = append(labels, fmt.Sprintf("%s=%q", l.GetName(), l.GetValue()))
			}
			sort.Strings(labels)
			name := mf.GetName()
			if len(labels) > 0 {
				name += "{" + strings.Join(labels, ",") + "}"
			}
			switch {
			case m.GetHistogram() != nil:
				out[name+"_count"] = float64(m.GetHistogram().GetSampleCount())
				out[name+"_sum"] = m.GetHistogram().GetSampleSum()
			case m.GetGauge() != nil:
				out[name] = m.GetGauge().GetValue()
			case m.GetCounter() != nil:
				out[name] = m.GetCounter().GetValue()
			}
		}
	}
	return out
}

func TestMetricsRegisterOnce(t *testing.T) {
	reg := prometheus.NewRegistry()
	if _, err := NewMetrics(reg); err != nil {
		t.Fatal(err)
	}
	if _, err := NewMetrics(reg); err == nil {
		t.Error("registering the metrics twice with one registry did not fail")
	}
}
