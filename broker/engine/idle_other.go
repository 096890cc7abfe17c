//go:build !linux

package engine

import (
	"errors"
	"log/slog"
)

// idlePoller exists on Linux only; elsewhere an idle connection keeps its
// reader goroutine waiting on the socket.
type idlePoller struct{}

func newIdlePoller(*slog.Logger) (*idlePoller, error) {
	return nil, errors.New("no idle poller on this system")
}

func (p *idlePoller) add(*conn) error { return errors.New("no idle poller on this system") }
func (p *idlePoller) forget(*conn)    {}
func (p *idlePoller) stop()           {}
