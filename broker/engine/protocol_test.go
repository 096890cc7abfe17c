package engine

import (
	"bytes"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
)

// Acknowledgements carry no properties of the packet they acknowledge
// (mochi echoed the publisher's user properties in its PUBACK).
func TestAcksDoNotEchoUserProperties(t *testing.T) {
	_, addr := startServer(t, Options{})
	r := dialRaw(t, addr, 5)
	r.connect("echo", true, nil)
	r.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, TopicName: "u", PacketID: 3,
		Payload: []byte("x"), Properties: packets.Properties{User: []packets.UserProperty{{Key: "secret", Val: "s3"}}}})
	ack := r.expect(packets.Puback)
	if len(ack.Properties.User) != 0 || ack.ReasonCode != 0 {
		t.Fatalf("PUBACK reason 0x%02x user properties %v", ack.ReasonCode, ack.Properties.User)
	}
}

// Filters with wildcards inside a level are refused with the code of the
// client's version: 0x80 (3.1.1) or 0x8F (5).
func TestInvalidFiltersRefused(t *testing.T) {
	_, addr := startServer(t, Options{})
	for _, tc := range []struct {
		version byte
		want    byte
	}{{4, 0x80}, {5, 0x8F}} {
		r := dialRaw(t, addr, tc.version)
		r.connect("filters", true, nil)
		for _, f := range []string{"a+", "a/#/b", "#a", "$share/g", "$share//x"} {
			if ack := r.subscribe(1, f, 1); len(ack.ReasonCodes) != 1 || ack.ReasonCodes[0] != tc.want {
				t.Errorf("v%d SUBSCRIBE %q: SUBACK %v, want 0x%02x", tc.version, f, ack.ReasonCodes, tc.want)
			}
		}
	}
}

// A v5 property that may appear once but appears twice is a protocol
// error: CONNACK 0x82 on CONNECT, DISCONNECT 0x82 after.
func TestDuplicatePropertyIsAProtocolError(t *testing.T) {
	_, addr := startServer(t, Options{})
	r := dialRaw(t, addr, 5)
	// CONNECT v5, client id "d", properties: Session Expiry Interval twice.
	props := []byte{10, 17, 0, 0, 0, 10, 17, 0, 0, 0, 20}
	body := append([]byte{0, 4, 'M', 'Q', 'T', 'T', 5, 2, 0, 30}, props...)
	body = append(body, 0, 1, 'd')
	r.write(append([]byte{0x10, byte(len(body))}, body...))
	pk, err := r.read(5 * time.Second)
	if err != nil || pk.FixedHeader.Type != packets.Connack || pk.ReasonCode != 0x82 {
		t.Fatalf("got %+v reason 0x%02x %v, want CONNACK 0x82", pk.FixedHeader, pk.ReasonCode, err)
	}

	r = dialRaw(t, addr, 5)
	r.connect("d2", true, nil)
	// PUBLISH QoS 0 topic "t" with Payload Format Indicator twice.
	r.write([]byte{0x30, 8, 0, 1, 't', 4, 1, 0, 1, 1})
	got := r.expectClosed()
	if len(got) != 1 || got[0].FixedHeader.Type != packets.Disconnect || got[0].ReasonCode != 0x82 {
		t.Fatalf("got %+v, want DISCONNECT 0x82", got)
	}
}

type logSink struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (s *logSink) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.buf.Write(p)
}

func (s *logSink) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.buf.String()
}

type denyTopic struct{ topic string }

func (d denyTopic) Authenticate(*ConnectRequest) (Principal, error) { return d, nil }
func (d denyTopic) Allow(a Action, topic string) bool               { return topic != d.topic }

// The engine's log, at debug level, never contains passwords or payloads:
// not for a second CONNECT (mochi logged the whole packet), not for a
// refused publish (mochi logged its payload).
func TestLogsHoldNoSecretsOrPayloads(t *testing.T) {
	sink := &logSink{}
	log := slog.New(slog.NewTextHandler(sink, &slog.HandlerOptions{Level: slog.LevelDebug}))
	_, addr := startServer(t, Options{Log: log, Auth: denyTopic{"forbidden"}})
	r := dialRaw(t, addr, 5)
	r.connect("logged", true, func(pk *packets.Packet) {
		pk.Connect.UsernameFlag, pk.Connect.Username = true, []byte("dev")
		pk.Connect.PasswordFlag, pk.Connect.Password = true, []byte("hunter2-secret")
	})
	r.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, TopicName: "forbidden", PacketID: 1,
		Payload: []byte("PAYLOAD-MUST-NOT-BE-LOGGED")})
	if ack := r.expect(packets.Puback); ack.ReasonCode != 0x87 {
		t.Fatalf("PUBACK 0x%02x, want 0x87", ack.ReasonCode)
	}
	r.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect},
		Connect: packets.ConnectParams{ProtocolName: []byte("MQTT"), ClientIdentifier: "logged", Clean: true,
			UsernameFlag: true, Username: []byte("dev"), PasswordFlag: true, Password: []byte("hunter2-secret")}})
	r.expectClosed()
	waitFor(t, 5*time.Second, func() error {
		if !strings.Contains(sink.String(), "client disconnected") {
			return errString("no disconnect logged yet")
		}
		return nil
	})
	out := sink.String()
	for _, secret := range []string{"hunter2", "PAYLOAD-MUST-NOT"} {
		if strings.Contains(out, secret) {
			t.Fatalf("log contains %q:\n%s", secret, out)
		}
	}
}

type errString string

func (e errString) Error() string { return string(e) }

func TestReceiveMaximumZeroIsAProtocolError(t *testing.T) {
	_, addr := startServer(t, Options{})
	r := dialRaw(t, addr, 5)
	// CONNECT v5, client id "z", properties: Receive Maximum 0.
	body := []byte{0, 4, 'M', 'Q', 'T', 'T', 5, 2, 0, 30, 3, 33, 0, 0, 0, 1, 'z'}
	r.write(append([]byte{0x10, byte(len(body))}, body...))
	pk, err := r.read(5 * time.Second)
	if err != nil || pk.FixedHeader.Type != packets.Connack || pk.ReasonCode != 0x82 {
		t.Fatalf("got %+v reason 0x%02x %v, want CONNACK 0x82", pk.FixedHeader, pk.ReasonCode, err)
	}
}

// Topics longer or deeper than the limits are refused before anything
// keeps them. v5: PUBACK/PUBREC 0x90 for QoS 1/2 (MQTT 5.0 3.4.2.1,
// 3.5.2.1: "correctly formed, but not accepted"), DISCONNECT 0x90 for
// QoS 0, which has no ack (3.14.2.1); SUBACK 0x8F. 3.1.1 cannot say no to
// a PUBLISH: the connection is closed (MQTT-3.3.5-2); SUBACK 0x80.
// Nothing is delivered.
func TestTopicLimits(t *testing.T) {
	srv, addr := startServer(t, Options{Limits: Limits{MaxTopicLength: 1024, MaxTopicLevels: 8}})
	long := strings.Repeat("x", 60<<10)
	deep := strings.Repeat("a/", 8) + "a" // 9 levels
	sub := dialRaw(t, addr, 5)
	sub.connect("limits-sub", true, nil)
	sub.subscribe(1, "#", 1)
	n := 0
	for _, topic := range []string{long, deep} {
		for _, v := range []byte{4, 5} {
			want := map[byte]byte{4: 0x80, 5: 0x8F}[v]
			r := dialRaw(t, addr, v)
			r.connect(fmt.Sprintf("limits-sub-%d", v), true, nil)
			if s := r.subscribe(10, topic, 1); s.ReasonCodes[0] != want {
				t.Errorf("v%d subscribe to a %d-byte filter: SUBACK 0x%02x, want 0x%02x", v, len(topic), s.ReasonCodes[0], want)
			}
			n++
			for _, qos := range []byte{0, 1, 2} {
				r := dialRaw(t, addr, v)
				r.connect(fmt.Sprintf("limits-%d-%d", v, qos), true, nil)
				r.publish(topic, []byte("x"), qos, 1)
				n++
				switch {
				case v == 5 && qos > 0:
					ack := r.expect(map[byte]byte{1: packets.Puback, 2: packets.Pubrec}[qos])
					if ack.ReasonCode != 0x90 {
						t.Errorf("v5 QoS %d publish to a %d-byte topic: ack 0x%02x, want 0x90", qos, len(topic), ack.ReasonCode)
					}
				case v == 5:
					got := r.expectClosed()
					if len(got) != 1 || got[0].FixedHeader.Type != packets.Disconnect || got[0].ReasonCode != 0x90 {
						t.Errorf("v5 QoS 0 publish to a %d-byte topic: %+v before the close, want DISCONNECT 0x90", len(topic), got)
					}
				default:
					if got := r.expectClosed(); len(got) != 0 {
						t.Errorf("3.1.1 QoS %d publish to a %d-byte topic: %d packets before the close, want none", qos, len(topic), len(got))
					}
				}
			}
		}
	}
	if pk, err := sub.read(200 * time.Millisecond); err == nil {
		t.Fatalf("a refused topic was delivered: %d bytes", len(pk.TopicName))
	}
	if d := srv.Stats().Dropped[DropTopicLimit]; d != int64(n) {
		t.Fatalf("topic_limit drops %d, want %d", d, n)
	}
}
