package codec

import (
	"fmt"
	"slices"
)

// Command kinds, the values of Command.Type: the Home Assistant entity a
// command becomes.
const (
	CommandSwitch = "switch"
	CommandNumber = "number"
	CommandButton = "button"
	CommandSelect = "select"
)

// Command is something a device of a type can be told: Home Assistant
// shows it as a control that publishes to devices/<id>/cmd/<name>.
type Command struct {
	// Name is the last level of the command topic:
	// [A-Za-z_][A-Za-z0-9_]{0,63}, unique within a rule.
	Name string `yaml:"name" json:"name"`
	// Type is switch (payloads ON and OFF), number (the number as text),
	// button (PRESS) or select (one of Options).
	Type string `yaml:"type" json:"type"`
	// Label is the control's name; empty: made from Name.
	Label string `yaml:"label,omitempty" json:"label,omitempty"`
	// State names a reading of the device (a field) that reports a
	// switch's or a number's current value; empty: Home Assistant assumes
	// the command took effect.
	State string `yaml:"state,omitempty" json:"state,omitempty"`
	// Min, Max and Step bound a number (Home Assistant's defaults: 1, 100,
	// 1); Unit is its unit.
	Min  *float64 `yaml:"min,omitempty" json:"min,omitempty"`
	Max  *float64 `yaml:"max,omitempty" json:"max,omitempty"`
	Step *float64 `yaml:"step,omitempty" json:"step,omitempty"`
	Unit string   `yaml:"unit,omitempty" json:"unit,omitempty"`
	// Options are a select's choices.
	Options []string `yaml:"options,omitempty" json:"options,omitempty"`
}

// validateCommands checks a rule's commands; keys are "commands[i].k".
func validateCommands(cmds []Command) error {
	bad := func(i int, key, format string, a ...any) error {
		return &ConfigError{Key: fmt.Sprintf("commands[%d].%s", i, key), Msg: fmt.Sprintf(format, a...)}
	}
	seen := map[string]int{}
	for i, c := range cmds {
		switch {
		case !isIdent(c.Name):
			return bad(i, "name", "%q is not an identifier ([A-Za-z_][A-Za-z0-9_]{0,63})", c.Name)
		case seen[c.Name] > 0:
			return bad(i, "name", "%q duplicates commands[%d]", c.Name, seen[c.Name]-1)
		case c.State != "" && !isIdent(c.State):
			return bad(i, "state", "%q is not a field name", c.State)
		case len(c.Label) > 256:
			return bad(i, "label", "longer than 256 bytes")
		}
		seen[c.Name] = i + 1
		switch c.Type {
		case CommandSwitch, CommandButton:
		case CommandNumber:
			for k, v := range map[string]*float64{"min": c.Min, "max": c.Max, "step": c.Step} {
				if v != nil && !finite(*v) {
					return bad(i, k, "%v is not a finite number", *v)
				}
			}
			if c.Min != nil && c.Max != nil && *c.Min >= *c.Max {
				return bad(i, "max", "%v is not above min %v", *c.Max, *c.Min)
			}
			if c.Step != nil && *c.Step <= 0 {
				return bad(i, "step", "%v is not positive", *c.Step)
			}
		case CommandSelect:
			if len(c.Options) == 0 {
				return bad(i, "options", "a select needs options")
			}
			for j, o := range c.Options {
				if o == "" || slices.Index(c.Options, o) != j {
					return bad(i, "options", "option %d is empty or repeated", j)
				}
			}
		default:
			return bad(i, "type", "%q is not switch, number, button or select", c.Type)
		}
		if c.Type != CommandSelect && len(c.Options) > 0 {
			return bad(i, "options", "only a select has options")
		}
		if c.State != "" && c.Type != CommandSwitch && c.Type != CommandNumber {
			return bad(i, "state", "only a switch or a number shows a reading as its state")
		}
	}
	return nil
}

// DeclaredCommands are the commands of the rules that name deviceType.
func (rs *Rules) DeclaredCommands(deviceType string) []Command {
	if rs == nil || deviceType == "" {
		return nil
	}
	var out []Command
	for i := range rs.rules {
		if rs.rules[i].DeviceType == deviceType {
			out = append(out, rs.rules[i].Commands...)
		}
	}
	return out
}
