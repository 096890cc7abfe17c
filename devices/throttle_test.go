package devices

import (
	"errors"
	"net/netip"
	"sync"
	"testing"
	"time"
)

type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *fakeClock) now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) add(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

var (
	addrA = netip.MustParseAddr("192.0.2.1")
	addrB = netip.MustParseAddr("192.0.2.2")
)

func TestThrottlePerAddress(t *testing.T) {
	clk := &fakeClock{t: time.Unix(1000, 0)}
	th := NewThrottle(ThrottleOptions{RatePerAddr: 1, Burst: 3, Now: clk.now})
	for i := range 3 {
		a, _, err := th.Admit(addrA)
		if err != nil {
			t.Fatalf("attempt %d refused: %v", i, err)
		}
		a.Failed()
	}
	if _, wait, err := th.Admit(addrA); !errors.Is(err, ErrThrottled) || wait <= 0 || wait > time.Second {
		t.Fatalf("4th failure: %v, wait %s; want ErrThrottled within 1s", err, wait)
	}
	// Another address is unaffected, and successes cost nothing.
	for range 10 {
		a, _, err := th.Admit(addrB)
		if err != nil {
			t.Fatalf("other address refused: %v", err)
		}
		a.Succeeded()
	}
	clk.add(time.Second)
	a, _, err := th.Admit(addrA)
	if err != nil {
		t.Fatalf("after 1s: %v, want one attempt back", err)
	}
	a.Failed()
	if _, _, err := th.Admit(addrA); !errors.Is(err, ErrThrottled) {
		t.Fatalf("second attempt after 1s: %v, want ErrThrottled", err)
	}
	if s := th.Stats(); s.Throttled != 2 {
		t.Fatalf("stats %+v, want 2 throttled", s)
	}
}

// Parallel attempts each take a token before the check: no more than the
// burst reach it, however many arrive at once.
func TestThrottleParallel(t *testing.T) {
	clk := &fakeClock{t: time.Unix(1000, 0)}
	th := NewThrottle(ThrottleOptions{RatePerAddr: 1, Burst: 5, Now: clk.now})
	var mu sync.Mutex
	var admitted []*Attempt
	var wg sync.WaitGroup
	for range 200 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if a, _, err := th.Admit(addrA); err == nil {
				mu.Lock()
				admitted = append(admitted, a)
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	if len(admitted) != 5 {
		t.Fatalf("%d of 200 parallel attempts admitted, want the burst of 5", len(admitted))
	}
}

func TestThrottleBan(t *testing.T) {
	clk := &fakeClock{t: time.Unix(1000, 0)}
	th := NewThrottle(ThrottleOptions{RatePerAddr: 100, Burst: 100, BanAfter: 4, BanDuration: time.Minute, Now: clk.now})
	for range 3 {
		a, _, _ := th.Admit(addrA)
		a.Failed()
	}
	a, _, _ := th.Admit(addrA)
	a.Succeeded() // a success in between: the count starts again
	for i := range 4 {
		a, _, err := th.Admit(addrA)
		if err != nil {
			t.Fatalf("failure %d refused: %v", i, err)
		}
		a.Failed()
	}
	_, wait, err := th.Admit(addrA)
	if !errors.Is(err, ErrAddrBanned) || wait != time.Minute {
		t.Fatalf("after 4 failures in a row: %v, wait %s; want ErrAddrBanned for 1m", err, wait)
	}
	if s := th.Stats(); s.Bans != 1 || s.Banned != 1 || s.BannedRefused != 1 {
		t.Fatalf("stats %+v", s)
	}
	clk.add(time.Minute)
	if _, _, err := th.Admit(addrA); err != nil {
		t.Fatalf("after the ban: %v", err)
	}
}

// The global budget refuses only addresses that failed before.
func TestThrottleGlobal(t *testing.T) {
	clk := &fakeClock{t: time.Unix(1000, 0)}
	th := NewThrottle(ThrottleOptions{RatePerAddr: 100, Burst: 100, RateGlobal: 1, BurstGlobal: 2, Now: clk.now})
	for i := range 10 {
		a, _, err := th.Admit(netip.AddrFrom4([4]byte{10, 0, 0, byte(i)}))
		if err != nil {
			t.Fatalf("first attempt of a fresh address refused: %v", err)
		}
		a.Failed()
	}
	if _, _, err := th.Admit(netip.AddrFrom4([4]byte{10, 0, 0, 1})); !errors.Is(err, ErrThrottledGlobal) {
		t.Fatalf("second failure with the global budget spent: %v, want ErrThrottledGlobal", err)
	}
	a, _, err := th.Admit(addrB)
	if err != nil {
		t.Fatalf("a fresh address: %v", err)
	}
	a.Succeeded()
	if s := th.Stats(); s.ThrottledGlobal != 1 {
		t.Fatalf("stats %+v", s)
	}
}

func TestThrottleKey(t *testing.T) {
	a := ThrottleKey(netip.MustParseAddr("2001:db8:1:2:aaaa::1"))
	b := ThrottleKey(netip.MustParseAddr("2001:db8:1:2:bbbb::2"))
	if a != b {
		t.Fatalf("one /64: %s and %s", a, b)
	}
	if k := ThrottleKey(netip.MustParseAddr("::ffff:192.0.2.1")); k != addrA {
		t.Fatalf("mapped v4: %s", k)
	}
}

func TestThrottleNil(t *testing.T) {
	th := NewThrottle(ThrottleOptions{})
	if th != nil {
		t.Fatal("a throttle with no limits")
	}
	a, _, err := th.Admit(addrA)
	if err != nil {
		t.Fatal(err)
	}
	a.Failed()
	a.Succeeded()
	_ = th.Stats()
}

// Slow guessing (below the refill rate) is still banned: the count of
// consecutive failures ends only with a success or a quiet BanDuration.
func TestThrottleBanSlowGuesser(t *testing.T) {
	clk := &fakeClock{t: time.Unix(1000, 0)}
	th := NewThrottle(ThrottleOptions{RatePerAddr: 1, Burst: 2, BanAfter: 3, BanDuration: time.Minute, Now: clk.now})
	for i := range 3 {
		a, _, err := th.Admit(addrA)
		if err != nil {
			t.Fatalf("failure %d refused: %v", i, err)
		}
		a.Failed()
		clk.add(10 * time.Second)
	}
	if _, _, err := th.Admit(addrA); !errors.Is(err, ErrAddrBanned) {
		t.Fatalf("3 failures 10s apart: %v, want a ban", err)
	}
	clk.add(time.Minute)
	a, _, _ := th.Admit(addrA)
	a.Failed()
	clk.add(2 * time.Minute) // quiet for longer than BanDuration: forgotten
	for range 2 {
		a, _, err := th.Admit(addrA)
		if err != nil {
			t.Fatal(err)
		}
		a.Failed()
	}
	clk.add(2 * time.Second) // the budget back
	if _, _, err := th.Admit(addrA); err != nil {
		t.Fatalf("2 failures after a quiet spell: %v, want no ban yet", err)
	}
}
