package main

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"
)

const (
	// quietTime ends the drain: this long without a delivery, nothing more
	// is coming.
	quietTime = time.Second
	// maxDrain bounds the drain however slowly deliveries trickle in: at
	// QoS 1/2 every acknowledged message should arrive, so it is generous;
	// at QoS 0 what is still in socket buffers after as long again as the
	// publishing took (at least 2 s), or maxDrainQoS0, counts as lost.
	maxDrain     = 15 * time.Second
	maxDrainQoS0 = 3 * time.Second
	// maxGrace is how long after the end of the schedule publishers may
	// still catch up or wait for their last acknowledgements: as long again
	// as the run (at least 2 s), at most this.
	maxGrace = 10 * time.Second
	// dialers is how many connections are set up at once.
	dialers = 16
)

// plan is the shape of a scenario: who publishes where and who receives what.
type plan struct {
	pubs, subs int
	pubTopic   func(i int) string
	subFilter  func(i int) string
	expects    func(sub, pub int) bool // whether subscriber sub receives publisher pub's messages
}

func planFor(cfg config, prefix string) (plan, error) {
	all := func(int, int) bool { return true }
	own := func(sub, pub int) bool { return sub == pub }
	each := func(i int) string { return fmt.Sprintf("%s/%d", prefix, i) }
	one := func(int) string { return prefix + "/all" }
	switch cfg.Scenario {
	case "fanin":
		return plan{pubs: cfg.Clients, subs: 1, pubTopic: each, subFilter: func(int) string { return prefix + "/#" }, expects: all}, nil
	case "fanout", "sse":
		return plan{pubs: 1, subs: cfg.Clients, pubTopic: one, subFilter: one, expects: all}, nil
	case "pairs":
		return plan{pubs: cfg.Clients, subs: cfg.Clients, pubTopic: each, subFilter: each, expects: own}, nil
	}
	return plan{}, fmt.Errorf("unknown scenario %q (fanin, fanout, pairs, connections, sse, compare)", cfg.Scenario)
}

// subscribers is the number of receiving ends of cfg's scenario.
func (cfg config) subscribers() int {
	switch cfg.Scenario {
	case "fanout", "sse", "pairs":
		return cfg.Clients
	}
	return 1
}

func (cfg *config) normalize() error {
	cfg.Size = max(cfg.Size, stampSize)
	if cfg.Clients < 1 {
		return errors.New("--clients must be at least 1")
	}
	if cfg.Duration <= 0 {
		return errors.New("--duration must be positive")
	}
	if cfg.Rate < 0 {
		return errors.New("--rate must not be negative")
	}
	if cfg.Inflight < 1 || cfg.Inflight > 65535 {
		return errors.New("--inflight is 1 to 65535")
	}
	if cfg.quiet == 0 {
		cfg.quiet = quietTime
	}
	return nil
}

// runID makes topics and client ids of one run unlike any other's.
func runID() string { return fmt.Sprintf("%06x", time.Now().UnixNano()&0xffffff) }

// bench runs one scenario.
func bench(ctx context.Context, cfg config) (result, error) {
	if err := cfg.normalize(); err != nil {
		return result{}, err
	}
	if cfg.Scenario == "connections" {
		return benchConnections(ctx, cfg)
	}
	id := runID()
	pl, err := planFor(cfg, cfg.Topic+"/"+id)
	if err != nil {
		return result{}, err
	}
	if err := checkOpenFiles(pl.pubs + pl.subs); err != nil {
		return result{}, err
	}
	var (
		sinks = make([]sink, pl.subs)
		pubs  = make([]*publisher, pl.pubs)
		start = make(chan struct{}) // closed when publishing starts
		pr    = probe{pid: cfg.PID}
	)
	defer closeAll(sinks, pubs) // on the error paths; closing twice is harmless

	rssBefore := pr.rss()
	if err := connectSinks(ctx, cfg, pl, id, sinks, start); err != nil {
		return result{}, err
	}
	rssOpen := pr.rss()
	if err := parallel(pl.pubs, func(i int) (err error) {
		pubs[i], err = connectPublisher(cfg, fmt.Sprintf("bb-%s-p%d", id, i), i, pl.pubTopic(i))
		return err
	}); err != nil {
		return result{}, err
	}

	if cfg.subAddr() != cfg.Addr {
		if err := awaitForwarding(ctx, cfg, id); err != nil {
			return result{}, err
		}
	}
	cpuBefore := pr.cpu()
	began := time.Now()
	close(start)
	publish(ctx, cfg, began, pubs)
	publishing := time.Since(began)

	var expected int64
	for j := range sinks {
		for i, p := range pubs {
			if pl.expects(j, i) {
				expected += p.published.Load()
			}
		}
	}
	limit := maxDrain
	if cfg.QoS == 0 {
		limit = min(max(cfg.Duration, 2*time.Second), maxDrainQoS0)
	}
	// Stalled subscribers (--sub-stall) have not started reading yet.
	drain(sinks, expected, cfg.quiet, limit, began.Add(cfg.SubStall))
	cpu := pr.cpu() - cpuBefore
	res := result{Config: cfg, BrokerRSSKiB: pr.rss()}
	if pr.err != nil {
		return result{}, pr.err
	}

	closeAll(sinks, pubs)
	merge(&res, pl, sinks, pubs, began, publishing)
	if cfg.PID > 0 && res.Delivered > 0 {
		res.CPUPerMsgUS = float64(cpu.Microseconds()) / float64(res.Delivered)
	}
	if cfg.PID > 0 && cfg.Scenario == "sse" {
		res.RSSPerConnKB = float64(rssOpen-rssBefore) / float64(pl.subs)
	}
	return res, ctx.Err()
}

// connectSinks opens the receiving ends: SSE streams or MQTT subscribers.
func connectSinks(ctx context.Context, cfg config, pl plan, id string, sinks []sink, start chan struct{}) error {
	if cfg.Scenario == "sse" {
		client := sseClient()
		defer client.CloseIdleConnections()
		return parallel(pl.subs, func(i int) error {
			st, err := openStream(ctx, client, cfg, pl.subFilter(i), pl.pubs)
			if err == nil {
				sinks[i] = st
			}
			return err
		})
	}
	return parallel(pl.subs, func(i int) error {
		sub, err := connectSubscriber(cfg, fmt.Sprintf("bb-%s-s%d", id, i), pl.subFilter(i), pl.pubs, start)
		if err == nil {
			sinks[i] = sub
		}
		return err
	})
}

// publish runs the publishers from began for the duration (and the grace
// that follows) and returns when all are done.
func publish(ctx context.Context, cfg config, began time.Time, pubs []*publisher) {
	grace := min(max(cfg.Duration, 2*time.Second), maxGrace)
	s := schedule{start: began, deadline: began.Add(cfg.Duration), giveUp: began.Add(cfg.Duration + grace)}
	if cfg.Rate > 0 {
		s.interval = time.Duration(float64(time.Second) * float64(len(pubs)) / float64(cfg.Rate))
	}
	var wg sync.WaitGroup
	for i, p := range pubs {
		ps := s
		ps.offset = s.interval * time.Duration(i) / time.Duration(len(pubs))
		wg.Go(func() { p.run(ctx, ps) })
	}
	wg.Wait()
}

// probe reads the broker's process counters, when its pid is known; the
// first error sticks.
type probe struct {
	pid int
	err error
}

func (p *probe) rss() int64 {
	if p.pid == 0 || p.err != nil {
		return 0
	}
	kib, err := rssKiB(p.pid)
	p.err = err
	return kib
}

func (p *probe) cpu() time.Duration {
	if p.pid == 0 || p.err != nil {
		return 0
	}
	d, err := cpuTime(p.pid)
	p.err = err
	return d
}

// parallel runs fn for 0..n-1 on a few goroutines and returns the first
// error; after one, the rest are not started.
func parallel(n int, fn func(i int) error) error {
	var (
		next    atomic.Int64
		failed  atomic.Bool
		errOnce sync.Once
		first   error
		wg      sync.WaitGroup
	)
	for range min(n, dialers) {
		wg.Go(func() {
			for !failed.Load() {
				i := int(next.Add(1) - 1)
				if i >= n {
					return
				}
				if err := fn(i); err != nil {
					errOnce.Do(func() { first = err })
					failed.Store(true)
				}
			}
		})
	}
	wg.Wait()
	return first
}

func closeAll(sinks []sink, pubs []*publisher) {
	var wg sync.WaitGroup
	for _, s := range sinks {
		if s != nil {
			wg.Go(s.close)
		}
	}
	for _, p := range pubs {
		if p != nil {
			wg.Go(p.close)
		}
	}
	wg.Wait()
}

// drain waits until the subscribers have received expected messages, or
// none arrived for quiet (counted from no earlier than from), or limit
// passed.
func drain(sinks []sink, expected int64, quiet, limit time.Duration, from time.Time) {
	began := time.Now()
	if from.After(began) {
		began = from
	}
	for {
		var got, last int64
		for _, s := range sinks {
			t := s.tally()
			got += t.count.Load()
			last = max(last, t.last.Load())
		}
		since := time.Since(time.Unix(0, max(last, began.UnixNano())))
		if got >= expected || since > quiet || time.Since(began) > limit {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// merge adds up what the publishers sent and the subscribers received.
// Every reader has ended, so the tallies and the publishers' ack state are
// read without locks.
func merge(res *result, pl plan, sinks []sink, pubs []*publisher, began time.Time, publishing time.Duration) {
	errs := map[string]int64{}
	drop := func(err error) {
		if err != nil {
			if res.Dropped++; res.DropReason == "" {
				res.DropReason = err.Error()
			}
		}
	}
	published := make([]int64, len(pubs))
	for i, p := range pubs {
		published[i] = p.published.Load()
		res.Published += published[i]
		res.Unsent += p.unsent
		res.Inflight = p.window
		for code, n := range p.codes {
			errs[reasonName(code)] += n
		}
		if n := p.unacked(); n > 0 {
			errs["unacked"] += n
		}
		if p.strays > 0 {
			errs["ack for no message in flight"] += p.strays
		}
		drop(p.dropped())
	}
	var lat histogram
	var last int64
	for j, s := range sinks {
		t := s.tally()
		res.Delivered += t.delivered
		res.Duplicates += t.duplicates
		if t.foreign > 0 {
			errs["not a bench payload"] += t.foreign
		}
		lat.merge(&t.latency)
		last = max(last, t.lastAt)
		for i, p := range pubs {
			if !pl.expects(j, i) {
				continue
			}
			res.Expected += published[i]
			if p.qos > 0 {
				res.Lost += t.seen[i].missing(p.acked)
			} else {
				res.Lost += t.seen[i].missingBelow(p.sent)
			}
		}
		drop(s.dropped())
	}
	for _, n := range errs {
		res.Errors += n
	}
	if len(errs) > 0 {
		res.ErrorsBy = errs
	}
	if res.Expected > 0 {
		res.LostPercent = 100 * float64(res.Lost) / float64(res.Expected)
	}
	if publishing > 0 {
		res.PublishedPS = float64(res.Published) / publishing.Seconds()
	}
	if d := time.Unix(0, last).Sub(began); last > 0 && d > 0 {
		res.DeliveredPS = float64(res.Delivered) / d.Seconds()
	}
	ms := func(d time.Duration) float64 { return float64(d) / 1e6 }
	res.LatencyP50, res.LatencyP90, res.LatencyP99 = ms(lat.quantile(.50)), ms(lat.quantile(.90)), ms(lat.quantile(.99))
	res.LatencyMax = ms(time.Duration(lat.max))
	if pl.subs > 0 && res.Config.Scenario == "sse" {
		res.Connections = int64(pl.subs)
	}
}
