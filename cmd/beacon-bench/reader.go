package main

import (
	"bufio"
	"io"
)

// readBuffer is a subscriber's read buffer: at 90 bytes a message, one
// read system call brings in about 2,900 of them.
const readBuffer = 256 << 10

// packet is one MQTT control packet as read.
type packet struct {
	typ, flags byte
	body       []byte // after the fixed header; valid until the next call to next
}

// reader splits a byte stream into MQTT packets without copying: a packet
// that fits the buffer is returned as a slice of it (bufio.Reader.Peek),
// and discarded when the next one is asked for.
type reader struct {
	br      *bufio.Reader
	skip    int    // bytes of the packet last returned, still in br
	scratch []byte // for packets larger than the buffer
}

func newReader(r io.Reader, size int) *reader {
	return &reader{br: bufio.NewReaderSize(r, size)}
}

// buffered is how many bytes of further packets are already read. At 0 the
// next call to next reads the socket: the moment to flush what the caller
// wrote in answer to the packets so far (one write per batch).
func (r *reader) buffered() int { return r.br.Buffered() - r.skip }

// next returns the next packet. Its body is valid until the next call.
func (r *reader) next() (packet, error) {
	if r.skip > 0 {
		_, _ = r.br.Discard(r.skip) // buffered already: cannot fail
		r.skip = 0
	}
	// Fixed header: type and flags, then the remaining length, 1 to 4 bytes.
	// Peek one byte at a time: asking for more than the packet has could
	// wait for bytes that never come (a PINGRESP is 2 bytes).
	rem, n := 0, 1
	for {
		h, err := r.br.Peek(n + 1)
		if err != nil {
			return packet{}, r.eof(err)
		}
		c := h[n]
		rem |= int(c&0x7f) << (7 * (n - 1))
		if c&0x80 == 0 {
			break
		}
		if n == 4 {
			return packet{}, errMalformed
		}
		n++
	}
	head := n + 1
	total := head + rem
	if total <= r.br.Size() {
		b, err := r.br.Peek(total)
		if err != nil {
			return packet{}, r.eof(err)
		}
		r.skip = total
		return packet{typ: b[0] >> 4, flags: b[0] & 0x0f, body: b[head:total]}, nil
	}
	// Larger than the buffer: copy it out.
	first, _ := r.br.ReadByte()
	_, _ = r.br.Discard(head - 1)
	if cap(r.scratch) < rem {
		r.scratch = make([]byte, rem)
	}
	body := r.scratch[:rem]
	if _, err := io.ReadFull(r.br, body); err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return packet{}, err
	}
	return packet{typ: first >> 4, flags: first & 0x0f, body: body}, nil
}

// eof turns an end of stream inside a packet into io.ErrUnexpectedEOF; one
// between packets stays io.EOF.
func (r *reader) eof(err error) error {
	if err == io.EOF && r.br.Buffered() > 0 {
		return io.ErrUnexpectedEOF
	}
	return err
}
