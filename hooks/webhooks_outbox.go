package hooks

import (
	"bytes"
	"encoding/binary"
	"slices"
	"time"

	"github.com/beaconmq/beacon/devices"
	"github.com/beaconmq/beacon/storage"
)

// Prepare returns the outbox writes for m: one record per webhook whose
// filters match its topic (with the webhook's sequence mark when a new
// block of sequences is reserved, and the deletes of the oldest records
// when an outbox is full), to be committed in the same atomic write as m.
// It returns nil when no webhook matches. Every Prepare must be followed
// by Committed of the same message (the same *Message, or one with the
// same Topic, Client, Time and Payload), from the same goroutine; calls
// for different messages may come concurrently. It does not block.
func (w *Webhooks) Prepare(m *Message) []storage.Op {
	var ops []storage.Op
	var body, rec []byte
	var created int64
	for _, h := range w.hooks {
		if !h.matches(m.Topic) {
			continue
		}
		if rec == nil {
			created = m.Time / int64(time.Millisecond)
			if m.Time == 0 {
				created = time.Now().UnixMilli()
			}
			body = w.encode(m.Topic, m.Device, m.Payload, m.QoS, m.Retain, created)
			// One stored form, shared by every webhook's record.
			rec = storage.AppendOutbox(make([]byte, 0, storage.OutboxRecordSize(len(body))), &storage.OutboxRecord{Created: created, Body: body})
		}
		ops = w.prepare(h, m, body, rec, created, ops)
	}
	return ops
}

// prepare reserves the next sequence of h for m and appends its writes.
func (w *Webhooks) prepare(h *webhook, m *Message, body, rec []byte, created int64, ops []storage.Op) []storage.Op {
	name := h.cfg.Name
	h.mu.Lock()
	p := prepared{seq: h.seq + 1, payload: m.Payload}
	if p.seq > h.reserved {
		// The mark commits with the first record of the block (or, should
		// that write fail, on its own in Committed): a sequence of the
		// block is never delivered before the mark is stored.
		h.reserved = h.seq + outboxReserveBlock
		p.mark = true
		ops = append(ops, h.markOp())
	}
	h.seq = p.seq
	h.items = append(h.items, outboxItem{seq: p.seq, created: created, state: itemPrepared, body: body})
	ops = append(ops, storage.Set(storage.OutboxKey(name, p.seq), rec))
	// Full: drop the oldest stored records. Prepared ones count, but only
	// stored ones can go (a record not yet committed cannot be deleted).
	var logDrops int64
	for h.ready+h.nprepared+1 > w.maxOutbox && h.ready > 0 {
		seq := h.dropOldest()
		p.drops = append(p.drops, seq)
		ops = append(ops, storage.Delete(storage.OutboxKey(name, seq)))
		h.dropped.Add(1)
		h.unlogged++
	}
	if len(p.drops) > 0 {
		if now := time.Now(); now.Sub(h.lastDropLog) >= dropLogEvery {
			h.lastDropLog = now
			logDrops, h.unlogged = h.unlogged, 0
		}
	}
	k := keyOf(m)
	h.preparing[k] = append(h.preparing[k], p)
	h.nprepared++
	h.mu.Unlock()
	if len(p.drops) > 0 {
		h.signal() // a delivery waiting to retry a dropped message moves on
	}
	if logDrops > 0 {
		w.log.Warn("webhook: outbox full, dropped the oldest messages", "webhook", name, "url", h.url,
			"dropped", logDrops, "max_outbox", w.maxOutbox)
	}
	return ops
}

// Committed follows Prepare(m) once the write of its ops committed (err
// nil: the records are handed to the delivery goroutines) or failed (err
// not nil: they are forgotten; nothing of them was stored). It does not
// block.
func (w *Webhooks) Committed(m *Message, err error) {
	for _, h := range w.hooks {
		if !h.matches(m.Topic) {
			continue
		}
		h.mu.Lock()
		p, ok := h.takePrepared(m)
		if !ok {
			h.mu.Unlock()
			continue
		}
		it := h.find(p.seq) // prepared items are never compacted away
		if err == nil {
			it.state = itemReady
			h.ready++
		} else {
			it.state, it.body = itemGone, nil
			// What rode with the failed write still has to be stored:
			// the mark (its current value), the deletes of the records
			// dropped for it. Queued before a delivery can follow.
			var again []storage.Op
			if p.mark {
				again = append(again, h.markOp())
			}
			for _, seq := range p.drops {
				again = append(again, storage.Delete(storage.OutboxKey(h.cfg.Name, seq)))
			}
			if len(again) > 0 {
				w.db.WriteAsync(again...)
			}
			h.compact()
		}
		h.mu.Unlock()
		h.signal()
	}
}

func keyOf(m *Message) preparedKey {
	return preparedKey{topic: m.Topic, client: m.Client, time: m.Time}
}

// takePrepared removes and returns the Prepare of m. Messages of one key
// (one client, one topic, one nanosecond) are told apart by their
// payload: the same bytes first, then equal ones; beyond that they are
// the same message and either Prepare will do. Called with h.mu held.
func (h *webhook) takePrepared(m *Message) (prepared, bool) {
	k := keyOf(m)
	list := h.preparing[k]
	if len(list) == 0 {
		return prepared{}, false
	}
	i := 0
	if len(list) > 1 {
		i = slices.IndexFunc(list, func(p prepared) bool { return samePayload(p.payload, m.Payload) })
		if i < 0 {
			i = max(0, slices.IndexFunc(list, func(p prepared) bool { return bytes.Equal(p.payload, m.Payload) }))
		}
	}
	p := list[i]
	if len(list) == 1 {
		delete(h.preparing, k)
	} else {
		h.preparing[k] = slices.Delete(list, i, i+1)
	}
	h.nprepared--
	return p, true
}

// samePayload reports whether a and b are the same bytes in memory.
func samePayload(a, b []byte) bool {
	return len(a) == len(b) && (len(a) == 0 || &a[0] == &b[0])
}

// markOp writes h's reserved-sequence mark. Called with h.mu held.
func (h *webhook) markOp() storage.Op {
	return storage.Set(storage.OutboxMarkKey(h.cfg.Name), binary.BigEndian.AppendUint64(nil, h.reserved))
}

func (h *webhook) matches(topic string) bool {
	for _, f := range h.filters {
		if devices.MatchesTopic(f, topic) {
			return true
		}
	}
	return false
}

func (h *webhook) signal() {
	select {
	case h.wake <- struct{}{}:
	default:
	}
}

// find returns the item with sequence seq, or nil when it is gone from
// the slice. Called with h.mu held.
func (h *webhook) find(seq uint64) *outboxItem {
	live := h.items[h.head:]
	i, ok := slices.BinarySearchFunc(live, seq, func(it outboxItem, seq uint64) int {
		switch {
		case it.seq < seq:
			return -1
		case it.seq > seq:
			return 1
		}
		return 0
	})
	if !ok {
		return nil
	}
	return &live[i]
}

// dropOldest marks the oldest ready item gone and returns its sequence.
// Called with h.mu held and h.ready > 0.
func (h *webhook) dropOldest() uint64 {
	for i := h.head; ; i++ {
		if it := &h.items[i]; it.state == itemReady {
			it.state, it.body = itemGone, nil
			h.ready--
			return it.seq
		}
	}
}

// remove marks the item seq gone if it is ready, and reports whether it
// was. Called with h.mu held.
func (h *webhook) remove(seq uint64) bool {
	it := h.find(seq)
	if it == nil || it.state != itemReady {
		return false
	}
	it.state, it.body = itemGone, nil
	h.ready--
	h.compact()
	return true
}

// isReady reports whether seq is still waiting for delivery. Called with
// h.mu held.
func (h *webhook) isReady(seq uint64) bool {
	it := h.find(seq)
	return it != nil && it.state == itemReady
}

// compact removes the gone items at the front. Called with h.mu held.
func (h *webhook) compact() {
	for h.head < len(h.items) && h.items[h.head].state == itemGone {
		h.items[h.head] = outboxItem{}
		h.head++
	}
	switch {
	case h.head == len(h.items):
		h.items, h.head = h.items[:0], 0
	case h.head > 1024 && h.head*2 >= len(h.items):
		n := copy(h.items, h.items[h.head:])
		clear(h.items[n:])
		h.items, h.head = h.items[:n], 0
	}
}

// front returns the oldest item that is not gone. It may be prepared:
// the delivery then waits for its Committed.
func (h *webhook) front() (outboxItem, bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.compact()
	if h.head == len(h.items) {
		return outboxItem{}, false
	}
	return h.items[h.head], true
}
