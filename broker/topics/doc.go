// Package topics is Beacon's topic index: MQTT topic validation and
// matching, the subscription index the router fans out from, and the index
// of retained messages.
//
// # Rules
//
// Topic names and filters follow MQTT 3.1.1 and 5.0. Both are UTF-8
// strings of 1 to 65535 bytes, well formed and without U+0000. A topic name
// (PUBLISH) holds no wildcard at all. In a filter (SUBSCRIBE), '+' matches
// exactly one level, which may be empty, and '#' matches any number of
// levels, including none: "a/#" matches "a". Both wildcards stand as whole
// levels, and '#' only as the last one. A filter that starts with a wildcard
// does not match a topic that starts with '$' (MQTT-4.7.2-1), so "#" does
// not see "$SYS/broker/uptime" but "$SYS/#" does.
//
// A shared subscription "$share/{group}/{filter}" (MQTT 5.0, 4.8.2) is
// split by [ParseShared], which is the one check a SUBSCRIBE filter needs:
// it validates plain filters too. [ValidFilter] checks syntax only.
//
// # The trie
//
// [Index] and [Retained] are tries keyed by topic level, like mosquitto's
// and NATS's: each node has a map of literal children and, in the index,
// one '+' child and one '#' child. A lookup follows the levels of the
// topic, so its cost depends on the depth of the topic, the wildcard
// branches on its path and the number of matches, not on how many
// subscriptions exist.
//
// Matching a topic against the index at node n for level l visits the
// literal child l, the '+' child and collects the '#' child; at the last
// level it collects the node reached and its '#' child ("a/#" matches
// "a"). At the root the '+' and '#' children are skipped for a topic that
// starts with '$'. Looking up a filter in [Retained] is the same walk turned
// around: a literal level is one map lookup, '+' visits every child and '#'
// every descendant, so a filter without wildcards costs one lookup per
// level and never a scan.
//
// Nodes are created on the way in and pruned on the way out: removing the
// last subscription or retained value under a node removes every node that
// became empty, so memory follows what is stored, not how often it
// changed.
//
// # Concurrency and memory
//
// Both indexes are safe for concurrent use. Lookups take a read lock and
// never call back into user code while holding it: [Retained.Match]
// collects under the lock and calls its function after releasing it. Every
// string an index keeps is cloned, so callers may pass strings that alias
// a network read buffer. [Index.Match] fills a caller-owned [Matches] and,
// once its buffers have grown to the size of the result, does not allocate.
package topics
