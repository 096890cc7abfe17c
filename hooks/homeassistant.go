package hooks

import (
	"bytes"
	"encoding/json"
	"log/slog"
	"sort"
	"strings"
	"sync"
	"time"
	"unicode"

	"github.com/beaconmq/beacon/devices"
	"github.com/beaconmq/beacon/devices/codec"
)

// HomeAssistantOptions configure Home Assistant MQTT discovery.
type HomeAssistantOptions struct {
	// Publish publishes a message from the broker itself (the engine's
	// inline publish). It is called from the hook's own goroutine, never
	// with the hook's lock held, so it may route the message back into
	// Observe.
	Publish func(topic string, payload []byte, retain bool, qos byte) error
	// Retained calls fn for every retained message matching filter (an
	// MQTT filter, wildcards allowed) until fn returns false. It is never
	// called with the hook's lock held. Announce uses it to skip a
	// discovery config retained already, Forget to find the configs of a
	// removed device, after a restart too. nil: nothing is retained.
	Retained func(filter string, fn func(topic string, payload []byte) bool)
	Registry *devices.Registry
	Codecs   *codec.Rules
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
	// Version is Beacon's version, the origin's sw_version.
	Version string
	Log     *slog.Logger
}

// HomeAssistant makes registered devices appear in Home Assistant with no
// YAML there: for every reading a codec decodes from a device, it keeps a
// retained JSON state per device and a retained discovery config per
// reading (sensor, or binary_sensor for booleans), with the device's
// presence as availability, and one per command its type declares
// (switch, number, button, select, publishing to devices/<id>/cmd/<name>).
// Removing a device removes its entities, also when it was removed while
// the broker was stopped (Start reconciles); Home Assistant announcing
// itself online on <prefix>/status gets every config again.
type HomeAssistant struct {
	opts HomeAssistantOptions

	mu     sync.Mutex
	state  map[string]map[string]any // device -> last readings
	known  map[string]map[string]bool
	meta   map[string]map[string]codec.Field // device -> reading -> its codec field, for readings seen
	queue  []haPublish
	queued map[string]int // topic -> index in queue
	wake   chan struct{}
	done   chan struct{}
	wg     sync.WaitGroup
	closed bool

	lastReannounce time.Time // Home Assistant's birth message is honoured once per reannounceEvery
}

// reannounceEvery bounds how often an "online" on <prefix>/status
// republishes everything: any client allowed to publish there could
// otherwise make the broker flood every subscriber of the discovery prefix.
const reannounceEvery = 5 * time.Second

type haPublish struct {
	topic   string
	payload []byte
}

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
	return &HomeAssistant{opts: o, state: map[string]map[string]any{}, known: map[string]map[string]bool{}, meta: map[string]map[string]codec.Field{},
		wake: make(chan struct{}, 1), done: make(chan struct{})}
}

// Observe decodes a routed message of a registered device and updates the
// device's state and, for readings seen for the first time, its discovery
// configs. The broker calls it for every routed message; messages of no
// device (the broker's own included) are ignored. It does not block: the
// publishes are queued for Start's goroutine.
func (h *HomeAssistant) Observe(m *Message) {
	if m.Topic == h.opts.Prefix+"/status" && string(m.Payload) == "online" && m.Client != "" {
		h.reannounce()
		return
	}
	id := m.Device
	if id == "" {
		return
	}
	typ := h.opts.Registry.TypeOf(id)
	values, err := h.opts.Codecs.Decode(m.Topic, typ, m.Payload)
	if err != nil || len(values) == 0 {
		return
	}
	fields := h.opts.Codecs.Fields(m.Topic, typ)
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
			if h.meta[id] == nil {
				h.meta[id] = map[string]codec.Field{}
			}
			h.meta[id][k] = fieldMeta(fields, k)
			topic, cfg := h.discovery(dev, k, values[k], h.meta[id][k])
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
	Name                      string          `json:"name"`
	UniqueID                  string          `json:"unique_id"`
	StateTopic                string          `json:"state_topic,omitempty"`
	ValueTemplate             string          `json:"value_template,omitempty"`
	CommandTopic              string          `json:"command_topic,omitempty"`
	UnitOfMeasurement         string          `json:"unit_of_measurement,omitempty"`
	DeviceClass               string          `json:"device_class,omitempty"`
	StateClass                string          `json:"state_class,omitempty"`
	SuggestedDisplayPrecision *int            `json:"suggested_display_precision,omitempty"`
	EntityCategory            string          `json:"entity_category,omitempty"`
	PayloadOn                 string          `json:"payload_on,omitempty"`
	PayloadOff                string          `json:"payload_off,omitempty"`
	StateOn                   string          `json:"state_on,omitempty"`
	StateOff                  string          `json:"state_off,omitempty"`
	PayloadPress              string          `json:"payload_press,omitempty"`
	Min                       *float64        `json:"min,omitempty"`
	Max                       *float64        `json:"max,omitempty"`
	Step                      *float64        `json:"step,omitempty"`
	Options                   []string        `json:"options,omitempty"`
	Availability              []Availability  `json:"availability"`
	AvailabilityMode          string          `json:"availability_mode"`
	Device                    DiscoveryDevice `json:"device"`
	Origin                    DiscoveryOrigin `json:"origin"`
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
	SWVersion    string   `json:"sw_version,omitempty"` // the device's tag sw_version
}

// DiscoveryOrigin names the software behind the entities.
type DiscoveryOrigin struct {
	Name       string `json:"name"`
	SWVersion  string `json:"sw_version,omitempty"`
	SupportURL string `json:"support_url,omitempty"`
}

// discovery builds the config topic and payload of one reading.
func (h *HomeAssistant) discovery(dev devices.Device, field string, value any, meta codec.Field) (string, []byte) {
	component := "sensor"
	if _, ok := value.(bool); ok {
		component = "binary_sensor"
	}
	objectID := haSlug(dev.ID) + "_" + field
	c := h.entity(dev, objectID, meta.Label, field)
	c.StateTopic = h.StateTopic(dev.ID)
	c.UnitOfMeasurement, c.DeviceClass = meta.Unit, meta.DeviceClass
	c.EntityCategory = entityCategory(meta)
	if component == "binary_sensor" {
		c.ValueTemplate = "{{ 'ON' if value_json." + field + " else 'OFF' }}"
		c.PayloadOn, c.PayloadOff = "ON", "OFF"
	} else {
		c.ValueTemplate = "{{ value_json." + field + " }}"
		c.StateClass = "measurement"
		c.SuggestedDisplayPrecision = meta.Precision
	}
	b, _ := json.Marshal(c)
	return h.opts.Prefix + "/" + component + "/" + objectID + "/config", b
}

// entity is what every entity of dev has in common.
func (h *HomeAssistant) entity(dev devices.Device, objectID, label, name string) DiscoveryConfig {
	devName := dev.Name
	if devName == "" {
		devName = dev.ID
	}
	if label == "" {
		label = haTitle(name)
	}
	return DiscoveryConfig{
		Name:             label,
		UniqueID:         "beacon_" + objectID,
		Availability:     h.availability(dev.ID),
		AvailabilityMode: "latest",
		Device: DiscoveryDevice{Identifiers: []string{"beacon_" + dev.ID}, Name: devName, Model: dev.Type, Manufacturer: "Beacon",
			SWVersion: dev.Tags["sw_version"]},
		Origin: DiscoveryOrigin{Name: "Beacon", SWVersion: h.opts.Version, SupportURL: "https://github.com/beaconmq/beacon"},
	}
}

// diagnosticNames are readings about the link or the device itself rather
// than what it measures.
var diagnosticNames = map[string]bool{"rssi": true, "snr": true, "lqi": true, "linkquality": true, "uptime": true,
	"battery_voltage": true, "signal": true, "signal_strength": true}

// entityCategory is the field's entity_category, or diagnostic for signal
// strength, voltage and link readings.
func entityCategory(f codec.Field) string {
	switch {
	case f.EntityCategory != "":
		return f.EntityCategory
	case f.DeviceClass == "signal_strength", f.DeviceClass == "voltage", diagnosticNames[strings.ToLower(f.Name)]:
		return "diagnostic"
	}
	return ""
}

// commandDiscovery builds the config topic and payload of a command.
func (h *HomeAssistant) commandDiscovery(dev devices.Device, cmd codec.Command) (string, []byte) {
	objectID := haSlug(dev.ID) + "_" + cmd.Name
	c := h.entity(dev, objectID+"_command", cmd.Label, cmd.Name)
	c.CommandTopic = "devices/" + dev.ID + "/cmd/" + cmd.Name
	if cmd.State != "" {
		c.StateTopic = h.StateTopic(dev.ID)
	}
	switch cmd.Type {
	case codec.CommandSwitch:
		c.PayloadOn, c.PayloadOff = "ON", "OFF"
		if cmd.State != "" {
			c.ValueTemplate = "{{ 'ON' if value_json." + cmd.State + " else 'OFF' }}"
			c.StateOn, c.StateOff = "ON", "OFF"
		}
	case codec.CommandNumber:
		c.Min, c.Max, c.Step, c.UnitOfMeasurement = cmd.Min, cmd.Max, cmd.Step, cmd.Unit
		if cmd.State != "" {
			c.ValueTemplate = "{{ value_json." + cmd.State + " }}"
		}
	case codec.CommandButton:
		c.PayloadPress = "PRESS"
	case codec.CommandSelect:
		c.Options = cmd.Options
	}
	b, _ := json.Marshal(c)
	return h.opts.Prefix + "/" + cmd.Type + "/" + objectID + "/config", b
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

// haAcronyms are words written in capitals in entity names.
var haAcronyms = map[string]bool{"rssi": true, "snr": true, "lqi": true, "ok": true, "co2": true, "pm25": true,
	"pm10": true, "voc": true, "uv": true, "id": true, "ip": true}

// haTitle turns a field name into an entity name: "battery_level" is
// "Battery level", "rssi" is "RSSI", "co2_level" is "CO2 level".
func haTitle(s string) string {
	words := strings.Split(s, "_")
	for i, w := range words {
		if haAcronyms[strings.ToLower(w)] {
			words[i] = strings.ToUpper(w)
		}
	}
	s = strings.Join(words, " ")
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
	cmds := h.opts.Codecs.DeclaredCommands(dev.Type)
	if len(fields) == 0 && len(cmds) == 0 {
		return
	}
	var fresh []haPublish
	h.mu.Lock()
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
		fresh = append(fresh, haPublish{topic: topic, payload: cfg})
	}
	for _, c := range cmds {
		topic, cfg := h.commandDiscovery(dev, c)
		fresh = append(fresh, haPublish{topic: topic, payload: cfg})
	}
	h.mu.Unlock()
	// Asked without the lock: Retained reaches into the engine.
	var publish []haPublish
	for _, p := range fresh {
		if h.retained(p.topic, p.payload) {
			continue // retained already, as it would be published: no write at every start
		}
		publish = append(publish, p)
	}
	if len(publish) == 0 {
		return
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, p := range publish {
		h.queueLocked(p.topic, p.payload)
	}
}

// retained reports whether payload is retained on topic.
func (h *HomeAssistant) retained(topic string, payload []byte) bool {
	if h.opts.Retained == nil {
		return false
	}
	found := false
	h.opts.Retained(topic, func(t string, p []byte) bool {
		found = t == topic && bytes.Equal(p, payload)
		return false
	})
	return found
}

// Forget removes a removed device's entities: an empty retained message on
// each of its discovery topics (found among the retained configs, so it
// works after a restart too) and on its state topic.
func (h *HomeAssistant) Forget(id string) {
	h.mu.Lock()
	delete(h.state, id)
	delete(h.known, id)
	delete(h.meta, id)
	h.mu.Unlock()
	// Asked without the lock: Retained reaches into the engine.
	want := "beacon_" + id
	var topics []string
	if h.opts.Retained != nil {
		h.opts.Retained(h.opts.Prefix+"/+/+/config", func(topic string, payload []byte) bool {
			if isConfigOf(payload, want) {
				topics = append(topics, topic)
			}
			return true
		})
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	// A discovery config queued but not yet published is emptied too.
	for topic := range h.queued {
		if strings.HasPrefix(topic, h.opts.Prefix+"/") && h.configOf(topic, want) {
			topics = append(topics, topic)
		}
	}
	for _, topic := range topics {
		h.queueLocked(topic, nil)
	}
	h.queueLocked(h.StateTopic(id), nil)
}

// configOf reports whether the payload queued for topic is a discovery
// config of the device with identifier want. Called with h.mu held.
func (h *HomeAssistant) configOf(topic, want string) bool {
	return isConfigOf(h.queue[h.queued[topic]].payload, want)
}

// isConfigOf reports whether payload is a discovery config of the device
// with identifier want.
func isConfigOf(payload []byte, want string) bool {
	var c struct {
		Device struct {
			Identifiers []string `json:"identifiers"`
		} `json:"device"`
	}
	return json.Unmarshal(payload, &c) == nil && len(c.Device.Identifiers) > 0 && c.Device.Identifiers[0] == want
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

// Start clears the entities of devices removed while the broker was
// stopped, announces the registered devices, then publishes queued
// configs and states from its own goroutine (never from the publishing
// client's).
func (h *HomeAssistant) Start() {
	h.reconcile()
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
				if err := h.opts.Publish(p.topic, p.payload, true, 1); err != nil {
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

// reconcile forgets every device whose retained discovery configs or state
// are left while it is no longer registered (removed while the broker was
// stopped).
func (h *HomeAssistant) reconcile() {
	if h.opts.Retained == nil {
		return
	}
	gone := map[string]bool{}
	registered := func(id string) bool {
		_, err := h.opts.Registry.Get(id)
		return err == nil
	}
	h.opts.Retained(h.opts.Prefix+"/+/+/config", func(_ string, payload []byte) bool {
		if id, ok := configDevice(payload); ok && !registered(id) {
			gone[id] = true
		}
		return true
	})
	h.opts.Retained(h.opts.StatePrefix+"/+", func(topic string, _ []byte) bool {
		if id := strings.TrimPrefix(topic, h.opts.StatePrefix+"/"); !registered(id) {
			gone[id] = true
		}
		return true
	})
	ids := make([]string, 0, len(gone))
	for id := range gone {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	for _, id := range ids {
		h.opts.Log.Info("home assistant: clearing the entities of a device no longer registered", "device", id)
		h.Forget(id)
	}
}

// configDevice is the Beacon device id of a discovery config Beacon made.
func configDevice(payload []byte) (string, bool) {
	var c struct {
		Device struct {
			Identifiers []string `json:"identifiers"`
		} `json:"device"`
		Origin struct {
			Name string `json:"name"`
		} `json:"origin"`
	}
	if json.Unmarshal(payload, &c) != nil || len(c.Device.Identifiers) == 0 || c.Origin.Name != "Beacon" {
		return "", false
	}
	return strings.CutPrefix(c.Device.Identifiers[0], "beacon_")
}

// reannounce publishes every config again, and the states: Home Assistant
// came online (its birth message on <prefix>/status) and may have lost
// what it had.
func (h *HomeAssistant) reannounce() {
	now := time.Now()
	h.mu.Lock()
	if !h.lastReannounce.IsZero() && now.Sub(h.lastReannounce) < reannounceEvery {
		h.mu.Unlock()
		h.opts.Log.Info("home assistant: online again within seconds; not announcing again yet")
		return
	}
	h.lastReannounce = now
	h.mu.Unlock()
	list := h.opts.Registry.List(nil)
	var out []haPublish
	h.mu.Lock()
	for _, dev := range list {
		declared := h.opts.Codecs.DeclaredFields(dev.Type)
		fields := map[string]codec.Field{}
		for _, f := range declared {
			fields[f.Name] = f
		}
		names := make([]string, 0, len(h.known[dev.ID]))
		for k := range h.known[dev.ID] {
			names = append(names, k)
		}
		sort.Strings(names)
		for _, k := range names {
			var sample any = 0.0
			if v, ok := h.state[dev.ID][k]; ok {
				sample = v
			} else if fields[k].Type == "bool" {
				sample = false
			}
			meta, ok := fields[k]
			if !ok {
				meta = h.meta[dev.ID][k]
				meta.Name = k
			}
			topic, cfg := h.discovery(dev, k, sample, meta)
			out = append(out, haPublish{topic: topic, payload: cfg})
		}
		for _, c := range h.opts.Codecs.DeclaredCommands(dev.Type) {
			topic, cfg := h.commandDiscovery(dev, c)
			out = append(out, haPublish{topic: topic, payload: cfg})
		}
		if st := h.state[dev.ID]; len(st) > 0 {
			b, _ := json.Marshal(st)
			out = append(out, haPublish{topic: h.StateTopic(dev.ID), payload: b})
		}
	}
	for _, p := range out {
		h.queueLocked(p.topic, p.payload)
	}
	h.mu.Unlock()
}
