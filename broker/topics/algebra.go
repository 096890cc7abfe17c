package topics

import "strings"

// Covers reports whether every topic that filter sub matches is also
// matched by filter, both split in levels ("a/+" covers "a/b", "#" covers
// everything but "$" topics). The ACL uses it to decide a subscription
// by its rules; the message log, which retention rule a stream's filter
// falls under.
func Covers(filter, sub []string) bool {
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

// Overlaps reports whether some topic name is matched by both filters,
// split in levels.
func Overlaps(a, b []string) bool {
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
