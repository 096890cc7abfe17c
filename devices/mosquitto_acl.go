package devices

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"slices"
	"strings"
)

// Mosquitto's ACL file, converted to Beacon rules.
//
// Mosquitto (2.0, its default acl_file check) decides a publish (write) or
// a delivery (read) for a client by walking first the client's own list
// (the lines under its "user NAME", or for a client without username the
// "topic" lines before any "user" line), then the "pattern" lines (with
// %u and %c substituted). In each list the first matching line decides:
// "deny" refuses; a line granting the access allows; a line that matches
// without granting it (read when writing) is passed over. Nothing
// matching: refused. Subscriptions themselves are never refused; what may
// not be read is simply not delivered.
//
// Mosquitto keeps the deny lines of each list ahead of its other lines,
// so within a list a matching deny wins, as in Beacon, and the order of
// lines does not matter. Beacon's rules are one list: the one difference
// is a "pattern deny" against a user's own allow, which Mosquitto lets
// the user's line win and Beacon does not; the converter names every such
// case in a warning.

// MosquittoACL is a converted Mosquitto ACL file.
type MosquittoACL struct {
	// YAML is the Beacon rules file, with one commented rule per line
	// converted. ParseRules accepts it.
	YAML []byte
	// Warnings name the lines whose decisions Beacon cannot reproduce
	// exactly, and why.
	Warnings []string
}

// mosqAccess is what a Mosquitto ACL line grants.
type mosqAccess uint8

const (
	mosqRead  mosqAccess = 1
	mosqWrite mosqAccess = 2
	mosqDeny  mosqAccess = 0
)

type mosqLine struct {
	n       int
	text    string
	pattern bool
	anon    bool   // a topic line before any user line
	user    string // a topic line's user
	access  mosqAccess
	topic   string
	levels  []string
}

func (l *mosqLine) where() string {
	switch {
	case l.pattern:
		return "pattern, every client"
	case l.anon:
		return "clients without username"
	}
	return "user " + l.user
}

// ConvertMosquittoACL converts a Mosquitto acl_file. A line Beacon cannot
// express (an invalid filter, %u or %c inside a level of a pattern, a
// literal %u in a topic line, a username that is no device id) is an error
// naming the line.
func ConvertMosquittoACL(name string, r io.Reader) (*MosquittoACL, error) {
	lines, err := parseMosquittoACL(name, r)
	if err != nil {
		return nil, err
	}
	out := &MosquittoACL{}
	var b strings.Builder
	fmt.Fprintf(&b, "# Beacon rules converted from the Mosquitto ACL file %s (beacon acl import).\n", name)
	b.WriteString("# Mosquitto checks a user's own lines before the patterns, a deny winning within each;\n")
	b.WriteString("# in Beacon any matching deny wins (warnings below name where that differs).\n")
	b.WriteString("# Mosquitto's \"user NAME\" is the device NAME; lines before any user line are for\n")
	b.WriteString("# anonymous clients; patterns are for every client. Review before use.\n")
	b.WriteString("rules:\n")
	if len(lines) == 0 {
		b.Reset()
		b.WriteString("# The Mosquitto ACL file has no rules: Mosquitto, like Beacon, then denies everything.\nrules: []\n")
	}
	for i := range lines {
		l := &lines[i]
		if l.pattern && l.access == mosqDeny {
			warn := patternDenyWarnings(lines, i)
			out.Warnings = append(out.Warnings, warn...)
			for _, w := range warn {
				fmt.Fprintf(&b, "  # warning: %s\n", w)
			}
		}
		subject := "all"
		switch {
		case l.anon:
			subject = "anonymous"
		case !l.pattern:
			subject = "device:" + l.user
		}
		effect := "allow"
		if l.access == mosqDeny {
			effect = "deny"
		}
		fmt.Fprintf(&b, "  # line %d (%s): %s\n", l.n, l.where(), l.text)
		fmt.Fprintf(&b, "  - subjects: [%s]\n    actions: [%s]\n    topics: [%s]\n    effect: %s\n",
			quote(subject), beaconActions(l.access), quote(l.topic), effect)
	}
	out.YAML = []byte(b.String())
	if _, err := ParseRules(name, out.YAML); err != nil {
		return nil, fmt.Errorf("converted rules do not parse: %w", err)
	}
	return out, nil
}

func quote(s string) string {
	q, _ := json.Marshal(s) // JSON strings are YAML double-quoted scalars
	return string(q)
}

func beaconActions(a mosqAccess) string {
	switch a {
	case mosqRead:
		return "subscribe"
	case mosqWrite:
		return "publish"
	}
	return "all"
}

// patternDenyWarnings names the users whose own allow lines Mosquitto
// would let win over the pattern deny on line i, where Beacon denies.
func patternDenyWarnings(lines []mosqLine, i int) []string {
	d := &lines[i]
	var warn []string
	for j := range lines {
		e := &lines[j]
		if e.pattern || e.access == mosqDeny {
			continue
		}
		who, name := "clients without username", ""
		if !e.anon {
			who, name = "device "+e.user, e.user
		}
		levels, ok := substitute(d.levels, &Principal{Name: name, ClientID: "%c"})
		if !ok || !Overlaps(e.levels, levels) {
			continue // %u never applies to clients without username
		}
		warn = append(warn, fmt.Sprintf("line %d: Beacon denies %q to %s for %s where line %d (%s) allows it; in Mosquitto a user's own lines win over patterns",
			d.n, d.topic, who, accessWord(e.access), e.n, e.text))
	}
	return warn
}

func accessWord(a mosqAccess) string {
	switch a {
	case mosqRead:
		return "reading"
	case mosqWrite:
		return "publishing"
	}
	return "reading and publishing"
}

// parseMosquittoACL reads the file as Mosquitto 2.0 does: '#' comments,
// "user NAME", "topic [read|write|readwrite|deny] TOPIC" and "pattern
// [read|write|readwrite|deny] TOPIC" (no access word: readwrite; the
// topic is the rest of the line).
func parseMosquittoACL(name string, r io.Reader) ([]mosqLine, error) {
	var out []mosqLine
	user, anon := "", true
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 4096), 1<<20)
	for n := 1; sc.Scan(); n++ {
		text := strings.TrimRight(sc.Text(), " \t\r\n\v\f")
		if strings.HasPrefix(text, "#") {
			continue
		}
		trimmed := strings.TrimLeft(text, " ")
		if trimmed == "" {
			continue
		}
		fail := func(format string, args ...any) ([]mosqLine, error) {
			return nil, fmt.Errorf("%s:%d: %s", name, n, fmt.Sprintf(format, args...))
		}
		word, rest, _ := strings.Cut(trimmed, " ")
		rest = strings.TrimLeft(rest, " ")
		switch word {
		case "user":
			if rest == "" {
				return fail("missing username")
			}
			if !ValidID(rest) {
				return fail("username %q cannot be a Beacon device id (1-64 letters, digits, '.', '_' or '-')", rest)
			}
			user, anon = rest, false
			continue
		case "topic", "pattern":
		default:
			return fail("unknown line %q (user, topic, pattern)", word)
		}
		if rest == "" {
			return fail("empty topic")
		}
		l := mosqLine{n: n, text: trimmed, pattern: word == "pattern", access: mosqRead | mosqWrite}
		accessWord, topic, hasTopic := strings.Cut(rest, " ")
		if hasTopic {
			switch accessWord {
			case "read":
				l.access = mosqRead
			case "write":
				l.access = mosqWrite
			case "readwrite":
			case "deny":
				l.access = mosqDeny
			default:
				return fail("invalid access %q (read, write, readwrite, deny)", accessWord)
			}
			l.topic = strings.Trim(topic, " ")
		} else {
			l.topic = accessWord
		}
		if err := ValidFilter(l.topic); err != nil {
			return fail("%v", err)
		}
		l.levels = strings.Split(l.topic, "/")
		if l.pattern {
			if err := validRuleFilter(l.topic); err != nil {
				return fail("%v (Beacon substitutes them only as whole levels)", err)
			}
		} else {
			if slices.Contains(l.levels, "%u") || slices.Contains(l.levels, "%c") {
				return fail("a topic line takes %%u and %%c literally; Beacon would substitute them (use a pattern line)")
			}
			l.user, l.anon = user, anon
		}
		out = append(out, l)
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read %s: %w", name, err)
	}
	return out, nil
}
