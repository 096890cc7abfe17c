package main

import (
	"context"
	"encoding/json"
	"net"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"

	bt "github.com/beaconmq/beacon/broker/brokertest"
)

// TestReadmeDevicePath walks the README's "register a device" path with the
// built binary and no rules file: the built-in rules let the device publish
// under devices/<id>/ and a token holder receive it; everything else is
// refused, logged at WARN with the rule that decided, and a v5 client is
// told 0x87.
func TestReadmeDevicePath(t *testing.T) {
	mosqPubBin := bt.RequireTool(t, "mosquitto_pub", "mosquitto-clients")
	dir := t.TempDir()
	data := filepath.Join(dir, "data")
	conf := filepath.Join(dir, "beacon.yaml")
	writeFile(t, conf, "auth:\n  jwt_secret: jwt-secret-0123456789-0123456789-xx\n  fail_delay: 0s\n")

	out, err := exec.Command(beaconBin, "devices", "add", "kitchen-1", "--type", "thermostat", "--data-dir", data, "--json").Output()
	var added struct{ Secret string }
	if err != nil || json.Unmarshal(out, &added) != nil || added.Secret == "" {
		t.Fatalf("devices add: %v %q", err, out)
	}
	p := startBeacon(t, data, "--config", conf)
	logs := p.Logs()
	for _, want := range []string{
		`"msg":"rules in force","source":"built-in","rules":2`,
		`"rule":"built-in rule 1: allow publish devices/%u/# for device"`,
		`"rule":"built-in rule 2: allow subscribe devices/%u/cmd/# for device"`,
	} {
		if !strings.Contains(logs, want) {
			t.Errorf("start log lacks %s", want)
		}
	}

	code, tok, errOut := runCLI(t, nil, "token", "--config", conf, "--sub", "dashboard", "--subscribe", "devices/#", "--ttl", "1h")
	if code != 0 {
		t.Fatalf("token: %s", errOut)
	}
	sub := startMosqSub(t, p.mqtt, "-u", "dashboard", "-P", strings.TrimSpace(tok), "-t", "devices/#", "-v", "-C", "1")
	host, port, _ := net.SplitHostPort(p.mqtt)
	pub := func(topic string) {
		t.Helper()
		if out, err := exec.Command(mosqPubBin, "-h", host, "-p", port, "-u", "kitchen-1", "-P", added.Secret, "-t", topic, "-m", "21.5").CombinedOutput(); err != nil {
			t.Fatalf("mosquitto_pub %s: %v %s", topic, err, out)
		}
	}
	pub("devices/hall-2/temp") // another device's topic: acknowledged (3.1.1), dropped
	pub("devices/kitchen-1/temp")
	if got := strings.Join(sub.wait(t, 10*time.Second), "|"); got != "devices/kitchen-1/temp 21.5" {
		t.Fatalf("subscriber got %q", got)
	}
	bt.WaitFor(t, 10*time.Second, "the WARN line of the denied publish", func() bool {
		return strings.Contains(p.Logs(), `"level":"WARN","msg":"not authorized"`)
	})
	var denied map[string]any
	for _, l := range strings.Split(p.Logs(), "\n") {
		if strings.Contains(l, `"msg":"not authorized"`) {
			_ = json.Unmarshal([]byte(l), &denied)
			break
		}
	}
	if denied["topic"] != "devices/hall-2/temp" || denied["decided_by"] != "no rule matched" || denied["action"] != "publish" {
		t.Fatalf("denied publish logged as %v", denied)
	}
	if strings.Contains(p.Logs(), added.Secret) || strings.Contains(p.Logs(), "21.5") {
		t.Fatal("the log holds the secret or a payload")
	}

	// MQTT 5: told 0x87 for QoS 1; its own commands may be subscribed, nothing else.
	c := bt.Dial(t, p.mqtt, &paho.Connect{ClientID: "k1", CleanStart: true, Username: "kitchen-1", UsernameFlag: true,
		Password: []byte(added.Secret), PasswordFlag: true})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if r, _ := c.Publish(ctx, &paho.Publish{Topic: "home/kitchen/temp", QoS: 1, Payload: []byte("x")}); r == nil || r.ReasonCode != 0x87 {
		t.Fatalf("publish outside devices/kitchen-1: %+v, want PUBACK 0x87", r)
	}
	sa, err := c.Subscribe(ctx, &paho.Subscribe{Subscriptions: []paho.SubscribeOptions{
		{Topic: "devices/kitchen-1/cmd/#", QoS: 1}, {Topic: "devices/#", QoS: 1}}})
	// paho reports a refused filter as an error; the reason codes are the point.
	if sa == nil || len(sa.Reasons) != 2 || sa.Reasons[0] != 1 || sa.Reasons[1] != 0x87 {
		t.Fatalf("subscribe: %+v %v, want [1 0x87]", sa, err)
	}
}
