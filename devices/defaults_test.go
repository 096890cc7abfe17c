package devices

import "testing"

func TestDefaultRules(t *testing.T) {
	a := NewAuthorizer(DefaultRules())
	dev := &Principal{Kind: DeviceKind, Name: "kitchen-1", ClientID: "c1"}
	other := &Principal{Kind: DeviceKind, Name: "hall-2"}
	anon := &Principal{Kind: Anonymous}
	user := &Principal{Kind: User, Name: "dashboard"}
	for _, tc := range []struct {
		name   string
		p      *Principal
		action Action
		topic  string
		want   bool
		rule   string
	}{
		{"own telemetry", dev, Publish, "devices/kitchen-1/temp", true, "built-in rule 1: allow publish devices/%u/# for device"},
		{"own root", dev, Publish, "devices/kitchen-1", true, "built-in rule 1: allow publish devices/%u/# for device"},
		{"another device's topic", dev, Publish, "devices/hall-2/temp", false, "no rule matched"},
		{"outside devices/", dev, Publish, "home/kitchen/temp", false, "no rule matched"},
		{"own commands", dev, Subscribe, "devices/kitchen-1/cmd/#", true, "built-in rule 2: allow subscribe devices/%u/cmd/# for device"},
		{"own command delivered", dev, Read, "devices/kitchen-1/cmd/set", true, "built-in rule 2: allow subscribe devices/%u/cmd/# for device"},
		{"own telemetry subscribe", dev, Subscribe, "devices/kitchen-1/#", false, "no rule matched"},
		{"others' commands", other, Subscribe, "devices/kitchen-1/cmd/#", false, "no rule matched"},
		{"everything", dev, Subscribe, "#", false, "no rule matched"},
		{"anonymous publish", anon, Publish, "devices/kitchen-1/temp", false, "no rule matched"},
		{"user publish", user, Publish, "devices/dashboard/x", false, "no rule matched"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ok, r := a.Decide(tc.p, tc.action, tc.topic)
			if ok != tc.want {
				t.Fatalf("Decide(%s %s) = %v, want %v", tc.action, tc.topic, ok, tc.want)
			}
			if got := a.Rules().Describe(r); got != tc.rule {
				t.Fatalf("decided by %q, want %q", got, tc.rule)
			}
			if a.Allowed(tc.p, tc.action, tc.topic) != tc.want {
				t.Fatal("Allowed disagrees with Decide")
			}
		})
	}
}

func TestDescribeFileRule(t *testing.T) {
	rs, err := ParseRules("acl.yaml", []byte("rules:\n  - subjects: [all]\n    actions: [subscribe]\n    topics: [\"devices/+/secrets/#\"]\n    effect: deny\n"))
	if err != nil {
		t.Fatal(err)
	}
	a := NewAuthorizer(rs)
	ok, r := a.Decide(&Principal{Kind: DeviceKind, Name: "d"}, Read, "devices/d/secrets/wifi")
	if ok {
		t.Fatal("allowed")
	}
	if got, want := rs.Describe(r), "acl.yaml:2 rule 1: deny subscribe devices/+/secrets/# for all"; got != want {
		t.Fatalf("got %q, want %q", got, want)
	}
}
