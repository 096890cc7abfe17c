package codec

import (
	"errors"
	"fmt"
	"math/big"

	"github.com/fxamacker/cbor/v2"
)

// cborMode is the decoding mode for every cbor payload: bounded nesting and
// lengths, and integers as uint64 or int64 (big.Int past int64's range).
// Decoding into a map[string]any admits only text keys at the top level.
var cborMode = func() cbor.DecMode {
	dm, err := cbor.DecOptions{
		MaxNestedLevels:  16,
		MaxArrayElements: maxMembers,
		MaxMapPairs:      maxMembers,
	}.DecMode()
	if err != nil {
		panic("codec: cbor options: " + err.Error()) // a bug, caught by any test
	}
	return dm
}()

// decodeCBOR decodes the payload into a map[string]any and then turns that
// map into the result in place: readings become float64 or bool, and
// everything else is deleted.
func (d *Decoder) decodeCBOR(p []byte) (map[string]any, error) {
	if len(p) == 0 {
		return nil, errors.New("invalid CBOR: empty payload")
	}
	var m map[string]any
	if err := cborMode.Unmarshal(p, &m); err != nil {
		var te *cbor.UnmarshalTypeError
		if errors.As(err, &te) {
			if kind := cborTop(p); kind != "a map" {
				return nil, fmt.Errorf("CBOR payload is %s, not a map", kind)
			}
			if te.GoType == "string" {
				return nil, fmt.Errorf("CBOR map keys must be text strings, got %s", te.CBORType)
			}
		}
		return nil, fmt.Errorf("invalid CBOR: %w", err)
	}
	if m == nil { // null and undefined leave m alone
		return nil, fmt.Errorf("CBOR payload is %s, not a map", cborTop(p))
	}
	for k, v := range m {
		var f *field
		if d.index != nil {
			i, ok := d.index[k]
			if !ok {
				delete(m, k)
				continue
			}
			f = &d.fields[i]
		} else if !isIdent(k) {
			delete(m, k)
			continue
		}
		var x float64
		switch v := v.(type) {
		case bool:
			if f != nil && f.kind != kindAny && f.kind != kindBool {
				return nil, mismatch(f, "a bool")
			}
			continue
		case uint64:
			x = float64(v)
		case int64:
			x = float64(v)
		case float64:
			if f == nil && finite(v) {
				continue // already a reading, keep its box
			}
			x = v
		case big.Int:
			x, _ = new(big.Float).SetInt(&v).Float64()
		case nil:
			delete(m, k)
			continue
		default:
			if f != nil {
				return nil, mismatch(f, cborKind(v))
			}
			delete(m, k)
			continue
		}
		if f != nil {
			if f.kind == kindBool {
				return nil, mismatch(f, "a number")
			}
			x = f.scaled(x)
		}
		if finite(x) {
			m[k] = x
		} else {
			delete(m, k)
		}
	}
	return m, nil
}

func cborKind(v any) string {
	switch v.(type) {
	case string:
		return "a text string"
	case []byte:
		return "a byte string"
	case []any:
		return "an array"
	case map[any]any:
		return "a map"
	case cbor.Tag:
		return "a tagged value"
	case cbor.SimpleValue:
		return "a simple value"
	}
	return fmt.Sprintf("a %T", v)
}

// cborTop names the kind of the well-formed CBOR item in p, looking through
// tags.
func cborTop(p []byte) string {
	for len(p) > 0 && p[0]>>5 == 6 { // skip a tag's head
		n := 1
		switch p[0] & 0x1f {
		case 24:
			n = 2
		case 25:
			n = 3
		case 26:
			n = 5
		case 27:
			n = 9
		}
		p = p[min(n, len(p)):]
	}
	if len(p) == 0 {
		return "truncated"
	}
	switch p[0] >> 5 {
	case 0, 1:
		return "an integer"
	case 2:
		return "a byte string"
	case 3:
		return "a text string"
	case 4:
		return "an array"
	case 5:
		return "a map"
	}
	switch p[0] {
	case 0xf4, 0xf5:
		return "a bool"
	case 0xf6:
		return "null"
	case 0xf7:
		return "undefined"
	case 0xf9, 0xfa, 0xfb:
		return "a float"
	}
	return "a simple value"
}
