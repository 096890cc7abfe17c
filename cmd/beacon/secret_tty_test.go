//go:build linux

package main

import (
	"bytes"
	"io"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	bt "github.com/beaconmq/beacon/broker/brokertest"
)

// TestSecretStdinOnATerminal: typed on a terminal (script(1) gives the
// built binary a pseudo-terminal), the secret is not echoed.
func TestSecretStdinOnATerminal(t *testing.T) {
	script := bt.RequireTool(t, "script", "bsdutils")
	data := filepath.Join(t.TempDir(), "data")
	cmd := exec.Command(script, "-q", "-e", "-c", beaconBin+" devices add tty-1 --secret-stdin --data-dir "+data, "/dev/null")
	cmd.Env = cleanEnv()
	in, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	outPipe, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = cmd.Stdout
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	prompted := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 4096)
		once := false
		for {
			n, err := outPipe.Read(buf)
			out.Write(buf[:n])
			if !once && strings.Contains(out.String(), "secret (not shown):") {
				once = true
				close(prompted)
			}
			if err != nil {
				return
			}
		}
	}()
	select {
	case <-prompted: // echo is off now: what is typed next is not shown
	case <-done:
		t.Fatalf("exited before the prompt: %q", out.String())
	case <-time.After(30 * time.Second):
		t.Fatalf("no prompt after 30s: %q", out.String())
	}
	secret := "typed on a terminal 12345"
	if _, err := io.WriteString(in, secret+"\r"); err != nil {
		t.Fatal(err)
	}
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		_ = cmd.Process.Kill()
		t.Fatalf("still running after 30s: %q", out.String())
	}
	_ = in.Close()
	if err := cmd.Wait(); err != nil {
		t.Fatalf("%v: %q", err, out.String())
	}
	if !strings.Contains(out.String(), "device tty-1 added") || strings.Contains(out.String(), "typed on") {
		t.Fatalf("terminal showed %q", out.String())
	}
	if code, o := runBin(t, "", "devices", "show", "tty-1", "--data-dir", data); code != 0 || !strings.Contains(o, `"secret_scheme": "pbkdf2-sha512"`) {
		t.Fatalf("show: %d %s", code, o)
	}
}
