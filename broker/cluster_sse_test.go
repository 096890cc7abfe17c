package broker_test

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"

	"github.com/beaconmq/beacon/broker"
	bt "github.com/beaconmq/beacon/broker/brokertest"
	"github.com/beaconmq/beacon/broker/cluster/clustertest"
)

// sseMsg is a message event of a stream: its event id and payload.
type sseMsg struct{ id, payload, msgID string }

// readMessages reads message events from s until want payloads came
// (any order), failing on a duplicate; it returns them in order. A ready
// event among them is kept in ready.
func readMessages(t *testing.T, s *bt.SSE, want []string) []sseMsg {
	msgs, _ := readMessagesReady(t, s, want)
	return msgs
}

func readMessagesReady(t *testing.T, s *bt.SSE, want []string) (got []sseMsg, ready *bt.Event) {
	t.Helper()
	left := map[string]bool{}
	for _, p := range want {
		left[p] = true
	}
	seen := map[string]bool{}
	for len(left) > 0 {
		ev := s.NextT(t, 20*time.Second)
		if ev.Name == "ready" && ready == nil {
			ready = &ev
			continue
		}
		if ev.Name != "message" {
			t.Fatalf("a %s event (%s) while %d messages were still to come: %v", ev.Name, ev.Data, len(left), slices.Sorted(maps.Keys(left)))
		}
		var env struct {
			ID      string
			Payload json.RawMessage
		}
		ev.JSON(t, &env)
		var p string
		if json.Unmarshal(env.Payload, &p) != nil {
			p = string(env.Payload)
		}
		if seen[p] {
			t.Fatalf("%q twice", p)
		}
		if !left[p] {
			t.Fatalf("%q unexpected (still to come: %v)", p, slices.Sorted(maps.Keys(left)))
		}
		seen[p] = true
		delete(left, p)
		got = append(got, sseMsg{id: ev.ID, payload: p, msgID: env.ID})
	}
	return got, ready
}

// publishEach publishes n messages on each node's client, alternating QoS
// 0 and 1, named <node>-<tag>-<i>; it returns the names.
func publishEach(t *testing.T, pubs map[string]*bt.Client, tag string, n int) []string {
	t.Helper()
	var names []string
	for i := range n {
		for _, node := range []string{"a", "b", "c"} {
			name := fmt.Sprintf("%s-%s-%d", node, tag, i)
			pubs[node].PublishT(t, &paho.Publish{Topic: "plant/" + node + "/temp", QoS: byte(i % 2), Payload: []byte(name)})
			names = append(names, name)
		}
	}
	return names
}

func openStream(t *testing.T, b *broker.Broker, lastID string) *bt.SSE {
	t.Helper()
	h := http.Header{}
	if lastID != "" {
		h.Set("Last-Event-ID", lastID)
	}
	s, resp := bt.OpenSSE(t, "http://"+b.HTTPAddr()+"/events?topic=plant/%23", h)
	if s == nil {
		t.Fatalf("GET /events on %s: %d", b.HTTPAddr(), resp.StatusCode)
	}
	return s
}

// An SSE reader follows messages of three nodes on b, goes away, and
// comes back on c with its last event id, then on a with an id from the
// middle of what it saw: each time it gets exactly what it had not seen,
// then the live messages, each once.
func TestClusterSSEResumesOnAnotherNode(t *testing.T) {
	rds := clustertest.StartRedis(t)
	nodes := map[string]*broker.Broker{}
	pubs := map[string]*bt.Client{}
	for _, id := range []string{"a", "b", "c"} {
		nodes[id] = bt.Start(t, clusterConfig(t, rds, id))
	}
	for _, id := range []string{"a", "b", "c"} {
		bt.WaitFor(t, 20*time.Second, id+" reaches Redis", func() bool { return nodes[id].ClusterRouter().Up() })
		pubs[id] = bt.Dial(t, nodes[id].MQTTAddr("tcp"), &paho.Connect{ClientID: "pub-" + id, CleanStart: true})
	}
	s := openStream(t, nodes["b"], "")
	s.Until(t, "ready", 10*time.Second)
	waitWants(t, nodes["a"], "plant/a/temp", "b")
	waitWants(t, nodes["c"], "plant/c/temp", "b")

	first := readMessages(t, s, publishEach(t, pubs, "live", 20))
	s.Close()
	for _, m := range first {
		if !strings.HasPrefix(m.id, "c1~") {
			t.Fatalf("event id %q is not a cluster cursor", m.id)
		}
	}
	// Nobody follows plant/# now: what is published meanwhile is only in
	// each publisher's node.
	gap := publishEach(t, pubs, "gap", 10)

	// Another reader on c keeps c following plant/#: a forwards to c
	// throughout, and what a accepts while the replay's end is taken
	// arrives both ways.
	keeper := openStream(t, nodes["c"], "")
	keeper.Until(t, "ready", 10*time.Second)
	waitWants(t, nodes["a"], "plant/a/temp", "c")
	const cont = 300
	published := make(chan error, 1)
	go func() {
		for i := range cont {
			_, err := pubs["a"].Publish(context.Background(), &paho.Publish{Topic: "plant/a/temp", QoS: byte(i % 2), Payload: []byte(fmt.Sprintf("a-cont-%d", i))})
			if err != nil {
				published <- err
				return
			}
			time.Sleep(2 * time.Millisecond)
		}
		published <- nil
	}()
	time.Sleep(100 * time.Millisecond)
	s = openStream(t, nodes["c"], first[len(first)-1].id)
	if err := <-published; err != nil {
		t.Fatal(err)
	}
	var contNames []string
	for i := range cont {
		contNames = append(contNames, fmt.Sprintf("a-cont-%d", i))
	}
	var replayed []sseMsg
	msgs, ready := readMessagesReady(t, s, append(slices.Clone(gap), contNames...))
	for _, m := range msgs {
		if !strings.Contains(m.payload, "-cont-") {
			replayed = append(replayed, m)
		}
	}
	keeper.Close()
	if ready == nil {
		_, ev := s.Until(t, "ready", 10*time.Second)
		ready = &ev
	}
	var rd struct {
		LastEventID string `json:"last_event_id"`
	}
	ready.JSON(t, &rd)
	if rd.LastEventID != ready.ID || ready.ID == "" {
		t.Fatalf("ready: id %q, last_event_id %q", ready.ID, rd.LastEventID)
	}
	// Replayed in time order across nodes, each node's in its order.
	for _, node := range []string{"a", "b", "c"} {
		next := 0
		for _, m := range replayed {
			if strings.HasPrefix(m.payload, node+"-") {
				if m.payload != fmt.Sprintf("%s-gap-%d", node, next) {
					t.Fatalf("replay from %s: %q, want %s-gap-%d next", node, m.payload, node, next)
				}
				next++
			}
		}
	}
	waitWants(t, nodes["a"], "plant/a/temp", "c")
	waitWants(t, nodes["b"], "plant/b/temp", "c")
	after := readMessages(t, s, publishEach(t, pubs, "after", 10))
	s.Close()

	// From the middle of the first stream, on a: the rest of it, the gap
	// and what came after.
	mid := len(first) / 2
	var want []string
	for _, m := range first[mid+1:] {
		want = append(want, m.payload)
	}
	want = append(want, gap...)
	want = append(want, contNames...)
	for _, m := range after {
		want = append(want, m.payload)
	}
	s = openStream(t, nodes["a"], first[mid].id)
	// A message keeps its id in the cluster, live or replayed, on any node.
	ids := map[string]string{}
	for _, m := range append(append(slices.Clone(first), msgs...), after...) {
		ids[m.payload] = m.msgID
	}
	for _, m := range readMessages(t, s, want) {
		if ids[m.payload] != m.msgID || !strings.HasPrefix(m.msgID, m.payload[:1]+"/") {
			t.Fatalf("%s replayed on a with id %q; it was %q", m.payload, m.msgID, ids[m.payload])
		}
	}
	s.Until(t, "ready", 10*time.Second)
	s.Close()

	// A long-poll on a, from the last id the stream on c gave: nothing
	// new, then what is published next.
	poll := func(node *broker.Broker, cursor string) (msgs []string, next string, resetNodes []string) {
		t.Helper()
		resp, err := http.Get("http://" + node.HTTPAddr() + "/poll?topic=plant/%23&wait=5&cursor=" + url.QueryEscape(cursor))
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var body struct {
			Messages []struct{ Payload json.RawMessage }
			Cursor   string
			Reset    string
			Nodes    []struct{ Node string } `json:"reset_nodes"`
		}
		if resp.StatusCode != 200 || json.NewDecoder(resp.Body).Decode(&body) != nil || body.Reset != "" {
			t.Fatalf("poll: %d %+v", resp.StatusCode, body)
		}
		for _, m := range body.Messages {
			var p string
			_ = json.Unmarshal(m.Payload, &p)
			msgs = append(msgs, p)
		}
		for _, n := range body.Nodes {
			resetNodes = append(resetNodes, n.Node)
		}
		return msgs, body.Cursor, resetNodes
	}
	cursor := after[len(after)-1].id
	done := make(chan []string, 1)
	go func() {
		msgs, _, _ := poll(nodes["a"], cursor)
		done <- msgs
	}()
	time.Sleep(500 * time.Millisecond) // the poll waits (a test of nothing if not yet: it then replays it)
	pubs["c"].PublishT(t, &paho.Publish{Topic: "plant/c/temp", QoS: 1, Payload: []byte("polled")})
	if got := <-done; !slices.Equal(got, []string{"polled"}) {
		t.Fatalf("poll on a got %q, want [polled]", got)
	}

	// A node that is gone: its part is not replayed, and the reader is
	// told.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := nodes["a"].Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	bt.WaitFor(t, 20*time.Second, "b sees a down", func() bool { return !nodes["b"].ClusterRouter().NodeUp("a") })
	pubs["c"].PublishT(t, &paho.Publish{Topic: "plant/c/temp", QoS: 1, Payload: []byte("while-a-down")})
	polled, _, resets := poll(nodes["b"], cursor)
	if !slices.Equal(polled, []string{"polled", "while-a-down"}) || !slices.Equal(resets, []string{"a"}) {
		t.Fatalf("poll on b with a down: %q, reset nodes %q", polled, resets)
	}
}

// Cursors a reader cannot have been given, and many readers at once: a
// node's part past its head is reset and then heals, nodes the cluster
// does not have are dropped (asked nothing), and hundreds of polls
// resuming at once are all answered by the other node.
func TestClusterCursorEdges(t *testing.T) {
	rds := clustertest.StartRedis(t)
	cb := clusterConfig(t, rds, "b")
	cb.HTTP.SSEMaxStreamsPerIP, cb.HTTP.SSEMaxStreamsPerPrincipal, cb.HTTP.MaxConnsPerIP = 0, 0, 0
	a := bt.Start(t, clusterConfig(t, rds, "a"))
	b := bt.Start(t, cb)
	bt.WaitFor(t, 20*time.Second, "both reach Redis", func() bool { return a.ClusterRouter().Up() && b.ClusterRouter().Up() })
	bt.WaitFor(t, 20*time.Second, "b knows a", func() bool { return slices.Contains(b.ClusterRouter().Nodes(), "a") })
	pub := bt.Dial(t, a.MQTTAddr("tcp"), &paho.Connect{ClientID: "pub-a", CleanStart: true})
	s := openStream(t, b, "")
	s.Until(t, "ready", 10*time.Second)
	waitWants(t, a, "plant/a/temp", "b")
	pub.PublishT(t, &paho.Publish{Topic: "plant/a/temp", QoS: 1, Payload: []byte("first")})
	cur := readMessages(t, s, []string{"first"})[0].id
	s.Close()

	type pollBody struct {
		Messages []struct{ Payload json.RawMessage }
		Cursor   string
		Reset    string
		Nodes    []struct{ Node, Reason string } `json:"reset_nodes"`
	}
	poll := func(cursor string) pollBody {
		t.Helper()
		resp, err := http.Get("http://" + b.HTTPAddr() + "/poll?topic=plant/%23&wait=0&cursor=" + url.QueryEscape(cursor))
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var body pollBody
		if resp.StatusCode != 200 || json.NewDecoder(resp.Body).Decode(&body) != nil {
			t.Fatalf("poll: %d", resp.StatusCode)
		}
		return body
	}

	// a's part far past a's head: reset once, then it follows a again.
	parts := strings.Split(cur, "~")
	for i, p := range parts {
		if strings.HasPrefix(p, "a:") {
			f := strings.Split(p, ":")
			parts[i] = f[0] + ":" + f[1] + ":zzzzzz"
		}
	}
	got := poll(strings.Join(parts, "~"))
	if len(got.Nodes) != 1 || got.Nodes[0].Node != "a" || got.Nodes[0].Reason != "unknown" {
		t.Fatalf("a cursor past a's head: %+v", got)
	}
	pub.PublishT(t, &paho.Publish{Topic: "plant/a/temp", QoS: 1, Payload: []byte(`"healed"`)})
	if next := poll(got.Cursor); len(next.Nodes) != 0 || len(next.Messages) != 1 || string(next.Messages[0].Payload) != `"healed"` {
		t.Fatalf("after the reset: %+v", next)
	}

	// Nodes the cluster does not have: not asked, and gone from the cursor.
	fake := cur
	for i := range 20 {
		fake += fmt.Sprintf("~ghost%d:1:5", i)
	}
	got = poll(fake)
	if len(got.Nodes) != 0 || strings.Contains(got.Cursor, "ghost") || len(got.Messages) != 1 {
		t.Fatalf("a cursor naming nodes that are not: %+v", got)
	}

	// Many readers resuming at once: a answers every one.
	var wg sync.WaitGroup
	errs := make(chan string, 300)
	for range 300 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			resp, err := http.Get("http://" + b.HTTPAddr() + "/poll?topic=plant/%23&wait=0&cursor=" + url.QueryEscape(cur))
			if err != nil {
				errs <- err.Error()
				return
			}
			defer resp.Body.Close()
			var body pollBody
			if err := json.NewDecoder(resp.Body).Decode(&body); err != nil || resp.StatusCode != 200 || len(body.Nodes) != 0 || len(body.Messages) != 1 {
				errs <- fmt.Sprintf("%d %+v %v", resp.StatusCode, body, err)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for e := range errs {
		t.Fatalf("one of 300 polls at once: %s", e)
	}
}
