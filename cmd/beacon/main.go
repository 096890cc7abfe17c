// Command beacon runs the Beacon MQTT broker.
//
//	beacon [serve] [flags]     run the broker (the default)
//	beacon config print [flags] print the effective configuration
//	beacon version             print the version
package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Environ(), os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}
