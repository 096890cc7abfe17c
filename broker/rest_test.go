package broker_test

import (
	"bytes"
	"encoding/json"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"

	bt "github.com/beaconmq/beacon/broker/brokertest"
)

func post(t *testing.T, url, contentType string, body []byte, h http.Header) (int, map[string]any) {
	t.Helper()
	req, _ := http.NewRequest("POST", url, bytes.NewReader(body))
	req.Header.Set("Content-Type", contentType)
	for k, v := range h {
		req.Header[k] = v
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	out := map[string]any{}
	_ = json.NewDecoder(resp.Body).Decode(&out)
	return resp.StatusCode, out
}

func TestRESTPublishAndRetained(t *testing.T) {
	b, addr := startBroker(t, nil)
	sub := bt.Dial(t, addr, &paho.Connect{ClientID: "rest-sub", CleanStart: true})
	sub.SubscribeT(t, paho.SubscribeOptions{Topic: "rest/#", QoS: 1})
	base := "http://" + b.HTTPAddr() + "/api/v1"

	if code, body := post(t, base+"/publish", "application/json",
		[]byte(`{"topic":"rest/json","payload":"{\"t\":21.5}","qos":1,"retain":true}`), nil); code != 200 {
		t.Fatalf("JSON publish: %d %v", code, body)
	}
	if code, body := post(t, base+"/publish?topic=rest/bin&qos=1&retain=true", "application/octet-stream", []byte{0, 1, 0xff}, nil); code != 200 {
		t.Fatalf("raw publish: %d %v", code, body)
	}
	if code, _ := post(t, base+"/publish", "application/json",
		[]byte(`{"topic":"rest/b64","payload_base64":"aGVsbG8=","retain":true}`), nil); code != 200 {
		t.Fatalf("base64 publish: %d", code)
	}
	msgs := sub.WaitMessages(t, 3, 5*time.Second)
	got := map[string][]byte{}
	for _, m := range msgs {
		got[m.Topic] = m.Payload
	}
	if string(got["rest/json"]) != `{"t":21.5}` || !bytes.Equal(got["rest/bin"], []byte{0, 1, 0xff}) || string(got["rest/b64"]) != "hello" {
		t.Fatalf("delivered: %q", got)
	}

	resp, err := http.Get(base + "/retained?topic=rest/%23")
	if err != nil {
		t.Fatal(err)
	}
	var list struct {
		Messages []struct {
			Topic, Encoding string
			Payload         json.RawMessage
			Retain          bool
		}
	}
	_ = json.NewDecoder(resp.Body).Decode(&list)
	resp.Body.Close()
	enc := map[string]string{}
	for _, m := range list.Messages {
		enc[m.Topic] = m.Encoding + " " + string(m.Payload)
	}
	want := map[string]string{"rest/json": `json {"t":21.5}`, "rest/bin": `base64 "AAH/"`, "rest/b64": `utf8 "hello"`}
	for k, v := range want {
		if enc[k] != v {
			t.Errorf("retained %s: %q, want %q", k, enc[k], v)
		}
	}

	for _, tc := range []struct {
		name, ct, url string
		body          string
		code          int
		field         string
	}{
		{"wildcard topic", "application/json", "/publish", `{"topic":"rest/#","payload":"x"}`, 400, "topic"},
		{"server topic", "application/json", "/publish", `{"topic":"$SYS/x","payload":"x"}`, 400, "topic"},
		{"bad qos", "application/octet-stream", "/publish?topic=a&qos=3", "x", 400, "qos"},
		{"both payloads", "application/json", "/publish", `{"topic":"a","payload":"x","payload_base64":"eA=="}`, 400, "payload"},
		{"unknown field", "application/json", "/publish", `{"topic":"a","colour":1}`, 400, "colour"},
		{"too large", "application/octet-stream", "/publish?topic=a", strings.Repeat("x", 2<<20), 413, ""},
	} {
		code, body := post(t, base+tc.url, tc.ct, []byte(tc.body), nil)
		if code != tc.code || (tc.field != "" && body["field"] != tc.field) {
			t.Errorf("%s: %d %v, want %d naming %q", tc.name, code, body, tc.code, tc.field)
		}
	}
	if code, _ := post(t, base+"/publish", "application/json", []byte(`{"topic":"rest/x","payload":"x"}`),
		http.Header{"Origin": {"https://evil.example"}}); code != 403 {
		t.Errorf("cross-site publish: %d, want 403", code)
	}
}

func TestRESTUnderAuthorization(t *testing.T) {
	e := startAuth(t, nil)
	base := "http://" + e.b.HTTPAddr() + "/api/v1"
	ops := bt.Dial(t, e.addr, creds("ops", "", token(t, "ops", "ops", time.Hour, nil, nil)))
	ops.SubscribeT(t, paho.SubscribeOptions{Topic: "devices/#", QoS: 1})
	basic := func(id, secret string) http.Header {
		req, _ := http.NewRequest("GET", "/", nil)
		req.SetBasicAuth(id, secret)
		return req.Header
	}
	bearer := func(tok string) http.Header { return http.Header{"Authorization": {"Bearer " + tok}} }
	for _, tc := range []struct {
		name  string
		h     http.Header
		topic string
		code  int
	}{
		{"nobody", nil, "devices/d1/t", 401},
		{"device on its topic", basic("d1", e.dev), "devices/d1/t", 200},
		{"device on another's topic", basic("d1", e.dev), "devices/d2/t", 403},
		{"wrong secret", basic("d1", "nope"), "devices/d1/t", 401},
		{"disabled device", basic("off", e.disabled), "devices/off/t", 403},
		{"viewer token", bearer(token(t, "v", "viewer", time.Hour, nil, nil)), "devices/d1/t", 403},
		{"bad token", bearer("eyJx.y.z"), "devices/d1/t", 401},
	} {
		if code, body := post(t, base+"/publish", "application/json", []byte(`{"topic":"`+tc.topic+`","payload":"21","qos":1}`), tc.h); code != tc.code {
			t.Errorf("%s: %d %v, want %d", tc.name, code, body, tc.code)
		}
	}
	if m := ops.WaitMessages(t, 1, 5*time.Second); len(m) != 1 || m[0].Topic != "devices/d1/t" {
		t.Fatalf("delivered: %v", m)
	}
	// The thermostat's payload limit applies over HTTP too.
	if code, _ := post(t, base+"/publish", "application/json", []byte(`{"topic":"devices/d1/t","payload":"`+strings.Repeat("x", 17)+`"}`), basic("d1", e.dev)); code != 413 {
		t.Errorf("oversize payload for the device type: %d, want 413", code)
	}
	// Retained listing shows only what the caller could receive.
	ops.PublishT(t, &paho.Publish{Topic: "devices/d2/secrets/pin", QoS: 1, Retain: true, Payload: []byte("1234")})
	ops.PublishT(t, &paho.Publish{Topic: "devices/d2/state", QoS: 1, Retain: true, Payload: []byte("on")})
	ops.Barrier(t)
	req, _ := http.NewRequest("GET", base+"/retained?topic=devices/%23", nil)
	req.Header = bearer(token(t, "v", "viewer", time.Hour, nil, nil))
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	var list struct{ Messages []struct{ Topic string } }
	_ = json.NewDecoder(resp.Body).Decode(&list)
	resp.Body.Close()
	if len(list.Messages) != 1 || list.Messages[0].Topic != "devices/d2/state" {
		t.Fatalf("retained for a viewer: %+v", list.Messages)
	}
}
