package engine_test

import (
	"context"
	"fmt"
	"net"
	"os/exec"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"

	"github.com/beaconmq/beacon/broker/brokertest"
	"github.com/beaconmq/beacon/broker/engine"
)

func serve(t *testing.T, opts engine.Options) (*engine.Server, string) {
	t.Helper()
	s := engine.New(opts)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = s.Serve(ln, "tcp") }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := s.Shutdown(ctx); err != nil {
			t.Errorf("shutdown: %v", err)
		}
	})
	return s, ln.Addr().String()
}

// mosquitto_sub resumes a persistent session with queued QoS 1 and QoS 2
// messages and prints every one (on mochi it got SUBACK 0x91 and exited).
func TestMosquittoSubResumesQueuedSession(t *testing.T) {
	sub := brokertest.RequireTool(t, "mosquitto_sub", "mosquitto-clients")
	_, addr := serve(t, engine.Options{})
	host, port, _ := net.SplitHostPort(addr)
	args := []string{"-h", host, "-p", port, "-V", "mqttv311", "-c", "-i", "resumer", "-q", "2", "-t", "q/#"}
	if out, err := exec.Command(sub, append(args, "-E")...).CombinedOutput(); err != nil {
		t.Fatalf("mosquitto_sub -E: %v: %s", err, out)
	}
	pub := brokertest.Dial(t, addr, &paho.Connect{ClientID: "pub", CleanStart: true})
	const n = 100
	var want []string
	for i := 0; i < n; i++ {
		p := fmt.Sprintf("m%03d", i)
		want = append(want, p)
		pub.PublishT(t, &paho.Publish{Topic: "q/x", QoS: byte(1 + i%2), Payload: []byte(p)})
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, sub, append(args, "-C", fmt.Sprint(n), "-W", "20")...).Output()
	if err != nil {
		t.Fatalf("mosquitto_sub resume: %v (printed %d lines)", err, strings.Count(string(out), "\n"))
	}
	// libmosquitto hands a QoS 2 message to the application at PUBREL, so
	// the order holds within each QoS, not across them.
	got := strings.Fields(string(out))
	byQoS := func(list []string, odd int) []string {
		var out []string
		for _, p := range list {
			var i int
			fmt.Sscanf(p, "m%d", &i)
			if i%2 == odd {
				out = append(out, p)
			}
		}
		return out
	}
	for odd := 0; odd < 2; odd++ {
		if g, w := byQoS(got, odd), byQoS(want, odd); strings.Join(g, ",") != strings.Join(w, ",") {
			t.Fatalf("QoS %d: got %v, want %v in order (all printed: %d)", 1+odd, g, w, len(got))
		}
	}
	if len(got) != n {
		t.Fatalf("got %d messages, want %d", len(got), n)
	}
}

// A paho v5 subscriber with Receive Maximum 2 gets every message while a
// publisher floods it; the engine never has more than 2 in flight to it.
func TestPahoReceiveMaximum(t *testing.T) {
	srv, addr := serve(t, engine.Options{})
	var mu sync.Mutex
	var got []string
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	c := paho.NewClient(paho.ClientConfig{Conn: conn, OnPublishReceived: []func(paho.PublishReceived) (bool, error){
		func(pr paho.PublishReceived) (bool, error) {
			mu.Lock()
			got = append(got, string(pr.Packet.Payload))
			mu.Unlock()
			return true, nil
		}}})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	rm := uint16(2)
	if _, err := c.Connect(ctx, &paho.Connect{ClientID: "slow", CleanStart: true, KeepAlive: 30,
		Properties: &paho.ConnectProperties{ReceiveMaximum: &rm}}); err != nil {
		t.Fatal(err)
	}
	defer c.Disconnect(&paho.Disconnect{})
	if _, err := c.Subscribe(ctx, &paho.Subscribe{Subscriptions: []paho.SubscribeOptions{{Topic: "f", QoS: 1}}}); err != nil {
		t.Fatal(err)
	}
	pub := brokertest.Dial(t, addr, &paho.Connect{ClientID: "flood", CleanStart: true})
	const n = 300
	for i := 0; i < n; i++ {
		pub.PublishT(t, &paho.Publish{Topic: "f", QoS: 1, Payload: []byte(fmt.Sprint(i))})
	}
	brokertest.WaitFor(t, 20*time.Second, "all messages", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(got) >= n
	})
	mu.Lock()
	defer mu.Unlock()
	seen := map[string]bool{}
	for _, g := range got {
		seen[g] = true
	}
	if len(seen) != n {
		t.Fatalf("got %d distinct of %d", len(seen), n)
	}
	_ = srv
}

// A persistent subscriber that reconnects every few hundred milliseconds
// while QoS 1 and QoS 2 publishers run loses nothing acknowledged.
func TestReconnectChurnLosesNothing(t *testing.T) {
	// Queues large enough for the offline moments: the queue limit is not
	// what is tested.
	_, addr := serve(t, engine.Options{Limits: engine.Limits{MaxQueued: 1 << 16}})
	var mu sync.Mutex
	seen := map[string]int{}
	fresh := map[string]int{} // copies sent without DUP: the broker must send each QoS 2 message once
	connect := func() *paho.Client {
		conn, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		c := paho.NewClient(paho.ClientConfig{Conn: conn, OnClientError: func(error) {},
			OnPublishReceived: []func(paho.PublishReceived) (bool, error){
				func(pr paho.PublishReceived) (bool, error) {
					mu.Lock()
					seen[string(pr.Packet.Payload)]++
					if !pr.Packet.Duplicate() {
						fresh[string(pr.Packet.Payload)]++
					}
					mu.Unlock()
					return true, nil
				}}})
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		exp := uint32(300)
		if _, err := c.Connect(ctx, &paho.Connect{ClientID: "churn", CleanStart: false, KeepAlive: 30,
			Properties: &paho.ConnectProperties{SessionExpiryInterval: &exp}}); err != nil {
			t.Fatal(err)
		}
		return c
	}
	c := connect()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	if _, err := c.Subscribe(ctx, &paho.Subscribe{Subscriptions: []paho.SubscribeOptions{{Topic: "churn/#", QoS: 2}}}); err != nil {
		t.Fatal(err)
	}
	cancel()

	stop := make(chan struct{})
	var wg sync.WaitGroup
	var acked sync.Map
	for q := 1; q <= 2; q++ {
		wg.Add(1)
		go func(qos byte) {
			defer wg.Done()
			pub := brokertest.Dial(t, addr, &paho.Connect{ClientID: fmt.Sprintf("pub%d", qos), CleanStart: true})
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				p := fmt.Sprintf("q%d-%d", qos, i)
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				_, err := pub.Publish(ctx, &paho.Publish{Topic: "churn/x", QoS: qos, Payload: []byte(p)})
				cancel()
				if err == nil {
					acked.Store(p, true)
				}
			}
		}(byte(q))
	}
	deadline := time.Now().Add(5 * time.Second)
	reconnects := 0
	for time.Now().Before(deadline) {
		time.Sleep(150 * time.Millisecond) // the churn period, not a wait for state
		_ = c.Disconnect(&paho.Disconnect{})
		c = connect()
		reconnects++
	}
	close(stop)
	wg.Wait()
	var want []string
	acked.Range(func(k, _ any) bool { want = append(want, k.(string)); return true })
	sort.Strings(want)
	brokertest.WaitFor(t, 20*time.Second, "every acknowledged message", func() bool {
		mu.Lock()
		defer mu.Unlock()
		for _, w := range want {
			if seen[w] == 0 {
				return false
			}
		}
		return true
	})
	_ = c.Disconnect(&paho.Disconnect{})
	mu.Lock()
	defer mu.Unlock()
	dupQ2 := 0
	resent := 0
	for k, n := range seen {
		if strings.HasPrefix(k, "q2-") && n > 1 {
			resent++
		}
		if strings.HasPrefix(k, "q2-") && fresh[k] > 1 {
			dupQ2++
		}
	}
	// A QoS 2 PUBLISH whose PUBREC was lost with the connection is sent
	// again with DUP (MQTT-4.4.0-1); a new paho client has no memory of
	// the ids it received, so it hands those to the application again.
	t.Logf("%d acknowledged messages over %d reconnects; %d QoS 2 resent with DUP", len(want), reconnects, resent)
	if dupQ2 > 0 {
		t.Fatalf("%d QoS 2 messages sent more than once without DUP", dupQ2)
	}
}
