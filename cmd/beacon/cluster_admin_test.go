package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"
	"github.com/redis/go-redis/v9"

	bt "github.com/beaconmq/beacon/broker/brokertest"
	"github.com/beaconmq/beacon/broker/cluster/clustertest"
)

// TestClusterStatusAndForget: `beacon cluster status` lists the nodes
// with what waits for them; `beacon cluster forget` refuses a node that
// is alive and removes one that is gone: its keys go, its sessions are
// released, and the others stop forwarding to it.
func TestClusterStatusAndForget(t *testing.T) {
	rds := clustertest.StartRedis(t)
	a := clusterNode(t, rds.URL(), "a", filepath.Join(t.TempDir(), "a"))
	b := clusterNode(t, rds.URL(), "b", filepath.Join(t.TempDir(), "b"))
	conf := filepath.Join(t.TempDir(), "cli.yaml")
	if err := os.WriteFile(conf, []byte("cluster:\n  redis_url: \""+rds.URL()+"\"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	cli := func(args ...string) (string, error) {
		cmd := exec.Command(beaconBin, append(args, "--config", conf)...)
		cmd.Env = cleanEnv()
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	// b holds a persistent session subscribed to plant/#, then stops.
	hour := uint32(3600)
	sub := bt.Dial(t, b.mqtt, &paho.Connect{ClientID: "sub-b", CleanStart: true, Properties: &paho.ConnectProperties{SessionExpiryInterval: &hour}})
	sub.SubscribeT(t, paho.SubscribeOptions{Topic: "plant/#", QoS: 1})
	_ = sub.Disconnect(&paho.Disconnect{})
	rdb := redis.NewClient(&redis.Options{Addr: rds.Addr()})
	defer rdb.Close()
	ctx := context.Background()
	bt.WaitFor(t, 20*time.Second, "a forwards plant/# to b", func() bool {
		n, _ := rdb.HLen(ctx, "beacon:interest:b").Result()
		return n == 1
	})
	if code := b.stop(t, syscall.SIGTERM); code != 0 {
		t.Fatalf("b exited with %d", code)
	}
	pub := bt.Dial(t, a.mqtt, &paho.Connect{ClientID: "pub-a", CleanStart: true})
	for range 3 {
		pub.PublishT(t, &paho.Publish{Topic: "plant/1", QoS: 1, Payload: []byte("x")})
	}
	bt.WaitFor(t, 20*time.Second, "b's heartbeat to expire and its messages to wait", func() bool {
		out, err := cli("cluster", "status")
		return err == nil && lineHas(out, "b ", "false", " 3 ", " 1") && lineHas(out, "a ", "true")
	})

	if out, err := cli("cluster", "forget", "a"); err == nil || !strings.Contains(out, "alive") {
		t.Fatalf("forget of a live node: %v\n%s", err, out)
	}
	out, err := cli("cluster", "forget", "b")
	if err != nil || !strings.Contains(out, "3 messages that waited for it dropped, 1 sessions it held released") {
		t.Fatalf("forget b: %v\n%s", err, out)
	}
	keys, _ := rdb.Keys(ctx, "beacon:*b*").Result()
	for _, k := range keys {
		if strings.Contains(k, ":b:") || strings.HasSuffix(k, ":b") {
			t.Errorf("key %s left after forget", k)
		}
	}
	if v, _ := rdb.HExists(ctx, "beacon:nodes", "b").Result(); v {
		t.Error("b still in the nodes hash")
	}
	if v, _ := rdb.HExists(ctx, "beacon:owner", "sub-b").Result(); v {
		t.Error("b's session still owned")
	}
	out, _ = cli("cluster", "status")
	t.Logf("status after forget:\n%s", out)
	if strings.Contains(out, "\nb ") || !lineHas(out, "a ", "true") {
		t.Fatalf("status after forget:\n%s", out)
	}
	// a stops forwarding to b, retained messages included (which go to
	// every node it knows), at once rather than 30 s later. a's forwarder
	// sends one batch at a time: once probe k+1 is in the retained hash,
	// probe k's stream entry, had there been one, is in Redis. Two clean
	// looks in a row therefore mean probe k went to no stream. Entries
	// made before a heard of the forget are cleared and it tries again.
	probe, clean := 0, 0
	bt.WaitFor(t, 20*time.Second, "a to stop forwarding to b", func() bool {
		probe++
		payload := fmt.Sprint("probe-", probe)
		pub.PublishT(t, &paho.Publish{Topic: "plant/2", QoS: 1, Retain: true, Payload: []byte(payload)})
		bt.WaitFor(t, 20*time.Second, "the probe in the retained hash", func() bool {
			v, _ := rdb.HGet(ctx, "beacon:retained", "plant/2").Result()
			return strings.Contains(v, payload)
		})
		streams, _ := rdb.Keys(ctx, "beacon:fwd:b:*").Result()
		inbox, _ := rdb.Exists(ctx, "beacon:inbox:b").Result()
		if len(streams) == 0 && inbox == 0 {
			clean++
			return clean >= 2
		}
		clean = 0
		rdb.Del(ctx, append(streams, "beacon:inbox:b")...)
		return false
	})
}

// lineHas reports whether a line of out starts with prefix and holds
// every one of parts.
func lineHas(out, prefix string, parts ...string) bool {
	for _, l := range strings.Split(out, "\n") {
		if !strings.HasPrefix(l, prefix) {
			continue
		}
		ok := true
		for _, p := range parts {
			ok = ok && strings.Contains(l+" ", p)
		}
		if ok {
			return true
		}
	}
	return false
}
