package storage

import (
	"encoding/binary"
	"strings"
)

// A cluster member's own records (broker/cluster):
//
//	F 0x00 <8-byte seq>   a logged message still to be forwarded to other
//	                      nodes: value = their ids, one per line
//	K 0x00 <stream>       how far this node has taken a forwarding stream
//	                      of another node: value = the last entry id taken
//	K 0x00 <stream> 0x00 <id>   an entry taken beyond that (written with
//	                      the message; removed once the position passes it)
//	M 0x00 <token>        a session moving between this node and another:
//	                      value = the router's record of it
const (
	nsForward = "F\x00"
	nsCursor  = "K\x00"
	nsMove    = "M\x00"
)

// MoveKey is the key of the record of the session move token.
func MoveKey(token string) []byte { return append([]byte(nsMove), token...) }

// MovePrefix is the prefix of every move record.
func MovePrefix() []byte { return []byte(nsMove) }

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

// TakenMarkKey is the key of the mark that entry id of stream was taken.
func TakenMarkKey(stream, id string) []byte {
	return append(append(append([]byte(nsCursor), stream...), 0), id...)
}

// ParseTakenMark returns the stream and id of a taken mark's key (ok
// false for a cursor's key).
func ParseTakenMark(k []byte) (stream, id string, ok bool) {
	rest := string(k[len(nsCursor):])
	stream, id, ok = strings.Cut(rest, "\x00")
	return stream, id, ok
}

// CursorPrefix is the prefix of every stream cursor and taken mark.
func CursorPrefix() []byte { return []byte(nsCursor) }
