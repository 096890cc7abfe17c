package engine

import (
	"runtime"
	"strconv"
	"time"
)

// The $SYS topics, refreshed every Options.SysInterval as retained QoS 0
// messages that are never stored (they describe this process).
func (s *Server) sysLoop(every time.Duration, done <-chan struct{}) {
	defer s.wg.Done()
	t := time.NewTicker(every)
	defer t.Stop()
	s.publishSys()
	for {
		select {
		case <-done:
			return
		case <-t.C:
			s.publishSys()
		}
	}
}

func (s *Server) publishSys() {
	st := s.Stats()
	now := s.now()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	dropped := int64(0)
	for _, n := range st.Dropped {
		dropped += n
	}
	values := []struct{ topic, value string }{
		{"version", s.opts.Version},
		{"time", strconv.FormatInt(now.Unix(), 10)},
		{"uptime", strconv.FormatInt(int64(now.Sub(s.started)/time.Second), 10)},
		{"started", strconv.FormatInt(s.started.Unix(), 10)},
		{"load/bytes/received", strconv.FormatInt(s.stats.bytesIn.Load(), 10)},
		{"load/bytes/sent", strconv.FormatInt(s.stats.bytesOut.Load(), 10)},
		{"clients/connected", strconv.FormatInt(st.Connections, 10)},
		{"clients/total", strconv.Itoa(st.Sessions)},
		{"clients/maximum", strconv.FormatInt(s.stats.maxConns.Load(), 10)},
		{"messages/received", strconv.FormatInt(st.Received, 10)},
		{"messages/sent", strconv.FormatInt(st.Sent, 10)},
		{"messages/dropped", strconv.FormatInt(dropped, 10)},
		{"messages/inflight", strconv.Itoa(st.Inflight)},
		{"retained", strconv.Itoa(st.Retained)},
		{"subscriptions", strconv.Itoa(st.Subscriptions)},
		{"system/memory", strconv.FormatUint(ms.Alloc, 10)},
		{"system/goroutines", strconv.Itoa(runtime.NumGoroutine())},
	}
	for _, v := range values {
		m := &Message{Topic: "$SYS/broker/" + v.topic, Payload: []byte(v.value), Retain: true, Created: now.UnixNano(), volatile: true}
		_, _ = s.accept(m, nil)
	}
}
