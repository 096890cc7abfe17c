// Package engine is Beacon's MQTT engine: connections, sessions and the
// router, for MQTT 3.1.1 and 5.0 over any net.Conn (TCP, TLS, WebSocket).
// It uses mochi's packets package as the wire codec and nothing else of
// mochi.
//
// The rooms:
//
//   - conn: one goroutine reads and handles a connection's packets; writes
//     are queued as bytes and flushed by a short-lived flusher goroutine, so
//     many packets leave in one write and an idle connection holds no write
//     buffer. Each connection has an outbound byte budget: QoS 0 beyond it
//     is dropped and counted, QoS 1/2 wait in the session, and a write that
//     does not finish within the write timeout closes the connection as a
//     slow consumer.
//   - session: what outlives a connection: subscriptions, the outbound
//     flows (server-assigned packet ids, at most the client's Receive
//     Maximum in flight, the rest queued in order), and the inbound QoS 2
//     flows (client-assigned ids, a separate space). A session is attached
//     to at most one connection; takeover swaps it under the session's lock,
//     so a message routed to the client id in between is queued, not lost.
//   - router: matches a published message against the topic index
//     (broker/topics), authorizes each delivery with the subscriber's
//     Principal and hands it to the session. A publisher never waits for a
//     subscriber.
//
// A QoS 1/2 publish is read, authorized, made durable (Options.Persist),
// routed and only then acknowledged.
package engine
