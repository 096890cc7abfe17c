package engine

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
)

// startServer runs a Server on an ephemeral loopback port and returns it
// with its address; it is shut down at the end of the test.
func startServer(t *testing.T, opts Options) (*Server, string) {
	t.Helper()
	s := New(opts)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = s.Serve(ln, "tcp") }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := s.Shutdown(ctx); err != nil {
			t.Errorf("shutdown: %v", err)
		}
	})
	return s, ln.Addr().String()
}

// waitFor polls cond until it returns nil or the deadline passes; the
// failure names what cond saw last.
func waitFor(t *testing.T, total time.Duration, cond func() error) {
	t.Helper()
	deadline := time.Now().Add(total)
	for {
		err := cond()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("after %v: %v", total, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// raw is a minimal MQTT client that sends and reads packets as they are,
// for protocol tests.
type raw struct {
	t       *testing.T
	nc      net.Conn
	br      *bufio.Reader
	version byte
}

func dialRaw(t *testing.T, addr string, version byte) *raw {
	t.Helper()
	nc, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = nc.Close() })
	return &raw{t: t, nc: nc, br: bufio.NewReader(nc), version: version}
}

func (r *raw) send(pk packets.Packet) {
	r.t.Helper()
	r.write(r.encode(pk))
}

// encode encodes a packet as send would send it.
func (r *raw) encode(pk packets.Packet) []byte {
	r.t.Helper()
	pk.ProtocolVersion = r.version
	var buf bytes.Buffer
	var err error
	switch pk.FixedHeader.Type {
	case packets.Connect:
		err = pk.ConnectEncode(&buf)
	case packets.Publish:
		err = pk.PublishEncode(&buf)
	case packets.Puback:
		err = pk.PubackEncode(&buf)
	case packets.Pubrec:
		err = pk.PubrecEncode(&buf)
	case packets.Pubrel:
		pk.FixedHeader.Qos = 1
		err = pk.PubrelEncode(&buf)
	case packets.Pubcomp:
		err = pk.PubcompEncode(&buf)
	case packets.Subscribe:
		pk.FixedHeader.Qos = 1
		err = pk.SubscribeEncode(&buf)
	case packets.Unsubscribe:
		pk.FixedHeader.Qos = 1
		err = pk.UnsubscribeEncode(&buf)
	case packets.Pingreq:
		err = pk.PingreqEncode(&buf)
	case packets.Disconnect:
		err = pk.DisconnectEncode(&buf)
	default:
		r.t.Fatalf("raw: cannot encode type %d", pk.FixedHeader.Type)
	}
	if err != nil {
		r.t.Fatal(err)
	}
	return buf.Bytes()
}

func (r *raw) write(b []byte) {
	r.t.Helper()
	if _, err := r.nc.Write(b); err != nil {
		r.t.Fatalf("write: %v", err)
	}
}

// connect sends CONNECT with the given fields and returns the CONNACK.
func (r *raw) connect(id string, clean bool, mod func(*packets.Packet)) packets.Packet {
	r.t.Helper()
	name := []byte("MQTT")
	if r.version == 3 {
		name = []byte("MQIsdp")
	}
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect},
		Connect: packets.ConnectParams{ProtocolName: name, ClientIdentifier: id, Clean: clean, Keepalive: 30}}
	if mod != nil {
		mod(&pk)
	}
	r.send(pk)
	ack, err := r.read(5 * time.Second)
	if err != nil {
		r.t.Fatalf("CONNACK: %v", err)
	}
	if ack.FixedHeader.Type != packets.Connack {
		r.t.Fatalf("got packet type %d, want CONNACK", ack.FixedHeader.Type)
	}
	return ack
}

// read reads one packet within d.
func (r *raw) read(d time.Duration) (packets.Packet, error) {
	var pk packets.Packet
	_ = r.nc.SetReadDeadline(time.Now().Add(d))
	hb, err := r.br.ReadByte()
	if err != nil {
		return pk, err
	}
	if err := pk.FixedHeader.Decode(hb); err != nil {
		return pk, err
	}
	n, _, err := packets.DecodeLength(r.br)
	if err != nil {
		return pk, err
	}
	pk.FixedHeader.Remaining = n
	body := make([]byte, n)
	if _, err := io.ReadFull(r.br, body); err != nil {
		return pk, err
	}
	pk.ProtocolVersion = r.version
	switch pk.FixedHeader.Type {
	case packets.Connack:
		err = pk.ConnackDecode(body)
	case packets.Publish:
		err = pk.PublishDecode(body)
	case packets.Puback:
		err = pk.PubackDecode(body)
	case packets.Pubrec:
		err = pk.PubrecDecode(body)
	case packets.Pubrel:
		err = pk.PubrelDecode(body)
	case packets.Pubcomp:
		err = pk.PubcompDecode(body)
	case packets.Suback:
		err = pk.SubackDecode(body)
	case packets.Unsuback:
		err = pk.UnsubackDecode(body)
	case packets.Pingresp:
	case packets.Disconnect:
		err = pk.DisconnectDecode(body)
	default:
		err = fmt.Errorf("unexpected packet type %d", pk.FixedHeader.Type)
	}
	return pk, err
}

// expect reads the next packet and checks its type.
func (r *raw) expect(typ byte) packets.Packet {
	r.t.Helper()
	pk, err := r.read(5 * time.Second)
	if err != nil {
		r.t.Fatalf("waiting for packet type %d: %v", typ, err)
	}
	if pk.FixedHeader.Type != typ {
		r.t.Fatalf("got packet type %d (reason 0x%02x), want %d", pk.FixedHeader.Type, pk.ReasonCode, typ)
	}
	return pk
}

// expectClosed reads until the server closes the connection; packets on
// the way are returned.
func (r *raw) expectClosed() []packets.Packet {
	r.t.Helper()
	var got []packets.Packet
	for {
		pk, err := r.read(5 * time.Second)
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				r.t.Fatalf("connection still open; read %d packets", len(got))
			}
			return got
		}
		got = append(got, pk)
	}
}

func (r *raw) subscribe(id uint16, filter string, qos byte) packets.Packet {
	r.t.Helper()
	r.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Subscribe}, PacketID: id,
		Filters: packets.Subscriptions{{Filter: filter, Qos: qos}}})
	return r.expect(packets.Suback)
}

func (r *raw) publish(topic string, payload []byte, qos byte, id uint16) {
	r.t.Helper()
	r.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: qos}, TopicName: topic,
		Payload: payload, PacketID: id})
}
