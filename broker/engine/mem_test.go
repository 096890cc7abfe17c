package engine

import (
	"fmt"
	"net"
	"os"
	"runtime"
	"runtime/pprof"
	"strconv"
	"testing"
	"time"
)

// BenchmarkIdleConnection measures what an idle MQTT connection costs the
// engine: heap and goroutine stacks per connected, subscribed client
// (BEACON_IDLE_CONNS clients, default 2,000), reported as KiB/conn.
func BenchmarkIdleConnection(b *testing.B) {
	n := 2000
	if v, err := strconv.Atoi(os.Getenv("BEACON_IDLE_CONNS")); err == nil && v > 0 {
		n = v
	}
	for i := 0; i < b.N; i++ {
		measureIdle(b, n)
	}
}

func measureIdle(b *testing.B, n int) {
	s := New(Options{})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	go func() { _ = s.Serve(ln, "tcp") }()
	defer func() { _ = s.Shutdown(b.Context()) }()
	addr := ln.Addr().String()
	before := memInUse()
	conns := make([]net.Conn, 0, n)
	defer func() {
		for _, c := range conns {
			_ = c.Close()
		}
	}()
	connect := connectBytes(4)
	sub := []byte{0x82, 0x08, 0x00, 0x01, 0x00, 0x03, 'a', '/', 'b', 0x01}
	buf := make([]byte, 64)
	for i := 0; i < n; i++ {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			b.Fatal(err)
		}
		conns = append(conns, c)
		pk := append([]byte(nil), connect...)
		// A distinct client id per connection: patch "fuzz" into a number.
		id := fmt.Sprintf("%04d", i%10000)
		copy(pk[len(pk)-4:], id)
		if _, err := c.Write(append(pk, sub...)); err != nil {
			b.Fatal(err)
		}
		_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.Read(buf); err != nil { // CONNACK (+ SUBACK)
			b.Fatal(err)
		}
	}
	deadline := time.Now().Add(10 * time.Second)
	for s.Stats().Subscriptions < n%10000 && s.Stats().Subscriptions < n && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	// Wait for the connections to idle: their readers return (IdleAfter).
	for idleCount(s) < n && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	b.ReportMetric(float64(idleCount(s)), "idle")
	after := memInUse()
	if path := os.Getenv("BEACON_IDLE_HEAPPROFILE"); path != "" {
		// What the idle connections hold, by allocation site (with
		// -memprofilerate=1 for every allocation).
		f, err := os.Create(path)
		if err != nil {
			b.Fatal(err)
		}
		if err := pprof.Lookup("heap").WriteTo(f, 0); err != nil {
			b.Fatal(err)
		}
		f.Close()
	}
	b.ReportMetric(float64(after-before)/float64(n)/1024, "KiB/conn")
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	b.ReportMetric(float64(m.StackInuse)/float64(n)/1024, "stackKiB/conn")
}

func memInUse() uint64 {
	runtime.GC()
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapInuse + m.StackInuse
}
