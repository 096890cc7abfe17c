package hooks

// events is the set of mochi hook events a hook implements. mochi asks
// every hook Provides(event) for every event of every packet, so the answer
// is an array lookup rather than the usual bytes.Contains over a fresh
// slice (which cost about 4% of the CPU of a QoS 1 fan-in).
type events [256]bool

func eventSet(ids ...byte) *events {
	var e events
	for _, id := range ids {
		e[id] = true
	}
	return &e
}
