package codec_test

import (
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"math"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"testing"

	"github.com/fxamacker/cbor/v2"
	"gopkg.in/yaml.v3"

	"github.com/beaconmq/beacon/devices/codec"
)

func mustNew(t testing.TB, c codec.Config) *codec.Decoder {
	t.Helper()
	d, err := codec.New(c)
	if err != nil {
		t.Fatalf("New(%+v): %v", c, err)
	}
	return d
}

// sameReadings compares decoded maps, allowing float64 rounding in scaled
// values.
func sameReadings(got, want map[string]any) bool {
	if len(got) != len(want) {
		return false
	}
	for k, w := range want {
		g, ok := got[k]
		if !ok {
			return false
		}
		wf, wok := w.(float64)
		gf, gok := g.(float64)
		switch {
		case wok && gok:
			if math.Abs(gf-wf) > 1e-9*math.Max(1, math.Abs(wf)) {
				return false
			}
		case g != w:
			return false
		}
	}
	return true
}

func TestValidate(t *testing.T) {
	packed := func(fields ...codec.Field) codec.Config {
		return codec.Config{Format: codec.FormatPacked, Fields: fields}
	}
	u8 := func(name string) codec.Field { return codec.Field{Name: name, Type: "uint8"} }
	for _, tc := range []struct {
		name string
		cfg  codec.Config
		key  string // "" for valid
		msg  string // the whole Error(), when set
	}{
		{name: "packed", cfg: packed(u8("a"), codec.Field{Name: "_b9", Type: "float32", Scale: 2, Offset: -1})},
		{name: "packed little", cfg: codec.Config{Format: "packed", Endian: "little", Fields: []codec.Field{u8("a")}}},
		{name: "packed big", cfg: codec.Config{Format: "packed", Endian: "big", Fields: []codec.Field{u8("a")}}},
		{name: "json bare", cfg: codec.Config{Format: "json"}},
		{name: "json untyped field", cfg: codec.Config{Format: "json", Fields: []codec.Field{{Name: "t", Scale: 0.1, Unit: "°C"}}}},
		{name: "cbor bool field", cfg: codec.Config{Format: "cbor", Fields: []codec.Field{{Name: "on", Type: "bool"}}}},
		{name: "raw", cfg: codec.Config{Format: "raw"}},
		{name: "64 byte name", cfg: packed(u8(strings.Repeat("n", 64)))},

		{name: "no format", cfg: codec.Config{}, key: "format", msg: "format: missing (one of json, cbor, packed, raw)"},
		{name: "unknown format", cfg: codec.Config{Format: "xml"}, key: "format", msg: `format: unknown format "xml" (one of json, cbor, packed, raw)`},
		{name: "bad endian", cfg: codec.Config{Format: "packed", Endian: "middle", Fields: []codec.Field{u8("a")}}, key: "endian", msg: `endian: "middle" is not big or little`},
		{name: "endian on json", cfg: codec.Config{Format: "json", Endian: "little"}, key: "endian"},
		{name: "packed without fields", cfg: packed(), key: "fields", msg: "fields: a packed payload needs at least one field"},
		{name: "raw with fields", cfg: codec.Config{Format: "raw", Fields: []codec.Field{u8("a")}}, key: "fields"},
		{name: "too many fields", cfg: packed(make([]codec.Field, 1025)...), key: "fields"},
		{name: "empty name", cfg: packed(u8("a"), u8("")), key: "fields[1].name", msg: "fields[1].name: missing"},
		{name: "name starts with digit", cfg: packed(u8("1a")), key: "fields[0].name", msg: `fields[0].name: "1a" is not an identifier ([A-Za-z_][A-Za-z0-9_]{0,63})`},
		{name: "name with dash", cfg: packed(u8("a-b")), key: "fields[0].name"},
		{name: "name with dot", cfg: packed(u8("a.b")), key: "fields[0].name"},
		{name: "name with unicode", cfg: packed(u8("température")), key: "fields[0].name"},
		{name: "65 byte name", cfg: packed(u8(strings.Repeat("n", 65))), key: "fields[0].name"},
		{name: "duplicate name", cfg: packed(u8("a"), u8("b"), u8("a")), key: "fields[2].name", msg: `fields[2].name: "a" duplicates fields[0]`},
		{name: "unknown type", cfg: packed(u8("a"), u8("b"), codec.Field{Name: "c", Type: "int24"}), key: "fields[2].type",
			msg: `fields[2].type: unknown type "int24" (one of int8, int16, int32, int64, uint8, uint16, uint32, uint64, float32, float64, bool)`},
		{name: "unknown type on json", cfg: codec.Config{Format: "json", Fields: []codec.Field{{Name: "a", Type: "number"}}}, key: "fields[0].type"},
		{name: "packed type missing", cfg: packed(codec.Field{Name: "a"}), key: "fields[0].type",
			msg: "fields[0].type: missing (one of int8, int16, int32, int64, uint8, uint16, uint32, uint64, float32, float64, bool)"},
		{name: "NaN scale", cfg: packed(codec.Field{Name: "a", Type: "int8", Scale: math.NaN()}), key: "fields[0].scale"},
		{name: "Inf offset", cfg: packed(codec.Field{Name: "a", Type: "int8", Offset: math.Inf(-1)}), key: "fields[0].offset"},
		{name: "bool with scale", cfg: packed(codec.Field{Name: "a", Type: "bool", Scale: 2}), key: "fields[0].scale", msg: "fields[0].scale: a bool field has no scale"},
		{name: "bool with offset", cfg: packed(codec.Field{Name: "a", Type: "bool", Offset: 1}), key: "fields[0].offset"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.cfg.Validate()
			if tc.key == "" {
				if err != nil {
					t.Fatalf("Validate() = %v, want nil", err)
				}
				if _, err := codec.New(tc.cfg); err != nil {
					t.Fatalf("New() = %v, want nil", err)
				}
				return
			}
			var ce *codec.ConfigError
			if !errors.As(err, &ce) || ce.Key != tc.key {
				t.Fatalf("Validate() = %v, want a *ConfigError naming %s", err, tc.key)
			}
			if tc.msg != "" && err.Error() != tc.msg {
				t.Fatalf("Validate() = %q\nwant         %q", err, tc.msg)
			}
			if d, err2 := codec.New(tc.cfg); d != nil || err2 == nil || err2.Error() != err.Error() {
				t.Fatalf("New() = %v, %v; want Validate's error", d, err2)
			}
		})
	}
}

// TestConfigFiles decodes the configs under testdata as a consumer would,
// rejecting unknown keys, and checks the shape of packed.yaml.
func TestConfigFiles(t *testing.T) {
	files, err := filepath.Glob(filepath.Join("testdata", "*.yaml"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no testdata: %v", err)
	}
	configs := map[string]codec.Config{}
	for _, file := range files {
		t.Run(filepath.Base(file), func(t *testing.T) {
			b, err := os.ReadFile(file)
			if err != nil {
				t.Fatal(err)
			}
			dec := yaml.NewDecoder(bytes.NewReader(b))
			dec.KnownFields(true)
			var c codec.Config
			if err := dec.Decode(&c); err != nil {
				t.Fatal(err)
			}
			d := mustNew(t, c)
			if d.Format()+".yaml" != filepath.Base(file) {
				t.Fatalf("Format() = %q", d.Format())
			}
			configs[d.Format()] = c
		})
	}
	want := codec.Config{Format: "packed", Endian: "little", Fields: []codec.Field{
		{Name: "temperature", Type: "int16", Scale: 0.01, Unit: "°C", DeviceClass: "temperature"},
		{Name: "humidity", Type: "uint8", Scale: 0.5, Unit: "%", DeviceClass: "humidity"},
		{Name: "battery", Type: "uint16", Scale: 0.001, Unit: "V", DeviceClass: "voltage"},
		{Name: "ok", Type: "bool"},
	}}
	if got := configs["packed"]; !reflect.DeepEqual(got, want) {
		t.Fatalf("packed.yaml = %+v\nwant %+v", got, want)
	}
}

func TestPackedTypes(t *testing.T) {
	for _, tc := range []struct {
		typ  string
		raw  any // written with encoding/binary in each byte order
		want any
	}{
		{"int8", int8(-128), -128.0},
		{"int8", int8(127), 127.0},
		{"uint8", uint8(255), 255.0},
		{"int16", int16(-12345), -12345.0},
		{"int16", int16(math.MaxInt16), 32767.0},
		{"uint16", uint16(65000), 65000.0},
		{"int32", int32(math.MinInt32), -2147483648.0},
		{"uint32", uint32(4000000000), 4e9},
		{"int64", int64(-1 << 62), -4611686018427387904.0},
		{"int64", int64(math.MaxInt64), 9223372036854775807.0},
		{"uint64", uint64(math.MaxUint64), 18446744073709551615.0},
		{"float32", float32(-1.5), -1.5},
		{"float32", float32(3.4e38), float64(float32(3.4e38))},
		{"float64", 2.25, 2.25},
		{"float64", math.SmallestNonzeroFloat64, math.SmallestNonzeroFloat64},
		{"bool", true, true},
		{"bool", false, false},
	} {
		for _, endian := range []string{"big", "little"} {
			t.Run(tc.typ+"/"+endian, func(t *testing.T) {
				var order binary.ByteOrder = binary.BigEndian
				if endian == "little" {
					order = binary.LittleEndian
				}
				payload, err := binary.Append(nil, order, tc.raw)
				if err != nil {
					t.Fatal(err)
				}
				d := mustNew(t, codec.Config{Format: "packed", Endian: endian, Fields: []codec.Field{{Name: "v", Type: tc.typ}}})
				got, err := d.Decode(payload)
				if err != nil {
					t.Fatal(err)
				}
				if want := map[string]any{"v": tc.want}; !reflect.DeepEqual(got, want) {
					t.Fatalf("Decode(% x) = %v, want %v", payload, got, want)
				}
			})
		}
	}
}

func TestPacked(t *testing.T) {
	layout := []codec.Field{
		{Name: "temperature", Type: "int16", Scale: 0.01},
		{Name: "humidity", Type: "uint8", Scale: 0.5},
		{Name: "battery", Type: "uint16", Scale: 0.001, Offset: 0.5},
		{Name: "ok", Type: "bool"},
	}
	cfg := func(endian string, fields ...codec.Field) codec.Config {
		return codec.Config{Format: "packed", Endian: endian, Fields: fields}
	}
	hexb := func(s string) []byte {
		b, err := hex.DecodeString(strings.ReplaceAll(s, " ", ""))
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	for _, tc := range []struct {
		name    string
		cfg     codec.Config
		payload string // hex
		want    map[string]any
		err     string
	}{
		{name: "big", cfg: cfg("", layout...), payload: "f8 30 50 0c e4 01",
			want: map[string]any{"temperature": -20.0, "humidity": 40.0, "battery": 3.8, "ok": true}},
		{name: "little", cfg: cfg("little", layout...), payload: "30 f8 50 e4 0c 00",
			want: map[string]any{"temperature": -20.0, "humidity": 40.0, "battery": 3.8, "ok": false}},
		{name: "bool nonzero is true", cfg: cfg("", codec.Field{Name: "a", Type: "bool"}, codec.Field{Name: "b", Type: "bool"}), payload: "80 ff",
			want: map[string]any{"a": true, "b": true}},
		{name: "offset only", cfg: cfg("", codec.Field{Name: "t", Type: "int8", Offset: -40}), payload: "3c",
			want: map[string]any{"t": 20.0}},
		{name: "negative scale", cfg: cfg("", codec.Field{Name: "t", Type: "uint8", Scale: -2, Offset: 1}), payload: "0a",
			want: map[string]any{"t": -19.0}},
		{name: "float scaled", cfg: cfg("little", codec.Field{Name: "t", Type: "float32", Scale: 10, Offset: 1}), payload: "0000c03f",
			want: map[string]any{"t": 16.0}},
		{name: "NaN is left out", cfg: cfg("", codec.Field{Name: "a", Type: "float32"}, codec.Field{Name: "b", Type: "uint8"}), payload: "7fc00000 07",
			want: map[string]any{"b": 7.0}},
		{name: "Inf is left out", cfg: cfg("", codec.Field{Name: "a", Type: "float64"}), payload: "fff0000000000000",
			want: map[string]any{}},
		{name: "overflow by scale is left out", cfg: cfg("", codec.Field{Name: "a", Type: "float64", Scale: 10}), payload: "7fefffffffffffff",
			want: map[string]any{}},
		{name: "short", cfg: cfg("", layout...), payload: "f8 30 50", err: "payload is 3 bytes, layout needs 6"},
		{name: "one short", cfg: cfg("", layout...), payload: "f8 30 50 0c e4", err: "payload is 5 bytes, layout needs 6"},
		{name: "trailing byte", cfg: cfg("", layout...), payload: "f8 30 50 0c e4 01 00", err: "payload is 7 bytes, layout needs 6"},
		{name: "empty", cfg: cfg("", layout...), payload: "", err: "payload is 0 bytes, layout needs 6"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := mustNew(t, tc.cfg).Decode(hexb(tc.payload))
			if tc.err != "" {
				if err == nil || err.Error() != tc.err || got != nil {
					t.Fatalf("Decode() = %v, %v; want error %q", got, err, tc.err)
				}
				return
			}
			if err != nil || !sameReadings(got, tc.want) {
				t.Fatalf("Decode() = %v, %v; want %v", got, err, tc.want)
			}
		})
	}
}

// TestPackedAllocs holds packed decoding to the allocations of building its
// result: the map and the boxing of each float64 put in it.
func TestPackedAllocs(t *testing.T) {
	d := mustNew(t, benchPacked)
	payload := benchPackedPayload
	first, err := d.Decode(payload)
	if err != nil {
		t.Fatal(err)
	}
	names := make([]string, 0, len(first))
	vals := make([]any, 0, len(first))
	for k, v := range first {
		names = append(names, k)
		vals = append(vals, v)
	}
	var sink map[string]any
	baseline := testing.AllocsPerRun(100, func() {
		m := make(map[string]any, len(names))
		for i, k := range names {
			switch v := vals[i].(type) {
			case float64:
				m[k] = v // boxed afresh, as Decode does
			default:
				m[k] = v
			}
		}
		sink = m
	})
	got := testing.AllocsPerRun(100, func() { sink, _ = d.Decode(payload) })
	if got > baseline {
		t.Fatalf("Decode allocates %v times, building its map alone %v", got, baseline)
	}
	_ = sink
}

func TestJSON(t *testing.T) {
	bare := codec.Config{Format: "json"}
	listed := codec.Config{Format: "json", Fields: []codec.Field{
		{Name: "temp", Type: "int32", Scale: 0.01},
		{Name: "rh"},
		{Name: "door", Type: "bool"},
	}}
	for _, tc := range []struct {
		name    string
		cfg     codec.Config
		payload string
		want    map[string]any
		err     string // a substring of the error
	}{
		{name: "numbers and bools", cfg: bare, payload: `{"t": 21.5, "n": -3, "e": 1e3, "on": true, "off": false}`,
			want: map[string]any{"t": 21.5, "n": -3.0, "e": 1000.0, "on": true, "off": false}},
		{name: "skips non-readings", cfg: bare,
			payload: ` {"s": "x", "z": null, "o": {"a": 1, "b": "}"}, "a": [1, {"c": "]\""}], "t": 1 } `,
			want:    map[string]any{"t": 1.0}},
		{name: "skips non-identifier keys", cfg: bare, payload: `{"a-b": 1, "1a": 2, "": 3, "ok_1": 4, "é": 5}`,
			want: map[string]any{"ok_1": 4.0}},
		{name: "escaped key", cfg: bare, payload: `{"\u0074": 1, "a\"b": 2}`, want: map[string]any{"t": 1.0}},
		{name: "last duplicate wins", cfg: bare, payload: `{"a": 1, "a": 2, "b": 1, "b": "x", "c": 1, "c": null}`,
			want: map[string]any{"a": 2.0}},
		{name: "out of range number is left out", cfg: bare, payload: `{"big": 1e400, "small": -1e400, "t": 1}`,
			want: map[string]any{"t": 1.0}},
		{name: "tiny number", cfg: bare, payload: `{"t": 1e-400}`, want: map[string]any{"t": 0.0}},
		{name: "empty object", cfg: bare, payload: `{}`, want: map[string]any{}},
		{name: "listed fields", cfg: listed, payload: `{"temp": 2150, "rh": 40.5, "door": false, "fw": "1.2", "x": 3}`,
			want: map[string]any{"temp": 21.5, "rh": 40.5, "door": false}},
		{name: "listed untyped accepts a bool", cfg: listed, payload: `{"rh": true}`, want: map[string]any{"rh": true}},
		{name: "listed absent and null", cfg: listed, payload: `{"temp": null, "door": true}`, want: map[string]any{"door": true}},
		{name: "listed escaped key", cfg: listed, payload: `{"t\u0065mp": 100}`, want: map[string]any{"temp": 1.0}},
		{name: "listed overflow by scale", cfg: codec.Config{Format: "json", Fields: []codec.Field{{Name: "a", Scale: 10}, {Name: "b"}}},
			payload: `{"a": 1e308, "b": 1}`, want: map[string]any{"b": 1.0}},
		{name: "listed wrong kind", cfg: listed, payload: `{"temp": "21"}`, err: `field "temp": got a string, want a number`},
		{name: "listed bool for number", cfg: listed, payload: `{"temp": true}`, err: `field "temp": got a bool, want a number`},
		{name: "listed number for bool", cfg: listed, payload: `{"door": 1}`, err: `field "door": got a number, want a bool`},
		{name: "listed object for any", cfg: listed, payload: `{"rh": {}}`, err: `field "rh": got an object, want a number or a bool`},
		{name: "invalid", cfg: bare, payload: `{"t": 1,}`, err: "invalid JSON: invalid character '}'"},
		{name: "truncated", cfg: bare, payload: `{"t": `, err: "invalid JSON: unexpected end of JSON input"},
		{name: "empty", cfg: bare, payload: ``, err: "invalid JSON"},
		{name: "trailing data", cfg: bare, payload: `{} {}`, err: "invalid JSON"},
		{name: "array", cfg: bare, payload: ` [1, 2]`, err: "JSON payload is an array, not an object"},
		{name: "number", cfg: bare, payload: `12`, err: "JSON payload is a number, not an object"},
		{name: "null", cfg: bare, payload: `null`, err: "JSON payload is null, not an object"},
		{name: "too many members", cfg: bare, payload: "{" + strings.Repeat(`"a":1,`, 1024) + `"b":2}`, err: "more than 1024 members"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := mustNew(t, tc.cfg).Decode([]byte(tc.payload))
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) || got != nil {
					t.Fatalf("Decode() = %v, %v; want error containing %q", got, err, tc.err)
				}
				return
			}
			if err != nil || !sameReadings(got, tc.want) {
				t.Fatalf("Decode() = %v, %v; want %v", got, err, tc.want)
			}
		})
	}
}

func TestCBOR(t *testing.T) {
	bare := codec.Config{Format: "cbor"}
	listed := codec.Config{Format: "cbor", Fields: []codec.Field{
		{Name: "temp", Type: "int16", Scale: 0.1},
		{Name: "rh"},
		{Name: "door", Type: "bool"},
	}}
	enc := func(v any) string {
		b, err := cbor.Marshal(v)
		if err != nil {
			t.Fatal(err)
		}
		return hex.EncodeToString(b)
	}
	for _, tc := range []struct {
		name    string
		cfg     codec.Config
		payload string // hex
		want    map[string]any
		err     string // a substring of the error
	}{
		{name: "numbers and bools", cfg: bare,
			payload: enc(map[string]any{"u": uint64(math.MaxUint64), "i": -7, "f": 1.5, "h": float32(0.25), "on": true}),
			want:    map[string]any{"u": 18446744073709551615.0, "i": -7.0, "f": 1.5, "h": 0.25, "on": true}},
		{name: "half float", cfg: bare, payload: "a1 6174 f9 3e00", want: map[string]any{"t": 1.5}},
		{name: "skips non-readings", cfg: bare,
			payload: enc(map[string]any{"s": "x", "b": []byte{1}, "n": nil, "a": []int{1}, "m": map[int]int{1: 2}, "t": 1}),
			want:    map[string]any{"t": 1.0}},
		{name: "skips non-identifier keys", cfg: bare, payload: enc(map[string]int{"a-b": 1, "": 2, "ok": 3}),
			want: map[string]any{"ok": 3.0}},
		{name: "NaN and Inf are left out", cfg: bare, payload: enc(map[string]float64{"n": math.NaN(), "i": math.Inf(1), "t": 2}),
			want: map[string]any{"t": 2.0}},
		{name: "bignums", cfg: bare, payload: "a2 6170 c2 49 010000000000000000 616e 3b ffffffffffffffff",
			want: map[string]any{"p": 18446744073709551616.0, "n": -18446744073709551616.0}},
		{name: "self-described", cfg: bare, payload: "d9d9f7 a1 6174 01", want: map[string]any{"t": 1.0}},
		{name: "indefinite map", cfg: bare, payload: "bf 6174 01 ff", want: map[string]any{"t": 1.0}},
		{name: "last duplicate wins", cfg: bare, payload: "a2 6174 01 6174 02", want: map[string]any{"t": 2.0}},
		{name: "other tags and simple values skipped", cfg: bare, payload: "a2 6174 c1 01 6173 e0", want: map[string]any{}},
		{name: "listed fields", cfg: listed, payload: enc(map[string]any{"temp": 215, "rh": 40.5, "door": true, "fw": "1.2"}),
			want: map[string]any{"temp": 21.5, "rh": 40.5, "door": true}},
		{name: "listed null", cfg: listed, payload: enc(map[string]any{"temp": nil, "rh": false}), want: map[string]any{"rh": false}},
		{name: "listed wrong kind", cfg: listed, payload: enc(map[string]any{"temp": "21"}), err: `field "temp": got a text string, want a number`},
		{name: "listed number for bool", cfg: listed, payload: enc(map[string]any{"door": 0}), err: `field "door": got a number, want a bool`},
		{name: "listed bool for number", cfg: listed, payload: enc(map[string]any{"temp": true}), err: `field "temp": got a bool, want a number`},
		{name: "empty", cfg: bare, payload: "", err: "invalid CBOR: empty payload"},
		{name: "truncated", cfg: bare, payload: "a2 6174 01", err: "invalid CBOR"},
		{name: "trailing data", cfg: bare, payload: "a1 6174 01 00", err: "invalid CBOR"},
		{name: "array", cfg: bare, payload: "83 010203", err: "CBOR payload is an array, not a map"},
		{name: "tagged text", cfg: bare, payload: "d820 6161", err: "CBOR payload is a text string, not a map"},
		{name: "null", cfg: bare, payload: "f6", err: "CBOR payload is null, not a map"},
		{name: "undefined", cfg: bare, payload: "f7", err: "CBOR payload is undefined, not a map"},
		{name: "integer key", cfg: bare, payload: "a1 01 01", err: "CBOR map keys must be text strings, got positive integer"},
		{name: "byte string key", cfg: bare, payload: "a1 4161 01", err: "CBOR map keys must be text strings, got byte string"},
		{name: "too deep", cfg: bare, payload: "a1 6161" + strings.Repeat("81", 16) + "00", err: "exceeded max nested level"},
		{name: "too long", cfg: bare, payload: "a1 6161 9a00000401" + strings.Repeat("00", 1025), err: "exceeded max number of elements"},
		{name: "too many pairs", cfg: bare, payload: "ba00000401", err: "exceeded max number of key-value pairs"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			payload, err := hex.DecodeString(strings.ReplaceAll(tc.payload, " ", ""))
			if err != nil {
				t.Fatal(err)
			}
			got, err := mustNew(t, tc.cfg).Decode(payload)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) || got != nil {
					t.Fatalf("Decode() = %v, %v; want error containing %q", got, err, tc.err)
				}
				return
			}
			if err != nil || !sameReadings(got, tc.want) {
				t.Fatalf("Decode() = %v, %v; want %v", got, err, tc.want)
			}
		})
	}
}

func TestRaw(t *testing.T) {
	d := mustNew(t, codec.Config{Format: "raw"})
	for _, p := range [][]byte{nil, {}, []byte("anything"), {0xff}} {
		if m, err := d.Decode(p); m != nil || err != nil {
			t.Fatalf("Decode(%q) = %v, %v; want nil, nil", p, m, err)
		}
	}
	if d.Format() != "raw" || d.Fields() != nil {
		t.Fatalf("Format() = %q, Fields() = %v", d.Format(), d.Fields())
	}
}

func TestFields(t *testing.T) {
	in := []codec.Field{
		{Name: "t", Type: "int16", Scale: 0.1, Unit: "°C", DeviceClass: "temperature"},
		{Name: "n", Type: "uint8", Offset: 3},
		{Name: "ok", Type: "bool"},
	}
	d := mustNew(t, codec.Config{Format: "packed", Fields: in})
	one, zero := 1, 0 // the precision applied to scaled integers: that of scale and offset
	want := []codec.Field{in[0], {Name: "n", Type: "uint8", Scale: 1, Offset: 3, Precision: &zero}, in[2]}
	want[0].Precision = &one
	got := d.Fields()
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("Fields() = %+v\nwant %+v", got, want)
	}
	got[0].Name = "changed"
	in[0].Name = "changed too"
	if d.Fields()[0].Name != "t" || d.Format() != "packed" {
		t.Fatal("Fields() shares memory with the Decoder or the Config")
	}
	if f := mustNew(t, codec.Config{Format: "json"}).Fields(); f != nil {
		t.Fatalf("json without fields: Fields() = %v", f)
	}
}

// TestConcurrent decodes every format from several goroutines; run with
// -race.
func TestConcurrent(t *testing.T) {
	decoders := []*codec.Decoder{mustNew(t, benchPacked), mustNew(t, benchJSON), mustNew(t, benchCBOR)}
	payloads := [][]byte{benchPackedPayload, benchJSONPayload, benchCBORPayload}
	var wg sync.WaitGroup
	for range 4 {
		wg.Go(func() {
			for range 100 {
				for i, d := range decoders {
					m, err := d.Decode(payloads[i])
					if err != nil || len(m) == 0 {
						t.Errorf("%s: %v, %v", d.Format(), m, err)
						return
					}
					if _, err := json.Marshal(m); err != nil {
						t.Errorf("%s: %v", d.Format(), err)
						return
					}
				}
			}
		})
	}
	wg.Wait()
}
