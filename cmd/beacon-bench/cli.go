package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"sort"
	"strconv"
	"strings"
	"time"
)

const usage = `Usage: beacon-bench SCENARIO [flags]
       beacon-bench compare [flags]

A load generator for any MQTT 5 broker.

Scenarios:
  fanin        --clients publishers -> 1 wildcard subscriber
  fanout       1 publisher -> --clients subscribers on one topic
  pairs        --clients publisher/subscriber pairs, one topic each
  connections  --clients idle clients (keep-alive 60 s, one subscription each); with --pid,
               the broker's RSS per connection
  sse          1 MQTT publisher -> --clients SSE streams on Beacon's /events (--http)
  compare      the scenarios above against Mosquitto and Beacon side by side
               (beacon-bench compare -h; make bench-compare)

Every payload starts with the time the message was due, its sequence number and
its publisher: latency is measured from when a message was due (open loop under
--rate), and every subscriber counts what it got, twice or never.

Flags:
`

// config is one run.
type config struct {
	Scenario string        `json:"scenario"`
	Addr     string        `json:"addr"`
	SubAddr  string        `json:"sub_addr,omitempty"` // subscribers connect here (another node of a cluster); "" = Addr
	QoS      byte          `json:"qos"`
	Size     int           `json:"size"`
	Rate     int           `json:"rate"`     // messages per second, all publishers together; 0 = as fast as possible
	Inflight int           `json:"inflight"` // QoS 1/2 messages in flight per publisher
	Duration time.Duration `json:"duration"`
	Clients  int           `json:"clients"`
	Topic    string        `json:"topic"`
	SubStall time.Duration `json:"sub_stall,omitempty"` // subscribers read nothing for this long after publishing starts
	Username string        `json:"-"`
	Password string        `json:"-"`
	PID      int           `json:"pid,omitempty"`
	HTTP     string        `json:"http,omitempty"` // Beacon's HTTP address, for sse
	Token    string        `json:"-"`              // JWT for the SSE streams

	quiet time.Duration // the drain ends after this long without a delivery
}

// result is what a run measured.
type result struct {
	Config       config           `json:"config"`
	Published    int64            `json:"published"` // QoS 1/2: acknowledged with a success code; QoS 0: written to the socket
	Expected     int64            `json:"expected"`  // deliveries due: published x subscribers of each message
	Delivered    int64            `json:"delivered"` // distinct deliveries
	Duplicates   int64            `json:"duplicates"`
	Lost         int64            `json:"lost"` // due but never delivered: acknowledged (QoS 1/2) or sent (QoS 0)
	LostPercent  float64          `json:"lost_percent"`
	Errors       int64            `json:"errors"`
	ErrorsBy     map[string]int64 `json:"errors_by_code,omitempty"` // refusals by reason code; "unacked": no final ack by the end
	Unsent       int64            `json:"unsent,omitempty"`         // due under --rate but never sent: the broker held the publishers back
	Dropped      int64            `json:"dropped,omitempty"`        // clients the broker disconnected during the run
	DropReason   string           `json:"drop_reason,omitempty"`    // the first one's reason
	Inflight     int              `json:"inflight,omitempty"`       // the window used: --inflight, capped by the broker's Receive Maximum
	PublishedPS  float64          `json:"published_per_sec"`        // over the publishing window, final acks included
	DeliveredPS  float64          `json:"delivered_per_sec"`        // from the start of publishing to the last delivery
	LatencyP50   float64          `json:"latency_p50_ms"`           // receive time - due time
	LatencyP90   float64          `json:"latency_p90_ms"`
	LatencyP99   float64          `json:"latency_p99_ms"`
	LatencyMax   float64          `json:"latency_max_ms"`
	CPUPerMsgUS  float64          `json:"broker_cpu_us_per_msg,omitempty"` // broker utime+stime over publishing and drain / delivered
	BrokerRSSKiB int64            `json:"broker_rss_kib,omitempty"`        // at the end of the run
	Connections  int64            `json:"connections,omitempty"`           // connections: open at the end; sse: streams
	RSSPerConnKB float64          `json:"rss_per_conn_kib,omitempty"`      // connections, sse: broker RSS growth / connections
}

// run is the whole program; it returns the exit code.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 || strings.HasPrefix(args[0], "-") || args[0] == "help" {
		fmt.Fprint(stdout, usage)
		benchFlags(&config{}, new(bool), stdout).PrintDefaults()
		return 0
	}
	if args[0] == "compare" {
		return runCompare(ctx, args[1:], stdout, stderr)
	}
	cfg := config{Scenario: args[0]}
	asJSON := new(bool)
	fs := benchFlags(&cfg, asJSON, stderr)
	if err := fs.Parse(args[1:]); err != nil {
		return flagErr(err)
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "beacon-bench: unexpected argument %q\n", fs.Arg(0))
		return 2
	}
	res, err := bench(ctx, cfg)
	if err != nil {
		fmt.Fprintf(stderr, "beacon-bench: %s: %v\n", cfg.Scenario, err)
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

func flagErr(err error) int {
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	return 2
}

func benchFlags(cfg *config, asJSON *bool, out io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet("beacon-bench", flag.ContinueOnError)
	fs.SetOutput(out)
	fs.StringVar(&cfg.Addr, "addr", "127.0.0.1:1883", "broker host:port")
	fs.StringVar(&cfg.SubAddr, "sub-addr", "", "subscribers connect to this host:port instead (another node of a Beacon cluster)")
	fs.Var(qosValue{&cfg.QoS}, "qos", "QoS of publishes and subscriptions (0, 1, 2)")
	fs.IntVar(&cfg.Size, "size", 64, "payload bytes (at least 20: due time, sequence, publisher)")
	fs.IntVar(&cfg.Rate, "rate", 0, "messages per second in total, on a fixed schedule; 0 = as fast as the broker takes them")
	fs.IntVar(&cfg.Inflight, "inflight", 16, "QoS 1/2 messages in flight per publisher (at most the broker's Receive Maximum)")
	fs.DurationVar(&cfg.Duration, "duration", 10*time.Second, "how long to publish (connections: how long to hold them)")
	fs.IntVar(&cfg.Clients, "clients", 100, "publishers (fanin), subscribers (fanout), pairs, idle connections or SSE streams")
	fs.StringVar(&cfg.Topic, "topic", "bench", "topic prefix")
	fs.DurationVar(&cfg.SubStall, "sub-stall", 0, "subscribers read nothing for this long once publishing starts (a slow consumer)")
	fs.StringVar(&cfg.Username, "username", "", "MQTT username")
	fs.StringVar(&cfg.Password, "password", "", "MQTT password")
	fs.IntVar(&cfg.PID, "pid", 0, "broker process id: its CPU time per delivered message and its RSS")
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

func printResult(w io.Writer, r result, color bool) {
	c := r.Config
	fmt.Fprintf(w, "%s qos=%d size=%d clients=%d rate=%s duration=%s against %s\n", c.Scenario, c.QoS, c.Size, c.Clients,
		rateString(c.Rate), c.Duration, c.Addr)
	if c.Scenario == "connections" {
		fmt.Fprintf(w, "  %d connections open", r.Connections)
		if r.RSSPerConnKB != 0 {
			fmt.Fprintf(w, ", broker RSS %.2f KiB per connection", r.RSSPerConnKB)
		}
		fmt.Fprintf(w, ", %d dropped\n", r.Dropped)
		return
	}
	if r.Inflight > 0 {
		fmt.Fprintf(w, "  in flight  %d per publisher\n", r.Inflight)
	}
	fmt.Fprintf(w, "  published  %10d  %10.0f msg/s\n", r.Published, r.PublishedPS)
	fmt.Fprintf(w, "  delivered  %10d  %10.0f msg/s  (of %d due)\n", r.Delivered, r.DeliveredPS, r.Expected)
	fmt.Fprintf(w, "  latency    p50 %.3f ms  p90 %.3f ms  p99 %.3f ms  max %.3f ms (from the time each was due)\n",
		r.LatencyP50, r.LatencyP90, r.LatencyP99, r.LatencyMax)
	fmt.Fprintf(w, "  duplicates %d, errors %d%s\n", r.Duplicates, r.Errors, errorList(r.ErrorsBy))
	if r.Unsent > 0 {
		fmt.Fprintf(w, "  unsent     %d due but not sent: the broker held the publishers back\n", r.Unsent)
	}
	if r.Dropped > 0 {
		fmt.Fprintf(w, "  dropped    %d clients disconnected by the broker (%s)\n", r.Dropped, r.DropReason)
	}
	switch {
	case r.Lost > 0 && c.QoS > 0:
		msg := fmt.Sprintf("  LOST %d QoS %d messages that the broker acknowledged (%.2f%%)", r.Lost, c.QoS, r.LostPercent)
		if color {
			msg = "\x1b[31m" + msg + "\x1b[0m"
		}
		fmt.Fprintln(w, msg)
	case r.Lost > 0:
		fmt.Fprintf(w, "  lost %d QoS 0 messages (%.2f%%)\n", r.Lost, r.LostPercent)
	default:
		fmt.Fprintln(w, "  lost 0")
	}
	if c.PID > 0 {
		fmt.Fprintf(w, "  broker     %.2f µs CPU per delivered message, RSS %.1f MiB", r.CPUPerMsgUS, float64(r.BrokerRSSKiB)/1024)
		if r.RSSPerConnKB != 0 {
			fmt.Fprintf(w, ", %.2f KiB per stream", r.RSSPerConnKB)
		}
		fmt.Fprintln(w)
	}
}

// errorList is " (0x97 quota exceeded: 3, unacked: 1)", or "" for none.
func errorList(m map[string]int64) string {
	if len(m) == 0 {
		return ""
	}
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	parts := make([]string, len(keys))
	for i, k := range keys {
		parts[i] = fmt.Sprintf("%s: %d", k, m[k])
	}
	return " (" + strings.Join(parts, ", ") + ")"
}

func rateString(r int) string {
	if r == 0 {
		return "max"
	}
	return strconv.Itoa(r) + "/s"
}
