package storage

import (
	"reflect"
	"testing"
)

func TestSessionRecordsRoundTrip(t *testing.T) {
	s := SessionRecord{ID: "phone", Gen: 7, Version: 5, Expiry: 3600, Disconnected: 1700000000, Principal: []byte(`{"k":1}`),
		Will: []byte{1, 2, 3}, WillDelay: 30}
	got, err := DecodeSession(AppendSession(nil, &s))
	if err != nil || !reflect.DeepEqual(got, s) {
		t.Fatalf("session: got %+v %v", got, err)
	}
	sub := SubRecord{Filter: "a/+/c", Group: "g", QoS: 2, NoLocal: true, RetainAsPublished: true, RetainHandling: 2, ID: 268435455}
	gs, err := DecodeSub(AppendSub(nil, &sub))
	if err != nil || gs != sub {
		t.Fatalf("sub: got %+v %v", gs, err)
	}
	q := QueueRecord{Gen: 7, Seq: 99, QoS: 2, Retain: true, SubIDs: []uint32{1, 300}, PacketID: 65535, Pubrel: true}
	gq, err := DecodeQueue(AppendQueue(nil, &q), 7, 99)
	if err != nil || !reflect.DeepEqual(gq, q) {
		t.Fatalf("queue: got %+v %v", gq, err)
	}
}

func TestSessionKeys(t *testing.T) {
	client, rest, ok := ClientOfKey(QueueKey("dev-1", 3, 42))
	gen, seq, ok2 := ParseQueueRest(rest)
	if !ok || !ok2 || client != "dev-1" || gen != 3 || seq != 42 {
		t.Fatalf("queue key: %q %d %d %v %v", client, gen, seq, ok, ok2)
	}
	client, rest, ok = ClientOfKey(InboundKey("x", 513))
	id, ok2 := ParseInboundRest(rest)
	if !ok || !ok2 || client != "x" || id != 513 {
		t.Fatalf("inbound key: %q %d", client, id)
	}
	// A client id that is a prefix of another does not share its prefix.
	if string(QueuePrefix("a")) == string(QueuePrefix("ab")[:len(QueuePrefix("a"))]) {
		t.Fatal("queue prefix of a covers ab")
	}
}

// FuzzDecodeSessionRecords: damaged bytes never panic.
func FuzzDecodeSessionRecords(f *testing.F) {
	f.Add(AppendSession(nil, &SessionRecord{ID: "a", Gen: 1, Version: 4, Expiry: 10, Principal: []byte("p")}))
	f.Add(AppendSub(nil, &SubRecord{Filter: "#", QoS: 1}))
	f.Add(AppendQueue(nil, &QueueRecord{QoS: 1, SubIDs: []uint32{5}}))
	f.Fuzz(func(t *testing.T, b []byte) {
		_, _ = DecodeSession(b)
		_, _ = DecodeSub(b)
		_, _ = DecodeQueue(b, 1, 1)
	})
}
