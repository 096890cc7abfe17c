package main

import (
	"bufio"
	"context"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/eclipse/paho.golang/paho"
)

const benchUsage = `Usage: beacon bench SCENARIO [flags]

A load generator for any MQTT broker (MQTT 5, paho.golang).

Scenarios:
  fanin        --clients publishers -> 1 wildcard subscriber
  fanout       1 publisher -> --clients subscribers
  pairs        --clients publisher/subscriber pairs, one topic each
  connections  --clients idle clients with keep-alive; with --pid, the broker's RSS per connection
  sse          1 MQTT publisher -> --clients SSE streams on Beacon's /events (--http)
  compare      the scenarios above against Mosquitto and Beacon side by side (see make bench-compare)

Flags:
`

// benchConfig is one run.
type benchConfig struct {
	Scenario string        `json:"scenario"`
	Addr     string        `json:"addr"`
	QoS      byte          `json:"qos"`
	Size     int           `json:"size"`
	Rate     int           `json:"rate"` // messages per second, all publishers together; 0 = as fast as possible
	Duration time.Duration `json:"duration"`
	Clients  int           `json:"clients"`
	Topic    string        `json:"topic"`
	Username string        `json:"-"`
	Password string        `json:"-"`
	PID      int           `json:"pid,omitempty"`
	HTTP     string        `json:"http,omitempty"` // Beacon's HTTP address, for sse
	Token    string        `json:"-"`              // JWT for the SSE streams
}

// benchResult is what a run measured.
type benchResult struct {
	Config       benchConfig `json:"config"`
	Published    int64       `json:"published"` // acknowledged for QoS 1/2
	Expected     int64       `json:"expected"`  // deliveries due: published x subscribers per message
	Delivered    int64       `json:"delivered"` // distinct deliveries
	Duplicates   int64       `json:"duplicates"`
	Lost         int64       `json:"lost"`
	Errors       int64       `json:"errors"`
	PublishedPS  float64     `json:"published_per_sec"`
	DeliveredPS  float64     `json:"delivered_per_sec"`
	LatencyP50   float64     `json:"latency_p50_ms"`
	LatencyP90   float64     `json:"latency_p90_ms"`
	LatencyP99   float64     `json:"latency_p99_ms"`
	LatencyMax   float64     `json:"latency_max_ms"`
	RSSPerConnKB float64     `json:"rss_per_conn_kib,omitempty"`
}

func runBench(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 || strings.HasPrefix(args[0], "-") || args[0] == "help" {
		fmt.Fprint(stdout, benchUsage)
		benchFlags(&benchConfig{}, new(bool), stdout).PrintDefaults()
		return 0
	}
	if args[0] == "compare" {
		return runCompare(args[1:], stdout, stderr)
	}
	cfg := benchConfig{Scenario: args[0]}
	asJSON := new(bool)
	fs := benchFlags(&cfg, asJSON, stderr)
	if err := fs.Parse(args[1:]); err != nil {
		return reportFlagErr(err, stderr)
	}
	res, err := bench(context.Background(), cfg)
	if err != nil {
		fmt.Fprintf(stderr, "beacon: bench: %v\n", err)
		return 1
	}
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		_ = enc.Encode(res)
	} else {
		printResult(stdout, res, isTerminal(stdout))
	}
	if res.Lost > 0 && res.Config.QoS > 0 {
		return 3
	}
	return 0
}

func benchFlags(cfg *benchConfig, asJSON *bool, out io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	fs.SetOutput(out)
	fs.StringVar(&cfg.Addr, "addr", "127.0.0.1:1883", "broker host:port")
	fs.Var(qosValue{&cfg.QoS}, "qos", "QoS of publishes and subscriptions (0, 1, 2)")
	fs.IntVar(&cfg.Size, "size", 64, "payload bytes (at least 20: send time, sequence, publisher)")
	fs.IntVar(&cfg.Rate, "rate", 0, "messages per second in total; 0 = as fast as the broker takes them")
	fs.DurationVar(&cfg.Duration, "duration", 10*time.Second, "how long to publish")
	fs.IntVar(&cfg.Clients, "clients", 100, "publishers (fanin), subscribers (fanout), pairs, or idle connections")
	fs.StringVar(&cfg.Topic, "topic", "bench", "topic prefix")
	fs.StringVar(&cfg.Username, "username", "", "MQTT username")
	fs.StringVar(&cfg.Password, "password", "", "MQTT password")
	fs.IntVar(&cfg.PID, "pid", 0, "broker process id, for RSS per connection (connections)")
	fs.StringVar(&cfg.HTTP, "http", "127.0.0.1:8080", "Beacon's HTTP address (sse)")
	fs.StringVar(&cfg.Token, "token", "", "JWT for the SSE streams (sse)")
	fs.BoolVar(asJSON, "json", false, "print the result as JSON")
	return fs
}

type qosValue struct{ q *byte }

func (v qosValue) String() string {
	if v.q == nil {
		return "0"
	}
	return strconv.Itoa(int(*v.q))
}

func (v qosValue) Set(s string) error {
	n, err := strconv.Atoi(s)
	if err != nil || n < 0 || n > 2 {
		return errors.New("qos is 0, 1 or 2")
	}
	*v.q = byte(n)
	return nil
}

func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	st, err := f.Stat()
	return err == nil && st.Mode()&os.ModeCharDevice != 0
}

func printResult(w io.Writer, r benchResult, color bool) {
	c := r.Config
	fmt.Fprintf(w, "%s qos=%d size=%d clients=%d rate=%s duration=%s against %s\n", c.Scenario, c.QoS, c.Size, c.Clients,
		rateString(c.Rate), c.Duration, c.Addr)
	if c.Scenario == "connections" {
		fmt.Fprintf(w, "  %d connections open", r.Delivered)
		if r.RSSPerConnKB > 0 {
			fmt.Fprintf(w, ", broker RSS %.2f KiB per connection", r.RSSPerConnKB)
		}
		fmt.Fprintf(w, ", %d errors\n", r.Errors)
		return
	}
	fmt.Fprintf(w, "  published  %10d  %10.0f msg/s\n", r.Published, r.PublishedPS)
	fmt.Fprintf(w, "  delivered  %10d  %10.0f msg/s  (of %d due)\n", r.Delivered, r.DeliveredPS, r.Expected)
	fmt.Fprintf(w, "  latency    p50 %.3f ms  p90 %.3f ms  p99 %.3f ms  max %.3f ms\n", r.LatencyP50, r.LatencyP90, r.LatencyP99, r.LatencyMax)
	fmt.Fprintf(w, "  duplicates %d, errors %d\n", r.Duplicates, r.Errors)
	switch {
	case r.Lost > 0 && c.QoS > 0:
		msg := fmt.Sprintf("  LOST %d QoS %d messages that the broker acknowledged", r.Lost, c.QoS)
		if color {
			msg = "\x1b[31m" + msg + "\x1b[0m"
		}
		fmt.Fprintln(w, msg)
	case r.Lost > 0:
		fmt.Fprintf(w, "  lost %d QoS 0 messages (%.1f%%)\n", r.Lost, 100*float64(r.Lost)/float64(max(r.Expected, 1)))
	default:
		fmt.Fprintln(w, "  lost 0")
	}
}

func rateString(r int) string {
	if r == 0 {
		return "max"
	}
	return strconv.Itoa(r) + "/s"
}

// receiver records deliveries: distinct (publisher, sequence) pairs per
// subscriber, duplicates and latencies.
type receiver struct {
	mu    sync.Mutex
	seen  map[uint64]uint8
	lat   []float64 // ms
	dups  int64
	count atomic.Int64
	last  atomic.Int64 // unix nanos of the last delivery
}

func newReceiver() *receiver { return &receiver{seen: map[uint64]uint8{}} }

func (r *receiver) handle(sub int) func(paho.PublishReceived) (bool, error) {
	return func(pr paho.PublishReceived) (bool, error) {
		r.record(sub, pr.Packet.Payload)
		return true, nil
	}
}

// record counts one delivery of a bench payload to subscriber sub.
func (r *receiver) record(sub int, p []byte) {
	now := time.Now()
	if len(p) < 20 {
		return
	}
	sent := int64(binary.BigEndian.Uint64(p))
	seq := binary.BigEndian.Uint64(p[8:]) & (1<<40 - 1)
	pub := uint64(binary.BigEndian.Uint32(p[16:]))
	key := uint64(sub)<<52 | pub<<40 | seq
	r.mu.Lock()
	if r.seen[key] > 0 {
		r.dups++
	} else {
		r.lat = append(r.lat, float64(now.UnixNano()-sent)/1e6)
	}
	r.seen[key]++
	r.mu.Unlock()
	r.count.Add(1)
	r.last.Store(now.UnixNano())
}

func benchConnect(ctx context.Context, cfg benchConfig, id string, recv func(paho.PublishReceived) (bool, error)) (*paho.Client, error) {
	conn, err := net.DialTimeout("tcp", cfg.Addr, 10*time.Second)
	if err != nil {
		return nil, err
	}
	cc := paho.ClientConfig{Conn: conn, OnClientError: func(error) {}, PacketTimeout: 30 * time.Second}
	if recv != nil {
		cc.OnPublishReceived = []func(paho.PublishReceived) (bool, error){recv}
	}
	c := paho.NewClient(cc)
	cp := &paho.Connect{ClientID: id, CleanStart: true, KeepAlive: 60}
	if cfg.Username != "" {
		cp.Username, cp.UsernameFlag = cfg.Username, true
		cp.Password, cp.PasswordFlag = []byte(cfg.Password), true
	}
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if _, err := c.Connect(cctx, cp); err != nil {
		_ = conn.Close()
		return nil, fmt.Errorf("connect %s: %w", id, err)
	}
	return c, nil
}

func bench(ctx context.Context, cfg benchConfig) (benchResult, error) {
	if cfg.Size < 20 {
		cfg.Size = 20
	}
	if cfg.Clients < 1 {
		return benchResult{}, errors.New("--clients must be at least 1")
	}
	if cfg.Scenario == "connections" {
		return benchConnections(ctx, cfg)
	}
	run := fmt.Sprintf("%x", time.Now().UnixNano()&0xffffff)
	prefix := cfg.Topic + "/" + run
	var pubs, subs int
	var pubTopic func(i int) string
	var subFilters func(i int) string
	switch cfg.Scenario {
	case "fanin":
		pubs, subs = cfg.Clients, 1
		pubTopic = func(i int) string { return fmt.Sprintf("%s/%d", prefix, i) }
		subFilters = func(int) string { return prefix + "/#" }
	case "fanout":
		pubs, subs = 1, cfg.Clients
		pubTopic = func(int) string { return prefix + "/all" }
		subFilters = func(int) string { return prefix + "/all" }
	case "pairs":
		pubs, subs = cfg.Clients, cfg.Clients
		pubTopic = func(i int) string { return fmt.Sprintf("%s/%d", prefix, i) }
		subFilters = func(i int) string { return fmt.Sprintf("%s/%d", prefix, i) }
	case "sse":
		pubs, subs = 1, cfg.Clients
		pubTopic = func(int) string { return prefix + "/all" }
		subFilters = func(int) string { return prefix + "/all" }
	default:
		return benchResult{}, fmt.Errorf("unknown scenario %q (fanin, fanout, pairs, connections, sse, compare)", cfg.Scenario)
	}
	recv := newReceiver()
	var clients []*paho.Client
	defer func() {
		for _, c := range clients {
			_ = c.Disconnect(&paho.Disconnect{})
		}
	}()
	sseCtx, stopSSE := context.WithCancel(ctx)
	defer stopSSE()
	for i := range subs {
		if cfg.Scenario == "sse" {
			if err := sseSubscribe(sseCtx, cfg, subFilters(i), recv, i); err != nil {
				return benchResult{}, err
			}
			continue
		}
		c, err := benchConnect(ctx, cfg, fmt.Sprintf("bench-sub-%s-%d", run, i), recv.handle(i))
		if err != nil {
			return benchResult{}, err
		}
		clients = append(clients, c)
		sctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		_, err = c.Subscribe(sctx, &paho.Subscribe{Subscriptions: []paho.SubscribeOptions{{Topic: subFilters(i), QoS: cfg.QoS}}})
		cancel()
		if err != nil {
			return benchResult{}, fmt.Errorf("subscribe: %w", err)
		}
	}
	publishers := make([]*paho.Client, pubs)
	for i := range pubs {
		c, err := benchConnect(ctx, cfg, fmt.Sprintf("bench-pub-%s-%d", run, i), nil)
		if err != nil {
			return benchResult{}, err
		}
		clients = append(clients, c)
		publishers[i] = c
	}

	var published, errs atomic.Int64
	deadline := time.Now().Add(cfg.Duration)
	start := time.Now()
	var wg sync.WaitGroup
	for i, c := range publishers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			topic := pubTopic(i)
			payload := make([]byte, cfg.Size)
			var interval time.Duration
			if cfg.Rate > 0 {
				interval = time.Duration(float64(time.Second) * float64(pubs) / float64(cfg.Rate))
			}
			next := time.Now()
			for seq := uint64(0); time.Now().Before(deadline); seq++ {
				if interval > 0 {
					next = next.Add(interval)
					if d := time.Until(next); d > 0 {
						time.Sleep(d)
					}
				}
				binary.BigEndian.PutUint64(payload, uint64(time.Now().UnixNano()))
				binary.BigEndian.PutUint64(payload[8:], seq)
				binary.BigEndian.PutUint32(payload[16:], uint32(i))
				pctx, cancel := context.WithTimeout(ctx, 30*time.Second)
				r, err := c.Publish(pctx, &paho.Publish{Topic: topic, QoS: cfg.QoS, Payload: payload})
				cancel()
				if err != nil || (r != nil && r.ReasonCode >= 0x80) {
					errs.Add(1)
					if err != nil && ctx.Err() != nil {
						return
					}
					continue
				}
				published.Add(1)
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	// Drain: wait until deliveries stop for half a second (at most 10 s).
	expected := published.Load()
	if cfg.Scenario == "fanout" || cfg.Scenario == "sse" {
		expected *= int64(subs)
	}
	drainEnd := time.Now().Add(10 * time.Second)
	for time.Now().Before(drainEnd) {
		if recv.count.Load() >= expected {
			break
		}
		if last := recv.last.Load(); last > 0 && time.Since(time.Unix(0, last)) > 500*time.Millisecond {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}

	recv.mu.Lock()
	delivered := int64(len(recv.seen))
	lat := append([]float64(nil), recv.lat...)
	dups := recv.dups
	recv.mu.Unlock()
	sort.Float64s(lat)
	q := func(p float64) float64 {
		if len(lat) == 0 {
			return 0
		}
		return lat[min(len(lat)-1, int(p*float64(len(lat))))]
	}
	res := benchResult{Config: cfg, Published: published.Load(), Expected: expected, Delivered: delivered,
		Duplicates: dups, Lost: max(expected-delivered, 0), Errors: errs.Load(),
		PublishedPS: float64(published.Load()) / elapsed.Seconds(), DeliveredPS: float64(delivered) / elapsed.Seconds(),
		LatencyP50: q(.50), LatencyP90: q(.90), LatencyP99: q(.99)}
	if len(lat) > 0 {
		res.LatencyMax = lat[len(lat)-1]
	}
	return res, nil
}

// rssKiB reads VmRSS of a process.
func rssKiB(pid int) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "VmRSS:"); ok {
			return strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
		}
	}
	return 0, errors.New("no VmRSS")
}

func benchConnections(ctx context.Context, cfg benchConfig) (benchResult, error) {
	var before int64
	if cfg.PID > 0 {
		var err error
		if before, err = rssKiB(cfg.PID); err != nil {
			return benchResult{}, err
		}
	}
	run := fmt.Sprintf("%x", time.Now().UnixNano()&0xffffff)
	var clients []*paho.Client
	var errs int64
	for i := range cfg.Clients {
		c, err := benchConnect(ctx, cfg, fmt.Sprintf("bench-idle-%s-%d", run, i), nil)
		if err != nil {
			errs++
			continue
		}
		clients = append(clients, c)
	}
	time.Sleep(min(cfg.Duration, 5*time.Second)) // let the broker settle its buffers before measuring
	res := benchResult{Config: cfg, Delivered: int64(len(clients)), Errors: errs}
	if cfg.PID > 0 && len(clients) > 0 {
		after, err := rssKiB(cfg.PID)
		if err != nil {
			return res, err
		}
		res.RSSPerConnKB = float64(after-before) / float64(len(clients))
	}
	for _, c := range clients {
		_ = c.Disconnect(&paho.Disconnect{})
	}
	return res, nil
}

// sseSubscribe opens an SSE stream on Beacon's /events for filter, waits
// for its ready event, and records its messages as subscriber sub until
// ctx ends.
func sseSubscribe(ctx context.Context, cfg benchConfig, filter string, recv *receiver, sub int) error {
	q := url.Values{"topic": {filter}}
	if cfg.Token != "" {
		q.Set("access_token", cfg.Token)
	}
	req, err := http.NewRequestWithContext(ctx, "GET", "http://"+cfg.HTTP+"/events?"+q.Encode(), nil)
	if err != nil {
		return err
	}
	var resp *http.Response
	giveUp := time.Now().Add(10 * time.Second)
	for wait := 50 * time.Millisecond; ; wait = min(2*wait, time.Second) {
		resp, err = http.DefaultClient.Do(req)
		if err != nil {
			return fmt.Errorf("sse: %w", err)
		}
		if resp.StatusCode != http.StatusTooManyRequests || time.Now().After(giveUp) {
			break
		}
		// Over the handshake rate (http.handshakes_per_second): pace. A
		// stream limit answers 429 too, and does not pass: give up.
		resp.Body.Close()
		time.Sleep(wait)
	}
	if resp.StatusCode != http.StatusOK {
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		resp.Body.Close()
		return fmt.Errorf("sse: %s: %s", resp.Status, strings.TrimSpace(string(body)))
	}
	ready := make(chan error, 1)
	go func() {
		defer resp.Body.Close()
		sc := bufio.NewScanner(resp.Body)
		sc.Buffer(make([]byte, 64<<10), 16<<20)
		event := ""
		signalled := false
		for sc.Scan() {
			line := sc.Text()
			switch {
			case strings.HasPrefix(line, "event: "):
				event = line[len("event: "):]
				if event == "ready" && !signalled {
					signalled = true
					ready <- nil
				}
			case strings.HasPrefix(line, "data: ") && event == "message":
				var e struct {
					Payload  json.RawMessage `json:"payload"`
					Encoding string          `json:"encoding"`
				}
				if json.Unmarshal([]byte(line[len("data: "):]), &e) != nil {
					continue
				}
				var text string
				if json.Unmarshal(e.Payload, &text) != nil {
					continue
				}
				p := []byte(text)
				if e.Encoding == "base64" {
					b, derr := base64.StdEncoding.DecodeString(text)
					if derr != nil {
						continue
					}
					p = b
				}
				recv.record(sub, p)
			case line == "":
				event = ""
			}
		}
		if !signalled {
			ready <- fmt.Errorf("sse stream ended before ready: %v", sc.Err())
		}
	}()
	select {
	case err := <-ready:
		return err
	case <-time.After(10 * time.Second):
		return errors.New("sse: no ready event within 10s")
	}
}
