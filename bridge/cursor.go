package bridge

import (
	"errors"
	"slices"
	"strconv"
	"strings"

	"github.com/beaconmq/beacon/hooks"
	"github.com/beaconmq/beacon/storage"
)

// Cluster event ids. On a single node an event id is a place in the
// node's log. In a cluster a reader may come back on any node, and each
// node's log orders the messages differently (its own ones, and those
// the others forwarded while someone here wanted them), so an id names
// what the reader has seen of each node's own messages: a cursor.
//
//	c1~<since>~<node>:<epoch>:<seq>[:<seq0>]~...
//
// since is when the reader's first stream began (unix milliseconds,
// base 36): of a node the cursor does not name, the messages accepted
// from then on are wanted. For each node named, epoch is the low 32 bits
// of its log's epoch (hex) and seq the last of its messages seen (base
// 36); seq0, when it differs, is the last seen of those that cross nodes
// by the best-effort path (QoS 0, not retained), which may overtake the
// others on the way. A node id has no ':' or '~' (cluster.node_id).

const (
	cursorPrefix   = "c1~"
	maxCursorNodes = 64 // a cursor naming more is not one of ours
)

// nodePos is what a reader has seen of one node's own messages.
type nodePos struct {
	epoch  uint32
	s0, s1 uint64 // the last seq seen by the best-effort path, and by the other
}

// cursor is a reader's position in the cluster.
type cursor struct {
	since int64 // unix milliseconds
	pos   map[string]nodePos
}

var errCursor = errors.New("not a cluster cursor")

func isCursor(id string) bool { return strings.HasPrefix(id, cursorPrefix) }

func parseCursor(id string) (cursor, error) {
	rest, ok := strings.CutPrefix(id, cursorPrefix)
	if !ok || len(id) > 4096 {
		return cursor{}, errCursor
	}
	parts := strings.Split(rest, "~")
	if len(parts) > maxCursorNodes+1 {
		return cursor{}, errCursor
	}
	since, err := strconv.ParseInt(parts[0], 36, 64)
	if err != nil || since < 0 {
		return cursor{}, errCursor
	}
	c := cursor{since: since, pos: make(map[string]nodePos, len(parts)-1)}
	for _, p := range parts[1:] {
		f := strings.Split(p, ":")
		if len(f) < 3 || len(f) > 4 || f[0] == "" {
			return cursor{}, errCursor
		}
		ep, err1 := strconv.ParseUint(f[1], 16, 32)
		s1, err2 := strconv.ParseUint(f[2], 36, 64)
		s0 := s1
		var err3 error
		if len(f) == 4 {
			s0, err3 = strconv.ParseUint(f[3], 36, 64)
		}
		if err1 != nil || err2 != nil || err3 != nil {
			return cursor{}, errCursor
		}
		if _, dup := c.pos[f[0]]; dup {
			return cursor{}, errCursor
		}
		c.pos[f[0]] = nodePos{epoch: uint32(ep), s0: s0, s1: s1}
	}
	return c, nil
}

// String is the cursor's event id.
func (c cursor) String() string {
	b := make([]byte, 0, 16+32*len(c.pos))
	b = append(b, cursorPrefix...)
	b = strconv.AppendInt(b, c.since, 36)
	nodes := make([]string, 0, len(c.pos))
	for n := range c.pos {
		nodes = append(nodes, n)
	}
	slices.Sort(nodes)
	for _, n := range nodes {
		p := c.pos[n]
		b = append(b, '~')
		b = append(b, n...)
		b = append(b, ':')
		b = strconv.AppendUint(b, uint64(p.epoch), 16)
		b = append(b, ':')
		b = strconv.AppendUint(b, p.s1, 36)
		if p.s0 != p.s1 {
			b = append(b, ':')
			b = strconv.AppendUint(b, p.s0, 36)
		}
	}
	return string(b)
}

// seen moves the cursor over a message of node (seq in its log of the
// epoch tag). own says the node's messages reach the reader in seq order
// whatever their path (the reader's own node).
func (c *cursor) seen(node string, epoch uint32, seq uint64, path0, own bool) {
	p, ok := c.pos[node]
	if !ok || p.epoch != epoch {
		p = nodePos{epoch: epoch}
	}
	switch {
	case own:
		p.s0, p.s1 = max(p.s0, seq), max(p.s1, seq)
	case path0:
		p.s0 = max(p.s0, seq)
	default:
		p.s1 = max(p.s1, seq)
	}
	c.pos[node] = p
}

// through records that every message of node up to seq was seen (a
// replay of it ended there).
func (c *cursor) through(node string, epoch uint32, seq uint64) {
	p, ok := c.pos[node]
	if !ok || p.epoch != epoch {
		p = nodePos{epoch: epoch}
	}
	p.s0, p.s1 = max(p.s0, seq), max(p.s1, seq)
	c.pos[node] = p
}

// reset puts the cursor of node at seq: after a reset, whatever it said.
func (c *cursor) reset(node string, epoch uint32, seq uint64) {
	c.pos[node] = nodePos{epoch: epoch, s0: seq, s1: seq}
}

// query is the PageQuery for node's messages after the cursor.
func (c cursor) query(node string, filters []string) hooks.PageQuery {
	q := hooks.PageQuery{Filters: filters, Since: c.since}
	if p, ok := c.pos[node]; ok {
		q.Known, q.Epoch, q.After0, q.After1 = true, p.epoch, p.s0, p.s1
	}
	return q
}

// originOf is the node, epoch tag and seq of a record: its cluster
// identity, or this node's (own) for one accepted here; ok is false for
// an identity that does not parse.
func originOf(rec *hooks.Record, self string, epoch uint32) (node string, ep uint32, seq uint64, own, ok bool) {
	if rec.Origin == "" {
		return self, epoch, rec.Seq, true, true
	}
	n, e, sq, ok := storage.ParseIdentity(rec.Origin)
	return n, hooks.EpochTag(e), sq, false, ok
}
