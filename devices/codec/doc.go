// Package codec decodes device telemetry payloads into flat maps of sensor
// readings, ready for storage, metrics or Home Assistant discovery.
//
// A [Config] describes one payload format and [New] compiles it into a
// [Decoder]. [Decoder.Decode] returns field name → value, where every value
// is a float64 or a bool. The formats are:
//
//   - packed: a fixed binary layout, fields back to back with no padding,
//     big-endian unless endian is little. Types are int8, int16, int32,
//     int64, uint8, uint16, uint32, uint64, float32, float64 and bool (one
//     byte, nonzero is true). The payload must be exactly as long as the
//     layout: a shorter or longer one is an error. Integers wider than 53
//     bits lose precision on their way to float64.
//   - json: a JSON object, all of it valid JSON. Only top-level numbers and
//     booleans are read: nested objects and arrays are not flattened, and
//     strings and nulls are not readings. Without fields, every top-level number or boolean whose
//     key is an identifier (see below) is returned; keys that are not are
//     skipped. With fields, only the listed keys are returned, a listed key
//     that is absent or null is left out, and a listed key holding a value
//     of the wrong kind is an error. Duplicate keys: the last one wins.
//   - cbor: a CBOR map with text-string keys (RFC 8949), read like json.
//     Integers, floats (half, single, double) and bignums (tags 2 and 3)
//     are numbers; other tagged values count as neither number nor bool.
//     Nesting is limited to 16 levels and arrays and maps to 1024
//     elements. Nested values are decoded though not returned, so a nested
//     map keyed by an array or a map is an error.
//   - raw: no decoding; Decode returns nil, nil. Use it for payloads that
//     are stored or forwarded but carry no readings.
//
// A numeric reading is raw*scale + offset, where scale 0 (unset) means 1.
// For json and cbor a field's numeric type only says "a number": its width
// and sign are not checked. Unit and device_class are metadata for
// consumers such as Home Assistant discovery; decoding ignores them.
//
// A reading that is NaN or ±Inf, whether sent that way (float32, float64,
// CBOR floats, out-of-range JSON numbers such as 1e400) or produced by
// scale and offset, is left out of the map rather than failing the whole
// payload: many devices send NaN for "no reading", and NaN and Inf cannot be
// encoded as JSON. Every map Decode returns can be passed to json.Marshal.
//
// Field names, and keys returned without a fields list, are identifiers:
// [A-Za-z_][A-Za-z0-9_]{0,63}, safe in topics, metric labels and entity ids.
// A top-level JSON object may hold at most 1024 members.
//
// A Decoder is immutable and safe for concurrent use. Packed decoding
// allocates only the result map and its boxed values.
package codec
