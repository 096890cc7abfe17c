// Package devices owns who may talk to Beacon and what they may do: the
// device registry (ids, hashed credentials, metadata, presence), the
// principals that connections and HTTP requests act as (devices, JWT
// users, anonymous), the ACL rules and the one Authorizer that every
// transport asks, and the per-message publish policy.
package devices

import (
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"regexp"
	"sort"
	"sync"
	"sync/atomic"
	"time"
)

// Device is a registered device.
type Device struct {
	ID         string            `json:"id"`   // MQTT username and %u in ACL rules
	Name       string            `json:"name"` // display name
	Type       string            `json:"type,omitempty"`
	Tags       map[string]string `json:"tags,omitempty"`
	Created    time.Time         `json:"created"`
	LastSeen   time.Time         `json:"last_seen,omitzero"`
	Online     bool              `json:"online"`
	Enabled    bool              `json:"enabled"`
	SecretHash []byte            `json:"secret_hash,omitempty"` // SHA-256 of the secret, or the encoded hash of SecretScheme; never returned by the API
	// SecretScheme is how SecretHash was made: "" for Beacon's own (a
	// generated secret), SchemePBKDF2SHA512 or SchemeSHA512 for a hash
	// imported from Mosquitto or a chosen secret. Rotate returns a device
	// to Beacon's own.
	SecretScheme string `json:"secret_scheme,omitempty"`
}

// Errors of the registry.
var (
	ErrNotFound       = errors.New("device not found")
	ErrExists         = errors.New("device already exists")
	ErrInvalid        = errors.New("invalid device")
	ErrBadCredentials = errors.New("bad device id or secret")
	ErrDisabled       = errors.New("device disabled")
)

// Store persists devices. storage.DB implements it.
type Store interface {
	PutDevice(id string, data []byte) error
	DeleteDevice(id string) error
	Devices(fn func(data []byte) error) error
}

var idPattern = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`)

// ValidID reports whether id can name a device: 1-64 letters, digits,
// '.', '_' or '-', starting with a letter or digit. Such an id is a valid
// topic level, so %u substitution is always safe.
func ValidID(id string) bool { return idPattern.MatchString(id) }

// NewSecret returns a 256-bit random secret, base64url-encoded.
func NewSecret() (string, error) {
	b := make([]byte, 32)
	if _, err := rand.Read(b); err != nil {
		return "", err
	}
	return base64.RawURLEncoding.EncodeToString(b), nil
}

func hashSecret(secret string) []byte {
	h := sha256.Sum256([]byte(secret))
	return h[:]
}

// Registry is the device registry: an in-memory view over a Store. It is
// safe for concurrent use.
type Registry struct {
	store    Store
	mu       sync.RWMutex
	byID     map[string]*Device
	count    atomic.Int64 // len(byID), read without the lock (Len: every publish asks)
	onChange []func(Change)
	// local and remote are the two halves of Online in a cluster: the
	// device has a connection on this node, or on another (SetRemoteOnline).
	local  map[string]bool
	remote map[string]bool
}

// Change is a device being added, going online or offline, or being
// removed.
type Change struct {
	Device  Device
	Added   bool
	Removed bool
	// Remote is set when the change was made elsewhere (another node of a
	// cluster: Apply, SetRemoteOnline), not by this registry's own calls.
	Remote bool
}

// OnChange adds fn to be told, in order, of every addition, presence
// change and removal. fn is called with the registry locked: it must only queue.
func (r *Registry) OnChange(fn func(Change)) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.onChange = append(r.onChange, fn)
}

func (r *Registry) changed(c Change) {
	for _, fn := range r.onChange {
		fn(c)
	}
}

// OpenRegistry loads every device from store.
func OpenRegistry(store Store) (*Registry, error) {
	r := &Registry{store: store, byID: map[string]*Device{}, local: map[string]bool{}, remote: map[string]bool{}}
	err := store.Devices(func(data []byte) error {
		var d Device
		if err := json.Unmarshal(data, &d); err != nil {
			return fmt.Errorf("decode device: %w", err)
		}
		d.Online = false // nothing is connected before the broker starts
		r.byID[d.ID] = &d
		r.count.Store(int64(len(r.byID)))
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("load devices: %w", err)
	}
	return r, nil
}

func (r *Registry) save(d *Device) error {
	data, err := json.Marshal(d)
	if err != nil {
		return err
	}
	return r.store.PutDevice(d.ID, data)
}

// Len is the number of registered devices.
func (r *Registry) Len() int { return int(r.count.Load()) }

// NewDevice describes a device to add.
type NewDevice struct {
	ID   string            `json:"id"`
	Name string            `json:"name,omitempty"`
	Type string            `json:"type,omitempty"`
	Tags map[string]string `json:"tags,omitempty"`
	// Secret, when set, is the device's secret as chosen by a person
	// (at least MinChosenSecret bytes) instead of a generated one.
	Secret string `json:"secret,omitempty"`
	// PasswordHash, when set, is a Mosquitto hash ("$7$..." or "$6$...")
	// the device keeps logging in with.
	PasswordHash string `json:"password_hash,omitempty"`
}

// FieldError is a validation error about one field; it wraps ErrInvalid.
type FieldError struct {
	Field string
	Msg   string
}

func (e *FieldError) Error() string { return e.Field + ": " + e.Msg }

// Unwrap makes errors.Is(err, ErrInvalid) hold.
func (e *FieldError) Unwrap() error { return ErrInvalid }

// Validate names the first bad field.
func (n NewDevice) Validate() error {
	if !ValidID(n.ID) {
		return &FieldError{"id", fmt.Sprintf("%q must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit", n.ID)}
	}
	if n.Type != "" && !ValidID(n.Type) {
		return &FieldError{"type", fmt.Sprintf("%q must be 1-64 letters, digits, '.', '_' or '-'", n.Type)}
	}
	if len(n.Name) > 256 {
		return &FieldError{"name", "longer than 256 bytes"}
	}
	if len(n.Tags) > 64 {
		return &FieldError{"tags", "more than 64 tags"}
	}
	for k, v := range n.Tags {
		if k == "" || len(k) > 64 || len(v) > 256 {
			return &FieldError{"tags", fmt.Sprintf("tag %q: keys are 1-64 bytes, values up to 256", k)}
		}
	}
	switch {
	case n.Secret != "" && n.PasswordHash != "":
		return &FieldError{"secret", "give a secret or a password hash, not both"}
	case n.Secret != "":
		return CheckChosenSecret(n.Secret)
	case n.PasswordHash != "":
		if _, err := parseMosquittoHash(n.PasswordHash); err != nil {
			return &FieldError{"password_hash", err.Error()}
		}
	}
	return nil
}

// credential is how a new device's secret is kept: a generated secret
// (returned once), a chosen one, or an imported hash.
func (n NewDevice) credential() (hash []byte, scheme, secret string, err error) {
	switch {
	case n.PasswordHash != "":
		h, err := parseMosquittoHash(n.PasswordHash)
		if err != nil {
			return nil, "", "", err
		}
		return []byte(h.String()), h.scheme, "", nil
	case n.Secret != "":
		h, err := hashChosen(n.Secret)
		if err != nil {
			return nil, "", "", err
		}
		return []byte(h.String()), h.scheme, "", nil
	}
	secret, err = NewSecret()
	if err != nil {
		return nil, "", "", err
	}
	return hashSecret(secret), "", secret, nil
}

// Add registers a device and returns it with its generated secret, which
// is not stored and cannot be shown again. A device added with a chosen
// Secret or an imported PasswordHash gets no generated secret ("").
func (r *Registry) Add(n NewDevice) (Device, string, error) {
	if err := n.Validate(); err != nil {
		return Device{}, "", err
	}
	hash, scheme, secret, err := n.credential()
	if err != nil {
		return Device{}, "", err
	}
	if n.Name == "" {
		n.Name = n.ID
	}
	d := &Device{ID: n.ID, Name: n.Name, Type: n.Type, Tags: n.Tags, Created: time.Now().UTC().Truncate(time.Second),
		Enabled: true, SecretHash: hash, SecretScheme: scheme}
	r.mu.Lock()
	defer r.mu.Unlock()
	if _, ok := r.byID[n.ID]; ok {
		return Device{}, "", fmt.Errorf("%w: %q", ErrExists, n.ID)
	}
	if err := r.save(d); err != nil {
		return Device{}, "", err
	}
	r.byID[d.ID] = d
	r.count.Store(int64(len(r.byID)))
	r.changed(Change{Device: d.public(), Added: true})
	return d.public(), secret, nil
}

// public is a copy without the secret hash.
func (d *Device) public() Device {
	c := *d
	c.SecretHash = nil
	if d.Tags != nil {
		c.Tags = make(map[string]string, len(d.Tags))
		for k, v := range d.Tags {
			c.Tags[k] = v
		}
	}
	return c
}

// Get returns a device.
func (r *Registry) Get(id string) (Device, error) {
	r.mu.RLock()
	defer r.mu.RUnlock()
	d, ok := r.byID[id]
	if !ok {
		return Device{}, fmt.Errorf("%w: %q", ErrNotFound, id)
	}
	return d.public(), nil
}

// List returns every device sorted by id; online filters when not nil.
func (r *Registry) List(online *bool) []Device {
	r.mu.RLock()
	out := make([]Device, 0, len(r.byID))
	for _, d := range r.byID {
		if online == nil || d.Online == *online {
			out = append(out, d.public())
		}
	}
	r.mu.RUnlock()
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out
}

// Update changes a device's name, type, tags or enabled flag (nil fields
// are left alone).
type Update struct {
	Name    *string            `json:"name,omitempty"`
	Type    *string            `json:"type,omitempty"`
	Tags    *map[string]string `json:"tags,omitempty"`
	Enabled *bool              `json:"enabled,omitempty"`
}

// Update applies u to the device id.
func (r *Registry) Update(id string, u Update) (Device, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	d, ok := r.byID[id]
	if !ok {
		return Device{}, fmt.Errorf("%w: %q", ErrNotFound, id)
	}
	next := *d
	if u.Name != nil {
		next.Name = *u.Name
	}
	if u.Type != nil {
		next.Type = *u.Type
	}
	if u.Tags != nil {
		next.Tags = *u.Tags
	}
	if u.Enabled != nil {
		next.Enabled = *u.Enabled
	}
	if err := (NewDevice{ID: next.ID, Name: next.Name, Type: next.Type, Tags: next.Tags}).Validate(); err != nil {
		return Device{}, err
	}
	if err := r.save(&next); err != nil {
		return Device{}, err
	}
	*d = next
	return d.public(), nil
}

// Rotate gives the device a new secret and returns it; the old one stops
// working at once.
func (r *Registry) Rotate(id string) (string, error) {
	secret, err := NewSecret()
	if err != nil {
		return "", err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	d, ok := r.byID[id]
	if !ok {
		return "", fmt.Errorf("%w: %q", ErrNotFound, id)
	}
	next := *d
	next.SecretHash = hashSecret(secret)
	next.SecretScheme = ""
	if err := r.save(&next); err != nil {
		return "", err
	}
	*d = next
	return secret, nil
}

// Remove deletes a device.
func (r *Registry) Remove(id string) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if _, ok := r.byID[id]; !ok {
		return fmt.Errorf("%w: %q", ErrNotFound, id)
	}
	if err := r.store.DeleteDevice(id); err != nil {
		return err
	}
	r.changed(Change{Device: r.byID[id].public(), Removed: true})
	delete(r.byID, id)
	r.count.Store(int64(len(r.byID)))
	delete(r.local, id)
	delete(r.remote, id)
	return nil
}

// dummyHash is compared against when the id is unknown, so that a wrong id
// and a wrong secret take the same time.
var dummyHash = hashSecret("beacon: no such device")

// Authenticate checks a device's secret in constant time. Imported and
// chosen secrets are derived outside the registry's lock.
func (r *Registry) Authenticate(id, secret string) (Device, error) {
	r.mu.RLock()
	d, ok := r.byID[id]
	want, scheme := dummyHash, ""
	var dev Device
	if ok {
		want, scheme = d.SecretHash, d.SecretScheme
		dev = d.public()
	}
	r.mu.RUnlock()
	var match bool
	if scheme == "" {
		match = subtle.ConstantTimeCompare(hashSecret(secret), want) == 1
	} else if h, err := parseMosquittoHash(string(want)); err == nil && h.scheme == scheme {
		match = h.verify(secret)
	}
	switch {
	case !ok || !match:
		return Device{}, ErrBadCredentials
	case !dev.Enabled:
		return dev, ErrDisabled
	}
	return dev, nil
}

// Identified returns the device id when its identity was proven by other
// means (a TLS client certificate): ErrBadCredentials when no such device
// is registered, ErrDisabled when it is disabled.
func (r *Registry) Identified(id string) (Device, error) {
	r.mu.RLock()
	defer r.mu.RUnlock()
	d, ok := r.byID[id]
	switch {
	case !ok:
		return Device{}, ErrBadCredentials
	case !d.Enabled:
		return d.public(), ErrDisabled
	}
	return d.public(), nil
}

// SetOnline records a device connecting or disconnecting. The last-seen
// time is persisted; the online flag lives in memory.
func (r *Registry) SetOnline(id string, online bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	d, ok := r.byID[id]
	if !ok {
		return
	}
	r.local[id] = online
	combined := online || r.remote[id]
	changed := d.Online != combined
	d.Online = combined
	d.LastSeen = time.Now().UTC().Truncate(time.Second)
	if changed {
		r.changed(Change{Device: d.public()})
	}
	if ls, ok := r.store.(LastSeenStore); ok {
		ls.PutLastSeen(id, d.LastSeen) // a shared store: never the whole record (see LastSeenStore)
		return
	}
	// Saved under the lock, like every change, so that a concurrent rotate,
	// disable or remove cannot be overwritten by this older copy. Last-seen
	// is best effort: a failed write loses a timestamp, not access.
	_ = r.save(d)
}

// TypeOf is the type of device id, or "" for an unknown device.
func (r *Registry) TypeOf(id string) string {
	r.mu.RLock()
	defer r.mu.RUnlock()
	if d, ok := r.byID[id]; ok {
		return d.Type
	}
	return ""
}
