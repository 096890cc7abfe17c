package codec_test

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"math"
	"reflect"
	"strconv"
	"testing"

	"github.com/fxamacker/cbor/v2"

	"github.com/beaconmq/beacon/devices/codec"
)

var (
	fuzzTypes = []string{"int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float32", "float64", "bool"}
	fuzzSizes = map[string]int{"int8": 1, "int16": 2, "int32": 4, "int64": 8, "uint8": 1, "uint16": 2, "uint32": 4, "uint64": 8,
		"float32": 4, "float64": 8, "bool": 1}
)

// checkReadings fails unless m holds only identifier keys with finite
// float64 or bool values, and survives json.Marshal.
func checkReadings(t *testing.T, m map[string]any) {
	t.Helper()
	for k, v := range m {
		if !identifier(k) {
			t.Fatalf("key %q is not an identifier", k)
		}
		switch v := v.(type) {
		case bool:
		case float64:
			if math.IsNaN(v) || math.IsInf(v, 0) {
				t.Fatalf("%s = %v", k, v)
			}
		default:
			t.Fatalf("%s = %#v, a %T", k, v, v)
		}
	}
	if _, err := json.Marshal(m); err != nil {
		t.Fatalf("json.Marshal(%v): %v", m, err)
	}
}

func identifier(s string) bool {
	if len(s) == 0 || len(s) > 64 {
		return false
	}
	for i, c := range []byte(s) {
		if c != '_' && !('a' <= c && c <= 'z') && !('A' <= c && c <= 'Z') && !(i > 0 && '0' <= c && c <= '9') {
			return false
		}
	}
	return true
}

// FuzzPacked builds a layout from the fuzzer's bytes (one type per byte)
// and checks Decode against encoding/binary.
func FuzzPacked(f *testing.F) {
	f.Add([]byte{1, 4, 5, 10}, true, 0.01, 0.0, []byte{0x66, 0x08, 0x50, 0xe4, 0x0c, 0x01})
	f.Add([]byte{1, 4, 5, 10}, false, 1.0, -40.0, []byte{0x66, 0x08, 0x50})
	f.Add([]byte{8, 9}, false, 0.0, 0.0, []byte{0x7f, 0xc0, 0, 0, 0x7f, 0xf0, 0, 0, 0, 0, 0, 0})
	f.Add([]byte{9}, true, 1e300, 0.0, []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xef, 0x7f})
	f.Add([]byte{3, 7}, true, -1.0, 0.5, make([]byte, 16))
	f.Add([]byte{0}, false, math.NaN(), 0.0, []byte{1})
	f.Add([]byte{}, false, 1.0, 0.0, []byte{})
	f.Fuzz(func(t *testing.T, types []byte, little bool, scale, offset float64, payload []byte) {
		if len(types) > 64 {
			types = types[:64]
		}
		c := codec.Config{Format: "packed"}
		var order binary.ByteOrder = binary.BigEndian
		if little {
			c.Endian, order = "little", binary.LittleEndian
		}
		size := 0
		for i, b := range types {
			typ := fuzzTypes[int(b)%len(fuzzTypes)]
			f := codec.Field{Name: "f" + strconv.Itoa(i), Type: typ}
			if typ != "bool" {
				f.Scale, f.Offset = scale, offset
			}
			c.Fields = append(c.Fields, f)
			size += fuzzSizes[typ]
		}
		d, err := codec.New(c)
		if err != nil {
			if len(types) > 0 && !math.IsNaN(scale) && !math.IsInf(scale, 0) && !math.IsNaN(offset) && !math.IsInf(offset, 0) {
				t.Fatalf("New: %v", err)
			}
			return
		}
		m, err := d.Decode(payload)
		if len(payload) != size {
			if err == nil || m != nil {
				t.Fatalf("%d bytes for a %d byte layout: %v, %v", len(payload), size, m, err)
			}
			return
		}
		if err != nil {
			t.Fatal(err)
		}
		checkReadings(t, m)

		// The reference: encoding/binary, one field at a time.
		r := bytes.NewReader(payload)
		for _, f := range c.Fields {
			var v float64
			read := func(p any) {
				if err := binary.Read(r, order, p); err != nil {
					t.Fatal(err)
				}
			}
			switch f.Type {
			case "bool":
				var b uint8
				read(&b)
				if got := m[f.Name]; got != (b != 0) {
					t.Fatalf("%s = %v, want %v", f.Name, got, b != 0)
				}
				continue
			case "int8":
				var x int8
				read(&x)
				v = float64(x)
			case "uint8":
				var x uint8
				read(&x)
				v = float64(x)
			case "int16":
				var x int16
				read(&x)
				v = float64(x)
			case "uint16":
				var x uint16
				read(&x)
				v = float64(x)
			case "int32":
				var x int32
				read(&x)
				v = float64(x)
			case "uint32":
				var x uint32
				read(&x)
				v = float64(x)
			case "int64":
				var x int64
				read(&x)
				v = float64(x)
			case "uint64":
				var x uint64
				read(&x)
				v = float64(x)
			case "float32":
				var x float32
				read(&x)
				v = float64(x)
			case "float64":
				read(&v)
			}
			s := f.Scale
			if s == 0 {
				s = 1
			}
			v = float64(v*s) + f.Offset
			got, ok := m[f.Name]
			if math.IsNaN(v) || math.IsInf(v, 0) {
				if ok {
					t.Fatalf("%s = %v, want it left out", f.Name, got)
				}
				continue
			}
			if got != v {
				t.Fatalf("%s = %v, want %v", f.Name, got, v)
			}
		}
	})
}

// jsonReference decodes p as a bare json Decoder should, with
// encoding/json: ok is false when Decode must fail.
func jsonReference(p []byte) (m map[string]any, ok bool) {
	var obj map[string]json.RawMessage
	if !json.Valid(p) || json.Unmarshal(p, &obj) != nil || obj == nil || len(obj) > 1024 {
		return nil, false
	}
	// encoding/json keeps the last of duplicate keys, as Decode does.
	m = map[string]any{}
	for k, raw := range obj {
		if !identifier(k) {
			continue
		}
		var v any
		dec := json.NewDecoder(bytes.NewReader(raw))
		dec.UseNumber()
		if err := dec.Decode(&v); err != nil {
			panic(err)
		}
		switch v := v.(type) {
		case bool:
			m[k] = v
		case json.Number:
			if f, _ := strconv.ParseFloat(string(v), 64); !math.IsInf(f, 0) {
				m[k] = f
			}
		}
	}
	return m, true
}

func FuzzJSON(f *testing.F) {
	for _, s := range []string{
		`{"temperature": 21.5, "humidity": 40, "ok": true, "fw": "1.2", "nested": {"a": [1, "]"]}}`,
		`{"t": 1e400, "u": -0, "v": 1E-5, "w": null, "x": false}`,
		`{"\u0074": 1, "a\"b": 2, "t": "x"}`,
		`{"a": 1, "a": "x"}`,
		`{"door": 1, "rh": {}}`,
		` [1] `, `null`, `"{"`, `{`, `{"a":}`, ``, `{} {}`, "{\"\xff\": 1}",
	} {
		f.Add([]byte(s))
	}
	bare, err := codec.New(codec.Config{Format: "json"})
	if err != nil {
		f.Fatal(err)
	}
	listed, err := codec.New(codec.Config{Format: "json", Fields: []codec.Field{
		{Name: "temperature", Type: "int16", Scale: 0.01}, {Name: "rh", Scale: 1e300}, {Name: "door", Type: "bool"}, {Name: "t"},
	}})
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, payload []byte) {
		m, err := bare.Decode(payload)
		checkReadings(t, m)
		if len(payload) > 4096 {
			// Room for more than 1024 members, which Decode counts with
			// duplicates and the reference without.
			return
		}
		want, ok := jsonReference(payload)
		switch {
		case !ok && err == nil:
			t.Fatalf("Decode() = %v, want an error", m)
		case ok && err != nil:
			t.Fatalf("Decode() = %v, want %v", err, want)
		case ok && !reflect.DeepEqual(m, want):
			t.Fatalf("Decode() = %v, want %v", m, want)
		}

		m2, err := listed.Decode(payload)
		if err != nil {
			if m2 != nil {
				t.Fatalf("Decode() = %v, %v", m2, err)
			}
			return
		}
		if !ok {
			t.Fatalf("listed: Decode() = %v, want an error", m2)
		}
		checkReadings(t, m2)
		for k := range m2 {
			if k != "temperature" && k != "rh" && k != "door" && k != "t" {
				t.Fatalf("unlisted key %q", k)
			}
		}
	})
}

func FuzzCBOR(f *testing.F) {
	for _, v := range []any{
		map[string]any{"temperature": 21.5, "humidity": uint8(40), "ok": true, "fw": "1.2", "nested": map[int]any{1: []any{1, "x"}}},
		map[string]any{"n": math.NaN(), "i": math.Inf(-1), "big": uint64(math.MaxUint64), "neg": int64(math.MinInt64), "h": float32(0.5)},
		map[string]any{"door": 1, "rh": map[string]int{}, "temperature": "x", "t": nil, "a-b": 1},
		map[int]int{1: 2},
		[]int{1, 2},
		"text", nil, 3.5,
	} {
		b, err := cbor.Marshal(v)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	for _, s := range []string{"", "\xa1", "\xd9\xd9\xf7\xa1\x61\x74\x01", "\xbf\x61\x74\x01\xff", "\xa1\x61\x74\xc2\x49\x01\x00\x00\x00\x00\x00\x00\x00\x00", "\xa1\x41\x61\x01", "\xf7"} {
		f.Add([]byte(s))
	}
	bare, err := codec.New(codec.Config{Format: "cbor"})
	if err != nil {
		f.Fatal(err)
	}
	listed, err := codec.New(codec.Config{Format: "cbor", Fields: []codec.Field{
		{Name: "temperature", Type: "int16", Scale: 0.01}, {Name: "rh", Scale: 1e300}, {Name: "door", Type: "bool"}, {Name: "t"},
	}})
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, payload []byte) {
		m, err := bare.Decode(payload)
		if err != nil {
			if m != nil {
				t.Fatalf("Decode() = %v, %v", m, err)
			}
		} else {
			checkReadings(t, m)
			// Whatever decodes must be a well-formed map with text keys.
			var ref map[string]any
			if err := cbor.Unmarshal(payload, &ref); err != nil || ref == nil {
				t.Fatalf("Decode() = %v, but cbor.Unmarshal: %v", m, err)
			}
			for k, v := range m {
				if _, ok := ref[k]; !ok {
					t.Fatalf("%s = %v is not in the payload", k, v)
				}
			}
		}
		m2, err := listed.Decode(payload)
		if err != nil {
			if m2 != nil {
				t.Fatalf("Decode() = %v, %v", m2, err)
			}
			return
		}
		checkReadings(t, m2)
		for k := range m2 {
			if k != "temperature" && k != "rh" && k != "door" && k != "t" {
				t.Fatalf("unlisted key %q", k)
			}
		}
		if m == nil {
			t.Fatalf("listed decoded %v where bare failed", m2)
		}
	})
}
