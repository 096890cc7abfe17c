// Package hooks holds Beacon's mochi-mqtt hooks: durable storage of
// sessions and messages, connection limits, and drop accounting.
package hooks

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/beaconmq/beacon/storage"
)

// Store persists sessions, subscriptions, inflight and queued QoS 1/2
// messages and retained messages in a storage.DB.
//
// Durability of accepted messages: mochi acknowledges an inbound QoS 1/2
// PUBLISH before it routes it to subscribers (server.go processPublish), so
// the per-subscriber copies cannot be what makes a message durable. OnPublish
// therefore writes the message to an ingress log and waits for the group
// commit before mochi sends PUBACK/PUBREC. When routing is done, OnPublished
// writes the per-subscriber copies (and a retained update) together with the
// removal of the ingress record, as one atomic unit. After a crash, Restore
// routes whatever is still in the ingress log again, so an acknowledged
// message is never lost and a stored copy is never created twice (an
// online subscriber that received the message before the routing commit
// can get it again after a crash in that window).
//
// Register Store after every hook that may reject a publish in OnPublish, so
// a rejected message never reaches the ingress log.
type Store struct {
	mqtt.HookBase
	db             *storage.DB
	maxSessionExp  uint32
	server         *mqtt.Server
	identity       Identities
	seq            atomic.Uint64
	mu             sync.Mutex
	groups         map[string]*group   // by ingress tag: writes made while routing one message
	stored         map[string]struct{} // client ids with a session record
	recovered      atomic.Int64
	ingressWritten atomic.Int64
}

// group collects the writes made while one accepted message is routed.
type group struct {
	seq    uint64
	client *mqtt.Client
	ops    []storage.Op
	pubrec uint16 // packet id of a QoS 2 message whose PUBREC state was stored; 0 if none
}

// StoreOptions configures NewStore.
type StoreOptions struct {
	DB               *storage.DB
	MaxSessionExpiry uint32 // seconds; applies to v3 persistent sessions and caps v5 ones
	Server           *mqtt.Server
	Identity         Identities // optional: keeps who a session belongs to across restarts
}

// Identities saves and restores the principal of a session (the Auth hook).
type Identities interface {
	IdentityOf(cl *mqtt.Client) []byte
	RestoreIdentity(cl *mqtt.Client, data []byte)
}

// NewStore returns the storage hook. Restore must run after Serve and
// before listeners accept clients.
func NewStore(opts StoreOptions) *Store {
	return &Store{
		db:            opts.DB,
		maxSessionExp: opts.MaxSessionExpiry,
		server:        opts.Server,
		identity:      opts.Identity,
		groups:        make(map[string]*group),
		stored:        make(map[string]struct{}),
	}
}

var _ mqtt.Hook = (*Store)(nil)

// ID implements mqtt.Hook.
func (h *Store) ID() string { return "beacon-store" }

var storeEvents = eventSet(mqtt.OnSessionEstablish,
	mqtt.OnDisconnect,
	mqtt.OnSubscribed,
	mqtt.OnUnsubscribed,
	mqtt.OnPublish,
	mqtt.OnPublished,
	mqtt.OnRetainMessage,
	mqtt.OnRetainedExpired,
	mqtt.OnQosPublish,
	mqtt.OnQosComplete,
	mqtt.OnQosDropped,
	mqtt.OnPacketProcessed,
	mqtt.OnWillSent,
	mqtt.OnClientExpired)

// Provides implements mqtt.Hook.
func (h *Store) Provides(b byte) bool { return storeEvents[b] }

// takenOver reports whether a newer connection with the same client id
// has replaced cl. mochi marks the old client only after disconnecting it,
// so the stop cause is checked too: the old connection's hooks may run in
// between.
func takenOver(cl *mqtt.Client) bool {
	return cl.IsTakenOver() || errors.Is(cl.StopCause(), packets.ErrSessionTakenOver)
}

// persistent reports whether cl's session outlives its connection.
func persistent(cl *mqtt.Client) bool {
	if cl.Net.Inline {
		return false
	}
	if cl.Properties.ProtocolVersion == 5 {
		return cl.Properties.Props.SessionExpiryInterval > 0
	}
	return !cl.Properties.Clean
}

func (h *Store) sessionRecord(cl *mqtt.Client, disconnected int64) storage.Session {
	p := cl.Properties
	s := storage.Session{
		ID:                cl.ID,
		Listener:          cl.Net.Listener,
		Username:          p.Username,
		ProtocolVersion:   p.ProtocolVersion,
		Clean:             p.Clean,
		SessionExpiry:     min(p.Props.SessionExpiryInterval, h.maxSessionExp),
		SessionExpirySet:  p.Props.SessionExpiryIntervalFlag,
		ReceiveMaximum:    p.Props.ReceiveMaximum,
		TopicAliasMaximum: p.Props.TopicAliasMaximum,
		MaximumPacketSize: p.Props.MaximumPacketSize,
		User:              p.Props.User,
		Disconnected:      disconnected,
	}
	if h.identity != nil {
		s.Identity = h.identity.IdentityOf(cl)
	}
	if atomic.LoadUint32(&p.Will.Flag) == 1 {
		s.Will = &storage.Will{
			Topic: p.Will.TopicName, Payload: p.Will.Payload, Qos: p.Will.Qos,
			Retain: p.Will.Retain, Delay: p.Will.WillDelayInterval, User: p.Will.User,
		}
	}
	return s
}

// clearSession returns the ops that remove every record of a session.
func clearSession(id string) []storage.Op {
	return []storage.Op{
		storage.Delete(storage.ClientKey(id)),
		storage.DeletePrefix(storage.SubscriptionPrefix(id)),
		storage.DeletePrefix(storage.InflightPrefix(id)),
	}
}

// OnSessionEstablish stores (or clears) the session before CONNACK is sent,
// so a subscriber's session exists on disk once it has been acknowledged.
func (h *Store) OnSessionEstablish(cl *mqtt.Client, pk packets.Packet) {
	h.mu.Lock()
	_, had := h.stored[cl.ID]
	keep := persistent(cl)
	if keep {
		h.stored[cl.ID] = struct{}{}
	} else {
		delete(h.stored, cl.ID)
	}
	h.mu.Unlock()

	var ops []storage.Op
	if had && (pk.Connect.Clean || !keep) {
		ops = clearSession(cl.ID)
	}
	if keep {
		ops = append(ops, storage.Set(storage.ClientKey(cl.ID), storage.MarshalJSONValue(h.sessionRecord(cl, 0))))
	}
	if len(ops) == 0 {
		return
	}
	if err := h.db.Write(ops...); err != nil {
		h.Log.Error("store session", "client", cl.ID, "error", err)
	}
}

// OnDisconnect records the disconnect time of a persistent session, or
// removes the records of one that ends with its connection.
func (h *Store) OnDisconnect(cl *mqtt.Client, _ error, expire bool) {
	h.dropStaleGroups(cl)
	if takenOver(cl) {
		return
	}
	if current, ok := h.server.Clients.Get(cl.ID); ok && current != cl {
		return // a newer connection owns the session
	}
	h.mu.Lock()
	_, had := h.stored[cl.ID]
	if expire {
		delete(h.stored, cl.ID)
	}
	h.mu.Unlock()
	if !had {
		return
	}
	if expire {
		h.db.WriteAsync(clearSession(cl.ID)...)
		return
	}
	h.db.WriteAsync(storage.Set(storage.ClientKey(cl.ID), storage.MarshalJSONValue(h.sessionRecord(cl, time.Now().Unix()))))
}

// dropStaleGroups forgets the ingress records of messages cl sent but that
// were never acknowledged (the connection failed between OnPublish and
// routing): the client still owns them and will send them again.
func (h *Store) dropStaleGroups(cl *mqtt.Client) {
	var ops []storage.Op
	h.mu.Lock()
	for tag, g := range h.groups {
		if g.client == cl {
			ops = append(ops, storage.Delete(storage.IngressKey(g.seq)))
			if g.pubrec != 0 {
				// The PUBREC never reached the client, which will send the
				// PUBLISH again: it must not find the id "in use".
				ops = append(ops, storage.Delete(storage.InflightKey(cl.ID, g.pubrec)))
				cl.State.Inflight.Delete(g.pubrec)
			}
			delete(h.groups, tag)
		}
	}
	h.mu.Unlock()
	if len(ops) > 0 {
		h.db.WriteAsync(ops...)
	}
}

// OnClientExpired removes an expired session, from storage and from the
// topic index: mochi forgets the client but leaves its subscriptions in
// place, so a later client with the same id would receive their messages.
func (h *Store) OnClientExpired(cl *mqtt.Client) {
	h.mu.Lock()
	_, had := h.stored[cl.ID]
	delete(h.stored, cl.ID)
	h.mu.Unlock()
	h.server.UnsubscribeClient(cl)
	cl.ClearInflights()
	if had {
		h.db.WriteAsync(clearSession(cl.ID)...)
	}
}

// OnWillSent records that a session no longer has a will to send.
func (h *Store) OnWillSent(cl *mqtt.Client, _ packets.Packet) {
	if !persistent(cl) || !cl.Closed() {
		return
	}
	h.db.WriteAsync(storage.Set(storage.ClientKey(cl.ID), storage.MarshalJSONValue(h.sessionRecord(cl, cl.StopTime()))))
}

// OnSubscribed stores granted subscriptions before SUBACK is sent.
func (h *Store) OnSubscribed(cl *mqtt.Client, pk packets.Packet, codes []byte) {
	if !persistent(cl) {
		return
	}
	ops := make([]storage.Op, 0, len(pk.Filters))
	for i, sub := range pk.Filters {
		if i >= len(codes) || codes[i] >= packets.ErrUnspecifiedError.Code {
			continue
		}
		rec := storage.Subscription{
			Filter: sub.Filter, Qos: codes[i], NoLocal: sub.NoLocal,
			RetainAsPublished: sub.RetainAsPublished, RetainHandling: sub.RetainHandling,
			Identifier: sub.Identifier,
		}
		ops = append(ops, storage.Set(storage.SubscriptionKey(cl.ID, sub.Filter), storage.MarshalJSONValue(rec)))
	}
	if len(ops) == 0 {
		return
	}
	if err := h.db.Write(ops...); err != nil {
		h.Log.Error("store subscription", "client", cl.ID, "error", err)
	}
}

// OnUnsubscribed removes subscriptions before UNSUBACK is sent.
func (h *Store) OnUnsubscribed(cl *mqtt.Client, pk packets.Packet) {
	if !persistent(cl) {
		return
	}
	ops := make([]storage.Op, 0, len(pk.Filters))
	for _, sub := range pk.Filters {
		ops = append(ops, storage.Delete(storage.SubscriptionKey(cl.ID, sub.Filter)))
	}
	if len(ops) == 0 {
		return
	}
	if err := h.db.Write(ops...); err != nil {
		h.Log.Error("remove subscription", "client", cl.ID, "error", err)
	}
}

// ingressKey is the group key of a message in the ingress log (see tag.go).
func ingressKey(pk *packets.Packet) (string, bool) {
	t, ok := readTag(pk)
	if !ok || !t.ingress {
		return "", false
	}
	return pk.Connect.ClientIdentifier, true
}

// OnPublish makes an inbound QoS 1/2 message durable before mochi
// acknowledges it. A storage failure refuses the message: v5 clients get
// "unspecified error", v3 clients no acknowledgement (they send it again).
func (h *Store) OnPublish(cl *mqtt.Client, pk packets.Packet) (packets.Packet, error) {
	if pk.FixedHeader.Qos == 0 {
		return pk, nil
	}
	t, _ := readTag(&pk)
	if t.ingress { // a recovered message being routed again
		h.mu.Lock()
		h.groups[pk.Connect.ClientIdentifier] = &group{seq: t.seq, client: cl}
		h.mu.Unlock()
		return pk, nil
	}

	seq := h.seq.Add(1)
	rec := pk
	rec.Origin = cl.ID
	ops := []storage.Op{storage.Set(storage.IngressKey(seq), storage.AppendMessage(nil, &rec))}
	var pubrec uint16
	if pk.FixedHeader.Qos == 2 && persistent(cl) {
		pubrec = pk.PacketID
		// The PUBREC state goes with the message: after a crash a resent
		// PUBLISH with this packet id is recognised, not routed twice.
		pubrec := packets.Packet{
			FixedHeader: packets.FixedHeader{Type: packets.Pubrec},
			PacketID:    pk.PacketID, ProtocolVersion: cl.Properties.ProtocolVersion,
			Created: time.Now().Unix(),
		}
		ops = append(ops, storage.Set(storage.InflightKey(cl.ID, pk.PacketID), storage.AppendMessage(nil, &pubrec)))
	}
	if err := h.db.Write(ops...); err != nil {
		h.Log.Error("store accepted message", "client", cl.ID, "topic", pk.TopicName, "error", err)
		if cl.Properties.ProtocolVersion == 5 && pk.FixedHeader.Qos == 1 {
			return pk, packets.ErrUnspecifiedError // mochi answers PUBACK 0x80
		}
		if cl.Properties.ProtocolVersion == 5 { // mochi would answer a QoS 2 refusal with a PUBACK
			_ = cl.WritePacket(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Pubrec},
				PacketID: pk.PacketID, ReasonCode: packets.ErrUnspecifiedError.Code})
		}
		return pk, packets.ErrRejectPacket
	}
	h.ingressWritten.Add(1)
	t.ingress, t.seq = true, seq
	setTag(&pk, t)
	h.mu.Lock()
	h.groups[pk.Connect.ClientIdentifier] = &group{seq: seq, client: cl, pubrec: pubrec}
	h.mu.Unlock()
	return pk, nil
}

// addOrWrite adds op to the routing group of pk, or writes it on its own.
func (h *Store) addOrWrite(pk *packets.Packet, op storage.Op) {
	if tag, ok := ingressKey(pk); ok {
		h.mu.Lock()
		if g, ok := h.groups[tag]; ok {
			g.ops = append(g.ops, op)
			h.mu.Unlock()
			return
		}
		h.mu.Unlock()
	}
	h.db.WriteAsync(op)
}

// OnPublished writes the copies made while routing an accepted message
// together with the removal of its ingress record.
func (h *Store) OnPublished(_ *mqtt.Client, pk packets.Packet) {
	tag, ok := ingressKey(&pk)
	if !ok {
		return
	}
	h.mu.Lock()
	g, ok := h.groups[tag]
	delete(h.groups, tag)
	h.mu.Unlock()
	if !ok {
		return
	}
	done := storage.Delete(storage.IngressKey(g.seq))
	size := 0
	for _, op := range g.ops {
		size += op.Size()
	}
	if size <= maxAtomicRouting {
		h.db.WriteAsync(append(g.ops, done)...)
		return
	}
	// Too large for one transaction (a big payload to many persistent
	// sessions): copies one by one, then the ingress record. A crash in
	// between delivers some copies twice; it never loses one, and never
	// leaves a record that fails again at every restart.
	for _, op := range g.ops {
		h.db.WriteAsync(op)
	}
	h.db.WriteAsync(done)
}

// maxAtomicRouting bounds the routing writes committed as one transaction,
// well inside badger's limit for one transaction.
const maxAtomicRouting = 1 << 20

// OnRetainMessage stores or removes a retained message.
func (h *Store) OnRetainMessage(_ *mqtt.Client, pk packets.Packet, r int64) {
	if len(pk.TopicName) > 0 && pk.TopicName[0] == '$' {
		return // $SYS and other server topics are rebuilt, not stored
	}
	key := storage.RetainedKey(pk.TopicName)
	switch {
	case r == 1:
		rec := pk
		rec.PacketID = 0
		rec.FixedHeader.Dup = false
		h.addOrWrite(&pk, storage.Set(key, storage.AppendMessage(nil, &rec)))
	case len(pk.Payload) == 0:
		h.addOrWrite(&pk, storage.Delete(key))
	}
}

// OnRetainedExpired removes an expired retained message.
func (h *Store) OnRetainedExpired(topic string) {
	h.db.WriteAsync(storage.Delete(storage.RetainedKey(topic)))
}

// OnQosPublish stores an outbound QoS 1/2 copy for a persistent session.
func (h *Store) OnQosPublish(cl *mqtt.Client, pk packets.Packet, _ int64, _ int) {
	if !persistent(cl) {
		return
	}
	switch pk.FixedHeader.Type {
	case packets.Publish:
		if pk.FixedHeader.Dup {
			return // a resend of what is already stored
		}
	case packets.Pubrel:
	default:
		return // PUBACK is never kept; PUBREC was stored with the message
	}
	h.addOrWrite(&pk, storage.Set(storage.InflightKey(cl.ID, pk.PacketID), storage.AppendMessage(nil, &pk)))
}

// OnPacketProcessed records the PUBREC -> PUBREL step of an outbound QoS 2
// flow, which mochi makes without a hook.
func (h *Store) OnPacketProcessed(cl *mqtt.Client, pk packets.Packet, err error) {
	if err != nil || pk.FixedHeader.Type != packets.Pubrec || !persistent(cl) {
		return
	}
	if pkr, ok := cl.State.Inflight.Get(pk.PacketID); ok && pkr.FixedHeader.Type == packets.Pubrel {
		h.db.WriteAsync(storage.Set(storage.InflightKey(cl.ID, pk.PacketID), storage.AppendMessage(nil, &pkr)))
	}
}

// OnQosComplete removes a finished QoS flow.
func (h *Store) OnQosComplete(cl *mqtt.Client, pk packets.Packet) {
	if !persistent(cl) {
		return
	}
	if pk.FixedHeader.Type == packets.Puback && pk.Created != 0 {
		return // our own PUBACK to an inbound QoS 1 message: nothing was stored
	}
	h.db.WriteAsync(storage.Delete(storage.InflightKey(cl.ID, pk.PacketID)))
}

// OnQosDropped removes an expired or refused QoS flow. A session taken
// over by a new connection also "drops" its messages (mochi clears the old
// client after copying them to the new one): those stay stored.
func (h *Store) OnQosDropped(cl *mqtt.Client, pk packets.Packet) {
	if !persistent(cl) || takenOver(cl) {
		return
	}
	h.db.WriteAsync(storage.Delete(storage.InflightKey(cl.ID, pk.PacketID)))
}

// RestoreStats says what Restore loaded.
type RestoreStats struct {
	Sessions, Subscriptions, Inflight, Retained, Recovered, Expired, Wills int
}

// Restore loads sessions, subscriptions, inflight messages and retained
// messages into the server, routes the messages left in the ingress log,
// and publishes the wills of sessions that were connected when the broker
// stopped without a clean shutdown. Call it after Serve and before any
// listener accepts clients.
func (h *Store) Restore() (RestoreStats, error) {
	var st RestoreStats
	s := h.server
	now := time.Now().Unix()
	var cleanup []storage.Op
	var wills []*mqtt.Client

	err := h.db.Scan(storage.ClientPrefix(), func(key, val []byte) error {
		var rec storage.Session
		if err := json.Unmarshal(val, &rec); err != nil {
			return fmt.Errorf("session %q: %w", key, err)
		}
		expiry := int64(h.maxSessionExp)
		if rec.ProtocolVersion == 5 && rec.SessionExpirySet {
			expiry = int64(min(rec.SessionExpiry, h.maxSessionExp))
		}
		if rec.Disconnected > 0 && rec.Disconnected+expiry < now {
			cleanup = append(cleanup, clearSession(rec.ID)...)
			st.Expired++
			return nil
		}
		cl := s.NewClient(nil, rec.Listener, rec.ID, false)
		cl.Properties.Username = rec.Username
		cl.Properties.Clean = rec.Clean
		cl.Properties.ProtocolVersion = rec.ProtocolVersion
		cl.Properties.Props = packets.Properties{
			SessionExpiryInterval:     rec.SessionExpiry,
			SessionExpiryIntervalFlag: rec.SessionExpirySet,
			ReceiveMaximum:            rec.ReceiveMaximum,
			TopicAliasMaximum:         rec.TopicAliasMaximum,
			MaximumPacketSize:         rec.MaximumPacketSize,
			User:                      rec.User,
		}
		if rec.Will != nil {
			cl.Properties.Will = mqtt.Will{
				Flag: 1, TopicName: rec.Will.Topic, Payload: rec.Will.Payload, Qos: rec.Will.Qos,
				Retain: rec.Will.Retain, WillDelayInterval: rec.Will.Delay, User: rec.Will.User,
			}
			if rec.Disconnected == 0 {
				wills = append(wills, cl) // connected when the broker died
			}
		}
		cl.Stop(packets.ErrServerShuttingDown)
		if h.identity != nil {
			h.identity.RestoreIdentity(cl, rec.Identity)
		}
		if !persistent(cl) {
			cleanup = append(cleanup, clearSession(rec.ID)...)
			return nil
		}
		s.Clients.Add(cl)
		h.mu.Lock() // mochi's event loop already runs (client expiry)
		h.stored[rec.ID] = struct{}{}
		h.mu.Unlock()
		st.Sessions++
		return nil
	})
	if err != nil {
		return st, fmt.Errorf("restore sessions: %w", err)
	}

	err = h.db.Scan(storage.SubscriptionPrefix(""), func(key, val []byte) error {
		rest := key[len(storage.SubscriptionPrefix("")):]
		i := bytes.IndexByte(rest, 0)
		if i < 0 {
			return fmt.Errorf("subscription key %q: no separator", key)
		}
		id := string(rest[:i])
		cl, ok := s.Clients.Get(id)
		if !ok {
			cleanup = append(cleanup, storage.Delete(bytes.Clone(key)))
			return nil
		}
		var rec storage.Subscription
		if err := json.Unmarshal(val, &rec); err != nil {
			return fmt.Errorf("subscription %q: %w", key, err)
		}
		sub := packets.Subscription{
			Filter: rec.Filter, Qos: rec.Qos, NoLocal: rec.NoLocal,
			RetainAsPublished: rec.RetainAsPublished, RetainHandling: rec.RetainHandling,
			Identifier: rec.Identifier,
		}
		if s.Topics.Subscribe(id, sub) {
			atomic.AddInt64(&s.Info.Subscriptions, 1)
		}
		cl.State.Subscriptions.Add(sub.Filter, sub)
		st.Subscriptions++
		return nil
	})
	if err != nil {
		return st, fmt.Errorf("restore subscriptions: %w", err)
	}

	err = h.db.Scan(storage.InflightPrefix(""), func(key, val []byte) error {
		id, ok := storage.SplitInflightKey(key)
		cl, found := s.Clients.Get(id)
		if !ok || !found {
			cleanup = append(cleanup, storage.Delete(bytes.Clone(key)))
			return nil
		}
		pk, err := storage.DecodeMessage(val)
		if err != nil {
			h.Log.Error("skipping corrupt inflight record", "client", id, "error", err)
			cleanup = append(cleanup, storage.Delete(bytes.Clone(key)))
			return nil
		}
		if cl.State.Inflight.Set(pk) {
			atomic.AddInt64(&s.Info.Inflight, 1)
		}
		st.Inflight++
		return nil
	})
	if err != nil {
		return st, fmt.Errorf("restore inflight: %w", err)
	}

	err = h.db.Scan(storage.RetainedPrefix(), func(key, val []byte) error {
		pk, err := storage.DecodeMessage(val)
		if err != nil {
			h.Log.Error("skipping corrupt retained record", "key", string(key), "error", err)
			cleanup = append(cleanup, storage.Delete(bytes.Clone(key)))
			return nil
		}
		s.Topics.RetainMessage(pk)
		st.Retained++
		return nil
	})
	if err != nil {
		return st, fmt.Errorf("restore retained: %w", err)
	}
	atomic.StoreInt64(&s.Info.Retained, int64(s.Topics.Retained.Len()))

	if len(cleanup) > 0 {
		if err := h.db.Write(cleanup...); err != nil {
			return st, fmt.Errorf("clean up stale records: %w", err)
		}
	}

	n, err := h.recoverIngress()
	st.Recovered = n
	if err != nil {
		return st, err
	}

	for _, cl := range wills {
		h.sendWill(cl)
		st.Wills++
	}
	return st, nil
}

// recoverIngress routes again every message that was acknowledged but whose
// routing had not been committed when the broker stopped.
func (h *Store) recoverIngress() (int, error) {
	type entry struct {
		seq uint64
		pk  packets.Packet
	}
	var entries []entry
	var bad []storage.Op
	err := h.db.Scan(storage.IngressPrefix(), func(key, val []byte) error {
		seq, ok := storage.ParseIngressKey(key)
		if !ok {
			bad = append(bad, storage.Delete(bytes.Clone(key)))
			return nil
		}
		if seq > h.seq.Load() {
			h.seq.Store(seq)
		}
		pk, err := storage.DecodeMessage(val)
		if err != nil {
			h.Log.Error("skipping corrupt ingress record", "seq", seq, "error", err)
			bad = append(bad, storage.Delete(bytes.Clone(key)))
			return nil
		}
		entries = append(entries, entry{seq, pk})
		return nil
	})
	if err != nil {
		return 0, fmt.Errorf("read ingress log: %w", err)
	}
	if len(bad) > 0 {
		h.db.WriteAsync(bad...)
	}
	inline, ok := h.server.Clients.Get(mqtt.InlineClientId)
	if !ok && len(entries) > 0 {
		return 0, errors.New("recover ingress: the inline client is not enabled")
	}
	for _, e := range entries {
		pk := e.pk
		pk.FixedHeader.Type = packets.Publish
		pk.FixedHeader.Dup = false
		setTag(&pk, msgTag{ingress: true, seq: e.seq, recv: time.Now().UnixNano()})
		if err := h.server.InjectPacket(inline, pk); err != nil {
			return 0, fmt.Errorf("recover message %d on %q: %w", e.seq, pk.TopicName, err)
		}
		h.recovered.Add(1)
	}
	return len(entries), nil
}

// sendWill publishes the will of a session whose connection ended with the
// broker process, and records that it was sent.
func (h *Store) sendWill(cl *mqtt.Client) {
	w := cl.Properties.Will
	inline, ok := h.server.Clients.Get(mqtt.InlineClientId)
	if !ok {
		return
	}
	err := h.server.InjectPacket(inline, packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: w.Qos, Retain: w.Retain},
		TopicName:   w.TopicName,
		Payload:     w.Payload,
		Properties:  packets.Properties{User: w.User},
		PacketID:    uint16(w.Qos), // any non-zero id for QoS > 0; the inline client never acks
	})
	if err != nil {
		h.Log.Warn("send will after restart", "client", cl.ID, "error", err)
	}
	cl.Properties.Will = mqtt.Will{}
	h.db.WriteAsync(storage.Set(storage.ClientKey(cl.ID), storage.MarshalJSONValue(h.sessionRecord(cl, time.Now().Unix()))))
}

// StoreStats are counters for tests and metrics.
type StoreStats struct {
	IngressWritten int64 // accepted QoS 1/2 messages made durable before their ack
	Recovered      int64 // messages routed again from the ingress log after a restart
}

// Stats returns the counters.
func (h *Store) Stats() StoreStats {
	return StoreStats{IngressWritten: h.ingressWritten.Load(), Recovered: h.recovered.Load()}
}
