package bridge

// The MQTT engine as the bridge needs it. Dependencies point down: the
// broker owns the engine and adapts it to these interfaces, so the bridge
// imports neither the engine nor mochi.

// RetainedMessage is a retained message as the REST API and the streams
// list it.
type RetainedMessage struct {
	Topic   string
	Payload []byte // shared with the engine: read only
	QoS     byte
	Device  string // registered device that published it, or ""; picks the codec
	Created int64  // unix nanoseconds the broker accepted it
}

// Retainer lists retained messages.
type Retainer interface {
	// Retained calls fn for each unexpired retained message whose topic
	// matches filter, a valid topic filter, until fn returns false. fn is
	// not called with the engine's locks held.
	Retained(filter string, fn func(m RetainedMessage) bool)
}

// Publisher is the engine as the REST API needs it.
type Publisher interface {
	Retainer
	// Publish routes a message from the broker itself: it bypasses the
	// authorizer, so the caller has checked it. It returns once the
	// message is durable and routed, as for an MQTT publisher's QoS 1/2.
	Publish(topic string, payload []byte, retain bool, qos byte) error
}
