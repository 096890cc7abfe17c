package hooks

import (
	"errors"
	"io"
	"net"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/prometheus/client_golang/prometheus"
)

// Metrics counts connections, messages and bytes for Prometheus, and
// measures the publish-to-deliver latency of every message (from the
// moment the broker read it to the moment it wrote it to a subscriber).
type Metrics struct {
	mqtt.HookBase
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

// NewMetrics registers the hook's collectors with reg.
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

var _ mqtt.Hook = (*Metrics)(nil)

// ID implements mqtt.Hook.
func (h *Metrics) ID() string { return "beacon-metrics" }

var metricsEvents = eventSet(mqtt.OnSessionEstablished, mqtt.OnDisconnect, mqtt.OnPublish, mqtt.OnPacketSent)

// Provides implements mqtt.Hook.
func (h *Metrics) Provides(b byte) bool { return metricsEvents[b] }

// OnSessionEstablished counts a connection.
func (h *Metrics) OnSessionEstablished(cl *mqtt.Client, _ packets.Packet) {
	h.conns.WithLabelValues(cl.Net.Listener).Inc()
	h.connects.WithLabelValues(cl.Net.Listener).Inc()
}

// OnDisconnect counts a connection's end and why.
func (h *Metrics) OnDisconnect(cl *mqtt.Client, err error, _ bool) {
	h.conns.WithLabelValues(cl.Net.Listener).Dec()
	h.disconnects.WithLabelValues(cl.Net.Listener, disconnectCause(cl, err)).Inc()
}

func disconnectCause(cl *mqtt.Client, err error) string {
	var code packets.Code
	var ne net.Error
	switch {
	case takenOver(cl):
		return "taken_over"
	case err == nil:
		return "client"
	case errors.As(err, &code) && code == packets.ErrServerShuttingDown:
		return "server"
	case errors.As(err, &code) && code.Code >= 0x80:
		return "protocol_error"
	case errors.As(err, &ne) && ne.Timeout():
		return "keepalive"
	case errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed):
		return "network"
	}
	if stop, ok := cl.StopCause().(packets.Code); ok && stop == packets.ErrServerShuttingDown {
		return "server"
	}
	return "network"
}

// OnPublish counts a received message and stamps it with the time it
// arrived (see tag.go). It runs for every publish the broker accepts
// from a client, before authorization decides.
func (h *Metrics) OnPublish(cl *mqtt.Client, pk packets.Packet) (packets.Packet, error) {
	if cl.Net.Inline {
		return pk, nil
	}
	q := pk.FixedHeader.Qos & 3
	if q < 3 {
		h.in[q].Inc()
		h.bin[q].Add(float64(len(pk.Payload)))
	}
	if _, tagged := readTag(&pk); !tagged {
		setTag(&pk, msgTag{recv: time.Now().UnixNano()})
	}
	return pk, nil
}

// OnPacketSent counts a written message and observes its latency.
func (h *Metrics) OnPacketSent(_ *mqtt.Client, pk packets.Packet, _ []byte) {
	if pk.FixedHeader.Type != packets.Publish {
		return
	}
	q := pk.FixedHeader.Qos & 3
	if q < 3 {
		h.out[q].Inc()
		h.bout[q].Add(float64(len(pk.Payload)))
	}
	if pk.FixedHeader.Retain || pk.FixedHeader.Dup {
		return // a retained message or a resend: its age is not delivery latency
	}
	if t, ok := readTag(&pk); ok && t.recv > 0 {
		h.latency.Observe(time.Since(time.Unix(0, t.recv)).Seconds())
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
