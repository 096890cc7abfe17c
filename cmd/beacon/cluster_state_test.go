package main

import (
	"encoding/json"
	"io"
	"net/http"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"

	bt "github.com/beaconmq/beacon/broker/brokertest"
	"github.com/beaconmq/beacon/broker/cluster/clustertest"
)

const clusterACL = "rules:\n  - subjects: [device]\n    actions: [publish]\n    topics: [\"ROOT/%u/#\"]\n    effect: allow\n"

// clusterConf writes a node's configuration: its own data directory and
// rules file, the shared Redis.
func clusterConf(t *testing.T, r *clustertest.Redis, id, topicRoot string) (conf, data, acl string) {
	t.Helper()
	dir := t.TempDir()
	data = filepath.Join(dir, "data")
	acl = filepath.Join(dir, "acl.yaml")
	writeFile(t, acl, strings.ReplaceAll(clusterACL, "ROOT", topicRoot))
	conf = filepath.Join(dir, "beacon.yaml")
	writeFile(t, conf, "storage:\n  dir: "+data+"\nauth:\n  acl_file: "+acl+"\n  admin_token: admin-token-0123456789\n  fail_delay: 0s\n"+
		"cluster:\n  redis_url: "+r.URL()+"\n  node_id: "+id+"\n  heartbeat: 500ms\n")
	return conf, data, acl
}

func onlineOn(t *testing.T, httpAddr string) []string {
	t.Helper()
	req, _ := http.NewRequest("GET", "http://"+httpAddr+"/api/v1/devices?online=true", nil)
	req.Header.Set("Authorization", "Bearer admin-token-0123456789")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	var out struct {
		Devices []struct{ ID string }
	}
	if err := json.Unmarshal(body, &out); err != nil {
		t.Fatalf("list: %s", body)
	}
	var ids []string
	for _, d := range out.Devices {
		ids = append(ids, d.ID)
	}
	return ids
}

func dialDevice(addr, client, user, secret string) (*bt.Client, error) {
	return bt.TryDial(addr, &paho.Connect{ClientID: client, CleanStart: true, KeepAlive: 30,
		Username: user, UsernameFlag: true, Password: []byte(secret), PasswordFlag: true})
}

// TestClusterSharedState runs two beacon processes on one redis-server: a
// device registered on a single node before it joined, and one added with
// the CLI against node A, log in on node B; a SIGHUP on A reaches B; a
// device connected to A is online on B until A is killed.
func TestClusterSharedState(t *testing.T) {
	r := clustertest.StartRedis(t)
	confA, dataA, aclA := clusterConf(t, r, "a", "a")
	confB, dataB, _ := clusterConf(t, r, "b", "b")

	// A single node's device, registered before it joins a cluster.
	code, out, errOut := runCLI(t, nil, "devices", "add", "before-1", "--config", confA, "--json")
	var before struct{ Secret string }
	if code != 0 || json.Unmarshal([]byte(out), &before) != nil {
		t.Fatalf("devices add on the stopped node: %d %s", code, errOut)
	}
	a := startBeacon(t, dataA, "--config", confA)
	bt.WaitFor(t, 20*time.Second, "a says it copied its device up", func() bool {
		return strings.Contains(a.Logs(), `"copied":1`)
	})
	b := startBeacon(t, dataB, "--config", confB)
	bt.WaitFor(t, 20*time.Second, "b takes the cluster's rules", func() bool {
		return strings.Contains(b.Logs(), "differ from this node's auth.acl_file")
	})

	c, err := dialDevice(b.mqtt, "before-1", "before-1", before.Secret)
	if err != nil {
		t.Fatalf("a's earlier device on b: %v", err)
	}
	_ = c.Disconnect(&paho.Disconnect{})

	code, out, errOut = runCLI(t, nil, "devices", "add", "sensor-1", "--config", confA, "--http-addr", a.http, "--json")
	var added struct{ Secret string }
	if code != 0 || json.Unmarshal([]byte(out), &added) != nil {
		t.Fatalf("devices add against node a: %d %s", code, errOut)
	}
	var dev *bt.Client
	bt.WaitFor(t, 20*time.Second, "sensor-1 logs in on b", func() bool {
		dev, err = dialDevice(b.mqtt, "sensor-1", "sensor-1", added.Secret)
		return err == nil
	})
	publishes := func(topic string) bool {
		res, err := dev.Publish(t.Context(), &paho.Publish{Topic: topic, QoS: 1, Payload: []byte("1")})
		if res == nil && err != nil {
			t.Fatalf("publish: %v", err)
		}
		return err == nil
	}
	if !publishes("a/sensor-1/t") || publishes("b/sensor-1/t") {
		t.Fatal("b does not apply a's rules (the cluster's)")
	}
	writeFile(t, aclA, strings.ReplaceAll(clusterACL, "ROOT", "z"))
	if err := a.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	bt.WaitFor(t, 20*time.Second, "b applies a's reload", func() bool { return publishes("z/sensor-1/t") })
	_ = dev.Disconnect(&paho.Disconnect{})

	// Online on a: online on b; a killed: offline on b once a's liveness key expires.
	if dev, err = dialDevice(a.mqtt, "sensor-1", "sensor-1", added.Secret); err != nil {
		t.Fatal(err)
	}
	bt.WaitFor(t, 20*time.Second, "sensor-1 online on b", func() bool { return slices.Contains(onlineOn(t, b.http), "sensor-1") })
	a.kill(t)
	bt.WaitFor(t, 30*time.Second, "sensor-1 offline on b after a died", func() bool { return !slices.Contains(onlineOn(t, b.http), "sensor-1") })

	// Redis away: the CLI's change is refused, and says why.
	r.Kill()
	bt.WaitFor(t, 30*time.Second, "b sees redis gone", func() bool { return strings.Contains(b.Logs(), "redis unreachable") })
	code, _, errOut = runCLI(t, nil, "devices", "add", "while-down", "--config", confB, "--http-addr", b.http)
	if code == 0 || !strings.Contains(errOut, "device registry unavailable") || !strings.Contains(errOut, "503") {
		t.Fatalf("devices add while redis is away: exit %d: %s", code, errOut)
	}
}
