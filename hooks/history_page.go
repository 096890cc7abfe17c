package hooks

import (
	"context"
	"errors"
	"strings"
	"time"

	"github.com/beaconmq/beacon/devices"
)

// Pages of a node's own history: what a browser reader resuming on
// another node of a cluster missed of the messages this node accepted.
// Every node's log holds the messages it accepted (the ones other nodes
// forwarded to it only while someone here wanted them), so a replay in a
// cluster reads each node's own records from that node (bridge's
// cluster cursor, docs/cluster.md).

// PageQuery asks for own records (accepted on this node, not forwarded
// to it) matching Filters after a reader's position in this log.
type PageQuery struct {
	Filters []string `json:"f"`
	// Since (unix milliseconds) is when the reader began: records
	// accepted before it are not wanted. Known says the reader also has
	// a position in this log: Epoch is the low 32 bits of the log's epoch
	// it is in, and it has seen every matching record up to After0 of
	// those that cross nodes by the best-effort path (Crosses0) and up to
	// After1 of the others.
	Since  int64  `json:"s,omitempty"`
	Known  bool   `json:"k,omitempty"`
	Epoch  uint32 `json:"e,omitempty"`
	After0 uint64 `json:"a0,omitempty"`
	After1 uint64 `json:"a1,omitempty"`
	// Upto ends the replay (the Upto of the first page); 0 for the first
	// page: the log's head now.
	Upto  uint64 `json:"u,omitempty"`
	Limit int    `json:"l,omitempty"`
}

// Page is an answer to a PageQuery.
type Page struct {
	Records []*Record `json:"r,omitempty"`
	Epoch   uint32    `json:"e"` // of this log
	Upto    uint64    `json:"u"` // the replay ends here (ask the next page with it)
	// Next is the last record of the page, when More says another
	// follows: ask it with After0 and After1 raised to at least Next.
	Next uint64 `json:"n,omitempty"`
	More bool   `json:"m,omitempty"`
	// Reset is why the position cannot be replayed from (a Reset
	// reason); the reader goes on from Upto.
	Reset string `json:"x,omitempty"`
}

// Bounds of a page.
const (
	pageRecords = 512
	pageBytes   = 256 << 10 // of encoded records (base64 payloads)
	// sinceSlack is how much earlier than Since a record may be and
	// still be replayed: the clocks of two nodes differ a little.
	sinceSlack = 1000
)

// Crosses0 reports whether rec crosses nodes by the best-effort path (a
// QoS 0 message that is not retained): such messages and the others may
// reach another node in either order.
func Crosses0(rec *Record) bool { return rec.QoS == 0 && !rec.Retain }

// EpochTag is the low 32 bits of a log epoch, as cursors carry it.
func EpochTag(epoch uint64) uint32 { return uint32(epoch) }

// OwnPage answers q from this log.
func (h *History) OwnPage(ctx context.Context, q PageQuery) (Page, error) {
	p := Page{Epoch: EpochTag(h.log.Epoch()), Upto: q.Upto}
	if p.Upto == 0 {
		p.Upto = h.log.Head()
	}
	limit := q.Limit
	if limit <= 0 || limit > pageRecords {
		limit = pageRecords
	}
	if q.Known && q.Epoch != p.Epoch {
		p.Reset = ResetForeignEpoch
		return p, nil
	}
	if q.Known && max(q.After0, q.After1) > p.Upto {
		p.Reset = ResetUnknown
		return p, nil
	}
	// Start at the first record since the reader began, or at its
	// position if later; a position retention has passed is a reset.
	var after uint64
	trimmed := false
	if oldest := h.log.OldestFor(q.Filters...); oldest > 0 {
		after, trimmed = oldest-1, true
	}
	// Times in the index are rounded up to seconds: a second early.
	if q.Since > 0 {
		if first := h.log.FirstSince(time.UnixMilli(q.Since-sinceSlack).Add(-time.Second).UnixNano(), q.Filters...); first > after+1 {
			after, trimmed = first-1, false
		}
	}
	if q.Known {
		switch pos := min(q.After0, q.After1); {
		case pos >= after:
			after = pos
		case trimmed:
			p.Reset = ResetExpired
			return p, nil
		}
	}
	if after >= p.Upto {
		return p, nil
	}
	match := filterMatcher(q.Filters)
	size := 0
	err := h.Replay(ctx, after, p.Upto, q.Filters, match, func(rec *Record) bool {
		switch {
		case rec.Origin != "":
			return true // another node's: it answers for it
		case q.Known && rec.Seq <= q.After0 && Crosses0(rec), q.Known && rec.Seq <= q.After1 && !Crosses0(rec):
			return true
		case rec.TS < q.Since-sinceSlack:
			return true
		}
		n := 64 + len(rec.Topic) + len(rec.Device) + (len(rec.Payload)+2)/3*4
		if len(p.Records) == limit || size+n > pageBytes && len(p.Records) > 0 {
			p.More, p.Next = true, p.Records[len(p.Records)-1].Seq
			return false
		}
		size += n
		p.Records = append(p.Records, rec)
		return true
	})
	var re *ErrReset
	if errors.As(err, &re) {
		p.Records, p.More, p.Reset = nil, false, re.Reason
		return p, nil
	}
	return p, err
}

// filterMatcher reports whether a topic matches any of filters.
func filterMatcher(filters []string) func(string) bool {
	split := make([][]string, len(filters))
	for i, f := range filters {
		split[i] = strings.Split(f, "/")
	}
	return func(topic string) bool {
		for _, f := range split {
			if devices.MatchesTopic(f, topic) {
				return true
			}
		}
		return false
	}
}
