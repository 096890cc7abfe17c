package broker_test

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"

	"github.com/beaconmq/beacon/broker"
	bt "github.com/beaconmq/beacon/broker/brokertest"
	"github.com/beaconmq/beacon/broker/engine"
	"github.com/beaconmq/beacon/devices"
	"github.com/beaconmq/beacon/devices/codec"
	"github.com/beaconmq/beacon/storage"
)

// haEntitySchema lists the keys Home Assistant's MQTT discovery documents
// (https://www.home-assistant.io/integrations/<component>.mqtt/) for every
// component Beacon announces, and the ones it requires.
var haEntitySchema = map[string]struct{ allowed, required []string }{
	"sensor": {
		allowed: []string{"name", "unique_id", "state_topic", "value_template", "unit_of_measurement", "device_class",
			"state_class", "suggested_display_precision", "entity_category", "availability", "availability_mode", "device", "origin"},
		required: []string{"state_topic"},
	},
	"binary_sensor": {
		allowed: []string{"name", "unique_id", "state_topic", "value_template", "payload_on", "payload_off", "device_class",
			"entity_category", "availability", "availability_mode", "device", "origin"},
		required: []string{"state_topic"},
	},
	"switch": {
		allowed: []string{"name", "unique_id", "command_topic", "state_topic", "value_template", "payload_on", "payload_off",
			"state_on", "state_off", "entity_category", "availability", "availability_mode", "device", "origin"},
		required: []string{"command_topic"},
	},
	"number": {
		allowed: []string{"name", "unique_id", "command_topic", "state_topic", "value_template", "min", "max", "step",
			"unit_of_measurement", "entity_category", "availability", "availability_mode", "device", "origin"},
		required: []string{"command_topic"},
	},
	"button": {
		allowed: []string{"name", "unique_id", "command_topic", "payload_press", "entity_category", "availability",
			"availability_mode", "device", "origin"},
		required: []string{"command_topic"},
	},
	"select": {
		allowed: []string{"name", "unique_id", "command_topic", "state_topic", "value_template", "options", "entity_category",
			"availability", "availability_mode", "device", "origin"},
		required: []string{"command_topic", "options"},
	},
}

// The documented keys of the device and origin blocks.
var (
	haDeviceKeys = []string{"identifiers", "name", "model", "manufacturer", "sw_version"}
	haOriginKeys = []string{"name", "sw_version", "support_url"}
)

func ptr(f float64) *float64 { return &f }

// sensorCodecs is a device type "sensor" with packed telemetry (a scaled
// temperature, a battery voltage, a signal strength, a relay state) and
// four commands.
func sensorCodecs(c *broker.Config) {
	c.HomeAssistant.Discovery = true
	c.Codecs = []broker.CodecRuleConfig{{Filter: "devices/+/telemetry", DeviceType: "sensor", Format: "packed", Endian: "little",
		Fields: []codec.Field{
			{Name: "temperature", Type: "int16", Scale: 0.01, Unit: "°C", DeviceClass: "temperature"},
			{Name: "battery", Type: "uint16", Scale: 0.001, Unit: "V", DeviceClass: "voltage", Label: "Battery voltage"},
			{Name: "rssi", Type: "int8", Unit: "dBm", DeviceClass: "signal_strength", Label: "Signal"},
			{Name: "relay", Type: "bool"},
		},
		Commands: []codec.Command{
			{Name: "relay", Type: "switch", State: "relay", Label: "Relay"},
			{Name: "setpoint", Type: "number", Min: ptr(5), Max: ptr(30), Step: ptr(0.5), Unit: "°C"},
			{Name: "reboot", Type: "button"},
			{Name: "mode", Type: "select", Options: []string{"eco", "comfort"}},
		}}}
}

func sensorFrame(temp int16, battery uint16, rssi int8, relay bool) []byte {
	p := make([]byte, 6)
	binary.LittleEndian.PutUint16(p, uint16(temp))
	binary.LittleEndian.PutUint16(p[2:], battery)
	p[4] = byte(rssi)
	if relay {
		p[5] = 1
	}
	return p
}

const sensorConfigs = 8 // 4 readings and 4 commands

// TestHomeAssistantEntities: a device type's readings and commands become
// Home Assistant entities whose discovery payloads hold only documented
// keys, with labels, display precision and diagnostics; readings are
// rounded; a command entity's topic reaches the device; Home Assistant's
// "online" on homeassistant/status gets every config again.
func TestHomeAssistantEntities(t *testing.T) {
	e := startAuth(t, sensorCodecs)
	_, secret, err := e.b.Registry().Add(devices.NewDevice{ID: "s1", Name: "Greenhouse", Type: "sensor", Tags: map[string]string{"sw_version": "1.2.3"}})
	if err != nil {
		t.Fatal(err)
	}
	bt.WaitFor(t, 10*time.Second, "the announcement", func() bool {
		return retainedCount(e.b, "homeassistant/+/+/config") == sensorConfigs
	})
	haTok := token(t, "ha", "", time.Hour, []string{"devices/+/cmd/#", "homeassistant/status", "beacon-test/#"},
		[]string{"homeassistant/#", "beacon/state/#", "$beacon/presence/#", "beacon-test/#"})
	ha := bt.Dial(t, e.addr, creds("home-assistant", "ha", haTok))
	ha.SubscribeT(t, paho.SubscribeOptions{Topic: "homeassistant/#", QoS: 1}, paho.SubscribeOptions{Topic: "beacon/state/#", QoS: 1})
	configs := map[string]map[string]any{}
	for _, m := range ha.WaitMessages(t, sensorConfigs, 10*time.Second) {
		var c map[string]any
		if err := json.Unmarshal(m.Payload, &c); err != nil {
			t.Fatalf("%s: %v", m.Topic, err)
		}
		configs[m.Topic] = c
	}
	want := []string{"binary_sensor/s1_relay", "button/s1_reboot", "number/s1_setpoint", "select/s1_mode", "sensor/s1_battery",
		"sensor/s1_rssi", "sensor/s1_temperature", "switch/s1_relay"}
	for _, w := range want {
		if configs["homeassistant/"+w+"/config"] == nil {
			t.Fatalf("no config for %s; have %v", w, keys(configs))
		}
	}
	for topic, c := range configs {
		component := strings.Split(topic, "/")[1]
		schema, ok := haEntitySchema[component]
		if !ok {
			t.Fatalf("%s: component %q", topic, component)
		}
		for k := range c {
			if !contains(schema.allowed, k) {
				t.Errorf("%s: key %q is not in Home Assistant's %s schema", topic, k, component)
			}
		}
		for _, k := range append(schema.required, "name", "unique_id", "device", "origin", "availability") {
			if c[k] == nil {
				t.Errorf("%s: missing %q", topic, k)
			}
		}
		dev, _ := c["device"].(map[string]any)
		for k := range dev {
			if !contains(haDeviceKeys, k) {
				t.Errorf("%s: device key %q is not in Home Assistant's schema", topic, k)
			}
		}
		if ids, _ := dev["identifiers"].([]any); len(ids) != 1 || ids[0] != "beacon_s1" || dev["name"] != "Greenhouse" || dev["sw_version"] != "1.2.3" {
			t.Errorf("%s: device %v", topic, dev)
		}
		origin, _ := c["origin"].(map[string]any)
		for k := range origin {
			if !contains(haOriginKeys, k) {
				t.Errorf("%s: origin key %q is not in Home Assistant's schema", topic, k)
			}
		}
		if origin["name"] != "Beacon" || origin["sw_version"] != broker.Version {
			t.Errorf("%s: origin %v", topic, origin)
		}
		if ct, ok := c["command_topic"].(string); ok && !strings.HasPrefix(ct, "devices/s1/cmd/") {
			t.Errorf("%s: command topic %q", topic, ct)
		}
	}
	uniq := map[any]string{}
	for topic, c := range configs {
		if other, dup := uniq[c["unique_id"]]; dup {
			t.Errorf("%s and %s share unique_id %v", topic, other, c["unique_id"])
		}
		uniq[c["unique_id"]] = topic
	}
	check := func(w string, kv map[string]any) {
		t.Helper()
		c := configs["homeassistant/"+w+"/config"]
		for k, v := range kv {
			got, _ := json.Marshal(c[k])
			exp, _ := json.Marshal(v)
			if string(got) != string(exp) {
				t.Errorf("%s: %s = %s, want %s", w, k, got, exp)
			}
		}
	}
	check("sensor/s1_temperature", map[string]any{"name": "Temperature", "suggested_display_precision": 2, "entity_category": nil,
		"unit_of_measurement": "°C", "device_class": "temperature", "state_topic": "beacon/state/s1"})
	check("sensor/s1_battery", map[string]any{"name": "Battery voltage", "suggested_display_precision": 3, "entity_category": "diagnostic"})
	check("sensor/s1_rssi", map[string]any{"name": "Signal", "entity_category": "diagnostic", "device_class": "signal_strength"})
	check("switch/s1_relay", map[string]any{"name": "Relay", "command_topic": "devices/s1/cmd/relay", "state_topic": "beacon/state/s1",
		"payload_on": "ON", "payload_off": "OFF", "state_on": "ON", "state_off": "OFF",
		"value_template": "{{ 'ON' if value_json.relay else 'OFF' }}", "unique_id": "beacon_s1_relay_command"})
	check("number/s1_setpoint", map[string]any{"name": "Setpoint", "command_topic": "devices/s1/cmd/setpoint", "min": 5, "max": 30,
		"step": 0.5, "unit_of_measurement": "°C", "state_topic": nil})
	check("button/s1_reboot", map[string]any{"command_topic": "devices/s1/cmd/reboot", "payload_press": "PRESS"})
	check("select/s1_mode", map[string]any{"command_topic": "devices/s1/cmd/mode", "options": []string{"eco", "comfort"}})

	// Readings are rounded: 3711 x 0.001 is 3.711 in the state.
	s1 := bt.Dial(t, e.addr, creds("s1", "s1", secret))
	s1.SubscribeT(t, paho.SubscribeOptions{Topic: "devices/s1/cmd/#", QoS: 1})
	s1.PublishT(t, &paho.Publish{Topic: "devices/s1/telemetry", QoS: 1, Payload: sensorFrame(2157, 3711, -71, true)})
	var state []byte
	bt.WaitFor(t, 10*time.Second, "the state", func() bool {
		for _, m := range ha.Messages() {
			if m.Topic == "beacon/state/s1" {
				state = m.Payload
			}
		}
		return state != nil
	})
	if s := string(state); !strings.Contains(s, `"battery":3.711,`) || !strings.Contains(s, `"temperature":21.57`) || !strings.Contains(s, `"rssi":-71`) {
		t.Fatalf("state %s", state)
	}

	// A command entity publishes to the device's command topic.
	ha.PublishT(t, &paho.Publish{Topic: "devices/s1/cmd/relay", QoS: 1, Payload: []byte("OFF")})
	if m := s1.WaitMessages(t, 1, 10*time.Second)[0]; m.Topic != "devices/s1/cmd/relay" || string(m.Payload) != "OFF" {
		t.Fatalf("command: %s %s", m.Topic, m.Payload)
	}

	// Home Assistant restarts and announces itself: every config again.
	before := ha.Count()
	ha.PublishT(t, &paho.Publish{Topic: "homeassistant/status", QoS: 1, Payload: []byte("online")})
	bt.WaitFor(t, 10*time.Second, "the configs again", func() bool {
		again := map[string]bool{}
		for _, m := range ha.Messages()[before:] {
			if strings.HasSuffix(m.Topic, "/config") && len(m.Payload) > 0 {
				again[m.Topic] = true
			}
		}
		return len(again) == sensorConfigs
	})
	// "offline" (its will) does not.
	n := ha.Count()
	ha.PublishT(t, &paho.Publish{Topic: "homeassistant/status", QoS: 1, Payload: []byte("offline")})
	ha.Barrier(t)
	for _, m := range ha.Messages()[n:] {
		if strings.HasSuffix(m.Topic, "/config") {
			t.Fatalf("offline re-announced %s", m.Topic)
		}
	}
}

func keys(m map[string]map[string]any) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	return out
}

// TestHomeAssistantRemovalWhileStopped: a device removed while the broker
// was stopped loses its entities at the next start (empty retained
// configs and state); the others keep theirs.
func TestHomeAssistantRemovalWhileStopped(t *testing.T) {
	cfg := bt.Config(t)
	sensorCodecs(&cfg)
	b, err := broker.New(cfg, bt.Logger(t))
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Start(); err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{"gone", "kept"} {
		if _, _, err := b.Registry().Add(devices.NewDevice{ID: id, Type: "sensor"}); err != nil {
			t.Fatal(err)
		}
	}
	// A reading of "gone" (as the engine routes a device's publish): its state is retained.
	if _, err := b.Engine().Publish(&engine.Message{Topic: "devices/gone/telemetry", Device: "gone", QoS: 1,
		Payload: sensorFrame(100, 3000, -50, false)}); err != nil {
		t.Fatal(err)
	}
	bt.WaitFor(t, 10*time.Second, "both devices announced", func() bool {
		return retainedCount(b, "homeassistant/+/+/config") == 2*sensorConfigs && retainedCount(b, "beacon/state/+") == 1
	})
	bt.Stop(t, b)

	// Removed with the broker stopped: no hook sees it.
	db, err := storage.Open(storage.Options{Dir: cfg.Storage.Dir})
	if err != nil {
		t.Fatal(err)
	}
	reg, err := devices.OpenRegistry(db)
	if err != nil {
		t.Fatal(err)
	}
	if err := reg.Remove("gone"); err != nil {
		t.Fatal(err)
	}
	if err := db.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}

	b = bt.Start(t, cfg)
	bt.WaitFor(t, 10*time.Second, "the removed device's entities cleared", func() bool {
		return retainedCount(b, "homeassistant/+/gone_+/config") == 0 && retainedCount(b, "beacon/state/gone") == 0
	})
	if n := retainedCount(b, "homeassistant/+/+/config"); n != sensorConfigs {
		t.Fatalf("%d configs retained, want the %d of the kept device", n, sensorConfigs)
	}
}
