package main

import (
	"context"
	"net"
	"net/url"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/chromedp/chromedp"

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
