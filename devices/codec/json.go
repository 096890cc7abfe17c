package codec

import (
	"encoding/json"
	"fmt"
	"strconv"
)

// decodeJSON checks the payload with json.Valid, then walks the top-level
// object by hand: unlike json.Unmarshal it builds no values for strings,
// arrays and nested objects, and looks listed keys up without allocating.
func (d *Decoder) decodeJSON(p []byte) (map[string]any, error) {
	if !json.Valid(p) {
		// The slow path, for the error's detail.
		err := json.Unmarshal(p, new(json.RawMessage))
		return nil, fmt.Errorf("invalid JSON: %w", err)
	}
	i := skipSpace(p, 0)
	if p[i] != '{' {
		return nil, fmt.Errorf("JSON payload is %s, not an object", jsonKind(p[i]))
	}
	m := make(map[string]any, len(d.fields))
	i = skipSpace(p, i+1)
	for n := 1; p[i] != '}'; n++ {
		if n > maxMembers {
			return nil, fmt.Errorf("JSON object has more than %d members", maxMembers)
		}
		end, escaped := skipString(p, i)
		key := p[i+1 : end-1]
		i = skipSpace(p, end) // at ':'
		i = skipSpace(p, i+1) // at the value
		end = skipValue(p, i)
		if err := d.jsonMember(m, key, escaped, p[i:end]); err != nil {
			return nil, err
		}
		i = skipSpace(p, end) // at ',' or '}'
		if p[i] == ',' {
			i = skipSpace(p, i+1)
		}
	}
	return m, nil
}

// jsonMember stores one member's reading in m, or removes an earlier one
// under the same key, so that the last duplicate wins as in json.Unmarshal.
func (d *Decoder) jsonMember(m map[string]any, key []byte, escaped bool, val []byte) error {
	if escaped {
		// Rare: unescape the key. It was validated, so this cannot fail.
		var s string
		if err := json.Unmarshal(append(append([]byte{'"'}, key...), '"'), &s); err != nil {
			return fmt.Errorf("JSON key: %w", err)
		}
		key = []byte(s)
	}
	var f *field
	if d.index != nil {
		i, ok := d.index[string(key)] // no allocation
		if !ok {
			return nil
		}
		f = &d.fields[i]
	} else if !isIdent(key) {
		return nil
	}
	var v any // nil: no reading
	switch c := val[0]; {
	case c == 't' || c == 'f':
		if f != nil && f.kind != kindAny && f.kind != kindBool {
			return mismatch(f, "a bool")
		}
		v = c == 't'
	case c == '-' || '0' <= c && c <= '9':
		if f != nil && f.kind == kindBool {
			return mismatch(f, "a number")
		}
		// Out of range numbers come back as ±Inf with an error; they
		// are dropped below like any other non-finite reading.
		x, _ := strconv.ParseFloat(string(val), 64)
		if f != nil {
			x = f.scaled(x)
		}
		if finite(x) {
			v = x
		}
	case c == 'n':
	default:
		if f != nil {
			return mismatch(f, jsonKind(c))
		}
	}
	switch {
	case f != nil && v == nil:
		delete(m, f.name)
	case f != nil:
		m[f.name] = v
	case v != nil:
		m[string(key)] = v
	default:
		delete(m, string(key)) // no allocation
	}
	return nil
}

func jsonKind(c byte) string {
	switch c {
	case '{':
		return "an object"
	case '[':
		return "an array"
	case '"':
		return "a string"
	case 'n':
		return "null"
	case 't', 'f':
		return "a bool"
	}
	return "a number"
}

// The helpers below assume valid JSON, checked by json.Valid first.

func skipSpace(p []byte, i int) int {
	for i < len(p) && (p[i] == ' ' || p[i] == '\t' || p[i] == '\n' || p[i] == '\r') {
		i++
	}
	return i
}

// skipString returns the index after the string that starts with the quote
// at p[i], and whether it holds escapes.
func skipString(p []byte, i int) (end int, escaped bool) {
	for i++; ; i++ {
		switch p[i] {
		case '\\':
			escaped = true
			i++
		case '"':
			return i + 1, escaped
		}
	}
}

// skipValue returns the index after the value that starts at p[i].
func skipValue(p []byte, i int) int {
	switch p[i] {
	case '"':
		end, _ := skipString(p, i)
		return end
	case '{', '[':
		depth := 0
		for {
			switch p[i] {
			case '{', '[':
				depth++
			case '}', ']':
				if depth--; depth == 0 {
					return i + 1
				}
			case '"':
				i, _ = skipString(p, i)
				continue
			}
			i++
		}
	case 't', 'n':
		return i + 4
	case 'f':
		return i + 5
	}
	for i < len(p) && (p[i] == '-' || p[i] == '+' || p[i] == '.' || p[i] == 'e' || p[i] == 'E' || '0' <= p[i] && p[i] <= '9') {
		i++
	}
	return i
}
