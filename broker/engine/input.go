package engine

import (
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// inputSize is the read buffer of a connection with bytes to read.
const inputSize = 8 << 10

var inputPool = sync.Pool{New: func() any { b := make([]byte, inputSize); return &b }}

// input is the read side of a connection. It holds a read buffer only
// while bytes are buffered: a connection waiting for its next packet holds
// none.
//
// A plain TCP socket is read through its RawConn: the read callback takes
// a buffer from the pool, reads once, and gives the buffer back if the
// socket had nothing (EAGAIN) before the runtime parks the goroutine. One
// system call per batch of packets, and none wasted on a one-byte probe.
// Other connections (TLS, WebSocket) wait for the first byte of a packet
// in a one-byte array, then take a buffer.
type input struct {
	nc    net.Conn
	rc    syscall.RawConn // nil unless nc is a plain TCP socket
	fd    int             // rc's descriptor, for the idle poller
	buf   *[]byte         // nil while nothing is buffered
	r, w  int             // unread bytes are (*buf)[r:w]
	first [1]byte

	// arm, when set, runs before every wait for bytes (it sets the read
	// deadline); atStart tells it the wait is for a packet's first byte,
	// and it sets parkArmed when that deadline is the moment to hand the
	// connection to the idle poller rather than the keep-alive.
	arm       func(atStart bool) error
	atStart   bool
	parkArmed bool
	watched   atomic.Bool // fd is in the idle poller's epoll set (set by a reader, read by the next)

	// Results of the RawConn callbacks (method values made once, so a
	// read allocates nothing).
	fillFn, directFn func(uintptr) bool
	dst              []byte
	n                int
	err              error
}

func (in *input) init(nc net.Conn) {
	in.nc = nc
	in.fd = -1
	tc, ok := nc.(*net.TCPConn)
	if !ok {
		return
	}
	rc, err := tc.SyscallConn()
	if err != nil {
		return
	}
	if rc.Control(func(fd uintptr) { in.fd = int(fd) }) != nil {
		return
	}
	in.rc = rc
	in.fillFn = in.tryFill
	in.directFn = in.tryDirect
}

// buffered reports the bytes read and not yet consumed.
func (in *input) buffered() int { return in.w - in.r }

// release gives the buffer back; nothing may be buffered.
func (in *input) release() {
	if in.buf != nil {
		inputPool.Put(in.buf)
		in.buf = nil
	}
	in.r, in.w = 0, 0
}

// ReadByte reads one byte (io.ByteReader, for packets.DecodeLength).
func (in *input) ReadByte() (byte, error) {
	if in.r == in.w {
		if err := in.fill(); err != nil {
			return 0, err
		}
	}
	b := (*in.buf)[in.r]
	in.r++
	return b, nil
}

// readFull fills dst, from the buffer first; a large remainder is read
// into dst directly.
func (in *input) readFull(dst []byte) error {
	n := 0
	if in.buf != nil {
		n = copy(dst, (*in.buf)[in.r:in.w])
		in.r += n
	}
	for n < len(dst) {
		if len(dst)-n >= inputSize/2 {
			m, err := in.direct(dst[n:])
			n += m
			if err != nil {
				return unexpected(err)
			}
			continue
		}
		if err := in.fill(); err != nil {
			return unexpected(err)
		}
		m := copy(dst[n:], (*in.buf)[in.r:in.w])
		in.r += m
		n += m
	}
	return nil
}

// unexpected turns an EOF inside a packet into io.ErrUnexpectedEOF.
func unexpected(err error) error {
	if err == io.EOF {
		return io.ErrUnexpectedEOF
	}
	return err
}

// fill reads at least one byte into the (empty) buffer, waiting for it.
func (in *input) fill() error {
	in.r, in.w = 0, 0
	if in.arm != nil {
		if err := in.arm(in.atStart); err != nil {
			in.release()
			return err
		}
	}
	if in.rc == nil {
		if in.buf == nil {
			// Wait for the next byte without a buffer.
			for {
				n, err := in.nc.Read(in.first[:])
				if n == 1 {
					break
				}
				if err != nil {
					return err
				}
			}
			in.buf = inputPool.Get().(*[]byte)
			(*in.buf)[0] = in.first[0]
			in.w = 1
			return nil
		}
		n, err := in.nc.Read(*in.buf)
		in.w = n
		if n > 0 {
			return nil
		}
		if err == nil {
			err = io.ErrNoProgress
		}
		return err
	}
	in.n, in.err = 0, nil
	if err := in.rc.Read(in.fillFn); err != nil {
		in.release()
		if in.parkArmed && errors.Is(err, os.ErrDeadlineExceeded) {
			return errIdle
		}
		return err
	}
	if in.err != nil || in.n == 0 {
		in.release()
		return readErr(in.err)
	}
	in.w = in.n
	return nil
}

// tryFill is fill's RawConn callback: false means "wait until readable".
func (in *input) tryFill(fd uintptr) bool {
	if in.buf == nil {
		in.buf = inputPool.Get().(*[]byte)
	}
	for {
		n, err := syscall.Read(int(fd), *in.buf)
		switch err {
		case syscall.EINTR:
			continue
		case syscall.EAGAIN:
			// Nothing to read: wait without a buffer.
			inputPool.Put(in.buf)
			in.buf = nil
			return false
		}
		in.n, in.err = max(n, 0), err
		return true
	}
}

// direct reads into dst without the buffer (the buffer is empty).
func (in *input) direct(dst []byte) (int, error) {
	if in.arm != nil {
		if err := in.arm(false); err != nil {
			return 0, err
		}
	}
	if in.rc == nil {
		return in.nc.Read(dst)
	}
	in.dst, in.n, in.err = dst, 0, nil
	err := in.rc.Read(in.directFn)
	in.dst = nil
	if err != nil {
		return 0, err
	}
	if in.err != nil || in.n == 0 {
		return 0, readErr(in.err)
	}
	return in.n, nil
}

func (in *input) tryDirect(fd uintptr) bool {
	for {
		n, err := syscall.Read(int(fd), in.dst)
		switch err {
		case syscall.EINTR:
			continue
		case syscall.EAGAIN:
			return false
		}
		in.n, in.err = max(n, 0), err
		return true
	}
}

// readErr maps a read system call's outcome: 0 bytes without an error is
// the peer's end of stream.
func readErr(err error) error {
	if err == nil {
		return io.EOF
	}
	return os.NewSyscallError("read", err)
}

// setDeadline sets the read deadline (zero: none).
func (in *input) setDeadline(t time.Time) { _ = in.nc.SetReadDeadline(t) }

// errIdle reports that a connection waited Limits.IdleAfter for its next
// packet.
var errIdle = errors.New("connection idle")

// errParked reports that the reader handed an idle connection to the
// poller and returned.
var errParked = errors.New("connection parked")
