package broker_test

import (
	"bytes"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"
	"github.com/mochi-mqtt/server/v2/packets"

	bt "github.com/beaconmq/beacon/broker/brokertest"
)

// FuzzConnection sends arbitrary bytes after a valid CONNECT. Whatever
// they are, the broker must keep serving a well-behaved client.
func FuzzConnection(f *testing.F) {
	enc := func(pk packets.Packet, version byte) []byte {
		pk.ProtocolVersion = version
		var buf bytes.Buffer
		switch pk.FixedHeader.Type {
		case packets.Publish:
			_ = pk.PublishEncode(&buf)
		case packets.Subscribe:
			_ = pk.SubscribeEncode(&buf)
		}
		return buf.Bytes()
	}
	for _, v := range []byte{4, 5} {
		f.Add(v, enc(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, PacketID: 1, TopicName: "a/b", Payload: []byte("x")}, v))
		f.Add(v, enc(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 2, Retain: true}, PacketID: 2, TopicName: "r", Payload: []byte("y")}, v))
		f.Add(v, enc(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Subscribe, Qos: 1}, PacketID: 3, Filters: packets.Subscriptions{{Filter: "#", Qos: 2}}}, v))
		f.Add(v, []byte{0x62, 0x02, 0x00, 0x07}) // PUBREL for an unknown id
		f.Add(v, []byte{0xe0, 0x00})             // DISCONNECT
		f.Add(v, []byte{0x30, 0xff, 0xff, 0xff, 0x7f})
	}

	cfg := bt.Config(f)
	cfg.MQTT.MaxPacketSize = 64 << 10
	// The fuzz function may not write to the test log; the broker logs to stderr.
	b := bt.StartWithLogger(f, cfg, slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelError})))
	addr := b.MQTTAddr("tcp")
	good := bt.Dial(f, addr, &paho.Connect{ClientID: "fuzz-good", CleanStart: true})
	good.SubscribeT(f, paho.SubscribeOptions{Topic: "fuzz-ok", QoS: 1})
	n := 0

	f.Fuzz(func(t *testing.T, version byte, data []byte) {
		version = 4 + version%2
		conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		raw := &bt.Raw{Conn: conn, Version: version}
		raw.Send(t, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect},
			Connect: packets.ConnectParams{ClientIdentifier: "fuzzer", Clean: true, Keepalive: 30}})
		_ = conn.SetDeadline(time.Now().Add(200 * time.Millisecond))
		_, _ = conn.Write(data)
		_, _ = io.Copy(io.Discard, conn) // until the broker closes or the deadline passes
		_ = conn.Close()

		n++
		good.PublishT(t, &paho.Publish{Topic: "fuzz-ok", QoS: 1, Payload: fmt.Appendf(nil, "%d", n)})
		bt.WaitFor(t, 5*time.Second, "the well-behaved client's message", func() bool { return good.Count() >= n })
	})
}
