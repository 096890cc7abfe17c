package broker_test

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"runtime/pprof"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	pahopackets "github.com/eclipse/paho.golang/packets"
	"github.com/eclipse/paho.golang/paho"

	"github.com/beaconmq/beacon/broker"
	bt "github.com/beaconmq/beacon/broker/brokertest"
)

// TestShutdownWhileClientsChurn: a shutdown while clients connect and
// disconnect (over TCP and WebSocket) ends in time. mochi's own way of
// closing a listener's clients (Clients.GetByListener) read-locks the
// clients map twice, so a client added or removed between the two locks
// deadlocked it; a connection accepted as the listener closed could also
// stay open past the shutdown.
func TestShutdownWhileClientsChurn(t *testing.T) {
	for round := range 5 {
		cfg := bt.Config(t)
		cfg.HTTP.HandshakesPerSec = 100000 // the churn is the point here
		b, err := broker.New(cfg, bt.Logger(t))
		if err != nil {
			t.Fatal(err)
		}
		if err := b.Start(); err != nil {
			t.Fatal(err)
		}
		tcp := b.MQTTAddr("tcp")
		ws := "ws://" + b.HTTPAddr() + cfg.HTTP.WSPath

		stop := make(chan struct{})
		var wg sync.WaitGroup
		var connected atomic.Int64
		churn := func(worker int, dial func() (net.Conn, error)) {
			defer wg.Done()
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				conn, err := dial()
				if err != nil {
					continue // refused once the listeners are closed
				}
				c, err := connectPaho(conn, fmt.Sprintf("churn-%d-%d", worker, i%4))
				if err != nil {
					continue
				}
				connected.Add(1)
				_ = c.Disconnect(&paho.Disconnect{})
			}
		}
		for w := range 6 {
			wg.Add(1)
			if w%3 == 2 {
				go churn(w, func() (net.Conn, error) {
					c, _, err := bt.DialWS(ws, nil)
					if err != nil {
						return nil, err
					}
					return pahopackets.NewThreadSafeConn(c), nil
				})
				continue
			}
			go churn(w, func() (net.Conn, error) { return net.DialTimeout("tcp", tcp, 5*time.Second) })
		}
		bt.WaitFor(t, 10*time.Second, "clients to churn", func() bool { return connected.Load() >= 20 })

		ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
		err = b.Shutdown(ctx)
		cancel()
		close(stop)
		if err != nil {
			var dump bytes.Buffer
			_ = pprof.Lookup("goroutine").WriteTo(&dump, 2)
			t.Fatalf("round %d: shutdown while clients churn: %v\n%s", round, err, dump.String())
		}
		wg.Wait()
	}
}

// connectPaho runs an MQTT 5 CONNECT with a clean start over conn, with
// short timeouts so that a churning client never waits long on a broker
// that stops.
func connectPaho(conn net.Conn, id string) (*paho.Client, error) {
	c := paho.NewClient(paho.ClientConfig{Conn: conn, OnClientError: func(error) {}, PacketTimeout: 2 * time.Second})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if _, err := c.Connect(ctx, &paho.Connect{ClientID: id, CleanStart: true, KeepAlive: 30}); err != nil {
		_ = conn.Close()
		return nil, err
	}
	return c, nil
}
