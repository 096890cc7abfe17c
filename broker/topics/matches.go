package topics

import (
	"cmp"
	"slices"
	"strings"
)

// Matches is what a published topic reaches in an Index. Reuse one per
// goroutine: Index.Match resets it and keeps its storage, so that a
// matching loop does not allocate once the buffers fit the results. The
// slices it holds, IDs and Members included, are valid until the next
// Match with the same Matches and must not be modified.
type Matches struct {
	// Direct has one Delivery per client with a matching non-shared
	// subscription, in an order that depends only on the history of the
	// index.
	Direct []Delivery
	// Shared has one SharedMatch per matching shared subscription, that is
	// per group and filter; a group on two matching filters appears twice.
	Shared []SharedMatch

	publisher string
	ids       []uint32 // backing of Direct[i].IDs
	multi     []mitem  // matches of clients with several subscriptions, to merge
	tmp       []mitem  // radix sort buffer
	maxSeq    uint64   // highest client seq in multi
}

// radixMin is the size below which a comparison sort beats two or more
// radix passes over 256 buckets (measured with the benchmarks).
const radixMin = 256

// mitem is a match to merge, with its sort key at hand.
type mitem struct {
	seq uint64
	e   *entry
}

// Delivery is one client's share of a publication: whatever number of its
// subscriptions match, the client gets one PUBLISH (MQTT-3.3.4-2).
type Delivery struct {
	Client string
	// QoS is the highest granted QoS of the matching subscriptions; the
	// message goes out at the lower of it and the published QoS.
	QoS byte
	// RetainAsPublished is true if any matching subscription has it.
	RetainAsPublished bool
	// IDs are the subscription identifiers of the matching subscriptions,
	// ascending and without repeats, for the one PUBLISH
	// (MQTT-3.3.4-3, MQTT-3.3.4-5); nil when none has one.
	IDs []uint32
}

// SharedMatch is a shared subscription whose filter matches: one member
// of the group gets the message.
type SharedMatch struct {
	Group, Filter string
	// Members are the group's subscriptions in order of joining. The slice
	// is the index's own snapshot, never changed by it: do not modify it.
	Members []Subscription
}

// Pick chooses the member that gets a message: the first member, starting
// at Members[n%len(Members)], whose client is online. Rotating n (a counter
// per group, say) spreads the messages. ok reports whether that member is
// online; when none is, Pick returns Members[n%len(Members)] and false, for
// the caller to queue the message in that member's session or drop it. A
// nil online counts every member as online.
func (g *SharedMatch) Pick(n uint64, online func(client string) bool) (s Subscription, ok bool) {
	k := uint64(len(g.Members))
	if k == 0 {
		return Subscription{}, false
	}
	start := n % k
	if online == nil {
		return g.Members[start], true
	}
	for i := range k {
		if s := g.Members[(start+i)%k]; online(s.Client) {
			return s, true
		}
	}
	return g.Members[start], false
}

// Match collects into m, after resetting it, the deliveries for a message
// published to topic by the client publisher: publisher's own
// subscriptions with NoLocal are skipped. Pass "" as publisher for a
// message that no client published (a bridge, the broker itself). NoLocal
// is ignored on shared subscriptions (MQTT-3.8.3-4 forbids it there).
func (x *Index) Match(topic, publisher string, m *Matches) {
	m.Direct, m.Shared, m.ids, m.multi, m.maxSeq = m.Direct[:0], m.Shared[:0], m.ids[:0], m.multi[:0], 0
	m.publisher = publisher
	x.mu.RLock()
	m.walk(&x.root, topic, topic != "" && topic[0] == '$')
	m.merge()
	x.mu.RUnlock()
	clear(m.multi) // hold no entry past the lock
	clear(m.tmp)
	m.tmp = m.tmp[:0]
	m.publisher = ""
}

// walk matches rest, one or more levels, below n. dollar is true at the root
// for a topic starting with '$', which the wildcards there do not match.
func (m *Matches) walk(n *node, rest string, dollar bool) {
	level, tail, more := strings.Cut(rest, "/")
	if !dollar {
		if n.hash != nil {
			m.collect(n.hash)
		}
		if n.plus != nil {
			m.next(n.plus, tail, more)
		}
	}
	if c := n.children[level]; c != nil {
		m.next(c, tail, more)
	}
}

// next continues at n, which matched a level, with what follows it.
func (m *Matches) next(n *node, tail string, more bool) {
	if more {
		m.walk(n, tail, false)
		return
	}
	m.collect(n)
	if n.hash != nil {
		m.collect(n.hash) // "a/#" matches "a"
	}
}

// collect takes the subscriptions of a node whose filter matches.
func (m *Matches) collect(n *node) {
	for _, e := range n.direct {
		if e.sub.NoLocal && m.publisher != "" && e.c.id == m.publisher {
			continue
		}
		if e.c.direct > 1 {
			m.multi = append(m.multi, mitem{e.c.seq, e}) // may match twice: merge later
			m.maxSeq = max(m.maxSeq, e.c.seq)
			continue
		}
		d := Delivery{Client: e.c.id, QoS: e.sub.QoS, RetainAsPublished: e.sub.RetainAsPublished}
		if e.sub.ID != 0 {
			m.ids = append(m.ids, e.sub.ID)
			d.IDs = m.ids[len(m.ids)-1 : len(m.ids) : len(m.ids)]
		}
		m.Direct = append(m.Direct, d)
	}
	for _, g := range n.groups {
		m.Shared = append(m.Shared, SharedMatch{Group: g.name, Filter: g.filter, Members: g.members})
	}
}

// merge turns the matches of clients with several subscriptions into one
// Delivery per client. Sorted by client, each client's matches are a run.
// Wide merges are radix sorted on the clients' sequence numbers: on 1,300
// matches (BenchmarkIndexMatchWildcardHeavy) a comparison sort took 4 to
// 5 times as long, and a scratch map would need a second pass to keep each
// client's identifiers together.
func (m *Matches) merge() {
	if len(m.multi) == 0 {
		return
	}
	sorted := m.sortMulti()
	for i := 0; i < len(sorted); {
		c := sorted[i].e.c
		d := Delivery{Client: c.id}
		start := len(m.ids)
		for ; i < len(sorted) && sorted[i].e.c == c; i++ {
			s := &sorted[i].e.sub
			d.QoS = max(d.QoS, s.QoS)
			d.RetainAsPublished = d.RetainAsPublished || s.RetainAsPublished
			if s.ID != 0 {
				m.ids = append(m.ids, s.ID)
			}
		}
		if len(m.ids) > start {
			if ids := m.ids[start:]; len(ids) > 1 {
				slices.Sort(ids)
				m.ids = m.ids[:start+len(slices.Compact(ids))]
			}
			d.IDs = m.ids[start:len(m.ids):len(m.ids)]
		}
		m.Direct = append(m.Direct, d)
	}
}

// sortMulti sorts m.multi by client and returns the sorted items, which
// are in m.multi or m.tmp. Matches from one node come in order already.
func (m *Matches) sortMulti() []mitem {
	a := m.multi
	sorted := true
	for i := 1; i < len(a) && sorted; i++ {
		sorted = a[i-1].seq <= a[i].seq
	}
	switch {
	case sorted:
		return a
	case len(a) <= radixMin:
		slices.SortFunc(a, func(x, y mitem) int { return cmp.Compare(x.seq, y.seq) })
		return a
	}
	// LSD radix sort, one pass per byte of the highest seq.
	m.tmp = slices.Grow(m.tmp[:0], len(a))[:len(a)]
	b := m.tmp
	for shift := uint(0); shift < 64 && m.maxSeq>>shift != 0; shift += 8 {
		var count [256]int
		for _, it := range a {
			count[byte(it.seq>>shift)]++
		}
		sum := 0
		for i, n := range count {
			count[i], sum = sum, sum+n
		}
		for _, it := range a {
			k := byte(it.seq >> shift)
			b[count[k]] = it
			count[k]++
		}
		a, b = b, a
	}
	return a
}
