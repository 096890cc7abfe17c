package topics

import (
	"fmt"
	"strconv"
	"testing"
)

// benchMatch runs x.Match(topic) with one reused Matches and reports the
// deliveries per match.
func benchMatch(b *testing.B, x *Index, topic string, wantDirect, wantShared int) {
	b.Helper()
	var m Matches
	x.Match(topic, "", &m)
	if len(m.Direct) != wantDirect || len(m.Shared) != wantShared {
		b.Fatalf("Match(%q): %d direct, %d shared, want %d, %d", topic, len(m.Direct), len(m.Shared), wantDirect, wantShared)
	}
	b.ReportAllocs()
	b.ResetTimer()
	for b.Loop() {
		x.Match(topic, "", &m)
	}
	b.ReportMetric(float64(len(m.Direct)+len(m.Shared)), "deliveries/op")
}

// BenchmarkIndexMatch: 10k devices on their command topic and 100
// monitors on everything, a command published to one device.
func BenchmarkIndexMatch(b *testing.B) {
	b.Run("monitors apart", func(b *testing.B) {
		x := NewIndex()
		for i := range 10_000 {
			x.Subscribe(Subscription{Client: "dev-" + strconv.Itoa(i), Filter: "devices/" + strconv.Itoa(i) + "/cmd", QoS: 1})
		}
		for i := range 100 {
			x.Subscribe(Subscription{Client: "mon-" + strconv.Itoa(i), Filter: "devices/#", ID: 1})
		}
		benchMatch(b, x, "devices/42/cmd", 101, 0)
	})
	// The same with the monitors among the devices, so that 100 clients
	// have two subscriptions and take the merge path.
	b.Run("monitors among devices", func(b *testing.B) {
		x := NewIndex()
		for i := range 10_000 {
			x.Subscribe(Subscription{Client: "dev-" + strconv.Itoa(i), Filter: "devices/" + strconv.Itoa(i) + "/cmd", QoS: 1})
		}
		for i := range 100 {
			x.Subscribe(Subscription{Client: "dev-" + strconv.Itoa(i*100), Filter: "devices/#", ID: 1})
		}
		benchMatch(b, x, "devices/42/cmd", 101, 0)
	})
}

// BenchmarkIndexMatchWildcardHeavy: 1,000 clients with five filters each,
// four of them wildcards that match the topic, plus shared groups; every
// client matches several times and is merged.
func BenchmarkIndexMatchWildcardHeavy(b *testing.B) {
	x := NewIndex()
	for i := range 1000 {
		c := "client-" + strconv.Itoa(i)
		site := strconv.Itoa(i % 10)
		for j, f := range []string{
			"site/+/+/temp",
			"site/" + site + "/#",
			"+/" + site + "/+/temp",
			"site/" + site + "/floor" + strconv.Itoa(i%4) + "/+",
			"site/" + site + "/floor" + strconv.Itoa(i%4) + "/hum",
		} {
			x.Subscribe(Subscription{Client: c, Filter: f, QoS: byte(j % 3), ID: uint32(j + 1)})
		}
		x.Subscribe(Subscription{Client: c, Filter: "site/#", Group: "g" + strconv.Itoa(i%8)})
	}
	// site/3/floor2/temp: all 1,000 match site/+/+/temp; the 100 of site 3
	// match site/3/# and +/3/+/temp, 25 of them site/3/floor2/+.
	benchMatch(b, x, "site/3/floor2/temp", 1000, 8)
}

// BenchmarkIndexMatchParallel is BenchmarkIndexMatch on every core: the
// read lock is shared.
func BenchmarkIndexMatchParallel(b *testing.B) {
	x := NewIndex()
	for i := range 10_000 {
		x.Subscribe(Subscription{Client: "dev-" + strconv.Itoa(i), Filter: "devices/" + strconv.Itoa(i) + "/cmd", QoS: 1})
	}
	for i := range 100 {
		x.Subscribe(Subscription{Client: "mon-" + strconv.Itoa(i), Filter: "devices/#"})
	}
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		var m Matches
		x.Match("devices/42/cmd", "", &m) // grow m before measuring
		for pb.Next() {
			x.Match("devices/42/cmd", "", &m)
		}
	})
}

// BenchmarkIndexSubscribe is churn: a client subscribes and unsubscribes
// beside 10k others.
func BenchmarkIndexSubscribe(b *testing.B) {
	x := NewIndex()
	for i := range 10_000 {
		x.Subscribe(Subscription{Client: "dev-" + strconv.Itoa(i), Filter: "devices/" + strconv.Itoa(i) + "/cmd"})
	}
	b.ReportAllocs()
	for b.Loop() {
		x.Subscribe(Subscription{Client: "dev-new", Filter: "devices/new/cmd"})
		x.Unsubscribe("dev-new", "devices/new/cmd", "")
	}
}

func BenchmarkMatch(b *testing.B) {
	b.ReportAllocs()
	for b.Loop() {
		Match("sport/tennis/+/#", "sport/tennis/player1/ranking/wimbledon")
	}
}

// BenchmarkRetainedMatch: 10k devices with two retained topics each.
func BenchmarkRetainedMatch(b *testing.B) {
	r := NewRetained[int]()
	for i := range 10_000 {
		r.Set(fmt.Sprintf("devices/%d/state", i), i)
		r.Set(fmt.Sprintf("devices/%d/config", i), i)
	}
	r.Set("$SYS/uptime", 0)
	for _, bc := range []struct {
		filter string
		want   int
	}{
		{"devices/42/state", 1},
		{"devices/42/#", 2},
		{"devices/+/state", 10_000},
		{"#", 20_000},
	} {
		b.Run(bc.filter, func(b *testing.B) {
			n := 0
			fn := func(string, int) bool { n++; return true }
			r.Match(bc.filter, fn)
			if n != bc.want {
				b.Fatalf("Match(%q) found %d, want %d", bc.filter, n, bc.want)
			}
			b.ReportAllocs()
			b.ResetTimer()
			for b.Loop() {
				r.Match(bc.filter, fn)
			}
		})
	}
}
