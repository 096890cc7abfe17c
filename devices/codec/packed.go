package codec

import (
	"encoding/binary"
	"fmt"
	"math"
)

func (d *Decoder) decodePacked(p []byte) (map[string]any, error) {
	if len(p) != d.size {
		return nil, fmt.Errorf("payload is %d bytes, layout needs %d", len(p), d.size)
	}
	m := make(map[string]any, len(d.fields))
	for i := range d.fields {
		f := &d.fields[i]
		b := p[f.off:]
		var v float64
		switch f.kind {
		case kindBool:
			m[f.name] = b[0] != 0
			continue
		case kindInt8:
			v = float64(int8(b[0]))
		case kindUint8:
			v = float64(b[0])
		case kindInt16:
			v = float64(int16(d.u16(b)))
		case kindUint16:
			v = float64(d.u16(b))
		case kindInt32:
			v = float64(int32(d.u32(b)))
		case kindUint32:
			v = float64(d.u32(b))
		case kindInt64:
			v = float64(int64(d.u64(b)))
		case kindUint64:
			v = float64(d.u64(b))
		case kindFloat32:
			v = float64(math.Float32frombits(d.u32(b)))
		case kindFloat64:
			v = math.Float64frombits(d.u64(b))
		}
		if v = f.scaled(v); finite(v) {
			m[f.name] = v
		}
	}
	return m, nil
}

func (d *Decoder) u16(b []byte) uint16 {
	if d.little {
		return binary.LittleEndian.Uint16(b)
	}
	return binary.BigEndian.Uint16(b)
}

func (d *Decoder) u32(b []byte) uint32 {
	if d.little {
		return binary.LittleEndian.Uint32(b)
	}
	return binary.BigEndian.Uint32(b)
}

func (d *Decoder) u64(b []byte) uint64 {
	if d.little {
		return binary.LittleEndian.Uint64(b)
	}
	return binary.BigEndian.Uint64(b)
}
