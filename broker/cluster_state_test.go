package broker_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"
	"github.com/redis/go-redis/v9"

	"github.com/beaconmq/beacon/broker"
	bt "github.com/beaconmq/beacon/broker/brokertest"
	"github.com/beaconmq/beacon/broker/cluster/clustertest"
)

const clusterRules = `
rules:
  - subjects: [device]
    actions: [subscribe]
    topics: ["$beacon/presence/#"]
    effect: allow
  - subjects: [device]
    actions: [publish]
    topics: ["%s"]
    effect: allow
`

// clusterNode starts a broker that joins the cluster on r as id, with
// its own rules file allowing devices to publish to pubTopic.
func clusterNode(t *testing.T, r *clustertest.Redis, id, pubTopic string) (*broker.Broker, string) {
	t.Helper()
	cfg := bt.Config(t)
	cfg.Cluster.RedisURL = r.URL()
	cfg.Cluster.NodeID = id
	cfg.Cluster.Heartbeat = 200 * time.Millisecond
	cfg.Auth.AdminToken = adminToken
	cfg.Auth.FailDelay = 0
	cfg.Auth.ACLFile = filepath.Join(t.TempDir(), "acl.yaml")
	writeRules(t, cfg.Auth.ACLFile, pubTopic)
	b := bt.Start(t, cfg)
	bt.WaitFor(t, 20*time.Second, id+" ready", func() bool { return readyz(b) == 200 })
	return b, cfg.Auth.ACLFile
}

func writeRules(t *testing.T, path, pubTopic string) {
	t.Helper()
	if err := os.WriteFile(path, fmt.Appendf(nil, clusterRules, pubTopic), 0o600); err != nil {
		t.Fatal(err)
	}
}

func readyz(b *broker.Broker) int {
	resp, err := httpClient.Get("http://" + b.HTTPAddr() + "/readyz")
	if err != nil {
		return 0
	}
	resp.Body.Close()
	return resp.StatusCode
}

var httpClient = &http.Client{Timeout: 10 * time.Second}

func addDevice(t *testing.T, b *broker.Broker, id string) string {
	t.Helper()
	code, body := api(t, "POST", "http://"+b.HTTPAddr()+"/api/v1/devices", adminToken, map[string]any{"id": id})
	if code != 201 {
		t.Fatalf("add %s: %d %v", id, code, body)
	}
	return body["secret"].(string)
}

func login(b *broker.Broker, client, user, secret string) (*bt.Client, error) {
	return bt.TryDial(b.MQTTAddr("tcp"), &paho.Connect{ClientID: client, CleanStart: true, KeepAlive: 30,
		Username: user, UsernameFlag: true, Password: []byte(secret), PasswordFlag: true})
}

func TestClusterDevices(t *testing.T) {
	r := clustertest.StartRedis(t)
	a, _ := clusterNode(t, r, "a", "a/#")
	b, _ := clusterNode(t, r, "b", "a/#")

	secret := addDevice(t, a, "pump-1")
	var c *bt.Client
	bt.WaitFor(t, 20*time.Second, "pump-1 logs in on b with the secret given by a", func() bool {
		var err error
		c, err = login(b, "pump-1-c", "pump-1", secret)
		return err == nil
	})

	// Rotated on a: b closes the live connection and refuses the old secret.
	code, body := api(t, "POST", "http://"+a.HTTPAddr()+"/api/v1/devices/pump-1/rotate", adminToken, nil)
	if code != 200 {
		t.Fatalf("rotate: %d %v", code, body)
	}
	newSecret := body["secret"].(string)
	bt.WaitFor(t, 20*time.Second, "b closes pump-1's connection", func() bool {
		d := c.ServerDisconnect()
		return d != nil && d.ReasonCode == 0x87
	})
	if c2, err := login(b, "pump-1-c", "pump-1", secret); err == nil {
		_ = c2.Disconnect(&paho.Disconnect{})
		t.Fatal("b accepts the old secret after a rotate on a")
	}
	bt.WaitFor(t, 20*time.Second, "the new secret on b", func() bool {
		c2, err := login(b, "pump-1-c", "pump-1", newSecret)
		if err == nil {
			_ = c2.Disconnect(&paho.Disconnect{})
		}
		return err == nil
	})

	// Removed on b: a refuses it.
	if code, _ := api(t, "DELETE", "http://"+b.HTTPAddr()+"/api/v1/devices/pump-1", adminToken, nil); code != 204 {
		t.Fatalf("remove: %d", code)
	}
	bt.WaitFor(t, 20*time.Second, "a refuses the removed device", func() bool {
		c2, err := login(a, "pump-1-c", "pump-1", newSecret)
		if err == nil {
			_ = c2.Disconnect(&paho.Disconnect{})
		}
		return err != nil
	})

	// Redis away: known devices log in, changes are refused with 503.
	keep := addDevice(t, a, "keep-1")
	bt.WaitFor(t, 20*time.Second, "keep-1 known on b", func() bool {
		code, _ := api(t, "GET", "http://"+b.HTTPAddr()+"/api/v1/devices/keep-1", adminToken, nil)
		return code == 200
	})
	r.Kill()
	bt.WaitFor(t, 20*time.Second, "a not ready", func() bool { return readyz(a) == 503 })
	code, body = api(t, "POST", "http://"+a.HTTPAddr()+"/api/v1/devices", adminToken, map[string]any{"id": "while-down"})
	if code != 503 {
		t.Fatalf("add while redis is away: %d %v", code, body)
	}
	if code, _ := api(t, "DELETE", "http://"+a.HTTPAddr()+"/api/v1/devices/keep-1", adminToken, nil); code != 503 {
		t.Fatalf("remove while redis is away: %d", code)
	}
	c3, err := login(b, "keep-1-c", "keep-1", keep)
	if err != nil {
		t.Fatalf("login of a known device while redis is away: %v", err)
	}
	_ = c3.Disconnect(&paho.Disconnect{})
}

func TestClusterRules(t *testing.T) {
	r := clustertest.StartRedis(t)
	a, fileA := clusterNode(t, r, "a", "a/#")
	b, _ := clusterNode(t, r, "b", "b/#") // its file differs: the cluster's (a's) are in force
	secret := addDevice(t, a, "d1")
	var c *bt.Client
	bt.WaitFor(t, 20*time.Second, "d1 on b", func() bool {
		var err error
		c, err = login(b, "d1-c", "d1", secret)
		return err == nil
	})
	t.Cleanup(func() { _ = c.Disconnect(&paho.Disconnect{}) })
	allowed := func(topic string) bool {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		res, err := c.Publish(ctx, &paho.Publish{Topic: topic, QoS: 1, Payload: []byte("1")})
		if res == nil && err != nil {
			t.Fatalf("publish %s: %v", topic, err)
		}
		return err == nil && res.ReasonCode < 0x80
	}
	if !allowed("a/1") || allowed("b/1") {
		t.Fatal("b does not apply the cluster's rules (a's file)")
	}

	// A reload on a reaches b.
	writeRules(t, fileA, "z/#")
	code, body := api(t, "POST", "http://"+a.HTTPAddr()+"/api/v1/acl/reload", adminToken, nil)
	if code != 200 {
		t.Fatalf("reload: %d %v", code, body)
	}
	bt.WaitFor(t, 20*time.Second, "b applies a's reload", func() bool { return allowed("z/1") })
	if allowed("a/1") {
		t.Fatal("the old rules still allow a/1 on b")
	}
}

// presenceLog collects the presence messages a subscriber gets.
type presenceLog struct {
	mu  sync.Mutex
	evs []broker.PresenceEvent
}

func watchPresence(t *testing.T, b *broker.Broker, client, user, secret string, pl *presenceLog) {
	t.Helper()
	c := bt.Dial(t, b.MQTTAddr("tcp"), &paho.Connect{ClientID: client, CleanStart: true, KeepAlive: 30,
		Username: user, UsernameFlag: true, Password: []byte(secret), PasswordFlag: true})
	c.AddOnPublishReceived(func(pr paho.PublishReceived) (bool, error) {
		var e broker.PresenceEvent
		if json.Unmarshal(pr.Packet.Payload, &e) == nil && e.Device == "sensor-1" {
			pl.mu.Lock()
			pl.evs = append(pl.evs, e)
			pl.mu.Unlock()
		}
		return true, nil
	})
	c.SubscribeT(t, paho.SubscribeOptions{Topic: "$beacon/presence/sensor-1", QoS: 1})
}

func (pl *presenceLog) onlines() []bool {
	pl.mu.Lock()
	defer pl.mu.Unlock()
	var out []bool
	for _, e := range pl.evs {
		out = append(out, e.Online)
	}
	return out
}

func onlineDevices(t *testing.T, b *broker.Broker) []string {
	t.Helper()
	code, body := api(t, "GET", "http://"+b.HTTPAddr()+"/api/v1/devices?online=true", adminToken, nil)
	if code != 200 {
		t.Fatalf("list: %d", code)
	}
	var ids []string
	for _, d := range body["devices"].([]any) {
		ids = append(ids, d.(map[string]any)["id"].(string))
	}
	return ids
}

func TestClusterPresence(t *testing.T) {
	r := clustertest.StartRedis(t)
	a, _ := clusterNode(t, r, "a", "a/#")
	b, _ := clusterNode(t, r, "b", "a/#")
	c, _ := clusterNode(t, r, "c", "a/#")
	secret := addDevice(t, a, "sensor-1")
	watch := addDevice(t, a, "watcher")
	for _, n := range []*broker.Broker{b, c} {
		bt.WaitFor(t, 20*time.Second, "devices known everywhere", func() bool {
			code, _ := api(t, "GET", "http://"+n.HTTPAddr()+"/api/v1/devices/watcher", adminToken, nil)
			return code == 200
		})
	}
	// One subscriber on each node: each sees every presence message once,
	// whichever node said it (messages are forwarded between nodes).
	logs := map[string]*presenceLog{"a": {}, "b": {}, "c": {}}
	for name, n := range map[string]*broker.Broker{"a": a, "b": b, "c": c} {
		watchPresence(t, n, "watch-"+name, "watcher", watch, logs[name])
	}
	// want starts with the offline said when the device was added, which
	// a's watcher sees; the others see it only if the retained message
	// reached their node before they subscribed (the cluster's retained
	// messages are not this test's subject).
	saw := func(what string, want []bool, names ...string) {
		t.Helper()
		for _, name := range names {
			ok := func(got []bool) bool {
				return slices.Equal(got, want) || (name != "a" && slices.Equal(got, want[1:]))
			}
			deadline := time.Now().Add(20 * time.Second)
			for !ok(logs[name].onlines()) {
				if time.Now().After(deadline) {
					t.Fatalf("%s's watcher: %s: saw online=%v, want %v", name, what, logs[name].onlines(), want)
				}
				time.Sleep(10 * time.Millisecond)
			}
		}
	}
	saw("the new device offline", []bool{false}, "a")

	s1, err := login(a, "s1-a", "sensor-1", secret)
	if err != nil {
		t.Fatal(err)
	}
	for name, n := range map[string]*broker.Broker{"b": b, "c": c} {
		bt.WaitFor(t, 20*time.Second, "sensor-1 online in "+name+"'s registry", func() bool {
			return slices.Contains(onlineDevices(t, n), "sensor-1")
		})
	}
	saw("online", []bool{false, true}, "a", "b", "c")

	// Also on b; gone from a: still online, nothing said.
	s2, err := login(b, "s1-b", "sensor-1", secret)
	if err != nil {
		t.Fatal(err)
	}
	bt.WaitFor(t, 20*time.Second, "b's connection in redis", func() bool {
		v, _ := redisHGet(t, r, "beacon:presence", "sensor-1")
		return v == `{"a":1,"b":1}` || v == `{"b":1,"a":1}`
	})
	if err := s1.Disconnect(&paho.Disconnect{}); err != nil {
		t.Fatal(err)
	}
	bt.WaitFor(t, 20*time.Second, "a's connection gone from redis", func() bool {
		v, _ := redisHGet(t, r, "beacon:presence", "sensor-1")
		return v == `{"b":1}`
	})
	// Each node's registry says online (a's learns b's connection from its
	// own write or from b's announcement, whichever it meets first); the
	// watchers, which hear what the cluster says, see no offline at all
	// (checked below: offline is said once).
	for name, n := range map[string]*broker.Broker{"a": a, "b": b, "c": c} {
		bt.WaitFor(t, 20*time.Second, "sensor-1 online in "+name+"'s registry while connected to b", func() bool {
			return slices.Contains(onlineDevices(t, n), "sensor-1")
		})
	}

	// Gone from b too: offline, said once (the watchers would have seen an
	// offline said when a's connection went before this one).
	if err := s2.Disconnect(&paho.Disconnect{}); err != nil {
		t.Fatal(err)
	}
	saw("offline", []bool{false, true, false}, "a", "b", "c")
	for _, n := range []*broker.Broker{a, b, c} {
		bt.WaitFor(t, 20*time.Second, "sensor-1 offline everywhere", func() bool {
			return !slices.Contains(onlineDevices(t, n), "sensor-1")
		})
	}

	// Connected to c, which shuts down: its presence goes with it.
	if _, err := login(c, "s1-c", "sensor-1", secret); err != nil {
		t.Fatal(err)
	}
	saw("online on c", []bool{false, true, false, true}, "a", "b")
	bt.Stop(t, c)
	bt.WaitFor(t, 20*time.Second, "offline on a after c left", func() bool { return !slices.Contains(onlineDevices(t, a), "sensor-1") })
	if v, _ := redisHGet(t, r, "beacon:presence", "sensor-1"); v != "" {
		t.Fatalf("c's presence left behind: %q", v)
	}
	saw("offline after c left", []bool{false, true, false, true, false}, "a", "b")
}

func redisHGet(t *testing.T, r *clustertest.Redis, key, field string) (string, error) {
	t.Helper()
	c := redis.NewClient(&redis.Options{Addr: r.Addr()})
	defer c.Close()
	v, err := c.HGet(context.Background(), key, field).Result()
	if err == redis.Nil {
		return "", nil
	}
	return v, err
}

func TestClusterDevicesCountAsAuthentication(t *testing.T) {
	// A node without devices, rules or JWT keys of its own, with a listener
	// beyond loopback, starts when the cluster has devices, and not when it
	// has none.
	r := clustertest.StartRedis(t)
	exposed := func() broker.Config {
		cfg := bt.Config(t)
		cfg.MQTT.Addr = "0.0.0.0:0"
		cfg.Cluster.RedisURL = r.URL()
		cfg.Cluster.NodeID = "b"
		cfg.Cluster.Heartbeat = 200 * time.Millisecond
		return cfg
	}
	if b, err := broker.New(exposed(), bt.Logger(t)); err == nil {
		_ = b.Shutdown(context.Background())
		t.Fatal("an exposed node without authentication started on a cluster without devices")
	}
	a, _ := clusterNode(t, r, "a", "a/#")
	addDevice(t, a, "d1")
	b, err := broker.New(exposed(), bt.Logger(t))
	if err != nil {
		t.Fatalf("an exposed node on a cluster with devices: %v", err)
	}
	_ = b.Shutdown(context.Background())
}
