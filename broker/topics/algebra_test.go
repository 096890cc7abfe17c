package topics

import (
	"strings"
	"testing"
)

func TestMatchLevelCases(t *testing.T) {
	tests := []struct {
		filter, topic string
		want          bool
	}{
		{"a/b", "a/b", true},
		{"a/b", "a/c", false},
		{"a/b", "a/b/c", false},
		{"a/b/c", "a/b", false},
		{"a/+", "a/b", true},
		{"a/+", "a/", true},
		{"a/+", "a", false},
		{"a/+", "a/b/c", false},
		{"+/+", "/x", true},
		{"+", "", true},
		{"a/#", "a", true},
		{"a/#", "a/b/c", true},
		{"a/#", "ab", false},
		{"#", "anything/at/all", true},
		{"#", "$SYS/x", false},
		{"+/x", "$SYS/x", false},
		{"$SYS/#", "$SYS/x", true},
		{"a//b", "a//b", true},
		{"a//b", "a/b", false},
		{"", "", true},
	}
	for _, tc := range tests {
		if got := Match(tc.filter, tc.topic); got != tc.want {
			t.Errorf("Match(%q, %q) = %v, want %v", tc.filter, tc.topic, got, tc.want)
		}
	}
}

func TestCoversOverlaps(t *testing.T) {
	tests := []struct {
		a, b             string
		covers, overlaps bool // covers: a covers b
	}{
		{"#", "a/b", true, true},
		{"a/#", "a", true, true},
		{"a/#", "a/+/c", true, true},
		{"a/+", "a/#", false, true},
		{"a/+", "a/b", true, true},
		{"a/b", "a/+", false, true},
		{"a/b", "a/c", false, false},
		{"a/b", "a/b/c", false, false},
		{"+/b", "a/+", false, true},
		{"#", "$SYS/#", false, false},
		{"$SYS/#", "$SYS/a", true, true},
		{"a/+/c", "a/b/c", true, true},
		{"a/+/c", "a/b/d", false, false},
	}
	for _, tc := range tests {
		a, b := strings.Split(tc.a, "/"), strings.Split(tc.b, "/")
		if got := Covers(a, b); got != tc.covers {
			t.Errorf("covers(%q, %q) = %v", tc.a, tc.b, got)
		}
		if got := Overlaps(a, b); got != tc.overlaps {
			t.Errorf("overlaps(%q, %q) = %v", tc.a, tc.b, got)
		}
		if got := Overlaps(b, a); got != tc.overlaps {
			t.Errorf("overlaps(%q, %q) = %v", tc.b, tc.a, got)
		}
	}
}

// CheckFilter says why exactly when ValidFilter says no.
func TestCheckFilterAgreesWithValidFilter(t *testing.T) {
	for _, f := range []string{"", "a", "a/b", "#", "+", "a/+/b", "a/#", "/", "//", "a+", "+a", "a/#/b", "#a", "a#",
		"a\x00b", "\xff", "$share/g/a", "$SYS/#", strings.Repeat("a", MaxLen), strings.Repeat("a", MaxLen+1)} {
		if err := CheckFilter(f); (err == nil) != ValidFilter(f) {
			t.Errorf("%q: CheckFilter %v, ValidFilter %v", f, err, ValidFilter(f))
		}
	}
}
