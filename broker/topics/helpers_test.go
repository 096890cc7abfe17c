package topics

import (
	"fmt"
	"maps"
	"slices"
	"strings"
	"testing"
)

// refMatch is a second, plainly written matcher to check Match against.
func refMatch(filter, topic string) bool {
	f, t := strings.Split(filter, "/"), strings.Split(topic, "/")
	if strings.HasPrefix(topic, "$") && (f[0] == "+" || f[0] == "#") {
		return false
	}
	for i, level := range f {
		if level == "#" {
			return true
		}
		if i >= len(t) || level != "+" && level != t[i] {
			return false
		}
	}
	return len(f) == len(t)
}

// refValidFilter is a second, plainly written filter check.
func refValidFilter(filter string) bool {
	if !validString(filter) {
		return false
	}
	levels := strings.Split(filter, "/")
	for i, level := range levels {
		if strings.ContainsAny(level, "+#") && level != "+" && level != "#" {
			return false
		}
		if level == "#" && i != len(levels)-1 {
			return false
		}
	}
	return true
}

// result is a Matches in a form to compare: deliveries by client, shared
// matches by "group filter" with their member clients sorted.
type result struct {
	direct map[string]Delivery
	shared map[string][]string
}

func (r result) String() string {
	var b strings.Builder
	for _, c := range slices.Sorted(maps.Keys(r.direct)) {
		d := r.direct[c]
		fmt.Fprintf(&b, "%s:q%d,rap=%v,ids=%v ", c, d.QoS, d.RetainAsPublished, d.IDs)
	}
	for _, k := range slices.Sorted(maps.Keys(r.shared)) {
		fmt.Fprintf(&b, "[%s]%v ", k, r.shared[k])
	}
	return b.String()
}

// resultOf converts m, failing on a client delivered twice or a shared
// match reported twice.
func resultOf(t *testing.T, m *Matches) result {
	t.Helper()
	r := result{direct: map[string]Delivery{}, shared: map[string][]string{}}
	for _, d := range m.Direct {
		if _, dup := r.direct[d.Client]; dup {
			t.Fatalf("client %q delivered twice: %+v", d.Client, m.Direct)
		}
		if d.IDs != nil && len(d.IDs) == 0 {
			t.Fatalf("client %q: empty, non-nil IDs", d.Client)
		}
		r.direct[d.Client] = d
	}
	for _, g := range m.Shared {
		k := g.Group + " " + g.Filter
		if _, dup := r.shared[k]; dup {
			t.Fatalf("shared %q reported twice", k)
		}
		var clients []string
		for _, s := range g.Members {
			if s.Group != g.Group || s.Filter != g.Filter {
				t.Fatalf("shared %q holds %+v", k, s)
			}
			clients = append(clients, s.Client)
		}
		slices.Sort(clients)
		r.shared[k] = clients
	}
	return r
}

// bruteMatch computes what Index.Match should find, from the simple Match.
func bruteMatch(subs []Subscription, topic, publisher string) result {
	r := result{direct: map[string]Delivery{}, shared: map[string][]string{}}
	for _, s := range subs {
		if !Match(s.Filter, topic) {
			continue
		}
		if s.Group != "" {
			k := s.Group + " " + s.Filter
			r.shared[k] = append(r.shared[k], s.Client)
			continue
		}
		if s.NoLocal && publisher != "" && s.Client == publisher {
			continue
		}
		d := r.direct[s.Client]
		d.Client = s.Client
		d.QoS = max(d.QoS, s.QoS)
		d.RetainAsPublished = d.RetainAsPublished || s.RetainAsPublished
		if s.ID != 0 && !slices.Contains(d.IDs, s.ID) {
			d.IDs = append(d.IDs, s.ID)
		}
		r.direct[s.Client] = d
	}
	for _, d := range r.direct {
		slices.Sort(d.IDs)
	}
	for _, clients := range r.shared {
		slices.Sort(clients)
	}
	return r
}

func equalResults(a, b result) bool {
	return maps.EqualFunc(a.direct, b.direct, func(x, y Delivery) bool {
		return x.Client == y.Client && x.QoS == y.QoS &&
			x.RetainAsPublished == y.RetainAsPublished && slices.Equal(x.IDs, y.IDs)
	}) && maps.EqualFunc(a.shared, b.shared, slices.Equal)
}

// checkIndexMatch compares x.Match for topic with bruteMatch over subs.
func checkIndexMatch(t *testing.T, x *Index, m *Matches, subs []Subscription, topic, publisher string) {
	t.Helper()
	x.Match(topic, publisher, m)
	got, want := resultOf(t, m), bruteMatch(subs, topic, publisher)
	if !equalResults(got, want) {
		t.Fatalf("Match(%q, publisher %q):\n got  %v\n want %v", topic, publisher, got, want)
	}
}

// countNodes walks the trie below the root, checks every parent link and
// that no node but the root is empty, and returns the number of nodes,
// which must agree with x.nodes.
func countNodes(t *testing.T, x *Index) int {
	t.Helper()
	x.mu.RLock()
	defer x.mu.RUnlock()
	var walk func(n *node) int
	walk = func(n *node) int {
		count := 0
		for _, c := range []*node{n.plus, n.hash} {
			if c != nil {
				count += walk(c)
			}
		}
		for k, c := range n.children {
			if c.key != k {
				t.Fatalf("child %q has key %q", k, c.key)
			}
			count += walk(c)
		}
		if n != &x.root {
			if n.empty() {
				t.Fatalf("empty node %q not pruned", n.key)
			}
			if p := n.parent; p == nil || p.children[n.key] != n && p.plus != n && p.hash != n {
				t.Fatalf("node %q: wrong parent", n.key)
			}
			count++
		}
		return count
	}
	n := walk(&x.root)
	if n != x.nodes {
		t.Fatalf("trie has %d nodes, counter says %d", n, x.nodes)
	}
	return n
}
