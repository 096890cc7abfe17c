package bridge

import (
	"encoding/base64"
	"encoding/json"
	"unicode/utf8"
)

// Envelope is how a message travels to browsers and HTTP clients (the REST
// API, the SSE stream, long-poll): the payload embedded as JSON when it is
// JSON, as a string when it is text (isText), else base64.
type Envelope struct {
	ID       string            `json:"id,omitempty"` // event id in the history (streams and polls)
	Topic    string            `json:"topic"`
	Payload  json.RawMessage   `json:"payload"`
	Encoding string            `json:"encoding"` // json, utf8 or base64
	QoS      byte              `json:"qos"`
	Retain   bool              `json:"retain"`
	TS       int64             `json:"ts"`                // unix milliseconds the broker accepted it
	Decoded  map[string]any    `json:"decoded,omitempty"` // fields decoded by the topic's codec, if any
	Units    map[string]string `json:"units,omitempty"`   // the codec's unit of each decoded field that declares one
}

// NewEnvelope encodes a payload in the most readable faithful form.
func NewEnvelope(topic string, payload []byte, qos byte, retain bool, tsMillis int64) Envelope {
	e := Envelope{Topic: topic, QoS: qos, Retain: retain, TS: tsMillis}
	switch {
	case len(payload) > 0 && json.Valid(payload):
		e.Encoding = "json"
		e.Payload = payload
	case isText(payload):
		e.Encoding = "utf8"
		e.Payload, _ = json.Marshal(string(payload))
	default:
		e.Encoding = "base64"
		e.Payload, _ = json.Marshal(base64.StdEncoding.EncodeToString(payload))
	}
	return e
}

// isText reports whether a payload reads as text: valid UTF-8 without
// control characters other than tab, newline and carriage return. Packed
// binary telemetry is often valid UTF-8 by accident; it goes as base64.
func isText(b []byte) bool {
	for _, c := range b {
		if c < 0x20 && c != '\t' && c != '\n' && c != '\r' || c == 0x7f {
			return false
		}
	}
	return utf8.Valid(b)
}
