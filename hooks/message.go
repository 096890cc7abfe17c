package hooks

// Message is an accepted message as the extensions see it: the broker
// hands each one (a client's publish, a will, an inline publish) to the
// history, webhooks and Home Assistant after the engine accepted it.
type Message struct {
	Seq     uint64 // position in the message log (storage.Log); 0 if not numbered
	Topic   string
	Payload []byte
	QoS     byte
	Retain  bool
	Client  string // publishing MQTT client id; "" for the broker itself
	Device  string // registered device id of the publisher, or ""
	Time    int64  // unix nanoseconds the broker accepted it
	// Origin is the cluster identity of a message another node accepted
	// (engine.Identity), "" for one accepted here.
	Origin string
}
