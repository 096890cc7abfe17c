//go:build race

package topics

// raceEnabled: under the race detector sync.Pool drops items at random, so
// tests of pooled allocations do not hold.
const raceEnabled = true
