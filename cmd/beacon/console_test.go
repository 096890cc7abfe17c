package main

import (
	"context"
	"net/url"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
	"github.com/eclipse/paho.golang/paho"

	bt "github.com/beaconmq/beacon/broker/brokertest"
)

// TestConsoleInBrowser opens the operator console in headless Chromium
// against the built binary: overview cards and rate charts, the clients
// table with a client's subscriptions, a kick (two clicks) that the MQTT
// client sees as DISCONNECT 0x98, and a retained message deleted; a wrong
// token is told why it is refused.
func TestConsoleInBrowser(t *testing.T) {
	chromium := bt.RequireTool(t, "chromium", "chromium")
	dir := t.TempDir()
	const admin = "console-admin-token-0123456789"
	conf := filepath.Join(dir, "beacon.yaml")
	writeFile(t, conf, "auth:\n  admin_token: "+admin+"\n")
	p := startBeacon(t, filepath.Join(dir, "data"), "--config", conf)

	expiry := uint32(600)
	dev := bt.Dial(t, p.mqtt, &paho.Connect{ClientID: "console-dev", KeepAlive: 30, Properties: &paho.ConnectProperties{SessionExpiryInterval: &expiry}})
	dev.SubscribeT(t, paho.SubscribeOptions{Topic: "cons/#", QoS: 1})
	pub := bt.Dial(t, p.mqtt, &paho.Connect{ClientID: "console-pub", CleanStart: true})
	pub.PublishT(t, &paho.Publish{Topic: "cons/r", QoS: 1, Retain: true, Payload: []byte(`{"v": 1, "x": "<b>bold</b>"}`)})
	for range 5 {
		pub.PublishT(t, &paho.Publish{Topic: "cons/t", QoS: 1, Payload: []byte("x")})
	}

	ctx := startChromium(t, chromium, dir)
	eval := func(js string) string {
		v, _ := chromedp.Run(ctx, chromedp.Evaluate[string](js))
		return v
	}
	step := func(timeout time.Duration, what, cond string) {
		t.Helper()
		sctx, cancel := context.WithTimeout(ctx, timeout)
		defer cancel()
		if _, err := chromedp.Run(sctx, chromedp.Poll[chromedp.Void](cond)); err != nil {
			t.Fatalf("%s: %v (state %q, notice %q)", what, err, eval(`document.getElementById('state').textContent`),
				eval(`document.getElementById('notice').textContent`))
		}
	}
	click := func(sel string) {
		t.Helper()
		if got := eval(`(() => { const el = document.querySelector(` + jsString(sel) + `); if (!el) return 'missing'; el.click(); return 'ok'; })()`); got != "ok" {
			t.Fatalf("click %s: %s", sel, got)
		}
	}

	if _, err := chromedp.Run(ctx, chromedp.Navigate("http://"+p.http+"/console.html?"+url.Values{"token": {admin}}.Encode())); err != nil {
		t.Fatal(err)
	}
	step(30*time.Second, "the console live", `document.getElementById('state').textContent === 'live'`)
	if strings.Contains(eval(`location.href`), admin) {
		t.Fatal("the token stayed in the address bar")
	}
	step(20*time.Second, "both clients listed", `document.querySelectorAll('#clients tr.client').length === 2`)
	step(20*time.Second, "the sessions card", `document.querySelector('[data-card="sessions"] dd').textContent === '2'`)
	step(30*time.Second, "the rate chart", `Number(document.querySelector('canvas.chart[data-field="messages per second"]')?.dataset.points || 0) >= 2`)

	click(`#clients tr.client[data-id="console-dev"]`)
	step(20*time.Second, "the client's subscriptions", `document.querySelector('#subscriptions tr[data-filter="cons/#"]') !== null`)

	kick := `#clients tr.client[data-id="console-dev"] button[data-action="kick"]`
	click(kick)
	if eval(`document.querySelector(`+jsString(kick)+`).dataset.armed`) != "true" {
		t.Fatal("the first click did not ask for confirmation")
	}
	if dev.ServerDisconnect() != nil {
		t.Fatal("kicked on the first click")
	}
	click(kick)
	bt.WaitFor(t, 20*time.Second, "the kicked client's DISCONNECT", func() bool { return dev.ServerDisconnect() != nil })
	if rc := dev.ServerDisconnect().ReasonCode; rc != 0x98 {
		t.Fatalf("kicked with 0x%02X, want 0x98", rc)
	}
	step(20*time.Second, "the client shown away", `document.querySelector('#clients tr.client[data-id="console-dev"]')?.dataset.connected === 'false'`)

	row := `#retained tr.retained[data-topic="cons/r"]`
	step(20*time.Second, "the retained message", `document.querySelector(`+jsString(row)+`) !== null`)
	if n := eval(`String(document.querySelectorAll('#retained b').length)`); n != "0" {
		t.Fatal("a payload was rendered as HTML")
	}
	click(row + ` button[data-action="delete"]`)
	click(row + ` button[data-action="delete"]`)
	step(20*time.Second, "the retained message deleted", `document.querySelector(`+jsString(row)+`) === null`)
	r := bt.Dial(t, p.mqtt, &paho.Connect{ClientID: "console-reader", CleanStart: true})
	r.SubscribeT(t, paho.SubscribeOptions{Topic: "cons/r", QoS: 1})
	r.Barrier(t)
	for _, m := range r.Messages() {
		if m.Topic == "cons/r" {
			t.Fatal("the deleted retained message is still delivered")
		}
	}

	if _, err := chromedp.Run(ctx, chromedp.Navigate("http://"+p.http+"/console.html?token=wrong-token")); err != nil {
		t.Fatal(err)
	}
	step(20*time.Second, "a wrong token refused", `document.getElementById('state').textContent === 'not admitted'`)
	if n := eval(`document.getElementById('notice').textContent`); !strings.Contains(n, "auth.admin_token") {
		t.Fatalf("the refusal does not say what is needed: %q", n)
	}
}

// jsString quotes s for JavaScript.
func jsString(s string) string {
	return "'" + strings.NewReplacer(`\`, `\\`, `'`, `\'`).Replace(s) + "'"
}
