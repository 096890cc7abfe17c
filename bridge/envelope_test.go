package bridge

import (
	"bytes"
	"encoding/json"
	"flag"
	"os"
	"path/filepath"
	"testing"
)

var update = flag.Bool("update", false, "rewrite the golden files")

// TestEnvelopeGolden pins the JSON form browsers parse: one line per
// message, JSON payloads embedded (and compacted), text as a string,
// anything else as base64.
func TestEnvelopeGolden(t *testing.T) {
	cases := []struct {
		name string
		env  Envelope
	}{
		{"json object", NewEnvelope("devices/t1/telemetry", []byte("{\n  \"t\": 21.5,\n  \"ok\": true\n}"), 1, false, 1795000000123)},
		{"json number", NewEnvelope("devices/t1/count", []byte("42"), 0, false, 1795000000123)},
		{"text", NewEnvelope("devices/t1/status", []byte("online"), 1, true, 1795000000000)},
		{"text with newline and quotes", NewEnvelope("notes", []byte("line 1\nsaid \"hi\" </script>"), 0, false, 1)},
		{"binary", NewEnvelope("devices/t1/raw", []byte{0x00, 0x01, 0xfe, 0xff}, 2, false, 1)},
		{"empty", NewEnvelope("devices/t1/clear", nil, 0, true, 1)},
		{"with id and decoded", func() Envelope {
			e := NewEnvelope("devices/t1/telemetry", []byte{0x08, 0x34, 0x5a}, 1, false, 1795000000123)
			e.ID = "5f0c2a9e41d7-10442"
			e.Decoded = map[string]any{"temperature": 21.0, "humidity": 45.0}
			return e
		}()},
	}
	var out bytes.Buffer
	for _, tc := range cases {
		b, err := json.Marshal(tc.env)
		if err != nil {
			t.Fatal(err)
		}
		if bytes.ContainsAny(b, "\n\r") {
			t.Errorf("%s: the envelope spans lines: %s", tc.name, b)
		}
		out.WriteString("# " + tc.name + "\n")
		out.Write(b)
		out.WriteByte('\n')
	}
	golden := filepath.Join("testdata", "envelope.golden")
	if *update {
		if err := os.WriteFile(golden, out.Bytes(), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(golden)
	if err != nil {
		t.Fatalf("%v (run go test ./bridge -run Golden -update)", err)
	}
	if !bytes.Equal(out.Bytes(), want) {
		t.Errorf("envelopes differ from %s:\n%s", golden, out.Bytes())
	}
}

func BenchmarkEnvelopeEncode(b *testing.B) {
	payload := []byte(`{"temperature":21.5,"humidity":40,"battery":3.71}`)
	b.ReportAllocs()
	for b.Loop() {
		e := NewEnvelope("devices/t1/telemetry", payload, 1, false, 1795000000123)
		e.ID = "5f0c2a9e41d7-10442"
		if _, err := json.Marshal(e); err != nil {
			b.Fatal(err)
		}
	}
}
