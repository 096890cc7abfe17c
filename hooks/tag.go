package hooks

import (
	"encoding/binary"

	"github.com/mochi-mqtt/server/v2/packets"
)

// A message tag rides on an accepted PUBLISH in Connect.ClientIdentifier,
// a field no PUBLISH uses and that every copy mochi makes keeps (string,
// so copying it costs nothing). It carries when the broker received the
// message (for the publish-to-deliver latency) and, once the message is in
// the ingress log, its sequence there (so the writes made while routing it
// can be gathered, and a recovered message recognised).
//
// Layout: 0xff, flags, seq (8 bytes), received unix nanos (8 bytes).
type msgTag struct {
	ingress bool   // written to the ingress log
	seq     uint64 // its ingress sequence
	recv    int64  // unix nanoseconds at receipt
}

const (
	tagMark       = 0xff
	tagLen        = 18
	tagFlagIngres = 1
)

func (t msgTag) String() string {
	b := make([]byte, 2, tagLen)
	b[0] = tagMark
	if t.ingress {
		b[1] = tagFlagIngres
	}
	b = binary.BigEndian.AppendUint64(b, t.seq)
	b = binary.BigEndian.AppendUint64(b, uint64(t.recv))
	return string(b)
}

func readTag(pk *packets.Packet) (msgTag, bool) {
	s := pk.Connect.ClientIdentifier
	if len(s) != tagLen || s[0] != tagMark {
		return msgTag{}, false
	}
	return msgTag{
		ingress: s[1]&tagFlagIngres != 0,
		seq:     binary.BigEndian.Uint64([]byte(s[2:10])),
		recv:    int64(binary.BigEndian.Uint64([]byte(s[10:18]))),
	}, true
}

func setTag(pk *packets.Packet, t msgTag) { pk.Connect.ClientIdentifier = t.String() }
