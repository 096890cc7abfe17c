package devices_test

import (
	"strings"
	"testing"

	"github.com/beaconmq/beacon/devices"
)

func TestConvertMosquittoACL(t *testing.T) {
	const acl = "# comment\n" +
		"topic read public/#\n" +
		"\n" +
		"user alice\n" +
		"topic home/#\n" + // no access word: readwrite
		"topic   deny   home/secret  \n" +
		"topic write logs/with space\n" +
		"user bob\n" +
		"topic read bob/#\n" +
		"pattern write devices/%u/#\n" +
		"pattern deny bob/%c/x\n"
	conv, err := devices.ConvertMosquittoACL("mosquitto.acl", strings.NewReader(acl))
	if err != nil {
		t.Fatal(err)
	}
	rs, err := devices.ParseRules("rules.yaml", conv.YAML)
	if err != nil {
		t.Fatalf("%v\n%s", err, conv.YAML)
	}
	if len(rs.Rules) != 7 {
		t.Fatalf("%d rules:\n%s", len(rs.Rules), conv.YAML)
	}
	// bob's own "read bob/#" overlaps the pattern deny: Mosquitto lets bob's line win.
	if len(conv.Warnings) != 1 || !strings.Contains(conv.Warnings[0], `line 11: Beacon denies "bob/%c/x" to device bob for reading where line 9`) {
		t.Fatalf("warnings: %q", conv.Warnings)
	}
	if !strings.Contains(string(conv.YAML), "# line 6 (user alice): topic   deny   home/secret") {
		t.Fatalf("no comment naming the line:\n%s", conv.YAML)
	}
	a := devices.NewAuthorizer(rs)
	alice := &devices.Principal{Kind: devices.DeviceKind, Name: "alice", ClientID: "a1"}
	bob := &devices.Principal{Kind: devices.DeviceKind, Name: "bob", ClientID: "b1"}
	anon := &devices.Principal{Kind: devices.Anonymous, ClientID: "x"}
	for _, tc := range []struct {
		p      *devices.Principal
		action devices.Action
		topic  string
		want   bool
	}{
		{alice, devices.Publish, "home/kitchen", true},
		{alice, devices.Read, "home/kitchen", true},
		{alice, devices.Publish, "home/secret", false},
		{alice, devices.Publish, "logs/with space", true},
		{alice, devices.Read, "logs/with space", false},
		{alice, devices.Publish, "devices/alice/t", true},
		{alice, devices.Publish, "devices/bob/t", false},
		{bob, devices.Publish, "home/kitchen", false}, // device:alice is alice only
		{bob, devices.Read, "bob/a/x", true},
		{bob, devices.Read, "bob/b1/x", false}, // the pattern deny, %c = b1
		{anon, devices.Read, "public/news", true},
		{anon, devices.Publish, "public/news", false},
		{alice, devices.Read, "public/news", false}, // the general section is for anonymous clients only
	} {
		if got := a.Allowed(tc.p, tc.action, tc.topic); got != tc.want {
			t.Errorf("%s %s %q = %v, want %v", tc.p.Name, tc.action, tc.topic, got, tc.want)
		}
	}
}

func TestConvertMosquittoACLErrors(t *testing.T) {
	for _, tc := range []struct{ acl, want string }{
		{"topic\n", "acl:1: empty topic"},
		{"topic maybe a/b\n", `acl:1: invalid access "maybe"`},
		{"user\n", "acl:1: missing username"},
		{"user a/b\n", "cannot be a Beacon device id"},
		{"\nfoo bar\n", `acl:2: unknown line "foo"`},
		{"topic read a/#/b\n", "acl:1: "},
		{"pattern read dev/%u-x\n", "Beacon substitutes them only as whole levels"},
		{"user a\ntopic read devices/%u\n", "acl:2: a topic line takes %u and %c literally"},
	} {
		if _, err := devices.ConvertMosquittoACL("acl", strings.NewReader(tc.acl)); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: got %v, want %q", tc.acl, err, tc.want)
		}
	}
	conv, err := devices.ConvertMosquittoACL("acl", strings.NewReader("# nothing\n"))
	if err != nil {
		t.Fatal(err)
	}
	if rs, err := devices.ParseRules("r", conv.YAML); err != nil || len(rs.Rules) != 0 {
		t.Fatalf("empty: %v %+v", err, rs)
	}
}

func TestDeviceSubject(t *testing.T) {
	if _, err := devices.ParseSubject("device:a/b"); err == nil {
		t.Fatal("device:a/b accepted")
	}
	s, err := devices.ParseSubject("device:kitchen-1")
	if err != nil || s.String() != "device:kitchen-1" {
		t.Fatalf("%v %v", s, err)
	}
	if !s.Matches(&devices.Principal{Kind: devices.DeviceKind, Name: "kitchen-1"}) ||
		s.Matches(&devices.Principal{Kind: devices.DeviceKind, Name: "kitchen-2"}) ||
		s.Matches(&devices.Principal{Kind: devices.User, Name: "kitchen-1"}) {
		t.Fatal("device:ID selects the wrong principals")
	}
}
