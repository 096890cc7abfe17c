package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// A broker under comparison: how to start it on a port with a data dir.
type contender struct {
	name  string
	start func(port int, dir string) (*exec.Cmd, error)
}

// compareScenario is one line of the comparison table.
type compareScenario struct {
	name string
	cfg  benchConfig
}

func runCompare(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("bench compare", flag.ContinueOnError)
	fs.SetOutput(stderr)
	reps := fs.Int("reps", 3, "repetitions of every scenario on every broker (alternating brokers)")
	dur := fs.Duration("duration", 5*time.Second, "publishing time per scenario")
	clients := fs.Int("clients", 100, "publishers in the fan-in scenarios")
	idle := fs.Int("idle", 10000, "idle connections in the connections scenario (0 skips it)")
	mosq := fs.String("mosquitto", "mosquitto", "Mosquitto broker binary")
	if err := fs.Parse(args); err != nil {
		return reportFlagErr(err, stderr)
	}
	mosqPath, err := exec.LookPath(*mosq)
	if err != nil {
		fmt.Fprintf(stderr, "beacon: bench compare needs Mosquitto (Debian package mosquitto): %v\n", err)
		return 1
	}
	self, err := os.Executable()
	if err != nil {
		fmt.Fprintf(stderr, "beacon: %v\n", err)
		return 1
	}
	mosquitto := func(persist bool) func(int, string) (*exec.Cmd, error) {
		return func(port int, dir string) (*exec.Cmd, error) {
			conf := fmt.Sprintf("listener %d 127.0.0.1\nallow_anonymous true\nmax_connections -1\n", port)
			if persist {
				conf += "persistence true\npersistence_location " + dir + "/\n"
			}
			path := filepath.Join(dir, "mosquitto.conf")
			if err := os.WriteFile(path, []byte(conf), 0o600); err != nil {
				return nil, err
			}
			return exec.Command(mosqPath, "-c", path), nil
		}
	}
	beacon := func(sync string) func(int, string) (*exec.Cmd, error) {
		return func(port int, dir string) (*exec.Cmd, error) {
			cmd := exec.Command(self, "serve", "--mqtt-addr", fmt.Sprintf("127.0.0.1:%d", port), "--http-addr", "",
				"--data-dir", filepath.Join(dir, "data"), "--log-level", "error")
			cmd.Env = append(cleanEnvList(), "BEACON_STORAGE_SYNC="+sync, "BEACON_MQTT_MAX_QUEUED_MESSAGES=65535")
			return cmd, nil
		}
	}
	contenders := []contender{
		{"mosquitto", mosquitto(false)},
		{"beacon", beacon("batch")},
		{"mosquitto-persist", mosquitto(true)},
		{"beacon-sync-none", beacon("none")},
	}
	base := benchConfig{Size: 64, Duration: *dur, Clients: *clients, Topic: "cmp"}
	with := func(f func(*benchConfig)) benchConfig { c := base; f(&c); return c }
	scenarios := []compareScenario{
		{"QoS 0 fan-in, saturated", with(func(c *benchConfig) { c.Scenario = "fanin" })},
		{"QoS 1 fan-in, saturated", with(func(c *benchConfig) { c.Scenario = "fanin"; c.QoS = 1 })},
		{"QoS 2 fan-in, saturated", with(func(c *benchConfig) { c.Scenario = "fanin"; c.QoS = 2 })},
		{"QoS 1 at 5,000 msg/s", with(func(c *benchConfig) { c.Scenario = "fanin"; c.QoS = 1; c.Rate = 5000 })},
	}
	if *idle > 0 {
		scenarios = append(scenarios, compareScenario{fmt.Sprintf("%d idle connections", *idle),
			with(func(c *benchConfig) { c.Scenario = "connections"; c.Clients = *idle; c.Duration = 3 * time.Second })})
	}

	results := map[string]map[string][]benchResult{} // scenario -> broker -> runs
	for rep := range *reps {
		order := contenders
		if rep%2 == 1 { // A/B/A/B: alternate who goes first
			order = append([]contender(nil), contenders...)
			for i, j := 0, len(order)-1; i < j; i, j = i+1, j-1 {
				order[i], order[j] = order[j], order[i]
			}
		}
		for _, c := range order {
			for _, s := range scenarios {
				res, err := runOne(c, s.cfg)
				if err != nil {
					fmt.Fprintf(stderr, "beacon: %s, %s: %v\n", c.name, s.name, err)
					return 1
				}
				fmt.Fprintf(stderr, "rep %d  %-18s %-26s delivered %9.0f/s  p99 %8.2f ms  lost %d  dup %d  rss/conn %.2f KiB\n",
					rep+1, c.name, s.name, res.DeliveredPS, res.LatencyP99, res.Lost, res.Duplicates, res.RSSPerConnKB)
				if results[s.name] == nil {
					results[s.name] = map[string][]benchResult{}
				}
				results[s.name][c.name] = append(results[s.name][c.name], res)
			}
		}
	}
	printComparison(stdout, scenarios, contenders, results, *reps)
	return 0
}

func cleanEnvList() []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "BEACON_") {
			env = append(env, kv)
		}
	}
	return env
}

func freePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

// runOne starts a fresh broker, runs one scenario against it and stops it.
func runOne(c contender, cfg benchConfig) (benchResult, error) {
	dir, err := os.MkdirTemp("", "beacon-compare-")
	if err != nil {
		return benchResult{}, err
	}
	defer os.RemoveAll(dir)
	port, err := freePort()
	if err != nil {
		return benchResult{}, err
	}
	cmd, err := c.start(port, dir)
	if err != nil {
		return benchResult{}, err
	}
	cmd.Stdout, cmd.Stderr = io.Discard, io.Discard
	if err := cmd.Start(); err != nil {
		return benchResult{}, err
	}
	defer func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		done := make(chan struct{})
		go func() { _ = cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(15 * time.Second):
			_ = cmd.Process.Kill()
			<-done
		}
	}()
	cfg.Addr = fmt.Sprintf("127.0.0.1:%d", port)
	cfg.PID = cmd.Process.Pid
	for deadline := time.Now().Add(15 * time.Second); ; {
		conn, err := net.DialTimeout("tcp", cfg.Addr, time.Second)
		if err == nil {
			_ = conn.Close()
			break
		}
		if time.Now().After(deadline) {
			return benchResult{}, fmt.Errorf("%s did not listen: %w", c.name, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	return bench(context.Background(), cfg)
}

func median(vals []float64) float64 {
	if len(vals) == 0 {
		return 0
	}
	s := append([]float64(nil), vals...)
	sort.Float64s(s)
	return s[len(s)/2]
}

func printComparison(w io.Writer, scenarios []compareScenario, contenders []contender, results map[string]map[string][]benchResult, reps int) {
	fmt.Fprintf(w, "Medians of %d runs each, brokers alternating. delivered/s | p99 ms | lost (sum over runs).\n\n", reps)
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
	for _, s := range scenarios {
		fmt.Fprintf(w, "| %s |", s.name)
		med := map[string]float64{}
		for _, c := range contenders {
			runs := results[s.name][c.name]
			var del, p99, rss []float64
			var lost, dup int64
			for _, r := range runs {
				del = append(del, r.DeliveredPS)
				p99 = append(p99, r.LatencyP99)
				rss = append(rss, r.RSSPerConnKB)
				lost += r.Lost
				dup += r.Duplicates
			}
			if s.cfg.Scenario == "connections" {
				med[c.name] = median(rss)
				fmt.Fprintf(w, " %.2f KiB/conn |", median(rss))
				continue
			}
			med[c.name] = median(del)
			fmt.Fprintf(w, " %s/s, p99 %.2f ms, lost %d, dup %d |", humanInt(median(del)), median(p99), lost, dup)
		}
		if m := med["mosquitto"]; m > 0 {
			fmt.Fprintf(w, " %.2fx |\n", med["beacon"]/m)
		} else {
			fmt.Fprintln(w, " - |")
		}
	}
}

func humanInt(v float64) string {
	s := strconv.FormatInt(int64(v+0.5), 10)
	var b strings.Builder
	for i, r := range s {
		if i > 0 && (len(s)-i)%3 == 0 {
			b.WriteByte(',')
		}
		b.WriteRune(r)
	}
	return b.String()
}
