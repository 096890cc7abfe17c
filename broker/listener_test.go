package broker

import (
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
)

// TestDisconnectClientsWhileClientsChange: closing a listener's clients at
// shutdown does not deadlock while clients are added and removed. mochi's
// own callback (Clients.GetByListener) read-locks the clients map twice
// and hangs here within a few thousand calls.
func TestDisconnectClientsWhileClientsChange(t *testing.T) {
	srv := mqtt.New(&mqtt.Options{Logger: slog.New(slog.DiscardHandler)})
	for i := range 16 {
		srv.Clients.Add(srv.NewClient(nil, "tcp", fmt.Sprintf("idle-%d", i), false))
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w := range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				id := fmt.Sprintf("churn-%d-%d", w, i%8)
				srv.Clients.Add(srv.NewClient(nil, "tcp", id, false))
				srv.Clients.Delete(id)
			}
		}()
	}
	const calls = 20000
	done := make(chan struct{})
	go func() {
		defer close(done)
		for range calls {
			disconnectClients(srv, "tcp")
		}
	}()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		t.Fatalf("disconnectClients did not return from %d calls while clients were added and removed: deadlocked", calls)
	}
	close(stop)
	wg.Wait()
	for id, cl := range srv.Clients.GetAll() {
		if cl.Net.Listener == "tcp" && !cl.Closed() && strings.HasPrefix(id, "idle-") {
			t.Errorf("client %s of the listener not disconnected", id)
		}
	}
}
