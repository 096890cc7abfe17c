package topics

import (
	"strings"
	"sync"
)

// Retained maps topic names to values, one per topic like the retained
// messages of a broker, and finds the topics a filter matches. It is safe
// for concurrent use. The zero value is an empty index.
type Retained[V any] struct {
	mu    sync.RWMutex
	root  rnode[V]
	n     int // topics with a value
	nodes int // trie nodes below the root
	hits  sync.Pool
}

// rnode is one level of a Retained trie.
type rnode[V any] struct {
	parent   *rnode[V]
	key      string
	children map[string]*rnode[V]
	set      bool
	topic    string // when set
	v        V
}

// hit is a match collected under the lock, for the callback after it.
type hit[V any] struct {
	topic string
	v     V
}

// NewRetained returns an empty index.
func NewRetained[V any]() *Retained[V] {
	return &Retained[V]{}
}

// Set stores v for topic, a valid topic name, replacing any value it had.
func (r *Retained[V]) Set(topic string, v V) {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := &r.root
	for rest, more := topic, true; more; {
		var level string
		level, rest, more = strings.Cut(rest, "/")
		c := n.children[level]
		if c == nil {
			c = &rnode[V]{parent: n, key: strings.Clone(level)}
			if n.children == nil {
				n.children = make(map[string]*rnode[V])
			}
			n.children[c.key] = c
			r.nodes++
		}
		n = c
	}
	if !n.set {
		n.set, n.topic = true, strings.Clone(topic)
		r.n++
	}
	n.v = v
}

// Get returns the value of topic.
func (r *Retained[V]) Get(topic string) (V, bool) {
	r.mu.RLock()
	defer r.mu.RUnlock()
	if n := r.find(topic); n != nil && n.set {
		return n.v, true
	}
	var zero V
	return zero, false
}

// Delete removes the value of topic and reports whether there was one.
func (r *Retained[V]) Delete(topic string) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := r.find(topic)
	if n == nil || !n.set {
		return false
	}
	var zero V
	n.set, n.topic, n.v = false, "", zero
	r.n--
	for n != &r.root && !n.set && len(n.children) == 0 {
		p := n.parent
		delete(p.children, n.key)
		if len(p.children) == 0 {
			p.children = nil
		}
		n.parent = nil
		r.nodes--
		n = p
	}
	return true
}

// Len returns the number of topics with a value.
func (r *Retained[V]) Len() int {
	r.mu.RLock()
	defer r.mu.RUnlock()
	return r.n
}

// find returns the node of topic, or nil.
func (r *Retained[V]) find(topic string) *rnode[V] {
	n := &r.root
	for rest, more := topic, true; more && n != nil; {
		var level string
		level, rest, more = strings.Cut(rest, "/")
		n = n.children[level]
	}
	return n
}

// Match calls fn with every topic the filter matches and its value, until
// fn returns false. A filter without wildcards costs a lookup per level;
// '+' visits the children of its level and '#' everything below. A leading
// wildcard does not match topics starting with '$'. An invalid filter
// matches nothing.
//
// The matches are collected under a read lock and fn runs after it is
// released, so fn may use r; it sees the topics as they were when Match
// began. The order of the topics is unspecified.
func (r *Retained[V]) Match(filter string, fn func(topic string, v V) bool) {
	if !ValidFilter(filter) {
		return
	}
	bp, _ := r.hits.Get().(*[]hit[V])
	if bp == nil {
		bp = new([]hit[V])
	}
	r.mu.RLock()
	hits := r.walk(&r.root, filter, true, (*bp)[:0])
	r.mu.RUnlock()
	defer func() {
		clear(hits) // hold no value in the pool
		*bp = hits[:0]
		r.hits.Put(bp)
	}()
	for _, h := range hits {
		if !fn(h.topic, h.v) {
			return
		}
	}
}

// walk appends the topics below n that rest matches. root is true at the
// root, where wildcards skip '$' topics.
func (r *Retained[V]) walk(n *rnode[V], rest string, root bool, hits []hit[V]) []hit[V] {
	level, tail, more := strings.Cut(rest, "/")
	switch level {
	case "#":
		if n.set {
			hits = append(hits, hit[V]{n.topic, n.v}) // "a/#" matches "a"
		}
		for k, c := range n.children {
			if !root || !strings.HasPrefix(k, "$") {
				hits = c.all(hits)
			}
		}
	case "+":
		for k, c := range n.children {
			if !root || !strings.HasPrefix(k, "$") {
				hits = r.next(c, tail, more, hits)
			}
		}
	default:
		if c := n.children[level]; c != nil {
			hits = r.next(c, tail, more, hits)
		}
	}
	return hits
}

// next continues at n, which matched a level, with what follows it.
func (r *Retained[V]) next(n *rnode[V], tail string, more bool, hits []hit[V]) []hit[V] {
	if more {
		return r.walk(n, tail, false, hits)
	}
	if n.set {
		hits = append(hits, hit[V]{n.topic, n.v})
	}
	return hits
}

// all appends n and everything below it.
func (n *rnode[V]) all(hits []hit[V]) []hit[V] {
	if n.set {
		hits = append(hits, hit[V]{n.topic, n.v})
	}
	for _, c := range n.children {
		hits = c.all(hits)
	}
	return hits
}
