package main

import (
	"fmt"
	"io"
	"os"

	"github.com/beaconmq/beacon/devices"
)

const aclUsage = `Usage:
  beacon acl import --mosquitto FILE [--out RULES.yaml]

Converts a Mosquitto acl_file (user, topic and pattern lines, %u and %c)
into a Beacon rules file (auth.acl_file), printed for review or written to
--out. Where Beacon cannot decide exactly as Mosquitto does, the line is
named in a warning (standard error and a comment in the rules).
`

// runACL is "beacon acl".
func runACL(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 || args[0] != "import" {
		_, _ = io.WriteString(stderr, aclUsage)
		return 2
	}
	fs := newFlags("acl import", stderr)
	src := fs.String("mosquitto", "", "Mosquitto acl_file to convert")
	dst := fs.String("out", "", "write the rules to this file instead of standard output")
	if err := fs.Parse(args[1:]); err != nil {
		return reportFlagErr(err, stderr)
	}
	if *src == "" || fs.NArg() != 0 {
		_, _ = io.WriteString(stderr, aclUsage)
		return 2
	}
	f, err := os.Open(*src)
	if err != nil {
		fmt.Fprintf(stderr, "beacon: %v\n", err)
		return 1
	}
	conv, err := devices.ConvertMosquittoACL(*src, f)
	_ = f.Close()
	if err != nil {
		fmt.Fprintf(stderr, "beacon: %v\n", err)
		return 1
	}
	for _, w := range conv.Warnings {
		fmt.Fprintf(stderr, "beacon: warning: %s\n", w)
	}
	if *dst == "" {
		_, _ = stdout.Write(conv.YAML)
		return 0
	}
	if err := os.WriteFile(*dst, conv.YAML, 0o644); err != nil {
		fmt.Fprintf(stderr, "beacon: %v\n", err)
		return 1
	}
	fmt.Fprintf(stdout, "wrote %s (%d warnings)\n", *dst, len(conv.Warnings))
	return 0
}
