package broker_test

import (
	"encoding/json"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"

	"github.com/beaconmq/beacon/broker"
	bt "github.com/beaconmq/beacon/broker/brokertest"
	"github.com/beaconmq/beacon/broker/engine"
	"github.com/beaconmq/beacon/devices/codec"
)

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

// Sensor device classes Home Assistant knows, of those Beacon's codecs use.
var haSensorClasses = map[string]bool{"temperature": true, "humidity": true, "voltage": true, "signal_strength": true, "battery": true}

func TestHomeAssistantDiscovery(t *testing.T) {
	e := startAuth(t, func(c *broker.Config) {
		c.HomeAssistant.Discovery = true
		c.Codecs = []broker.CodecRuleConfig{{Filter: "devices/+/telemetry", Format: "packed", Endian: "little", Fields: []codec.Field{
			{Name: "temperature", Type: "int16", Scale: 0.01, Unit: "°C", DeviceClass: "temperature"},
			{Name: "humidity", Type: "uint8", Scale: 0.5, Unit: "%", DeviceClass: "humidity"},
			{Name: "ok", Type: "bool"},
		}}, {Filter: "devices/+/state", DeviceType: "thermostat", Format: "json", Fields: []codec.Field{
			{Name: "setpoint", Type: "float64", Unit: "°C", DeviceClass: "temperature"},
		}}}
	})
	// Registering d1 (a thermostat) announced its declared reading; wait
	// until that is retained, so the subscriber below gets it once.
	bt.WaitFor(t, 10*time.Second, "the announcement", func() bool {
		return retainedCount(e.b, "homeassistant/sensor/d1_setpoint/config") == 1
	})
	ha := bt.Dial(t, e.addr, creds("home-assistant", "ha", token(t, "ha", "", time.Hour, nil,
		[]string{"homeassistant/#", "beacon/state/#", "$beacon/presence/#"})))
	ha.SubscribeT(t, paho.SubscribeOptions{Topic: "homeassistant/#", QoS: 1}, paho.SubscribeOptions{Topic: "beacon/state/#", QoS: 1})

	// A thermostat's declared reading is announced when it is registered,
	// before it sends anything.
	if m := ha.WaitMessages(t, 1, 10*time.Second)[0]; m.Topic != "homeassistant/sensor/d1_setpoint/config" {
		t.Fatalf("announced at registration: %s", m.Topic)
	}
	d1 := bt.Dial(t, e.addr, creds("d1", "d1", e.dev))
	d1.PublishT(t, &paho.Publish{Topic: "devices/d1/telemetry", QoS: 1, Payload: []byte{0x6d, 0x08, 0x5b, 0x01}})
	msgs := ha.WaitMessages(t, 5, 10*time.Second) // 4 configs and a state

	configs := map[string]map[string]any{}
	var state map[string]any
	for _, m := range msgs {
		if m.Topic == "beacon/state/d1" {
			_ = json.Unmarshal(m.Payload, &state)
			continue
		}
		var c map[string]any
		if err := json.Unmarshal(m.Payload, &c); err != nil {
			t.Fatalf("%s: %v", m.Topic, err)
		}
		configs[m.Topic] = c
	}
	var topics []string
	for k := range configs {
		topics = append(topics, k)
	}
	sort.Strings(topics)
	if strings.Join(topics, " ") != "homeassistant/binary_sensor/d1_ok/config homeassistant/sensor/d1_humidity/config homeassistant/sensor/d1_setpoint/config homeassistant/sensor/d1_temperature/config" {
		t.Fatalf("discovery topics: %v", topics)
	}
	if state["temperature"] != 21.57 || state["humidity"] != 45.5 || state["ok"] != true {
		t.Errorf("state: %v", state)
	}
	for topic, c := range configs {
		component := strings.Split(topic, "/")[1]
		schema := haSchema[component]
		for k := range c {
			if !contains(schema.allowed, k) {
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
				if !contains([]string{"topic", "value_template", "payload_available", "payload_not_available"}, k) {
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
		if dc, ok := c["device_class"].(string); ok && component == "sensor" && !haSensorClasses[dc] {
			t.Errorf("%s: device class %q", topic, dc)
		}
	}
	temp := configs["homeassistant/sensor/d1_temperature/config"]
	if temp["value_template"] != "{{ value_json.temperature }}" || temp["unit_of_measurement"] != "°C" ||
		temp["device_class"] != "temperature" || temp["state_class"] != "measurement" || temp["unique_id"] != "beacon_d1_temperature" {
		t.Errorf("temperature config: %v", temp)
	}
	if ok := configs["homeassistant/binary_sensor/d1_ok/config"]; ok["payload_on"] != "ON" || ok["value_template"] != "{{ 'ON' if value_json.ok else 'OFF' }}" {
		t.Errorf("binary sensor config: %v", ok)
	}

	// Retained: Home Assistant starting later finds them.
	late := bt.Dial(t, e.addr, creds("ha-late", "ha", token(t, "ha", "", time.Hour, []string{"beacon-test/#"}, []string{"homeassistant/#", "beacon-test/#"})))
	late.SubscribeT(t, paho.SubscribeOptions{Topic: "homeassistant/#", QoS: 1})
	if got := late.WaitMessages(t, 4, 10*time.Second); !got[0].Retain || !got[3].Retain {
		t.Errorf("discovery configs are not retained")
	}

	// A second reading updates the state only.
	d1.PublishT(t, &paho.Publish{Topic: "devices/d1/telemetry", QoS: 1, Payload: []byte{0x70, 0x08, 0x5a, 0x00}})
	if m := ha.WaitMessages(t, 6, 10*time.Second)[5]; m.Topic != "beacon/state/d1" {
		t.Fatalf("after a second reading: %s %s", m.Topic, m.Payload)
	}

	// Removing the device removes its entities.
	if code, _ := api(t, "DELETE", "http://"+e.b.HTTPAddr()+"/api/v1/devices/d1", adminToken, nil); code != 204 && code != 200 {
		t.Fatalf("remove d1: %d", code)
	}
	cleared := map[string]bool{}
	bt.WaitFor(t, 10*time.Second, "the entities to be removed", func() bool {
		for _, m := range ha.Messages()[6:] {
			if len(m.Payload) == 0 {
				cleared[m.Topic] = true
			}
		}
		return len(cleared) == 5
	})
	r := bt.Dial(t, e.addr, creds("ha-2", "ha", token(t, "ha", "", time.Hour, []string{"beacon-test/#"}, []string{"homeassistant/#", "beacon-test/#"})))
	r.SubscribeT(t, paho.SubscribeOptions{Topic: "homeassistant/#", QoS: 1})
	r.Barrier(t)
	for _, m := range r.Messages() {
		if strings.HasPrefix(m.Topic, "homeassistant/") {
			t.Errorf("retained discovery config left after removal: %s", m.Topic)
		}
	}
}

func contains(list []string, s string) bool {
	for _, v := range list {
		if v == s {
			return true
		}
	}
	return false
}

// retainedCount is the number of retained messages matching filter.
func retainedCount(b *broker.Broker, filter string) int {
	n := 0
	b.Engine().Retained(filter, func(*engine.Message) bool { n++; return true })
	return n
}
