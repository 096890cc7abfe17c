package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync/atomic"
	"time"
)

// publisher is an MQTT connection that publishes to one topic. run writes
// PUBLISH packets through w; ackLoop reads the acknowledgements and answers
// PUBREC with PUBREL through a writer of its own. At QoS 1/2 the packet ids
// in free are the window: run takes one per message and waits when none is
// left, ackLoop gives it back when the flow completes.
type publisher struct {
	idx      uint32
	conn     net.Conn
	qos      byte
	tmpl     publishTemplate
	window   int             // messages in flight at most (--inflight, capped by the broker's Receive Maximum)
	free     chan uint16     // packet ids not in flight
	inflight []atomic.Uint64 // by packet id: sequence number + 1 of the message in flight, 0 when free

	w *bufio.Writer // PUBLISH; run's

	// The ack loop's. acked, codes and strays are read once ackDone is closed.
	r         *reader
	acks      *bufio.Writer
	acked     bitset         // sequence numbers the broker accepted (QoS 1/2)
	published atomic.Int64   // accepted with a success code (QoS 1/2) or written to the socket (QoS 0)
	codes     map[byte]int64 // refusals by reason code
	strays    int64          // acknowledgements of packet ids not in flight
	closing   atomic.Bool
	ackErr    error
	ackEarly  bool // the loop ended before close: the broker dropped us
	ackDone   chan struct{}

	// run's, read after it returns.
	pending int64 // PUBLISH packets in w, not flushed yet
	sent    int64 // PUBLISH packets written to the socket
	unsent  int64 // due under --rate but not sent by the time the run gave up
	runErr  error
}

// connectPublisher connects and starts reading acknowledgements.
func connectPublisher(cfg config, id string, idx int, topic string) (*publisher, error) {
	conn, err := dial(cfg.Addr, nil)
	if err != nil {
		return nil, err
	}
	p := &publisher{idx: uint32(idx), conn: conn, qos: cfg.QoS, tmpl: newPublishTemplate(topic, cfg.QoS, cfg.Size),
		w: bufio.NewWriterSize(conn, 16<<10), r: newReader(conn, 16<<10), acks: bufio.NewWriterSize(conn, 4<<10),
		codes: map[byte]int64{}, ackDone: make(chan struct{})}
	ca, err := handshake(conn, p.r, id, cfg.Username, cfg.Password, 60)
	if err != nil {
		_ = conn.Close()
		return nil, err
	}
	if cfg.QoS > ca.maxQoS {
		_ = conn.Close()
		return nil, fmt.Errorf("connect %s: the broker takes QoS %d at most", id, ca.maxQoS)
	}
	if cfg.QoS > 0 {
		p.window = min(cfg.Inflight, ca.receiveMax)
		p.free = make(chan uint16, p.window)
		for i := 1; i <= p.window; i++ {
			p.free <- uint16(i)
		}
		p.inflight = make([]atomic.Uint64, p.window+1)
	}
	go p.ackLoop()
	return p, nil
}

// schedule says when a publisher's messages are due.
type schedule struct {
	start    time.Time
	deadline time.Time     // no message is due at or after it
	giveUp   time.Time     // stop catching up with messages that are due (under --rate) or waiting for the window
	interval time.Duration // between this publisher's messages; 0 = as fast as the broker takes them
	offset   time.Duration // of the first message, so publishers do not all send at once
}

// due is the number of messages due before the deadline.
func (s schedule) due() int64 {
	span := s.deadline.Sub(s.start) - s.offset
	if s.interval <= 0 || span <= 0 {
		return 0
	}
	return int64((span + s.interval - 1) / s.interval)
}

// errStopped ends a run early: at giveUp, when ctx ends, or when the
// broker closed the connection (the ack loop says why).
var errStopped = errors.New("publishing stopped")

// run publishes until the schedule ends, then waits until its messages in
// flight are acknowledged. At giveUp it stops whatever it is doing.
func (p *publisher) run(ctx context.Context, s schedule) {
	ctx, cancel := context.WithDeadline(ctx, s.giveUp)
	defer cancel()
	// A write the broker does not take in time fails: at giveUp, or at the
	// deadline for QoS 0 as fast as it goes (nothing is due after it, and
	// nothing waits for an acknowledgement).
	stopWriting := s.giveUp
	if p.qos == 0 && s.interval == 0 {
		stopWriting = s.deadline
	}
	_ = p.conn.SetWriteDeadline(stopWriting)
	pause := time.NewTimer(time.Hour)
	pause.Stop()
	defer pause.Stop()

	last := s.due()
	var err error
	k := int64(0)
	for ; ; k++ {
		var due time.Time
		if s.interval > 0 {
			if k >= last {
				break
			}
			// Open loop: message k is due at its time, however late the
			// ones before it went out.
			due = s.start.Add(s.offset + time.Duration(k)*s.interval)
			if err = p.sleepUntil(ctx, due, pause); err != nil {
				break
			}
		} else if due = time.Now(); !due.Before(s.deadline) {
			break
		}
		var id uint16
		if p.qos > 0 {
			if id, err = p.takeID(ctx); err != nil {
				break
			}
			p.inflight[id].Store(uint64(k) + 1)
		}
		if err = p.write(id, due.UnixNano(), uint64(k)); err != nil {
			break
		}
	}
	if s.interval > 0 && k < last {
		p.unsent = last - k
	}
	if err == nil {
		err = p.flush()
	}
	if errors.Is(err, errStopped) {
		err = nil
	}
	if p.runErr = err; err == nil && p.qos > 0 {
		p.awaitWindow(ctx)
	}
}

// sleepUntil flushes what is buffered and waits until due, if due is
// still to come.
func (p *publisher) sleepUntil(ctx context.Context, due time.Time, pause *time.Timer) error {
	wait := time.Until(due)
	if wait <= 0 {
		return nil
	}
	if err := p.flush(); err != nil {
		return err
	}
	pause.Reset(wait)
	select {
	case <-pause.C:
		return nil
	case <-p.ackDone:
		return errStopped
	case <-ctx.Done():
		return errStopped
	}
}

// takeID takes a packet id from the window, waiting for one when all are
// in flight (after sending what is buffered: their acks may depend on it).
func (p *publisher) takeID(ctx context.Context) (uint16, error) {
	select {
	case id := <-p.free:
		return id, nil
	default:
	}
	if err := p.flush(); err != nil {
		return 0, err
	}
	select {
	case id := <-p.free:
		return id, nil
	case <-p.ackDone:
		return 0, errStopped
	case <-ctx.Done():
		return 0, errStopped
	}
}

// awaitWindow waits until every message in flight is acknowledged.
func (p *publisher) awaitWindow(ctx context.Context) {
	for range p.window {
		select {
		case <-p.free:
		case <-p.ackDone:
			return
		case <-ctx.Done():
			return
		}
	}
}

// flush writes what is buffered and counts the packets sent.
func (p *publisher) flush() error {
	buffered := p.w.Buffered()
	err := p.w.Flush()
	done := p.pending
	if err != nil {
		// Every packet has the template's size: those written whole
		// before the error are sent.
		done = int64((buffered - p.w.Buffered()) / len(p.tmpl.b))
	}
	p.sent += done
	if p.qos == 0 {
		p.published.Add(done)
	}
	p.pending = 0
	return err
}

// write appends one PUBLISH to w, whole: a packet never straddles two
// writes (ackLoop writes PUBREL to the same socket between them).
func (p *publisher) write(id uint16, due int64, seq uint64) error {
	n := len(p.tmpl.b)
	if p.w.Available() < n {
		if err := p.flush(); err != nil {
			return err
		}
	}
	if n > p.w.Size() { // larger than the buffer: straight to the socket
		p.tmpl.stamp(p.tmpl.b, id, due, seq, p.idx)
		if _, err := p.w.Write(p.tmpl.b); err != nil {
			return err
		}
		p.pending++
		return p.flush()
	}
	b := append(p.w.AvailableBuffer(), p.tmpl.b...)
	p.tmpl.stamp(b, id, due, seq, p.idx)
	_, err := p.w.Write(b)
	p.pending++
	return err
}

func (p *publisher) ackLoop() {
	defer close(p.ackDone)
	for {
		pk, err := p.r.next()
		if err == nil {
			err = p.handle(pk)
		}
		if err == nil && p.r.buffered() == 0 {
			err = p.acks.Flush()
		}
		if err != nil {
			p.ackErr, p.ackEarly = err, !p.closing.Load()
			return
		}
	}
}

func (p *publisher) handle(pk packet) error {
	switch pk.typ {
	case typePuback, typePubcomp:
		id, reason, err := parseAck(pk.body)
		if err != nil {
			return err
		}
		p.complete(id, reason)
		return nil
	case typePubrec:
		id, reason, err := parseAck(pk.body)
		if err != nil {
			return err
		}
		if reason >= 0x80 { // refused: the flow ends here
			p.complete(id, reason)
			return nil
		}
		return writeAck(p.acks, typePubrel, id)
	case typeDisconnect:
		return disconnectError(pk.body)
	case typePingresp:
		return nil
	default:
		return fmt.Errorf("unexpected packet type %d", pk.typ)
	}
}

// complete ends the flow of packet id with the final acknowledgement's
// reason code and frees its slot in the window.
func (p *publisher) complete(id uint16, reason byte) {
	if id == 0 || int(id) >= len(p.inflight) {
		p.strays++
		return
	}
	seq := p.inflight[id].Swap(0)
	if seq == 0 {
		p.strays++
		return
	}
	if reason < 0x80 {
		p.acked.add(seq - 1)
		p.published.Add(1)
	} else {
		p.codes[reason]++
	}
	p.free <- id
}

// close ends the connection and waits for the ack loop.
func (p *publisher) close() {
	if p.closing.Swap(true) {
		<-p.ackDone
		return
	}
	goodbye(p.conn)
	<-p.ackDone
}

// unacked counts the messages still in flight. After close.
func (p *publisher) unacked() int64 {
	var n int64
	for i := range p.inflight {
		if p.inflight[i].Load() != 0 {
			n++
		}
	}
	return n
}

// dropped is why the broker ended the connection before close, or nil.
func (p *publisher) dropped() error {
	if !p.ackEarly {
		if p.runErr != nil && !errors.Is(p.runErr, os.ErrDeadlineExceeded) {
			return p.runErr // a write failed, and the read side has not noticed
		}
		return nil
	}
	switch {
	case errors.Is(p.ackErr, io.EOF):
		return errors.New("broker closed the connection")
	case errors.Is(p.ackErr, os.ErrDeadlineExceeded):
		return errors.New("the broker stopped reading (write timed out)")
	}
	return p.ackErr
}
