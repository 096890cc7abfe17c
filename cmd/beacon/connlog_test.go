package main

import (
	"context"
	"encoding/json"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"

	bt "github.com/beaconmq/beacon/broker/brokertest"
)

// TestConnectionLog: with log.connections, connects, subscriptions,
// unsubscriptions and disconnects are logged at INFO like mosquitto -v,
// with neither the password nor any payload.
func TestConnectionLog(t *testing.T) {
	dir := t.TempDir()
	data := filepath.Join(dir, "data")
	conf := filepath.Join(dir, "beacon.yaml")
	writeFile(t, conf, "log:\n  connections: true\nauth:\n  fail_delay: 0s\n")
	out, err := exec.Command(beaconBin, "devices", "add", "kitchen-1", "--data-dir", data, "--json").Output()
	var added struct{ Secret string }
	if err != nil || json.Unmarshal(out, &added) != nil {
		t.Fatalf("devices add: %v %s", err, out)
	}
	p := startBeacon(t, data, "--config", conf)

	sub := startMosqSub(t, p.mqtt, "-i", "k1-sub", "-u", "kitchen-1", "-P", added.Secret, "-k", "45",
		"-t", "devices/kitchen-1/cmd/#", "-q", "1", "-C", "1")
	mosqPub(t, p.mqtt, "-i", "k1-pub", "-u", "kitchen-1", "-P", added.Secret, "-t", "devices/kitchen-1/cmd/set", "-m", "payload-must-not-be-logged")
	sub.wait(t, 10*time.Second)

	c := bt.Dial(t, p.mqtt, &paho.Connect{ClientID: "k1-v5", CleanStart: false, KeepAlive: 20, Username: "kitchen-1", UsernameFlag: true,
		Password: []byte(added.Secret), PasswordFlag: true})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, _ = c.Subscribe(ctx, &paho.Subscribe{Subscriptions: []paho.SubscribeOptions{{Topic: "devices/kitchen-1/cmd/+", QoS: 2}, {Topic: "#", QoS: 0}}})
	if _, err := c.Unsubscribe(ctx, &paho.Unsubscribe{Topics: []string{"devices/kitchen-1/cmd/+", "never/subscribed"}}); err != nil {
		t.Fatal(err)
	}
	_ = c.Disconnect(&paho.Disconnect{})

	type rec map[string]any
	find := func(msg, client string) rec {
		for _, l := range strings.Split(p.Logs(), "\n") {
			var r rec
			if json.Unmarshal([]byte(l), &r) == nil && r["msg"] == msg && r["client"] == client {
				return r
			}
		}
		return nil
	}
	bt.WaitFor(t, 10*time.Second, "the disconnect lines of k1-pub and k1-v5", func() bool {
		return find("client disconnected", "k1-v5") != nil && find("client disconnected", "k1-pub") != nil
	})
	check := func(r rec, what string, want map[string]any) {
		t.Helper()
		if r == nil {
			t.Errorf("no %s line", what)
			return
		}
		if r["level"] != "INFO" {
			t.Errorf("%s at %v", what, r["level"])
		}
		for k, v := range want {
			got, _ := json.Marshal(r[k])
			exp, _ := json.Marshal(v)
			if string(got) != string(exp) {
				t.Errorf("%s: %s = %s, want %s (%v)", what, k, got, exp, r)
			}
		}
	}
	connected := find("client connected", "k1-sub")
	check(connected, "connect (3.1.1)", map[string]any{"protocol": "3.1.1", "clean_start": true, "keep_alive": 45, "username": "kitchen-1"})
	if r, _ := connected["remote"].(string); !strings.HasPrefix(r, "127.0.0.1:") {
		t.Errorf("connect: remote %v", connected["remote"])
	}
	check(find("client connected", "k1-v5"), "connect (5)", map[string]any{"protocol": "5", "clean_start": false, "keep_alive": 20})
	check(find("subscribed", "k1-sub"), "subscribe (3.1.1)", map[string]any{"filters": []string{"devices/kitchen-1/cmd/#"}, "granted": []int{1}})
	check(find("subscribed", "k1-v5"), "subscribe (5)", map[string]any{"filters": []string{"devices/kitchen-1/cmd/+", "#"}, "granted": []int{2, 0x87}})
	check(find("unsubscribed", "k1-v5"), "unsubscribe (5)", map[string]any{"filters": []string{"devices/kitchen-1/cmd/+", "never/subscribed"}, "reasons": []int{0, 0x11}})
	check(find("client disconnected", "k1-pub"), "disconnect (3.1.1)", map[string]any{"reason": "client disconnected"})
	check(find("client disconnected", "k1-v5"), "disconnect (5)", map[string]any{"reason": "client disconnected"})
	if logs := p.Logs(); strings.Contains(logs, added.Secret) || strings.Contains(logs, "payload-must-not-be-logged") {
		t.Fatal("the log holds the password or a payload")
	}
}
