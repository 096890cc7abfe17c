package devices

import (
	"errors"
	"fmt"
	"strings"
	"testing"
)

func split(s string) []string { return strings.Split(s, "/") }

func TestMatches(t *testing.T) {
	cases := []struct {
		filter, topic string
		want          bool
	}{
		{"a/b", "a/b", true},
		{"a/b", "a/c", false},
		{"a/+", "a/b", true},
		{"a/+", "a", false},
		{"a/+", "a/b/c", false},
		{"a/#", "a", true}, // '#' includes the parent level
		{"a/#", "a/b/c", true},
		{"#", "a", true},
		{"#", "$SYS/broker/version", false}, // [MQTT-4.7.2-1]
		{"+/broker/version", "$SYS/broker/version", false},
		{"$SYS/#", "$SYS/broker/version", true},
		{"+", "", true},         // the empty topic level is a level
		{"a/+/c", "a//c", true}, // an empty level matches '+'
		{"a//c", "a//c", true},
		{"+/+", "/x", true},
		{"a", "a/b", false},
		{"a/b", "a", false},
	}
	for _, tc := range cases {
		if got := Matches(split(tc.filter), split(tc.topic)); got != tc.want {
			t.Errorf("Matches(%q, %q) = %v, want %v", tc.filter, tc.topic, got, tc.want)
		}
	}
}

func TestCovers(t *testing.T) {
	cases := []struct {
		filter, sub string
		want        bool
	}{
		{"a/#", "a/#", true},
		{"a/#", "a/b/+", true},
		{"a/#", "a", true},
		{"a/+", "a/b", true},
		{"a/+", "a/+", true},
		{"a/+", "a/#", false}, // a/# reaches a/b/c
		{"a/b", "a/+", false},
		{"#", "$SYS/#", false},
		{"#", "+/x", true},
		{"+/x", "#", false},
		{"devices/d1/#", "devices/+/#", false},
		{"devices/+/cmd/#", "devices/d1/cmd/reboot", true},
	}
	for _, tc := range cases {
		if got := Covers(split(tc.filter), split(tc.sub)); got != tc.want {
			t.Errorf("Covers(%q, %q) = %v, want %v", tc.filter, tc.sub, got, tc.want)
		}
	}
}

func TestOverlaps(t *testing.T) {
	cases := []struct {
		a, b string
		want bool
	}{
		{"a/#", "a", true},
		{"a/#", "b/#", false},
		{"a/+", "+/b", true},
		{"a/+/c", "a/b", false},
		{"#", "$beacon/presence/#", false},
		{"+/x", "$SYS/x", false},
		{"$beacon/#", "$beacon/presence/d1", true},
		{"devices/+/telemetry", "devices/d1/#", true},
		{"devices/+/telemetry", "devices/d1/status", false},
		{"a/b", "a/b", true},
		{"a/b", "a/b/c", false},
	}
	for _, tc := range cases {
		if got := Overlaps(split(tc.a), split(tc.b)); got != tc.want {
			t.Errorf("Overlaps(%q, %q) = %v, want %v", tc.a, tc.b, got, tc.want)
		}
		if got := Overlaps(split(tc.b), split(tc.a)); got != tc.want {
			t.Errorf("Overlaps(%q, %q) = %v, want %v (not symmetric)", tc.b, tc.a, got, tc.want)
		}
	}
}

const exampleRules = `
rules:
  - subjects: [device]
    actions: [publish]
    topics: ["devices/%u/#"]
    effect: allow
  - subjects: [device]
    actions: [subscribe]
    topics: ["devices/%u/cmd/#"]
    effect: allow
  - subjects: ["role:viewer"]
    actions: [subscribe]
    topics: ["devices/#"]
    effect: allow
  - subjects: ["role:viewer"]
    actions: [subscribe]
    topics: ["devices/+/secrets/#"]
    effect: deny
  - subjects: ["device-type:camera"]
    actions: [all]
    topics: ["cams/%c"]
    effect: allow
  - subjects: ["user:ops"]
    actions: [all]
    topics: ["#"]
    effect: allow
  - subjects: [all]
    actions: [publish]
    topics: ["devices/+/cmd/shutdown"]
    effect: deny
  - subjects: [anonymous]
    actions: [subscribe]
    topics: ["public/#"]
    effect: allow
max_payload:
  thermostat: 16
  "*": 1024
`

func TestAuthorizer(t *testing.T) {
	rs, err := ParseRules("acl.yaml", []byte(exampleRules))
	if err != nil {
		t.Fatal(err)
	}
	a := NewAuthorizer(rs)
	dev := &Principal{Kind: DeviceKind, Name: "d1", DeviceType: "thermostat", ClientID: "c1"}
	cam := &Principal{Kind: DeviceKind, Name: "cam1", DeviceType: "camera", ClientID: "cam-client"}
	viewer := &Principal{Kind: User, Name: "alice", Role: "viewer"}
	ops := &Principal{Kind: User, Name: "ops"}
	anon := &Principal{Kind: Anonymous}
	jwt := &Principal{Kind: User, Name: "ha", Publish: []string{"home/cmd/#"}, Subscribe: []string{"home/#"}}
	evil := &Principal{Kind: DeviceKind, Name: "d1/+", ClientID: "x"}

	cases := []struct {
		name   string
		p      *Principal
		action Action
		topic  string
		want   bool
	}{
		{"device publishes under its id", dev, Publish, "devices/d1/telemetry", true},
		{"device publishes at its root", dev, Publish, "devices/d1", true},
		{"device publishes under another id", dev, Publish, "devices/d2/telemetry", false},
		{"device subscribes to its commands", dev, Subscribe, "devices/d1/cmd/#", true},
		{"device subscribes beyond its commands", dev, Subscribe, "devices/d1/#", false},
		{"device reads its command", dev, Read, "devices/d1/cmd/reboot", true},
		{"device reads another's command", dev, Read, "devices/d2/cmd/reboot", false},
		{"deny beats allow, wherever it stands", dev, Publish, "devices/d1/cmd/shutdown", false},
		{"viewer subscribes to everything under devices", viewer, Subscribe, "devices/#", true},
		{"viewer subscribes to a shared subscription", viewer, Subscribe, "$share/g/devices/+/telemetry", true},
		{"viewer cannot publish", viewer, Publish, "devices/d1/telemetry", false},
		{"viewer reads telemetry", viewer, Read, "devices/d1/telemetry", true},
		{"a wildcard crossing a deny: the denied part is withheld", viewer, Read, "devices/d1/secrets/key", false},
		{"a subscription inside the deny is refused", viewer, Subscribe, "devices/d1/secrets/#", false},
		{"camera by client id", cam, Publish, "cams/cam-client", true},
		{"camera by another client id", cam, Publish, "cams/other", false},
		{"ops may do anything", ops, Subscribe, "#", true},
		{"but '#' is not $SYS", ops, Read, "$SYS/broker/uptime", false},
		{"anonymous reads public", anon, Read, "public/weather", true},
		{"anonymous publishes nothing", anon, Publish, "public/weather", false},
		{"jwt claim grants publish", jwt, Publish, "home/cmd/light", true},
		{"jwt claim grants subscribe", jwt, Subscribe, "home/kitchen/#", true},
		{"jwt claim does not reach beyond", jwt, Publish, "home/status", false},
		{"deny beats a jwt claim too", &Principal{Kind: User, Name: "x", Publish: []string{"#"}}, Publish, "devices/d9/cmd/shutdown", false},
		{"%u with a wildcard in the id never matches", evil, Publish, "devices/d1/+/x", false},
		{"no rule: deny", dev, Subscribe, "elsewhere/#", false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if got := a.Allowed(tc.p, tc.action, tc.topic); got != tc.want {
				t.Fatalf("Allowed(%s:%s, %s, %q) = %v, want %v", tc.p.Kind, tc.p.Name, tc.action, tc.topic, got, tc.want)
			}
		})
	}

	// The publish policy in the same file.
	pol := MaxPayload{Authorizer: a}
	if err := pol.CheckPublish(dev, "devices/d1/t", make([]byte, 17)); !errors.Is(err, ErrPayloadTooLarge) {
		t.Fatalf("17 bytes from a thermostat: %v", err)
	}
	if err := pol.CheckPublish(dev, "devices/d1/t", make([]byte, 16)); err != nil {
		t.Fatal(err)
	}
	if err := pol.CheckPublish(cam, "cams/cam-client", make([]byte, 1025)); !errors.Is(err, ErrPayloadTooLarge) {
		t.Fatalf("the '*' limit: %v", err)
	}
	if err := pol.CheckPublish(ops, "x", make([]byte, 1<<20)); err != nil {
		t.Fatalf("users are not limited by device type: %v", err)
	}
}

func TestParseRulesErrors(t *testing.T) {
	cases := []struct{ doc, want string }{
		{"rules:\n  - subjects: [devce]\n    actions: [publish]\n    topics: [a]\n    effect: allow\n", `acl.yaml:2: rule 1: unknown subject "devce"`},
		{"rules:\n  - subjects: [all]\n    actions: [publish]\n    topics: [a]\n    effect: allow\n  - subjects: [all]\n    actions: [read]\n    topics: [a]\n    effect: allow\n", `acl.yaml:6: rule 2: unknown action "read"`},
		{"rules:\n  - subjects: [all]\n    actions: [all]\n    topics: [a/#/b]\n    effect: allow\n", `rule 1: topic "a/#/b": '#' must be the last level`},
		{"rules:\n  - subjects: [all]\n    actions: [all]\n    topics: [a+]\n    effect: allow\n", "wildcards must stand as whole levels"},
		{"rules:\n  - subjects: [all]\n    actions: [all]\n    topics: [dev-%u]\n    effect: allow\n", "%u and %c must stand as whole levels"},
		{"rules:\n  - subjects: [all]\n    actions: [all]\n    topics: [a]\n    effect: maybe\n", `effect "maybe" is not allow or deny`},
		{"rules:\n  - subjects: [all]\n    actions: [all]\n    topics: [a]\n    effect: allow\n    extra: 1\n", `unknown key "extra"`},
		{"rules:\n  - subjects: [role]\n    actions: [all]\n    topics: [a]\n    effect: allow\n", `subject "role" needs a value`},
		{"rule: []\n", `acl.yaml:1: unknown key "rule"`},
		{"max_payload:\n  x: -1\n", "not a positive size"},
		{"rules: [\n", "acl.yaml: yaml:"},
	}
	for _, tc := range cases {
		_, err := ParseRules("acl.yaml", []byte(tc.doc))
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("ParseRules(%q) = %v, want an error containing %q", tc.doc, err, tc.want)
		}
	}
}

func FuzzMatchesCovers(f *testing.F) {
	for _, s := range [][2]string{{"a/#", "a"}, {"+/b", "$x/b"}, {"a/+/c", "a//c"}, {"#", "+/#"}, {"a/b", "a/b/#"}} {
		f.Add(s[0], s[1])
	}
	f.Fuzz(func(t *testing.T, filter, other string) {
		if validRuleFilter(filter) != nil || validRuleFilter(other) != nil {
			return
		}
		fl, ol := split(filter), split(other)
		if Covers(fl, ol) && !strings.ContainsAny(other, "+#") && !Matches(fl, ol) {
			t.Fatalf("%q covers the topic %q but does not match it", filter, other)
		}
		if !strings.ContainsAny(other, "+#") && Matches(fl, ol) != Covers(fl, ol) {
			t.Fatalf("for a plain topic, Covers(%q, %q) must equal Matches", filter, other)
		}
		if !strings.ContainsAny(other, "+#") && MatchesTopic(fl, other) != Matches(fl, ol) {
			t.Fatalf("MatchesTopic(%q, %q) = %v, Matches says %v", filter, other, MatchesTopic(fl, other), Matches(fl, ol))
		}
		if Overlaps(fl, ol) != Overlaps(ol, fl) {
			t.Fatalf("Overlaps(%q, %q) is not symmetric", filter, other)
		}
		if !strings.ContainsAny(other, "+#") && Matches(fl, ol) && !Overlaps(fl, ol) {
			t.Fatalf("%q matches the topic %q but does not overlap it", filter, other)
		}
		if Covers(fl, ol) && !Overlaps(fl, ol) {
			t.Fatalf("%q covers %q but does not overlap it", filter, other)
		}
		if Covers(fl, fl) != true && !strings.HasPrefix(filter, "$") {
			t.Fatalf("%q does not cover itself", filter)
		}
	})
}

func FuzzParseRules(f *testing.F) {
	f.Add(exampleRules)
	f.Add("rules:\n  - {subjects: [all], actions: [all], topics: ['#'], effect: deny}\n")
	f.Fuzz(func(t *testing.T, doc string) {
		rs, err := ParseRules("fuzz.yaml", []byte(doc))
		if err != nil {
			var re *RuleError
			if !errors.As(err, &re) {
				t.Fatalf("error %v is not a *RuleError", err)
			}
			return
		}
		a := NewAuthorizer(rs)
		p := &Principal{Kind: DeviceKind, Name: "d", ClientID: "c"}
		for _, act := range []Action{Publish, Subscribe, Read} {
			_ = a.Allowed(p, act, "devices/d/x")
		}
	})
}

// BenchmarkAuthorizer1000Rules: one check against 1,000 rules, as the
// broker makes for every publish and every delivery.
func BenchmarkAuthorizer1000Rules(b *testing.B) {
	var doc strings.Builder
	doc.WriteString("rules:\n")
	for i := range 1000 {
		fmt.Fprintf(&doc, "  - subjects: [\"device-type:t%d\", \"role:r%d\"]\n    actions: [publish]\n    topics: [\"site/%d/+/%%u/#\"]\n    effect: allow\n", i, i, i)
	}
	doc.WriteString("  - subjects: [device]\n    actions: [all]\n    topics: [\"devices/%u/#\"]\n    effect: allow\n")
	rs, err := ParseRules("bench.yaml", []byte(doc.String()))
	if err != nil {
		b.Fatal(err)
	}
	a := NewAuthorizer(rs)
	p := &Principal{Kind: DeviceKind, Name: "d42", DeviceType: "t999", ClientID: "c42"}
	for _, bc := range []struct{ name, topic string }{
		{"last-rule-allows", "devices/d42/telemetry"},
		{"type-rule-allows", "site/999/x/d42/temp"},
		{"no-rule-denies", "other/topic/here"},
	} {
		b.Run(bc.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				a.Allowed(p, Publish, bc.topic)
			}
		})
	}
}

func TestDocumentedExampleParses(t *testing.T) {
	rs, err := LoadRules("../docs/acl.example.yaml")
	if err != nil {
		t.Fatal(err)
	}
	a := NewAuthorizer(rs)
	dev := &Principal{Kind: DeviceKind, Name: "kitchen-1", DeviceType: "thermostat"}
	viewer := &Principal{Kind: User, Name: "wall-panel", Role: "viewer"}
	ops := &Principal{Kind: User, Name: "me", Role: "ops"}
	for _, tc := range []struct {
		p      *Principal
		action Action
		topic  string
		want   bool
	}{
		{dev, Publish, "devices/kitchen-1/telemetry", true},
		{dev, Subscribe, "devices/kitchen-1/cmd/#", true},
		{dev, Publish, "devices/hall-2/telemetry", false},
		{viewer, Subscribe, "devices/#", true},
		{viewer, Read, "devices/kitchen-1/secrets/wifi", false},
		{viewer, Publish, "devices/kitchen-1/cmd/on", false},
		{ops, Read, "$SYS/broker/uptime", true},
	} {
		if got := a.Allowed(tc.p, tc.action, tc.topic); got != tc.want {
			t.Errorf("%s %s %q: %v, want %v", tc.p.Name, tc.action, tc.topic, got, tc.want)
		}
	}
	if rs.MaxPayload["thermostat"] != 256 {
		t.Fatalf("max_payload: %v", rs.MaxPayload)
	}
}
