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
	multi     []*entry // matches of clients with several subscriptions, to merge
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
	m.Direct, m.Shared, m.ids, m.multi = m.Direct[:0], m.Shared[:0], m.ids[:0], m.multi[:0]
	m.publisher = publisher
	x.mu.RLock()
	m.walk(&x.root, topic, topic != "" && topic[0] == '$')
	m.merge()
	x.mu.RUnlock()
	clear(m.multi) // hold no entry past the lock
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
			m.multi = append(m.multi, e) // may match twice: merge later
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
// Delivery per client: sorted by client and identifier, each client's
// matches are a run.
func (m *Matches) merge() {
	if len(m.multi) > 1 {
		slices.SortFunc(m.multi, func(a, b *entry) int {
			return cmp.Or(cmp.Compare(a.c.seq, b.c.seq), cmp.Compare(a.sub.ID, b.sub.ID))
		})
	}
	for i := 0; i < len(m.multi); {
		c := m.multi[i].c
		d := Delivery{Client: c.id}
		start := len(m.ids)
		for ; i < len(m.multi) && m.multi[i].c == c; i++ {
			s := &m.multi[i].sub
			d.QoS = max(d.QoS, s.QoS)
			d.RetainAsPublished = d.RetainAsPublished || s.RetainAsPublished
			if s.ID != 0 && (len(m.ids) == start || m.ids[len(m.ids)-1] != s.ID) {
				m.ids = append(m.ids, s.ID)
			}
		}
		if len(m.ids) > start {
			d.IDs = m.ids[start:len(m.ids):len(m.ids)]
		}
		m.Direct = append(m.Direct, d)
	}
}
