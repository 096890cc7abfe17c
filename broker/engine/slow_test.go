package engine

import (
	"bytes"
	"fmt"
	"net"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
)

// A subscriber that stops reading neither blocks the publisher nor
// starves a healthy subscriber: its QoS 0 beyond the budget is dropped
// and counted, and it is closed as a slow consumer once a write stalls
// past the write timeout.
func TestStuckSubscriberDoesNotSlowOthers(t *testing.T) {
	srv, addr := startServer(t, Options{Limits: Limits{OutboundBudget: 64 << 10, WriteTimeout: time.Second}})

	stuck := dialRaw(t, addr, 4)
	_ = stuck.nc.(*net.TCPConn).SetReadBuffer(4096)
	stuck.connect("stuck", true, nil)
	stuck.subscribe(1, "load/#", 0)
	// From here on it reads nothing.

	healthy := dialRaw(t, addr, 4)
	healthy.connect("healthy", true, nil)
	healthy.subscribe(1, "load/#", 1)
	got := make(chan int, 1)
	go func() {
		n := 0
		for {
			pk, err := healthy.read(10 * time.Second)
			if err != nil {
				got <- n
				return
			}
			if pk.FixedHeader.Type == packets.Publish {
				n++
				if pk.FixedHeader.Qos == 1 {
					var buf bytes.Buffer
					ack := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Puback}, PacketID: pk.PacketID}
					_ = ack.PubackEncode(&buf)
					_, _ = healthy.nc.Write(buf.Bytes())
				}
				if n == 400 {
					got <- n
					return
				}
			}
		}
	}()

	pub := dialRaw(t, addr, 4)
	pub.connect("pub", true, nil)
	payload := bytes.Repeat([]byte("x"), 16<<10)
	for i := 1; i <= 400; i++ {
		pub.publish("load/a", payload, 1, uint16(i))
		pub.expect(packets.Puback) // never held up by the stuck subscriber
	}
	if n := <-got; n != 400 {
		t.Fatalf("healthy subscriber got %d of 400", n)
	}
	waitFor(t, 10*time.Second, func() error {
		st := srv.Stats()
		if st.Dropped[DropQueueFull] == 0 || st.SlowConsumers == 0 {
			return fmt.Errorf("dropped %d, slow consumers %d", st.Dropped[DropQueueFull], st.SlowConsumers)
		}
		return nil
	})
}
