// Package clustertest starts real redis-server processes for tests (the
// Debian package; `make test-deps` installs it).
package clustertest

import (
	"bufio"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// Redis is one redis-server on 127.0.0.1 at a port chosen at run time.
type Redis struct {
	t    testing.TB
	Port int
	Dir  string
	args []string
	// sentinelConf, for a Sentinel, is its config file (it rewrites it).
	sentinelConf string
	cmd          *exec.Cmd
	done         chan struct{}
}

// StartRedis starts redis-server on an ephemeral port with its data in a
// temporary directory; extra arguments are redis-server options
// ("--appendonly", "yes"). It is stopped when the test ends. Without
// redis-server the test fails (it is a required test tool).
func StartRedis(t testing.TB, extra ...string) *Redis {
	t.Helper()
	if _, err := exec.LookPath("redis-server"); err != nil {
		t.Fatalf("redis-server not found (make test-deps installs it): %v", err)
	}
	r := &Redis{t: t, Dir: t.TempDir(), args: extra}
	r.Port = freePort(t)
	r.Start()
	t.Cleanup(r.Kill)
	return r
}

// URL is the redis:// URL of database 0.
func (r *Redis) URL() string { return fmt.Sprintf("redis://127.0.0.1:%d/0", r.Port) }

// Addr is host:port.
func (r *Redis) Addr() string { return fmt.Sprintf("127.0.0.1:%d", r.Port) }

// Start (re)starts the server on the same port and directory and waits
// until it answers PING.
func (r *Redis) Start() {
	r.t.Helper()
	args := append([]string{"--port", fmt.Sprint(r.Port), "--bind", "127.0.0.1", "--dir", r.Dir,
		"--save", "", "--protected-mode", "yes", "--daemonize", "no", "--logfile", filepath.Join(r.Dir, "redis.log")}, r.args...)
	if r.sentinelConf != "" {
		args = []string{r.sentinelConf, "--sentinel"}
	}
	cmd := exec.Command("redis-server", args...)
	dieWithParent(cmd)
	if err := cmd.Start(); err != nil {
		r.t.Fatalf("start redis-server: %v", err)
	}
	r.cmd, r.done = cmd, make(chan struct{})
	go func(done chan struct{}) { _ = cmd.Wait(); close(done) }(r.done)
	deadline := time.Now().Add(30 * time.Second)
	for {
		if r.ping() {
			return
		}
		select {
		case <-r.done:
			log, _ := os.ReadFile(filepath.Join(r.Dir, "redis.log"))
			r.t.Fatalf("redis-server exited at start: %s", log)
		default:
		}
		if time.Now().After(deadline) {
			r.t.Fatalf("redis-server on port %d did not answer within 30s", r.Port)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Kill stops the server with SIGKILL and waits for it to exit.
func (r *Redis) Kill() {
	if r.cmd == nil || r.cmd.Process == nil {
		return
	}
	_ = r.cmd.Process.Kill()
	<-r.done
	r.cmd = nil
}

func (r *Redis) ping() bool {
	c, err := net.DialTimeout("tcp", r.Addr(), time.Second)
	if err != nil {
		return false
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(2 * time.Second))
	if _, err := c.Write([]byte("PING\r\n")); err != nil {
		return false
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	return err == nil && strings.HasPrefix(line, "+PONG")
}

func freePort(t testing.TB) int {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// Sentinel is one Redis Sentinel on 127.0.0.1 watching a master under
// the name "beacon", quick to fail over (the master is down after 500 ms
// without an answer).
type Sentinel struct {
	*Redis
}

// StartSentinel starts a Sentinel (redis-server --sentinel) watching
// master; it is stopped when the test ends.
func StartSentinel(t testing.TB, master *Redis) *Sentinel {
	t.Helper()
	s := &Redis{t: t, Dir: t.TempDir()}
	s.Port = freePort(t)
	conf := filepath.Join(s.Dir, "sentinel.conf")
	body := fmt.Sprintf(`port %d
bind 127.0.0.1
daemonize no
dir %s
logfile %s
sentinel resolve-hostnames no
sentinel monitor beacon 127.0.0.1 %d 1
sentinel down-after-milliseconds beacon 500
sentinel failover-timeout beacon 3000
sentinel parallel-syncs beacon 1
`, s.Port, s.Dir, filepath.Join(s.Dir, "redis.log"), master.Port)
	if err := os.WriteFile(conf, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	s.sentinelConf = conf
	s.Start()
	t.Cleanup(s.Kill)
	return &Sentinel{s}
}

// URL is the cluster.redis_url that reaches the master through the
// Sentinel.
func (s *Sentinel) URL() string {
	return fmt.Sprintf("redis://127.0.0.1:%d/0?master_name=beacon", s.Port)
}
