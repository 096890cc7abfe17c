package broker_test

import (
	"fmt"
	"net/http"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/beaconmq/beacon/broker"
	bt "github.com/beaconmq/beacon/broker/brokertest"
)

// 200 parallel wrong-password connections from one address: only the
// burst (plus what the rate gives back meanwhile) reach the credential
// check; the rest get CONNACK 0x9F without it. A device with its secret
// from another address (127.0.0.2) connects meanwhile.
func TestAuthThrottlePerAddress(t *testing.T) {
	const burst, rate = 5, 0.01
	e := startAuth(t, func(c *broker.Config) {
		c.Auth.FailRatePerIP, c.Auth.FailBurst, c.Auth.BanAfter = rate, burst, 0
		c.Auth.FailRateGlobal = 0
	})
	start := time.Now()
	var wg sync.WaitGroup
	var throttled, bad, other atomic.Int64
	for i := range 200 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := bt.TryDial(e.addr, creds(fmt.Sprintf("guess-%d", i), "d1", "wrong"))
			switch {
			case err == nil:
				other.Add(1)
				_ = c.Disconnect(&paho.Disconnect{})
			case c != nil && c.Connack != nil && c.Connack.ReasonCode == 0x9F:
				throttled.Add(1)
			case c != nil && c.Connack != nil && c.Connack.ReasonCode == 0x86:
				bad.Add(1)
			default:
				other.Add(1)
				t.Logf("guess %d: %v", i, err)
			}
		}()
	}
	// During the storm, the right secret from another address gets in.
	bt.WaitFor(t, 20*time.Second, "the first throttled guesses", func() bool { return e.b.Stats().Auth.Throttle.Throttled > 0 })
	ok, err := bt.TryDialFrom("127.0.0.2", e.addr, creds("good", "d2", e.dev2))
	if err != nil {
		t.Fatalf("device d2 from 127.0.0.2 during the storm: %v", err)
	}
	_ = ok.Disconnect(&paho.Disconnect{})
	wg.Wait()
	elapsed := time.Since(start)

	st := e.b.Stats().Auth
	allowed := burst + int64(rate*elapsed.Seconds()) + 1
	if st.Checked-1 > allowed { // one check was d2's
		t.Fatalf("%d wrong-password attempts reached the credential check in %s, want at most %d (burst %d + %.2f/s)",
			st.Checked-1, elapsed, allowed, burst, rate)
	}
	if bad.Load() != st.Checked-1 || throttled.Load()+bad.Load() != 200 || other.Load() != 0 {
		t.Fatalf("CONNACKs: %d 0x86, %d 0x9F, %d other; %d checks", bad.Load(), throttled.Load(), other.Load(), st.Checked)
	}
	if st.Throttle.Throttled != throttled.Load() {
		t.Fatalf("throttled counter %d, %d refused", st.Throttle.Throttled, throttled.Load())
	}
	// The same address with the right secret is throttled too while its
	// budget is spent (the credential is not checked), as 0x05 for 3.1.1.
	r := bt.DialRaw(t, e.addr, 4)
	r.Send(t, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect},
		Connect: packets.ConnectParams{ProtocolName: []byte("MQTT"), Clean: true, ClientIdentifier: "v3",
			UsernameFlag: true, Username: []byte("d1"), PasswordFlag: true, Password: []byte(e.dev), Keepalive: 30}})
	if ack := r.Expect(t, packets.Connack); ack.ReasonCode != 0x05 {
		t.Fatalf("3.1.1 CONNACK 0x%02x, want 0x05", ack.ReasonCode)
	}
	_, body := scrape(t, "http://"+e.b.HTTPAddr()+"/metrics", adminToken)
	if v := metric(t, body, `beacon_auth_throttled_total{reason="address"}`); v != float64(throttled.Load()+1) {
		t.Fatalf(`beacon_auth_throttled_total{reason="address"} = %v, want %d`, v, throttled.Load()+1)
	}
}

// After ban_after failures in a row an address is banned: CONNACK 0x8A,
// even with the right secret; other addresses are not.
func TestAuthBan(t *testing.T) {
	e := startAuth(t, func(c *broker.Config) {
		c.Auth.FailRatePerIP, c.Auth.FailBurst = 100, 100
		c.Auth.BanAfter, c.Auth.BanDuration = 3, time.Hour
	})
	for i := range 3 {
		c, err := bt.TryDial(e.addr, creds("g", "d1", "wrong"))
		if err == nil || c.Connack == nil || c.Connack.ReasonCode != 0x86 {
			t.Fatalf("failure %d: %v", i, err)
		}
	}
	c, err := bt.TryDial(e.addr, creds("g", "d1", e.dev))
	if err == nil || c.Connack == nil || c.Connack.ReasonCode != 0x8A {
		t.Fatalf("banned address with the right secret: %v (connack %+v), want 0x8A", err, c.Connack)
	}
	ok, err := bt.TryDialFrom("127.0.0.2", e.addr, creds("good", "d1", e.dev))
	if err != nil {
		t.Fatalf("another address: %v", err)
	}
	_ = ok.Disconnect(&paho.Disconnect{})
	// The HTTP bridges share the throttle: the banned address gets 429.
	req, _ := http.NewRequest("GET", "http://"+e.b.HTTPAddr()+"/api/v1/retained?topic=%23", nil)
	req.SetBasicAuth("d1", e.dev)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	_ = resp.Body.Close()
	if resp.StatusCode != http.StatusTooManyRequests || resp.Header.Get("Retry-After") == "" {
		t.Fatalf("REST from the banned address: %d (Retry-After %q), want 429", resp.StatusCode, resp.Header.Get("Retry-After"))
	}
	st := e.b.Stats().Auth.Throttle
	if st.Bans != 1 || st.Banned != 1 || st.BannedRefused != 2 {
		t.Fatalf("throttle stats %+v", st)
	}
	_, body := scrape(t, "http://"+e.b.HTTPAddr()+"/metrics", adminToken)
	for name, want := range map[string]float64{`beacon_auth_throttled_total{reason="banned"}`: 2, `beacon_auth_bans_total`: 1, `beacon_auth_banned_addresses`: 1} {
		if v := metric(t, body, name); v != want {
			t.Errorf("%s = %v, want %v", name, v, want)
		}
	}
}

// Wrong credentials over HTTP Basic drain the same budget as MQTT's.
func TestAuthThrottleHTTP(t *testing.T) {
	e := startAuth(t, func(c *broker.Config) {
		c.Auth.FailRatePerIP, c.Auth.FailBurst, c.Auth.BanAfter = 0.01, 3, 0
	})
	var codes []int
	for range 5 {
		req, _ := http.NewRequest("GET", "http://"+e.b.HTTPAddr()+"/api/v1/retained?topic=%23", nil)
		req.SetBasicAuth("d1", "wrong")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		_ = resp.Body.Close()
		codes = append(codes, resp.StatusCode)
	}
	if fmt.Sprint(codes) != "[401 401 401 429 429]" {
		t.Fatalf("statuses %v, want 3 x 401 then 429", codes)
	}
	c, err := bt.TryDial(e.addr, creds("g", "d1", e.dev))
	if err == nil || c.Connack == nil || c.Connack.ReasonCode != 0x9F {
		t.Fatalf("MQTT after the HTTP guesses: %v, want 0x9F", err)
	}
}
