package engine

import (
	"bytes"
	"context"
	"io"
	"net"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
)

func connectBytes(version byte) []byte {
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect}, ProtocolVersion: version,
		Connect: packets.ConnectParams{ProtocolName: []byte("MQTT"), ClientIdentifier: "fuzz", Clean: true, Keepalive: 30}}
	var buf bytes.Buffer
	_ = pk.ConnectEncode(&buf)
	return buf.Bytes()
}

// FuzzConnection feeds arbitrary bytes to a connection, after a valid
// CONNECT or instead of one: the engine must answer or close, never panic
// or hang.
func FuzzConnection(f *testing.F) {
	f.Add([]byte{0x30, 0x05, 0x00, 0x01, 'a', 'h', 'i'}, true, byte(4))
	f.Add([]byte{0x82, 0x06, 0x00, 0x01, 0x00, 0x01, 'a', 0x01}, true, byte(4))
	f.Add([]byte{0x82, 0x07, 0x00, 0x01, 0x00, 0x00, 0x01, 'a', 0x01}, true, byte(5))
	f.Add([]byte{0x10, 0x0c, 0x00, 0x04, 'M', 'Q', 'T', 'T', 0x05, 0x02, 0x00, 0x1e, 0x00}, false, byte(5))
	f.Add([]byte{0x30, 0xff, 0xff, 0xff, 0xff, 0x01}, true, byte(5))
	f.Add([]byte{0x62, 0x02, 0x00, 0x01, 0xc0, 0x00, 0xe0, 0x00}, true, byte(5))
	srv := New(Options{Limits: Limits{MaxPacketSize: 4096, TopicAliasMax: 8, ConnectTimeout: time.Second, WriteTimeout: time.Second}})
	f.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := srv.Shutdown(ctx); err != nil {
			f.Errorf("shutdown: %v", err)
		}
	})
	f.Fuzz(func(t *testing.T, data []byte, connect bool, version byte) {
		client, server := net.Pipe()
		defer client.Close()
		done := make(chan struct{})
		go func() {
			_ = srv.ServeConn(server, "fuzz", true)
			close(done)
		}()
		go func() { _, _ = io.Copy(io.Discard, client) }()
		_ = client.SetWriteDeadline(time.Now().Add(2 * time.Second))
		if connect {
			if _, err := client.Write(connectBytes(4 + version%2)); err != nil {
				return
			}
		}
		_, _ = client.Write(data)
		_ = client.Close()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Fatal("connection did not end after the client closed")
		}
	})
}
