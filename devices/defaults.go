package devices

import (
	"fmt"
	"strings"
)

// BuiltinRulesName is the File of the rules in force when no rules file
// is configured.
const BuiltinRulesName = "built-in"

// builtinRules is least privilege for registered devices: each device
// publishes under its own id and receives only its own commands. Nothing
// else is allowed; tokens get what their claims grant.
const builtinRules = `rules:
  - subjects: [device]
    actions: [publish]
    topics: ["devices/%u/#"]
    effect: allow
  - subjects: [device]
    actions: [subscribe]
    topics: ["devices/%u/cmd/#"]
    effect: allow
`

// DefaultRules returns the built-in rules, in force when no rules file
// (auth.acl_file) is configured.
func DefaultRules() *Rules {
	rs, err := ParseRules(BuiltinRulesName, []byte(builtinRules))
	if err != nil {
		panic("devices: built-in rules: " + err.Error()) // a constant; tested
	}
	for i := range rs.Rules {
		rs.Rules[i].Line = 0 // not in any file
	}
	return rs
}

// String describes the rule: "allow publish devices/%u/# for device".
func (r *Rule) String() string {
	var subs, topics []string
	for _, s := range r.Subjects {
		subs = append(subs, s.String())
	}
	for _, t := range r.Topics {
		topics = append(topics, strings.Join(t, "/"))
	}
	var acts []string
	for _, a := range []Action{Publish, Subscribe} {
		if r.Actions&a != 0 {
			acts = append(acts, a.String())
		}
	}
	effect := "allow"
	if r.Effect == Deny {
		effect = "deny"
	}
	return fmt.Sprintf("%s %s %s for %s", effect, strings.Join(acts, ","), strings.Join(topics, " "), strings.Join(subs, ","))
}

// Describe names a rule of rs for logs: where it stands and what it says,
// e.g. "acl.yaml:12 rule 3: deny subscribe devices/+/secrets/# for all" or
// "built-in rule 1: allow publish devices/%u/# for device". A nil rule is
// "no rule matched".
func (rs *Rules) Describe(r *Rule) string {
	if r == nil {
		return "no rule matched"
	}
	for i := range rs.Rules {
		if &rs.Rules[i] != r {
			continue
		}
		if r.Line > 0 {
			return fmt.Sprintf("%s:%d rule %d: %s", rs.File, r.Line, i+1, r)
		}
		return fmt.Sprintf("%s rule %d: %s", rs.File, i+1, r)
	}
	return r.String() // from rules since replaced
}
