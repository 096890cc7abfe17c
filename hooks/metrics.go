package hooks

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Metrics counts connections, messages and bytes for Prometheus, and
// measures the publish-to-deliver latency of every message (from the
// moment the broker read it to the moment it wrote it to a subscriber).
//
// It knows no engine: the broker calls its methods from the engine's
// observer. They are safe for concurrent use and never block.
type Metrics struct {
	conns       *prometheus.GaugeVec
	connects    *prometheus.CounterVec
	disconnects *prometheus.CounterVec
	msgsIn      *prometheus.CounterVec
	bytesIn     *prometheus.CounterVec
	msgsOut     *prometheus.CounterVec
	bytesOut    *prometheus.CounterVec
	latency     prometheus.Histogram
	in, out     [3]prometheus.Counter // by QoS, resolved once
	bin, bout   [3]prometheus.Counter
}

// The reasons Disconnected counts a connection's end under.
const (
	DisconnectClient        = "client"         // a DISCONNECT from the client
	DisconnectNetwork       = "network"        // the connection broke or was closed without one
	DisconnectKeepAlive     = "keepalive"      // nothing read within the keep-alive
	DisconnectProtocolError = "protocol_error" // a malformed or forbidden packet
	DisconnectTakenOver     = "taken_over"     // another connection took the client id
	DisconnectServer        = "server"         // the broker closed it (shutdown, admin, slow consumer)
)

// NewMetrics registers the collectors with reg.
func NewMetrics(reg prometheus.Registerer) (*Metrics, error) {
	m := &Metrics{
		conns: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "beacon_connections",
			Help: "Open MQTT connections by transport (tcp, tls, ws)."}, []string{"transport"}),
		connects: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "beacon_connects_total",
			Help: "Accepted MQTT connections by transport."}, []string{"transport"}),
		disconnects: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "beacon_disconnects_total",
			Help: "Ended MQTT connections by transport and reason (client, network, keepalive, protocol_error, taken_over, server)."},
			[]string{"transport", "reason"}),
		msgsIn: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "beacon_messages_received_total",
			Help: "PUBLISH packets received from clients, by QoS."}, []string{"qos"}),
		bytesIn: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "beacon_payload_bytes_received_total",
			Help: "Payload bytes received from clients, by QoS."}, []string{"qos"}),
		msgsOut: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "beacon_messages_sent_total",
			Help: "PUBLISH packets written to clients, by QoS."}, []string{"qos"}),
		bytesOut: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "beacon_payload_bytes_sent_total",
			Help: "Payload bytes written to clients, by QoS."}, []string{"qos"}),
		latency: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "beacon_publish_to_deliver_seconds",
			Help:    "Time from reading a PUBLISH to writing it to a subscriber (live deliveries; retained and resent copies excluded).",
			Buckets: []float64{.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10}}),
	}
	for _, c := range []prometheus.Collector{m.conns, m.connects, m.disconnects, m.msgsIn, m.bytesIn, m.msgsOut, m.bytesOut, m.latency} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	for q := range 3 {
		l := string(rune('0' + q))
		m.in[q], m.bin[q] = m.msgsIn.WithLabelValues(l), m.bytesIn.WithLabelValues(l)
		m.out[q], m.bout[q] = m.msgsOut.WithLabelValues(l), m.bytesOut.WithLabelValues(l)
	}
	return m, nil
}

// Connected counts an admitted MQTT connection on a transport (tcp, tls,
// ws: the listener's name).
func (h *Metrics) Connected(transport string) {
	h.conns.WithLabelValues(transport).Inc()
	h.connects.WithLabelValues(transport).Inc()
}

// Disconnected counts the end of a connection that Connected counted, and
// why: one of the Disconnect* reasons.
func (h *Metrics) Disconnected(transport, reason string) {
	h.conns.WithLabelValues(transport).Dec()
	h.disconnects.WithLabelValues(transport, reason).Inc()
}

// Received counts a PUBLISH read from a client (not the broker's own
// publishes).
func (h *Metrics) Received(qos byte, payloadBytes int) {
	if qos < 3 {
		h.in[qos].Inc()
		h.bin[qos].Add(float64(payloadBytes))
	}
}

// Sent counts a PUBLISH written to a client and observes how long after
// the broker read it that was. latency < 0: not measured (a retained
// message, a resend, a message of the broker itself): its age is not
// delivery latency.
func (h *Metrics) Sent(qos byte, payloadBytes int, latency time.Duration) {
	if qos < 3 {
		h.out[qos].Inc()
		h.bout[qos].Add(float64(payloadBytes))
	}
	if latency >= 0 {
		h.latency.Observe(latency.Seconds())
	}
}

// Stream counts an HTTP stream (transport sse or poll) opening (+1) or
// closing (-1) in the connection metrics.
func (h *Metrics) Stream(transport string, delta int) {
	h.conns.WithLabelValues(transport).Add(float64(delta))
	if delta > 0 {
		h.connects.WithLabelValues(transport).Inc()
	}
}
