package codec_test

import (
	"testing"

	"github.com/beaconmq/beacon/devices/codec"
)

// A typical environment sensor, in each format.
var (
	benchPacked = codec.Config{Format: "packed", Endian: "little", Fields: []codec.Field{
		{Name: "temperature", Type: "int16", Scale: 0.01, Unit: "°C", DeviceClass: "temperature"},
		{Name: "humidity", Type: "uint8", Scale: 0.5, Unit: "%", DeviceClass: "humidity"},
		{Name: "battery", Type: "uint16", Scale: 0.001, Unit: "V", DeviceClass: "voltage"},
		{Name: "pressure", Type: "float32", Unit: "hPa", DeviceClass: "pressure"},
		{Name: "ok", Type: "bool"},
	}}
	benchPackedPayload = []byte{0x66, 0x08, 0x50, 0xe4, 0x0c, 0x00, 0x50, 0x7d, 0x44, 0x01}

	benchJSON        = codec.Config{Format: "json"}
	benchJSONPayload = []byte(`{"temperature": 21.5, "humidity": 40, "battery": 3.3, "pressure": 1013.25, "ok": true, "fw": "1.4.2", "rssi": -71}`)

	benchCBOR = codec.Config{Format: "cbor"}
	// The same readings as benchJSONPayload.
	benchCBORPayload = []byte("\xa7" +
		"\x6btemperature\xf9\x4d\x60" +
		"\x68humidity\x18\x28" +
		"\x67battery\xfb\x40\x0a\x66\x66\x66\x66\x66\x66" +
		"\x68pressure\xfa\x44\x7d\x50\x00" +
		"\x62ok\xf5" +
		"\x62fw\x651.4.2" +
		"\x64rssi\x38\x46")
)

func benchDecode(b *testing.B, c codec.Config, payload []byte) {
	d := mustNew(b, c)
	if _, err := d.Decode(payload); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	b.SetBytes(int64(len(payload)))
	for b.Loop() {
		if _, err := d.Decode(payload); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkPacked(b *testing.B) { benchDecode(b, benchPacked, benchPackedPayload) }

func BenchmarkJSON(b *testing.B) { benchDecode(b, benchJSON, benchJSONPayload) }

// BenchmarkJSONFields picks three of the keys with a fields list.
func BenchmarkJSONFields(b *testing.B) {
	c := codec.Config{Format: "json", Fields: []codec.Field{{Name: "temperature"}, {Name: "humidity"}, {Name: "ok", Type: "bool"}}}
	benchDecode(b, c, benchJSONPayload)
}

func BenchmarkCBOR(b *testing.B) { benchDecode(b, benchCBOR, benchCBORPayload) }

func BenchmarkRaw(b *testing.B) {
	benchDecode(b, codec.Config{Format: "raw"}, benchJSONPayload)
}
