package topics

import (
	"strings"
	"testing"
)

// FuzzMatch checks the validators against plainly written ones, Match
// against refMatch, and Index.Match and Retained.Match against Match, for
// a set of filters and a set of topics, one per line.
func FuzzMatch(f *testing.F) {
	var filters, topics []string
	for _, tc := range matchTests {
		filters = append(filters, tc.filter)
		topics = append(topics, tc.topic)
	}
	f.Add(strings.Join(filters, "\n"), strings.Join(topics, "\n"), byte(0))
	f.Add("#\n+\n+/+\n$share/g/#\n$share/g/a/+\n$share/h/a/+\na/#\n$SYS/#", "a\na/b\n$SYS/x\n/\n//", byte(1))
	f.Add("a/+/c\na/#\n+/b/#\n$share/g//\n$share/g", "a/b/c\na\na/b\n/a/b", byte(2))
	f.Add("a+\n#a\na/#/b\n\x00\n\xff", "a+\na#\n\xff", byte(3))
	f.Fuzz(func(t *testing.T, filterList, topicList string, publisher byte) {
		filterLines := lines(filterList)
		topicLines := lines(topicList)
		clients := []string{"c0", "c1", "c2"}

		x := NewIndex()
		live := map[subKey2]Subscription{}
		var valid []string // inner filters
		for i, line := range filterLines {
			if got, want := ValidFilter(line), refValidFilter(line); got != want {
				t.Fatalf("ValidFilter(%q) = %v, reference says %v", line, got, want)
			}
			group, inner, _, ok := ParseShared(line)
			if !ok {
				continue
			}
			valid = append(valid, inner)
			s := Subscription{Client: clients[i%3], Filter: inner, Group: group, QoS: byte(i % 3),
				NoLocal: i%4 == 0, RetainAsPublished: i%2 == 1, ID: uint32(i % 5)}
			k := subKey2{s.Client, s.Filter, s.Group}
			_, had := live[k]
			if got := x.Subscribe(s); got != had {
				t.Fatalf("Subscribe(%+v) = %v, want %v", s, got, had)
			}
			live[k] = s
		}
		subs := make([]Subscription, 0, len(live))
		for _, s := range live {
			subs = append(subs, s)
		}

		r := NewRetained[int]()
		retained := map[string]int{}
		var m Matches
		for i, topic := range topicLines {
			if got, want := ValidTopicName(topic), validString(topic) && !strings.ContainsAny(topic, "+#"); got != want {
				t.Fatalf("ValidTopicName(%q) = %v, want %v", topic, got, want)
			}
			if !ValidTopicName(topic) {
				continue
			}
			for _, filter := range valid {
				if got, want := Match(filter, topic), refMatch(filter, topic); got != want {
					t.Fatalf("Match(%q, %q) = %v, refMatch says %v", filter, topic, got, want)
				}
			}
			checkIndexMatch(t, x, &m, subs, topic, clients[int(publisher)%len(clients)])
			r.Set(topic, i)
			retained[topic] = i
		}
		for _, filter := range valid {
			checkRetainedMatch(t, r, retained, filter)
		}

		for _, s := range subs {
			if !x.Unsubscribe(s.Client, s.Filter, s.Group) {
				t.Fatalf("Unsubscribe(%+v) = false", s)
			}
		}
		for topic := range retained {
			r.Delete(topic)
		}
		if x.Len() != 0 || countNodes(t, x) != 0 || r.Len() != 0 || r.nodes != 0 {
			t.Fatalf("not empty after removing everything: index %d/%d, retained %d/%d", x.Len(), x.nodes, r.Len(), r.nodes)
		}
	})
}

// lines splits s at newlines, at most 64 of them, to bound the work of one
// input.
func lines(s string) []string {
	l := strings.Split(s, "\n")
	return l[:min(len(l), 64)]
}
