package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"text/tabwriter"
	"time"

	"github.com/beaconmq/beacon/broker"
	"github.com/beaconmq/beacon/broker/cluster"
)

const clusterUsage = `Usage:
  beacon cluster status [--config FILE]
      list the nodes of the cluster (cluster.redis_url): alive or not, version,
      listeners, filters, messages waiting for them, sessions they hold.
  beacon cluster forget NODE [--config FILE]
      remove a node that is gone for good: its entry, interest, the streams of
      messages waiting for it and the owner entries of its sessions (their clients
      start new sessions on the node they reach). Refused while the node is alive.
`

// runCluster is `beacon cluster ...`.
func runCluster(ctx context.Context, args, environ []string, stdout, stderr io.Writer) int {
	if len(args) == 0 || args[0] == "help" || args[0] == "-h" || args[0] == "--help" {
		fmt.Fprint(stdout, clusterUsage)
		if len(args) == 0 {
			return 2
		}
		return 0
	}
	sub, args := args[0], args[1:]
	var node string
	switch sub {
	case "status":
	case "forget":
		var ok bool
		if node, args, ok = fileArg(args, stdout, stderr, clusterUsage); !ok {
			return 2
		}
	default:
		fmt.Fprintf(stderr, "beacon: unknown cluster command %q\n%s", sub, clusterUsage)
		return 2
	}
	cfg, err := loadConfig("cluster "+sub, args, environ, stderr)
	if err != nil {
		return reportFlagErr(err, stderr)
	}
	n, err := openClusterAdmin(cfg)
	if err != nil {
		fmt.Fprintf(stderr, "beacon: %v\n", err)
		return 1
	}
	defer n.Close()
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	if sub == "status" {
		nodes, err := cluster.Status(ctx, n)
		if err != nil {
			fmt.Fprintf(stderr, "beacon: cluster status: %v\n", err)
			return 1
		}
		w := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
		fmt.Fprintln(w, "NODE\tALIVE\tVERSION\tMQTT\tHTTP\tSTARTED\tFILTERS\tWAITING\tSESSIONS")
		for _, s := range nodes {
			started := "-"
			if s.Started > 0 {
				started = time.Unix(s.Started, 0).UTC().Format(time.RFC3339)
			}
			fmt.Fprintf(w, "%s\t%v\t%s\t%s\t%s\t%s\t%d\t%d\t%d\n", s.ID, s.Alive, dash(s.Version), dash(s.MQTT), dash(s.HTTP), started, s.Filters, s.Backlog, s.Sessions)
		}
		_ = w.Flush()
		return 0
	}
	rep, err := cluster.Forget(ctx, n, node)
	if errors.Is(err, cluster.ErrNodeAlive) {
		fmt.Fprintf(stderr, "beacon: cluster forget %s: %v\n", node, err)
		return 1
	}
	if err != nil {
		fmt.Fprintf(stderr, "beacon: cluster forget %s: %v\n", node, err)
		return 1
	}
	fmt.Fprintf(stdout, "forgot node %s: %d keys removed, %d messages that waited for it dropped, %d sessions it held released\n",
		node, rep.Keys, rep.Backlog, rep.Sessions)
	return 0
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// openClusterAdmin connects to the cluster's Redis as an operator (not a
// node: nothing is started).
func openClusterAdmin(cfg broker.Config) (*cluster.Node, error) {
	c := cfg.Cluster
	if !c.On() {
		return nil, errors.New("cluster.redis_url is not set")
	}
	pw, err := c.RedisPassword()
	if err != nil {
		return nil, err
	}
	return cluster.Open(cluster.Options{URL: c.RedisURL, Password: pw, NodeID: "beacon-cli", Prefix: c.Prefix})
}
