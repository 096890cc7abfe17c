package broker_test

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"
	"github.com/redis/go-redis/v9"

	bt "github.com/beaconmq/beacon/broker/brokertest"
	"github.com/beaconmq/beacon/broker/cluster/clustertest"
)

// Two nodes reach Redis through a Sentinel; the master is SIGKILLed under
// QoS 1 load and the Sentinel promotes its replica: the nodes follow it
// by themselves, and every message acknowledged on a reaches b's
// subscriber once.
func TestClusterSentinelFailover(t *testing.T) {
	master := clustertest.StartRedis(t, "--appendonly", "yes")
	replica := clustertest.StartRedis(t, "--appendonly", "yes", "--replicaof", "127.0.0.1", fmt.Sprint(master.Port))
	sentinel := clustertest.StartSentinel(t, master)
	rdb := redis.NewClient(&redis.Options{Addr: replica.Addr()})
	defer rdb.Close()
	ctx := context.Background()
	role := func() string {
		info, _ := rdb.Info(ctx, "replication").Result()
		for _, l := range strings.Split(info, "\n") {
			if v, ok := strings.CutPrefix(strings.TrimSpace(l), "role:"); ok {
				return v
			}
		}
		return ""
	}
	bt.WaitFor(t, 20*time.Second, "the replica in sync", func() bool {
		info, _ := rdb.Info(ctx, "replication").Result()
		return strings.Contains(info, "master_link_status:up")
	})

	ca, cb := clusterConfig(t, master, "a"), clusterConfig(t, master, "b")
	ca.Cluster.RedisURL, cb.Cluster.RedisURL = sentinel.URL(), sentinel.URL()
	a := bt.Start(t, ca)
	b := bt.Start(t, cb)
	bt.WaitFor(t, 20*time.Second, "both reach Redis through the Sentinel", func() bool {
		return a.ClusterRouter().Up() && b.ClusterRouter().Up()
	})
	sub := bt.Dial(t, b.MQTTAddr("tcp"), persistent("sub-b", true))
	sub.SubscribeT(t, paho.SubscribeOptions{Topic: "load/#", QoS: 1})
	waitWants(t, a, "load/x", "b")

	pub := bt.Dial(t, a.MQTTAddr("tcp"), &paho.Connect{ClientID: "pub-a", CleanStart: true})
	var mu sync.Mutex
	var acked []string
	stop := make(chan struct{})
	done := make(chan error, 1)
	go func() {
		for i := 0; ; i++ {
			select {
			case <-stop:
				done <- nil
				return
			default:
			}
			p := fmt.Sprintf("m%d", i)
			cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			_, err := pub.Publish(cctx, &paho.Publish{Topic: "load/x", QoS: 1, Payload: []byte(p)})
			cancel()
			if err != nil {
				done <- err
				return
			}
			mu.Lock()
			acked = append(acked, p)
			mu.Unlock()
			time.Sleep(time.Millisecond)
		}
	}()
	count := func() int {
		mu.Lock()
		defer mu.Unlock()
		return len(acked)
	}
	bt.WaitFor(t, 20*time.Second, "200 acknowledged before the failover", func() bool { return count() >= 200 })
	master.Kill()
	bt.WaitFor(t, 30*time.Second, "the Sentinel promotes the replica", func() bool { return role() == "master" })
	n := count()
	bt.WaitFor(t, 30*time.Second, "200 more acknowledged after it", func() bool { return count() >= n+200 })
	close(stop)
	if err := <-done; err != nil {
		t.Fatalf("publish: %v", err)
	}
	mu.Lock()
	want := append([]string(nil), acked...)
	mu.Unlock()
	bt.WaitFor(t, 60*time.Second, fmt.Sprintf("all %d acknowledged messages on b", len(want)), func() bool {
		return sub.Count() >= len(want)
	})
	got := map[string]int{}
	for _, m := range sub.Messages() {
		got[string(m.Payload)]++
	}
	for _, p := range want {
		if got[p] != 1 {
			t.Fatalf("%s reached b %d times (of %d acknowledged)", p, got[p], len(want))
		}
	}
	bt.WaitFor(t, 20*time.Second, "both nodes up again", func() bool {
		return a.ClusterRouter().Up() && b.ClusterRouter().Up()
	})
}
