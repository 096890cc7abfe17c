package main

import (
	"context"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
	"github.com/eclipse/paho.golang/paho"

	bt "github.com/beaconmq/beacon/broker/brokertest"
)

// mqttJS is the MQTT.js browser bundle `make test` installs (npm, never
// committed).
const mqttJS = "testdata/node/node_modules/mqtt/dist/mqtt.min.js"

// TestBrowserMQTTOverWebSocket loads examples/browser-mqtt in headless
// Chromium: MQTT.js connects to the binary over WebSocket from another
// origin (allowed by http.allowed_origins), subscribes, receives what
// mosquitto_pub sends over TCP, and publishes back to a TCP subscriber.
func TestBrowserMQTTOverWebSocket(t *testing.T) {
	chromium := bt.RequireTool(t, "chromium", "chromium")
	mosqPubBin := bt.RequireTool(t, "mosquitto_pub", "mosquitto-clients")
	if _, err := os.Stat(mqttJS); err != nil {
		msg := "MQTT.js not installed (make test runs npm install in cmd/beacon/testdata/node)"
		if os.Getenv("CI") != "" {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}

	// The page is served from its own origin, as a dashboard would be.
	mux := http.NewServeMux()
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		http.ServeFile(w, r, "../../examples/browser-mqtt/index.html")
	})
	mux.HandleFunc("/mqtt.min.js", func(w http.ResponseWriter, r *http.Request) { http.ServeFile(w, r, mqttJS) })
	page := httptest.NewServer(mux)
	defer page.Close()

	dir := t.TempDir()
	conf := filepath.Join(dir, "beacon.yaml")
	writeFile(t, conf, "http:\n  allowed_origins: "+page.URL+"\n")
	p := startBeacon(t, filepath.Join(dir, "data"), "--config", conf)

	back := bt.Dial(t, p.mqtt, &paho.Connect{ClientID: "tcp-side", CleanStart: true})
	back.SubscribeT(t, paho.SubscribeOptions{Topic: "browser/back", QoS: 1})

	ctx := startChromium(t, chromium, dir)
	step := func(timeout time.Duration, what string, a chromedp.Action[chromedp.Void]) {
		t.Helper()
		sctx, scancel := context.WithTimeout(ctx, timeout)
		defer scancel()
		if _, err := chromedp.Run(sctx, a); err != nil {
			status, _ := chromedp.Run(ctx, chromedp.Evaluate[string](`document.getElementById('status').textContent`))
			t.Fatalf("%s: %v (page status %q)", what, err, status)
		}
	}

	q := url.Values{"broker": {"ws://" + p.http + "/mqtt"}, "topic": {"browser/#"}}
	step(20*time.Second, "load the page", chromedp.Navigate(page.URL+"/?"+q.Encode()))
	step(20*time.Second, "MQTT.js subscribed", chromedp.Poll[chromedp.Void](`document.getElementById('status').textContent === 'subscribed'`))

	host, port, _ := net.SplitHostPort(p.mqtt)
	if out, err := exec.Command(mosqPubBin, "-h", host, "-p", port, "-q", "1", "-t", "browser/news", "-m", "<b>hello from mosquitto</b>").CombinedOutput(); err != nil {
		t.Fatalf("mosquitto_pub: %v %s", err, out)
	}
	step(20*time.Second, "the message in the page",
		chromedp.Poll[chromedp.Void](`document.getElementById('log').textContent.includes('browser/news  <b>hello from mosquitto</b>')`))
	// Shown as text: the payload's markup did not become an element.
	n, err := chromedp.Run(ctx, chromedp.Evaluate[int](`document.querySelectorAll('#log b').length`))
	if err != nil || n != 0 {
		t.Fatalf("payload rendered as HTML: %d elements, %v", n, err)
	}

	step(10*time.Second, "publish from the browser",
		chromedp.Evaluate[chromedp.Void](`void client.publish('browser/back', 'from chromium', {qos: 1})`))
	if m := back.WaitMessages(t, 1, 10*time.Second)[0]; string(m.Payload) != "from chromium" {
		t.Fatalf("TCP subscriber got %q", m.Payload)
	}

	// A page from an origin that is not allowed gets nothing: the handshake is refused.
	other := httptest.NewServer(mux)
	defer other.Close()
	step(20*time.Second, "load the page from a foreign origin", chromedp.Navigate(other.URL+"/?"+q.Encode()))
	step(20*time.Second, "the refused page never subscribes",
		chromedp.Poll[chromedp.Void](`['reconnecting','disconnected'].includes(document.getElementById('status').textContent) || document.getElementById('status').textContent.startsWith('error')`))
	if !strings.Contains(p.Logs(), "origin not allowed") {
		t.Fatal("the broker did not log the refused origin")
	}
}

// startChromium starts headless Chromium with its profile in dir, for the
// rest of the test.
func startChromium(t *testing.T, chromium, dir string) context.Context {
	t.Helper()
	actx, cancelAlloc := chromedp.NewExecAllocator(context.Background(),
		chromedp.ExecPath(chromium),
		chromedp.Headless,
		chromedp.NoSandbox,
		chromedp.DisableGPU,
		chromedp.NoFirstRun,
		chromedp.UserDataDir(filepath.Join(dir, "chromium")),
		chromedp.Flag("disable-background-networking", true),
		chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-sync", true),
		chromedp.Flag("disable-quic", true),
	)
	ctx, cancel := chromedp.NewContext(actx)
	t.Cleanup(func() { cancel(); cancelAlloc() })
	// The first Run starts the browser: no timeout on it (see chromedp.Run).
	if err := chromedp.Do(ctx); err != nil {
		t.Fatalf("start chromium: %v", err)
	}
	return ctx
}
