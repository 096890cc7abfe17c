package bridge

import (
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"strings"
	"sync"
	"time"
)

// Guard holds what every browser endpoint checks before it does anything:
// the Origin allow-list, the real client address behind trusted proxies,
// and per-address connection and handshake limits. One Guard is shared by
// the WebSocket and SSE bridges, so its limits count both.
type Guard struct {
	origins        map[string]bool // "scheme://host[:port]", lower case
	allowMissing   bool
	trusted        []netip.Prefix
	maxConnsPerIP  int
	rate           float64 // handshakes per second per address
	burst          float64
	mu             sync.Mutex
	conns          map[netip.Addr]int
	buckets        map[netip.Addr]*bucket
	lastBucketScan time.Time
}

type bucket struct {
	tokens float64
	last   time.Time
}

// GuardOptions configures NewGuard.
type GuardOptions struct {
	AllowedOrigins     []string // e.g. https://dash.example.com; same-origin requests are always allowed
	AllowMissingOrigin bool     // admit requests without Origin (non-browser clients)
	TrustedProxies     []string // IPs or CIDRs whose X-Forwarded-For / Forwarded is believed
	MaxConnsPerIP      int      // 0: unlimited
	HandshakesPerSec   float64  // 0: unlimited
	HandshakeBurst     int
}

// NewGuard validates opts.
func NewGuard(o GuardOptions) (*Guard, error) {
	g := &Guard{origins: map[string]bool{}, allowMissing: o.AllowMissingOrigin, maxConnsPerIP: o.MaxConnsPerIP,
		rate: o.HandshakesPerSec, burst: float64(max(o.HandshakeBurst, 1)),
		conns: map[netip.Addr]int{}, buckets: map[netip.Addr]*bucket{}}
	for _, o := range o.AllowedOrigins {
		u, err := url.Parse(o)
		if err != nil || u.Scheme == "" || u.Host == "" || (u.Path != "" && u.Path != "/") {
			return nil, fmt.Errorf("allowed origin %q is not scheme://host[:port]", o)
		}
		g.origins[strings.ToLower(u.Scheme+"://"+u.Host)] = true
	}
	for _, p := range o.TrustedProxies {
		if !strings.Contains(p, "/") {
			a, err := netip.ParseAddr(p)
			if err != nil {
				return nil, fmt.Errorf("trusted proxy %q is not an IP or CIDR", p)
			}
			g.trusted = append(g.trusted, netip.PrefixFrom(a, a.BitLen()))
			continue
		}
		pre, err := netip.ParsePrefix(p)
		if err != nil {
			return nil, fmt.Errorf("trusted proxy %q is not an IP or CIDR", p)
		}
		g.trusted = append(g.trusted, pre.Masked())
	}
	return g, nil
}

// CheckOrigin reports whether a browser request may proceed: no Origin
// (only when allowed), one on the allow-list, or the same origin as the
// request's host when that host is an IP address or localhost. This is the
// defence against cross-site WebSocket hijacking: a page elsewhere cannot
// use a visitor's cookies here. Same-origin under a DNS name is not taken
// on trust, because of DNS rebinding: a hostile page at evil.example:8080
// whose name is made to resolve to 127.0.0.1 sends a Host that matches its
// Origin. A dashboard served under a name goes in http.allowed_origins.
func (g *Guard) CheckOrigin(r *http.Request) bool {
	origin := r.Header.Get("Origin")
	if origin == "" {
		return g.allowMissing
	}
	u, err := url.Parse(origin)
	if err != nil || u.Host == "" {
		return false
	}
	if g.origins[strings.ToLower(u.Scheme+"://"+u.Host)] {
		return true
	}
	return strings.EqualFold(u.Host, r.Host) && literalHost(r.Host)
}

// OriginRefusal is the answer to a request CheckOrigin refused: what was
// wrong and the key that changes it.
func (g *Guard) OriginRefusal(r *http.Request) string {
	origin := r.Header.Get("Origin")
	if origin == "" {
		return "no Origin header: set http.allow_missing_origin: true to admit non-browser clients"
	}
	return fmt.Sprintf("origin %q not allowed: add it to http.allowed_origins", origin)
}

// SameSite reports whether a request authenticated by cookie comes from a
// page Beacon trusts: the browser says same-origin, or the Origin passes
// CheckOrigin. Browsers send the cookie with cross-site forms too.
func (g *Guard) SameSite(r *http.Request) bool {
	if r.Header.Get("Sec-Fetch-Site") == "same-origin" {
		return true
	}
	return r.Header.Get("Origin") != "" && g.CheckOrigin(r)
}

// literalHost reports whether host[:port] names an IP address or localhost,
// which DNS cannot rebind.
func literalHost(hostport string) bool {
	h := hostport
	if host, _, err := net.SplitHostPort(hostport); err == nil {
		h = host
	}
	h = strings.Trim(h, "[]")
	if strings.EqualFold(h, "localhost") {
		return true
	}
	_, err := netip.ParseAddr(h)
	return err == nil
}

func (g *Guard) isTrusted(a netip.Addr) bool {
	for _, p := range g.trusted {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

// ClientAddr is the address of the client behind the request: the peer,
// or, when the peer is a trusted proxy, the last address before the
// trusted ones in X-Forwarded-For (or Forwarded: for=).
func (g *Guard) ClientAddr(r *http.Request) netip.AddrPort {
	peer, err := netip.ParseAddrPort(r.RemoteAddr)
	if err != nil {
		return netip.AddrPort{}
	}
	peer = netip.AddrPortFrom(peer.Addr().Unmap(), peer.Port())
	if !g.isTrusted(peer.Addr()) {
		return peer
	}
	var hops []string
	if xff := r.Header.Values("X-Forwarded-For"); len(xff) > 0 {
		for _, v := range xff {
			hops = append(hops, strings.Split(v, ",")...)
		}
	} else {
		for _, v := range r.Header.Values("Forwarded") {
			for _, elem := range strings.Split(v, ",") {
				for _, pair := range strings.Split(elem, ";") {
					k, val, ok := strings.Cut(strings.TrimSpace(pair), "=")
					if ok && strings.EqualFold(k, "for") {
						hops = append(hops, strings.Trim(val, `"`))
					}
				}
			}
		}
	}
	for i := len(hops) - 1; i >= 0; i-- {
		h := strings.TrimSpace(hops[i])
		a, err := netip.ParseAddr(strings.Trim(h, "[]"))
		if err != nil {
			ap, err2 := netip.ParseAddrPort(h) // "1.2.3.4:80", "[::1]:80"
			if err2 != nil {
				break // garbage: stop at the last address we can trust
			}
			a = ap.Addr()
		}
		a = a.Unmap()
		if !g.isTrusted(a) {
			return netip.AddrPortFrom(a, 0)
		}
	}
	return peer
}

// The reasons Admit refuses with, and their metric labels (RefusalLabel).
const (
	RefusedHandshakeRate = "too many handshakes from this address"  // http.handshakes_per_second
	RefusedConnsPerAddr  = "too many connections from this address" // http.max_conns_per_ip
)

// RefusalLabel is the metric label of a reason Admit refused with:
// "handshake_rate" or "connections_per_address".
func RefusalLabel(reason string) string {
	if reason == RefusedHandshakeRate {
		return "handshake_rate"
	}
	return "connections_per_address"
}

// Admit counts a new connection from addr, or refuses it with the HTTP
// status to answer: 429 when the address has too many connections or
// handshakes. The returned release must be called when the connection ends.
func (g *Guard) Admit(addr netip.Addr) (release func(), status int, reason string) {
	now := time.Now()
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.rate > 0 {
		b := g.buckets[addr]
		if b == nil {
			b = &bucket{tokens: g.burst, last: now}
			g.buckets[addr] = b
		}
		b.tokens = min(g.burst, b.tokens+now.Sub(b.last).Seconds()*g.rate)
		b.last = now
		if b.tokens < 1 {
			return nil, http.StatusTooManyRequests, RefusedHandshakeRate
		}
		b.tokens--
		if now.Sub(g.lastBucketScan) > time.Minute { // forget idle addresses
			g.lastBucketScan = now
			for a, bk := range g.buckets {
				if now.Sub(bk.last).Seconds()*g.rate >= g.burst {
					delete(g.buckets, a)
				}
			}
		}
	}
	if g.maxConnsPerIP > 0 && g.conns[addr] >= g.maxConnsPerIP {
		return nil, http.StatusTooManyRequests, RefusedConnsPerAddr
	}
	g.conns[addr]++
	var once sync.Once
	return func() {
		once.Do(func() {
			g.mu.Lock()
			if g.conns[addr]--; g.conns[addr] <= 0 {
				delete(g.conns, addr)
			}
			g.mu.Unlock()
		})
	}, 0, ""
}

// tcpAddr turns an AddrPort into a net.Addr, a connection's RemoteAddr.
func tcpAddr(a netip.AddrPort) net.Addr { return net.TCPAddrFromAddrPort(a) }
