package storage

import "encoding/binary"

// A cluster member's own records (broker/cluster):
//
//	F 0x00 <8-byte seq>   a logged message still to be forwarded to other
//	                      nodes: value = their ids, one per line
//	K 0x00 <stream>       how far this node has taken a forwarding stream
//	                      of another node: value = the last entry id taken
const (
	nsForward = "F\x00"
	nsCursor  = "K\x00"
)

// ForwardKey is the key of the forwarding record of log seq.
func ForwardKey(seq uint64) []byte {
	return binary.BigEndian.AppendUint64(append(make([]byte, 0, len(nsForward)+8), nsForward...), seq)
}

// ForwardPrefix is the prefix of every forwarding record.
func ForwardPrefix() []byte { return []byte(nsForward) }

// ParseForwardKey returns the seq of a forwarding record's key.
func ParseForwardKey(k []byte) (uint64, bool) {
	if len(k) != len(nsForward)+8 || string(k[:len(nsForward)]) != nsForward {
		return 0, false
	}
	return binary.BigEndian.Uint64(k[len(nsForward):]), true
}

// CursorKey is the key of this node's place in a stream.
func CursorKey(stream string) []byte { return append([]byte(nsCursor), stream...) }

// CursorPrefix is the prefix of every stream cursor.
func CursorPrefix() []byte { return []byte(nsCursor) }
