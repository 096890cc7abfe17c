package devices

import (
	"errors"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"
)

// Refusals of a Throttle: the credential was not checked.
var (
	// ErrThrottled: the source address used up its budget of failed
	// authentications; it gets one back every 1/RatePerAddr seconds.
	ErrThrottled = errors.New("too many failed authentications from this address")
	// ErrThrottledGlobal: addresses that failed before used up the
	// broker-wide budget of failed authentications.
	ErrThrottledGlobal = errors.New("too many failed authentications")
	// ErrAddrBanned: the source address failed BanAfter times in a row and
	// is refused until its ban ends.
	ErrAddrBanned = errors.New("address banned after repeated failed authentications")
)

// ThrottleOptions configure NewThrottle. A zero rate disables that limit.
type ThrottleOptions struct {
	// RatePerAddr is how many failed authentications per second a source
	// address regains; Burst is how many it may make at once.
	RatePerAddr float64
	Burst       int
	// RateGlobal bounds, broker-wide, the failed authentications of
	// addresses that have failed before (bursts of BurstGlobal). An
	// address with no failure on record is never refused by it, so a
	// guesser cannot lock out devices elsewhere.
	RateGlobal  float64
	BurstGlobal int
	// BanAfter consecutive failures from an address (no success between,
	// each within BanDuration of the one before) ban it for BanDuration;
	// 0: no bans.
	BanAfter    int
	BanDuration time.Duration
	// MaxAddrs bounds the addresses tracked; default 65,536. Beyond it an
	// untracked address is not limited per address (only globally).
	MaxAddrs int
	Now      func() time.Time // for tests; default time.Now
}

// Throttle limits failed authentication by source address and globally,
// with token buckets that only failures drain: every attempt takes a
// token before its credential is checked and a success gives it back, so
// no more than Burst + RatePerAddr*t attempts of one address reach the
// credential check in t, however many connections it opens at once.
// IPv6 addresses count by their /64. A nil *Throttle limits nothing.
type Throttle struct {
	o      ThrottleOptions
	mu     sync.Mutex
	addrs  map[netip.Addr]*addrState
	global float64 // tokens
	glast  time.Time
	swept  time.Time

	throttled, throttledGlobal, bannedRefused, bans atomic.Int64
}

type addrState struct {
	tokens   float64
	last     time.Time
	failures int       // consecutive
	failed   time.Time // the last failure
	banned   time.Time // refused until then
}

// NewThrottle returns a throttle; with every limit off it returns nil.
func NewThrottle(o ThrottleOptions) *Throttle {
	if o.RatePerAddr <= 0 && o.RateGlobal <= 0 && o.BanAfter <= 0 {
		return nil
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	o.Burst = max(o.Burst, 1)
	o.BurstGlobal = max(o.BurstGlobal, 1)
	if o.MaxAddrs <= 0 {
		o.MaxAddrs = 1 << 16
	}
	if o.BanDuration <= 0 {
		o.BanDuration = 5 * time.Minute
	}
	t := &Throttle{o: o, addrs: map[netip.Addr]*addrState{}, global: float64(o.BurstGlobal)}
	t.glast = o.Now()
	t.swept = t.glast
	return t
}

// Attempt is an authentication admitted by Admit: report how it ended
// with Failed or Succeeded (once; later calls do nothing).
type Attempt struct {
	t      *Throttle
	key    netip.Addr
	st     *addrState // nil: untracked
	global bool       // took a global token
	done   bool
}

// ThrottleKey is the key an address counts under: itself, or its /64
// for IPv6.
func ThrottleKey(a netip.Addr) netip.Addr {
	a = a.Unmap()
	if a.Is6() {
		p, _ := a.Prefix(64)
		return p.Addr()
	}
	return a
}

// AddrOf is the IP address of a connection's remote address.
func AddrOf(a net.Addr) netip.Addr {
	if ta, ok := a.(*net.TCPAddr); ok {
		ip, _ := netip.AddrFromSlice(ta.IP)
		return ip.Unmap()
	}
	if a == nil {
		return netip.Addr{}
	}
	ap, err := netip.ParseAddrPort(a.String())
	if err != nil {
		return netip.Addr{}
	}
	return ap.Addr().Unmap()
}

// Admit decides whether an authentication from addr may check its
// credential. It returns ErrAddrBanned, ErrThrottled or
// ErrThrottledGlobal to refuse it, with how long the caller should wait.
func (t *Throttle) Admit(addr netip.Addr) (*Attempt, time.Duration, error) {
	if t == nil {
		return nil, 0, nil
	}
	key := ThrottleKey(addr)
	now := t.o.Now()
	t.mu.Lock()
	defer t.mu.Unlock()
	t.sweep(now)
	if t.o.RateGlobal > 0 {
		t.global = min(float64(t.o.BurstGlobal), t.global+now.Sub(t.glast).Seconds()*t.o.RateGlobal)
		t.glast = now
	}
	st := t.addrs[key]
	if st == nil && len(t.addrs) < t.o.MaxAddrs {
		st = &addrState{tokens: float64(t.o.Burst), last: now}
		t.addrs[key] = st
	}
	a := &Attempt{t: t, key: key, st: st}
	if st == nil {
		return a, 0, nil
	}
	if now.Before(st.banned) {
		t.bannedRefused.Add(1)
		return nil, st.banned.Sub(now), ErrAddrBanned
	}
	t.refill(st, now)
	if t.o.RatePerAddr > 0 && st.tokens < 1 {
		t.throttled.Add(1)
		return nil, time.Duration((1 - st.tokens) / t.o.RatePerAddr * float64(time.Second)), ErrThrottled
	}
	if t.o.RateGlobal > 0 && st.failures > 0 {
		if t.global < 1 {
			t.throttledGlobal.Add(1)
			return nil, time.Duration((1 - t.global) / t.o.RateGlobal * float64(time.Second)), ErrThrottledGlobal
		}
		t.global--
		a.global = true
	}
	if t.o.RatePerAddr > 0 {
		st.tokens--
	}
	return a, 0, nil
}

// refill gives st the tokens it regained since its last change, and
// forgets its consecutive failures once the last is BanDuration old.
func (t *Throttle) refill(st *addrState, now time.Time) {
	if now.Sub(st.failed) > t.o.BanDuration {
		st.failures = 0
	}
	if t.o.RatePerAddr <= 0 {
		return
	}
	st.tokens = min(float64(t.o.Burst), st.tokens+now.Sub(st.last).Seconds()*t.o.RatePerAddr)
	st.last = now
}

// idle reports whether st holds nothing worth remembering.
func (t *Throttle) idle(st *addrState, now time.Time) bool {
	return !now.Before(st.banned) && st.failures == 0 && (t.o.RatePerAddr <= 0 || st.tokens >= float64(t.o.Burst))
}

// sweep forgets, once a minute, the addresses that are back to a full
// budget with no ban and no recent failure.
func (t *Throttle) sweep(now time.Time) {
	if now.Sub(t.swept) < time.Minute {
		return
	}
	t.swept = now
	for k, st := range t.addrs {
		t.refill(st, now)
		if t.idle(st, now) {
			delete(t.addrs, k)
		}
	}
}

// Failed records that the attempt's credential was wrong: its token stays
// spent, and the address may be banned.
func (a *Attempt) Failed() {
	if a == nil || a.done {
		return
	}
	a.done = true
	t := a.t
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.o.RateGlobal > 0 && !a.global {
		// A first failure is not refused globally, but it counts.
		t.global = max(t.global-1, -float64(t.o.BurstGlobal))
	}
	if a.st == nil {
		return
	}
	a.st.failures++
	a.st.failed = t.o.Now()
	if t.o.BanAfter > 0 && a.st.failures >= t.o.BanAfter {
		a.st.banned = t.o.Now().Add(t.o.BanDuration)
		a.st.failures = 0
		t.bans.Add(1)
	}
}

// Succeeded records a right credential: the tokens are given back and the
// address's consecutive failures forgotten.
func (a *Attempt) Succeeded() {
	if a == nil || a.done {
		return
	}
	a.done = true
	t := a.t
	t.mu.Lock()
	defer t.mu.Unlock()
	if a.global {
		t.global = min(float64(t.o.BurstGlobal), t.global+1)
	}
	if a.st == nil {
		return
	}
	a.st.failures = 0
	if t.o.RatePerAddr > 0 {
		a.st.tokens = min(float64(t.o.Burst), a.st.tokens+1)
	}
}

// ThrottleStats are a throttle's counters.
type ThrottleStats struct {
	Throttled       int64 // refused: the address's budget was spent
	ThrottledGlobal int64 // refused: the global budget was spent
	BannedRefused   int64 // refused: the address was banned
	Bans            int64 // bans imposed
	Banned          int   // addresses banned now
	Tracked         int   // addresses tracked now
}

// Stats returns the counters.
func (t *Throttle) Stats() ThrottleStats {
	if t == nil {
		return ThrottleStats{}
	}
	s := ThrottleStats{Throttled: t.throttled.Load(), ThrottledGlobal: t.throttledGlobal.Load(),
		BannedRefused: t.bannedRefused.Load(), Bans: t.bans.Load()}
	now := t.o.Now()
	t.mu.Lock()
	s.Tracked = len(t.addrs)
	for _, st := range t.addrs {
		if now.Before(st.banned) {
			s.Banned++
		}
	}
	t.mu.Unlock()
	return s
}
