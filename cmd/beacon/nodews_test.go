package main

import (
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	bt "github.com/beaconmq/beacon/broker/brokertest"
)

// TestNodeMQTTJSWithoutOrigin: MQTT.js from Node sends no Origin, which
// the broker admits by default, and round-trips a message over ws://; an
// Origin that is not allowed is refused with 403 naming the key to set.
func TestNodeMQTTJSWithoutOrigin(t *testing.T) {
	node := bt.RequireTool(t, "node", "nodejs")
	if _, err := os.Stat(mqttJS); err != nil {
		msg := "MQTT.js not installed (make test runs npm install in cmd/beacon/testdata/node)"
		if os.Getenv("CI") != "" {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
	p := startBeacon(t, filepath.Join(t.TempDir(), "data"))
	url := "ws://" + p.http + "/mqtt"
	run := func(args ...string) string {
		cmd := exec.Command(node, append([]string{"testdata/mqttjs-ws.js", url}, args...)...)
		cmd.Env = append(cleanEnv(), "NODE_PATH="+filepath.Join("testdata", "node", "node_modules"))
		out, _ := cmd.CombinedOutput()
		return strings.TrimSpace(string(out))
	}
	if got := run(); got != "roundtrip hello from node" {
		t.Fatalf("MQTT.js without Origin: %q", got)
	}
	if got := run("https://evil.example"); !strings.Contains(got, "403") {
		t.Fatalf("MQTT.js with a foreign Origin: %q, want a 403", got)
	}

	// What a foreign origin is told, for WebSocket and SSE alike.
	for _, path := range []string{"/mqtt", "/events?topic=x"} {
		req, _ := http.NewRequest(http.MethodGet, "http://"+p.http+path, nil)
		req.Header.Set("Origin", "https://evil.example")
		req.Header.Set("Connection", "Upgrade")
		req.Header.Set("Upgrade", "websocket")
		req.Header.Set("Sec-WebSocket-Version", "13")
		req.Header.Set("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")
		req.Header.Set("Sec-WebSocket-Protocol", "mqtt")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusForbidden || !strings.Contains(string(body), "http.allowed_origins") ||
			!strings.Contains(string(body), "https://evil.example") {
			t.Errorf("%s with a foreign Origin: %d %q, want 403 naming the origin and http.allowed_origins", path, resp.StatusCode, body)
		}
	}
}
