package main

import (
	"context"
	"net"
	"net/url"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
	"github.com/eclipse/paho.golang/paho"

	bt "github.com/beaconmq/beacon/broker/brokertest"
)

// TestDashboardChartsStartFromHistory: the charts open with what the
// history recorded before the page was opened (GET /api/v1/history), and
// a message then arriving live is charted once.
func TestDashboardChartsStartFromHistory(t *testing.T) {
	chromium := bt.RequireTool(t, "chromium", "chromium")
	mosqPubBin := bt.RequireTool(t, "mosquitto_pub", "mosquitto-clients")
	dir := t.TempDir()
	p := startBeacon(t, filepath.Join(dir, "data"))
	host, port, _ := net.SplitHostPort(p.mqtt)
	pub := func(msg string) {
		t.Helper()
		if out, err := exec.Command(mosqPubBin, "-h", host, "-p", port, "-q", "1", "-t", "lab/past", "-m", msg).CombinedOutput(); err != nil {
			t.Fatalf("mosquitto_pub: %v %s", err, out)
		}
	}
	for i := range 5 {
		pub(`{"temp": ` + strconv.Itoa(20+i) + `}`)
	}

	ctx := startChromium(t, chromium, dir)
	points := `Number(document.querySelector('canvas.chart[data-field="temp"]')?.dataset.points || 0)`
	poll := func(what, cond string) {
		t.Helper()
		sctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
		if _, err := chromedp.Run(sctx, chromedp.Poll[chromedp.Void](cond)); err != nil {
			v, _ := chromedp.Run(ctx, chromedp.Evaluate[string](`String(`+points+`)`))
			t.Fatalf("%s: %v (points %s)", what, err, v)
		}
	}
	q := url.Values{"topic": {"lab/#"}, "autoconnect": {"1"}}
	if _, err := chromedp.Run(ctx, chromedp.Navigate("http://"+p.http+"/?"+q.Encode())); err != nil {
		t.Fatal(err)
	}
	poll("the stream live", `document.getElementById('state').textContent === 'live'`)
	poll("the chart from the history", points+` === 5`)
	pub(`{"temp": 30}`)
	poll("the live point", points+` === 6`)
	time.Sleep(500 * time.Millisecond) // a duplicate would show up now
	if v, _ := chromedp.Run(ctx, chromedp.Evaluate[string](`String(`+points+`)`)); v != "6" {
		t.Fatalf("%s points after one live message, want 6", v)
	}
}

// TestDashboardFleetChart: more topics than a chart draws lines for (40
// sensors) turn the chart into min, mean and max across all of them, with
// one topic to pick; nothing is left out with a "not charted" note.
func TestDashboardFleetChart(t *testing.T) {
	chromium := bt.RequireTool(t, "chromium", "chromium")
	dir := t.TempDir()
	p := startBeacon(t, filepath.Join(dir, "data"))
	pub := bt.Dial(t, p.mqtt, &paho.Connect{ClientID: "fleet-pub", CleanStart: true})
	for i := range 40 {
		pub.PublishT(t, &paho.Publish{Topic: "fleet/s" + strconv.Itoa(i) + "/telemetry", QoS: 1, Payload: []byte(`{"temp": ` + strconv.Itoa(10+i) + `}`)})
	}
	ctx := startChromium(t, chromium, dir)
	eval := func(js string) string {
		v, _ := chromedp.Run(ctx, chromedp.Evaluate[string](js))
		return v
	}
	poll := func(what, cond string) {
		t.Helper()
		sctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
		if _, err := chromedp.Run(sctx, chromedp.Poll[chromedp.Void](cond)); err != nil {
			t.Fatalf("%s: %v (canvas %s)", what, err, eval(`JSON.stringify(document.querySelector('canvas.chart[data-field="temp"]')?.dataset || {})`))
		}
	}
	q := url.Values{"topic": {"fleet/#"}, "autoconnect": {"1"}}
	if _, err := chromedp.Run(ctx, chromedp.Navigate("http://"+p.http+"/?"+q.Encode())); err != nil {
		t.Fatal(err)
	}
	chart := `document.querySelector('canvas.chart[data-field="temp"]')`
	poll("a fleet chart of all 40", chart+`?.dataset.mode === 'fleet' && `+chart+`.dataset.topics === '40'`)
	if note := eval(`document.getElementById('charts-note').hidden ? '' : document.getElementById('charts-note').textContent`); note != "" {
		t.Fatalf("series left out: %q", note)
	}
	legend := eval(`[...document.querySelectorAll('.chart-card .legend-topic')].map(e => e.textContent).join(',')`)
	if legend != "min,mean,max" {
		t.Fatalf("fleet legend %q, want min,mean,max", legend)
	}
	before := eval(chart + `.dataset.points`)
	eval(`(() => { const s = document.querySelector('.chart-card select.pick'); s.value = 'fleet/s7/telemetry'; s.dispatchEvent(new Event('change')); return 'ok'; })()`)
	poll("the picked topic drawn", `Number(`+chart+`.dataset.points) === `+before+` + 1`)
	pub.PublishT(t, &paho.Publish{Topic: "fleet/s40/telemetry", QoS: 1, Payload: []byte(`{"temp": 99}`)})
	poll("a live 41st topic", chart+`.dataset.topics === '41'`)
	if max := eval(`document.querySelectorAll('.chart-card .legend-value')[2].textContent`); max != "99" {
		t.Fatalf("max after 99 arrived: %q", max)
	}
}

// TestDashboardPresenceNote: a token that may read the data but not the
// presence topics gets the stream, and the device list says which
// subscription is missing.
func TestDashboardPresenceNote(t *testing.T) {
	chromium := bt.RequireTool(t, "chromium", "chromium")
	dir := t.TempDir()
	data := filepath.Join(dir, "data")
	acl := filepath.Join(dir, "acl.yaml")
	writeFile(t, acl, "rules:\n  - subjects: [\"role:viewer\"]\n    actions: [subscribe]\n    topics: [\"lab/#\"]\n    effect: allow\n")
	conf := filepath.Join(dir, "beacon.yaml")
	writeFile(t, conf, "storage:\n  dir: "+data+"\nauth:\n  acl_file: "+acl+"\n  jwt_secret: jwt-secret-0123456789-0123456789-xx\n")
	code, tok, errOut := runCLI(t, nil, "token", "--config", conf, "--sub", "wall", "--role", "viewer", "--ttl", "1h")
	if code != 0 {
		t.Fatalf("token: %d %s", code, errOut)
	}
	p := startBeacon(t, data, "--config", conf)
	ctx := startChromium(t, chromium, dir)
	q := url.Values{"topic": {"lab/#"}, "token": {strings.TrimSpace(tok)}, "autoconnect": {"1"}}
	if _, err := chromedp.Run(ctx, chromedp.Navigate("http://"+p.http+"/?"+q.Encode())); err != nil {
		t.Fatal(err)
	}
	sctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if _, err := chromedp.Run(sctx, chromedp.Poll[chromedp.Void](`document.getElementById('state').textContent === 'live' && `+
		`document.getElementById('devices-note').textContent.includes('$beacon/presence/#')`)); err != nil {
		v, _ := chromedp.Run(ctx, chromedp.Evaluate[string](`document.getElementById('state').textContent + ' | ' + document.getElementById('devices-note').textContent`))
		t.Fatalf("presence note: %v (%s)", err, v)
	}
}

// TestDashboardDecodedValues: packed telemetry with a codec is shown
// decoded beside the raw payload, and charted under the field's unit.
func TestDashboardDecodedValues(t *testing.T) {
	chromium := bt.RequireTool(t, "chromium", "chromium")
	dir := t.TempDir()
	conf := filepath.Join(dir, "beacon.yaml")
	writeFile(t, conf, "codecs:\n  - filter: \"lab/+/packed\"\n    format: packed\n    endian: little\n    fields:\n"+
		"      - {name: temperature, type: int16, scale: 0.01, unit: \"°C\"}\n      - {name: humidity, type: uint8, scale: 0.5}\n")
	p := startBeacon(t, filepath.Join(dir, "data"), "--config", conf)
	ctx := startChromium(t, chromium, dir)
	q := url.Values{"topic": {"lab/#"}, "autoconnect": {"1"}}
	if _, err := chromedp.Run(ctx, chromedp.Navigate("http://"+p.http+"/?"+q.Encode())); err != nil {
		t.Fatal(err)
	}
	poll := func(what, cond string) {
		t.Helper()
		sctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
		if _, err := chromedp.Run(sctx, chromedp.Poll[chromedp.Void](cond)); err != nil {
			v, _ := chromedp.Run(ctx, chromedp.Evaluate[string](`document.querySelector('#messages tbody')?.textContent || ''`))
			t.Fatalf("%s: %v (table %q)", what, err, v)
		}
	}
	poll("live", `document.getElementById('state').textContent === 'live'`)
	pub := bt.Dial(t, p.mqtt, &paho.Connect{ClientID: "packed-pub", CleanStart: true})
	pub.PublishT(t, &paho.Publish{Topic: "lab/t1/packed", QoS: 1, Payload: []byte{0x6d, 0x08, 0x5b}}) // 21.57 °C, 45.5
	poll("the decoded row", `document.querySelector('#messages td.payload[data-decoded="true"]')?.firstChild?.textContent === '{"humidity":45.5,"temperature":21.57}'`)
	poll("the raw payload beside it", `document.querySelector('#messages td.payload .raw')?.textContent.startsWith('base64: bQhb')`)
	poll("the chart with its unit", `document.querySelector('canvas.chart[data-field="temperature (°C)"]') !== null && document.querySelector('canvas.chart[data-field="humidity"]') !== null`)
}
