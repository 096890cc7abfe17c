package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

const (
	// fdReserve is what the process keeps open besides the connections.
	fdReserve = 64
	// perSource is how many connections share one source address: a
	// destination can be reached from about 28,000 ephemeral ports of each
	// (net.ipv4.ip_local_port_range), so beyond that they spread over
	// 127.0.0.2, 127.0.0.3, ...
	perSource = 20000
	// pingEvery keeps the idle clients alive (keep-alive 60 s).
	pingEvery = 30 * time.Second
)

// benchConnections opens idle clients, each subscribed to a topic of its
// own, holds them for the duration and measures what they cost the broker.
func benchConnections(ctx context.Context, cfg config) (result, error) {
	if err := checkOpenFiles(cfg.Clients); err != nil {
		return result{}, err
	}
	if cfg.PID > 0 {
		limit, err := openFileLimit(cfg.PID)
		if err != nil {
			return result{}, err
		}
		if int64(cfg.Clients)+fdReserve > limit {
			return result{}, fmt.Errorf("the broker (pid %d) may open %d files (RLIMIT_NOFILE in /proc/%d/limits), "+
				"too few for %d connections: raise its limit (ulimit -n) before starting it", cfg.PID, limit, cfg.PID, cfg.Clients)
		}
	}
	sources, err := sourceAddrs(cfg.Addr, cfg.Clients)
	if err != nil {
		return result{}, err
	}
	pr := probe{pid: cfg.PID}
	before := pr.rss()
	conns := make([]net.Conn, cfg.Clients)
	defer func() {
		var wg sync.WaitGroup
		for _, c := range conns {
			if c != nil {
				wg.Go(func() { goodbye(c) })
			}
		}
		wg.Wait()
	}()
	if err := openIdle(cfg, sources, conns); err != nil {
		return result{}, err
	}
	if err := holdIdle(ctx, conns, cfg.Duration); err != nil {
		return result{}, err
	}
	res := result{Config: cfg, BrokerRSSKiB: pr.rss()}
	if pr.err != nil {
		return result{}, pr.err
	}
	if cfg.PID > 0 {
		res.RSSPerConnKB = float64(res.BrokerRSSKiB-before) / float64(cfg.Clients)
	}
	res.Dropped = closedConns(conns)
	res.Connections = int64(cfg.Clients) - res.Dropped
	return res, nil
}

// openIdle fills conns with connected, subscribed clients, spread over
// sources when there are any. The first failure ends it.
func openIdle(cfg config, sources []net.Addr, conns []net.Conn) error {
	id := runID()
	return parallel(len(conns), func(i int) error {
		var laddr net.Addr
		if len(sources) > 0 {
			laddr = sources[i%len(sources)]
		}
		conn, err := dial(cfg.Addr, laddr)
		if err != nil {
			return fmt.Errorf("connection %d: %w", i+1, err)
		}
		r := newReader(conn, 512)
		if _, err := handshake(conn, r, fmt.Sprintf("bb-%s-i%d", id, i), cfg.Username, cfg.Password, 60); err != nil {
			_ = conn.Close()
			return fmt.Errorf("connection %d: %w", i+1, err)
		}
		err = subscribe(conn, r, fmt.Sprintf("%s/%s/idle/%d", cfg.Topic, id, i), cfg.QoS, func(pk packet) error {
			return fmt.Errorf("unexpected packet type %d", pk.typ)
		})
		if err != nil {
			_ = conn.Close()
			return fmt.Errorf("connection %d: %w", i+1, err)
		}
		conns[i] = conn
		return nil
	})
}

// holdIdle keeps the connections for d, pinging within their keep-alive.
func holdIdle(ctx context.Context, conns []net.Conn, d time.Duration) error {
	hold := time.NewTimer(d)
	defer hold.Stop()
	ping := time.NewTicker(pingEvery)
	defer ping.Stop()
	for {
		select {
		case <-hold.C:
			return nil
		case <-ctx.Done():
			return ctx.Err()
		case <-ping.C:
			for _, c := range conns {
				_ = c.SetWriteDeadline(time.Now().Add(time.Second))
				_, _ = c.Write([]byte{typePingreq << 4, 0}) // a closed one shows in closedConns
			}
		}
	}
}

// closedConns counts the connections the broker has closed: a read that
// ends at once (EOF or reset) rather than waiting for data.
func closedConns(conns []net.Conn) int64 {
	var n atomic.Int64
	var wg sync.WaitGroup
	for _, c := range conns {
		wg.Go(func() {
			_ = c.SetReadDeadline(time.Now().Add(5 * time.Millisecond))
			var b [64]byte
			for {
				if _, err := c.Read(b[:]); err != nil {
					if !errors.Is(err, os.ErrDeadlineExceeded) {
						n.Add(1)
					}
					return
				}
				// A PINGRESP: read on.
			}
		})
	}
	wg.Wait()
	return n.Load()
}

// checkOpenFiles raises the process's soft limit on open files to its
// hard limit and fails, naming the limit, when n connections cannot fit.
func checkOpenFiles(n int) error {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return err
	}
	need := uint64(n) + fdReserve
	if need > lim.Max {
		return fmt.Errorf("%d connections need about %d open files, but this process may open %d "+
			"(RLIMIT_NOFILE hard limit, ulimit -Hn; only root can raise it): run fewer per beacon-bench process", n, need, lim.Max)
	}
	if need > lim.Cur {
		lim.Cur = lim.Max
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
			return fmt.Errorf("raise RLIMIT_NOFILE to %d: %w", lim.Max, err)
		}
	}
	return nil
}

// sourceAddrs spreads n connections to a loopback broker over source
// addresses 127.0.0.2, 127.0.0.3, ... when one address has too few
// ephemeral ports for them (perSource); nil when one is enough.
func sourceAddrs(addr string, n int) ([]net.Addr, error) {
	if n <= perSource {
		return nil, nil
	}
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, err
	}
	ip := net.ParseIP(host)
	if ip == nil || ip.To4() == nil || !ip.IsLoopback() {
		return nil, fmt.Errorf("%d connections to %s need more ephemeral ports than one source address has: "+
			"more than %d are spread over 127.0.0.x, which only works for a broker on 127.0.0.1", n, addr, perSource)
	}
	k := (n + perSource - 1) / perSource
	out := make([]net.Addr, k)
	for i := range out {
		out[i] = &net.TCPAddr{IP: net.IPv4(127, 0, 0, byte(2+i))}
	}
	return out, nil
}
