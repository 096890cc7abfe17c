package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"
)

// A contender is a broker under comparison and how to start it.
type contender struct {
	name   string
	beacon bool
	start  func(dir string, o brokerOptions) (*brokerProc, error)
}

// A compareRow is one line of the comparison table: a scenario run on
// every contender (or only on Beacon), or a figure read from another
// row's runs (from).
type compareRow struct {
	name       string
	cfg        config
	http       bool // Beacon with an HTTP listener for SSE
	beaconOnly bool
	cluster    bool // two Beacon nodes on one Redis: publishers on one, subscribers on the other (Beacon with its defaults only)
	from       string
	// cell renders the runs of one contender; key is the figure the
	// ratio column compares.
	cell func(runs []result) (text string, key float64)
}

func runCompare(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("beacon-bench compare", flag.ContinueOnError)
	fs.SetOutput(stderr)
	reps := fs.Int("reps", 3, "repetitions of every scenario on every broker (alternating brokers)")
	dur := fs.Duration("duration", 5*time.Second, "publishing time per run")
	clients := fs.Int("clients", 100, "publishers in the fan-in rows")
	fanout := fs.Int("fanout", 1000, "subscribers in the fan-out row (0 skips it)")
	idle := fs.Int("idle", 10000, "idle connections (0 skips the row)")
	streams := fs.Int("streams", 1000, "SSE streams (0 skips the row)")
	size := fs.Int("size", 64, "payload bytes")
	beaconBin := fs.String("beacon", "beacon", "Beacon binary (make bench-compare: bin/beacon)")
	mosqBin := fs.String("mosquitto", "mosquitto", "Mosquitto broker binary")
	if err := fs.Parse(args); err != nil {
		return flagErr(err)
	}
	mosqPath, err := findMosquitto(*mosqBin)
	if err != nil {
		fmt.Fprintf(stderr, "beacon-bench: compare needs Mosquitto (Debian package mosquitto): %v\n", err)
		return 1
	}
	beaconPath, err := exec.LookPath(*beaconBin)
	if err == nil {
		beaconPath, err = filepath.Abs(beaconPath)
	}
	if err != nil {
		fmt.Fprintf(stderr, "beacon-bench: compare needs the beacon binary (--beacon; make build): %v\n", err)
		return 1
	}
	if err := checkOpenFiles(max(*idle, *fanout, *streams, *clients)); err != nil {
		fmt.Fprintf(stderr, "beacon-bench: compare: %v\n", err)
		return 1
	}
	contenders := newContenders(mosqPath, beaconPath)
	rows := compareRows(config{Size: *size, Duration: *dur, Clients: *clients, Topic: "cmp", Inflight: 16},
		*fanout, *idle, *streams)

	began := time.Now()
	results := map[string]map[string][]result{} // row -> contender -> runs
	failed := map[string]map[string][]string{}  // row -> contender -> errors
	for rep := range *reps {
		order := contenders
		if rep%2 == 1 { // A/B/A/B: alternate who goes first
			order = append([]contender(nil), contenders...)
			for i, j := 0, len(order)-1; i < j; i, j = i+1, j-1 {
				order[i], order[j] = order[j], order[i]
			}
		}
		for _, c := range order {
			for _, r := range rows {
				if r.from != "" || (r.beaconOnly && !c.beacon) || (r.cluster && c.name != "beacon") {
					continue
				}
				if ctx.Err() != nil {
					return 1
				}
				t0 := time.Now()
				res, err := runOne(ctx, c, r)
				if results[r.name] == nil {
					results[r.name], failed[r.name] = map[string][]result{}, map[string][]string{}
				}
				if err != nil {
					failed[r.name][c.name] = append(failed[r.name][c.name], err.Error())
					fmt.Fprintf(stderr, "rep %d/%d  %-18s %-40s FAILED: %v\n", rep+1, *reps, c.name, r.name, err)
					continue
				}
				results[r.name][c.name] = append(results[r.name][c.name], res)
				fmt.Fprintf(stderr, "rep %d/%d  %-18s %-40s %s  (%.1f s)\n", rep+1, *reps, c.name, r.name,
					progressLine(res), time.Since(t0).Seconds())
			}
		}
	}
	fmt.Fprintf(stderr, "compare: %d repetitions in %s\n", *reps, time.Since(began).Round(time.Second))
	printComparison(stdout, rows, contenders, results, failed, *reps)
	for _, byContender := range failed {
		if len(byContender) > 0 {
			return 1
		}
	}
	return 0
}

// newContenders are Mosquitto in memory, Beacon with its defaults
// (storage.sync batch), Mosquitto with persistence and Beacon with
// storage.sync none.
func newContenders(mosqPath, beaconPath string) []contender {
	mosquitto := func(persist bool) func(string, brokerOptions) (*brokerProc, error) {
		return func(dir string, o brokerOptions) (*brokerProc, error) {
			o.persistence = persist
			return startMosquitto(mosqPath, dir, o)
		}
	}
	beacon := func(sync string) func(string, brokerOptions) (*brokerProc, error) {
		return func(dir string, o brokerOptions) (*brokerProc, error) {
			o.sync = sync
			return startBeacon(beaconPath, dir, o)
		}
	}
	return []contender{
		{"mosquitto", false, mosquitto(false)},
		{"beacon", true, beacon("batch")},
		{"mosquitto-persist", false, mosquitto(true)},
		{"beacon-sync-none", true, beacon("none")},
	}
}

// compareRows are the table's lines.
func compareRows(base config, fanout, idle, streams int) []compareRow {
	with := func(f func(*config)) config { c := base; f(&c); return c }
	throughput := func(runs []result) (string, float64) {
		del := median(runs, func(r result) float64 { return r.DeliveredPS })
		text := fmt.Sprintf("%s/s, p99 %.2f ms, %s", humanInt(del), median(runs, p99), losses(runs))
		return text, del
	}
	// Saturated QoS 0 latency is the depth of the socket buffers, bounded
	// by the end of the run: not shown.
	throughput0 := func(runs []result) (string, float64) {
		del := median(runs, func(r result) float64 { return r.DeliveredPS })
		return fmt.Sprintf("%s/s, %s", humanInt(del), losses(runs)), del
	}
	rows := []compareRow{
		{name: "QoS 0 fan-in, saturated (" + strconv.Itoa(base.Clients) + " publishers)",
			cfg: with(func(c *config) { c.Scenario = "fanin" }), cell: throughput0},
		{name: "QoS 1 fan-in, saturated", cfg: with(func(c *config) { c.Scenario = "fanin"; c.QoS = 1 }), cell: throughput},
		{name: "QoS 2 fan-in, saturated", cfg: with(func(c *config) { c.Scenario = "fanin"; c.QoS = 2 }), cell: throughput},
	}
	if fanout > 0 {
		rows = append(rows, compareRow{name: "QoS 0 fan-out 1 → " + humanInt(float64(fanout)) + " subscribers (deliveries/s)",
			cfg: with(func(c *config) { c.Scenario = "fanout"; c.Clients = fanout }), cell: throughput0})
	}
	rows = append(rows,
		compareRow{name: "QoS 1 at 5,000 msg/s (p99 from schedule)",
			cfg: with(func(c *config) { c.Scenario = "fanin"; c.QoS = 1; c.Rate = 5000 }),
			cell: func(runs []result) (string, float64) {
				p := median(runs, p99)
				return fmt.Sprintf("p99 %.2f ms, %s/s, %s", p, humanInt(median(runs, func(r result) float64 { return r.DeliveredPS })),
					losses(runs)), p
			}},
		compareRow{name: "broker CPU per delivered QoS 0 message", from: rows[0].name,
			cell: func(runs []result) (string, float64) {
				us := median(runs, func(r result) float64 { return r.CPUPerMsgUS })
				return fmt.Sprintf("%.2f µs", us), us
			}},
	)
	rows = append(rows,
		compareRow{name: "QoS 1 fan-in across 2 nodes on Redis, saturated", beaconOnly: true, cluster: true,
			cfg: with(func(c *config) { c.Scenario = "fanin"; c.QoS = 1 }), cell: throughput},
		compareRow{name: "QoS 1 at 5,000 msg/s across 2 nodes (p99 from schedule)", beaconOnly: true, cluster: true,
			cfg: with(func(c *config) { c.Scenario = "fanin"; c.QoS = 1; c.Rate = 5000 }),
			cell: func(runs []result) (string, float64) {
				p := median(runs, p99)
				return fmt.Sprintf("p99 %.2f ms, %s/s, %s", p, humanInt(median(runs, func(r result) float64 { return r.DeliveredPS })),
					losses(runs)), p
			}},
	)
	if idle > 0 {
		rows = append(rows, compareRow{name: humanInt(float64(idle)) + " idle connections (RSS/conn)",
			cfg: with(func(c *config) { c.Scenario = "connections"; c.Clients = idle; c.Duration = 2 * time.Second }),
			cell: func(runs []result) (string, float64) {
				kib := median(runs, func(r result) float64 { return r.RSSPerConnKB })
				return fmt.Sprintf("%.2f KiB/conn%s", kib, dropped(runs)), kib
			}})
	}
	if streams > 0 {
		rows = append(rows, compareRow{name: "SSE 1 → " + humanInt(float64(streams)) + " streams at 1,000 msg/s", http: true, beaconOnly: true,
			cfg: with(func(c *config) { c.Scenario = "sse"; c.Clients = streams; c.QoS = 1; c.Rate = 1000 }),
			cell: func(runs []result) (string, float64) {
				del := median(runs, func(r result) float64 { return r.DeliveredPS })
				return fmt.Sprintf("%s/s, p99 %.2f ms, %s, %.2f KiB/stream", humanInt(del), median(runs, p99), losses(runs),
					median(runs, func(r result) float64 { return r.RSSPerConnKB })), del
			}})
	}
	return rows
}

// runOne starts a fresh broker, runs one scenario against it and stops it.
func runOne(ctx context.Context, c contender, r compareRow) (result, error) {
	if r.cluster {
		return runCluster(ctx, c, r)
	}
	dir, err := os.MkdirTemp("", "beacon-compare-")
	if err != nil {
		return result{}, err
	}
	defer os.RemoveAll(dir)
	b, err := c.start(dir, brokerOptions{http: r.http})
	if err != nil {
		return result{}, err
	}
	defer b.stop()
	cfg := r.cfg
	cfg.Addr, cfg.HTTP, cfg.PID = b.mqtt, b.http, b.pid()
	res, err := bench(ctx, cfg)
	if err != nil {
		select {
		case <-b.exited:
			return res, fmt.Errorf("%w (the broker exited: %s)", err, b.logs())
		default:
		}
	}
	return res, err
}

func p99(r result) float64 { return r.LatencyP99 }

// median of f over runs.
func median(runs []result, f func(result) float64) float64 {
	if len(runs) == 0 {
		return 0
	}
	s := make([]float64, len(runs))
	for i, r := range runs {
		s[i] = f(r)
	}
	sort.Float64s(s)
	return s[len(s)/2]
}

// losses is "lost 0, dup 0" with the sums over runs, plus errors, unsent
// messages and dropped clients when there were any. QoS 0 losses come with
// the median share.
func losses(runs []result) string {
	var lost, dup, errs, unsent int64
	for _, r := range runs {
		lost += r.Lost
		dup += r.Duplicates
		errs += r.Errors
		unsent += r.Unsent
	}
	s := "lost " + humanInt(float64(lost))
	if lost > 0 && len(runs) > 0 && runs[0].Config.QoS == 0 {
		s += fmt.Sprintf(" (%.1f%%)", median(runs, func(r result) float64 { return r.LostPercent }))
	} else if lost > 0 {
		s = "**" + s + "**"
	}
	s += fmt.Sprintf(", dup %d", dup)
	if errs > 0 {
		s += fmt.Sprintf(", err %d", errs)
	}
	if unsent > 0 {
		s += fmt.Sprintf(", unsent %s", humanInt(float64(unsent)))
	}
	return s + dropped(runs)
}

func dropped(runs []result) string {
	var n int64
	for _, r := range runs {
		n += r.Dropped
	}
	if n == 0 {
		return ""
	}
	return fmt.Sprintf(", %d dropped", n)
}

// progressLine is one run, for stderr.
func progressLine(r result) string {
	if r.Config.Scenario == "connections" {
		return fmt.Sprintf("%d open, %.2f KiB/conn, %d dropped", r.Connections, r.RSSPerConnKB, r.Dropped)
	}
	s := fmt.Sprintf("delivered %9s/s  p99 %8.2f ms  lost %d  dup %d  err %d", humanInt(r.DeliveredPS), r.LatencyP99,
		r.Lost, r.Duplicates, r.Errors)
	if r.CPUPerMsgUS > 0 {
		s += fmt.Sprintf("  cpu %.2f µs/msg", r.CPUPerMsgUS)
	}
	if r.Unsent > 0 {
		s += fmt.Sprintf("  unsent %d", r.Unsent)
	}
	if len(r.ErrorsBy) > 0 {
		s += errorList(r.ErrorsBy)
	}
	if r.Dropped > 0 {
		s += fmt.Sprintf("  dropped %d (%s)", r.Dropped, r.DropReason)
	}
	return s
}

func printComparison(w io.Writer, rows []compareRow, contenders []contender, results map[string]map[string][]result,
	failed map[string]map[string][]string, reps int) {
	fmt.Fprintf(w, "Medians of %d runs each, brokers alternating; lost, dup, err, unsent and dropped are sums over the runs. "+
		"beacon / mosquitto compares each row's first figure.\n\n", reps)
	fmt.Fprint(w, "| scenario |")
	for _, c := range contenders {
		fmt.Fprintf(w, " %s |", c.name)
	}
	fmt.Fprintln(w, " beacon / mosquitto |")
	fmt.Fprint(w, "| --- |")
	for range contenders {
		fmt.Fprint(w, " --- |")
	}
	fmt.Fprintln(w, " --- |")
	for _, r := range rows {
		src := r.name
		if r.from != "" {
			src = r.from
		}
		fmt.Fprintf(w, "| %s |", r.name)
		key := map[string]float64{}
		for _, c := range contenders {
			runs := results[src][c.name]
			fails := failed[src][c.name]
			switch {
			case r.beaconOnly && !c.beacon:
				fmt.Fprint(w, " n/a |")
				continue
			case len(runs) == 0 && len(fails) > 0:
				fmt.Fprintf(w, " failed: %s |", strings.ReplaceAll(fails[0], "|", "/"))
				continue
			case len(runs) == 0:
				fmt.Fprint(w, " - |")
				continue
			}
			text, k := r.cell(runs)
			if len(fails) > 0 {
				text += fmt.Sprintf(" (%d failed)", len(fails))
			}
			key[c.name] = k
			fmt.Fprintf(w, " %s |", text)
		}
		if m, ok := key["mosquitto"]; ok && m > 0 {
			fmt.Fprintf(w, " %.2fx |\n", key["beacon"]/m)
		} else {
			fmt.Fprintln(w, " - |")
		}
	}
}

func humanInt(v float64) string {
	s := strconv.FormatInt(int64(v+0.5), 10)
	var b strings.Builder
	for i, r := range s {
		if i > 0 && (len(s)-i)%3 == 0 && r != '-' {
			b.WriteByte(',')
		}
		b.WriteRune(r)
	}
	return b.String()
}
