package topics

import (
	"strings"
	"testing"
)

func TestValidTopicName(t *testing.T) {
	tests := []struct {
		name  string
		topic string
		want  bool
	}{
		{"simple", "a/b/c", true},
		{"one level", "a", true},
		{"slash only", "/", true},
		{"empty levels", "a//b/", true},
		{"leading slash", "/finance", true},
		{"dollar", "$SYS/broker/uptime", true},
		{"space", "sport tennis", true},
		{"unicode", "temp/k\u00fcche/\u6e29\u5ea6", true},
		{"max length", strings.Repeat("a", MaxLen), true},
		{"empty", "", false},
		{"too long", strings.Repeat("a", MaxLen+1), false},
		{"plus level", "a/+/c", false},
		{"plus inside", "a+", false},
		{"hash level", "a/#", false},
		{"hash inside", "a#b", false},
		{"NUL", "a\x00b", false},
		{"invalid UTF-8", "a/\xff", false},
		{"truncated UTF-8", "a/\xc3", false},
		{"surrogate", "a/\xed\xa0\x80", false},
		{"overlong", "a/\xc0\xaf", false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := ValidTopicName(tc.topic); got != tc.want {
				t.Errorf("ValidTopicName(%q) = %v, want %v", tc.topic, got, tc.want)
			}
		})
	}
}

func TestValidFilter(t *testing.T) {
	tests := []struct {
		name   string
		filter string
		want   bool
	}{
		{"literal", "a/b/c", true},
		{"hash alone", "#", true},
		{"plus alone", "+", true},
		{"spec multi-level", "sport/tennis/player1/#", true},
		{"spec hash after level", "sport/#", true},
		{"plus first", "+/tennis/#", true},
		{"spec plus", "sport/+/player1", true},
		{"plus plus", "+/+", true},
		{"plus empty levels", "/+/", true},
		{"slash", "/", true},
		{"dollar", "$SYS/#", true},
		{"shared syntax", "$share/g/a", true},
		{"max length", strings.Repeat("a", MaxLen), true},
		{"empty", "", false},
		{"too long", strings.Repeat("a", MaxLen+1), false},
		{"plus suffix", "a+", false},
		{"plus prefix", "+a", false},
		{"plus inside level", "sport+", false},
		{"plus mid level", "a/b+c/d", false},
		{"hash not last", "a/#/b", false},
		{"spec hash suffix", "sport/tennis#", false},
		{"spec hash middle", "sport/tennis/#/ranking", false},
		{"hash prefix", "#a", false},
		{"hash slash", "#/", false},
		{"double hash", "##", false},
		{"plus hash", "+#", false},
		{"NUL", "a/\x00", false},
		{"invalid UTF-8", "\xff/#", false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := ValidFilter(tc.filter); got != tc.want {
				t.Errorf("ValidFilter(%q) = %v, want %v", tc.filter, got, tc.want)
			}
		})
	}
}

func TestParseShared(t *testing.T) {
	tests := []struct {
		name         string
		filter       string
		group, inner string
		shared, ok   bool
	}{
		{"plain", "a/b", "", "a/b", false, true},
		{"plain invalid", "a/#/b", "", "a/#/b", false, false},
		{"plain empty", "", "", "", false, false},
		{"share word alone", "$share", "", "$share", false, true},
		{"other dollar", "$SYS/#", "", "$SYS/#", false, true},
		{"shared", "$share/g1/a/b", "g1", "a/b", true, true},
		{"shared wildcard", "$share/workers/jobs/+/#", "workers", "jobs/+/#", true, true},
		{"shared hash", "$share/g/#", "g", "#", true, true},
		{"shared dollar inner", "$share/g/$SYS/#", "g", "$SYS/#", true, true},
		{"shared slash inner", "$share/g//", "g", "/", true, true},
		{"no filter", "$share/g", "g", "", true, false},
		{"empty filter", "$share/g/", "g", "", true, false},
		{"empty group", "$share//a", "", "a", true, false},
		{"nothing", "$share/", "", "", true, false},
		{"plus group", "$share/g+/a", "g+", "a", true, false},
		{"hash group", "$share/#/a", "#", "a", true, false},
		{"invalid inner", "$share/g/a+", "g", "a+", true, false},
		{"NUL group", "$share/g\x00/a", "g\x00", "a", true, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			group, inner, shared, ok := ParseShared(tc.filter)
			if group != tc.group || inner != tc.inner || shared != tc.shared || ok != tc.ok {
				t.Errorf("ParseShared(%q) = %q, %q, %v, %v, want %q, %q, %v, %v",
					tc.filter, group, inner, shared, ok, tc.group, tc.inner, tc.shared, tc.ok)
			}
		})
	}
}

// matchTests are shared by the tests of Match, Index.Match and
// Retained.Match. The first block is the examples of MQTT 5.0, 4.7.
var matchTests = []struct {
	filter, topic string
	want          bool
}{
	{"sport/tennis/player1/#", "sport/tennis/player1", true},
	{"sport/tennis/player1/#", "sport/tennis/player1/ranking", true},
	{"sport/tennis/player1/#", "sport/tennis/player1/score/wimbledon", true},
	{"sport/#", "sport", true},
	{"sport/tennis/+", "sport/tennis/player1", true},
	{"sport/tennis/+", "sport/tennis/player2", true},
	{"sport/tennis/+", "sport/tennis/player1/ranking", false},
	{"sport/+", "sport", false},
	{"sport/+", "sport/", true},
	{"sport/+", "sport/tennis/player1", false},
	{"+/+", "/finance", true},
	{"/+", "/finance", true},
	{"+", "/finance", false},
	{"#", "/", true},
	{"#", "$SYS/x", false},
	{"+/monitor/Clients", "$SYS/monitor/Clients", false},
	{"$SYS/#", "$SYS/x", true},
	{"$SYS/#", "$SYS", true},
	{"$SYS/monitor/+", "$SYS/monitor/Clients", true},

	{"a", "a", true},
	{"a", "b", false},
	{"a", "a/b", false},
	{"a/b", "a", false},
	{"a/#", "a", true},
	{"a/#", "a/", true},
	{"a/#", "ab", false},
	{"a/+/#", "a", false},
	{"a/+/#", "a/b", true},
	{"a/+/#", "a/b/c/d", true},
	{"+", "a", true},
	{"+", "$a", false},
	{"#", "a/b/c", true},
	{"#", "$", false},
	{"+/#", "$SYS/x", false},
	{"$SYS/+", "$SYS/", true},
	{"a/$b/+", "a/$b/c", true},
	{"+/$b", "a/$b", true},
	{"a//b", "a//b", true},
	{"a/+/b", "a//b", true},
	{"a/+/+", "a/b", false},
	{"/", "/", true},
	{"+/+", "/", true},
	{"+", "/", false},
}

func TestMatch(t *testing.T) {
	for _, tc := range matchTests {
		t.Run(tc.filter+" "+tc.topic, func(t *testing.T) {
			if got := Match(tc.filter, tc.topic); got != tc.want {
				t.Errorf("Match(%q, %q) = %v, want %v", tc.filter, tc.topic, got, tc.want)
			}
		})
	}
}

func TestLimitsCheck(t *testing.T) {
	l := Limits{MaxLength: 16, MaxLevels: 3}
	for _, tc := range []struct {
		topic string
		ok    bool
	}{
		{"a/b/c", true},
		{"a/b/c/d", false}, // 4 levels
		{strings.Repeat("x", 16), true},
		{strings.Repeat("x", 17), false},
		{"$share/g/a/b/c", true}, // the share prefix is no level of the filter
		{"$share/g/a/b/c/d", false},
	} {
		err := l.Check(tc.topic)
		if (err == nil) != tc.ok {
			t.Errorf("Check(%q) = %v, want ok %v", tc.topic, err, tc.ok)
		}
	}
	if err := (Limits{}).Check(strings.Repeat("a/", 1000)); err != nil {
		t.Errorf("zero Limits: %v", err)
	}
}
