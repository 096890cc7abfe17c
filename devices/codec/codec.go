package codec

import (
	"fmt"
	"math"
	"slices"
	"strconv"
	"strings"
)

// Format names, the values of Config.Format.
const (
	FormatJSON   = "json"
	FormatCBOR   = "cbor"
	FormatPacked = "packed"
	FormatRaw    = "raw"
)

// maxMembers bounds the fields of a Config, the members of a top-level JSON
// object and the elements of CBOR arrays and maps.
const maxMembers = 1024

// Config describes one payload format. The zero value is invalid: Format
// is required.
type Config struct {
	// Format is json, cbor, packed or raw.
	Format string `yaml:"format" json:"format"`
	// Endian is the byte order of packed fields: big (the default when
	// empty) or little. Only packed payloads have one.
	Endian string `yaml:"endian,omitempty" json:"endian,omitempty"`
	// Fields is the layout of a packed payload, in order, and needs at
	// least one entry. For json and cbor it is optional and picks which
	// top-level keys are readings; without it every top-level number and
	// bool is one. A raw payload has no fields.
	Fields []Field `yaml:"fields,omitempty" json:"fields,omitempty"`
}

// Field is one reading in a payload.
type Field struct {
	// Name is the reading's key in Decode's map and, for json and cbor, in
	// the payload: [A-Za-z_][A-Za-z0-9_]{0,63}, unique within a Config.
	Name string `yaml:"name" json:"name"`
	// Type is int8, int16, int32, int64, uint8, uint16, uint32, uint64,
	// float32, float64 or bool. Required for packed. For json and cbor it
	// is optional: empty accepts a number or a bool, bool requires a bool,
	// and any numeric type requires a number of any size.
	Type string `yaml:"type,omitempty" json:"type,omitempty"`
	// Scale multiplies a numeric raw value. 0, the zero value, means 1:
	// a scale of zero would make every reading 0, so it cannot be asked for.
	Scale float64 `yaml:"scale,omitempty" json:"scale,omitempty"`
	// Offset is added after scaling: value = raw*Scale + Offset.
	Offset float64 `yaml:"offset,omitempty" json:"offset,omitempty"`
	// Unit is the unit of measurement, such as "°C" or "%". Metadata only.
	Unit string `yaml:"unit,omitempty" json:"unit,omitempty"`
	// DeviceClass is the Home Assistant device class, such as
	// temperature. Metadata only.
	DeviceClass string `yaml:"device_class,omitempty" json:"device_class,omitempty"`
	// Precision, when set, rounds a numeric reading to this many decimals
	// (0-10). Unset, a reading of an integer type that is scaled is
	// rounded to the decimals of its scale and offset, which loses
	// nothing: 3711 × 0.001 is 3.711, not 3.7110000000000003. It is also
	// Home Assistant's suggested_display_precision.
	Precision *int `yaml:"precision,omitempty" json:"precision,omitempty"`
	// Label is the reading's display name (Home Assistant's entity name);
	// empty: made from Name ("battery_level" is "Battery level").
	Label string `yaml:"label,omitempty" json:"label,omitempty"`
	// EntityCategory is Home Assistant's entity_category: diagnostic or
	// config. Empty: diagnostic for signal strength, voltage and link
	// readings (rssi, snr, lqi, uptime), none otherwise.
	EntityCategory string `yaml:"entity_category,omitempty" json:"entity_category,omitempty"`
}

// maxPrecision bounds Field.Precision.
const maxPrecision = 10

// decimals is the number of decimals f is written with, or -1 past
// maxPrecision.
func decimals(f float64) int {
	s := strconv.FormatFloat(f, 'f', -1, 64)
	i := strings.IndexByte(s, '.')
	if i < 0 {
		return 0
	}
	if n := len(s) - i - 1; n <= maxPrecision {
		return n
	}
	return -1
}

// ConfigError is a Config validation error naming the offending key, such
// as "fields[2].type".
type ConfigError struct {
	Key string
	Msg string
}

func (e *ConfigError) Error() string { return e.Key + ": " + e.Msg }

type kind uint8

const (
	kindAny kind = iota // json and cbor only: a number or a bool
	kindInt8
	kindInt16
	kindInt32
	kindInt64
	kindUint8
	kindUint16
	kindUint32
	kindUint64
	kindFloat32
	kindFloat64
	kindBool
)

var typeNames = [...]string{
	kindInt8: "int8", kindInt16: "int16", kindInt32: "int32", kindInt64: "int64",
	kindUint8: "uint8", kindUint16: "uint16", kindUint32: "uint32", kindUint64: "uint64",
	kindFloat32: "float32", kindFloat64: "float64", kindBool: "bool",
}

var typeSizes = [...]int{
	kindInt8: 1, kindInt16: 2, kindInt32: 4, kindInt64: 8,
	kindUint8: 1, kindUint16: 2, kindUint32: 4, kindUint64: 8,
	kindFloat32: 4, kindFloat64: 8, kindBool: 1,
}

var typeList = strings.Join(typeNames[kindInt8:], ", ")

func parseType(s string) (kind, bool) {
	for k := kindInt8; k <= kindBool; k++ {
		if typeNames[k] == s {
			return k, true
		}
	}
	return kindAny, false
}

// isIdent reports whether s matches [A-Za-z_][A-Za-z0-9_]{0,63}.
func isIdent[S string | []byte](s S) bool {
	if len(s) == 0 || len(s) > 64 {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c == '_', 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z':
		case '0' <= c && c <= '9' && i > 0:
		default:
			return false
		}
	}
	return true
}

func finite(f float64) bool { return !math.IsNaN(f) && !math.IsInf(f, 0) }

// Validate checks c and names the first bad key in a *ConfigError.
func (c Config) Validate() error {
	bad := func(key, format string, a ...any) error {
		return &ConfigError{Key: key, Msg: fmt.Sprintf(format, a...)}
	}
	switch c.Format {
	case FormatJSON, FormatCBOR, FormatPacked, FormatRaw:
	case "":
		return bad("format", "missing (one of json, cbor, packed, raw)")
	default:
		return bad("format", "unknown format %q (one of json, cbor, packed, raw)", c.Format)
	}
	switch c.Endian {
	case "", "big", "little":
		if c.Endian != "" && c.Format != FormatPacked {
			return bad("endian", "only packed payloads have a byte order")
		}
	default:
		return bad("endian", "%q is not big or little", c.Endian)
	}
	switch {
	case c.Format == FormatRaw && len(c.Fields) > 0:
		return bad("fields", "a raw payload has no fields")
	case c.Format == FormatPacked && len(c.Fields) == 0:
		return bad("fields", "a packed payload needs at least one field")
	case len(c.Fields) > maxMembers:
		return bad("fields", "%d fields, more than %d", len(c.Fields), maxMembers)
	}
	seen := make(map[string]int, len(c.Fields))
	for i, f := range c.Fields {
		key := fmt.Sprintf("fields[%d].", i)
		if f.Name == "" {
			return bad(key+"name", "missing")
		}
		if !isIdent(f.Name) {
			return bad(key+"name", "%q is not an identifier ([A-Za-z_][A-Za-z0-9_]{0,63})", f.Name)
		}
		if j, dup := seen[f.Name]; dup {
			return bad(key+"name", "%q duplicates fields[%d]", f.Name, j)
		}
		seen[f.Name] = i
		k, ok := parseType(f.Type)
		switch {
		case f.Type == "" && c.Format == FormatPacked:
			return bad(key+"type", "missing (one of %s)", typeList)
		case f.Type != "" && !ok:
			return bad(key+"type", "unknown type %q (one of %s)", f.Type, typeList)
		}
		if !finite(f.Scale) {
			return bad(key+"scale", "%v is not a finite number", f.Scale)
		}
		if !finite(f.Offset) {
			return bad(key+"offset", "%v is not a finite number", f.Offset)
		}
		if k == kindBool && f.Scale != 0 {
			return bad(key+"scale", "a bool field has no scale")
		}
		if k == kindBool && f.Offset != 0 {
			return bad(key+"offset", "a bool field has no offset")
		}
		if f.Precision != nil && (*f.Precision < 0 || *f.Precision > maxPrecision) {
			return bad(key+"precision", "%d is not 0 to %d decimals", *f.Precision, maxPrecision)
		}
		if k == kindBool && f.Precision != nil {
			return bad(key+"precision", "a bool field has no precision")
		}
		switch f.EntityCategory {
		case "", "diagnostic", "config":
		default:
			return bad(key+"entity_category", "%q is not diagnostic or config", f.EntityCategory)
		}
		if len(f.Label) > 256 {
			return bad(key+"label", "longer than 256 bytes")
		}
	}
	return nil
}

// field is a compiled Field.
type field struct {
	name   string
	kind   kind
	off    int // packed: byte offset in the payload
	scale  float64
	offset float64
	round  float64 // 10^precision; 0: not rounded
}

// Decoder decodes payloads of one format. It is immutable and safe for
// concurrent use; build it with New.
type Decoder struct {
	format string
	little bool           // packed byte order
	size   int            // packed payload length
	fields []field        // in Config order
	index  map[string]int // json and cbor: name -> fields index; nil without fields
	config []Field        // as configured, with Scale defaulted
}

// New validates c and compiles it into a Decoder.
func New(c Config) (*Decoder, error) {
	if err := c.Validate(); err != nil {
		return nil, err
	}
	d := &Decoder{format: c.Format, little: c.Endian == "little"}
	if len(c.Fields) > 0 {
		d.fields = make([]field, len(c.Fields))
		d.config = slices.Clone(c.Fields)
	}
	if len(c.Fields) > 0 && c.Format != FormatPacked {
		d.index = make(map[string]int, len(c.Fields))
	}
	for i, f := range c.Fields {
		k, _ := parseType(f.Type)
		if f.Scale == 0 && k != kindBool {
			f.Scale = 1
			d.config[i].Scale = 1
		}
		if f.Precision == nil && k >= kindInt8 && k <= kindUint64 && (f.Scale != 1 || f.Offset != 0) {
			// An integer scaled has exactly the decimals of scale and offset.
			if ds, do := decimals(f.Scale), decimals(f.Offset); ds >= 0 && do >= 0 {
				n := max(ds, do)
				d.config[i].Precision = &n
			}
		} else if f.Precision != nil {
			n := *f.Precision
			d.config[i].Precision = &n // not shared with the caller's Config
		}
		var round float64
		if p := d.config[i].Precision; p != nil {
			round = math.Pow10(*p)
		}
		d.fields[i] = field{name: f.Name, kind: k, off: d.size, scale: f.Scale, offset: f.Offset, round: round}
		if c.Format == FormatPacked {
			d.size += typeSizes[k]
		}
		if d.index != nil {
			d.index[f.Name] = i
		}
	}
	return d, nil
}

// Format returns the Config.Format the Decoder was built from.
func (d *Decoder) Format() string { return d.format }

// Fields returns a copy of the configured fields, with Scale 0 replaced by
// its meaning, 1 (bool fields keep 0), and Precision by the one applied
// (set for scaled integers). It is nil for raw payloads and for
// json and cbor payloads without a fields list.
func (d *Decoder) Fields() []Field {
	out := slices.Clone(d.config)
	for i := range out {
		if p := out[i].Precision; p != nil {
			n := *p
			out[i].Precision = &n
		}
	}
	return out
}

// Decode decodes one payload into field name → float64 or bool. Readings
// that are NaN or ±Inf are left out. For raw payloads it returns nil, nil.
// Errors describe what is wrong with the payload.
func (d *Decoder) Decode(payload []byte) (map[string]any, error) {
	switch d.format {
	case FormatPacked:
		return d.decodePacked(payload)
	case FormatJSON:
		return d.decodeJSON(payload)
	case FormatCBOR:
		return d.decodeCBOR(payload)
	}
	return nil, nil
}

// scaled applies scale and offset. The float64 conversion stops the
// compiler from fusing the multiply and add, so results are the same on
// every architecture.
func (f *field) scaled(v float64) float64 {
	v = float64(v*f.scale) + f.offset
	if f.round != 0 {
		if r := math.Round(v*f.round) / f.round; finite(r) {
			return r
		}
	}
	return v
}

// mismatch is the error for a listed json or cbor field holding got.
func mismatch(f *field, got string) error {
	want := "a number"
	switch f.kind {
	case kindBool:
		want = "a bool"
	case kindAny:
		want = "a number or a bool"
	}
	return fmt.Errorf("field %q: got %s, want %s", f.name, got, want)
}
