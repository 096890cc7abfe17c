package main

import (
	"bytes"
	"context"
	"io"
	"net"
	"net/url"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/chromedp"

	bt "github.com/beaconmq/beacon/broker/brokertest"
)

// cutProxy forwards TCP connections to a target and can cut them all and
// refuse new ones for a while: a network that drops.
type cutProxy struct {
	ln     net.Listener
	target string
	mu     sync.Mutex
	down   bool
	conns  map[net.Conn]bool
	heads  []string // the first bytes of every request seen
}

func newCutProxy(t *testing.T, target string) *cutProxy {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &cutProxy{ln: ln, target: target, conns: map[net.Conn]bool{}}
	t.Cleanup(func() { _ = ln.Close(); p.cut(false) })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go p.serve(c)
		}
	}()
	return p
}

func (p *cutProxy) serve(c net.Conn) {
	p.mu.Lock()
	if p.down {
		p.mu.Unlock()
		_ = c.Close()
		return
	}
	p.conns[c] = true
	p.mu.Unlock()
	up, err := net.Dial("tcp", p.target)
	if err != nil {
		_ = c.Close()
		return
	}
	p.mu.Lock()
	p.conns[up] = true
	p.mu.Unlock()
	go func() {
		buf := make([]byte, 32<<10)
		for {
			n, err := c.Read(buf)
			if n > 0 {
				p.mu.Lock()
				p.heads = append(p.heads, string(buf[:min(n, 2048)]))
				p.mu.Unlock()
				if _, werr := up.Write(buf[:n]); werr != nil {
					break
				}
			}
			if err != nil {
				break
			}
		}
		_ = up.Close()
	}()
	_, _ = io.Copy(c, up)
	_ = c.Close()
}

// cut closes every connection; down keeps refusing new ones.
func (p *cutProxy) cut(down bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.down = down
	for c := range p.conns {
		_ = c.Close()
	}
	clear(p.conns)
}

func (p *cutProxy) sawHeader(name string) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, h := range p.heads {
		if bytes.Contains([]byte(h), []byte("\r\n"+name+": ")) {
			return true
		}
	}
	return false
}

// TestDashboardLiveAndReplay opens the embedded dashboard in headless
// Chromium: messages sent with mosquitto_pub appear in the table and the
// chart; when the network drops, the messages sent meanwhile are replayed
// once it is back, none lost and none twice.
func TestDashboardLiveAndReplay(t *testing.T) {
	chromium := bt.RequireTool(t, "chromium", "chromium")
	mosqPubBin := bt.RequireTool(t, "mosquitto_pub", "mosquitto-clients")
	dir := t.TempDir()
	p := startBeacon(t, filepath.Join(dir, "data"))
	proxy := newCutProxy(t, p.http)
	host, port, _ := net.SplitHostPort(p.mqtt)
	pub := func(topic, msg string) {
		t.Helper()
		if out, err := exec.Command(mosqPubBin, "-h", host, "-p", port, "-q", "1", "-t", topic, "-m", msg).CombinedOutput(); err != nil {
			t.Fatalf("mosquitto_pub: %v %s", err, out)
		}
	}

	ctx := startChromium(t, chromium, dir)
	eval := func(js string) string {
		v, _ := chromedp.Run(ctx, chromedp.Evaluate[string](js))
		return v
	}
	step := func(timeout time.Duration, what string, a chromedp.Action[chromedp.Void]) {
		t.Helper()
		sctx, scancel := context.WithTimeout(ctx, timeout)
		defer scancel()
		if _, err := chromedp.Run(sctx, a); err != nil {
			t.Fatalf("%s: %v (state %q, rows %s)", what, err, eval(`document.getElementById('state').textContent`),
				eval(`String(document.querySelectorAll('#messages tr.msg').length)`))
		}
	}
	rows := func(topic string) string {
		return `document.querySelectorAll('#messages tr.msg[data-topic="` + topic + `"]').length`
	}

	q := url.Values{"topic": {"lab/#"}, "autoconnect": {"1"}}
	step(30*time.Second, "load the dashboard", chromedp.Navigate("http://"+proxy.ln.Addr().String()+"/?"+q.Encode()))
	step(30*time.Second, "the stream live", chromedp.Poll[chromedp.Void](`document.getElementById('state').textContent === 'live'`))

	pub("lab/t1", `{"temp": 21.5, "note": "<img src=x onerror=alert(1)>"}`)
	step(20*time.Second, "the row", chromedp.Poll[chromedp.Void](rows("lab/t1")+` === 1`))
	step(20*time.Second, "the chart", chromedp.Poll[chromedp.Void](`Number(document.querySelector('canvas.chart[data-field="temp"]')?.dataset.points || 0) >= 1`))
	if n := eval(`String(document.querySelectorAll('#messages img').length)`); n != "0" {
		t.Fatalf("a payload was rendered as HTML: %s img elements", n)
	}
	pub("lab/t1", `{"temp": 22.0}`)
	step(20*time.Second, "the chart moves", chromedp.Poll[chromedp.Void](`Number(document.querySelector('canvas.chart[data-field="temp"]').dataset.points) >= 2`))

	// The network drops; three messages are sent meanwhile.
	proxy.cut(true)
	step(20*time.Second, "the page notices", chromedp.Poll[chromedp.Void](`document.getElementById('state').textContent !== 'live'`))
	for i := range 3 {
		pub("lab/gap", `{"temp": `+strconv.Itoa(30+i)+`}`)
	}
	proxy.cut(false) // back: the page resumes from its last event id
	step(60*time.Second, "the gap replayed", chromedp.Poll[chromedp.Void](rows("lab/gap")+` === 3`))
	step(20*time.Second, "live again", chromedp.Poll[chromedp.Void](`document.getElementById('state').textContent === 'live'`))
	if !proxy.sawHeader("Last-Event-ID") && !proxy.sawHeader("Last-Event-Id") {
		// The page may resume by itself with ?last_event_id= instead.
		found := false
		proxy.mu.Lock()
		for _, h := range proxy.heads {
			if bytes.Contains([]byte(h), []byte("last_event_id=")) {
				found = true
			}
		}
		proxy.mu.Unlock()
		if !found {
			t.Error("the reconnect carried no last event id")
		}
	}
	pub("lab/t1", `{"temp": 23.0}`)
	step(20*time.Second, "live after the replay", chromedp.Poll[chromedp.Void](rows("lab/t1")+` === 3`))
	ids := eval(`[...document.querySelectorAll('#messages tr.msg')].map(r => r.dataset.id).join(' ')`)
	seen := map[string]bool{}
	for _, id := range bytes.Fields([]byte(ids)) {
		if seen[string(id)] {
			t.Fatalf("message %s shown twice: %s", id, ids)
		}
		seen[string(id)] = true
	}
	if len(seen) != 6 {
		t.Fatalf("%d rows, want 6: %s", len(seen), ids)
	}
}
