package main

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"

	bt "github.com/beaconmq/beacon/broker/brokertest"
)

// mosquittoACL is a Mosquitto acl_file with a general section, users,
// denies before and after the allows they cut into, a deny against one
// access only, and patterns with %u and %c. marker/%c lets every client signal in order.
const mosquittoACL = `# a general section: clients without username
topic read public/#

user admin
topic readwrite #

user alice
topic readwrite home/#
topic deny home/secret
topic read sensors/+/temp
topic write data/#
topic deny data/+/raw

user bob
topic deny home/bob/private
topic readwrite home/bob/#
topic write logs/bob

# every client
pattern readwrite devices/%u/#
pattern read cmd/%c
pattern readwrite marker/%c
pattern deny devices/%u/locked
`

// aclCase is one decision: may who write (publish) or read (receive) topic.
type aclCase struct {
	who   string // a user, or "" for a client without username
	write bool
	topic string
}

func (c aclCase) String() string {
	who, what := c.who, "read"
	if who == "" {
		who = "anonymous"
	}
	if c.write {
		what = "write"
	}
	return who + " " + what + " " + c.topic
}

var aclCases = []aclCase{
	{"alice", true, "home/kitchen"}, {"alice", true, "home/secret"}, {"alice", false, "home/secret"},
	{"alice", false, "sensors/k/temp"}, {"alice", true, "sensors/k/temp"}, {"alice", false, "sensors/k/hum"},
	{"alice", true, "data/a/raw"}, {"alice", false, "data/a/raw"}, {"alice", false, "data/a"},
	{"alice", true, "devices/alice/t"}, {"alice", true, "devices/bob/t"}, {"alice", false, "devices/bob/t"},
	{"alice", false, "cmd/c-alice"}, {"alice", false, "cmd/c-bob"}, {"alice", true, "cmd/c-alice"},
	{"bob", true, "home/bob/private"}, {"bob", false, "home/bob/private"}, {"bob", true, "home/bob/x"},
	{"bob", false, "home/bob/x"}, {"bob", true, "home/kitchen"}, {"bob", true, "logs/bob"}, {"bob", false, "logs/bob"},
	{"bob", false, "devices/bob/t"}, {"bob", false, "public/news"},
	{"carol", true, "devices/carol/x"}, {"carol", false, "devices/carol/x"}, {"carol", true, "home/kitchen"},
	{"carol", false, "public/news"}, {"carol", true, "devices/carol/locked"}, {"carol", false, "devices/carol/locked"},
	{"alice", true, "devices/alice/locked"},
	{"admin", true, "devices/admin/locked"}, {"admin", true, "devices/admin/other"},
	{"", false, "public/news"}, {"", true, "public/news"}, {"", true, "devices/x"}, {"", false, "cmd/c-anon"},
}

// aclDiffers are the documented differences: a pattern deny against a
// user's own allow, where Mosquitto lets the user's line win and Beacon's
// deny wins (the converter warns about each).
var aclDiffers = map[string]bool{"admin write devices/admin/locked": true}

var aclPasswords = map[string]string{"admin": "admin-password", "alice": "alice-password", "bob": "bob-password", "carol": "carol-password"}

// TestACLImportMatchesMosquitto runs a real Mosquitto with an acl_file and
// a password_file, and the built Beacon with the same passwd imported and
// the ACL converted by "beacon acl import", and compares their decisions
// topic by topic: what each client's publish reaches, and what each client
// receives on an exact subscription.
func TestACLImportMatchesMosquitto(t *testing.T) {
	mosq := bt.RequireTool(t, "mosquitto", "mosquitto")
	dir := t.TempDir()
	passwd, aclFile := filepath.Join(dir, "passwd"), filepath.Join(dir, "mosquitto.acl")
	makePasswd(t, passwd,
		[3]string{"admin", "sha512-pbkdf2", aclPasswords["admin"]},
		[3]string{"alice", "sha512-pbkdf2", aclPasswords["alice"]},
		[3]string{"bob", "sha512", aclPasswords["bob"]},
		[3]string{"carol", "sha512-pbkdf2", aclPasswords["carol"]})
	if err := os.WriteFile(aclFile, []byte(mosquittoACL), 0o644); err != nil {
		t.Fatal(err)
	}

	// Beacon: the same users and the converted rules.
	data, rules := filepath.Join(dir, "data"), filepath.Join(dir, "rules.yaml")
	if code, out := runBin(t, "", "devices", "import", "--mosquitto-passwd", passwd, "--data-dir", data); code != 0 {
		t.Fatalf("devices import: %d %s", code, out)
	}
	code, out := runBin(t, "", "acl", "import", "--mosquitto", aclFile, "--out", rules)
	if code != 0 || !strings.Contains(out, "wrote "+rules+" (1 warnings)") ||
		!strings.Contains(out, `warning: line 23: Beacon denies "devices/%u/locked" to device admin`) {
		t.Fatalf("acl import: %d %s", code, out)
	}
	conf := filepath.Join(dir, "beacon.yaml")
	if err := os.WriteFile(conf, []byte("auth:\n  acl_file: "+rules+"\n  allow_anonymous: true\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	beacon := startBeacon(t, data, "--config", conf)

	mosqAddr := startMosquitto(t, mosq, dir, fmt.Sprintf("allow_anonymous true\npassword_file %s\nacl_file %s\n", passwd, aclFile))

	want := aclDecisions(t, mosqAddr)
	got := aclDecisions(t, beacon.mqtt)
	for i, c := range aclCases {
		differs := aclDiffers[c.String()]
		switch {
		case differs && (got[i] || !want[i]):
			t.Errorf("%s: Beacon %v, Mosquitto %v; want the documented difference (Beacon false, Mosquitto true)", c, got[i], want[i])
		case !differs && got[i] != want[i]:
			t.Errorf("%s: Beacon %v, Mosquitto %v", c, got[i], want[i])
		}
	}
	// The table is not trivial: both outcomes occur.
	allowed := 0
	for _, ok := range want {
		if ok {
			allowed++
		}
	}
	if allowed == 0 || allowed == len(want) {
		t.Fatalf("Mosquitto allowed %d of %d cases", allowed, len(want))
	}
}

// startMosquitto runs Debian's mosquitto with extra config on a free
// loopback port and returns its address once it accepts connections.
func startMosquitto(t *testing.T, bin, dir, extra string) string {
	t.Helper()
retry:
	for attempt := 0; ; attempt++ {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		port := l.Addr().(*net.TCPAddr).Port
		_ = l.Close()
		conf := filepath.Join(dir, "mosquitto.conf")
		// user root: Mosquitto run as root otherwise drops to the user
		// mosquitto, who cannot read the test's files.
		body := fmt.Sprintf("listener %d 127.0.0.1\npersistence false\nuser root\nlog_dest stderr\n%s", port, extra)
		if err := os.WriteFile(conf, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		cmd := exec.Command(bin, "-c", conf)
		var logs syncBuffer
		cmd.Stderr, cmd.Stdout = &logs, &logs
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		exited := make(chan struct{})
		go func() { _ = cmd.Wait(); close(exited) }()
		t.Cleanup(func() {
			_ = cmd.Process.Kill()
			<-exited
			if t.Failed() {
				t.Logf("mosquitto logs:\n%s", logs.String())
			}
		})
		addr := fmt.Sprintf("127.0.0.1:%d", port)
		deadline := time.Now().Add(15 * time.Second)
		for {
			select {
			case <-exited:
				if attempt < 2 { // the port was taken between choosing and binding
					continue retry
				}
				t.Fatalf("mosquitto exited:\n%s", logs.String())
			default:
			}
			if c, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
				_ = c.Close()
				return addr
			}
			if time.Now().After(deadline) {
				t.Fatalf("mosquitto not listening after 15s:\n%s", logs.String())
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// aclDecisions runs aclCases against the broker at addr. A write case:
// the client publishes the topic and then its marker; once the admin
// (reading '#') has the marker, it has the topic too or never will (one
// publisher's messages arrive in order). A read case: the client
// subscribes to the topic and its marker; the admin publishes the topic,
// then the marker.
func aclDecisions(t *testing.T, addr string) []bool {
	t.Helper()
	admin := dialAs(t, addr, "admin", "c-admin")
	subscribe(t, admin, "#")
	clients := map[string]*bt.Client{"admin": admin} // admin reads '#': its marker too
	client := func(who string) *bt.Client {
		if c, ok := clients[who]; ok {
			return c
		}
		cid := "c-" + who
		if who == "" {
			cid = "c-anon"
		}
		c := dialAs(t, addr, who, cid)
		subscribe(t, c, "marker/"+cid)
		clients[who] = c
		return c
	}
	has := func(c *bt.Client, topic, payload string) bool {
		for _, m := range c.Messages() {
			if m.Topic == topic && string(m.Payload) == payload {
				return true
			}
		}
		return false
	}
	out := make([]bool, len(aclCases))
	for i, tc := range aclCases {
		c := client(tc.who)
		marker, payload, mark := "marker/"+c.ClientID(), fmt.Sprintf("case-%d", i), fmt.Sprintf("mark-%d", i)
		if tc.write {
			publish(t, c, tc.topic, payload)
			publish(t, c, marker, mark)
			bt.WaitFor(t, 10*time.Second, "the marker of "+tc.String(), func() bool { return has(admin, marker, mark) })
			out[i] = has(admin, tc.topic, payload)
			continue
		}
		subscribe(t, c, tc.topic)
		publish(t, admin, tc.topic, payload)
		publish(t, admin, marker, mark)
		bt.WaitFor(t, 10*time.Second, "the marker of "+tc.String(), func() bool { return has(c, marker, mark) })
		out[i] = has(c, tc.topic, payload)
	}
	return out
}

func dialAs(t *testing.T, addr, user, cid string) *bt.Client {
	t.Helper()
	cp := &paho.Connect{ClientID: cid, CleanStart: true}
	if user != "" {
		cp.Username, cp.UsernameFlag = user, true
		cp.Password, cp.PasswordFlag = []byte(aclPasswords[user]), true
	}
	return bt.Dial(t, addr, cp)
}

// subscribe subscribes at QoS 1 whatever the broker grants: a refusal is
// a decision, compared by what arrives.
func subscribe(t *testing.T, c *bt.Client, topic string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if sa, err := c.Subscribe(ctx, &paho.Subscribe{Subscriptions: []paho.SubscribeOptions{{Topic: topic, QoS: 1}}}); err != nil && sa == nil {
		t.Fatalf("subscribe %q: %v", topic, err)
	}
}

// publish publishes at QoS 1; a refusal (PUBACK 0x87) is a decision.
func publish(t *testing.T, c *bt.Client, topic, payload string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if r, err := c.Publish(ctx, &paho.Publish{Topic: topic, QoS: 1, Payload: []byte(payload)}); err != nil && r == nil {
		t.Fatalf("publish %q: %v", topic, err)
	}
}
