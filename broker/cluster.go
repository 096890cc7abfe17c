package broker

import (
	"github.com/beaconmq/beacon/broker/cluster"
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
