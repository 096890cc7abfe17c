package main

import (
	"context"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/beaconmq/beacon/broker"
)

// version is set at build time: -ldflags "-X main.version=v1.2.3".
var version = "dev"

const usage = `Beacon, an MQTT broker for devices and browsers.

Usage:
  beacon [serve] [flags]        run the broker (default)
  beacon config print [flags]   print the effective configuration as YAML
  beacon devices ...            manage devices (beacon devices help)
  beacon token --sub NAME ...   mint an HS256 JWT with auth.jwt_secret
  beacon acl import --mosquitto FILE   convert a Mosquitto acl_file to Beacon rules
  beacon healthcheck [flags]    exit 0 if the broker's /healthz answers (for HEALTHCHECK)
  beacon storage verify [flags] check a stopped broker's data directory for damage
  beacon backup FILE [flags]    back up the store (online from a running broker)
  beacon restore FILE [flags]   load a backup into a new data directory
  beacon cluster status|forget  list a cluster's nodes, or remove one gone for good
  beacon version                print the version (also --version)
  beacon help                   this text (also --help); COMMAND --help for its flags

Flags (serve, config print):
`

// run is the whole program; it returns the exit code.
func run(ctx context.Context, args, environ []string, stdout, stderr io.Writer) int {
	cmd := "serve"
	if len(args) > 0 && len(args[0]) > 0 && args[0][0] != '-' {
		cmd, args = args[0], args[1:]
	} else if len(args) > 0 {
		switch args[0] {
		case "-h", "-help", "--help":
			cmd = "help"
		case "-version", "--version":
			cmd = "version"
		}
	}
	switch cmd {
	case "version":
		fmt.Fprintf(stdout, "beacon %s\n", version)
		return 0
	case "serve":
		cfg, err := loadConfig("serve", args, environ, stderr)
		if err != nil {
			return reportFlagErr(err, stderr)
		}
		if err := serve(ctx, cfg, stderr); err != nil {
			fmt.Fprintf(stderr, "beacon: %v\n", err)
			return 1
		}
		return 0
	case "config":
		if len(args) == 0 || args[0] != "print" {
			fmt.Fprintln(stderr, "beacon: usage: beacon config print [flags]")
			return 2
		}
		cfg, err := loadConfig("config print", args[1:], environ, stderr)
		if err != nil {
			return reportFlagErr(err, stderr)
		}
		out, err := cfg.YAML()
		if err != nil {
			fmt.Fprintf(stderr, "beacon: %v\n", err)
			return 1
		}
		_, _ = stdout.Write(out)
		return 0
	case "healthcheck":
		cfg, err := loadConfig("healthcheck", args, environ, stderr)
		if err != nil {
			return reportFlagErr(err, stderr)
		}
		if err := healthcheck(ctx, cfg.HTTP.Addr, cfg.HTTP.TLSCert != ""); err != nil {
			fmt.Fprintf(stderr, "beacon: unhealthy: %v\n", err)
			return 1
		}
		return 0
	case "devices":
		return runDevices(args, environ, stdout, stderr)
	case "token":
		return runToken(args, environ, stdout, stderr)
	case "acl":
		return runACL(args, stdout, stderr)
	case "storage":
		return runStorage(args, environ, stdout, stderr)
	case "backup":
		return runBackup(ctx, args, environ, stdout, stderr)
	case "restore":
		return runRestore(args, environ, stdout, stderr)
	case "cluster":
		return runCluster(ctx, args, environ, stdout, stderr)
	case "help":
		fmt.Fprint(stdout, usage)
		newFlags("serve", stdout).PrintDefaults()
		return 0
	default:
		fmt.Fprintf(stderr, "beacon: unknown command %q (try: beacon help)\n", cmd)
		return 2
	}
}

func reportFlagErr(err error, stderr io.Writer) int {
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	fmt.Fprintf(stderr, "beacon: %v\n", err)
	return 2
}

// flagKeys maps each command-line flag to the configuration key it sets.
var flagKeys = []struct{ flag, key, help string }{
	{"mqtt-addr", "mqtt.addr", "MQTT TCP listen address (mqtt.addr)"},
	{"tls-addr", "mqtt.tls_addr", "MQTT over TLS listen address (mqtt.tls_addr)"},
	{"tls-cert", "mqtt.tls_cert", "PEM certificate file for TLS (mqtt.tls_cert)"},
	{"tls-key", "mqtt.tls_key", "PEM private key file for TLS (mqtt.tls_key)"},
	{"http-addr", "http.addr", "HTTP listen address (http.addr)"},
	{"data-dir", "storage.dir", "data directory (storage.dir)"},
	{"log-level", "log.level", "debug, info, warn or error (log.level)"},
	{"log-format", "log.format", "text or json (log.format)"},
}

type flagSet struct {
	*flag.FlagSet
	config *string
	values map[string]*string
}

func newFlags(name string, out io.Writer) *flagSet {
	fs := &flagSet{FlagSet: flag.NewFlagSet(name, flag.ContinueOnError), values: map[string]*string{}}
	fs.SetOutput(out)
	fs.config = fs.String("config", "", "YAML configuration file")
	for _, f := range flagKeys {
		fs.values[f.key] = fs.String(f.flag, "", f.help)
	}
	return fs
}

func loadConfig(name string, args, environ []string, stderr io.Writer) (broker.Config, error) {
	fs := newFlags(name, stderr)
	if err := fs.Parse(args); err != nil {
		return broker.Config{}, err
	}
	if fs.NArg() > 0 {
		return broker.Config{}, fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	return configFromFlags(fs, environ)
}

func newLogger(cfg broker.LogConfig, w io.Writer) *slog.Logger {
	var level slog.Level
	_ = level.UnmarshalText([]byte(cfg.Level))
	opts := &slog.HandlerOptions{Level: level}
	if cfg.Format == "json" {
		return slog.New(slog.NewJSONHandler(w, opts))
	}
	return slog.New(slog.NewTextHandler(w, opts))
}

// shutdownTimeout bounds a graceful stop; a second signal ends it at once.
const shutdownTimeout = 15 * time.Second

func serve(ctx context.Context, cfg broker.Config, logOut io.Writer) error {
	log := newLogger(cfg.Log, logOut)
	log.Info("starting beacon", "version", version, "data_dir", cfg.Storage.Dir, "sync", cfg.Storage.Sync)
	broker.Version = version
	b, err := broker.New(cfg, log)
	if err != nil {
		return err
	}
	if err := b.Start(); err != nil {
		_ = b.Shutdown(context.Background())
		return err
	}
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	for waiting := true; waiting; {
		select {
		case <-hup:
			if _, err := b.ReloadACL(); err != nil {
				log.Warn("SIGHUP: ACL not reloaded", "error", err)
			}
		case <-ctx.Done():
			waiting = false
		}
	}
	log.Info("stopping: disconnecting clients and flushing storage (signal again to exit at once)")

	// A second SIGINT/SIGTERM exits immediately.
	again := make(chan os.Signal, 1)
	signal.Notify(again, os.Interrupt, syscall.SIGTERM)
	defer signal.Stop(again)
	sctx, cancel := context.WithTimeout(context.Background(), shutdownTimeout)
	defer cancel()
	go func() {
		select {
		case <-again:
			log.Warn("second signal: exiting without a clean stop")
			cancel()
		case <-sctx.Done():
		}
	}()
	if err := b.Shutdown(sctx); err != nil {
		return fmt.Errorf("shutdown: %w", err)
	}
	log.Info("stopped")
	return nil
}

// healthcheck asks the broker configured by the same flags, environment and
// file for /healthz. A wildcard listen address is reached on loopback.
func healthcheck(ctx context.Context, addr string, useTLS bool) error {
	if addr == "" {
		return errors.New("http.addr is empty: no HTTP server to ask")
	}
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return err
	}
	if ip := net.ParseIP(host); host == "" || (ip != nil && ip.IsUnspecified()) {
		host = "127.0.0.1"
	}
	ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	scheme, client := "http", http.DefaultClient
	if useTLS {
		// The probe asks this machine's own broker whether it is alive; the
		// certificate names the public host, not 127.0.0.1, so it is not verified.
		scheme = "https"
		client = &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}} //nolint:gosec // liveness probe of the local process
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, scheme+"://"+net.JoinHostPort(host, port)+"/healthz", nil)
	if err != nil {
		return err
	}
	resp, err := client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("/healthz answered %s", resp.Status)
	}
	return nil
}
