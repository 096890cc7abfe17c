package broker

import (
	"fmt"
	"net/url"
	"os"
	"regexp"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/beaconmq/beacon/broker/cluster"
)

var nodeIDPattern = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`)

func (c ClusterConfig) validate() error {
	bad := func(key, format string, a ...any) error {
		return &ConfigError{Key: key, Msg: fmt.Sprintf(format, a...)}
	}
	if !c.On() {
		if c.RedisPasswordFile != "" || c.NodeID != "" {
			return bad("cluster.redis_url", "must be set to join a cluster (cluster.node_id or cluster.redis_password_file is set)")
		}
		return nil
	}
	u, err := url.Parse(c.RedisURL)
	if err != nil || (u.Scheme != "redis" && u.Scheme != "rediss") || u.Host == "" {
		return bad("cluster.redis_url", "%q is not redis://host:port/db or rediss://host:port/db", redactURL(c.RedisURL))
	}
	sentinels := cluster.IsSentinelURL(c.RedisURL)
	if sentinels {
		if _, err := redis.ParseFailoverURL(c.RedisURL); err != nil {
			return bad("cluster.redis_url", "%q: %v", redactURL(c.RedisURL), err)
		}
	}
	if c.RedisPasswordFile != "" {
		if _, err := os.Stat(c.RedisPasswordFile); err != nil {
			return bad("cluster.redis_password_file", "%v", err)
		}
		// Through Sentinels the URL's password is theirs, the file's the servers'.
		if _, ok := u.User.Password(); ok && !sentinels {
			return bad("cluster.redis_password_file", "the password is given twice: in cluster.redis_url and in this file")
		}
	}
	if c.NodeID != "" && !nodeIDPattern.MatchString(c.NodeID) {
		return bad("cluster.node_id", "%q is not 1-64 letters, digits, '.', '_' or '-'", c.NodeID)
	}
	if c.Prefix == "" || strings.ContainsAny(c.Prefix, " \t\r\n") {
		return bad("cluster.prefix", "must be non-empty, without spaces")
	}
	if c.ForwardBuffer < 100 {
		return bad("cluster.forward_buffer", "must be at least 100 messages")
	}
	if c.Heartbeat < 100*time.Millisecond || c.Heartbeat > time.Minute {
		return bad("cluster.heartbeat", "%s is outside 100ms..1m", c.Heartbeat)
	}
	return nil
}

// NodeIDValue is the node's name: cluster.node_id, or the host name.
func (c ClusterConfig) NodeIDValue() (string, error) {
	if c.NodeID != "" {
		return c.NodeID, nil
	}
	h, err := os.Hostname()
	if err != nil {
		return "", &ConfigError{Key: "cluster.node_id", Msg: fmt.Sprintf("not set, and the host name is unknown: %v", err)}
	}
	if !nodeIDPattern.MatchString(h) {
		return "", &ConfigError{Key: "cluster.node_id", Msg: fmt.Sprintf("not set, and the host name %q cannot name a node: set one", h)}
	}
	return h, nil
}

// RedisPassword is the password from cluster.redis_password_file ("" if none).
func (c ClusterConfig) RedisPassword() (string, error) {
	if c.RedisPasswordFile == "" {
		return "", nil
	}
	b, err := os.ReadFile(c.RedisPasswordFile)
	if err != nil {
		return "", &ConfigError{Key: "cluster.redis_password_file", Msg: err.Error()}
	}
	return strings.TrimSpace(string(b)), nil
}
