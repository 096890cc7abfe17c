package codec_test

import (
	"encoding/binary"
	"math"
	"testing"

	"github.com/beaconmq/beacon/devices/codec"
)

func TestPrecision(t *testing.T) {
	two := 2
	d := mustNew(t, codec.Config{Format: "packed", Endian: "little", Fields: []codec.Field{
		{Name: "battery", Type: "uint16", Scale: 0.001},            // rounded to 3 decimals, losing nothing
		{Name: "temp", Type: "float32"},                            // a float: never rounded unasked
		{Name: "hum", Type: "float32", Precision: &two},            // asked
		{Name: "offset", Type: "int8", Scale: 0.1, Offset: -40.05}, // the decimals of the offset
	}})
	p := make([]byte, 11)
	binary.LittleEndian.PutUint16(p[0:], 3711)
	binary.LittleEndian.PutUint32(p[2:], math.Float32bits(21.1))
	binary.LittleEndian.PutUint32(p[6:], math.Float32bits(45.678))
	p[10] = 7
	v, err := d.Decode(p)
	if err != nil {
		t.Fatal(err)
	}
	if v["battery"] != 3.711 || v["hum"] != 45.68 || v["offset"] != -39.35 {
		t.Fatalf("rounded: %v", v)
	}
	if v["temp"] != float64(float32(21.1)) {
		t.Fatalf("a float32 without precision changed: %v", v["temp"])
	}
	raw, scale := 3711.0, 0.001
	if raw*scale == 3.711 {
		t.Fatal("the test no longer shows the artifact it guards against")
	}
	fs := d.Fields()
	if fs[0].Precision == nil || *fs[0].Precision != 3 || fs[1].Precision != nil || *fs[2].Precision != 2 || *fs[3].Precision != 2 {
		t.Fatalf("Fields() precision: %+v", fs)
	}

	zero := 0
	j := mustNew(t, codec.Config{Format: "json", Fields: []codec.Field{{Name: "rssi", Precision: &zero}}})
	if v, err := j.Decode([]byte(`{"rssi": -71.6}`)); err != nil || v["rssi"] != -72.0 {
		t.Fatalf("json precision 0: %v %v", v, err)
	}

	bad := 11
	for _, tc := range []struct {
		f   codec.Field
		key string
	}{
		{codec.Field{Name: "x", Type: "uint8", Precision: &bad}, "fields[0].precision"},
		{codec.Field{Name: "x", Type: "bool", Precision: &zero}, "fields[0].precision"},
		{codec.Field{Name: "x", Type: "uint8", EntityCategory: "debug"}, "fields[0].entity_category"},
	} {
		err := codec.Config{Format: "packed", Fields: []codec.Field{tc.f}}.Validate()
		if ce, ok := err.(*codec.ConfigError); !ok || ce.Key != tc.key {
			t.Errorf("%+v: %v, want %s", tc.f, err, tc.key)
		}
	}
}
