package main

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"

	bt "github.com/beaconmq/beacon/broker/brokertest"
)

// mosqSub runs mosquitto_sub in debug mode and returns once the broker has
// acknowledged its subscription. Received lines (not debug lines) are
// collected; wait() returns them after the process exits.
type mosqSub struct {
	cmd   *exec.Cmd
	mu    sync.Mutex
	lines []string
	done  chan struct{}
}

func startMosqSub(t *testing.T, addr string, args ...string) *mosqSub {
	t.Helper()
	bin := bt.RequireTool(t, "mosquitto_sub", "mosquitto-clients")
	host, port, _ := net.SplitHostPort(addr)
	// stdbuf -oL: mosquitto_sub block-buffers its debug lines on a pipe.
	// stdbuf execs mosquitto_sub, so signals reach it directly.
	s := &mosqSub{cmd: exec.Command("stdbuf", append([]string{"-oL", bin, "-h", host, "-p", port, "-d"}, args...)...), done: make(chan struct{})}
	out, err := s.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	s.cmd.Stderr = s.cmd.Stdout
	if err := s.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	subscribed := make(chan struct{})
	go func() {
		defer close(s.done)
		sc := bufio.NewScanner(out)
		once := sync.Once{}
		for sc.Scan() {
			l := sc.Text()
			switch {
			case strings.Contains(l, "received SUBACK"):
				once.Do(func() { close(subscribed) })
			case strings.HasPrefix(l, "Client ") || strings.HasPrefix(l, "Subscribed "):
			default:
				s.mu.Lock()
				s.lines = append(s.lines, l)
				s.mu.Unlock()
			}
		}
		_, _ = io.Copy(io.Discard, out)
		_ = s.cmd.Wait()
	}()
	t.Cleanup(func() {
		_ = s.cmd.Process.Kill()
		<-s.done
	})
	select {
	case <-subscribed:
	case <-s.done:
		t.Fatalf("mosquitto_sub %v exited before subscribing: %v", args, s.Lines())
	case <-time.After(10 * time.Second):
		t.Fatalf("mosquitto_sub %v not subscribed after 10s", args)
	}
	return s
}

func (s *mosqSub) Lines() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.lines...)
}

func (s *mosqSub) wait(t *testing.T, timeout time.Duration) []string {
	t.Helper()
	select {
	case <-s.done:
	case <-time.After(timeout):
		t.Fatalf("mosquitto_sub still running after %s; got %q", timeout, s.Lines())
	}
	return s.Lines()
}

func mosqPub(t *testing.T, addr string, args ...string) {
	t.Helper()
	bin := bt.RequireTool(t, "mosquitto_pub", "mosquitto-clients")
	host, port, _ := net.SplitHostPort(addr)
	if out, err := exec.Command(bin, append([]string{"-h", host, "-p", port}, args...)...).CombinedOutput(); err != nil {
		t.Fatalf("mosquitto_pub %v: %v: %s", args, err, out)
	}
}

// TestMosquittoClients drives the built binary with Debian's
// mosquitto_pub and mosquitto_sub, MQTT 3.1.1 and 5.
func TestMosquittoClients(t *testing.T) {
	p := startBeacon(t, t.TempDir())

	for _, version := range []string{"mqttv311", "mqttv5"} {
		for _, qos := range []string{"0", "1", "2"} {
			t.Run(version+"/qos"+qos, func(t *testing.T) {
				topic := fmt.Sprintf("mosq/%s/%s", version, qos)
				sub := startMosqSub(t, p.mqtt, "-V", version, "-q", qos, "-t", topic, "-C", "3", "-F", "%q %t %p")
				mosqPub(t, p.mqtt, "-V", version, "-q", qos, "-t", topic, "-m", "one")
				// -l publishes one message per line of standard input.
				bin := bt.RequireTool(t, "mosquitto_pub", "mosquitto-clients")
				host, port, _ := net.SplitHostPort(p.mqtt)
				cmd := exec.Command(bin, "-h", host, "-p", port, "-V", version, "-q", qos, "-t", topic, "-l")
				cmd.Stdin = strings.NewReader("two\nthree\n")
				if out, err := cmd.CombinedOutput(); err != nil {
					t.Fatalf("mosquitto_pub -l: %v: %s", err, out)
				}
				got := sub.wait(t, 10*time.Second)
				want := []string{qos + " " + topic + " one", qos + " " + topic + " two", qos + " " + topic + " three"}
				if strings.Join(got, "|") != strings.Join(want, "|") {
					t.Fatalf("got %q, want %q", got, want)
				}
			})
		}
	}

	t.Run("retained", func(t *testing.T) {
		mosqPub(t, p.mqtt, "-q", "1", "-r", "-t", "mosq/retained", "-m", "kept")
		sub := startMosqSub(t, p.mqtt, "-q", "1", "-t", "mosq/retained", "-C", "1", "-F", "%r %p")
		if got := sub.wait(t, 10*time.Second); len(got) != 1 || got[0] != "1 kept" {
			t.Fatalf("retained: got %q, want [\"1 kept\"]", got)
		}
		// An empty retained message clears it.
		mosqPub(t, p.mqtt, "-q", "1", "-r", "-t", "mosq/retained", "-n")
		mosqPub(t, p.mqtt, "-q", "1", "-r", "-t", "mosq/retained2", "-m", "other")
		sub = startMosqSub(t, p.mqtt, "-q", "1", "-t", "mosq/#", "-C", "1", "-F", "%t")
		if got := sub.wait(t, 10*time.Second); len(got) != 1 || got[0] != "mosq/retained2" {
			t.Fatalf("after clearing: got %q", got)
		}
	})

	t.Run("will after abrupt death", func(t *testing.T) {
		watcher := bt.Dial(t, p.mqtt, &paho.Connect{ClientID: "will-watcher", CleanStart: true})
		watcher.SubscribeT(t, paho.SubscribeOptions{Topic: "mosq/will/#", QoS: 1})
		dying := startMosqSub(t, p.mqtt, "-i", "dying", "-t", "mosq/nothing",
			"--will-topic", "mosq/will/dying", "--will-payload", "died", "--will-qos", "1")
		_ = dying.cmd.Process.Signal(syscall.SIGKILL)
		m := watcher.WaitMessages(t, 1, 10*time.Second)[0]
		if m.Topic != "mosq/will/dying" || string(m.Payload) != "died" {
			t.Fatalf("will: %q %q", m.Topic, m.Payload)
		}
	})

	t.Run("keep-alive timeout", func(t *testing.T) {
		watcher := bt.Dial(t, p.mqtt, &paho.Connect{ClientID: "ka-watcher", CleanStart: true})
		watcher.SubscribeT(t, paho.SubscribeOptions{Topic: "mosq/ka/#", QoS: 1})
		frozen := startMosqSub(t, p.mqtt, "-i", "frozen", "-k", "5", "-t", "mosq/nothing",
			"--will-topic", "mosq/ka/frozen", "--will-payload", "timed out")
		// SIGSTOP: the socket stays open but the client never pings again.
		_ = frozen.cmd.Process.Signal(syscall.SIGSTOP)
		defer func() { _ = frozen.cmd.Process.Signal(syscall.SIGCONT) }()
		m := watcher.WaitMessages(t, 1, 15*time.Second)[0]
		if m.Topic != "mosq/ka/frozen" {
			t.Fatalf("got %q, want the frozen client's will", m.Topic)
		}
	})
}
