// Command beacon-bench is a load generator for MQTT 5 brokers: Beacon,
// Mosquitto or any other.
//
//	beacon-bench SCENARIO [flags]   fanin, fanout, pairs, connections, sse
//	beacon-bench compare [flags]    Beacon and Mosquitto side by side
//
// It speaks MQTT through its own small client (mqtt.go, reader.go): the
// subscriber side reads well over a million messages a second on one
// connection, so the broker, not the tool, is what a run measures.
// Publishers keep --inflight QoS 1/2 messages in flight and, with --rate,
// follow a fixed schedule: latency is measured from the time a message was
// due, not from when it was sent, so a broker that stalls its publishers
// shows in the percentiles (no coordinated omission).
package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}
