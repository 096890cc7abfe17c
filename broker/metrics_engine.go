package broker

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/beaconmq/beacon/broker/engine"
)

const engineDroppedHelp = "Messages not delivered, by reason: queue_full (connection buffer, QoS 0), queue_limit (mqtt.max_queued_messages), expired, denied (ACL at delivery), policy, too_large (the client's maximum packet size), topic_limit (mqtt.max_topic_length or max_topic_levels), no_space (refused while the disk is below storage.min_free)."

// engineMetric is one metric read from the engine's Stats.
type engineMetric struct {
	desc  *prometheus.Desc
	kind  prometheus.ValueType
	value func(engine.Stats) float64
}

var engineMetrics = func() []engineMetric {
	gauge := func(name, help string, f func(engine.Stats) float64) engineMetric {
		return engineMetric{prometheus.NewDesc(name, help, nil, nil), prometheus.GaugeValue, f}
	}
	counter := func(name, help string, labels prometheus.Labels, f func(engine.Stats) float64) engineMetric {
		return engineMetric{prometheus.NewDesc(name, help, nil, labels), prometheus.CounterValue, f}
	}
	ms := []engineMetric{
		gauge("beacon_retained_messages", "Retained messages.", func(s engine.Stats) float64 { return float64(s.Retained) }),
		gauge("beacon_inflight_messages", "QoS 1/2 messages held for sessions, unacknowledged or queued.",
			func(s engine.Stats) float64 { return float64(s.Inflight) }),
		gauge("beacon_sessions", "Sessions, connected or not.", func(s engine.Stats) float64 { return float64(s.Sessions) }),
		gauge("beacon_subscriptions", "Subscriptions.", func(s engine.Stats) float64 { return float64(s.Subscriptions) }),
		counter("beacon_slow_consumers_total", "Connections closed because a write to them did not finish within the write timeout.", nil,
			func(s engine.Stats) float64 { return float64(s.SlowConsumers) }),
		counter("beacon_publisher_stalls_total", "QoS 0 deliveries for which a publisher was held back because the subscriber's outbound budget was full.", nil,
			func(s engine.Stats) float64 { return float64(s.Stalls) }),
		counter("beacon_publisher_stall_timeouts_total", "Publisher stalls that ran out before the subscriber's socket drained (the message was dropped as queue_full).", nil,
			func(s engine.Stats) float64 { return float64(s.StallTimeouts) }),
		gauge("beacon_idle_connections", "Connections idle for a second or more (100 ms before their first message either way), waiting without a reader goroutine.",
			func(s engine.Stats) float64 { return float64(s.Idle) }),
	}
	for _, r := range []engine.DropReason{engine.DropQueueFull, engine.DropQueueLimit, engine.DropExpired, engine.DropTooLarge, engine.DropTopicLimit, engine.DropNoSpace} {
		ms = append(ms, counter("beacon_messages_dropped_total", engineDroppedHelp, prometheus.Labels{"reason": string(r)},
			func(s engine.Stats) float64 { return float64(s.Dropped[r]) }))
	}
	ms = append(ms, counter("beacon_connections_refused_total", "MQTT connections refused by a limit, by reason: max_clients (mqtt.max_clients; failed-authentication limits are beacon_auth_throttled_total).",
		prometheus.Labels{"reason": "max_clients"}, func(s engine.Stats) float64 { return float64(s.RefusedMaxClients) }))
	return ms
}()

// engineCollector reads the engine's Stats once per scrape for all the
// metrics above: Stats visits every session, and with one call per metric
// a broker holding many sessions did that a dozen times a second (the
// console samples the metrics every second).
type engineCollector struct{ e *engine.Server }

func (engineCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, m := range engineMetrics {
		ch <- m.desc
	}
}

func (c engineCollector) Collect(ch chan<- prometheus.Metric) {
	st := c.e.Stats()
	for _, m := range engineMetrics {
		ch <- prometheus.MustNewConstMetric(m.desc, m.kind, m.value(st))
	}
}
