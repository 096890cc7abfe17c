package main

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/beaconmq/beacon/devices"
)

// stdin is where --secret-stdin reads; a variable so that in-process tests
// can feed it.
var stdin io.Reader = os.Stdin

// readSecretLine reads one line (without its line break) from r: the
// secret for --secret-stdin. It is never echoed or logged.
func readSecretLine(r io.Reader) (string, error) {
	line, err := bufio.NewReaderSize(r, devices.MaxChosenSecret+2).ReadString('\n')
	if err != nil && !errors.Is(err, io.EOF) {
		return "", fmt.Errorf("read the secret from standard input: %w", err)
	}
	if errors.Is(err, io.EOF) && line == "" {
		return "", errors.New("--secret-stdin: standard input is empty")
	}
	return strings.TrimRight(line, "\r\n"), nil
}

const importUsage = `Usage:
  beacon devices import --mosquitto-passwd FILE [--type T] [--tag k=v]...

Registers one device per line of a Mosquitto password file (made by
mosquitto_passwd), keeping its hash: the devices log in with their old
username and password. Users already registered are left as they are.
"beacon devices rotate ID" later gives a device a Beacon secret instead.
Flags as for the other devices commands: --config, --data-dir, --server, --token.
`

// runDevicesImport is "beacon devices import".
func runDevicesImport(args, environ []string, stdout, stderr io.Writer) int {
	fs := newFlags("devices import", stderr)
	server := fs.String("server", "", "admin API base URL of a running broker, e.g. http://127.0.0.1:8080")
	token := fs.String("token", "", "admin token (default: auth.admin_token)")
	passwd := fs.String("mosquitto-passwd", "", "Mosquitto password file to import")
	typ := fs.String("type", "", "device type for every imported device")
	var tags stringList
	fs.Var(&tags, "tag", "k=v tag for every imported device, repeatable")
	pos, err := parseInterspersed(fs.FlagSet, args)
	if err != nil {
		return reportFlagErr(err, stderr)
	}
	if *passwd == "" || len(pos) != 0 {
		fmt.Fprint(stderr, importUsage)
		return 2
	}
	tagMap, ok := parseTags(tags, stderr)
	if !ok {
		return 2
	}
	cfg, err := configFromFlags(fs, environ)
	if err != nil {
		fmt.Fprintf(stderr, "beacon: %v\n", err)
		return 2
	}
	f, err := os.Open(*passwd)
	if err != nil {
		fmt.Fprintf(stderr, "beacon: %v\n", err)
		return 1
	}
	entries, err := devices.ParsePasswdFile(*passwd, f)
	_ = f.Close()
	if err != nil {
		fmt.Fprintf(stderr, "beacon: %v\n", err)
		return 1
	}
	admin, closeAdmin, err := openDeviceAdmin(cfg, *server, *token)
	if err != nil {
		fmt.Fprintf(stderr, "beacon: %v\n", err)
		return 1
	}
	defer closeAdmin()
	imported, skipped, failed := 0, 0, 0
	for _, e := range entries {
		_, _, err := admin.Add(devices.NewDevice{ID: e.Username, Type: *typ, Tags: tagMap, PasswordHash: e.Hash})
		switch {
		case err == nil:
			imported++
			fmt.Fprintf(stdout, "imported %s\n", e.Username)
		case errors.Is(err, devices.ErrExists) || strings.Contains(err.Error(), "409"):
			skipped++
			fmt.Fprintf(stdout, "skipped %s: already registered\n", e.Username)
		default:
			failed++
			fmt.Fprintf(stderr, "beacon: %s: %v\n", e.Username, err)
		}
	}
	fmt.Fprintf(stdout, "%d imported, %d skipped, %d failed\n", imported, skipped, failed)
	if failed > 0 {
		return 1
	}
	return 0
}

// parseTags turns k=v flags into a map (nil when there are none).
func parseTags(tags []string, stderr io.Writer) (map[string]string, bool) {
	var m map[string]string
	for _, kv := range tags {
		k, v, ok := strings.Cut(kv, "=")
		if !ok {
			fmt.Fprintf(stderr, "beacon: --tag %q is not k=v\n", kv)
			return nil, false
		}
		if m == nil {
			m = map[string]string{}
		}
		m[k] = v
	}
	return m, true
}
