package engine

import (
	"errors"
	"log/slog"
	"net"
	"time"

	"github.com/beaconmq/beacon/broker/topics"
	"github.com/beaconmq/beacon/storage"
)

// Action is what a Principal is asked to allow.
type Action uint8

// Actions a Principal decides.
const (
	ActPublish   Action = iota // publish to a topic name
	ActSubscribe               // subscribe to a filter
	ActRead                    // receive a message published to a topic name
)

// Principal is who a connection authenticated as. The engine asks it for
// every publish, subscription and delivery; it never looks inside.
// Optional features are detected by type assertion: PublishChecker,
// Expirer.
type Principal interface {
	Allow(a Action, topic string) bool
}

// PublishChecker is a Principal that also vets payloads (size policies by
// device type). A refusal is answered with 0x83 (v5) or dropped (3.1.1).
type PublishChecker interface {
	CheckPublish(topic string, payload []byte) error
}

// Expirer is a Principal whose credentials end (a JWT): the connection is
// closed then (v5: DISCONNECT 0x87).
type Expirer interface {
	Expires() time.Time
}

// DeviceNamer is a Principal that is a registered device: its messages
// carry the device id (for codecs by device type).
type DeviceNamer interface {
	Device() string
}

// AllowAll is the Principal of a broker without authentication.
type AllowAll struct{}

// Allow implements Principal.
func (AllowAll) Allow(Action, string) bool { return true }

// ConnectRequest is what an Authenticator decides on.
type ConnectRequest struct {
	ClientID        string // as sent; "" when the server assigns one
	Username        string
	Password        []byte
	PasswordSet     bool
	ProtocolVersion byte
	Listener        string
	Remote          net.Addr
	Conn            net.Conn // the transport: *tls.Conn for client certificates, or a WebSocket conn that carries a handshake principal
	Will            *Message // nil without a will; Allow(ActPublish) is checked by the engine
}

// Authenticator admits connections. It returns one of the Err* refusals
// below (wrapped or not) to refuse; the engine answers with the code the
// client's protocol version names.
type Authenticator interface {
	Authenticate(req *ConnectRequest) (Principal, error)
}

// Refusals an Authenticator returns.
var (
	ErrBadCredentials = errors.New("bad user name or password") // v5 0x86, 3.1.1 0x04
	ErrNotAuthorized  = errors.New("not authorized")            // v5 0x87, 3.1.1 0x05
	ErrBanned         = errors.New("banned")                    // v5 0x8A, 3.1.1 0x05
	ErrServerBusy     = errors.New("server busy")               // v5 0x89, 3.1.1 0x03
	ErrQuotaExceeded  = errors.New("quota exceeded")            // v5 0x97, 3.1.1 0x03
	ErrRateExceeded   = errors.New("connection rate exceeded")  // v5 0x9F, 3.1.1 0x05
)

// Observer is told what happens, for metrics, presence and logs. Its
// methods must not block nor call back into the engine: Connected,
// Disconnected and Routed are called without engine locks held; Dropped
// may be called with a session's lock held (count, nothing more).
type Observer interface {
	// Connected: a connection was admitted and its session attached.
	Connected(c *ClientInfo)
	// Disconnected: the connection ended (err says why; nil for a clean DISCONNECT).
	Disconnected(c *ClientInfo, err error)
	// Routed: an accepted message (publish, will or inline) was routed to n sessions.
	Routed(m *Message, n int)
	// Dropped: a delivery or message was not made, and why.
	Dropped(reason DropReason, client string, m *Message)
}

// Committer takes part in the write that accepts a message. Prepare
// returns the writes to commit with m (nil for none: m is then stored
// only if something else keeps it); Committed follows once the write
// committed (err nil) or failed, before m is delivered. Neither may block
// or call back into the engine.
type Committer interface {
	Prepare(m *Message) []storage.Op
	Committed(m *Message, err error)
}

// DropReason says why a message was not delivered.
type DropReason string

// Reasons for drops.
const (
	DropQueueFull  DropReason = "queue_full"  // QoS 0 beyond a connection's outbound budget
	DropQueueLimit DropReason = "queue_limit" // QoS 1/2 beyond Limits.MaxQueued of a session
	DropExpired    DropReason = "expired"     // message expiry passed before delivery
	DropDenied     DropReason = "denied"      // the subscriber may not read the topic
	DropTooLarge   DropReason = "too_large"   // larger than the client's Maximum Packet Size
	DropTopicLimit DropReason = "topic_limit" // a topic longer or deeper than Limits.MaxTopicLength / MaxTopicLevels
	DropPolicy     DropReason = "policy"      // a PublishChecker refused the payload
	DropNoSpace    DropReason = "no_space"    // the store's volume is below its free-space reserve (storage.ErrNoSpace)
)

// ClientInfo describes a connection to observers.
type ClientInfo struct {
	ID              string
	Username        string
	Listener        string
	Remote          string
	ProtocolVersion byte
	Principal       Principal
	SessionPresent  bool
	Persistent      bool
	CleanStart      bool          // the CONNECT's clean start (3.1.1: clean session)
	KeepAlive       time.Duration // in force: the client's, or the server's where it overrode it
}

// Limits are the protocol limits the engine enforces and announces.
// Zero values take the documented defaults.
type Limits struct {
	MaxPacketSize    uint32        // inbound packets; announced to v5 clients; default 1 MiB
	ReceiveMaximum   uint16        // inbound QoS 1/2 unacknowledged per connection; announced; default 100
	MaxQoS           byte          // highest QoS granted; default 2 (set MaxQoSSet to grant 0)
	MaxQoSSet        bool          // MaxQoS was given (0 is a valid maximum)
	NoRetain         bool          // retained messages not available
	NoSharedSubs     bool          // shared subscriptions not available
	TopicAliasMax    uint16        // inbound aliases per v5 connection; 0 disables
	MaxTopicLength   int           // bytes in a topic name or filter; default (0) 65535, MQTT's cap
	MaxTopicLevels   int           // levels in a topic name or filter; 0 = no limit
	KeepaliveMin     time.Duration // lowest keep-alive accepted (raised to this via Server Keep Alive)
	KeepaliveMax     time.Duration // highest keep-alive accepted (lowered via Server Keep Alive)
	MaxSessionExpiry time.Duration // cap for v5 session expiry; lifetime of 3.1.1 persistent sessions; default 7 days
	MaxMessageExpiry time.Duration // cap on message expiry; 0 = none
	MaxQueued        int           // QoS 1/2 messages per session (inflight + queued); default 1000
	OutboundBudget   int           // bytes queued per connection before QoS 0 is dropped; default 1 MiB
	WriteTimeout     time.Duration // a write that takes longer closes the connection (slow consumer); default 10s
	ConnectTimeout   time.Duration // time to send CONNECT after the socket opens; default 10s
	MaxClients       int           // concurrent connections; 0 = unlimited
	// IdleAfter is how long a plain TCP connection waits for its next
	// packet with a reader goroutine; then the goroutine returns and the
	// idle poller watches the socket (Linux). Default 1s; negative: never.
	// A connection that has not sent or been sent a PUBLISH yet waits at
	// most firstIdleAfter.
	IdleAfter time.Duration
	// PublisherStall is how long a publisher is held back, per delivery,
	// while a subscriber's socket drains a full outbound budget, before a
	// QoS 0 message to it is dropped (queue_full). Default 100ms;
	// negative: drop at once.
	PublisherStall time.Duration
}

func (l *Limits) defaults() {
	if l.MaxPacketSize == 0 {
		l.MaxPacketSize = 1 << 20
	}
	if l.MaxTopicLength <= 0 || l.MaxTopicLength > 65535 {
		l.MaxTopicLength = 65535
	}
	if l.ReceiveMaximum == 0 {
		l.ReceiveMaximum = 100
	}
	if !l.MaxQoSSet && l.MaxQoS == 0 {
		l.MaxQoS = 2
	}
	if l.MaxSessionExpiry == 0 {
		l.MaxSessionExpiry = 7 * 24 * time.Hour
	}
	if l.MaxQueued == 0 {
		l.MaxQueued = 1000
	}
	if l.OutboundBudget == 0 {
		l.OutboundBudget = 1 << 20
	}
	if l.WriteTimeout == 0 {
		l.WriteTimeout = 10 * time.Second
	}
	if l.ConnectTimeout == 0 {
		l.ConnectTimeout = 10 * time.Second
	}
	if l.IdleAfter == 0 {
		l.IdleAfter = time.Second
	}
	if l.PublisherStall == 0 {
		l.PublisherStall = 100 * time.Millisecond
	}
}

// Options configure a Server.
type Options struct {
	Limits Limits
	// Auth admits connections; nil admits everyone as AllowAll.
	Auth Authenticator
	// Observer is told of connections, routing and drops; nil for none.
	Observer Observer
	// Log is the engine's logger; default slog.Default(). It never logs
	// payloads or credentials.
	Log *slog.Logger
	// Version is reported in $SYS/broker/version.
	Version string
	// SysInterval is how often the $SYS/broker/... topics are refreshed;
	// 0 = never.
	SysInterval time.Duration
	// Now is the clock; default time.Now (tests).
	Now func() time.Time
	// Persistence makes sessions and messages durable; nil keeps them in
	// memory. Call Server.Load before serving.
	Persistence *Persistence
	// Committer, if set, adds writes of its own (a webhook outbox) to the
	// atomic write of each accepted message, and hears whether it
	// committed.
	Committer Committer

	// Cluster, if set, hears the filters this node's subscriptions cover
	// and forwards what other nodes want (broker/cluster).
	Cluster Cluster
}

// Cluster joins the engine to other nodes. A message that came from
// another node (Server.BeginRemote) is never routed to one.
type Cluster interface {
	// Interest hears a filter (in a shared group, or "") gain its first
	// local subscriber or lose its last. It runs under the subscription
	// index's lock: it must be quick and must not call the engine.
	Interest(filter, group string, added bool)
	// AwaitInterest returns once the other nodes can know the filters
	// reported so far (they are in Redis), or after wait, or at once
	// while the cluster is unreachable. A SUBACK waits for it.
	AwaitInterest(wait time.Duration)
	// Route returns how a message accepted here reaches the other nodes
	// that want it, or nil for none; shared are the shared groups it
	// matched here (one member in the whole cluster gets it: the Remote
	// says which groups another node serves). It runs for every message:
	// quick.
	Route(m *Message, shared []topics.SharedMatch) Remote
	// Enter and Leave bracket Route and the numbering of the message in
	// the log that follows it (Leave gets what Enter returned), so the
	// cluster can wait until every message routed before a change of
	// interest has its seq. Both are quick and never block.
	Enter() uint64
	Leave(uint64)
	// ID is this node's name in the cluster.
	ID() string
	// Claim runs before a CONNECT takes its session (persistent: the
	// session outlives the connection). For one that resumes (not clean)
	// a session another node holds, it returns that session's state
	// (moved out there) and commit, to call once the session is made
	// here (gen: the session's generation here, MoveInFlights's): after
	// commit the other node lets it go. A clean one ends the other node's
	// session. An error refuses the CONNECT (server unavailable), so the
	// client tries again; ErrUndecided from commit keeps the session here
	// refusing CONNECTs until SettleMove.
	Claim(client string, clean, persistent bool) (moved *MovedSession, commit func(gen uint64, merged bool) error, err error)
}

// interestWait bounds how long a SUBACK waits for the cluster to hear of
// a new filter.
const interestWait = 2 * time.Second

// Scope limits which of this node's subscriptions a message from another
// node reaches: the other node chose this one for some shared groups and
// may have chosen others for the rest.
type Scope struct {
	NoDirect bool     // not the subscriptions outside shared groups
	Groups   []string // the shared groups served here, each "group\x00filter"
}

func (sc *Scope) serves(group, filter string) bool {
	for _, g := range sc.Groups {
		if len(g) == len(group)+1+len(filter) && g[:len(group)] == group && g[len(group)] == 0 && g[len(group)+1:] == filter {
			return true
		}
	}
	return false
}

// Remote is one message's way to other nodes (from Cluster.Route).
type Remote interface {
	// Durable reports whether the message is forwarded from the log: it
	// is then written and acknowledged only once durable, and the engine
	// takes one log reference on it for the cluster (which gives it back
	// with Unref once forwarded). Otherwise (QoS 0) it is sent as it is.
	Durable() bool
	// Queued adds writes to the one that stores the message as seq. It
	// runs under the log's append lock, in seq order: it must be quick
	// and must not call the log.
	Queued(m *Message, seq uint64) []storage.Op
	// Takes reports whether another node serves a shared group that
	// matched here, for this message.
	Takes(group, filter string) bool
	// Done follows once the message's write committed (err nil), or
	// failed, before it is delivered here; for a Remote that is not
	// Durable, once it was delivered here.
	Done(m *Message, err error)
}

// firstIdleAfter is how long a connection that has not sent or been sent
// a PUBLISH yet waits for its next packet with a reader goroutine of its
// own. Most devices connect, subscribe and then wait: after a reconnect
// storm of thousands of them, each reader that lived for IdleAfter at the
// same time leaves its goroutine descriptor in the runtime's free list for
// good (about 0.4 KiB each) and its stack in the heap until the next
// collection. Handing them to the idle poller sooner keeps far fewer
// readers alive at once; one that parks between its CONNECT and its
// SUBSCRIBE (a slow link) parks as soon again after it. Once messages
// flow, IdleAfter holds, so a device that publishes now and then does not
// park between its messages any more than before.
const firstIdleAfter = 100 * time.Millisecond
