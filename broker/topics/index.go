package topics

import (
	"cmp"
	"slices"
	"strings"
	"sync"
)

// Subscription is one client's subscription to one topic filter.
type Subscription struct {
	Client            string // client id
	Filter            string // the topic filter without any $share/{group}/ prefix
	Group             string // shared-subscription group, "" if not shared
	QoS               byte   // granted maximum QoS
	NoLocal           bool   // do not deliver the client's own publications
	RetainAsPublished bool   // keep the RETAIN flag of forwarded publications
	RetainHandling    byte   // when to send retained messages at subscribe time
	ID                uint32 // subscription identifier, 0 if none
}

// Index holds every subscription of a broker in a trie keyed by topic
// level and finds the subscriptions a published topic reaches. It is safe
// for concurrent use; Match takes a read lock, changes a write lock.
//
// The index does not validate: a filter reaches it through ParseShared.
// The zero value is an empty index.
type Index struct {
	mu      sync.RWMutex
	root    node
	clients map[string]*client
	subs    int    // subscriptions
	nodes   int    // trie nodes below the root
	seq     uint64 // next client.seq

	// OnFilter, if set, hears a filter (in a shared group, or "") gain
	// its first subscriber (added) or lose its last: what the index
	// covers changed. It runs under the index's lock, in the order of
	// the changes: it must be quick and must not call the index. Set it
	// before the index is used.
	OnFilter func(filter, group string, added bool)
}

// client is what the index knows of one client.
type client struct {
	id     string
	seq    uint64 // order of creation: the merge sorts by it, cheaper than ids
	subs   entrySet
	direct int // non-shared subscriptions; with one, no merge is needed
}

// entrySet is a client's subscriptions by filter and group: a slice while
// there are few (most clients have one or a handful; a map costs some 300
// bytes for one entry), a map beyond smallSet.
type entrySet struct {
	list []*entry
	m    map[subKey]*entry
}

const smallSet = 16

func (s *entrySet) len() int {
	if s.m != nil {
		return len(s.m)
	}
	return len(s.list)
}

func (s *entrySet) get(k subKey) *entry {
	if s.m != nil {
		return s.m[k]
	}
	for _, e := range s.list {
		if e.sub.Filter == k.filter && e.sub.Group == k.group {
			return e
		}
	}
	return nil
}

// put adds e, which is not in the set.
func (s *entrySet) put(k subKey, e *entry) {
	if s.m == nil && len(s.list) < smallSet {
		s.list = append(s.list, e)
		return
	}
	if s.m == nil {
		s.m = make(map[subKey]*entry, 2*smallSet)
		for _, o := range s.list {
			s.m[subKey{o.sub.Filter, o.sub.Group}] = o
		}
		s.list = nil
	}
	s.m[k] = e
}

func (s *entrySet) del(k subKey) {
	if s.m != nil {
		delete(s.m, k)
		return
	}
	for i, e := range s.list {
		if e.sub.Filter == k.filter && e.sub.Group == k.group {
			s.list = slices.Delete(s.list, i, i+1)
			return
		}
	}
}

// all returns the entries in a new slice.
func (s *entrySet) all() []*entry {
	if s.m == nil {
		return slices.Clone(s.list)
	}
	out := make([]*entry, 0, len(s.m))
	for _, e := range s.m {
		out = append(out, e)
	}
	return out
}

// subKey identifies one of a client's subscriptions.
type subKey struct{ filter, group string }

// entry is a stored subscription.
type entry struct {
	sub  Subscription
	c    *client
	node *node
	pos  int // index in node.direct, for a non-shared subscription
}

// node is one level of the trie: the subscriptions whose filter ends here
// and the levels below.
type node struct {
	parent   *node
	key      string // this level, in parent.children
	children map[string]*node
	plus     *node    // '+' child
	hash     *node    // '#' child
	direct   []*entry // non-shared subscriptions
	groups   []*group // shared subscriptions, by group, in order of creation
}

func (n *node) empty() bool {
	return len(n.children) == 0 && n.plus == nil && n.hash == nil &&
		len(n.direct) == 0 && len(n.groups) == 0
}

// group is one shared subscription: a group on a filter.
type group struct {
	name, filter string
	// members is copy-on-write below len: Match hands it out without a
	// copy, so the index only appends in place, and any other change
	// builds a new slice.
	members []Subscription
}

// NewIndex returns an empty subscription index.
func NewIndex() *Index {
	return &Index{clients: make(map[string]*client)}
}

// Subscribe adds a subscription or replaces the one with the same Client,
// Filter and Group, and reports whether it replaced one. s.Filter is the
// filter without a $share prefix, valid by ValidFilter.
func (x *Index) Subscribe(s Subscription) (replaced bool) {
	key := subKey{s.Filter, s.Group}
	x.mu.Lock()
	defer x.mu.Unlock()
	c := x.clients[s.Client]
	if c != nil {
		if e := c.subs.get(key); e != nil {
			s.Client, s.Filter, s.Group = e.sub.Client, e.sub.Filter, e.sub.Group
			e.sub = s
			if s.Group != "" {
				g := e.node.group(s.Group)
				i := g.member(s.Client)
				g.members = slices.Clone(g.members)
				g.members[i] = s
			}
			return true
		}
	} else {
		c = &client{id: strings.Clone(s.Client), seq: x.seq}
		x.seq++
		if x.clients == nil {
			x.clients = make(map[string]*client)
		}
		x.clients[c.id] = c
	}
	s.Client, s.Filter, s.Group = c.id, strings.Clone(s.Filter), strings.Clone(s.Group)
	n := x.insert(s.Filter)
	e := &entry{sub: s, c: c, node: n}
	if s.Group == "" {
		e.pos = len(n.direct)
		n.direct = append(n.direct, e)
		c.direct++
		if len(n.direct) == 1 && x.OnFilter != nil {
			x.OnFilter(s.Filter, "", true)
		}
	} else {
		g := n.group(s.Group)
		if g == nil {
			g = &group{name: s.Group, filter: s.Filter}
			n.groups = append(n.groups, g)
			if x.OnFilter != nil {
				x.OnFilter(s.Filter, s.Group, true)
			}
		}
		g.members = append(g.members, s) // in place only past every len handed out
	}
	c.subs.put(subKey{s.Filter, s.Group}, e)
	x.subs++
	return false
}

// Unsubscribe removes a client's subscription to filter in group ("" for a
// non-shared one) and reports whether it existed.
func (x *Index) Unsubscribe(client, filter, group string) bool {
	x.mu.Lock()
	defer x.mu.Unlock()
	c := x.clients[client]
	if c == nil {
		return false
	}
	e := c.subs.get(subKey{filter, group})
	if e == nil {
		return false
	}
	x.remove(e)
	return true
}

// RemoveClient removes every subscription of a client and returns how many
// there were.
func (x *Index) RemoveClient(client string) int {
	x.mu.Lock()
	defer x.mu.Unlock()
	c := x.clients[client]
	if c == nil {
		return 0
	}
	all := c.subs.all()
	for _, e := range all {
		x.remove(e)
	}
	n := len(all)
	return n
}

// Subscriptions returns a copy of a client's subscriptions, ordered by
// Filter and then Group.
func (x *Index) Subscriptions(client string) []Subscription {
	x.mu.RLock()
	c := x.clients[client]
	if c == nil {
		x.mu.RUnlock()
		return nil
	}
	subs := make([]Subscription, 0, c.subs.len())
	for _, e := range c.subs.all() {
		subs = append(subs, e.sub)
	}
	x.mu.RUnlock()
	slices.SortFunc(subs, func(a, b Subscription) int {
		return cmp.Or(strings.Compare(a.Filter, b.Filter), strings.Compare(a.Group, b.Group))
	})
	return subs
}

// Len returns the number of subscriptions.
func (x *Index) Len() int {
	x.mu.RLock()
	defer x.mu.RUnlock()
	return x.subs
}

// insert returns the node of filter, creating the missing levels.
func (x *Index) insert(filter string) *node {
	n := &x.root
	for rest, more := filter, true; more; {
		var level string
		level, rest, more = strings.Cut(rest, "/")
		n = x.child(n, level)
	}
	return n
}

func (x *Index) child(n *node, level string) *node {
	switch level {
	case "+":
		if n.plus == nil {
			n.plus = x.newNode(n, "+")
		}
		return n.plus
	case "#":
		if n.hash == nil {
			n.hash = x.newNode(n, "#")
		}
		return n.hash
	}
	c := n.children[level]
	if c == nil {
		// A key of its own, not a piece of the filter, which the node
		// may outlive.
		c = x.newNode(n, strings.Clone(level))
		if n.children == nil {
			n.children = make(map[string]*node)
		}
		n.children[c.key] = c
	}
	return c
}

func (x *Index) newNode(parent *node, key string) *node {
	x.nodes++
	return &node{parent: parent, key: key}
}

// remove drops a stored subscription and prunes the nodes left empty.
func (x *Index) remove(e *entry) {
	n, c := e.node, e.c
	if e.sub.Group == "" {
		last := len(n.direct) - 1
		moved := n.direct[last]
		n.direct[e.pos], moved.pos = moved, e.pos
		n.direct[last] = nil
		n.direct = shrink(n.direct[:last])
		c.direct--
		if len(n.direct) == 0 && x.OnFilter != nil {
			x.OnFilter(e.sub.Filter, "", false)
		}
	} else {
		gi := slices.IndexFunc(n.groups, func(g *group) bool { return g.name == e.sub.Group })
		g := n.groups[gi]
		if len(g.members) == 1 {
			n.groups = slices.Delete(n.groups, gi, gi+1)
			if len(n.groups) == 0 {
				n.groups = nil
			}
			if x.OnFilter != nil {
				x.OnFilter(e.sub.Filter, e.sub.Group, false)
			}
		} else {
			i := g.member(e.sub.Client)
			g.members = slices.Delete(slices.Clone(g.members), i, i+1)
		}
	}
	c.subs.del(subKey{e.sub.Filter, e.sub.Group})
	if c.subs.len() == 0 {
		delete(x.clients, c.id)
	}
	x.subs--
	e.node, e.c = nil, nil
	x.prune(n)
}

// prune removes n and its ancestors while they are empty.
func (x *Index) prune(n *node) {
	for n != &x.root && n.empty() {
		p := n.parent
		switch n {
		case p.plus:
			p.plus = nil
		case p.hash:
			p.hash = nil
		default:
			delete(p.children, n.key)
			if len(p.children) == 0 {
				p.children = nil // a map never shrinks: let it go
			}
		}
		n.parent = nil
		x.nodes--
		n = p
	}
}

// shrink gives back the storage of a slice that lost most of its elements,
// so that a node that once held many subscriptions does not keep their
// room.
func shrink[S ~[]E, E any](s S) S {
	switch {
	case len(s) == 0:
		return nil
	case cap(s) > 16 && len(s) < cap(s)/4:
		return slices.Clone(s)
	}
	return s
}

// group returns the group called name, or nil.
func (n *node) group(name string) *group {
	for _, g := range n.groups {
		if g.name == name {
			return g
		}
	}
	return nil
}

// member returns the index of client's subscription in the group.
func (g *group) member(client string) int {
	return slices.IndexFunc(g.members, func(s Subscription) bool { return s.Client == client })
}
