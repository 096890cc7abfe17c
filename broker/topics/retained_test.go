package topics

import (
	"fmt"
	"maps"
	"math/rand/v2"
	"slices"
	"sync"
	"testing"
	"unsafe"
)

// retainedMatches returns the topics and values r.Match(filter) reports,
// failing on a topic reported twice.
func retainedMatches[V any](t *testing.T, r *Retained[V], filter string) map[string]V {
	t.Helper()
	got := map[string]V{}
	r.Match(filter, func(topic string, v V) bool {
		if _, dup := got[topic]; dup {
			t.Fatalf("Match(%q) reported %q twice", filter, topic)
		}
		got[topic] = v
		return true
	})
	return got
}

// checkRetainedMatch compares r.Match(filter) with Match over topics.
func checkRetainedMatch(t *testing.T, r *Retained[int], topics map[string]int, filter string) {
	t.Helper()
	want := map[string]int{}
	for topic, v := range topics {
		if Match(filter, topic) {
			want[topic] = v
		}
	}
	if got := retainedMatches(t, r, filter); !maps.Equal(got, want) {
		t.Fatalf("Match(%q) =\n %v\nwant\n %v", filter, got, want)
	}
}

func TestRetainedMatchRules(t *testing.T) {
	for _, tc := range matchTests {
		t.Run(tc.filter+" "+tc.topic, func(t *testing.T) {
			r := NewRetained[int]()
			r.Set(tc.topic, 1)
			// Neighbours that only a broken walk would report.
			r.Set(tc.topic+"/x", 2)
			r.Set("x/"+tc.topic, 3)
			_, got := retainedMatches(t, r, tc.filter)[tc.topic]
			if got != tc.want {
				t.Errorf("filter %q, topic %q: match %v, want %v", tc.filter, tc.topic, got, tc.want)
			}
			checkRetainedMatch(t, r, map[string]int{tc.topic: 1, tc.topic + "/x": 2, "x/" + tc.topic: 3}, tc.filter)
		})
	}
}

func TestRetained(t *testing.T) {
	r := NewRetained[string]()
	r.Set("a/b", "1")
	r.Set("a/b", "2")
	r.Set("a", "3")
	r.Set("a/b/c/d", "4")
	if r.Len() != 3 {
		t.Fatalf("Len = %d, want 3", r.Len())
	}
	tests := []struct {
		topic string
		want  string
		ok    bool
	}{
		{"a/b", "2", true},
		{"a", "3", true},
		{"a/b/c/d", "4", true},
		{"a/b/c", "", false}, // a node, no value
		{"a/x", "", false},
		{"b", "", false},
		{"a/+", "", false}, // Get is no filter
	}
	for _, tc := range tests {
		t.Run("get "+tc.topic, func(t *testing.T) {
			if v, ok := r.Get(tc.topic); v != tc.want || ok != tc.ok {
				t.Fatalf("Get(%q) = %q, %v, want %q, %v", tc.topic, v, ok, tc.want, tc.ok)
			}
		})
	}
	if r.Delete("a/b/c") || r.Delete("zz") {
		t.Fatal("Delete of a topic without a value reported true")
	}
	if got := retainedMatches(t, r, "a/+/c/#"); !maps.Equal(got, map[string]string{"a/b/c/d": "4"}) {
		t.Fatalf("Match(a/+/c/#) = %v", got)
	}
	for _, topic := range []string{"a/b/c/d", "a", "a/b"} {
		if !r.Delete(topic) {
			t.Fatalf("Delete(%q) = false", topic)
		}
	}
	if r.Len() != 0 || r.nodes != 0 || r.root.children != nil {
		t.Fatalf("not empty: Len %d, nodes %d", r.Len(), r.nodes)
	}
	if got := retainedMatches(t, r, "#"); len(got) != 0 {
		t.Fatalf("Match(#) on empty = %v", got)
	}
}

func TestRetainedMatch(t *testing.T) {
	r := NewRetained[int]()
	topics := map[string]int{}
	for i, topic := range []string{"a", "a/b", "a/b/c", "a/c", "/", "/a", "", "$SYS/up", "$SYS", "a/$x", "b//c"} {
		if topic == "" {
			continue
		}
		r.Set(topic, i)
		topics[topic] = i
	}
	for _, filter := range []string{"#", "+", "+/+", "a/#", "a/+", "a/+/+", "+/b/#", "/#", "$SYS/#", "$SYS/+", "$SYS",
		"+/$x", "b/+/c", "b/#", "a/b/c/#", "x/#", "a/b", "c"} {
		t.Run(filter, func(t *testing.T) { checkRetainedMatch(t, r, topics, filter) })
	}
	t.Run("invalid filter", func(t *testing.T) {
		for _, filter := range []string{"", "a/#/b", "a+", "#a"} {
			if got := retainedMatches(t, r, filter); len(got) != 0 {
				t.Fatalf("Match(%q) = %v", filter, got)
			}
		}
	})
	t.Run("stop", func(t *testing.T) {
		calls := 0
		r.Match("#", func(string, int) bool { calls++; return calls < 3 })
		if calls != 3 {
			t.Fatalf("fn called %d times after returning false at the third", calls)
		}
	})
	t.Run("fn may change the index", func(t *testing.T) {
		r.Match("a/#", func(topic string, v int) bool {
			r.Delete(topic)
			r.Set("moved/"+topic, v)
			return true
		})
		if got := retainedMatches(t, r, "a/#"); len(got) != 0 {
			t.Fatalf("a/# after moving = %v", got)
		}
		if got := retainedMatches(t, r, "moved/#"); len(got) != 5 {
			t.Fatalf("moved/# = %v", got)
		}
	})
}

// TestRetainedRandomized sets and deletes topics at random, from a fixed
// seed, checks Match against Match over every topic, and that the trie is
// empty once every topic is deleted.
func TestRetainedRandomized(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	levels := []string{"a", "b", "c", "", "$SYS"}
	filterLevels := append(slices.Clone(levels), "+", "+", "#")
	join := func(alphabet []string, max int) string {
		s := ""
		for i := range 1 + rng.IntN(max) {
			if i > 0 {
				s += "/"
			}
			s += alphabet[rng.IntN(len(alphabet))]
		}
		return s
	}
	r := NewRetained[int]()
	topics := map[string]int{}
	for step := range 10000 {
		topic := join(levels, 5)
		if rng.IntN(3) > 0 {
			r.Set(topic, step)
			topics[topic] = step
		} else {
			_, had := topics[topic]
			if got := r.Delete(topic); got != had {
				t.Fatalf("step %d: Delete(%q) = %v, want %v", step, topic, got, had)
			}
			delete(topics, topic)
		}
		if step%25 == 0 {
			if filter := join(filterLevels, 5); ValidFilter(filter) {
				checkRetainedMatch(t, r, topics, filter)
			}
			if r.Len() != len(topics) {
				t.Fatalf("step %d: Len = %d, want %d", step, r.Len(), len(topics))
			}
		}
	}
	for topic := range topics {
		r.Delete(topic)
	}
	if r.Len() != 0 || r.nodes != 0 || r.root.children != nil {
		t.Fatalf("not empty: Len %d, nodes %d", r.Len(), r.nodes)
	}
}

func TestRetainedConcurrent(t *testing.T) {
	r := NewRetained[int]()
	var wg sync.WaitGroup
	for w := range 4 {
		wg.Go(func() {
			for i := range 3000 {
				topic := fmt.Sprintf("s/%d/%d", w, i%50)
				r.Set(topic, i)
				if i%2 == 0 {
					r.Delete(topic)
				}
			}
			for i := range 50 {
				r.Delete(fmt.Sprintf("s/%d/%d", w, i))
			}
		})
		wg.Go(func() {
			for i := range 3000 {
				r.Match(fmt.Sprintf("s/+/%d", i%50), func(string, int) bool { return true })
				r.Get(fmt.Sprintf("s/%d/%d", w, i%50))
			}
		})
	}
	wg.Wait()
	if r.Len() != 0 || r.nodes != 0 {
		t.Fatalf("not empty: Len %d, nodes %d", r.Len(), r.nodes)
	}
}

func TestRetainedClonesStrings(t *testing.T) {
	buf := []byte("a/b/c")
	r := NewRetained[int]()
	r.Set(unsafe.String(&buf[0], len(buf)), 1)
	copy(buf, "x/y/z")
	if got := retainedMatches(t, r, "#"); !maps.Equal(got, map[string]int{"a/b/c": 1}) {
		t.Fatalf("Match(#) = %v", got)
	}
	if _, ok := r.Get("a/b/c"); !ok {
		t.Fatal("Get(a/b/c) after the buffer changed: missing")
	}
}

func TestRetainedMatchDoesNotAllocate(t *testing.T) {
	if raceEnabled {
		t.Skip("sync.Pool drops items under the race detector")
	}
	r := NewRetained[int]()
	for i := range 100 {
		r.Set(fmt.Sprintf("d/%d/state", i), i)
	}
	sum := 0
	fn := func(_ string, v int) bool { sum += v; return true }
	r.Match("d/+/state", fn)
	if allocs := testing.AllocsPerRun(100, func() { r.Match("d/+/state", fn) }); allocs > 0.1 {
		t.Fatalf("Match allocates %.2f times per call", allocs)
	}
}
