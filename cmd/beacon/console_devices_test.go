package main

import (
	"context"
	"encoding/json"
	"net"
	"net/url"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"

	bt "github.com/beaconmq/beacon/broker/brokertest"
)

// TestConsoleDevices: the console's device page in headless Chromium: a
// device's latest values and charts from the history, then disable,
// rotate (the new secret shown once) and remove.
func TestConsoleDevices(t *testing.T) {
	chromium := bt.RequireTool(t, "chromium", "chromium")
	mosqPubBin := bt.RequireTool(t, "mosquitto_pub", "mosquitto-clients")
	dir := t.TempDir()
	const admin = "console-admin-token-0123456789"
	data := filepath.Join(dir, "data")
	acl := filepath.Join(dir, "acl.yaml")
	writeFile(t, acl, "rules:\n  - subjects: [device]\n    actions: [publish]\n    topics: [\"devices/%u/#\"]\n    effect: allow\n")
	conf := filepath.Join(dir, "beacon.yaml")
	writeFile(t, conf, "storage:\n  dir: "+data+"\nauth:\n  admin_token: "+admin+"\n  acl_file: "+acl+"\n  fail_delay: 0s\n")
	code, out, errOut := runCLI(t, nil, "devices", "add", "sensor-7", "--type", "thermo", "--config", conf, "--json")
	if code != 0 {
		t.Fatalf("devices add: %d %s", code, errOut)
	}
	var added struct{ Secret string }
	if err := json.Unmarshal([]byte(out), &added); err != nil {
		t.Fatal(err)
	}
	p := startBeacon(t, data, "--config", conf)
	host, port, _ := net.SplitHostPort(p.mqtt)
	for i := range 3 {
		if out, err := exec.Command(mosqPubBin, "-h", host, "-p", port, "-u", "sensor-7", "-P", added.Secret, "-q", "1",
			"-t", "devices/sensor-7/telemetry", "-m", `{"temp": `+strconv.Itoa(20+i)+`}`).CombinedOutput(); err != nil {
			t.Fatalf("mosquitto_pub as the device: %v %s", err, out)
		}
	}

	ctx := startChromium(t, chromium, dir)
	eval := func(js string) string {
		v, _ := chromedp.Run(ctx, chromedp.Evaluate[string](js))
		return v
	}
	step := func(what, cond string) {
		t.Helper()
		sctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
		if _, err := chromedp.Run(sctx, chromedp.Poll[chromedp.Void](cond)); err != nil {
			t.Fatalf("%s: %v (notice %q)", what, err, eval(`document.getElementById('notice').textContent`))
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
	row := `#device-list tr.device[data-id="sensor-7"]`
	step("the device listed", `document.querySelector(`+jsString(row)+`) !== null`)
	click(row)
	step("its latest value", `document.querySelector('#device-values tr[data-topic="devices/sensor-7/telemetry"]')?.textContent.includes('22')`)
	step("its chart from the history", `Number(document.querySelector('#device-charts canvas.chart[data-field="temp"]')?.dataset.points || 0) === 3`)

	click(`#device-actions button[data-action="disable"]`)
	step("disabled", `document.querySelector(`+jsString(row+` .badge`)+`)?.textContent === 'disabled'`)
	if _, err := exec.Command(mosqPubBin, "-h", host, "-p", port, "-u", "sensor-7", "-P", added.Secret, "-q", "1",
		"-t", "devices/sensor-7/telemetry", "-m", "{}").CombinedOutput(); err == nil {
		t.Fatal("a disabled device could still publish")
	}
	click(`#device-actions button[data-action="enable"]`)
	step("enabled again", `document.querySelector(`+jsString(row+` .badge`)+`)?.textContent !== 'disabled'`)

	click(`#device-actions button[data-action="rotate-secret"]`)
	click(`#device-actions button[data-action="rotate-secret"]`)
	step("the new secret shown", `!document.getElementById('device-secret').hidden`)
	secret := eval(`document.getElementById('device-secret').textContent`)
	if i := strings.LastIndex(secret, ": "); i < 0 || strings.Contains(secret, added.Secret) {
		t.Fatalf("rotate: %q", secret)
	} else if out, err := exec.Command(mosqPubBin, "-h", host, "-p", port, "-u", "sensor-7", "-P", secret[i+2:], "-q", "1",
		"-t", "devices/sensor-7/telemetry", "-m", `{"temp": 30}`).CombinedOutput(); err != nil {
		t.Fatalf("the rotated secret does not log in: %v %s", err, out)
	}
	step("the live point", `Number(document.querySelector('#device-charts canvas.chart[data-field="temp"]')?.dataset.points || 0) === 4`)

	click(`#device-actions button[data-action="remove"]`)
	click(`#device-actions button[data-action="remove"]`)
	step("removed", `document.querySelector(`+jsString(row)+`) === null`)
}
