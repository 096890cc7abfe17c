package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

// subAddr is where subscribers connect.
func (cfg config) subAddr() string {
	if cfg.SubAddr != "" {
		return cfg.SubAddr
	}
	return cfg.Addr
}

// awaitForwarding returns once a message published on cfg.Addr reaches a
// subscriber on cfg.SubAddr: the publishing node has learnt the other
// node's interest. The probe's filter was subscribed after the run's, on
// the same node, so the run's is known too. Probe topics lie outside the
// run's.
func awaitForwarding(ctx context.Context, cfg config, id string) error {
	topic := cfg.Topic + "-probe/" + id
	sc, err := dial(cfg.subAddr(), nil)
	if err != nil {
		return err
	}
	defer sc.Close()
	sr := newReader(sc, 4<<10)
	if _, err := handshake(sc, sr, "bb-"+id+"-probe-sub", cfg.Username, cfg.Password, 60); err != nil {
		return err
	}
	if err := subscribe(sc, sr, topic, 0, func(packet) error { return nil }); err != nil {
		return err
	}
	pc, err := dial(cfg.Addr, nil)
	if err != nil {
		return err
	}
	defer pc.Close()
	pr := newReader(pc, 4<<10)
	if _, err := handshake(pc, pr, "bb-"+id+"-probe-pub", cfg.Username, cfg.Password, 60); err != nil {
		return err
	}
	got := make(chan error, 1)
	go func() {
		for {
			pk, err := sr.next()
			if err != nil {
				got <- err
				return
			}
			if pk.typ == typePublish {
				got <- nil
				return
			}
		}
	}()
	// QoS 1 (packet id 1, no properties): it goes the way the run's QoS 1
	// messages do, so their stream exists and is read before the run.
	publish := appendPacket(nil, typePublish<<4|1<<1, append(append(appendString(nil, topic), 0, 1, 0), "probe"...))
	deadline := time.After(30 * time.Second)
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		if _, err := pc.Write(publish); err != nil {
			return err
		}
		select {
		case err := <-got:
			if err != nil {
				return fmt.Errorf("probe subscriber: %w", err)
			}
			goodbye(pc)
			goodbye(sc)
			return nil
		case <-tick.C:
		case <-deadline:
			return errors.New("messages published on the first node did not reach the second within 30s")
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// redisProc is a redis-server for a cluster row, on loopback.
type redisProc struct {
	cmd  *exec.Cmd
	url  string
	done chan struct{}
}

// startRedis runs redis-server with an append-only file fsynced every
// second (what docs/cluster.md suggests), its data in dir.
func startRedis(dir string) (*redisProc, error) {
	bin, err := exec.LookPath("redis-server")
	if err != nil {
		return nil, fmt.Errorf("the cluster rows need redis-server (Debian package redis-server): %w", err)
	}
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	cmd := exec.Command(bin, "--port", fmt.Sprint(port), "--bind", "127.0.0.1", "--dir", dir, "--save", "",
		"--appendonly", "yes", "--appendfsync", "everysec", "--logfile", filepath.Join(dir, "redis.log"))
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	r := &redisProc{cmd: cmd, url: fmt.Sprintf("redis://127.0.0.1:%d/0", port), done: make(chan struct{})}
	go func() { _ = cmd.Wait(); close(r.done) }()
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		if c, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
			_ = c.SetDeadline(time.Now().Add(2 * time.Second))
			_, _ = c.Write([]byte("PING\r\n"))
			line, err := bufio.NewReader(c).ReadString('\n')
			c.Close()
			if err == nil && strings.HasPrefix(line, "+PONG") {
				return r, nil
			}
		}
		select {
		case <-r.done:
			return nil, errors.New("redis-server exited at start")
		default:
		}
	}
	r.stop()
	return nil, errors.New("redis-server did not answer within 30s")
}

func (r *redisProc) stop() {
	_ = r.cmd.Process.Kill()
	<-r.done
}

// runCluster runs a row across two Beacon nodes sharing one Redis:
// publishers on the first, subscribers on the second.
func runCluster(ctx context.Context, c contender, r compareRow) (result, error) {
	dir, err := os.MkdirTemp("", "beacon-compare-cluster-")
	if err != nil {
		return result{}, err
	}
	defer os.RemoveAll(dir)
	rp, err := startRedis(filepath.Join(dir, "redis"))
	if err != nil {
		return result{}, err
	}
	defer rp.stop()
	var nodes []*brokerProc
	defer func() {
		for _, n := range nodes {
			n.stop()
		}
	}()
	for _, id := range []string{"a", "b"} {
		b, err := c.start(filepath.Join(dir, id), brokerOptions{env: []string{"BEACON_CLUSTER_REDIS_URL=" + rp.url, "BEACON_CLUSTER_NODE_ID=" + id}})
		if err != nil {
			return result{}, fmt.Errorf("node %s: %w", id, err)
		}
		nodes = append(nodes, b)
	}
	cfg := r.cfg
	cfg.Addr, cfg.SubAddr, cfg.PID = nodes[0].mqtt, nodes[1].mqtt, nodes[0].pid()
	return bench(ctx, cfg)
}
