package storage_test

import (
	"bytes"
	"errors"
	"testing"

	"github.com/beaconmq/beacon/storage"
)

func TestOutboxKeys(t *testing.T) {
	for _, tc := range []struct {
		name string
		seq  uint64
	}{
		{"a", 0}, {"a", 1}, {"orders", 1<<64 - 1}, {"with/slash and space", 42}, {"é", 7},
	} {
		key := storage.OutboxKey(tc.name, tc.seq)
		name, seq, ok := storage.ParseOutboxKey(key)
		if !ok || name != tc.name || seq != tc.seq {
			t.Errorf("ParseOutboxKey(OutboxKey(%q, %d)) = %q, %d, %v", tc.name, tc.seq, name, seq, ok)
		}
		if !bytes.HasPrefix(key, storage.OutboxPrefix(tc.name)) || !bytes.HasPrefix(key, storage.OutboxPrefix("")) {
			t.Errorf("key of %q not under its prefix", tc.name)
		}
		mark := storage.OutboxMarkKey(tc.name)
		if _, _, ok := storage.ParseOutboxKey(mark); ok {
			t.Errorf("mark of %q parsed as a record", tc.name)
		}
		if name, ok := storage.ParseOutboxMarkKey(mark); !ok || name != tc.name {
			t.Errorf("ParseOutboxMarkKey(mark of %q) = %q, %v", tc.name, name, ok)
		}
		if _, ok := storage.ParseOutboxMarkKey(key); ok {
			t.Errorf("record of %q parsed as a mark", tc.name)
		}
	}
	// One webhook's prefix never covers another's keys.
	if bytes.HasPrefix(storage.OutboxKey("ab", 1), storage.OutboxPrefix("a")) {
		t.Error(`prefix of "a" covers a key of "ab"`)
	}
	for _, bad := range [][]byte{
		nil, []byte("o\x00"), []byte("o\x00\x00\x00\x00\x00\x00\x00\x00\x00\x01"),
		[]byte("o\x00a\x00short"), append([]byte("h\x00a\x00"), make([]byte, 8)...),
	} {
		if _, _, ok := storage.ParseOutboxKey(bad); ok {
			t.Errorf("ParseOutboxKey(%q) accepted", bad)
		}
	}
}

func TestOutboxRecordRoundTrip(t *testing.T) {
	for _, rec := range []storage.OutboxRecord{
		{},
		{Attempts: 3, Created: 1700000000123, Body: []byte(`{"topic":"a/b"}`)},
		{Attempts: 1<<32 - 1, Created: -1, Body: bytes.Repeat([]byte("x"), 70000)},
	} {
		b := storage.AppendOutbox(nil, &rec)
		if len(b) > storage.OutboxRecordSize(len(rec.Body)) {
			t.Errorf("record of %d bytes is larger than OutboxRecordSize", len(b))
		}
		got, err := storage.DecodeOutbox(b)
		if err != nil {
			t.Fatal(err)
		}
		if got.Attempts != rec.Attempts || got.Created != rec.Created || !bytes.Equal(got.Body, rec.Body) {
			t.Errorf("round trip: got %d %d %d bytes, want %d %d %d bytes",
				got.Attempts, got.Created, len(got.Body), rec.Attempts, rec.Created, len(rec.Body))
		}
		if len(b) > 0 && len(got.Body) > 0 {
			b[len(b)-1] ^= 0xff
			if got.Body[len(got.Body)-1] == b[len(b)-1] {
				t.Error("decoded body aliases the stored value")
			}
		}
	}
	for _, bad := range [][]byte{nil, {2, 0, 0}, {1}, {1, 0x80}, {1, 0}} {
		if _, err := storage.DecodeOutbox(bad); !errors.Is(err, storage.ErrCorrupt) {
			t.Errorf("DecodeOutbox(%x) = %v, want ErrCorrupt", bad, err)
		}
	}
}
