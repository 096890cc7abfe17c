package main

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"time"

	"github.com/beaconmq/beacon/broker"
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

const backupUsage = `Usage:
  beacon backup FILE [--config FILE | --data-dir DIR --http-addr ADDR]
      write a consistent backup of sessions, queued messages, retained messages,
      history, devices and webhook outboxes to FILE ("-" for stdout). From a running
      broker it is taken online through the admin API (GET /api/v1/backup, with
      auth.admin_token); from a stopped one, from the data directory.
  beacon restore FILE [--config FILE | --data-dir DIR]
      load a backup into a new or empty data directory (the broker stopped).
`

// runBackup is `beacon backup FILE`.
func runBackup(ctx context.Context, args, environ []string, stdout, stderr io.Writer) int {
	file, rest, ok := fileArg(args, stdout, stderr, backupUsage)
	if !ok {
		return 2
	}
	cfg, err := loadConfig("backup", rest, environ, stderr)
	if err != nil {
		return reportFlagErr(err, stderr)
	}
	out, commit, abort, err := createOutput(file, stdout)
	if err != nil {
		fmt.Fprintf(stderr, "beacon: %v\n", err)
		return 1
	}
	how, err := backup(ctx, cfg, out)
	if err == nil {
		err = commit()
	}
	if err != nil {
		abort()
		fmt.Fprintf(stderr, "beacon: backup: %v\n", err)
		return 1
	}
	fmt.Fprintf(stderr, "beacon: backup of %s written to %s (%s)\n", cfg.Storage.Dir, file, how)
	return 0
}

// backup writes the backup: online when a broker holds the directory.
func backup(ctx context.Context, cfg broker.Config, out io.Writer) (string, error) {
	if err := storage.InUse(cfg.Storage.Dir); errors.Is(err, storage.ErrInUse) {
		return "online, from the running broker", backupOnline(ctx, cfg, out)
	} else if err != nil {
		return "", err
	}
	d, err := storage.Open(storage.Options{Dir: cfg.Storage.Dir, Logger: newLogger(broker.LogConfig{Level: "warn"}, os.Stderr)})
	if err != nil {
		return "", err
	}
	defer d.Shutdown(context.Background())
	_, err = d.Backup(out, version)
	return "offline, from the data directory", err
}

func backupOnline(ctx context.Context, cfg broker.Config, out io.Writer) error {
	token, err := cfg.Auth.AdminTokenValue()
	if err != nil {
		return err
	}
	if token == "" {
		return errors.New("the broker is running and an online backup needs its admin API: set auth.admin_token (or stop the broker)")
	}
	host, port, err := net.SplitHostPort(cfg.HTTP.Addr)
	if err != nil || port == "0" {
		return fmt.Errorf("http.addr %q: give the running broker's HTTP address (--http-addr)", cfg.HTTP.Addr)
	}
	if ip := net.ParseIP(host); host == "" || (ip != nil && ip.IsUnspecified()) {
		host = "127.0.0.1"
	}
	scheme, client := "http", &http.Client{}
	if cfg.HTTP.TLSCert != "" {
		// This machine's own broker; its certificate names the public host.
		scheme = "https"
		client.Transport = &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}} //nolint:gosec // the local broker
	}
	ctx, cancel := context.WithTimeout(ctx, time.Hour)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, scheme+"://"+net.JoinHostPort(host, port)+"/api/v1/backup", nil)
	if err != nil {
		return err
	}
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		return fmt.Errorf("GET /api/v1/backup: %s: %s", resp.Status, msg)
	}
	_, err = io.Copy(out, resp.Body)
	return err
}

// runRestore is `beacon restore FILE`.
func runRestore(args, environ []string, stdout, stderr io.Writer) int {
	file, rest, ok := fileArg(args, stdout, stderr, backupUsage)
	if !ok {
		return 2
	}
	cfg, err := loadConfig("restore", rest, environ, stderr)
	if err != nil {
		return reportFlagErr(err, stderr)
	}
	in := io.Reader(os.Stdin)
	if file != "-" {
		f, err := os.Open(file)
		if err != nil {
			fmt.Fprintf(stderr, "beacon: %v\n", err)
			return 1
		}
		defer f.Close()
		in = f
	}
	h, err := storage.Restore(cfg.Storage.Dir, in)
	if err != nil {
		fmt.Fprintf(stderr, "beacon: restore: %v\n", err)
		return 1
	}
	fmt.Fprintf(stderr, "beacon: restored %s (taken %s by beacon %s) into %s\n", file, h.Created.Format(time.RFC3339), h.Version, cfg.Storage.Dir)
	return 0
}

// fileArg takes the FILE argument before the flags.
func fileArg(args []string, stdout, stderr io.Writer, usage string) (string, []string, bool) {
	if len(args) == 0 || args[0] == "help" || args[0] == "-h" || args[0] == "--help" {
		fmt.Fprint(stdout, usage)
		return "", nil, false
	}
	if len(args[0]) > 1 && args[0][0] == '-' {
		fmt.Fprintf(stderr, "beacon: the FILE comes first\n%s", usage)
		return "", nil, false
	}
	return args[0], args[1:], true
}

// createOutput opens FILE.tmp, renamed to FILE by commit, so a failed
// backup never leaves a file that looks whole (abort removes it); or
// stdout for "-".
func createOutput(file string, stdout io.Writer) (w io.Writer, commit func() error, abort func(), err error) {
	if file == "-" {
		return stdout, func() error { return nil }, func() {}, nil
	}
	tmp := file + ".tmp"
	f, err := os.OpenFile(tmp, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		return nil, nil, nil, err
	}
	commit = func() error {
		if err := f.Sync(); err != nil {
			return err
		}
		if err := f.Close(); err != nil {
			return err
		}
		return os.Rename(tmp, file)
	}
	abort = func() {
		_ = f.Close()
		_ = os.Remove(tmp)
	}
	return f, commit, abort, nil
}
