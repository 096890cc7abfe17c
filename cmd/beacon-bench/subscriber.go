package main

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"sync/atomic"
	"time"
)

// A sink is one receiving end of a run, an MQTT subscriber or an SSE stream.
type sink interface {
	tally() *tally
	// close ends the subscriber and waits for its reader; afterwards its
	// tally is the reader's no more.
	close()
	// dropped is why the broker ended the subscriber before close, or nil.
	dropped() error
}

// subscriber is an MQTT connection subscribed to one filter. One goroutine
// reads it and answers PUBACK, PUBREC and PUBCOMP through a buffered
// writer, flushed when the read buffer is empty: one write per batch of
// deliveries, not one per acknowledgement.
type subscriber struct {
	conn    net.Conn
	r       *reader
	w       *bufio.Writer
	t       *tally
	stall   time.Duration // read nothing this long after start (--sub-stall)
	start   chan struct{} // closed when publishing starts
	closing atomic.Bool
	quit    chan struct{} // closed by close
	err     error         // why the loop ended; read after done
	early   bool          // the loop ended before close: the broker dropped us
	done    chan struct{}
}

// connectSubscriber connects, subscribes and starts reading.
func connectSubscriber(cfg config, id, filter string, publishers int, start chan struct{}) (*subscriber, error) {
	conn, err := dial(cfg.subAddr(), nil)
	if err != nil {
		return nil, err
	}
	size := readBuffer
	if cfg.subscribers() > 64 { // a thousand subscribers would hold 256 MiB of buffers
		size = 32 << 10
	}
	s := &subscriber{conn: conn, r: newReader(conn, size), w: bufio.NewWriterSize(conn, 4<<10),
		t: newTally(publishers), stall: cfg.SubStall, start: start, quit: make(chan struct{}), done: make(chan struct{})}
	if _, err := handshake(conn, s.r, id, cfg.Username, cfg.Password, 60); err != nil {
		_ = conn.Close()
		return nil, err
	}
	if err := subscribe(conn, s.r, filter, cfg.QoS, s.handle); err != nil {
		_ = conn.Close()
		return nil, err
	}
	go s.loop()
	return s, nil
}

func (s *subscriber) loop() {
	defer close(s.done)
	if s.stall > 0 {
		select {
		case <-s.start:
		case <-s.quit:
		}
		select {
		case <-time.After(s.stall):
		case <-s.quit:
		}
	}
	for {
		pk, err := s.r.next()
		if err == nil {
			err = s.handle(pk)
		}
		if err == nil && s.r.buffered() == 0 {
			err = s.w.Flush()
			s.t.flush()
		}
		if err != nil {
			s.t.flush()
			s.err, s.early = err, !s.closing.Load()
			return
		}
	}
}

// handle records a delivery and queues its acknowledgement.
func (s *subscriber) handle(pk packet) error {
	switch pk.typ {
	case typePublish:
		qos, id, payload, err := parsePublish(pk.flags, pk.body)
		if err != nil {
			return err
		}
		s.t.record(payload, time.Now().UnixNano())
		switch qos {
		case 1:
			return writeAck(s.w, typePuback, id)
		case 2:
			return writeAck(s.w, typePubrec, id)
		}
		return nil
	case typePubrel:
		id, _, err := parseAck(pk.body)
		if err != nil {
			return err
		}
		return writeAck(s.w, typePubcomp, id)
	case typeDisconnect:
		return disconnectError(pk.body)
	case typePingresp:
		return nil
	default:
		return fmt.Errorf("unexpected packet type %d", pk.typ)
	}
}

func (s *subscriber) tally() *tally { return s.t }

func (s *subscriber) close() {
	if s.closing.Swap(true) {
		<-s.done
		return
	}
	close(s.quit)
	goodbye(s.conn)
	<-s.done
}

func (s *subscriber) dropped() error {
	select {
	case <-s.done:
	default:
		return nil
	}
	if !s.early {
		return nil
	}
	if errors.Is(s.err, io.EOF) {
		return errors.New("broker closed the connection")
	}
	return s.err
}

// goodbye sends DISCONNECT and closes conn.
func goodbye(conn net.Conn) {
	_ = conn.SetWriteDeadline(time.Now().Add(time.Second))
	_, _ = conn.Write([]byte{typeDisconnect << 4, 0})
	_ = conn.Close()
}
