package engine

import (
	"errors"
	"log/slog"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// idlePoller holds the connections that have been idle for
// Limits.IdleAfter: their reader goroutine has returned, and the socket
// waits in an epoll set of the poller's own (one-shot, so one readiness
// resumes a connection once). An idle connection costs its structures,
// not a goroutine and its stack. One goroutine waits on the set and
// checks the keep-alive deadlines of the idle connections once a second.
type idlePoller struct {
	epfd int
	wake [2]int // a byte on the pipe stops the loop

	mu    sync.Mutex
	conns map[int]*conn // by descriptor: idle, or resumed and not yet ended
	done  chan struct{}

	parks    atomic.Int64 // connections parked since the last releaseMemory
	released time.Time    // loop goroutine only
	seen     int64        // parks at the previous sweep (loop goroutine only)
	midStorm bool         // the last release came while connections still parked (loop goroutine only)
	failed   atomic.Bool  // the loop ended on an error: nothing parks any more
	log      *slog.Logger
}

func newIdlePoller(log *slog.Logger) (*idlePoller, error) {
	epfd, err := syscall.EpollCreate1(syscall.EPOLL_CLOEXEC)
	if err != nil {
		return nil, err
	}
	p := &idlePoller{epfd: epfd, conns: map[int]*conn{}, done: make(chan struct{}), log: log}
	if err := syscall.Pipe2(p.wake[:], syscall.O_CLOEXEC|syscall.O_NONBLOCK); err != nil {
		syscall.Close(epfd)
		return nil, err
	}
	ev := syscall.EpollEvent{Events: syscall.EPOLLIN, Fd: int32(p.wake[0])}
	if err := syscall.EpollCtl(epfd, syscall.EPOLL_CTL_ADD, p.wake[0], &ev); err != nil {
		p.closeFDs()
		return nil, err
	}
	go p.run()
	return p, nil
}

func (p *idlePoller) closeFDs() {
	syscall.Close(p.epfd)
	syscall.Close(p.wake[0])
	syscall.Close(p.wake[1])
}

// add watches c's socket for its next byte (or its end).
func (p *idlePoller) add(c *conn) error {
	if p.failed.Load() {
		return errPollerFailed
	}
	fd := c.in.fd
	p.mu.Lock()
	p.conns[fd] = c
	p.mu.Unlock()
	ev := syscall.EpollEvent{Events: syscall.EPOLLIN | syscall.EPOLLRDHUP | syscall.EPOLLONESHOT, Fd: int32(fd)}
	op := syscall.EPOLL_CTL_ADD
	if c.in.watched.Load() {
		op = syscall.EPOLL_CTL_MOD
	}
	// Set before the registration: once it is made, an event may resume
	// the connection on another goroutine, and c is not ours to touch.
	c.in.watched.Store(true)
	err := syscall.EpollCtl(p.epfd, op, fd, &ev)
	switch {
	case err == syscall.EEXIST:
		err = syscall.EpollCtl(p.epfd, syscall.EPOLL_CTL_MOD, fd, &ev)
	case err == syscall.ENOENT:
		err = syscall.EpollCtl(p.epfd, syscall.EPOLL_CTL_ADD, fd, &ev)
	}
	if err != nil {
		p.forget(c)
		return err
	}
	p.parks.Add(1)
	return nil
}

// forget drops an ended connection. Its descriptor leaves the epoll set
// when the socket closes.
func (p *idlePoller) forget(c *conn) {
	p.mu.Lock()
	if p.conns[c.in.fd] == c {
		delete(p.conns, c.in.fd)
	}
	p.mu.Unlock()
}

func (p *idlePoller) run() {
	defer close(p.done)
	events := make([]syscall.EpollEvent, 256)
	lastSweep := time.Now()
	for {
		n, err := syscall.EpollWait(p.epfd, events, 1000)
		if err != nil && err != syscall.EINTR {
			p.fail(err)
			return
		}
		for _, ev := range events[:max(n, 0)] {
			fd := int(ev.Fd)
			if fd == p.wake[0] {
				return
			}
			p.mu.Lock()
			c := p.conns[fd]
			p.mu.Unlock()
			if c != nil {
				c.unpark(false)
			}
		}
		if now := time.Now(); now.Sub(lastSweep) >= time.Second {
			lastSweep = now
			p.sweep(now)
			p.releaseMemory(now)
		}
	}
}

var errPollerFailed = errors.New("idle poller failed")

// fail gives every idle connection back to a reader of its own: with the
// loop gone nothing would resume them.
func (p *idlePoller) fail(err error) {
	p.failed.Store(true)
	p.log.Error("idle poller stopped: idle connections keep their reader from now on", "error", err)
	p.mu.Lock()
	conns := make([]*conn, 0, len(p.conns))
	for _, c := range p.conns {
		conns = append(conns, c)
	}
	p.mu.Unlock()
	for _, c := range conns {
		c.unpark(false)
	}
}

// sweep resumes the idle connections whose keep-alive has run out; their
// reader closes them (0x8D for v5 clients).
func (p *idlePoller) sweep(now time.Time) {
	var expired []*conn
	p.mu.Lock()
	for _, c := range p.conns {
		if d := c.kaDeadline.Load(); d != 0 && d <= now.UnixNano() && c.parked.Load() {
			expired = append(expired, c)
		}
	}
	p.mu.Unlock()
	for _, c := range expired {
		c.unpark(true)
	}
}

// releaseMemory gives the stacks of readers that returned back to the
// system after many connections went idle (a connect storm): the runtime
// keeps freed stacks as idle heap and returns them only slowly, so
// without this an idle connection would cost its reader's stack in RSS
// long after the reader has gone. At most once per releaseEvery, in the
// background (it runs a garbage collection).
//
// It waits for the storm to end (a second without new parks), so the
// garbage of its last connections goes too, or for releaseEvery during a
// storm that goes on.
func (p *idlePoller) releaseMemory(now time.Time) {
	n := p.parks.Load()
	quiet := n == p.seen // no connection parked since the last sweep
	p.seen = n
	switch {
	case now.Sub(p.released) < time.Second:
		return
	case quiet && (n >= releaseAfterParks || (p.midStorm && n > 0)):
		// A storm ended (or the end of one released before).
		p.midStorm = false
	case !quiet && n >= releaseAfterParks && now.Sub(p.released) >= releaseEvery:
		p.midStorm = true
	default:
		return
	}
	p.parks.Store(0)
	p.seen = 0
	p.released = now
	go debug.FreeOSMemory()
}

const (
	releaseAfterParks = 1000
	releaseEvery      = 10 * time.Second
)

// stop ends the loop and closes the set. The connections must have been
// resumed (Shutdown closes them all first).
func (p *idlePoller) stop() {
	_, _ = syscall.Write(p.wake[1], []byte{1})
	<-p.done
	p.closeFDs()
}
