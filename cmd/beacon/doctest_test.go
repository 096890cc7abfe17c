package main

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	bt "github.com/beaconmq/beacon/broker/brokertest"
)

// The documents whose marked shell blocks TestDocs runs, from the
// repository root.
var docFiles = []string{"README.md", "examples/sensor-fleet/README.md", "examples/homeassistant/README.md"}

// markedBlock is a fenced ```sh block marked for testing by an HTML comment on
// the line before it:
//
//	<!-- doctest -->             run it
//	<!-- doctest background -->  start each command (a broker, a fleet) in the
//	                             background (export lines run as they are), then
//	                             wait until the broker answers
//	<!-- doctest stop -->        first stop (SIGTERM) what earlier blocks left running
//	<!-- doctest-output -->      (before a fenced block right after a doctest
//	                             block) lines its output must contain
type markedBlock struct {
	line       int
	lines      []string
	background bool
	stop       bool
	output     []string
}

// parseDocBlocks reads the marked blocks of a Markdown document.
func parseDocBlocks(path string) ([]markedBlock, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var blocks []markedBlock
	var marker string // the doctest comment before the next fence
	var cur *markedBlock
	inFence, wantOutput, isOutput := false, false, false
	sc := bufio.NewScanner(f)
	for n := 1; sc.Scan(); n++ {
		l := sc.Text()
		t := strings.TrimSpace(l)
		switch {
		case inFence && strings.HasPrefix(t, "```"):
			inFence = false
			if cur != nil {
				blocks = append(blocks, *cur)
				cur, wantOutput = nil, true
			} else if isOutput {
				isOutput = false
			}
		case inFence && cur != nil:
			cur.lines = append(cur.lines, l)
		case inFence && isOutput:
			blocks[len(blocks)-1].output = append(blocks[len(blocks)-1].output, t)
		case strings.HasPrefix(t, "```"):
			inFence = true
			switch {
			case strings.HasPrefix(marker, "doctest-output"):
				if !wantOutput {
					return nil, fmt.Errorf("%s:%d: doctest-output not right after a doctest block", path, n)
				}
				isOutput = true
			case strings.HasPrefix(marker, "doctest"):
				if t != "```sh" {
					return nil, fmt.Errorf("%s:%d: a doctest block must be ```sh", path, n)
				}
				words := strings.Fields(marker)[1:]
				cur = &markedBlock{line: n + 1}
				for _, w := range words {
					switch w {
					case "background":
						cur.background = true
					case "stop":
						cur.stop = true
					default:
						return nil, fmt.Errorf("%s:%d: unknown doctest word %q", path, n-1, w)
					}
				}
			}
			marker, wantOutput = "", false
		case strings.HasPrefix(t, "<!--") && strings.HasSuffix(t, "-->"):
			marker = strings.TrimSpace(strings.TrimSuffix(strings.TrimPrefix(t, "<!--"), "-->"))
		case t != "":
			marker, wantOutput = "", false
		}
	}
	return blocks, sc.Err()
}

// docRewrites turn what a reader types in the repository into what runs in
// the test: the built binaries instead of go run, and the test's ports
// instead of the defaults.
func docRewrites(mqttPort, httpPort int) *strings.Replacer {
	return strings.NewReplacer(
		"go run ./cmd/beacon", "beacon",
		"go run ./examples/sensor-fleet", "sensor-fleet -broker mqtt://127.0.0.1:"+strconv.Itoa(mqttPort),
		"go install ./cmd/beacon", ":",
		":1883", ":"+strconv.Itoa(mqttPort),
		":8080", ":"+strconv.Itoa(httpPort),
	)
}

// docScript is one bash script for a document's blocks, in order, so that
// variables and running brokers carry from one block to the next.
func docScript(file string, blocks []markedBlock, rw *strings.Replacer, outDir string) string {
	var b strings.Builder
	b.WriteString(`set -euo pipefail
__pids=()
__ready() {
  for _ in $(seq 1 600); do beacon healthcheck >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "doctest: the broker did not answer within 60s" >&2; return 1
}
__stop() {
  for p in "${__pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${__pids[@]}"; do wait "$p" 2>/dev/null || true; done
  __pids=()
}
trap __stop EXIT
`)
	for i, bl := range blocks {
		fmt.Fprintf(&b, "echo '>>> %s:%d'\n", file, bl.line)
		if bl.stop {
			b.WriteString("__stop\n")
		}
		lines := bl.lines
		if bl.background {
			for _, l := range lines {
				if c := strings.TrimSpace(l); c != "" && !strings.HasPrefix(c, "#") && !strings.HasPrefix(c, "export ") {
					// exec: the pid is the command's, for __stop; the line may end in a comment.
					fmt.Fprintf(&b, "{ exec %s\n} &\n__pids+=($!)\n", rw.Replace(c))
				} else {
					b.WriteString(rw.Replace(l) + "\n")
				}
			}
			b.WriteString("__ready\n")
			continue
		}
		out := filepath.Join(outDir, strconv.Itoa(i))
		if len(bl.output) > 0 {
			b.WriteString("{\n")
		}
		for _, l := range lines {
			b.WriteString(rw.Replace(l) + "\n")
		}
		if len(bl.output) > 0 {
			fmt.Fprintf(&b, "} > %q\ncat %q\n", out, out)
			for _, want := range bl.output {
				fmt.Fprintf(&b, "grep -qxF -- %s %q || { echo \"doctest: %s:%d did not print: %s\" >&2; exit 1; }\n",
					shellQuote(want), out, file, bl.line, strings.ReplaceAll(want, `"`, `\"`))
			}
		}
	}
	return b.String()
}

func shellQuote(s string) string { return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'" }

// freePort returns a loopback port that was free a moment ago.
func freeLoopbackPort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// copyDocFiles copies the examples' non-Go files (configs, rules) into dir,
// so that the documents' commands find them where a reader does and write
// nothing into the repository.
func copyDocFiles(t *testing.T, root, dir string) {
	t.Helper()
	err := filepath.WalkDir(filepath.Join(root, "examples"), func(p string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() || strings.HasSuffix(p, ".go") {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		data, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		if err := os.MkdirAll(filepath.Join(dir, filepath.Dir(rel)), 0o755); err != nil {
			return err
		}
		return os.WriteFile(filepath.Join(dir, rel), data, 0o644)
	})
	if err != nil {
		t.Fatal(err)
	}
}

// TestDocs runs the marked shell blocks of the README and the examples'
// READMEs with the built binary, mosquitto_pub and mosquitto_sub, each
// document in a fresh directory on its own ports. mosquitto_pub/_sub get
// the test's port as their default through their options files
// ($XDG_CONFIG_HOME/mosquitto_pub), so the commands stay as written.
func TestDocs(t *testing.T) {
	bt.RequireTool(t, "mosquitto_pub", "mosquitto-clients")
	bt.RequireTool(t, "openssl", "openssl")
	root, err := filepath.Abs("../..")
	if err != nil {
		t.Fatal(err)
	}
	bin := t.TempDir()
	if err := os.Symlink(beaconBin, filepath.Join(bin, "beacon")); err != nil {
		t.Fatal(err)
	}
	build := exec.Command("go", "build", "-o", filepath.Join(bin, "sensor-fleet"), "./examples/sensor-fleet")
	build.Dir = root
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build the sensor fleet: %v\n%s", err, out)
	}
	for _, file := range docFiles {
		t.Run(file, func(t *testing.T) {
			blocks, err := parseDocBlocks(filepath.Join(root, file))
			if err != nil {
				t.Fatal(err)
			}
			if len(blocks) == 0 {
				t.Fatalf("%s has no doctest blocks", file)
			}
			dir := t.TempDir()
			copyDocFiles(t, root, dir)
			mqttPort, httpPort := freeLoopbackPort(t), freeLoopbackPort(t)
			xdg := filepath.Join(dir, ".config")
			if err := os.MkdirAll(xdg, 0o700); err != nil {
				t.Fatal(err)
			}
			for _, tool := range []string{"mosquitto_pub", "mosquitto_sub"} {
				writeFile(t, filepath.Join(xdg, tool), "-p "+strconv.Itoa(mqttPort)+"\n")
			}
			outDir := t.TempDir()
			script := docScript(file, blocks, docRewrites(mqttPort, httpPort), outDir)
			ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
			defer cancel()
			cmd := exec.CommandContext(ctx, "bash", "-c", script)
			cmd.Dir = dir
			cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
			cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
			cmd.WaitDelay = 10 * time.Second // a stray background process holding the output
			cmd.Env = append(cleanEnv(), "PATH="+bin+":"+os.Getenv("PATH"), "HOME="+dir, "XDG_CONFIG_HOME="+xdg,
				"BEACON_MQTT_ADDR=127.0.0.1:"+strconv.Itoa(mqttPort), "BEACON_HTTP_ADDR=127.0.0.1:"+strconv.Itoa(httpPort))
			out, err := cmd.CombinedOutput()
			if err != nil {
				t.Fatalf("%s: %v\n--- script ---\n%s\n--- output ---\n%s", file, err, script, out)
			}
		})
	}
}
