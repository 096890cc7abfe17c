package main

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"math/rand/v2"
	"slices"
	"testing"
	"time"
)

// encodePublishes encodes n PUBLISH packets from pubs publishers, their
// sequence numbers counting up per publisher, as a broker sends them.
func encodePublishes(n, pubs int, qos byte, size int) []byte {
	var out []byte
	for i := range n {
		t := newPublishTemplate("bench/abc/7", qos, size)
		t.stamp(t.b, uint16(i%65535+1), time.Now().UnixNano(), uint64(i/pubs), uint32(i%pubs))
		out = append(out, t.b...)
	}
	return out
}

func TestReaderSplitsPackets(t *testing.T) {
	small := encodePublishes(3, 1, 1, 64)
	big := newPublishTemplate("big", 2, 200_000) // larger than the buffer below, 3-byte remaining length
	big.stamp(big.b, 9, 42, 7, 0)
	stream := slices.Concat(small, []byte{typePingresp << 4, 0}, big.b, small[:10])
	r := newReader(bytes.NewReader(stream), 4096)

	for i := range 3 {
		pk, err := r.next()
		if err != nil || pk.typ != typePublish {
			t.Fatalf("packet %d: %+v %v", i, pk.typ, err)
		}
		qos, id, payload, err := parsePublish(pk.flags, pk.body)
		if err != nil || qos != 1 || id != uint16(i+1) || len(payload) != 64 {
			t.Fatalf("packet %d: qos %d id %d payload %d bytes, %v", i, qos, id, len(payload), err)
		}
	}
	if pk, err := r.next(); err != nil || pk.typ != typePingresp || len(pk.body) != 0 {
		t.Fatalf("PINGRESP: %+v %v", pk, err)
	}
	pk, err := r.next()
	if err != nil {
		t.Fatal(err)
	}
	qos, id, payload, err := parsePublish(pk.flags, pk.body)
	if err != nil || qos != 2 || id != 9 || len(payload) != 200_000 {
		t.Fatalf("big packet: qos %d id %d payload %d bytes, %v", qos, id, len(payload), err)
	}
	tl := newTally(1)
	tl.record(payload, 1042)
	if tl.delivered != 1 || tl.latency.max != 1000 || !tl.seen[0].has(7) {
		t.Fatalf("stamp not read back: %+v", tl.latency.max)
	}
	if _, err := r.next(); !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Fatalf("a stream cut inside a packet: %v, want unexpected EOF", err)
	}
}

func TestParsePublishProperties(t *testing.T) {
	// A v5 PUBLISH with properties the broker may add: subscription
	// identifier (varint) and message expiry (four bytes).
	body := appendString(nil, "a/b")
	body = append(body, 0, 5)                                // packet id
	body = append(body, 8, 0x0B, 0x81, 1, 0x02, 0, 0, 0, 60) // properties: 8 bytes
	body = append(body, []byte("payload")...)
	_, id, payload, err := parsePublish(1<<1, body)
	if err != nil || id != 5 || string(payload) != "payload" {
		t.Fatalf("id %d payload %q %v", id, payload, err)
	}
	if _, _, _, err := parsePublish(1<<1, body[:6]); err == nil {
		t.Fatal("a PUBLISH cut before its properties parsed")
	}
}

func TestHistogramQuantiles(t *testing.T) {
	var h histogram
	vals := make([]int64, 100_000)
	rng := rand.New(rand.NewPCG(1, 2))
	for i := range vals {
		vals[i] = int64(rng.ExpFloat64() * float64(time.Millisecond))
		h.add(vals[i])
	}
	slices.Sort(vals)
	for _, q := range []float64{.5, .9, .99} {
		exact := vals[int(q*float64(len(vals)))]
		got := int64(h.quantile(q))
		if d := float64(got-exact) / float64(exact); d > 0.02 || d < -0.02 {
			t.Errorf("p%v = %d, exact %d (%.1f%% off)", q*100, got, exact, 100*d)
		}
	}
	if h.quantile(1) != time.Duration(vals[len(vals)-1]) {
		t.Errorf("max %v, want %v", h.quantile(1), vals[len(vals)-1])
	}
}

func TestBitsetCounts(t *testing.T) {
	var acked, seen bitset
	for i := uint64(0); i < 1000; i++ {
		acked.add(i)
		if i%10 != 3 {
			seen.add(i)
		}
	}
	if !seen.add(1500) || seen.add(1500) {
		t.Fatal("add reports a new member once")
	}
	if n := seen.missing(acked); n != 100 {
		t.Errorf("missing %d, want 100", n)
	}
	if n := seen.missingBelow(1000); n != 100 {
		t.Errorf("missing below 1000: %d, want 100", n)
	}
	if n := seen.missingBelow(2000); n != 2000-900-1 {
		t.Errorf("missing below 2000: %d, want %d", n, 2000-900-1)
	}
}

// replay is an endless stream of the same packets, for the benchmark.
type replay struct {
	data []byte
	off  int
}

func (r *replay) Read(p []byte) (int, error) {
	n := 0
	for n < len(p) {
		c := copy(p[n:], r.data[r.off:])
		n += c
		if r.off += c; r.off == len(r.data) {
			r.off = 0
		}
	}
	return n, nil
}

// BenchmarkReader is a subscriber's receive path for one message: split
// the packet out of the read buffer, parse the PUBLISH, record the
// delivery (bitset and histogram) and queue the acknowledgement; the
// acknowledgements are flushed to io.Discard once per read batch. Every
// delivery is a first one: the tally forgets what it saw when the replayed
// stream starts over.
func BenchmarkReader(b *testing.B) {
	for _, qos := range []byte{0, 1, 2} {
		b.Run([]string{"qos0", "qos1", "qos2"}[qos], func(b *testing.B) {
			const pubs, n = 100, 1 << 16
			data := encodePublishes(n, pubs, qos, 64)
			s := &subscriber{r: newReader(&replay{data: data}, readBuffer), w: bufio.NewWriterSize(io.Discard, 4<<10),
				t: newTally(pubs)}
			b.SetBytes(int64(len(data) / n))
			b.ReportAllocs()
			done := 0 // messages of this pass of the stream
			for b.Loop() {
				if done == n { // the stream starts over: forget it
					done = 0
					for _, seen := range s.t.seen {
						clear(seen)
					}
				}
				done++
				pk, err := s.r.next()
				if err == nil {
					err = s.handle(pk)
				}
				if err == nil && s.r.buffered() == 0 {
					err = s.w.Flush()
					s.t.flush()
				}
				if err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "msg/s")
			if s.t.delivered == 0 || s.t.duplicates != 0 {
				b.Fatalf("delivered %d, duplicates %d", s.t.delivered, s.t.duplicates)
			}
		})
	}
}
