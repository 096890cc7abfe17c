package bridge

import (
	"errors"
	"net/http"
	"strconv"
	"time"

	"github.com/beaconmq/beacon/devices"
	"github.com/beaconmq/beacon/hooks"
)

// Limits of GET /api/v1/history.
const (
	historyDefaultLimit = 1000
	historyMaxLimit     = 10000
)

// history serves GET /api/v1/history?topic=F[&topic=F...]&since=24h&limit=N:
// the recorded messages under the filters since a time (a duration back
// from now, or RFC 3339), oldest first, at most the newest limit; each one
// checked as a read like a stream's. Charts start from it with the past
// the history holds, then follow the stream.
func (s *Streams) history(w http.ResponseWriter, r *http.Request) {
	c, ok := s.Caller(w, r, false)
	if !ok {
		return
	}
	filters, ok := s.filters(w, r, c)
	if !ok {
		return
	}
	q := r.URL.Query()
	since := time.Now().Add(-24 * time.Hour)
	if v := q.Get("since"); v != "" {
		if d, err := time.ParseDuration(v); err == nil && d > 0 {
			since = time.Now().Add(-d)
		} else if t, err := time.Parse(time.RFC3339, v); err == nil {
			since = t
		} else {
			WriteJSON(w, http.StatusBadRequest, apiError{Error: "since must be a duration (e.g. 1h) or an RFC 3339 time", Field: "since"})
			return
		}
	}
	limit := historyDefaultLimit
	if v := q.Get("limit"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 || n > historyMaxLimit {
			WriteJSON(w, http.StatusBadRequest, apiError{Error: "limit must be 1 to " + strconv.Itoa(historyMaxLimit), Field: "limit"})
			return
		}
		limit = n
	}
	match := matcher(filters)
	recs, err := s.History.Since(r.Context(), since, limit, filters, func(topic string) bool {
		return match(topic) && c.Allowed(s.Authorizer, devices.Read, topic)
	})
	var re *hooks.ErrReset
	switch {
	case errors.As(err, &re):
		// Trimmed while being read: the caller asks again.
		WriteJSON(w, http.StatusServiceUnavailable, apiError{Error: "the history changed while it was read; try again"})
		return
	case err != nil:
		s.Log.Error("history", "error", err)
		fail(w, http.StatusServiceUnavailable, "history unavailable")
		return
	}
	out := make([]Envelope, 0, len(recs))
	for _, rec := range recs {
		out = append(out, s.recordEnvelope(rec))
	}
	s.cors(w, r)
	WriteJSON(w, http.StatusOK, map[string]any{"messages": out, "last_event_id": s.headID()})
}

// headID is the event id of a reader that has seen everything up to now.
func (s *Streams) headID() string {
	head := s.History.Stats().Seq
	if s.Cluster == nil {
		return s.History.EventID(head)
	}
	c := cursor{since: time.Now().UnixMilli(), pos: map[string]nodePos{}}
	c.through(s.Cluster.ID(), hooks.EpochTag(s.History.Epoch()), head)
	return c.String()
}
