package hooks

import (
	"bytes"
	"encoding/json"
	"log/slog"
	"sort"
	"strings"
	"sync"
	"unicode"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/beaconmq/beacon/devices"
	"github.com/beaconmq/beacon/devices/codec"
)

// HomeAssistantOptions configure Home Assistant MQTT discovery.
type HomeAssistantOptions struct {
	Server   *mqtt.Server
	Registry *devices.Registry
	Codecs   *codec.Rules
	// DeviceOf names the registered device behind a client, or "".
	DeviceOf func(cl *mqtt.Client) string
	// Prefix is Home Assistant's discovery prefix (default
	// "homeassistant").
	Prefix string
	// StatePrefix is where Beacon publishes each device's decoded readings
	// as one retained JSON object: <StatePrefix>/<device id> (default
	// "beacon/state").
	StatePrefix string
	// StatusTopic is the device's own birth/will topic, "%u" standing for
	// its id ("" for none). Availability follows the latest of it and of
	// Beacon's presence ($beacon/presence/<id>).
	StatusTopic string
	Log         *slog.Logger
}

// HomeAssistant makes registered devices appear in Home Assistant with no
// YAML there: for every reading a codec decodes from a device, it keeps a
// retained JSON state per device and a retained discovery config per
// reading (sensor, or binary_sensor for booleans), with the device's
// presence as availability. Removing a device removes its entities.
type HomeAssistant struct {
	mqtt.HookBase
	opts HomeAssistantOptions

	mu     sync.Mutex
	state  map[string]map[string]any // device -> last readings
	known  map[string]map[string]bool
	queue  []haPublish
	queued map[string]int // topic -> index in queue
	wake   chan struct{}
	done   chan struct{}
	wg     sync.WaitGroup
	closed bool
}

type haPublish struct {
	topic   string
	payload []byte
}

var _ mqtt.Hook = (*HomeAssistant)(nil)

// NewHomeAssistant builds the hook; Start begins publishing.
func NewHomeAssistant(o HomeAssistantOptions) *HomeAssistant {
	if o.Prefix == "" {
		o.Prefix = "homeassistant"
	}
	if o.StatePrefix == "" {
		o.StatePrefix = "beacon/state"
	}
	if o.Log == nil {
		o.Log = slog.Default()
	}
	return &HomeAssistant{opts: o, state: map[string]map[string]any{}, known: map[string]map[string]bool{},
		wake: make(chan struct{}, 1), done: make(chan struct{})}
}

// ID implements mqtt.Hook.
func (h *HomeAssistant) ID() string { return "beacon-homeassistant" }

// Provides implements mqtt.Hook.
func (h *HomeAssistant) Provides(b byte) bool { return b == mqtt.OnPublished }

// OnPublished decodes a device's message and updates its state and, for
// readings seen for the first time, its discovery configs.
func (h *HomeAssistant) OnPublished(cl *mqtt.Client, pk packets.Packet) {
	if pk.Ignore || pk.FixedHeader.Type != packets.Publish || h.opts.DeviceOf == nil {
		return
	}
	id := h.opts.DeviceOf(cl)
	if id == "" {
		return
	}
	typ := h.opts.Registry.TypeOf(id)
	values, err := h.opts.Codecs.Decode(pk.TopicName, typ, pk.Payload)
	if err != nil || len(values) == 0 {
		return
	}
	fields := h.opts.Codecs.Fields(pk.TopicName, typ)
	// The registry calls Announce and Forget with its lock held: never ask
	// it anything while holding h.mu.
	dev, err := h.opts.Registry.Get(id)
	if err != nil {
		return
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	st := h.state[id]
	if st == nil {
		st = map[string]any{}
		h.state[id] = st
	}
	var fresh []string
	for k, v := range values {
		if !h.known[id][k] {
			if len(h.known[id])+len(fresh) >= maxEntitiesPerDevice {
				continue // a device inventing keys must not flood Home Assistant
			}
			fresh = append(fresh, k)
		}
		st[k] = v
	}
	if len(fresh) > 0 {
		sort.Strings(fresh)
		for _, k := range fresh {
			if h.known[id] == nil {
				h.known[id] = map[string]bool{}
			}
			h.known[id][k] = true
			topic, cfg := h.discovery(dev, k, values[k], fieldMeta(fields, k))
			h.queueLocked(topic, cfg)
		}
	}
	state, _ := json.Marshal(st)
	h.queueLocked(h.StateTopic(id), state)
}

func fieldMeta(fields []codec.Field, name string) codec.Field {
	for _, f := range fields {
		if f.Name == name {
			return f
		}
	}
	return codec.Field{Name: name}
}

// StateTopic is where a device's readings are published.
func (h *HomeAssistant) StateTopic(id string) string { return h.opts.StatePrefix + "/" + id }

// DiscoveryConfig is the discovery payload of one entity, in Home
// Assistant's documented MQTT discovery schema.
type DiscoveryConfig struct {
	Name              string          `json:"name"`
	UniqueID          string          `json:"unique_id"`
	StateTopic        string          `json:"state_topic"`
	ValueTemplate     string          `json:"value_template"`
	UnitOfMeasurement string          `json:"unit_of_measurement,omitempty"`
	DeviceClass       string          `json:"device_class,omitempty"`
	StateClass        string          `json:"state_class,omitempty"`
	PayloadOn         string          `json:"payload_on,omitempty"`
	PayloadOff        string          `json:"payload_off,omitempty"`
	Availability      []Availability  `json:"availability"`
	AvailabilityMode  string          `json:"availability_mode"`
	Device            DiscoveryDevice `json:"device"`
	Origin            DiscoveryOrigin `json:"origin"`
}

// Availability is one topic that says whether an entity is available.
type Availability struct {
	Topic               string `json:"topic"`
	ValueTemplate       string `json:"value_template,omitempty"`
	PayloadAvailable    string `json:"payload_available"`
	PayloadNotAvailable string `json:"payload_not_available"`
}

// DiscoveryDevice groups a device's entities in Home Assistant.
type DiscoveryDevice struct {
	Identifiers  []string `json:"identifiers"`
	Name         string   `json:"name"`
	Model        string   `json:"model,omitempty"`
	Manufacturer string   `json:"manufacturer"`
}

// DiscoveryOrigin names the software behind the entities.
type DiscoveryOrigin struct {
	Name string `json:"name"`
	URL  string `json:"url,omitempty"`
}

// discovery builds the config topic and payload of one reading.
func (h *HomeAssistant) discovery(dev devices.Device, field string, value any, meta codec.Field) (string, []byte) {
	component := "sensor"
	if _, ok := value.(bool); ok {
		component = "binary_sensor"
	}
	objectID := haSlug(dev.ID) + "_" + field
	name := dev.Name
	if name == "" {
		name = dev.ID
	}
	c := DiscoveryConfig{
		Name:              haTitle(field),
		UniqueID:          "beacon_" + objectID,
		StateTopic:        h.StateTopic(dev.ID),
		UnitOfMeasurement: meta.Unit,
		DeviceClass:       meta.DeviceClass,
		Availability:      h.availability(dev.ID),
		AvailabilityMode:  "latest",
		Device:            DiscoveryDevice{Identifiers: []string{"beacon_" + dev.ID}, Name: name, Model: dev.Type, Manufacturer: "Beacon"},
		Origin:            DiscoveryOrigin{Name: "Beacon"},
	}
	if component == "binary_sensor" {
		c.ValueTemplate = "{{ 'ON' if value_json." + field + " else 'OFF' }}"
		c.PayloadOn, c.PayloadOff = "ON", "OFF"
	} else {
		c.ValueTemplate = "{{ value_json." + field + " }}"
		c.StateClass = "measurement"
	}
	b, _ := json.Marshal(c)
	return h.opts.Prefix + "/" + component + "/" + objectID + "/config", b
}

// availability lists the topics that tell whether a device is there:
// Beacon's presence always, the device's own status topic when set.
func (h *HomeAssistant) availability(id string) []Availability {
	out := []Availability{{Topic: "$beacon/presence/" + id, ValueTemplate: "{{ 'online' if value_json.online else 'offline' }}",
		PayloadAvailable: "online", PayloadNotAvailable: "offline"}}
	if h.opts.StatusTopic != "" {
		out = append(out, Availability{Topic: strings.ReplaceAll(h.opts.StatusTopic, "%u", id),
			PayloadAvailable: "online", PayloadNotAvailable: "offline"})
	}
	return out
}

// haSlug turns a device id into an object id: lower case letters, digits
// and underscores.
func haSlug(s string) string {
	return strings.Map(func(r rune) rune {
		if r < unicode.MaxASCII && (unicode.IsLetter(r) || unicode.IsDigit(r)) {
			return unicode.ToLower(r)
		}
		return '_'
	}, s)
}

// haTitle turns a field name into an entity name: "battery_level" is
// "Battery level".
func haTitle(s string) string {
	s = strings.ReplaceAll(s, "_", " ")
	if s == "" {
		return s
	}
	return strings.ToUpper(s[:1]) + s[1:]
}

// Announce publishes the discovery configs of the readings that the
// codecs declare for a device's type, before it sends any: Home Assistant
// lists a registered device at once. Readings of rules without a device
// type are announced when first decoded.
func (h *HomeAssistant) Announce(dev devices.Device) {
	fields := h.opts.Codecs.DeclaredFields(dev.Type)
	if len(fields) == 0 {
		return
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, f := range fields {
		if h.known[dev.ID][f.Name] {
			continue
		}
		if h.known[dev.ID] == nil {
			h.known[dev.ID] = map[string]bool{}
		}
		h.known[dev.ID][f.Name] = true
		var sample any = 0.0
		if f.Type == "bool" {
			sample = false
		}
		topic, cfg := h.discovery(dev, f.Name, sample, f)
		if msgs := h.opts.Server.Topics.Messages(topic); len(msgs) == 1 && bytes.Equal(msgs[0].Payload, cfg) {
			continue // retained already, as it would be published: no write at every start
		}
		h.queueLocked(topic, cfg)
	}
}

// Forget removes a removed device's entities: an empty retained message on
// each of its discovery topics (found among the retained configs, so it
// works after a restart too) and on its state topic.
func (h *HomeAssistant) Forget(id string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	delete(h.state, id)
	delete(h.known, id)
	want := "beacon_" + id
	for _, pk := range h.opts.Server.Topics.Messages(h.opts.Prefix + "/+/+/config") {
		var c struct {
			Device struct {
				Identifiers []string `json:"identifiers"`
			} `json:"device"`
		}
		if json.Unmarshal(pk.Payload, &c) == nil && len(c.Device.Identifiers) > 0 && c.Device.Identifiers[0] == want {
			h.queueLocked(pk.TopicName, nil)
		}
	}
	h.queueLocked(h.StateTopic(id), nil)
}

// maxEntitiesPerDevice bounds the readings announced for one device: a
// JSON codec without declared fields exposes whatever keys a device sends.
const maxEntitiesPerDevice = 64

func (h *HomeAssistant) queueLocked(topic string, payload []byte) {
	if h.closed {
		return
	}
	// A state not yet published is replaced by the newer one: the queue
	// holds one entry per topic at most, so a fast device cannot grow it.
	if i, ok := h.queued[topic]; ok {
		h.queue[i].payload = payload
		return
	}
	if h.queued == nil {
		h.queued = map[string]int{}
	}
	h.queued[topic] = len(h.queue)
	h.queue = append(h.queue, haPublish{topic: topic, payload: payload})
	select {
	case h.wake <- struct{}{}:
	default:
	}
}

// Start announces the registered devices, then publishes queued configs
// and states from its own goroutine (never from the publishing client's).
func (h *HomeAssistant) Start() {
	for _, d := range h.opts.Registry.List(nil) {
		h.Announce(d)
	}
	h.wg.Add(1)
	go func() {
		defer h.wg.Done()
		for {
			select {
			case <-h.wake:
			case <-h.done:
				return
			}
			h.mu.Lock()
			batch := h.queue
			h.queue, h.queued = nil, nil
			h.mu.Unlock()
			for _, p := range batch {
				if err := h.opts.Server.Publish(p.topic, p.payload, true, 1); err != nil {
					h.opts.Log.Warn("home assistant publish", "topic", p.topic, "error", err)
				}
			}
		}
	}()
}

// Shutdown stops publishing.
func (h *HomeAssistant) Shutdown() {
	h.mu.Lock()
	if h.closed {
		h.mu.Unlock()
		return
	}
	h.closed = true
	h.mu.Unlock()
	close(h.done)
	h.wg.Wait()
}
