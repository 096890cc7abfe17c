package broker

import "github.com/beaconmq/beacon/broker/engine"

var _ engine.SubscriptionObserver = (*observer)(nil)

// protocolName is how MQTT versions are usually written.
func protocolName(v byte) string {
	switch v {
	case 3:
		return "3.1"
	case 4:
		return "3.1.1"
	case 5:
		return "5"
	}
	return "unknown"
}

// codes turns reason codes into numbers for the log (a []byte would print
// as a string).
func codes(c []byte) []int {
	out := make([]int, len(c))
	for i, b := range c {
		out[i] = int(b)
	}
	return out
}

// logConnected is the log.connections line of an admitted connection: who,
// from where, how; never the password.
func (o *observer) logConnected(ci *engine.ClientInfo) {
	if !o.cfg.Log.Connections {
		return
	}
	o.log.Info("client connected", "client", ci.ID, "remote", ci.Remote, "listener", ci.Listener,
		"protocol", protocolName(ci.ProtocolVersion), "clean_start", ci.CleanStart,
		"keep_alive", int(ci.KeepAlive.Seconds()), "username", ci.Username, "session_present", ci.SessionPresent)
}

func (o *observer) logDisconnected(ci *engine.ClientInfo, err error) {
	if !o.cfg.Log.Connections {
		return
	}
	reason := engine.DisconnectReason(err)
	attrs := []any{"client", ci.ID, "remote", ci.Remote}
	if reason == "client" {
		attrs = append(attrs, "reason", "client disconnected")
	} else {
		attrs = append(attrs, "reason", reason, "error", err.Error())
	}
	o.log.Info("client disconnected", attrs...)
}

// Subscribed implements engine.SubscriptionObserver: the log.connections
// line of a SUBSCRIBE, with the filters and what each was granted.
func (o *observer) Subscribed(ci *engine.ClientInfo, filters []string, granted []byte) {
	if o.cfg.Log.Connections {
		o.log.Info("subscribed", "client", ci.ID, "filters", filters, "granted", codes(granted))
	}
}

// Unsubscribed implements engine.SubscriptionObserver.
func (o *observer) Unsubscribed(ci *engine.ClientInfo, filters []string, reasons []byte) {
	if !o.cfg.Log.Connections {
		return
	}
	attrs := []any{"client", ci.ID, "filters", filters}
	if ci.ProtocolVersion == 5 {
		attrs = append(attrs, "reasons", codes(reasons))
	}
	o.log.Info("unsubscribed", attrs...)
}
