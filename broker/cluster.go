package broker

import (
	"fmt"

	"github.com/beaconmq/beacon/broker/cluster"
	"github.com/beaconmq/beacon/broker/engine"
)

// setupCluster joins the cluster named by cluster.redis_url (nothing
// without it). Redis need not be up: the node starts not ready and
// connects by itself.
func (b *Broker) setupCluster() error {
	c := b.cfg.Cluster
	if !c.On() {
		return nil
	}
	id, err := c.NodeIDValue()
	if err != nil {
		return err
	}
	pw, err := c.RedisPassword()
	if err != nil {
		return err
	}
	b.cluster, err = cluster.Open(cluster.Options{URL: c.RedisURL, Password: pw, NodeID: id, Prefix: c.Prefix,
		Heartbeat: c.Heartbeat, ForwardBuffer: c.ForwardBuffer,
		Info:   cluster.NodeInfo{Version: Version, Epoch: b.msgLog.Epoch()},
		Logger: b.log.With("component", "cluster")})
	if err != nil {
		return &ConfigError{Key: "cluster.redis_url", Msg: err.Error()}
	}
	return nil
}

// setupClusterRouter makes the message router of a cluster member (once
// the history exists: what browsers follow here is interest too).
func (b *Broker) setupClusterRouter() {
	if b.cluster == nil {
		return
	}
	b.clusterRt = cluster.NewRouter(b.cluster, b.msgLog, b.db)
	b.clusterRt.SetPager(b.history.OwnPage)
	b.history.SetInterest(func(filter string, added bool) {
		if added {
			b.clusterRt.AddInterest(filter)
		} else {
			b.clusterRt.RemoveInterest(filter)
		}
	})
}

// engineCluster is the engine's Cluster (nil, not a nil pointer, on a
// single node).
func (b *Broker) engineCluster() engine.Cluster {
	if b.clusterRt == nil {
		return nil
	}
	return b.clusterRt
}

// loadCluster restores the messages a previous run had still to forward
// (before the engine loads, so the log keeps them).
func (b *Broker) loadCluster() error {
	if b.clusterRt == nil {
		return nil
	}
	n, err := b.clusterRt.Load()
	if err != nil {
		return fmt.Errorf("cluster: restore messages to forward: %w", err)
	}
	if n > 0 {
		b.log.Info("cluster: messages still to forward to other nodes", "pending", n)
	}
	return nil
}

// startCluster begins the node's heartbeat once the stored state is
// restored (before the listeners accept clients).
func (b *Broker) startCluster() {
	if b.cluster == nil {
		return
	}
	b.cluster.SetInfo(func(i *cluster.NodeInfo) {
		if a := b.MQTTAddr("tcp"); a != "" {
			i.MQTT = a
		}
		i.HTTP = b.HTTPAddr()
	})
	b.cluster.Start()
	b.clusterRt.Start(b.engine)
	b.log.Info("cluster: joining", "node", b.cluster.ID(), "redis", redactURL(b.cfg.Cluster.RedisURL))
}

// stopCluster leaves the cluster (after the engine stopped routing).
func (b *Broker) stopCluster() {
	if b.cluster != nil {
		if err := b.cluster.Close(); err != nil {
			b.log.Debug("cluster: close", "error", err)
		}
	}
}

// ClusterRouter is the cluster's message router (nil on a single node).
func (b *Broker) ClusterRouter() *cluster.Router { return b.clusterRt }
