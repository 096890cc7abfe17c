package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// beaconBin is the binary under test, built once by TestMain (with the
// race detector when the tests run with it).
var beaconBin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "beacon-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	beaconBin = filepath.Join(dir, "beacon")
	args := []string{"build", "-o", beaconBin}
	if raceEnabled {
		args = append(args, "-race")
	}
	build := exec.Command("go", append(args, ".")...)
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "build beacon:", err)
		os.Exit(1)
	}
	code := m.Run()
	_ = os.RemoveAll(dir)
	os.Exit(code)
}

// proc is a running beacon process.
type proc struct {
	cmd      *exec.Cmd
	mqtt     string
	http     string
	mu       sync.Mutex
	logs     bytes.Buffer
	exited   chan struct{}
	exitCode int
}

// startBeacon runs the binary on ephemeral loopback ports with its data in
// dataDir and waits until it listens.
func startBeacon(t *testing.T, dataDir string, extra ...string) *proc {
	t.Helper()
	args := append([]string{"serve", "--mqtt-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0",
		"--data-dir", dataDir, "--log-format", "json"}, extra...)
	p := &proc{cmd: exec.Command(beaconBin, args...), exited: make(chan struct{})}
	p.cmd.Env = cleanEnv()
	stderr, err := p.cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	ready := make(chan struct{})
	go func() {
		sc := bufio.NewScanner(stderr)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		signalled := false
		for sc.Scan() {
			line := sc.Bytes()
			p.mu.Lock()
			p.logs.Write(line)
			p.logs.WriteByte('\n')
			var rec struct {
				Msg, Addr, Listener string
			}
			if json.Unmarshal(line, &rec) == nil {
				switch {
				case rec.Msg == "mqtt listening" && rec.Listener == "tcp":
					p.mqtt = rec.Addr
				case rec.Msg == "http listening":
					p.http = rec.Addr
				}
			}
			done := p.mqtt != "" && p.http != ""
			p.mu.Unlock()
			if done && !signalled {
				close(ready)
				signalled = true
			}
		}
		_ = p.cmd.Wait()
		p.exitCode = p.cmd.ProcessState.ExitCode()
		close(p.exited)
	}()
	t.Cleanup(func() {
		select {
		case <-p.exited:
		default:
			_ = p.cmd.Process.Kill()
			<-p.exited
		}
		if t.Failed() {
			t.Logf("beacon logs:\n%s", p.Logs())
		}
	})
	select {
	case <-ready:
	case <-p.exited:
		t.Fatalf("beacon exited with %d before listening:\n%s", p.exitCode, p.Logs())
	case <-time.After(30 * time.Second):
		t.Fatalf("beacon not listening after 30s:\n%s", p.Logs())
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	return p
}

// cleanEnv is the test's environment without BEACON_* settings.
func cleanEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "BEACON_") {
			env = append(env, kv)
		}
	}
	return env
}

func (p *proc) Logs() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.logs.String()
}

// kill sends SIGKILL and waits for the process to die.
func (p *proc) kill(t *testing.T) {
	t.Helper()
	if err := p.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	<-p.exited
}

// stop sends sig and returns the exit code.
func (p *proc) stop(t *testing.T, sig syscall.Signal) int {
	t.Helper()
	if err := p.cmd.Process.Signal(sig); err != nil {
		t.Fatal(err)
	}
	select {
	case <-p.exited:
	case <-time.After(30 * time.Second):
		t.Fatalf("beacon did not exit within 30s of %v", sig)
	}
	return p.exitCode
}
