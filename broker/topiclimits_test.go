package broker_test

import (
	"bytes"
	"context"
	"encoding/json"
	"net"
	"net/http"
	"net/url"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"
	"github.com/mochi-mqtt/server/v2/packets"

	bt "github.com/beaconmq/beacon/broker/brokertest"
)

// 60 KB topics are refused by the default mqtt.max_topic_length (1,024)
// with each protocol version's code, from real clients, and never
// delivered.
func TestLongTopicsRefused(t *testing.T) {
	b, addr := startBroker(t, nil)
	long := strings.Repeat("t", 60<<10)
	host, port, _ := net.SplitHostPort(addr)
	sub := bt.Dial(t, addr, &paho.Connect{ClientID: "watch", CleanStart: true})
	sub.SubscribeT(t, paho.SubscribeOptions{Topic: "#", QoS: 1})

	run := func(name string, args ...string) (string, error) {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		out, err := exec.CommandContext(ctx, bt.RequireTool(t, name, "mosquitto-clients"), append([]string{"-h", host, "-p", port}, args...)...).CombinedOutput()
		if ctx.Err() != nil {
			t.Fatalf("%s did not finish: %s", name, out)
		}
		return string(out), err
	}

	t.Run("mosquitto_pub v5 QoS 1: PUBACK 0x90", func(t *testing.T) {
		out, err := run("mosquitto_pub", "-V", "mqttv5", "-q", "1", "-t", long, "-m", "x")
		if err == nil && !strings.Contains(out, "Topic Name invalid") {
			t.Fatalf("mosquitto_pub: %v: %s", err, out)
		}
		if !strings.Contains(out, "Topic Name invalid") {
			t.Fatalf("mosquitto_pub printed %q, want the 0x90 reason", out)
		}
	})
	t.Run("3.1.1: connection closed", func(t *testing.T) {
		// QoS 1: mosquitto_pub waits for the PUBACK and sees the close.
		out, err := run("mosquitto_pub", "-V", "mqttv311", "-q", "1", "-t", long, "-m", "x")
		if err == nil {
			t.Fatalf("mosquitto_pub -q 1: exit 0 (%s), want the connection lost", out)
		}
		// QoS 0 has nothing to wait for (mosquitto_pub may be gone before
		// the close): a raw 3.1.1 client sees it.
		r := bt.DialRaw(t, addr, 4)
		r.Send(t, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect},
			Connect: packets.ConnectParams{ProtocolName: []byte("MQTT"), Clean: true, ClientIdentifier: "v3-long", Keepalive: 30}})
		r.Expect(t, packets.Connack)
		r.Send(t, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish}, TopicName: long, Payload: []byte("x")})
		r.Closed(t, 10*time.Second)
	})
	t.Run("mosquitto_sub: SUBACK refuses", func(t *testing.T) {
		for _, v := range []string{"mqttv5", "mqttv311"} {
			out, err := run("mosquitto_sub", "-V", v, "-t", long, "-W", "5", "-C", "1")
			if !strings.Contains(out, "denied") { // it exits 0 all the same
				t.Fatalf("mosquitto_sub -V %s: %v: %q, want the subscription denied", v, err, out)
			}
			if err != nil {
				t.Logf("mosquitto_sub -V %s: %v", v, err)
			}
		}
	})
	t.Run("paho v5", func(t *testing.T) {
		c := bt.Dial(t, addr, &paho.Connect{ClientID: "paho-long", CleanStart: true})
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		resp, err := c.Publish(ctx, &paho.Publish{Topic: long, QoS: 1, Payload: []byte("x")})
		if err == nil || resp == nil || resp.ReasonCode != 0x90 {
			t.Fatalf("QoS 1: %v (%+v), want PUBACK 0x90", err, resp)
		}
		sa, err := c.Subscribe(ctx, &paho.Subscribe{Subscriptions: []paho.SubscribeOptions{{Topic: long + "/#", QoS: 1}}})
		if sa == nil || len(sa.Reasons) != 1 || sa.Reasons[0] != 0x8F {
			t.Fatalf("subscribe: %v (%+v), want SUBACK 0x8F", err, sa)
		}
		_, _ = c.Publish(ctx, &paho.Publish{Topic: long, QoS: 0, Payload: []byte("x")})
		bt.WaitFor(t, 10*time.Second, "DISCONNECT 0x90 after a QoS 0 publish", func() bool {
			d := c.ServerDisconnect()
			return d != nil && d.ReasonCode == 0x90
		})
		w, err := bt.TryDial(addr, &paho.Connect{ClientID: "paho-will", CleanStart: true,
			WillMessage: &paho.WillMessage{Topic: long, Payload: []byte("gone")}})
		if err == nil || w.Connack == nil || w.Connack.ReasonCode != 0x90 {
			t.Fatalf("will with a 60 KB topic: %v, want CONNACK 0x90", err)
		}
	})
	t.Run("REST and SSE: 400", func(t *testing.T) {
		body, _ := json.Marshal(map[string]string{"topic": long, "payload": "x"})
		resp, err := http.Post("http://"+b.HTTPAddr()+"/api/v1/publish", "application/json", bytes.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		var e struct{ Error, Field string }
		_ = json.NewDecoder(resp.Body).Decode(&e)
		_ = resp.Body.Close()
		if resp.StatusCode != http.StatusBadRequest || e.Field != "topic" || !strings.Contains(e.Error, "mqtt.max_topic_length") {
			t.Fatalf("REST publish: %d %+v, want 400 naming mqtt.max_topic_length", resp.StatusCode, e)
		}
		for _, path := range []string{"/events", "/poll", "/api/v1/retained", "/api/v1/topics/last"} {
			resp, err := http.Get("http://" + b.HTTPAddr() + path + "?topic=" + url.QueryEscape(long))
			if err != nil {
				t.Fatal(err)
			}
			_ = json.NewDecoder(resp.Body).Decode(&e)
			_ = resp.Body.Close()
			if resp.StatusCode != http.StatusBadRequest || !strings.Contains(e.Error, "mqtt.max_topic_length") {
				t.Fatalf("GET %s with a 60 KB topic: %d %+v, want 400", path, resp.StatusCode, e)
			}
		}
	})
	sub.Barrier(t)
	for _, m := range sub.Messages() {
		if len(m.Topic) > 1024 {
			t.Fatalf("a %d-byte topic was delivered", len(m.Topic))
		}
	}
}
