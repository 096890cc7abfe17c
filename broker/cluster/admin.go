package cluster

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/redis/go-redis/v9"
)

// What an operator asks of the cluster from outside a node
// (`beacon cluster status`, `beacon cluster forget`): read straight from
// Redis with a Node that was opened and not started.

// NodeStatus is one node as Redis knows it.
type NodeStatus struct {
	NodeInfo
	Alive    bool  `json:"alive"`    // its heartbeat key is there
	Filters  int64 `json:"filters"`  // in its interest hash
	Backlog  int64 `json:"backlog"`  // entries in the streams to it not yet taken (and trimmed)
	Sessions int64 `json:"sessions"` // client ids the owner hash gives it
}

// Status lists every node of the cluster (the nodes hash), by id.
func Status(ctx context.Context, n *Node) ([]NodeStatus, error) {
	all, err := n.rdb.HGetAll(ctx, n.Key("nodes")).Result()
	if err != nil {
		return nil, err
	}
	owned, err := ownedSessions(ctx, n, "")
	if err != nil {
		return nil, err
	}
	out := make([]NodeStatus, 0, len(all))
	for id, raw := range all {
		st := NodeStatus{NodeInfo: NodeInfo{ID: id}}
		_ = json.Unmarshal([]byte(raw), &st.NodeInfo)
		st.ID = id
		alive, err := n.rdb.Exists(ctx, n.Key("node", id)).Result()
		if err != nil {
			return nil, err
		}
		st.Alive = alive == 1
		if st.Filters, err = n.rdb.HLen(ctx, n.Key("interest", id)).Result(); err != nil {
			return nil, err
		}
		if st.Backlog, err = backlog(ctx, n, id); err != nil {
			return nil, err
		}
		st.Sessions = owned[id]
		out = append(out, st)
	}
	slices.SortFunc(out, func(a, b NodeStatus) int { return strings.Compare(a.ID, b.ID) })
	return out, nil
}

// streamsTo lists the forwarding streams to node id.
func streamsTo(ctx context.Context, n *Node, id string) ([]string, error) {
	var keys []string
	iter := n.rdb.Scan(ctx, 0, n.Key("fwd", id, "*"), 1000).Iterator()
	for iter.Next(ctx) {
		keys = append(keys, iter.Val())
	}
	return keys, iter.Err()
}

func backlog(ctx context.Context, n *Node, id string) (int64, error) {
	streams, err := streamsTo(ctx, n, id)
	if err != nil {
		return 0, err
	}
	var total int64
	for _, s := range streams {
		k, err := n.rdb.XLen(ctx, s).Result()
		if err != nil {
			return 0, err
		}
		total += k
	}
	return total, nil
}

// ownedSessions counts the owner hash's entries by node; with only set,
// it also removes those of that node.
func ownedSessions(ctx context.Context, n *Node, only string) (map[string]int64, error) {
	counts := map[string]int64{}
	var cursor uint64
	for {
		kv, next, err := n.rdb.HScan(ctx, n.Key("owner"), cursor, "", 1000).Result()
		if err != nil {
			return nil, err
		}
		var drop []string
		for i := 0; i+1 < len(kv); i += 2 {
			counts[kv[i+1]]++
			if only != "" && kv[i+1] == only {
				drop = append(drop, kv[i])
			}
		}
		if len(drop) > 0 {
			// Only if still this node's: a session that moved meanwhile stays.
			for _, client := range drop {
				if err := forgetOwnerScript.Run(ctx, n.rdb, []string{n.Key("owner")}, client, only).Err(); err != nil {
					return nil, err
				}
			}
		}
		if cursor = next; cursor == 0 {
			return counts, nil
		}
	}
}

var forgetOwnerScript = redis.NewScript(`
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then redis.call('HDEL', KEYS[1], ARGV[1]) end
return 0
`)

// ErrNodeAlive is Forget's refusal of a node whose heartbeat is there.
var ErrNodeAlive = errors.New("the node is alive (its heartbeat key is in Redis): stop it first")

// ForgetReport is what Forget removed.
type ForgetReport struct {
	Keys     int   // keys deleted
	Backlog  int64 // messages that were waiting in the streams to it
	Sessions int64 // sessions the owner hash gave it (their clients start new ones elsewhere)
}

// Forget removes node id from the cluster for good: its entry in the
// nodes hash, its interest, the streams to it and their positions, its
// drop set, and the owner entries of its sessions. The other nodes stop
// forwarding to it (retained messages included) once they see it gone
// from the nodes hash. It refuses a node that is alive.
func Forget(ctx context.Context, n *Node, id string) (ForgetReport, error) {
	var rep ForgetReport
	if id == "" || strings.ContainsAny(id, ":*?[] \t\n") {
		return rep, fmt.Errorf("cluster: node id %q", id)
	}
	alive, err := n.rdb.Exists(ctx, n.Key("node", id)).Result()
	if err != nil {
		return rep, err
	}
	if alive == 1 {
		return rep, ErrNodeAlive
	}
	streams, err := streamsTo(ctx, n, id)
	if err != nil {
		return rep, err
	}
	for _, s := range streams {
		k, err := n.rdb.XLen(ctx, s).Result()
		if err != nil {
			return rep, err
		}
		rep.Backlog += k
	}
	keys := append([]string{n.Key("interest", id), n.Key("inbox", id), n.Key("drop", id)}, streams...)
	iter := n.rdb.Scan(ctx, 0, n.Key("taken", id, "*"), 1000).Iterator()
	for iter.Next(ctx) {
		keys = append(keys, iter.Val())
	}
	if err := iter.Err(); err != nil {
		return rep, err
	}
	owned, err := ownedSessions(ctx, n, id)
	if err != nil {
		return rep, err
	}
	rep.Sessions = owned[id]
	for _, k := range keys {
		d, err := n.rdb.Del(ctx, k).Result()
		if err != nil {
			return rep, err
		}
		rep.Keys += int(d)
	}
	d, err := n.rdb.HDel(ctx, n.Key("nodes"), id).Result()
	if err != nil {
		return rep, err
	}
	rep.Keys += int(d)
	// The others forget it now (those that miss this, once they see it
	// gone from the nodes hash: 30 s).
	if err := n.rdb.Publish(ctx, n.Key("interest"), id+" !").Err(); err != nil {
		return rep, err
	}
	return rep, nil
}
