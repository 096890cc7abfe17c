package hooks

import (
	"context"
	"errors"
	"time"
)

// Since calls fn, in seq order, for every recorded message matching
// filters (match decides) accepted at or after since, keeping only the
// newest limit of them: what a chart needs to start with the recent past.
// It reads from the oldest record the filters' retention keeps.
func (h *History) Since(ctx context.Context, since time.Time, limit int, filters []string, match func(string) bool) ([]*Record, error) {
	var err error
	for range 5 {
		var recs []*Record
		if recs, err = h.since(ctx, since, limit, filters, match); !errors.As(err, new(*ErrReset)) {
			return recs, err
		}
		// Retention removed the oldest records while they were read (a
		// busy rule at its cap): start again from the new oldest.
	}
	return nil, err
}

func (h *History) since(ctx context.Context, since time.Time, limit int, filters []string, match func(string) bool) ([]*Record, error) {
	after := uint64(0)
	if oldest := h.log.OldestFor(filters...); oldest > 0 {
		after = oldest - 1
	}
	cut := since.UnixMilli()
	ring := make([]*Record, 0, min(limit, 1024))
	start := 0 // ring[start] is the oldest once the ring is full
	err := h.Replay(ctx, after, h.log.Head(), filters, match, func(rec *Record) bool {
		if rec.TS < cut {
			return true
		}
		if len(ring) < limit {
			ring = append(ring, rec)
		} else {
			ring[start] = rec
			start = (start + 1) % limit
		}
		return true
	})
	if err != nil {
		return nil, err
	}
	return append(ring[start:], ring[:start]...), nil
}
