package cluster

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/beaconmq/beacon/devices"
)

// Keys of the shared device registry, under the prefix:
//
//	devices          hash: device id -> its record (the bytes the badger store keeps)
//	devices          channel: a device id whose record changed
//	devices:seeded   set: the nodes that have copied their local devices up
//	lastseen         hash: device id -> unix seconds it was last seen

// opTimeout bounds one registry write to Redis.
const opTimeout = 3 * time.Second

// Devices is the device registry's store on a cluster: the records live
// in Redis, every node's registry follows them, and the node's local store
// (badger) keeps a copy, used at a start while Redis is away.
type Devices struct {
	n      *Node
	reg    *devices.Registry
	local  devices.Store
	revoke func(id string) // ends the connections of a device removed, disabled or given a new secret elsewhere
	log    *slog.Logger

	mu     sync.Mutex
	seen   map[string]time.Time // last-seen times not written yet
	wake   chan struct{}
	synced chan struct{} // closed after the first full read
	once   sync.Once
}

var _ devices.LastSeenStore = (*Devices)(nil)

// NewDevices makes reg's store the cluster's: call it before Start of the
// node. local is the node's own store (what reg was opened from); revoke
// is called (on the node's goroutine) for each device whose connections
// must end because of a change made on another node.
func NewDevices(n *Node, reg *devices.Registry, local devices.Store, revoke func(id string)) *Devices {
	s := &Devices{n: n, reg: reg, local: local, revoke: revoke, log: n.log.With("state", "devices"),
		seen: map[string]time.Time{}, wake: make(chan struct{}, 1), synced: make(chan struct{})}
	reg.UseStore(s)
	n.Subscribe(n.Key("devices"), s.sync, s.changed)
	n.Go(s.writeSeen)
	return s
}

// Synced is closed once the registry has been read from Redis.
func (s *Devices) Synced() <-chan struct{} { return s.synced }

func (s *Devices) op() (context.Context, context.CancelFunc, error) {
	if !s.n.Up() {
		return nil, nil, fmt.Errorf("%w: the cluster's redis is unreachable, change refused so the nodes do not diverge", devices.ErrUnavailable)
	}
	ctx, cancel := context.WithTimeout(s.n.ctx, opTimeout)
	return ctx, cancel, nil
}

func (s *Devices) failed(err error) error {
	s.n.Report(err)
	return fmt.Errorf("%w: redis: %v", devices.ErrUnavailable, err)
}

// PutDevice implements devices.Store: the record goes to Redis and every
// node is told.
func (s *Devices) PutDevice(id string, data []byte) error {
	ctx, cancel, err := s.op()
	if err != nil {
		return err
	}
	defer cancel()
	_, err = s.n.rdb.TxPipelined(ctx, func(p redis.Pipeliner) error {
		p.HSet(ctx, s.n.Key("devices"), id, data)
		p.Publish(ctx, s.n.Key("devices"), id)
		return nil
	})
	if err != nil {
		return s.failed(err)
	}
	return nil // the local copy is written when the change comes back on the channel
}

// DeleteDevice implements devices.Store.
func (s *Devices) DeleteDevice(id string) error {
	ctx, cancel, err := s.op()
	if err != nil {
		return err
	}
	defer cancel()
	_, err = s.n.rdb.TxPipelined(ctx, func(p redis.Pipeliner) error {
		p.HDel(ctx, s.n.Key("devices"), id)
		p.HDel(ctx, s.n.Key("lastseen"), id)
		p.Publish(ctx, s.n.Key("devices"), id)
		return nil
	})
	if err != nil {
		return s.failed(err)
	}
	return nil
}

// Devices implements devices.Store: every record in Redis.
func (s *Devices) Devices(fn func(data []byte) error) error {
	ctx, cancel, err := s.op()
	if err != nil {
		return err
	}
	defer cancel()
	all, err := s.n.rdb.HGetAll(ctx, s.n.Key("devices")).Result()
	if err != nil {
		return s.failed(err)
	}
	for _, v := range all {
		if err := fn([]byte(v)); err != nil {
			return err
		}
	}
	return nil
}

// PutLastSeen implements devices.LastSeenStore: written by the node's
// goroutine, never on the caller's.
func (s *Devices) PutLastSeen(id string, t time.Time) {
	s.mu.Lock()
	s.seen[id] = t
	s.mu.Unlock()
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

func (s *Devices) writeSeen(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-s.wake:
		}
		s.mu.Lock()
		batch := s.seen
		s.seen = map[string]time.Time{}
		s.mu.Unlock()
		if !s.n.Up() {
			continue // best effort, as on one node: a timestamp, not access
		}
		vals := make([]any, 0, 2*len(batch))
		for id, t := range batch {
			vals = append(vals, id, t.Unix())
		}
		wctx, cancel := context.WithTimeout(ctx, opTimeout)
		s.n.Report(s.n.rdb.HSet(wctx, s.n.Key("lastseen"), vals...).Err())
		cancel()
	}
}

// changed follows one device's change made by any node (this one too).
func (s *Devices) changed(id string) {
	ctx, cancel := context.WithTimeout(s.n.ctx, opTimeout)
	defer cancel()
	var data []byte
	a, err := s.reg.Apply(id, func() ([]byte, error) {
		var err error
		data, err = s.n.rdb.HGet(ctx, s.n.Key("devices"), id).Bytes()
		if errors.Is(err, redis.Nil) {
			data, err = nil, nil
		}
		if err != nil {
			s.n.Report(err)
			return nil, fmt.Errorf("redis: %w", err)
		}
		return data, nil
	})
	if err != nil {
		s.log.Warn("cluster: device change not applied; read again at the next resync", "device", id, "error", err)
		return
	}
	if data == nil {
		_ = s.local.DeleteDevice(id)
	} else {
		_ = s.local.PutDevice(id, data)
	}
	if a.Revoked && s.revoke != nil {
		s.revoke(id)
	}
}

// sync reads the whole registry again (at the first subscription and
// after every reconnect, when changes may have been missed). The first
// time this node syncs with a cluster, its local devices that Redis does
// not have are copied up.
func (s *Devices) sync(ctx context.Context) {
	ctx, cancel := context.WithTimeout(ctx, 2*opTimeout)
	defer cancel()
	if err := s.seed(ctx); err != nil {
		s.n.Report(err)
		s.log.Warn("cluster: local devices not copied to redis; tried again at the next reconnect", "error", err)
		return
	}
	var recs map[string][]byte
	added, removed, revoked, err := s.reg.ApplyAll(func() (map[string][]byte, error) {
		all, err := s.n.rdb.HGetAll(ctx, s.n.Key("devices")).Result()
		if err != nil {
			s.n.Report(err)
			return nil, fmt.Errorf("redis: %w", err)
		}
		recs = make(map[string][]byte, len(all))
		for id, v := range all {
			recs[id] = []byte(v)
		}
		return recs, nil
	})
	if recs == nil {
		s.log.Warn("cluster: device registry not read; read again when redis is back", "error", err)
		return
	}
	if err != nil {
		s.log.Warn("cluster: some device records are unreadable; kept as they were", "error", err)
	}
	s.mirror(recs)
	if seen, err := s.n.rdb.HGetAll(ctx, s.n.Key("lastseen")).Result(); err == nil {
		for id, v := range seen {
			if sec, err := strconv.ParseInt(v, 10, 64); err == nil {
				s.reg.Seen(id, time.Unix(sec, 0))
			}
		}
	}
	s.log.Info("cluster: device registry read from redis", "devices", len(recs), "added", added, "removed", removed)
	if s.revoke != nil {
		for _, id := range revoked {
			s.revoke(id)
		}
	}
	s.once.Do(func() { close(s.synced) })
}

// seed copies this node's local devices that Redis lacks, once per node
// (a device removed from the cluster while the node was away must not
// come back from its copy).
func (s *Devices) seed(ctx context.Context) error {
	key := s.n.Key("devices", "seeded")
	done, err := s.n.rdb.SIsMember(ctx, key, s.n.ID()).Result()
	if err != nil || done {
		return err
	}
	local := map[string][]byte{}
	err = s.local.Devices(func(data []byte) error {
		var d struct {
			ID string `json:"id"`
		}
		if err := json.Unmarshal(data, &d); err == nil && d.ID != "" {
			local[d.ID] = append([]byte(nil), data...)
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("read local devices: %w", err)
	}
	copied := 0
	for id, data := range local {
		ok, err := s.n.rdb.HSetNX(ctx, s.n.Key("devices"), id, data).Result()
		if err != nil {
			return err
		}
		if ok {
			copied++
			if err := s.n.rdb.Publish(ctx, s.n.Key("devices"), id).Err(); err != nil {
				return err
			}
		}
	}
	if err := s.n.rdb.SAdd(ctx, key, s.n.ID()).Err(); err != nil {
		return err
	}
	s.log.Info("cluster: this node's devices copied to the cluster's registry", "copied", copied,
		"already_there", len(local)-copied)
	return nil
}

// mirror makes the local store a copy of the cluster's records.
func (s *Devices) mirror(recs map[string][]byte) {
	var gone []string
	_ = s.local.Devices(func(data []byte) error {
		var d struct {
			ID string `json:"id"`
		}
		if json.Unmarshal(data, &d) == nil {
			if _, ok := recs[d.ID]; !ok {
				gone = append(gone, d.ID)
			}
		}
		return nil
	})
	for _, id := range gone {
		_ = s.local.DeleteDevice(id)
	}
	for id, data := range recs {
		_ = s.local.PutDevice(id, data)
	}
}
