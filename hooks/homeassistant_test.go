package hooks

import (
	"context"
	"encoding/json"
	"log/slog"
	"slices"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/beaconmq/beacon/devices"
	"github.com/beaconmq/beacon/devices/codec"
	"github.com/beaconmq/beacon/storage"
)

// haEngine stands in for the engine behind HomeAssistantOptions' Publish
// and Retained: it keeps retained messages as MQTT does (an empty payload
// clears the topic) and records every publish. Both seams check that the
// hook's lock is not held while they run: they take it themselves.
type haEngine struct {
	h *HomeAssistant // set before Start

	mu        sync.Mutex
	retained  map[string][]byte
	published []haMsg
}

type haMsg struct {
	topic   string
	payload []byte
	retain  bool
	qos     byte
}

func newHAEngine() *haEngine { return &haEngine{retained: map[string][]byte{}} }

// unlocked deadlocks (and the test times out) if the caller holds h.mu.
func (e *haEngine) unlocked() {
	if e.h != nil {
		e.h.mu.Lock()
		_ = e.h.state // keep the critical section non-empty for linters
		e.h.mu.Unlock()
	}
}

func (e *haEngine) publish(topic string, payload []byte, retain bool, qos byte) error {
	e.unlocked()
	e.mu.Lock()
	defer e.mu.Unlock()
	e.published = append(e.published, haMsg{topic: topic, payload: payload, retain: retain, qos: qos})
	if retain {
		if len(payload) == 0 {
			delete(e.retained, topic)
		} else {
			e.retained[topic] = payload
		}
	}
	return nil
}

func (e *haEngine) retainedMatching(filter string, fn func(topic string, payload []byte) bool) {
	e.unlocked()
	f := strings.Split(filter, "/")
	e.mu.Lock()
	var topics []string
	for topic := range e.retained {
		if devices.MatchesTopic(f, topic) {
			topics = append(topics, topic)
		}
	}
	sort.Strings(topics)
	payloads := make([][]byte, len(topics))
	for i, topic := range topics {
		payloads[i] = e.retained[topic]
	}
	e.mu.Unlock()
	for i, topic := range topics {
		if !fn(topic, payloads[i]) {
			return
		}
	}
}

func (e *haEngine) retainedTopics(prefix string) []string {
	e.mu.Lock()
	defer e.mu.Unlock()
	var out []string
	for topic := range e.retained {
		if strings.HasPrefix(topic, prefix) {
			out = append(out, topic)
		}
	}
	sort.Strings(out)
	return out
}

func (e *haEngine) get(topic string) []byte {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.retained[topic]
}

func (e *haEngine) publishes() []haMsg {
	e.mu.Lock()
	defer e.mu.Unlock()
	return slices.Clone(e.published)
}

// haSetup is a registry with one thermostat d1 and the codecs of the
// broker's Home Assistant test.
func haSetup(t *testing.T) (*devices.Registry, *codec.Rules) {
	t.Helper()
	db, err := storage.Open(storage.Options{Dir: t.TempDir(), Sync: storage.SyncBatch, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = db.Shutdown(context.Background()) })
	reg, err := devices.OpenRegistry(db)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := reg.Add(devices.NewDevice{ID: "d1", Type: "thermostat"}); err != nil {
		t.Fatal(err)
	}
	codecs, err := codec.NewRules([]codec.Rule{
		{Filter: "devices/+/telemetry", Config: codec.Config{Format: "packed", Endian: "little", Fields: []codec.Field{
			{Name: "temperature", Type: "int16", Scale: 0.01, Unit: "°C", DeviceClass: "temperature"},
			{Name: "humidity", Type: "uint8", Scale: 0.5, Unit: "%", DeviceClass: "humidity"},
			{Name: "ok", Type: "bool"},
		}}},
		{Filter: "devices/+/state", DeviceType: "thermostat", Config: codec.Config{Format: "json", Fields: []codec.Field{
			{Name: "setpoint", Type: "float64", Unit: "°C", DeviceClass: "temperature"},
		}}},
		{Filter: "devices/+/any", Config: codec.Config{Format: "json"}},
	})
	if err != nil {
		t.Fatal(err)
	}
	return reg, codecs
}

func newTestHA(t *testing.T, e *haEngine, reg *devices.Registry, codecs *codec.Rules) *HomeAssistant {
	t.Helper()
	h := NewHomeAssistant(HomeAssistantOptions{Publish: e.publish, Retained: e.retainedMatching, Registry: reg, Codecs: codecs,
		StatusTopic: "devices/%u/status", Log: slog.New(slog.DiscardHandler)})
	e.h = h
	t.Cleanup(h.Shutdown)
	return h
}

// haSchema lists the keys Home Assistant's MQTT discovery documents for
// the components Beacon announces, and which of them are required.
var haSchema = map[string]struct{ allowed, required []string }{
	"sensor": {
		allowed: []string{"name", "unique_id", "state_topic", "value_template", "unit_of_measurement", "device_class",
			"state_class", "suggested_display_precision", "entity_category", "availability", "availability_mode", "device", "origin"},
		required: []string{"state_topic", "unique_id", "device"},
	},
	"binary_sensor": {
		allowed: []string{"name", "unique_id", "state_topic", "value_template", "payload_on", "payload_off", "device_class", "entity_category",
			"availability", "availability_mode", "device", "origin"},
		required: []string{"state_topic", "unique_id", "device"},
	},
}

const (
	haSetpoint    = "homeassistant/sensor/d1_setpoint/config"
	haTemperature = "homeassistant/sensor/d1_temperature/config"
	haHumidity    = "homeassistant/sensor/d1_humidity/config"
	haOK          = "homeassistant/binary_sensor/d1_ok/config"
)

func TestHomeAssistantDiscovery(t *testing.T) {
	reg, codecs := haSetup(t)
	e := newHAEngine()
	h := newTestHA(t, e, reg, codecs)
	h.Start()

	// A thermostat's declared reading is announced at the start, before
	// it sends anything.
	waitFor(t, 5*time.Second, "the announcement", func() bool { return e.get(haSetpoint) != nil })

	// Messages of no device, or of an unknown one, are not readings.
	h.Observe(&Message{Topic: "devices/d1/telemetry", Payload: []byte{0x6d, 0x08, 0x5b, 0x01}})
	h.Observe(&Message{Topic: "devices/d9/telemetry", Device: "d9", Payload: []byte{0x6d, 0x08, 0x5b, 0x01}})
	h.Observe(&Message{Topic: "devices/d1/telemetry", Device: "d1", Client: "d1", QoS: 1, Payload: []byte{0x6d, 0x08, 0x5b, 0x01}})
	waitFor(t, 5*time.Second, "4 configs and a state", func() bool {
		return len(e.retainedTopics("homeassistant/")) == 4 && e.get("beacon/state/d1") != nil
	})
	if got := e.retainedTopics("beacon/state/"); !slices.Equal(got, []string{"beacon/state/d1"}) {
		t.Errorf("states: %v", got)
	}
	if got, want := e.retainedTopics("homeassistant/"), []string{haOK, haHumidity, haSetpoint, haTemperature}; !slices.Equal(got, want) {
		t.Fatalf("discovery topics: %v, want %v", got, want)
	}
	var state map[string]any
	if err := json.Unmarshal(e.get("beacon/state/d1"), &state); err != nil {
		t.Fatal(err)
	}
	if state["temperature"] != 21.57 || state["humidity"] != 45.5 || state["ok"] != true {
		t.Errorf("state: %v", state)
	}
	for _, p := range e.publishes() {
		if !p.retain || p.qos != 1 {
			t.Errorf("%s published with retain %v qos %d, want retained at QoS 1", p.topic, p.retain, p.qos)
		}
	}

	configs := map[string]map[string]any{}
	for _, topic := range e.retainedTopics("homeassistant/") {
		var c map[string]any
		if err := json.Unmarshal(e.get(topic), &c); err != nil {
			t.Fatalf("%s: %v", topic, err)
		}
		configs[topic] = c
	}
	for topic, c := range configs {
		component := strings.Split(topic, "/")[1]
		schema := haSchema[component]
		for k := range c {
			if !slices.Contains(schema.allowed, k) {
				t.Errorf("%s: key %q is not in Home Assistant's %s schema", topic, k, component)
			}
		}
		for _, k := range schema.required {
			if c[k] == nil {
				t.Errorf("%s: missing %q", topic, k)
			}
		}
		if c["state_topic"] != "beacon/state/d1" {
			t.Errorf("%s: state topic %v", topic, c["state_topic"])
		}
		av, _ := c["availability"].([]any)
		if len(av) != 2 || c["availability_mode"] != "latest" {
			t.Fatalf("%s: availability %v mode %v", topic, av, c["availability_mode"])
		}
		for i, want := range []string{"$beacon/presence/d1", "devices/d1/status"} {
			a, _ := av[i].(map[string]any)
			for k := range a {
				if !slices.Contains([]string{"topic", "value_template", "payload_available", "payload_not_available"}, k) {
					t.Errorf("%s: availability key %q is not in Home Assistant's schema", topic, k)
				}
			}
			if a["topic"] != want || a["payload_available"] != "online" || a["payload_not_available"] != "offline" {
				t.Errorf("%s: availability[%d] %v", topic, i, a)
			}
		}
		dev, _ := c["device"].(map[string]any)
		if ids, _ := dev["identifiers"].([]any); len(ids) != 1 || ids[0] != "beacon_d1" || dev["name"] == "" || dev["model"] != "thermostat" {
			t.Errorf("%s: device block %v", topic, dev)
		}
	}
	temp := configs[haTemperature]
	if temp["value_template"] != "{{ value_json.temperature }}" || temp["unit_of_measurement"] != "°C" ||
		temp["device_class"] != "temperature" || temp["state_class"] != "measurement" || temp["unique_id"] != "beacon_d1_temperature" {
		t.Errorf("temperature config: %v", temp)
	}
	if ok := configs[haOK]; ok["payload_on"] != "ON" || ok["value_template"] != "{{ 'ON' if value_json.ok else 'OFF' }}" {
		t.Errorf("binary sensor config: %v", ok)
	}

	// A second reading updates the state only.
	before := len(e.publishes())
	h.Observe(&Message{Topic: "devices/d1/telemetry", Device: "d1", Payload: []byte{0x70, 0x08, 0x5a, 0x00}})
	waitFor(t, 5*time.Second, "the second state", func() bool { return len(e.publishes()) > before })
	if p := e.publishes()[before:]; len(p) != 1 || p[0].topic != "beacon/state/d1" {
		t.Errorf("after a second reading: %v", p)
	}
	if err := json.Unmarshal(e.get("beacon/state/d1"), &state); err != nil || state["temperature"] != 21.6 || state["ok"] != false {
		t.Errorf("second state: %v (%v)", state, err)
	}

	// A restart announces nothing retained already as it would be.
	h.Shutdown()
	h.Shutdown() // idempotent
	before = len(e.publishes())
	h = newTestHA(t, e, reg, codecs)
	h.Start()
	if err := reg.Remove("d1"); err != nil { // not wired to Forget here: the registry is only read
		t.Fatal(err)
	}
	if _, _, err := reg.Add(devices.NewDevice{ID: "d2", Type: "thermostat"}); err != nil {
		t.Fatal(err)
	}
	h.Announce(devices.Device{ID: "d1", Name: "d1", Type: "thermostat"}) // as at the first start: retained already
	h.Announce(devices.Device{ID: "d2", Name: "d2", Type: "thermostat"})
	waitFor(t, 5*time.Second, "d2's announcement", func() bool { return e.get("homeassistant/sensor/d2_setpoint/config") != nil })
	for _, p := range e.publishes()[before:] {
		if strings.Contains(p.topic, "d1") {
			t.Errorf("republished after the restart: %s", p.topic)
		}
	}

	// Forgetting d1 after the restart (nothing of it known in memory)
	// empties all its retained configs, found among the retained ones, and
	// its state; d2's stay.
	h.Forget("d1")
	waitFor(t, 5*time.Second, "d1's entities to be removed", func() bool {
		return len(e.retainedTopics("homeassistant/")) == 1 && e.get("beacon/state/d1") == nil
	})
	if got := e.retainedTopics("homeassistant/"); !slices.Equal(got, []string{"homeassistant/sensor/d2_setpoint/config"}) {
		t.Errorf("left after forgetting d1: %v", got)
	}
}

func TestHomeAssistantForgetsQueuedConfigs(t *testing.T) {
	reg, codecs := haSetup(t)
	e := newHAEngine()
	h := newTestHA(t, e, reg, codecs)
	// Not started: the configs of a first reading are queued, not
	// published, when the device is removed.
	h.Observe(&Message{Topic: "devices/d1/telemetry", Device: "d1", Payload: []byte{0x6d, 0x08, 0x5b, 0x01}})
	if err := reg.Remove("d1"); err != nil {
		t.Fatal(err)
	}
	h.Forget("d1")
	h.Start()
	waitFor(t, 5*time.Second, "the queue to be published", func() bool { return len(e.publishes()) >= 4 })
	h.Shutdown()
	if got := e.retainedTopics(""); len(got) != 0 {
		t.Errorf("retained after Forget: %v", got)
	}
}

func TestHomeAssistantBoundsEntities(t *testing.T) {
	reg, codecs := haSetup(t)
	e := newHAEngine()
	h := newTestHA(t, e, reg, codecs)
	h.Start()
	fields := map[string]int{}
	for i := range maxEntitiesPerDevice + 10 {
		fields["k"+strings.Repeat("x", i)] = i
	}
	payload, _ := json.Marshal(fields)
	h.Observe(&Message{Topic: "devices/d1/any", Device: "d1", Payload: payload})
	waitFor(t, 5*time.Second, "the state", func() bool { return e.get("beacon/state/d1") != nil })
	waitFor(t, 5*time.Second, "the configs", func() bool {
		return len(e.retainedTopics("homeassistant/")) >= maxEntitiesPerDevice
	})
	if n := len(e.retainedTopics("homeassistant/sensor/d1_k")); n != maxEntitiesPerDevice-1 {
		// one entity is the declared setpoint, announced at the start
		t.Errorf("%d entities announced for one reading of %d keys, want %d", n, len(fields), maxEntitiesPerDevice-1)
	}
}

func TestHATitle(t *testing.T) {
	for in, want := range map[string]string{"battery_level": "Battery level", "rssi": "RSSI", "ok": "OK", "co2_level": "CO2 level",
		"temperature": "Temperature", "okay": "Okay", "": ""} {
		if got := haTitle(in); got != want {
			t.Errorf("haTitle(%q) = %q, want %q", in, got, want)
		}
	}
}
