package broker

import (
	"context"
	"os"
	"time"

	"github.com/beaconmq/beacon/broker/cluster"
	"github.com/beaconmq/beacon/broker/engine"
	"github.com/beaconmq/beacon/devices"
)

// clusterState is what the nodes of a cluster share besides messages:
// the device registry and credentials, the ACL rules and presence
// (docs/cluster.md, "Shared state").
type clusterState struct {
	devices  *cluster.Devices
	rules    *cluster.Rules
	presence *cluster.Presence
}

// stateSyncWait bounds how long Start waits for the first read of the
// shared state; past it the node serves from its local copy and catches
// up when Redis answers.
const stateSyncWait = 5 * time.Second

// startClusterState makes the registry, the rules and presence follow the
// cluster's (nothing on a single node), and waits a while for the first
// read so that the node's first clients meet the cluster's registry.
func (b *Broker) startClusterState() {
	if b.cluster == nil {
		return
	}
	s := &clusterState{}
	s.devices = cluster.NewDevices(b.cluster, b.registry, b.db, func(id string) {
		if b.admin.Kick != nil {
			n := b.admin.Kick(id)
			b.log.Info("cluster: device changed on another node: its connections here closed", "device", id, "connections", n)
		}
	})
	var file []byte
	if f := b.cfg.Auth.ACLFile; f != "" {
		var err error
		if file, err = os.ReadFile(f); err != nil {
			b.log.Warn("cluster: auth.acl_file unreadable; not offered to the cluster", "file", f, "error", err)
		}
	}
	s.rules = cluster.NewRules(b.cluster, file, b.applyClusterRules)
	s.presence = cluster.NewPresence(b.cluster, cluster.PresenceOptions{
		Registry: b.registry,
		Count: func(id string) int {
			b.auth.mu.Lock()
			defer b.auth.mu.Unlock()
			return b.auth.online[id]
		},
		Counts: func() map[string]int {
			b.auth.mu.Lock()
			defer b.auth.mu.Unlock()
			out := make(map[string]int, len(b.auth.online))
			for id, n := range b.auth.online {
				out[id] = n
			}
			return out
		},
		Publish: func(id string, online bool) {
			d, err := b.registry.Get(id)
			if err != nil {
				return // removed meanwhile: its removal clears the presence
			}
			d.Online = online
			b.presence.push(devices.Change{Device: d})
		},
	})
	b.state = s
	timeout := time.After(stateSyncWait)
	for _, ch := range []<-chan struct{}{s.devices.Synced(), s.rules.Synced(), s.presence.Synced()} {
		select {
		case <-ch:
		case <-timeout:
			b.log.Warn("cluster: shared state not read from redis yet: serving with this node's copy of the registry and its own rules until it is",
				"waited", stateSyncWait)
			return
		}
	}
}

// applyClusterRules puts the cluster's rules in force (a reload on
// another node, or the rules Redis had when this node joined).
func (b *Broker) applyClusterRules(text []byte) error {
	rules, err := devices.ParseRules(b.cluster.Key("acl")+" (cluster)", text)
	if err != nil {
		return err
	}
	b.authz.Set(rules)
	b.logRules()
	return nil
}

// loadRules reads auth.acl_file for a reload; on a cluster its text is
// made the cluster's first, and a reload that cannot reach Redis fails,
// so that the nodes do not diverge.
func (b *Broker) loadRules() (*devices.Rules, error) {
	if b.state == nil {
		return devices.LoadRules(b.cfg.Auth.ACLFile)
	}
	text, err := os.ReadFile(b.cfg.Auth.ACLFile)
	if err != nil {
		return nil, err
	}
	rules, err := devices.ParseRules(b.cfg.Auth.ACLFile, text)
	if err != nil {
		return nil, err
	}
	if err := b.state.rules.Publish(text); err != nil {
		return nil, err
	}
	return rules, nil
}

// presenceFilter passes the registry's changes to the presence
// publisher. On a cluster, online and offline are said by the node that
// made the change cluster-wide (cluster.Presence), and additions and
// removals by the node where they were made.
func (b *Broker) presenceFilter(push func(devices.Change)) func(devices.Change) {
	if b.cluster == nil {
		return push
	}
	return func(c devices.Change) {
		if (c.Added || c.Removed) && !c.Remote {
			push(c)
		}
	}
}

// clusterConnChanged tells cluster presence that a device's connection
// came or went on this node.
func (b *Broker) clusterConnChanged(ci *engine.ClientInfo) {
	if b.state == nil {
		return
	}
	if p, ok := ci.Principal.(*principal); ok && p.Device() != "" {
		b.state.presence.Changed(p.Device())
	}
}

// leaveClusterState removes this node's presence (a clean shutdown),
// before the presence publisher stops: what goes offline is said now.
func (b *Broker) leaveClusterState(ctx context.Context) {
	if b.state == nil {
		return
	}
	lctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	if err := b.state.presence.Leave(lctx); err != nil {
		b.log.Warn("cluster: presence not removed; the other nodes remove it when this node's liveness key expires", "error", err)
	}
}

// clusterHasDevices reports whether the cluster's registry has devices (a
// node joining without devices of its own is then not open to anyone).
// Redis is asked once, briefly; unreachable, the answer is no.
func (b *Broker) clusterHasDevices() bool {
	if b.cluster == nil {
		return false
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	n, err := b.cluster.Client().HLen(ctx, b.cluster.Key("devices")).Result()
	return err == nil && n > 0
}
