package topics

import (
	"errors"
	"fmt"
	"strings"
	"unicode/utf8"
)

// MaxLen is the longest topic name or filter in bytes: an MQTT UTF-8 string
// carries a 16-bit length.
const MaxLen = 65535

// sharePrefix starts a shared subscription's filter (MQTT 5.0, 4.8.2).
const sharePrefix = "$share/"

// validString applies the rules every MQTT topic string shares: 1 to
// MaxLen bytes of well-formed UTF-8 (which excludes the surrogates
// U+D800..U+DFFF) without U+0000.
func validString(s string) bool {
	return len(s) > 0 && len(s) <= MaxLen &&
		strings.IndexByte(s, 0) < 0 && utf8.ValidString(s)
}

// ValidTopicName reports whether name may be the topic of a PUBLISH: a
// valid MQTT string without the wildcards '+' and '#'.
func ValidTopicName(name string) bool {
	return validString(name) && !strings.ContainsAny(name, "+#")
}

// ValidFilter reports whether filter is a syntactically valid topic filter:
// a valid MQTT string in which '+' and '#' stand as whole levels and '#'
// only as the last one. It checks syntax only: "$share/g/a" passes as the
// filter it would be in MQTT 3.1.1. A SUBSCRIBE filter goes through
// ParseShared, which splits shared subscriptions off and validates both.
func ValidFilter(filter string) bool {
	if !validString(filter) {
		return false
	}
	for i := 0; i < len(filter); i++ {
		c := filter[i]
		if c != '+' && c != '#' {
			continue
		}
		if i > 0 && filter[i-1] != '/' {
			return false // "a+", "a#"
		}
		if c == '#' && i != len(filter)-1 {
			return false // "#a", "a/#/b"
		}
		if i+1 < len(filter) && filter[i+1] != '/' {
			return false // "+a"
		}
	}
	return true
}

// CheckFilter is ValidFilter with the reason, for configuration and rule
// files that name what is wrong.
func CheckFilter(filter string) error {
	switch {
	case filter == "":
		return errors.New("empty topic filter")
	case len(filter) > MaxLen:
		return fmt.Errorf("topic filter longer than %d bytes", MaxLen)
	case strings.IndexByte(filter, 0) >= 0 || !utf8.ValidString(filter):
		return fmt.Errorf("topic %q: not valid UTF-8 without U+0000", filter)
	}
	levels := strings.Split(filter, "/")
	for i, l := range levels {
		switch {
		case l == "#" && i != len(levels)-1:
			return fmt.Errorf("topic %q: '#' must be the last level", filter)
		case l != "#" && l != "+" && strings.ContainsAny(l, "#+"):
			return fmt.Errorf("topic %q: wildcards must stand as whole levels", filter)
		}
	}
	return nil
}

// ParseShared splits a SUBSCRIBE filter. For "$share/{group}/{inner}" it
// returns the group, the inner filter and shared true; for any other filter
// it returns "", filter and false. ok reports whether the filter is valid:
// the group is non-empty and holds no '+', '#' or '/', and the inner filter
// (or the plain filter) passes ValidFilter. "$share/g", "$share//a" and
// "$share/g+/a" are not ok.
func ParseShared(filter string) (group, inner string, shared, ok bool) {
	rest, found := strings.CutPrefix(filter, sharePrefix)
	if !found {
		return "", filter, false, ValidFilter(filter)
	}
	group, inner, found = strings.Cut(rest, "/")
	ok = found && group != "" && !strings.ContainsAny(group, "+#") &&
		validString(filter) && ValidFilter(inner)
	return group, inner, true, ok
}

// Match reports whether the topic name matches the filter. Both are
// expected to be valid (ValidTopicName, ValidFilter); for other input the
// answer is unspecified. Match does not allocate.
func Match(filter, topic string) bool {
	if topic != "" && topic[0] == '$' && filter != "" && (filter[0] == '+' || filter[0] == '#') {
		return false // MQTT-4.7.2-1
	}
	for {
		f, frest, fmore := strings.Cut(filter, "/")
		if f == "#" {
			return true
		}
		t, trest, tmore := strings.Cut(topic, "/")
		if f != "+" && f != t {
			return false
		}
		switch {
		case !fmore:
			return !tmore
		case !tmore:
			return frest == "#" // "a/#" matches "a"
		}
		filter, topic = frest, trest
	}
}

// Limits bound topic names and filters below MQTT's own cap (MaxLen), as
// mqtt.max_topic_length and mqtt.max_topic_levels configure them. Zero
// fields mean no limit beyond MaxLen.
type Limits struct {
	MaxLength int // bytes
	MaxLevels int // '/'-separated levels
}

// Check returns an error naming the limit a topic name or filter goes
// beyond, or nil. A shared subscription's "$share/{group}/" prefix is not
// counted.
func (l Limits) Check(t string) error {
	if inner, ok := strings.CutPrefix(t, sharePrefix); ok {
		if _, rest, found := strings.Cut(inner, "/"); found {
			t = rest
		}
	}
	switch {
	case l.MaxLength > 0 && len(t) > l.MaxLength:
		return fmt.Errorf("topic longer than %d bytes (mqtt.max_topic_length)", l.MaxLength)
	case l.MaxLevels > 0 && strings.Count(t, "/") >= l.MaxLevels:
		return fmt.Errorf("topic deeper than %d levels (mqtt.max_topic_levels)", l.MaxLevels)
	}
	return nil
}
