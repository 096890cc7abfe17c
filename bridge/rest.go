package bridge

import (
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"sort"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/beaconmq/beacon/broker/topics"
	"github.com/beaconmq/beacon/devices"
)

// REST is the HTTP publish and read API: POST /api/v1/publish and
// GET /api/v1/retained. Callers are the same principals as over MQTT
// (a JWT as Bearer or cookie, a device by HTTP Basic with its id and
// secret), checked by the same authorizer.
type REST struct {
	*Access
	Engine  Publisher
	Policy  devices.PublishPolicy
	MaxBody int64 // the MQTT max packet size
	Log     *slog.Logger
}

// Register adds the routes to mux.
func (h *REST) Register(mux *http.ServeMux) {
	mux.HandleFunc("POST /api/v1/publish", h.publish)
	mux.HandleFunc("GET /api/v1/retained", h.retained)
	// Other methods: 405 here, before the admin API's authentication
	// (which owns the rest of /api/v1/) could answer something else.
	mux.Handle("/api/v1/publish", methodNotAllowed("POST"))
	mux.Handle("/api/v1/retained", methodNotAllowed("GET, HEAD"))
}

// methodNotAllowed answers 405 with the allowed methods.
func methodNotAllowed(allow string) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Allow", allow)
		fail(w, http.StatusMethodNotAllowed, fmt.Sprintf("method %s not allowed: use %s", r.Method, allow))
	})
}

// isJSON reports whether a Content-Type is application/json (any
// parameters).
func isJSON(ct string) bool {
	mt, _, _ := strings.Cut(ct, ";")
	return strings.EqualFold(strings.TrimSpace(mt), "application/json")
}

// publishRequest is the JSON form of a publish.
type publishRequest struct {
	Topic         string  `json:"topic"`
	Payload       *string `json:"payload,omitempty"`        // text
	PayloadBase64 *string `json:"payload_base64,omitempty"` // binary
	QoS           byte    `json:"qos"`
	Retain        bool    `json:"retain"`
}

// checkTopic validates a topic name for publishing.
func checkTopic(t string) error {
	switch {
	case t == "":
		return errors.New("topic is empty")
	case len(t) > 65535:
		return errors.New("topic longer than 65535 bytes")
	case !utf8.ValidString(t) || strings.ContainsRune(t, 0):
		return errors.New("topic is not valid UTF-8")
	case strings.ContainsAny(t, "+#"):
		return errors.New("a topic name cannot contain the wildcards + or #")
	case strings.HasPrefix(t, "$"):
		return errors.New("topics starting with $ are the broker's")
	}
	return nil
}

func (h *REST) publish(w http.ResponseWriter, r *http.Request) {
	c, ok := h.Caller(w, r, false)
	if !ok {
		return
	}
	var req publishRequest
	ct := r.Header.Get("Content-Type")
	if !isJSON(ct) && !r.URL.Query().Has("topic") {
		fail(w, http.StatusUnsupportedMediaType, fmt.Sprintf("Content-Type %q: send Content-Type: application/json with a JSON body, "+
			"or the raw payload with the topic in the query (?topic=...)", ct))
		return
	}
	if isJSON(ct) {
		if !decodeLimit(w, r, &req, h.MaxBody) {
			return
		}
		switch {
		case req.Payload != nil && req.PayloadBase64 != nil:
			WriteJSON(w, http.StatusBadRequest, apiError{Error: "set payload or payload_base64, not both", Field: "payload"})
			return
		case req.PayloadBase64 != nil:
			if _, err := base64.StdEncoding.DecodeString(*req.PayloadBase64); err != nil {
				WriteJSON(w, http.StatusBadRequest, apiError{Error: "payload_base64 is not base64: " + err.Error(), Field: "payload_base64"})
				return
			}
		}
	} else {
		// A raw body: the payload as it is, the rest in the query.
		q := r.URL.Query()
		req.Topic = q.Get("topic")
		if v := q.Get("qos"); v != "" {
			n, err := strconv.Atoi(v)
			if err != nil || n < 0 || n > 2 {
				WriteJSON(w, http.StatusBadRequest, apiError{Error: "qos must be 0, 1 or 2", Field: "qos"})
				return
			}
			req.QoS = byte(n)
		}
		if v := q.Get("retain"); v != "" {
			b, err := strconv.ParseBool(v)
			if err != nil {
				WriteJSON(w, http.StatusBadRequest, apiError{Error: "retain must be true or false", Field: "retain"})
				return
			}
			req.Retain = b
		}
		body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, h.MaxBody))
		if err != nil {
			fail(w, http.StatusRequestEntityTooLarge, fmt.Sprintf("payload larger than %d bytes (mqtt.max_packet_size)", h.MaxBody))
			return
		}
		s := string(body)
		req.Payload = &s
	}
	if err := checkTopic(req.Topic); err != nil {
		WriteJSON(w, http.StatusBadRequest, apiError{Error: err.Error(), Field: "topic"})
		return
	}
	if err := h.Topics.Check(req.Topic); err != nil {
		WriteJSON(w, http.StatusBadRequest, apiError{Error: err.Error(), Field: "topic"})
		return
	}
	if req.QoS > 2 {
		WriteJSON(w, http.StatusBadRequest, apiError{Error: "qos must be 0, 1 or 2", Field: "qos"})
		return
	}
	var payload []byte
	switch {
	case req.PayloadBase64 != nil:
		payload, _ = base64.StdEncoding.DecodeString(*req.PayloadBase64)
	case req.Payload != nil:
		payload = []byte(*req.Payload)
	}
	if !c.Allowed(h.Authorizer, devices.Publish, req.Topic) {
		WriteJSON(w, http.StatusForbidden, apiError{Error: "not authorized to publish to this topic", Field: "topic"})
		return
	}
	if !c.Open && h.Policy != nil {
		if err := h.Policy.CheckPublish(&c.P, req.Topic, payload); err != nil {
			WriteJSON(w, http.StatusRequestEntityTooLarge, apiError{Error: err.Error(), Field: "payload"})
			return
		}
	}
	// Engine.Publish bypasses the authorizer: the checks above are the
	// ACL. It returns once the message is durable and routed, as for MQTT
	// publishers.
	if err := h.Engine.Publish(req.Topic, payload, req.Retain, req.QoS); err != nil {
		h.Log.Error("REST publish", "topic", req.Topic, "error", err)
		fail(w, http.StatusInternalServerError, "publish failed")
		return
	}
	WriteJSON(w, http.StatusOK, map[string]any{"topic": req.Topic, "qos": req.QoS, "retain": req.Retain, "bytes": len(payload)})
}

func (h *REST) retained(w http.ResponseWriter, r *http.Request) {
	c, ok := h.Caller(w, r, false)
	if !ok {
		return
	}
	filter := r.URL.Query().Get("topic")
	// ParseShared refuses what a SUBSCRIBE would ("$share/g", "a/#/b");
	// a valid shared filter is listed as the literal filter it also is.
	if _, _, _, ok := topics.ParseShared(filter); !ok {
		WriteJSON(w, http.StatusBadRequest, apiError{Error: "topic must be a topic filter, e.g. home/#", Field: "topic"})
		return
	}
	if err := h.Topics.Check(filter); err != nil {
		WriteJSON(w, http.StatusBadRequest, apiError{Error: err.Error(), Field: "topic"})
		return
	}
	out := []Envelope{}
	h.Engine.Retained(filter, func(m RetainedMessage) bool {
		if c.Allowed(h.Authorizer, devices.Read, m.Topic) { // never list what the caller could not receive
			out = append(out, NewEnvelope(m.Topic, m.Payload, m.QoS, true, m.Created/int64(time.Millisecond)))
		}
		return true
	})
	sort.Slice(out, func(i, j int) bool { return out[i].Topic < out[j].Topic })
	WriteJSON(w, http.StatusOK, map[string]any{"messages": out})
}
