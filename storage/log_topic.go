package storage

import (
	"errors"
	"fmt"
	"strings"
	"unicode/utf8"
)

// MQTT topic filters for the log's retention rules. storage is a leaf
// package (devices and the engine import it, not the reverse), so it keeps
// its own small matcher with the semantics of devices.ValidFilter and
// devices.MatchesTopic: '+' is one level, '#' the rest (including the
// parent level), and a wildcard at the first level does not match a topic
// starting with '$'.

// validLogFilter checks an MQTT topic filter.
func validLogFilter(f string) error {
	switch {
	case f == "":
		return errors.New("empty topic filter")
	case strings.IndexByte(f, 0) >= 0 || !utf8.ValidString(f):
		return fmt.Errorf("topic filter %q: not valid UTF-8 without U+0000", f)
	case strings.HasPrefix(f, "$share/"):
		return fmt.Errorf("topic filter %q: a shared subscription, not a filter", f)
	}
	levels := strings.Split(f, "/")
	for i, l := range levels {
		switch {
		case l == "#" && i != len(levels)-1:
			return fmt.Errorf("topic filter %q: '#' must be the last level", f)
		case l != "#" && l != "+" && strings.ContainsAny(l, "#+"):
			return fmt.Errorf("topic filter %q: wildcards must stand as whole levels", f)
		}
	}
	return nil
}

// matchTopic reports whether the filter (split in levels) matches a topic
// name given as a string or bytes. It does not allocate.
func matchTopic[T string | []byte](filter []string, topic T) bool {
	if len(filter) > 0 && (filter[0] == "#" || filter[0] == "+") && len(topic) > 0 && topic[0] == '$' {
		return false
	}
	rest := topic
	done := false // every level of the topic has been consumed
	for _, f := range filter {
		if f == "#" {
			return true
		}
		if done {
			return false
		}
		level := rest
		if i := indexSlash(rest); i >= 0 {
			level, rest = rest[:i], rest[i+1:]
		} else {
			done = true
		}
		if f != "+" && !levelEqual(f, level) {
			return false
		}
	}
	return done
}

func indexSlash[T string | []byte](s T) int {
	for i := 0; i < len(s); i++ {
		if s[i] == '/' {
			return i
		}
	}
	return -1
}

func levelEqual[T string | []byte](f string, level T) bool {
	if len(f) != len(level) {
		return false
	}
	for i := 0; i < len(f); i++ {
		if f[i] != level[i] {
			return false
		}
	}
	return true
}

// filterCovers reports whether every topic sub matches is matched by
// filter.
func filterCovers(filter, sub []string) bool {
	if len(sub) > 0 && len(filter) > 0 && (filter[0] == "#" || filter[0] == "+") && strings.HasPrefix(sub[0], "$") {
		return false
	}
	for i, f := range filter {
		if f == "#" {
			return true
		}
		if i >= len(sub) {
			return false
		}
		switch s := sub[i]; {
		case s == "#":
			return false // sub reaches deeper than a non-# level can
		case s == "+":
			if f != "+" {
				return false
			}
		default:
			if f != "+" && f != s {
				return false
			}
		}
	}
	return len(sub) == len(filter)
}

// filterOverlaps reports whether some topic name is matched by both
// filters.
func filterOverlaps(a, b []string) bool {
	wild := func(l string) bool { return l == "+" || l == "#" }
	if len(a) > 0 && len(b) > 0 &&
		(wild(a[0]) && strings.HasPrefix(b[0], "$") || wild(b[0]) && strings.HasPrefix(a[0], "$")) {
		return false
	}
	for i := 0; ; i++ {
		aEnd, bEnd := i >= len(a), i >= len(b)
		if !aEnd && a[i] == "#" || !bEnd && b[i] == "#" {
			return true // "x/#" also matches "x"
		}
		if aEnd || bEnd {
			return aEnd && bEnd
		}
		if a[i] != "+" && b[i] != "+" && a[i] != b[i] {
			return false
		}
	}
}
