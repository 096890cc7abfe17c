package devices

import (
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/beaconmq/beacon/broker/topics"
)

// Kind is what a principal is.
type Kind uint8

// Principal kinds.
const (
	Anonymous Kind = iota
	DeviceKind
	User
)

func (k Kind) String() string {
	switch k {
	case DeviceKind:
		return "device"
	case User:
		return "user"
	}
	return "anonymous"
}

// Principal is who a connection or an HTTP request acts as.
type Principal struct {
	Kind       Kind      `json:"kind"`
	Name       string    `json:"name,omitempty"` // device id, JWT sub; %u
	DeviceType string    `json:"device_type,omitempty"`
	Role       string    `json:"role,omitempty"`
	Publish    []string  `json:"publish,omitempty"`   // JWT beacon.pub filters: extra allow rules
	Subscribe  []string  `json:"subscribe,omitempty"` // JWT beacon.sub filters
	Expires    time.Time `json:"expires,omitzero"`    // JWT exp; zero for devices
	ClientID   string    `json:"-"`                   // %c, per connection
}

// Action is what a principal wants to do with a topic.
type Action uint8

// Actions. Read is the delivery of a message on a topic name to a
// subscriber; it is governed by the subscribe rules.
const (
	Publish Action = 1 << iota
	Subscribe
	Read
)

func (a Action) String() string {
	switch a {
	case Publish:
		return "publish"
	case Subscribe:
		return "subscribe"
	case Read:
		return "read"
	}
	return "unknown"
}

// Effect is what a matching rule decides.
type Effect uint8

// Effects.
const (
	Allow Effect = iota + 1
	Deny
)

// Subject selects principals.
type Subject struct {
	kind  string // all, anonymous, device, device-type, user, role
	value string // for device: one device id, or "" for every device
}

// ParseSubject parses "all", "anonymous", "device", "device:ID",
// "device-type:T", "user:NAME" or "role:R".
func ParseSubject(s string) (Subject, error) {
	kind, value, hasValue := strings.Cut(s, ":")
	switch kind {
	case "all", "anonymous":
		if hasValue {
			return Subject{}, fmt.Errorf("subject %q takes no value", kind)
		}
		return Subject{kind: kind}, nil
	case "device":
		if hasValue && !ValidID(value) {
			return Subject{}, fmt.Errorf("subject %q: %q is not a device id", s, value)
		}
		return Subject{kind: kind, value: value}, nil
	case "device-type", "user", "role":
		if value == "" {
			return Subject{}, fmt.Errorf("subject %q needs a value: %s:NAME", s, kind)
		}
		return Subject{kind: kind, value: value}, nil
	}
	return Subject{}, fmt.Errorf("unknown subject %q (all, anonymous, device, device:ID, device-type:T, user:NAME, role:R)", s)
}

func (s Subject) String() string {
	if s.value == "" {
		return s.kind
	}
	return s.kind + ":" + s.value
}

// Matches reports whether p is selected.
func (s Subject) Matches(p *Principal) bool {
	switch s.kind {
	case "all":
		return true
	case "anonymous":
		return p.Kind == Anonymous
	case "device":
		return p.Kind == DeviceKind && (s.value == "" || p.Name == s.value)
	case "device-type":
		return p.Kind == DeviceKind && p.DeviceType == s.value
	case "user":
		return p.Kind == User && p.Name == s.value
	case "role":
		return p.Role == s.value
	}
	return false
}

// Rule is one ACL rule.
type Rule struct {
	Subjects []Subject
	Actions  Action // Publish and/or Subscribe (Subscribe also governs Read)
	Topics   [][]string
	Effect   Effect
	Line     int // in the rules file, for messages
}

// Rules is a parsed rules file.
type Rules struct {
	Rules      []Rule
	MaxPayload map[string]int // bytes per device type ("*": every device)
	File       string

	mu        sync.RWMutex
	bySubject map[subjectKey][]int32 // rules whose subjects select a principal, by principal
}

// subjectKey is everything about a principal that subjects look at.
type subjectKey struct {
	kind            Kind
	name, typ, role string
}

// applicable returns the indexes of the rules that select p, computed once
// per kind of principal: a check then looks only at the rules that can
// apply, however many there are.
func (rs *Rules) applicable(p *Principal) []int32 {
	k := subjectKey{p.Kind, p.Name, p.DeviceType, p.Role}
	rs.mu.RLock()
	idx, ok := rs.bySubject[k]
	rs.mu.RUnlock()
	if ok {
		return idx
	}
	idx = []int32{}
	for i := range rs.Rules {
		if rs.Rules[i].matchesSubject(p) {
			idx = append(idx, int32(i))
		}
	}
	rs.mu.Lock()
	if rs.bySubject == nil || len(rs.bySubject) > 100_000 { // bounded: principals come and go
		rs.bySubject = map[subjectKey][]int32{}
	}
	rs.bySubject[k] = idx
	rs.mu.Unlock()
	return idx
}

type ruleYAML struct {
	Subjects []string `yaml:"subjects"`
	Actions  []string `yaml:"actions"`
	Topics   []string `yaml:"topics"`
	Effect   string   `yaml:"effect"`
}

// RuleError names the file, line and rule of a problem.
type RuleError struct {
	File string
	Line int
	Rule int // 1-based; 0 when not about one rule
	Msg  string
}

func (e *RuleError) Error() string {
	loc := e.File
	if e.Line > 0 {
		loc = fmt.Sprintf("%s:%d", e.File, e.Line)
	}
	if e.Rule > 0 {
		return fmt.Sprintf("%s: rule %d: %s", loc, e.Rule, e.Msg)
	}
	return fmt.Sprintf("%s: %s", loc, e.Msg)
}

// LoadRules reads and parses a rules file.
func LoadRules(path string) (*Rules, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read rules: %w", err)
	}
	return ParseRules(path, data)
}

// ParseRules parses a rules document:
//
//	rules:
//	  - subjects: [device]
//	    actions: [publish]
//	    topics: ["devices/%u/#"]
//	    effect: allow
//	max_payload:
//	  thermostat: 256
func ParseRules(name string, data []byte) (*Rules, error) {
	rs := &Rules{File: name, MaxPayload: map[string]int{}}
	var doc yaml.Node
	if err := yaml.Unmarshal(data, &doc); err != nil {
		return nil, &RuleError{File: name, Msg: err.Error()}
	}
	if len(doc.Content) == 0 {
		return rs, nil
	}
	root := doc.Content[0]
	if root.Kind != yaml.MappingNode {
		return nil, &RuleError{File: name, Line: root.Line, Msg: "expected keys rules and max_payload"}
	}
	for i := 0; i+1 < len(root.Content); i += 2 {
		k, v := root.Content[i], root.Content[i+1]
		switch k.Value {
		case "rules":
			if v.Kind != yaml.SequenceNode {
				return nil, &RuleError{File: name, Line: v.Line, Msg: "rules: expected a list"}
			}
			for n, item := range v.Content {
				r, err := parseRule(item)
				if err != nil {
					return nil, &RuleError{File: name, Line: item.Line, Rule: n + 1, Msg: err.Error()}
				}
				rs.Rules = append(rs.Rules, r)
			}
		case "max_payload":
			var m map[string]int
			if err := v.Decode(&m); err != nil {
				return nil, &RuleError{File: name, Line: v.Line, Msg: "max_payload: expected device type: bytes"}
			}
			for t, n := range m {
				if n <= 0 {
					return nil, &RuleError{File: name, Line: v.Line, Msg: fmt.Sprintf("max_payload: %s: %d is not a positive size", t, n)}
				}
				rs.MaxPayload[t] = n
			}
		default:
			return nil, &RuleError{File: name, Line: k.Line, Msg: fmt.Sprintf("unknown key %q (rules, max_payload)", k.Value)}
		}
	}
	return rs, nil
}

func parseRule(n *yaml.Node) (Rule, error) {
	if n.Kind != yaml.MappingNode {
		return Rule{}, errors.New("expected subjects, actions, topics and effect")
	}
	for i := 0; i < len(n.Content); i += 2 {
		switch n.Content[i].Value {
		case "subjects", "actions", "topics", "effect":
		default:
			return Rule{}, fmt.Errorf("unknown key %q (subjects, actions, topics, effect)", n.Content[i].Value)
		}
	}
	var y ruleYAML
	if err := n.Decode(&y); err != nil {
		return Rule{}, err
	}
	r := Rule{Line: n.Line}
	if len(y.Subjects) == 0 {
		return r, errors.New("no subjects")
	}
	for _, s := range y.Subjects {
		sub, err := ParseSubject(s)
		if err != nil {
			return r, err
		}
		r.Subjects = append(r.Subjects, sub)
	}
	if len(y.Actions) == 0 {
		return r, errors.New("no actions (publish, subscribe, all)")
	}
	for _, a := range y.Actions {
		switch a {
		case "publish":
			r.Actions |= Publish
		case "subscribe":
			r.Actions |= Subscribe
		case "all":
			r.Actions |= Publish | Subscribe
		default:
			return r, fmt.Errorf("unknown action %q (publish, subscribe, all)", a)
		}
	}
	if len(y.Topics) == 0 {
		return r, errors.New("no topics")
	}
	for _, t := range y.Topics {
		if err := validRuleFilter(t); err != nil {
			return r, err
		}
		r.Topics = append(r.Topics, strings.Split(t, "/"))
	}
	switch y.Effect {
	case "allow":
		r.Effect = Allow
	case "deny":
		r.Effect = Deny
	default:
		return r, fmt.Errorf("effect %q is not allow or deny", y.Effect)
	}
	return r, nil
}

// ValidFilter checks an MQTT topic filter: not empty, valid UTF-8 without
// U+0000, wildcards as whole levels, '#' last, no shared-subscription
// prefix.
func ValidFilter(f string) error {
	if strings.HasPrefix(f, "$share/") {
		return fmt.Errorf("topic %q: a shared subscription, not a filter", f)
	}
	return topics.CheckFilter(f)
}

// validRuleFilter checks an MQTT topic filter in which %u and %c may stand
// as whole levels.
func validRuleFilter(f string) error {
	if err := ValidFilter(f); err != nil {
		return err
	}
	for _, l := range strings.Split(f, "/") {
		if l != "%u" && l != "%c" && strings.Contains(l, "%") && (strings.Contains(l, "%u") || strings.Contains(l, "%c")) {
			return fmt.Errorf("topic %q: %%u and %%c must stand as whole levels", f)
		}
	}
	return nil
}

// Authorizer decides every topic action for every transport. Its rules can
// be replaced at any time (Reload) without disturbing checks in progress.
type Authorizer struct {
	rules atomic.Pointer[Rules]
}

// NewAuthorizer returns an authorizer with rs (nil: no rules, so only JWT
// claims allow anything).
func NewAuthorizer(rs *Rules) *Authorizer {
	a := &Authorizer{}
	a.Set(rs)
	return a
}

// Set replaces the rules.
func (a *Authorizer) Set(rs *Rules) {
	if rs == nil {
		rs = &Rules{MaxPayload: map[string]int{}}
	}
	a.rules.Store(rs)
}

// Rules returns the rules in force.
func (a *Authorizer) Rules() *Rules { return a.rules.Load() }

// Allowed decides whether p may do action on topic. For Publish and Read,
// topic is a topic name; for Subscribe it is a topic filter (a shared
// subscription's "$share/group/" prefix is removed first).
//
// Any matching deny rule wins over every allow. A subscription is allowed
// when an allow rule covers the whole filter and no deny rule does; where a
// deny rule covers only part of it, the subscription stands and the denied
// messages are withheld at delivery (Read).
func (a *Authorizer) Allowed(p *Principal, action Action, topic string) bool {
	ok, _ := a.Decide(p, action, topic)
	return ok
}

// Decide is Allowed that also tells which rule decided: the deny rule
// that refused, the last allow rule that matched, or nil when no rule
// matched (refused, or allowed by a token claim).
func (a *Authorizer) Decide(p *Principal, action Action, topic string) (bool, *Rule) {
	if action == Subscribe {
		if rest, ok := strings.CutPrefix(topic, "$share/"); ok {
			if _, f, ok := strings.Cut(rest, "/"); ok {
				topic = f
			}
		}
	}
	levels := strings.Split(topic, "/")
	ruleAction := action
	if action == Read {
		ruleAction = Subscribe
	}
	var allowed *Rule
	rs := a.rules.Load()
	for _, i := range rs.applicable(p) {
		r := &rs.Rules[i]
		if r.Actions&ruleAction == 0 {
			continue
		}
		for _, f := range r.Topics {
			if !appliesTo(f, levels, p, action) {
				continue
			}
			if r.Effect == Deny {
				return false, r
			}
			allowed = r
		}
	}
	if allowed != nil {
		return true, allowed
	}
	// JWT claims grant on top of the rules (denies above still win).
	claims := p.Publish
	if ruleAction == Subscribe {
		claims = p.Subscribe
	}
	for _, c := range claims {
		if appliesTo(strings.Split(c, "/"), levels, p, action) {
			return true, nil
		}
	}
	return false, nil
}

func (r *Rule) matchesSubject(p *Principal) bool {
	for _, s := range r.Subjects {
		if s.Matches(p) {
			return true
		}
	}
	return false
}

// appliesTo reports whether the rule filter f (with %u, %c) applies to the
// topic (Publish, Read) or covers the filter (Subscribe).
func appliesTo(f, topic []string, p *Principal, action Action) bool {
	f, ok := substitute(f, p)
	if !ok {
		return false
	}
	if action == Subscribe {
		return Covers(f, topic)
	}
	return Matches(f, topic)
}

// substitute replaces %u and %c levels. A value that is empty or not a
// single plain level makes the filter inapplicable.
func substitute(f []string, p *Principal) ([]string, bool) {
	var out []string
	for i, l := range f {
		var v string
		switch l {
		case "%u":
			v = p.Name
		case "%c":
			v = p.ClientID
		default:
			if out != nil {
				out[i] = l
			}
			continue
		}
		if v == "" || strings.ContainsAny(v, "/+#") {
			return nil, false
		}
		if out == nil {
			out = append([]string(nil), f...)
		}
		out[i] = v
	}
	if out == nil {
		return f, true
	}
	return out, true
}

// Matches reports whether the filter (split into levels) matches the topic
// name. "a/#" matches "a"; wildcards in the first level never match topics
// that start with '$' [MQTT-4.7.2-1].
func Matches(filter, topic []string) bool {
	if len(topic) > 0 && strings.HasPrefix(topic[0], "$") && len(filter) > 0 && (filter[0] == "#" || filter[0] == "+") {
		return false
	}
	for i, f := range filter {
		if f == "#" {
			return true
		}
		if i >= len(topic) {
			return false
		}
		if f != "+" && f != topic[i] {
			return false
		}
	}
	return len(filter) == len(topic)
}

// Covers reports whether every topic that sub matches is also matched by
// filter (both split in levels); see topics.Covers.
func Covers(filter, sub []string) bool { return topics.Covers(filter, sub) }

// Overlaps reports whether some topic name is matched by both filters;
// see topics.Overlaps.
func Overlaps(a, b []string) bool { return topics.Overlaps(a, b) }

// MatchesTopic is Matches for a topic name that is not split: it does not
// allocate.
func MatchesTopic(filter []string, topic string) bool {
	if len(filter) > 0 && (filter[0] == "#" || filter[0] == "+") && strings.HasPrefix(topic, "$") {
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
		if i := strings.IndexByte(rest, '/'); i >= 0 {
			level, rest = rest[:i], rest[i+1:]
		} else {
			done = true
		}
		if f != "+" && f != level {
			return false
		}
	}
	return done
}
