package cluster

import (
	"log/slog"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// fence returns only once every route that began before it has its seq,
// and does not wait for routes that begin after it.
func TestFenceWaitsForRoutesUnderWay(t *testing.T) {
	r := &Router{log: slog.Default()}
	var numbered atomic.Bool
	g := r.Enter()
	go func() {
		time.Sleep(100 * time.Millisecond) // a slow numbering (a reservation being written)
		numbered.Store(true)
		r.Leave(g)
	}()
	r.fence()
	if !numbered.Load() {
		t.Fatal("fence returned while a route that began before it had no seq")
	}

	// A route under way holds the next fence until it has its seq.
	late := r.Enter()
	done := make(chan struct{})
	go func() { r.fence(); close(done) }()
	select {
	case <-done:
		t.Fatal("fence did not wait for a route under way")
	case <-time.After(50 * time.Millisecond):
	}
	r.Leave(late)
	<-done

	// Many publishers entering and leaving while fences run: no count
	// goes negative and every fence ends.
	var wg sync.WaitGroup
	stop := make(chan struct{})
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				r.Leave(r.Enter())
			}
		}()
	}
	for range 100 {
		r.fence()
	}
	close(stop)
	wg.Wait()
	if a, b := r.fcount[0].Load(), r.fcount[1].Load(); a != 0 || b != 0 {
		t.Fatalf("counts %d %d after every route left", a, b)
	}
}
