package codec_test

import (
	"math"
	"strings"
	"testing"

	"github.com/beaconmq/beacon/devices/codec"
)

func TestCommands(t *testing.T) {
	f := func(v float64) *float64 { return &v }
	rule := func(cmds ...codec.Command) []codec.Rule {
		return []codec.Rule{{Filter: "devices/+/t", DeviceType: "plug", Config: codec.Config{Format: "json"}, Commands: cmds}}
	}
	rs, err := codec.NewRules(rule(codec.Command{Name: "relay", Type: "switch", State: "relay"},
		codec.Command{Name: "level", Type: "number", Min: f(0), Max: f(10), Step: f(0.5)},
		codec.Command{Name: "reboot", Type: "button"}, codec.Command{Name: "mode", Type: "select", Options: []string{"a", "b"}}))
	if err != nil {
		t.Fatal(err)
	}
	if got := rs.DeclaredCommands("plug"); len(got) != 4 || got[3].Options[1] != "b" {
		t.Fatalf("DeclaredCommands: %+v", got)
	}
	if got := rs.DeclaredCommands("other"); got != nil {
		t.Fatalf("another type: %+v", got)
	}
	for _, tc := range []struct {
		rules []codec.Rule
		want  string
	}{
		{rule(codec.Command{Name: "x-y", Type: "switch"}), "[0].commands[0].name"},
		{rule(codec.Command{Name: "a", Type: "switch"}, codec.Command{Name: "a", Type: "button"}), "[0].commands[1].name: \"a\" duplicates commands[0]"},
		{rule(codec.Command{Name: "a", Type: "light"}), "[0].commands[0].type"},
		{rule(codec.Command{Name: "a", Type: "select"}), "a select needs options"},
		{rule(codec.Command{Name: "a", Type: "select", Options: []string{"x", "x"}}), "option 1 is empty or repeated"},
		{rule(codec.Command{Name: "a", Type: "switch", Options: []string{"x"}}), "only a select has options"},
		{rule(codec.Command{Name: "a", Type: "number", Min: f(3), Max: f(3)}), "[0].commands[0].max"},
		{rule(codec.Command{Name: "a", Type: "number", Step: f(0)}), "[0].commands[0].step"},
		{rule(codec.Command{Name: "a", Type: "number", Min: f(math.Inf(-1))}), "[0].commands[0].min"},
		{rule(codec.Command{Name: "a", Type: "button", State: "x"}), "only a switch or a number"},
		{[]codec.Rule{{Filter: "a/#", Config: codec.Config{Format: "json"}, Commands: []codec.Command{{Name: "a", Type: "button"}}}}, "[0].commands: need a device_type"},
	} {
		if _, err := codec.NewRules(tc.rules); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%+v: got %v, want %q", tc.rules[0].Commands, err, tc.want)
		}
	}
}
