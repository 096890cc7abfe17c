package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"
)

// brokerProc is a broker process started for one run, on loopback, with a
// data directory of its own.
type brokerProc struct {
	cmd  *exec.Cmd
	mqtt string // host:port
	http string // Beacon's, when asked for

	mu     sync.Mutex
	tail   []string // the last lines it logged, for errors
	exited chan struct{}
}

// brokerOptions are what a run needs of a broker beyond the defaults.
type brokerOptions struct {
	http        bool // Beacon: an HTTP listener that lets one client open many SSE streams
	maxQueued   int  // QoS 1/2 messages queued per session; 0: the contender's default
	persistence bool // Mosquitto: persistence true
	sync        string
	env         []string // Beacon: more settings (BEACON_...)
}

// startBeacon runs bin serve with its data in dir, on ports of its own
// choosing that it logs.
func startBeacon(bin, dir string, o brokerOptions) (*brokerProc, error) {
	httpAddr := ""
	if o.http {
		httpAddr = "127.0.0.1:0"
	}
	cmd := exec.Command(bin, "serve", "--mqtt-addr", "127.0.0.1:0", "--http-addr", httpAddr,
		"--data-dir", filepath.Join(dir, "data"), "--log-level", "info", "--log-format", "json")
	queued := o.maxQueued
	if queued == 0 {
		queued = 65535
	}
	cmd.Env = append(withoutBeaconEnv(), fmt.Sprintf("BEACON_MQTT_MAX_QUEUED_MESSAGES=%d", queued))
	if o.sync != "" {
		cmd.Env = append(cmd.Env, "BEACON_STORAGE_SYNC="+o.sync)
	}
	cmd.Env = append(cmd.Env, o.env...)
	if o.http {
		// One client address opens every stream, as fast as it can: the
		// per-address limits and the handshake rate are for browsers.
		cmd.Env = append(cmd.Env, "BEACON_HTTP_SSE_MAX_STREAMS_PER_IP=0", "BEACON_HTTP_MAX_CONNS_PER_IP=0",
			"BEACON_HTTP_HANDSHAKES_PER_SECOND=0", "BEACON_HTTP_SSE_MAX_STREAMS_PER_PRINCIPAL=0")
	}
	b := &brokerProc{cmd: cmd, exited: make(chan struct{})}
	ready := make(chan struct{})
	err := b.start(func(line string) bool {
		var rec struct{ Msg, Addr, Listener string }
		if json.Unmarshal([]byte(line), &rec) != nil {
			return false
		}
		switch {
		case rec.Msg == "mqtt listening" && rec.Listener == "tcp":
			b.mqtt = rec.Addr
		case rec.Msg == "http listening":
			b.http = rec.Addr
		}
		return b.mqtt != "" && (b.http != "" || !o.http)
	}, ready)
	if err != nil {
		return nil, err
	}
	select {
	case <-ready:
		return b, nil
	case <-b.exited:
		return nil, fmt.Errorf("beacon exited before listening: %s", b.logs())
	case <-time.After(30 * time.Second):
		b.stop()
		return nil, fmt.Errorf("beacon not listening after 30s: %s", b.logs())
	}
}

// startMosquitto runs Mosquitto with a configuration in dir. Its fd limit
// is raised to the hard limit first: Go starts children with the soft
// limit the tool itself started with, often 1,024, and Mosquitto, unlike
// a Go program, does not raise its own.
func startMosquitto(bin, dir string, o brokerOptions) (*brokerProc, error) {
	queued := o.maxQueued
	if queued == 0 {
		queued = 65535
	}
	var last error
	for range 3 { // the port is chosen before Mosquitto binds it: another process may take it
		port, err := freePort()
		if err != nil {
			return nil, err
		}
		conf := fmt.Sprintf("listener %d 127.0.0.1\nallow_anonymous true\nmax_connections -1\nmax_queued_messages %d\n"+
			"log_dest stderr\nlog_type error\nlog_type warning\n", port, queued)
		if o.persistence {
			conf += "persistence true\npersistence_location " + dir + "/\n"
		}
		path := filepath.Join(dir, "mosquitto.conf")
		if err := os.WriteFile(path, []byte(conf), 0o600); err != nil {
			return nil, err
		}
		cmd := exec.Command("/bin/sh", "-c", `ulimit -n "$(ulimit -Hn)" && exec "$0" "$@"`, bin, "-c", path)
		b := &brokerProc{cmd: cmd, mqtt: fmt.Sprintf("127.0.0.1:%d", port), exited: make(chan struct{})}
		if err := b.start(func(string) bool { return false }, nil); err != nil {
			return nil, err
		}
		if last = b.waitListening(15 * time.Second); last == nil {
			return b, nil
		}
		b.stop()
	}
	return nil, last
}

// start starts the process, keeping the tail of its stderr; ready is
// closed once isReady returns true for a line.
func (b *brokerProc) start(isReady func(line string) bool, ready chan struct{}) error {
	stderr, err := b.cmd.StderrPipe()
	if err != nil {
		return err
	}
	if err := b.cmd.Start(); err != nil {
		return err
	}
	go func() {
		sc := bufio.NewScanner(stderr)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for signalled := false; sc.Scan(); {
			line := sc.Text()
			b.mu.Lock()
			b.tail = append(b.tail, line)
			if len(b.tail) > 20 {
				b.tail = b.tail[1:]
			}
			if !signalled && isReady(line) {
				signalled = true
				close(ready)
			}
			b.mu.Unlock()
		}
		_ = b.cmd.Wait()
		close(b.exited)
	}()
	return nil
}

// waitListening dials the MQTT port until it answers.
func (b *brokerProc) waitListening(timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		conn, err := net.DialTimeout("tcp", b.mqtt, time.Second)
		if err == nil {
			_ = conn.Close()
			return nil
		}
		select {
		case <-b.exited:
			return fmt.Errorf("%s exited before listening: %s", b.cmd.Path, b.logs())
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s not listening on %s after %s: %w", b.cmd.Path, b.mqtt, timeout, err)
		}
	}
}

func (b *brokerProc) pid() int { return b.cmd.Process.Pid }

func (b *brokerProc) logs() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return strings.Join(b.tail, "\n")
}

// stop sends SIGTERM and, after 15 s, SIGKILL.
func (b *brokerProc) stop() {
	_ = b.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-b.exited:
	case <-time.After(15 * time.Second):
		_ = b.cmd.Process.Kill()
		<-b.exited
	}
}

// findMosquitto looks the broker up in PATH and then in /usr/sbin, where
// Debian installs it and where a user's PATH often does not reach.
func findMosquitto(name string) (string, error) {
	p, err := exec.LookPath(name)
	if err != nil && !strings.Contains(name, "/") {
		if alt, altErr := exec.LookPath(filepath.Join("/usr/sbin", name)); altErr == nil {
			return alt, nil
		}
	}
	return p, err
}

func freePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

// withoutBeaconEnv is the environment without BEACON_* settings, so a
// broker runs on its defaults and what a run sets.
func withoutBeaconEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "BEACON_") {
			env = append(env, kv)
		}
	}
	return env
}
