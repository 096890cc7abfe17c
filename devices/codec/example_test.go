package codec_test

import (
	"fmt"

	"gopkg.in/yaml.v3"

	"github.com/beaconmq/beacon/devices/codec"
)

func Example() {
	const config = `
format: packed
endian: little
fields:
  - {name: temperature, type: int16, scale: 0.01, unit: "°C", device_class: temperature}
  - {name: humidity, type: uint8, scale: 0.5, unit: "%", device_class: humidity}
  - {name: battery, type: uint16, scale: 0.001, unit: V, device_class: voltage}
  - {name: ok, type: bool}
`
	var c codec.Config
	if err := yaml.Unmarshal([]byte(config), &c); err != nil {
		fmt.Println(err)
		return
	}
	d, err := codec.New(c)
	if err != nil {
		fmt.Println(err)
		return
	}
	readings, err := d.Decode([]byte{0x66, 0x08, 0x50, 0xb8, 0x0b, 0x01})
	if err != nil {
		fmt.Println(err)
		return
	}
	for _, f := range d.Fields() { // in layout order, with units
		if f.Unit == "" {
			fmt.Println(f.Name, readings[f.Name])
			continue
		}
		fmt.Println(f.Name, readings[f.Name], f.Unit)
	}
	_, err = d.Decode([]byte{0x66, 0x08, 0x50})
	fmt.Println(err)
	// Output:
	// temperature 21.5 °C
	// humidity 40 %
	// battery 3 V
	// ok true
	// payload is 3 bytes, layout needs 6
}
