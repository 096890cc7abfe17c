package main

import (
	"bufio"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	bt "github.com/beaconmq/beacon/broker/brokertest"
)

// docBlock is a fenced block of a doc: its info string and its text.
type docBlock struct {
	info []string // e.g. ["sh", "check"], ["yaml", "file=beacon.yaml"]
	text string
	line int
}

// docBlocks reads the fenced blocks of a Markdown file.
func docBlocks(t *testing.T, path string) []docBlock {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var out []docBlock
	var cur *docBlock
	sc := bufio.NewScanner(f)
	for n := 1; sc.Scan(); n++ {
		l := sc.Text()
		switch {
		case cur == nil && strings.HasPrefix(l, "```"):
			cur = &docBlock{info: strings.Fields(strings.TrimPrefix(l, "```")), line: n}
		case cur != nil && l == "```":
			out = append(out, *cur)
			cur = nil
		case cur != nil:
			cur.text += l + "\n"
		}
	}
	if cur != nil {
		t.Fatalf("%s:%d: unclosed block", path, cur.line)
	}
	return out
}

// docCommands splits a shell block into commands: one a line, comments
// and blank lines skipped.
func docCommands(text string) []string {
	var out []string
	for _, l := range strings.Split(text, "\n") {
		if l = strings.TrimSpace(l); l != "" && !strings.HasPrefix(l, "#") {
			out = append(out, l)
		}
	}
	return out
}

// TestMigratingFromMosquittoDoc runs docs/migrating-from-mosquitto.md: its
// files are written, its commands run in order in one directory with the
// built beacon first on PATH; the "check" block runs against Mosquitto
// started with the page's mosquitto.conf, and again against Beacon started
// by the "serve" block. The page's fixed ports become free ephemeral ones.
func TestMigratingFromMosquittoDoc(t *testing.T) {
	mosq := bt.RequireTool(t, "mosquitto", "mosquitto")
	for _, tool := range [][2]string{{"mosquitto_passwd", "mosquitto"}, {"mosquitto_pub", "mosquitto-clients"},
		{"mosquitto_sub", "mosquitto-clients"}, {"openssl", "openssl"}} {
		bt.RequireTool(t, tool[0], tool[1])
	}
	blocks := docBlocks(t, filepath.Join("..", "..", "docs", "migrating-from-mosquitto.md"))
	dir := t.TempDir()
	ports := map[string]string{}
	for _, p := range []string{"1883", "8883", "8080"} {
		ports[p] = freePort(t)
	}
	portRE := regexp.MustCompile(`\b(1883|8883|8080)\b`)
	localize := func(s string) string {
		return portRE.ReplaceAllStringFunc(s, func(p string) string { return ports[p] })
	}
	env := append(cleanEnv(), "PATH="+filepath.Dir(beaconBin)+string(os.PathListSeparator)+os.Getenv("PATH"))
	runCmd := func(b docBlock, cmdline string) {
		t.Helper()
		cmd := exec.Command("bash", "-c", localize(cmdline))
		cmd.Dir, cmd.Env = dir, env
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("docs line %d: %s: %v\n%s", b.line, cmdline, err, out)
		}
	}

	var check *docBlock
	var served bool
	mosquittoChecked := false
	for i := range blocks {
		b := blocks[i]
		if len(b.info) == 0 {
			continue
		}
		kind := ""
		if len(b.info) > 1 {
			kind = b.info[1]
		}
		switch {
		case strings.HasPrefix(kind, "file="):
			name := strings.TrimPrefix(kind, "file=")
			if err := os.WriteFile(filepath.Join(dir, name), []byte(localize(b.text)), 0o600); err != nil {
				t.Fatal(err)
			}
		case b.info[0] == "sh" && kind == "check":
			check = &blocks[i]
			// Before the move: the checks pass against Mosquitto with the
			// page's configuration (run as root, it would otherwise drop to
			// the user mosquitto, who cannot read the test's files).
			conf := filepath.Join(dir, "mosquitto.conf")
			body, err := os.ReadFile(conf)
			if err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(dir, "mosquitto-test.conf"), append([]byte("user root\n"), body...), 0o600); err != nil {
				t.Fatal(err)
			}
			stop := startDocMosquitto(t, mosq, dir, "127.0.0.1:"+ports["1883"])
			for _, c := range docCommands(b.text) {
				runCmd(b, c)
			}
			stop()
			mosquittoChecked = true
		case b.info[0] == "sh" && kind == "serve":
			cmds := docCommands(b.text)
			if len(cmds) != 1 || !mosquittoChecked {
				t.Fatalf("docs line %d: one serve command, after the checks", b.line)
			}
			startDocBeacon(t, dir, env, localize(cmds[0]), "127.0.0.1:"+ports["1883"], "127.0.0.1:"+ports["8883"])
			served = true
			for _, c := range docCommands(check.text) {
				runCmd(*check, c)
			}
		case b.info[0] == "sh" && kind == "":
			for _, c := range docCommands(b.text) {
				runCmd(b, c)
			}
		}
	}
	if check == nil || !served {
		t.Fatal("the page lost its check or serve block")
	}
}

func freePort(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return fmt.Sprint(l.Addr().(*net.TCPAddr).Port)
}

// waitListening waits until addr accepts TCP connections or exited closes.
func waitListening(t *testing.T, addr string, exited <-chan struct{}, logs func() string) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		select {
		case <-exited:
			t.Fatalf("exited before listening on %s:\n%s", addr, logs())
		default:
		}
		if c, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
			_ = c.Close()
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("not listening on %s after 30s:\n%s", addr, logs())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// startDocMosquitto runs mosquitto -c mosquitto-test.conf in dir and
// returns a function that stops it and waits for it.
func startDocMosquitto(t *testing.T, bin, dir, addr string) func() {
	t.Helper()
	cmd := exec.Command(bin, "-c", "mosquitto-test.conf")
	cmd.Dir = dir
	var logs syncBuffer
	cmd.Stdout, cmd.Stderr = &logs, &logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exited) }()
	stop := func() {
		_ = cmd.Process.Kill()
		<-exited
	}
	t.Cleanup(func() {
		stop()
		if t.Failed() {
			t.Logf("mosquitto logs:\n%s", logs.String())
		}
	})
	waitListening(t, addr, exited, logs.String)
	return stop
}

// startDocBeacon runs the page's serve command with bash in dir until the
// test ends.
func startDocBeacon(t *testing.T, dir string, env []string, cmdline string, addrs ...string) {
	t.Helper()
	cmd := exec.Command("bash", "-c", "exec "+cmdline)
	cmd.Dir, cmd.Env = dir, env
	var logs syncBuffer
	cmd.Stdout, cmd.Stderr = &logs, &logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-exited
		if t.Failed() {
			t.Logf("beacon logs:\n%s", logs.String())
		}
	})
	for _, a := range addrs {
		waitListening(t, a, exited, logs.String)
	}
}
