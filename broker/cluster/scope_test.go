package cluster

import (
	"testing"

	"github.com/beaconmq/beacon/broker/engine"
)

func TestInterestKeys(t *testing.T) {
	for _, c := range []struct{ filter, group, key string }{
		{"a/+/b", "", "a/+/b"},
		{"a/#", "g1", "$share/g1/a/#"},
		{"$SYS/#", "", "$SYS/#"},
		{"x/y", "g/h", "$share/g/h/x/y"}, // a group cannot hold '/': the first one ends it
	} {
		if k := interestKey(c.filter, c.group); k != c.key {
			t.Errorf("interestKey(%q, %q) = %q, want %q", c.filter, c.group, k, c.key)
		}
	}
	if f, g := parseInterestKey("$share/g1/a/#"); f != "a/#" || g != "g1" {
		t.Errorf("parse: %q %q", f, g)
	}
	if f, g := parseInterestKey("a/#"); f != "a/#" || g != "" {
		t.Errorf("parse: %q %q", f, g)
	}
}

func TestScopeRoundTrip(t *testing.T) {
	for _, sc := range []*engine.Scope{{}, {NoDirect: true}, {Groups: []string{"g\x00a/#", "h\x00b/+"}}, {NoDirect: true, Groups: []string{"g\x00x"}}} {
		enc := encodeScope(sc)
		if !sc.NoDirect && len(sc.Groups) == 0 && enc != "" {
			t.Errorf("the common scope costs %q, want nothing", enc)
		}
		got, err := decodeScope(enc)
		if err != nil || got.NoDirect != sc.NoDirect || len(got.Groups) != len(sc.Groups) {
			t.Fatalf("scope %+v: %q decodes to %+v, %v", sc, enc, got, err)
		}
		for i := range sc.Groups {
			if got.Groups[i] != sc.Groups[i] {
				t.Fatalf("group %d: %q, want %q", i, got.Groups[i], sc.Groups[i])
			}
		}
	}
	if _, err := decodeScope("{not json"); err == nil {
		t.Error("a damaged scope decodes")
	}
}

func TestLivePayload(t *testing.T) {
	for _, scope := range []string{"", `{"NoDirect":true}`} {
		for _, origin := range []string{"", "a/1f/2a"} {
			p := string(livePayload(scope, origin, []byte("the message")))
			sc, o, body, ok := parseLive(p)
			if !ok || sc != scope || o != origin || body != "the message" {
				t.Fatalf("%q: parsed %q %q %q %v", p, sc, o, body, ok)
			}
			if _, _, _, ok := parseLive(p[:1+len(scope)/2]); ok && scope != "" {
				t.Fatalf("a truncated payload %q parses", p[:1+len(scope)/2])
			}
		}
	}
	if _, _, _, ok := parseLive(""); ok {
		t.Fatal("an empty payload parses")
	}
}
