package topics

import (
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"testing"
	"unsafe"
)

func TestIndexMatchRules(t *testing.T) {
	for _, tc := range matchTests {
		t.Run(tc.filter+" "+tc.topic, func(t *testing.T) {
			x := NewIndex()
			x.Subscribe(Subscription{Client: "c", Filter: tc.filter})
			x.Subscribe(Subscription{Client: "w", Filter: tc.filter, Group: "g"})
			var m Matches
			x.Match(tc.topic, "", &m)
			if got := len(m.Direct) == 1; got != tc.want {
				t.Errorf("filter %q, topic %q: direct %+v, want match %v", tc.filter, tc.topic, m.Direct, tc.want)
			}
			if got := len(m.Shared) == 1; got != tc.want {
				t.Errorf("filter %q, topic %q: shared %+v, want match %v", tc.filter, tc.topic, m.Shared, tc.want)
			}
		})
	}
}

func TestIndexSubscribe(t *testing.T) {
	x := NewIndex()
	if x.Subscribe(Subscription{Client: "a", Filter: "x/+", QoS: 1, ID: 7}) {
		t.Fatal("new subscription reported as replaced")
	}
	if !x.Subscribe(Subscription{Client: "a", Filter: "x/+", QoS: 2, NoLocal: true, RetainHandling: 2}) {
		t.Fatal("replacement not reported")
	}
	x.Subscribe(Subscription{Client: "a", Filter: "x/+", Group: "g", QoS: 1})
	x.Subscribe(Subscription{Client: "a", Filter: "a/b"})
	x.Subscribe(Subscription{Client: "b", Filter: "x/+"})
	if got := x.Len(); got != 4 {
		t.Fatalf("Len = %d, want 4", got)
	}
	want := []Subscription{
		{Client: "a", Filter: "a/b"},
		{Client: "a", Filter: "x/+", QoS: 2, NoLocal: true, RetainHandling: 2},
		{Client: "a", Filter: "x/+", Group: "g", QoS: 1},
	}
	if got := x.Subscriptions("a"); !slices.Equal(got, want) {
		t.Fatalf("Subscriptions(a) =\n %+v\nwant\n %+v", got, want)
	}
	if got := x.Subscriptions("nobody"); got != nil {
		t.Fatalf("Subscriptions(nobody) = %+v", got)
	}

	var m Matches
	x.Match("x/1", "", &m)
	if d := resultOf(t, &m).direct["a"]; len(m.Direct) != 2 || d.QoS != 2 || d.IDs != nil {
		t.Fatalf("after replace: %+v", m.Direct)
	}

	tests := []struct {
		name                  string
		client, filter, group string
		want                  bool
	}{
		{"unknown client", "z", "x/+", "", false},
		{"unknown filter", "a", "x/y", "", false},
		{"unknown group", "a", "x/+", "h", false},
		{"shared", "a", "x/+", "g", true},
		{"shared again", "a", "x/+", "g", false},
		{"direct", "a", "x/+", "", true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := x.Unsubscribe(tc.client, tc.filter, tc.group); got != tc.want {
				t.Fatalf("Unsubscribe(%q, %q, %q) = %v, want %v", tc.client, tc.filter, tc.group, got, tc.want)
			}
		})
	}
	if got := x.Len(); got != 2 {
		t.Fatalf("Len = %d, want 2", got)
	}
	if got := x.RemoveClient("a"); got != 1 {
		t.Fatalf("RemoveClient(a) = %d, want 1", got)
	}
	if got := x.RemoveClient("a"); got != 0 {
		t.Fatalf("RemoveClient(a) again = %d, want 0", got)
	}
	x.Unsubscribe("b", "x/+", "")
	if x.Len() != 0 || len(x.clients) != 0 || countNodes(t, x) != 0 {
		t.Fatalf("not empty: Len %d, clients %d, nodes %d", x.Len(), len(x.clients), x.nodes)
	}
}

func TestIndexMerge(t *testing.T) {
	x := NewIndex()
	subs := []Subscription{
		{Client: "c", Filter: "home/+/temp", QoS: 0, ID: 9},
		{Client: "c", Filter: "home/#", QoS: 2, ID: 3},
		{Client: "c", Filter: "home/kitchen/temp", QoS: 1, RetainAsPublished: true},
		{Client: "c", Filter: "home/kitchen/+", QoS: 1, ID: 3}, // same id twice: once in the PUBLISH
		{Client: "c", Filter: "office/#", QoS: 1, ID: 5},       // does not match
		{Client: "d", Filter: "home/kitchen/temp", QoS: 1, ID: 4},
		{Client: "e", Filter: "#", NoLocal: true, ID: 1},
		{Client: "e", Filter: "home/+/+", QoS: 1},
	}
	for _, s := range subs {
		x.Subscribe(s)
	}
	tests := []struct {
		name      string
		topic     string
		publisher string
		want      []Delivery
	}{
		{"merged", "home/kitchen/temp", "", []Delivery{
			{Client: "c", QoS: 2, RetainAsPublished: true, IDs: []uint32{3, 9}},
			{Client: "d", QoS: 1, IDs: []uint32{4}},
			{Client: "e", QoS: 1, IDs: []uint32{1}},
		}},
		{"no local skips one of two", "home/kitchen/temp", "e", []Delivery{
			{Client: "c", QoS: 2, RetainAsPublished: true, IDs: []uint32{3, 9}},
			{Client: "d", QoS: 1, IDs: []uint32{4}},
			{Client: "e", QoS: 1},
		}},
		{"no local skips all", "home/kitchen", "e", []Delivery{
			{Client: "c", QoS: 2, IDs: []uint32{3}},
		}},
		{"other publisher", "home/kitchen", "c", []Delivery{
			{Client: "c", QoS: 2, IDs: []uint32{3}},
			{Client: "e", IDs: []uint32{1}},
		}},
	}
	var m Matches
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			x.Match(tc.topic, tc.publisher, &m)
			got := slices.Clone(m.Direct)
			slices.SortFunc(got, func(a, b Delivery) int { return strings.Compare(a.Client, b.Client) })
			if !slices.EqualFunc(got, tc.want, func(a, b Delivery) bool {
				return a.Client == b.Client && a.QoS == b.QoS && a.RetainAsPublished == b.RetainAsPublished && slices.Equal(a.IDs, b.IDs)
			}) {
				t.Fatalf("Match(%q, %q) =\n %+v\nwant\n %+v", tc.topic, tc.publisher, got, tc.want)
			}
			checkIndexMatch(t, x, &m, subs, tc.topic, tc.publisher)
		})
	}
}

func TestIndexShared(t *testing.T) {
	x := NewIndex()
	for _, s := range []Subscription{
		{Client: "w1", Filter: "jobs/+", Group: "workers", QoS: 1},
		{Client: "w2", Filter: "jobs/+", Group: "workers", QoS: 1, NoLocal: true},
		{Client: "w3", Filter: "jobs/+", Group: "workers", QoS: 1},
		{Client: "a1", Filter: "jobs/+", Group: "audit"},
		{Client: "w1", Filter: "jobs/#", Group: "workers"}, // another filter: its own match
		{Client: "w1", Filter: "jobs/+"},                   // and a non-shared one
	} {
		x.Subscribe(s)
	}
	var m Matches
	x.Match("jobs/7", "w2", &m) // NoLocal does not apply to shared subscriptions
	got := resultOf(t, &m)
	want := map[string][]string{
		"workers jobs/+": {"w1", "w2", "w3"},
		"audit jobs/+":   {"a1"},
		"workers jobs/#": {"w1"},
	}
	if len(got.shared) != len(want) || len(got.direct) != 1 {
		t.Fatalf("Match = %v", got)
	}
	for k, clients := range want {
		if !slices.Equal(got.shared[k], clients) {
			t.Fatalf("shared %q = %v, want %v", k, got.shared[k], clients)
		}
	}

	var workers *SharedMatch
	for i := range m.Shared {
		if m.Shared[i].Group == "workers" && m.Shared[i].Filter == "jobs/+" {
			workers = &m.Shared[i]
		}
	}
	online := map[string]bool{"w1": true, "w3": true}
	isOnline := func(c string) bool { return online[c] }
	tests := []struct {
		name   string
		n      uint64
		online func(string) bool
		want   string
		ok     bool
	}{
		{"first", 0, isOnline, "w1", true},
		{"skips offline", 1, isOnline, "w3", true},
		{"third", 2, isOnline, "w3", true},
		{"wraps", 3, isOnline, "w1", true},
		{"wraps past offline", 4, isOnline, "w3", true},
		{"nil online", 1, nil, "w2", true},
		{"nobody online", 5, func(string) bool { return false }, "w3", false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s, ok := workers.Pick(tc.n, tc.online)
			if s.Client != tc.want || ok != tc.ok {
				t.Fatalf("Pick(%d) = %q, %v, want %q, %v", tc.n, s.Client, ok, tc.want, tc.ok)
			}
		})
	}
	t.Run("rotates", func(t *testing.T) {
		count := map[string]int{}
		for n := range uint64(300) {
			s, _ := workers.Pick(n, nil)
			count[s.Client]++
		}
		if count["w1"] != 100 || count["w2"] != 100 || count["w3"] != 100 {
			t.Fatalf("Pick over 300 = %v", count)
		}
	})
	t.Run("empty", func(t *testing.T) {
		if s, ok := (&SharedMatch{}).Pick(3, nil); ok || s != (Subscription{}) {
			t.Fatalf("Pick on no members = %+v, %v", s, ok)
		}
	})

	// A snapshot handed out is not changed by later changes of the group.
	snapshot := slices.Clone(workers.Members)
	members := workers.Members
	x.Subscribe(Subscription{Client: "w4", Filter: "jobs/+", Group: "workers"})
	x.Subscribe(Subscription{Client: "w1", Filter: "jobs/+", Group: "workers", QoS: 2})
	x.Unsubscribe("w2", "jobs/+", "workers")
	if !slices.Equal(members, snapshot) {
		t.Fatalf("handed-out members changed:\n %+v\nwas\n %+v", members, snapshot)
	}
	x.Match("jobs/7", "", &m)
	if got := resultOf(t, &m).shared["workers jobs/+"]; !slices.Equal(got, []string{"w1", "w3", "w4"}) {
		t.Fatalf("workers after changes = %v", got)
	}
}

// TestIndexRandomized subscribes and unsubscribes at random, from a fixed
// seed, checks Match against brute force all along, and that the trie is
// empty once everything is removed.
func TestIndexRandomized(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	levels := []string{"a", "b", "c", "", "$SYS", "+", "#"}
	randFilter := func() string {
		for {
			n := 1 + rng.IntN(4)
			f := ""
			for i := range n {
				if i > 0 {
					f += "/"
				}
				f += levels[rng.IntN(len(levels))]
			}
			if ValidFilter(f) {
				return f
			}
		}
	}
	randTopic := func() string {
		for {
			n := 1 + rng.IntN(5)
			s := ""
			for i := range n {
				if i > 0 {
					s += "/"
				}
				s += levels[rng.IntN(len(levels)-2)]
			}
			if ValidTopicName(s) {
				return s
			}
		}
	}
	x := NewIndex()
	live := map[subKey2]Subscription{}
	var m Matches
	for step := range 20000 {
		c := fmt.Sprintf("c%d", rng.IntN(40))
		f := randFilter()
		g := ""
		if rng.IntN(5) == 0 {
			g = []string{"g1", "g2"}[rng.IntN(2)]
		}
		k := subKey2{c, f, g}
		switch op := rng.IntN(10); {
		case op < 6:
			s := Subscription{Client: c, Filter: f, Group: g, QoS: byte(rng.IntN(3)),
				NoLocal: rng.IntN(4) == 0, RetainAsPublished: rng.IntN(2) == 0, ID: uint32(rng.IntN(4))}
			_, had := live[k]
			if got := x.Subscribe(s); got != had {
				t.Fatalf("step %d: Subscribe(%+v) = %v, want %v", step, s, got, had)
			}
			live[k] = s
		case op < 9:
			_, had := live[k]
			if got := x.Unsubscribe(c, f, g); got != had {
				t.Fatalf("step %d: Unsubscribe(%q, %q, %q) = %v, want %v", step, c, f, g, got, had)
			}
			delete(live, k)
		default:
			n := 0
			for k := range live {
				if k.client == c {
					delete(live, k)
					n++
				}
			}
			if got := x.RemoveClient(c); got != n {
				t.Fatalf("step %d: RemoveClient(%q) = %d, want %d", step, c, got, n)
			}
		}
		if step%20 == 0 {
			subs := make([]Subscription, 0, len(live))
			for _, s := range live {
				subs = append(subs, s)
			}
			for range 5 {
				checkIndexMatch(t, x, &m, subs, randTopic(), fmt.Sprintf("c%d", rng.IntN(40)))
			}
			if x.Len() != len(live) {
				t.Fatalf("step %d: Len = %d, want %d", step, x.Len(), len(live))
			}
		}
		if step%1000 == 0 {
			countNodes(t, x)
		}
	}
	for k := range live {
		if rng.IntN(2) == 0 {
			x.Unsubscribe(k.client, k.filter, k.group)
		} else {
			x.RemoveClient(k.client)
		}
	}
	if x.Len() != 0 || len(x.clients) != 0 || countNodes(t, x) != 0 || x.root.children != nil {
		t.Fatalf("not empty after removing everything: Len %d, clients %d, nodes %d", x.Len(), len(x.clients), x.nodes)
	}
}

type subKey2 struct{ client, filter, group string }

func TestIndexConcurrent(t *testing.T) {
	x := NewIndex()
	const writers, readers, rounds = 4, 4, 2000
	var wg sync.WaitGroup
	for w := range writers {
		wg.Go(func() {
			c := fmt.Sprintf("w%d", w)
			for i := range rounds {
				f := fmt.Sprintf("t/%d/+", i%17)
				x.Subscribe(Subscription{Client: c, Filter: f, QoS: 1, ID: uint32(i%5 + 1)})
				x.Subscribe(Subscription{Client: c, Filter: "t/#", Group: "g"})
				if i%3 == 0 {
					x.Unsubscribe(c, f, "")
				}
				if i%100 == 99 {
					x.RemoveClient(c)
				}
			}
			x.RemoveClient(c)
		})
	}
	for r := range readers {
		wg.Go(func() {
			var m Matches
			for i := range rounds {
				x.Match(fmt.Sprintf("t/%d/x", (i+r)%17), "", &m)
				for _, d := range m.Direct {
					if d.QoS != 1 || len(d.IDs) == 0 {
						t.Errorf("delivery %+v", d)
						return
					}
				}
				for _, g := range m.Shared {
					if _, ok := g.Pick(uint64(i), nil); !ok {
						t.Errorf("empty shared match %+v", g)
						return
					}
				}
				_ = x.Subscriptions("w0")
			}
		})
	}
	wg.Wait()
	if x.Len() != 0 || countNodes(t, x) != 0 {
		t.Fatalf("not empty: Len %d, nodes %d", x.Len(), x.nodes)
	}
}

// TestIndexClonesStrings passes strings that alias a buffer, as a decoder
// would, and overwrites the buffer.
func TestIndexClonesStrings(t *testing.T) {
	buf := []byte("client1/a/b/g")
	alias := func(i, j int) string { return unsafe.String(&buf[i], j-i) }
	x := NewIndex()
	x.Subscribe(Subscription{Client: alias(0, 7), Filter: alias(8, 11)})
	x.Subscribe(Subscription{Client: alias(0, 7), Filter: alias(8, 11), Group: alias(12, 13)})
	copy(buf, "XXXXXXXXXXXXX")
	var m Matches
	x.Match("a/b", "", &m)
	if len(m.Direct) != 1 || m.Direct[0].Client != "client1" {
		t.Fatalf("direct %+v", m.Direct)
	}
	if len(m.Shared) != 1 || m.Shared[0].Group != "g" || m.Shared[0].Filter != "a/b" || m.Shared[0].Members[0].Client != "client1" {
		t.Fatalf("shared %+v", m.Shared)
	}
	if got := x.Subscriptions("client1"); len(got) != 2 || got[0].Filter != "a/b" {
		t.Fatalf("Subscriptions = %+v", got)
	}
}

func TestIndexMatchDoesNotAllocate(t *testing.T) {
	x := NewIndex()
	for i := range 200 {
		c := fmt.Sprintf("c%d", i)
		x.Subscribe(Subscription{Client: c, Filter: fmt.Sprintf("d/%d/cmd", i), ID: 1})
		x.Subscribe(Subscription{Client: c, Filter: "d/+/cmd", ID: 2})
		x.Subscribe(Subscription{Client: c, Filter: "d/#", Group: "g"})
	}
	var m Matches
	x.Match("d/7/cmd", "c3", &m)
	if allocs := testing.AllocsPerRun(100, func() { x.Match("d/7/cmd", "c3", &m) }); allocs != 0 {
		t.Fatalf("Match allocates %.1f times per call", allocs)
	}
	if len(m.Direct) != 200 || len(m.Shared) != 1 {
		t.Fatalf("got %d deliveries, %d shared", len(m.Direct), len(m.Shared))
	}
}

// TestIndexMergeWide merges more matches than the comparison sort takes,
// from clients whose sequence numbers differ in three bytes and share the
// low two.
func TestIndexMergeWide(t *testing.T) {
	x := NewIndex()
	rng := rand.New(rand.NewPCG(5, 6))
	var subs []Subscription
	filters := []string{"a/b/c", "a/+/c", "a/#", "+/b/+", "#", "a/b/+"}
	subscribe := func(n int) {
		for i := range n {
			c := fmt.Sprintf("c%d", rng.IntN(500))
			for _, j := range rng.Perm(len(filters))[:1+rng.IntN(3)] {
				s := Subscription{Client: c, Filter: filters[j], QoS: byte(rng.IntN(3)), ID: uint32(rng.IntN(3)), RetainAsPublished: i%7 == 0}
				x.Subscribe(s)
				subs = slices.DeleteFunc(subs, func(o Subscription) bool { return o.Client == s.Client && o.Filter == s.Filter })
				subs = append(subs, s)
			}
		}
	}
	subscribe(300)
	// Move the client sequence on, as 65536 connections would, to where
	// the low two bytes of a new client's equal those of one from the first
	// round.
	x.seq = 1 << 16
	subscribe(600)
	var m Matches
	for _, topic := range []string{"a/b/c", "a/b", "x/b/y", "a"} {
		checkIndexMatch(t, x, &m, subs, topic, "")
	}
	x.Match("a/b/c", "", &m)
	if len(m.multi) <= radixMin || x.seq < 1<<16 {
		t.Fatalf("%d matches to merge, seq %d: the test does not reach three radix passes", len(m.multi), x.seq)
	}
}

func TestIndexZeroValue(t *testing.T) {
	var x Index
	var m Matches
	x.Match("a", "", &m)
	if x.Unsubscribe("c", "a", "") || x.RemoveClient("c") != 0 || x.Len() != 0 || x.Subscriptions("c") != nil {
		t.Fatal("zero Index is not empty")
	}
	x.Subscribe(Subscription{Client: "c", Filter: "a"})
	if x.Match("a", "", &m); len(m.Direct) != 1 {
		t.Fatalf("Match = %+v", m.Direct)
	}
}

// A client's subscriptions move from the small list to a map past
// smallSet and stay findable, replaceable and removable either way.
func TestIndexManySubscriptionsPerClient(t *testing.T) {
	var x Index
	const n = 3 * smallSet
	for i := range n {
		if x.Subscribe(Subscription{Client: "c", Filter: fmt.Sprintf("t/%d", i), QoS: 0}) {
			t.Fatalf("subscription %d replaced one", i)
		}
		if i%5 == 0 && !x.Subscribe(Subscription{Client: "c", Filter: fmt.Sprintf("t/%d", i), QoS: 1}) {
			t.Fatalf("subscription %d not replaced", i)
		}
	}
	if got := len(x.Subscriptions("c")); got != n {
		t.Fatalf("%d subscriptions, want %d", got, n)
	}
	var ms Matches
	x.Match("t/10", "", &ms)
	if len(ms.Direct) != 1 || ms.Direct[0].QoS != 1 {
		t.Fatalf("match t/10: %+v", ms.Direct)
	}
	for i := 0; i < n; i += 2 {
		if !x.Unsubscribe("c", fmt.Sprintf("t/%d", i), "") {
			t.Fatalf("unsubscribe %d", i)
		}
	}
	if got := len(x.Subscriptions("c")); got != n/2 {
		t.Fatalf("%d subscriptions after removing half, want %d", got, n/2)
	}
	if got := x.RemoveClient("c"); got != n/2 {
		t.Fatalf("RemoveClient removed %d, want %d", got, n/2)
	}
	if x.Len() != 0 || len(x.Subscriptions("c")) != 0 {
		t.Fatalf("left %d subscriptions", x.Len())
	}
}

func TestIndexOnFilter(t *testing.T) {
	var got []string
	x := NewIndex()
	x.OnFilter = func(filter, group string, added bool) {
		sign := "-"
		if added {
			sign = "+"
		}
		got = append(got, sign+group+"|"+filter)
	}
	x.Subscribe(Subscription{Client: "a", Filter: "s/+"})
	x.Subscribe(Subscription{Client: "b", Filter: "s/+"})         // same filter: no change
	x.Subscribe(Subscription{Client: "a", Filter: "s/+", QoS: 1}) // replaced: no change
	x.Subscribe(Subscription{Client: "a", Filter: "s/+", Group: "g"})
	x.Subscribe(Subscription{Client: "b", Filter: "s/+", Group: "g"})
	x.Unsubscribe("a", "s/+", "")
	x.Unsubscribe("a", "s/+", "g")
	x.RemoveClient("b")
	want := []string{"+|s/+", "+g|s/+", "-|s/+", "-g|s/+"}
	if strings.Join(got, " ") != strings.Join(want, " ") {
		t.Fatalf("OnFilter calls %q, want %q", got, want)
	}
}
