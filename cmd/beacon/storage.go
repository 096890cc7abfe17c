package main

import (
	"fmt"
	"io"

	"github.com/beaconmq/beacon/storage"
)

const storageUsage = `Usage:
  beacon storage verify [--data-dir DIR | --config FILE]
      check a stopped broker's data directory without changing it: the MANIFEST,
      every table's checksums, the logs replayed at start, and every record read
      back and decoded. Exits 0 when nothing is damaged, 1 when something is.
`

// runStorage is `beacon storage ...`.
func runStorage(args, environ []string, stdout, stderr io.Writer) int {
	if len(args) == 0 || args[0] == "help" || args[0] == "-h" || args[0] == "--help" {
		fmt.Fprint(stdout, storageUsage)
		if len(args) == 0 {
			return 2
		}
		return 0
	}
	if args[0] != "verify" {
		fmt.Fprintf(stderr, "beacon: unknown storage command %q\n%s", args[0], storageUsage)
		return 2
	}
	cfg, err := loadConfig("storage verify", args[1:], environ, stderr)
	if err != nil {
		return reportFlagErr(err, stderr)
	}
	r, err := storage.Verify(cfg.Storage.Dir)
	if err != nil {
		fmt.Fprintf(stderr, "beacon: %v\n", err)
		return 1
	}
	r.Write(stdout)
	if !r.OK() {
		return 1
	}
	return 0
}
