package devices

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"time"
)

// A registry shared by several brokers (a cluster) keeps its records in a
// store they all write (Redis) and learns of the others' changes from
// outside: the methods here apply such a change to the in-memory view
// without writing it back.

// ErrUnavailable is returned by a shared Store that cannot be reached (a
// cluster's Redis is away): the change was not made anywhere.
var ErrUnavailable = errors.New("device registry unavailable")

// LastSeenStore is a Store shared by several brokers. SetOnline gives it
// only the time a device was seen, never the whole record: a broker's copy
// may be a moment older than another's change (a rotated secret), which a
// full write would undo. PutLastSeen is called with the registry locked:
// it must not block.
type LastSeenStore interface {
	Store
	PutLastSeen(id string, t time.Time)
}

// UseStore makes s the registry's store from now on (a cluster's shared
// store in place of the local one it was opened from).
func (r *Registry) UseStore(s Store) {
	r.mu.Lock()
	r.store = s
	r.mu.Unlock()
}

// Applied is what Apply changed.
type Applied struct {
	Added, Removed, Updated bool
	// Revoked is set when connections made with the old record must end:
	// the device was removed or disabled, or its secret changed.
	Revoked bool
}

// Apply makes the in-memory device id what fetch returns (its record as
// Store keeps it; nil: the device is gone), without writing to the store:
// the change was made, and stored, elsewhere. fetch runs with the registry
// locked, as this registry's own writes to the store do, so a record read
// before one of them is never applied after it. The online flag and a
// later last-seen time of this registry are kept. Additions and removals
// are told to OnChange with Remote set.
func (r *Registry) Apply(id string, fetch func() ([]byte, error)) (Applied, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	data, err := fetch()
	if err != nil {
		return Applied{}, err
	}
	var next *Device
	if data != nil {
		next = &Device{}
		if err := json.Unmarshal(data, next); err != nil {
			return Applied{}, fmt.Errorf("decode device %q: %w", id, err)
		}
		if next.ID != id {
			return Applied{}, fmt.Errorf("decode device %q: the record is of %q", id, next.ID)
		}
	}
	return r.applyLocked(id, next), nil
}

func (r *Registry) applyLocked(id string, next *Device) Applied {
	cur, ok := r.byID[id]
	switch {
	case next == nil && !ok:
		return Applied{}
	case next == nil:
		r.changed(Change{Device: cur.public(), Removed: true, Remote: true})
		delete(r.byID, id)
		r.count.Store(int64(len(r.byID)))
		delete(r.local, id)
		delete(r.remote, id)
		return Applied{Removed: true, Revoked: true}
	}
	next.Online = r.local[id] || r.remote[id]
	if !ok {
		r.byID[id] = next
		r.count.Store(int64(len(r.byID)))
		r.changed(Change{Device: next.public(), Added: true, Remote: true})
		return Applied{Added: true}
	}
	if cur.LastSeen.After(next.LastSeen) {
		next.LastSeen = cur.LastSeen
	}
	a := Applied{Updated: true,
		Revoked: !bytes.Equal(cur.SecretHash, next.SecretHash) || cur.SecretScheme != next.SecretScheme || (cur.Enabled && !next.Enabled)}
	*cur = *next
	return a
}

// ApplyAll makes the in-memory registry exactly the records fetch returns
// (id -> record, as Store keeps them), as Apply would one by one, and
// returns the ids whose connections must end. A record that does not
// decode is left as it was and reported in the error. fetch runs with the
// registry locked, as in Apply.
func (r *Registry) ApplyAll(fetch func() (map[string][]byte, error)) (added, removed int, revoked []string, err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	all, err := fetch()
	if err != nil {
		return 0, 0, nil, err
	}
	decoded := make(map[string]*Device, len(all))
	var errs []error
	for id, data := range all {
		d := &Device{}
		if e := json.Unmarshal(data, d); e != nil || d.ID != id {
			errs = append(errs, fmt.Errorf("decode device %q: %v", id, e))
			continue
		}
		decoded[id] = d
	}
	var gone []string
	for id := range r.byID {
		if _, ok := all[id]; !ok {
			gone = append(gone, id)
		}
	}
	for _, id := range gone {
		r.applyLocked(id, nil)
		removed++
		revoked = append(revoked, id)
	}
	for id, d := range decoded {
		a := r.applyLocked(id, d)
		if a.Added {
			added++
		}
		if a.Revoked {
			revoked = append(revoked, id)
		}
	}
	return added, removed, revoked, errors.Join(errs...)
}

// SetRemoteOnline records whether the device has a connection on another
// broker sharing the registry: it is Online while it has one here or
// there. A change of Online is told to OnChange with Remote set.
func (r *Registry) SetRemoteOnline(id string, online bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	d, ok := r.byID[id]
	if !ok {
		return
	}
	if online {
		r.remote[id] = true
	} else {
		delete(r.remote, id)
	}
	combined := online || r.local[id]
	if d.Online != combined {
		d.Online = combined
		r.changed(Change{Device: d.public(), Remote: true})
	}
}

// Seen moves the device's last-seen time to t if that is later (a time
// another broker recorded).
func (r *Registry) Seen(id string, t time.Time) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if d, ok := r.byID[id]; ok && t.After(d.LastSeen) {
		d.LastSeen = t.UTC()
	}
}
