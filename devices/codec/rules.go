package codec

import (
	"fmt"
	"strings"
	"sync/atomic"

	"github.com/beaconmq/beacon/devices"
)

// Rule chooses a format for messages: those on topics matching Filter
// and, when DeviceType is set, published by a device of that type.
type Rule struct {
	Filter     string
	DeviceType string
	Config
	// Commands are what devices of DeviceType can be told (Home
	// Assistant controls); they need a DeviceType.
	Commands []Command
}

// Rules pick and run the decoder of a message: the first rule that
// matches it. They are safe for concurrent use.
type Rules struct {
	rules    []compiled
	decoded  atomic.Int64
	failures atomic.Int64
}

type compiled struct {
	Rule
	levels []string
	dec    *Decoder
}

// NewRules compiles rules; an error names the rule by index and key, as
// "codecs[1].fields[0].type".
func NewRules(rules []Rule) (*Rules, error) {
	out := &Rules{}
	for i, r := range rules {
		if r.Filter == "" {
			return nil, &ConfigError{Key: fmt.Sprintf("[%d].filter", i), Msg: "required: the topic filter the format applies to"}
		}
		if err := validateCommands(r.Commands); err != nil {
			ce := err.(*ConfigError)
			return nil, &ConfigError{Key: fmt.Sprintf("[%d].%s", i, ce.Key), Msg: ce.Msg}
		}
		if len(r.Commands) > 0 && r.DeviceType == "" {
			return nil, &ConfigError{Key: fmt.Sprintf("[%d].commands", i), Msg: "need a device_type: commands belong to a type of device"}
		}
		d, err := New(r.Config)
		if err != nil {
			if ce, ok := err.(*ConfigError); ok {
				return nil, &ConfigError{Key: fmt.Sprintf("[%d].%s", i, ce.Key), Msg: ce.Msg}
			}
			return nil, fmt.Errorf("[%d]: %w", i, err)
		}
		out.rules = append(out.rules, compiled{Rule: r, levels: strings.Split(r.Filter, "/"), dec: d})
	}
	return out, nil
}

// Len is the number of rules.
func (rs *Rules) Len() int {
	if rs == nil {
		return 0
	}
	return len(rs.rules)
}

// find is the first rule matching a message on topic from a device of
// deviceType ("" when the publisher is not a device), or nil.
func (rs *Rules) find(topic, deviceType string) *compiled {
	if rs == nil {
		return nil
	}
	for i := range rs.rules {
		r := &rs.rules[i]
		if (r.DeviceType == "" || r.DeviceType == deviceType) && devices.MatchesTopic(r.levels, topic) {
			return r
		}
	}
	return nil
}

// Decode decodes a payload by the matching rule. It returns nil when no
// rule matches, the format is raw, or the payload does not decode (then
// counted as a failure and returned as err: the message itself still
// flows raw).
func (rs *Rules) Decode(topic, deviceType string, payload []byte) (map[string]any, error) {
	r := rs.find(topic, deviceType)
	if r == nil {
		return nil, nil
	}
	v, err := r.dec.Decode(payload)
	if err != nil {
		rs.failures.Add(1)
		return nil, err
	}
	if v != nil {
		rs.decoded.Add(1)
	}
	return v, nil
}

// Fields are the readings of the matching rule, with units and device
// classes, or nil.
func (rs *Rules) Fields(topic, deviceType string) []Field {
	if r := rs.find(topic, deviceType); r != nil {
		return r.dec.Fields()
	}
	return nil
}

// Stats are the counts of payloads decoded and of payloads that failed to.
func (rs *Rules) Stats() (decoded, failures int64) {
	if rs == nil {
		return 0, 0
	}
	return rs.decoded.Load(), rs.failures.Load()
}

// DeclaredFields are the fields declared, with a type, by the rules that
// name deviceType: what a device of that type will report.
func (rs *Rules) DeclaredFields(deviceType string) []Field {
	if rs == nil || deviceType == "" {
		return nil
	}
	var out []Field
	for i := range rs.rules {
		if rs.rules[i].DeviceType != deviceType {
			continue
		}
		for _, f := range rs.rules[i].dec.Fields() {
			if f.Type != "" {
				out = append(out, f)
			}
		}
	}
	return out
}
