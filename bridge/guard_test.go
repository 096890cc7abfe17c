package bridge

import (
	"net/http"
	"net/http/httptest"
	"testing"
)

func TestClientAddr(t *testing.T) {
	g, err := NewGuard(GuardOptions{TrustedProxies: []string{"10.0.0.0/8", "127.0.0.1"}})
	if err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name, peer string
		header     http.Header
		want       string
	}{
		{"untrusted peer: headers ignored", "192.0.2.1:5000", http.Header{"X-Forwarded-For": {"203.0.113.9"}}, "192.0.2.1"},
		{"trusted peer, one hop", "127.0.0.1:5000", http.Header{"X-Forwarded-For": {"203.0.113.9"}}, "203.0.113.9"},
		{"spoofed left entries are skipped", "10.1.2.3:5000", http.Header{"X-Forwarded-For": {"1.1.1.1, 203.0.113.9, 10.9.9.9"}}, "203.0.113.9"},
		{"several header lines", "127.0.0.1:1", http.Header{"X-Forwarded-For": {"1.1.1.1", "198.51.100.4"}}, "198.51.100.4"},
		{"Forwarded", "127.0.0.1:1", http.Header{"Forwarded": {`for=192.0.2.60;proto=http;by=203.0.113.43`}}, "192.0.2.60"},
		{"Forwarded IPv6", "127.0.0.1:1", http.Header{"Forwarded": {`for="[2001:db8:cafe::17]:4711"`}}, "2001:db8:cafe::17"},
		{"garbage stops at the peer", "127.0.0.1:1", http.Header{"X-Forwarded-For": {"not-an-ip"}}, "127.0.0.1"},
		{"only trusted hops", "127.0.0.1:1", http.Header{"X-Forwarded-For": {"10.0.0.1"}}, "127.0.0.1"},
	}
	for _, tc := range cases {
		r := httptest.NewRequest("GET", "/mqtt", nil)
		r.RemoteAddr = tc.peer
		r.Header = tc.header
		if got := g.ClientAddr(r).Addr().String(); got != tc.want {
			t.Errorf("%s: %s, want %s", tc.name, got, tc.want)
		}
	}
}

func TestCheckOrigin(t *testing.T) {
	g, err := NewGuard(GuardOptions{AllowedOrigins: []string{"https://Dash.Example.com"}})
	if err != nil {
		t.Fatal(err)
	}
	for origin, want := range map[string]bool{
		"":                              false, // only with AllowMissingOrigin
		"https://dash.example.com":      true,
		"http://dash.example.com":       false, // scheme matters
		"https://dash.example.com:8443": false,
		"http://broker.local:8080":      false, // same origin, but a DNS name: could be rebound
		"https://evil.example":          false,
		"null":                          false,
	} {
		r := httptest.NewRequest("GET", "http://broker.local:8080/mqtt", nil)
		if origin != "" {
			r.Header.Set("Origin", origin)
		}
		if got := g.CheckOrigin(r); got != want {
			t.Errorf("Origin %q: %v, want %v", origin, got, want)
		}
	}
	for host, want := range map[string]bool{"127.0.0.1:8080": true, "[::1]:8080": true, "localhost:8080": true, "evil.example:8080": false} {
		r := httptest.NewRequest("GET", "http://"+host+"/mqtt", nil)
		r.Header.Set("Origin", "http://"+host)
		if got := g.CheckOrigin(r); got != want {
			t.Errorf("same origin %s: %v, want %v", host, got, want)
		}
	}
	if _, err := NewGuard(GuardOptions{AllowedOrigins: []string{"dash.example.com"}}); err == nil {
		t.Error("an origin without a scheme was accepted")
	}
	if _, err := NewGuard(GuardOptions{TrustedProxies: []string{"10.0.0.0/33"}}); err == nil {
		t.Error("a bad CIDR was accepted")
	}
}

func TestAdmitLimits(t *testing.T) {
	g, _ := NewGuard(GuardOptions{MaxConnsPerIP: 2, HandshakesPerSec: 1000, HandshakeBurst: 1000})
	a := httptest.NewRequest("GET", "/", nil)
	a.RemoteAddr = "192.0.2.1:1"
	addr := g.ClientAddr(a).Addr()
	r1, _, _ := g.Admit(addr)
	r2, _, _ := g.Admit(addr)
	if r1 == nil || r2 == nil {
		t.Fatal("two connections refused")
	}
	if r, code, _ := g.Admit(addr); r != nil || code != 429 {
		t.Fatalf("third connection: %d", code)
	}
	r1()
	r1() // idempotent
	if r, _, _ := g.Admit(addr); r == nil {
		t.Fatal("a released slot was not reusable")
	}
	h, _ := NewGuard(GuardOptions{HandshakesPerSec: 1, HandshakeBurst: 2})
	for i := range 2 {
		if r, _, _ := h.Admit(addr); r == nil {
			t.Fatalf("handshake %d within the burst refused", i)
		}
	}
	if r, code, _ := h.Admit(addr); r != nil || code != 429 {
		t.Fatalf("handshake beyond the burst: %d", code)
	}
}
