package broker

import (
	"encoding/json"
	"log/slog"
	"sync"
	"time"

	"github.com/beaconmq/beacon/devices"
)

// PresencePrefix is where device presence is published: a retained QoS 1
// message per registered device on $beacon/presence/<id>, so MQTT
// subscribers, the SSE stream and webhooks all see devices come and go.
const PresencePrefix = "$beacon/presence/"

// PresenceEvent is the payload of a presence message.
type PresenceEvent struct {
	Device string `json:"device"`
	Name   string `json:"name,omitempty"`
	Type   string `json:"type,omitempty"`
	Online bool   `json:"online"`
	TS     int64  `json:"ts"` // unix milliseconds
}

// presence publishes the registry's changes in the order they happen,
// from its own goroutine (the registry calls in with its lock held).
type presence struct {
	publish  func(topic string, payload []byte, retain bool, qos byte) error
	retained func(topic string) ([]byte, bool)
	log      *slog.Logger
	mu       sync.Mutex
	queue    []devices.Change
	wake     chan struct{}
	done     chan struct{}
	wg       sync.WaitGroup
}

func newPresence(publish func(topic string, payload []byte, retain bool, qos byte) error,
	retained func(topic string) ([]byte, bool), log *slog.Logger) *presence {
	return &presence{publish: publish, retained: retained, log: log, wake: make(chan struct{}, 1), done: make(chan struct{})}
}

func (p *presence) push(c devices.Change) {
	p.mu.Lock()
	p.queue = append(p.queue, c)
	p.mu.Unlock()
	select {
	case p.wake <- struct{}{}:
	default:
	}
}

// start corrects the retained presence of every device whose message is
// missing or says online (nothing is connected yet; a crash or a stop
// leaves "online" behind), then follows the changes.
func (p *presence) start(reg *devices.Registry) {
	for _, d := range reg.List(nil) {
		if p.retainedSays(d.ID, d.Online) {
			continue // already right: no write per device at every start (online: connected to another node of a cluster)
		}
		p.send(devices.Change{Device: d})
	}
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		for {
			stopping := false
			select {
			case <-p.wake:
			case <-p.done:
				stopping = true // what was queued before stop is still said
			}
			p.mu.Lock()
			batch := p.queue
			p.queue = nil
			p.mu.Unlock()
			for _, c := range batch {
				p.send(c)
			}
			if stopping {
				return
			}
		}
	}()
}

func (p *presence) send(c devices.Change) {
	topic := PresencePrefix + c.Device.ID
	var payload []byte
	if !c.Removed {
		payload, _ = json.Marshal(PresenceEvent{Device: c.Device.ID, Name: c.Device.Name, Type: c.Device.Type,
			Online: c.Device.Online, TS: time.Now().UnixMilli()})
	}
	// An empty retained payload clears the retained presence of a removed
	// device.
	if err := p.publish(topic, payload, true, 1); err != nil {
		p.log.Warn("presence publish", "device", c.Device.ID, "error", err)
	}
}

// retainedSays reports whether the retained presence of id says online
// (or offline).
func (p *presence) retainedSays(id string, online bool) bool {
	payload, ok := p.retained(PresencePrefix + id)
	if !ok {
		return false
	}
	var e PresenceEvent
	return json.Unmarshal(payload, &e) == nil && e.Device == id && e.Online == online
}

func (p *presence) stop() {
	select {
	case <-p.done:
	default:
		close(p.done)
	}
	p.wg.Wait()
}
