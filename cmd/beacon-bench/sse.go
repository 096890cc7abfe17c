package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"sync/atomic"
	"time"
)

// stream is an SSE stream on Beacon's /events: the receiving end of the
// sse scenario. One goroutine reads it and records the stamp of every
// message event, decoded straight from the envelope's base64 payload.
type stream struct {
	resp    *http.Response
	cancel  context.CancelFunc
	t       *tally
	closing atomic.Bool
	err     error // why the loop ended; read after done
	early   bool  // it ended before close: the broker ended the stream
	done    chan struct{}
	stamp   [stampSize + 1]byte // decoded payload head
}

// sseClient opens each stream on a connection of its own.
func sseClient() *http.Client {
	return &http.Client{Transport: &http.Transport{DisableCompression: true, MaxIdleConnsPerHost: -1,
		ResponseHeaderTimeout: handshakeTimeout}}
}

// openStream opens a stream for filter and waits for its ready event.
func openStream(ctx context.Context, client *http.Client, cfg config, filter string, publishers int) (*stream, error) {
	q := url.Values{"topic": {filter}}
	if cfg.Token != "" {
		q.Set("access_token", cfg.Token)
	}
	sctx, cancel := context.WithCancel(ctx)
	req, err := http.NewRequestWithContext(sctx, http.MethodGet, "http://"+cfg.HTTP+"/events?"+q.Encode(), nil)
	if err != nil {
		cancel()
		return nil, err
	}
	var resp *http.Response
	giveUp := time.Now().Add(handshakeTimeout)
	for wait := 50 * time.Millisecond; ; wait = min(2*wait, time.Second) {
		resp, err = client.Do(req)
		if err != nil {
			cancel()
			return nil, fmt.Errorf("sse: %w", err)
		}
		if resp.StatusCode != http.StatusTooManyRequests || time.Now().After(giveUp) {
			break
		}
		// Over the handshake rate (http.handshakes_per_second): pace. A
		// stream limit answers 429 too, and does not pass: give up then.
		resp.Body.Close()
		time.Sleep(wait)
	}
	if resp.StatusCode != http.StatusOK {
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		resp.Body.Close()
		cancel()
		return nil, fmt.Errorf("sse: %s: %s", resp.Status, strings.TrimSpace(string(body)))
	}
	s := &stream{resp: resp, cancel: cancel, t: newTally(publishers), done: make(chan struct{})}
	ready := make(chan error, 1)
	go s.loop(ready)
	select {
	case err := <-ready:
		if err != nil {
			s.close()
			return nil, err
		}
		return s, nil
	case <-time.After(handshakeTimeout):
		s.close()
		return nil, errors.New("sse: no ready event within 10s")
	}
}

var (
	eventPrefix = []byte("event: ")
	dataPrefix  = []byte("data: ")
	readyEvent  = []byte("ready")
	msgEvent    = []byte("message")
	payloadKey  = []byte(`"payload":"`)
	base64Enc   = []byte(`"encoding":"base64"`)
)

func (s *stream) loop(ready chan<- error) {
	defer close(s.done)
	br := bufio.NewReaderSize(s.resp.Body, 16<<10)
	var long []byte // a line longer than the buffer
	message, signalled := true, false
	for {
		line, err := br.ReadSlice('\n')
		if errors.Is(err, bufio.ErrBufferFull) {
			long = append(long, line...)
			continue
		}
		if len(long) > 0 {
			line = append(long, line...)
			long = long[:0]
		}
		if err != nil {
			if !signalled {
				ready <- fmt.Errorf("sse: the stream ended before its ready event: %w", err)
			}
			s.t.flush()
			s.err, s.early = err, !s.closing.Load()
			return
		}
		line = bytes.TrimRight(line, "\r\n")
		switch {
		case len(line) == 0: // the end of an event
			message = true
		case bytes.HasPrefix(line, eventPrefix):
			name := line[len(eventPrefix):]
			message = bytes.Equal(name, msgEvent)
			if bytes.Equal(name, readyEvent) && !signalled {
				signalled = true
				ready <- nil
			}
		case message && bytes.HasPrefix(line, dataPrefix):
			if p := s.payload(line[len(dataPrefix):]); p != nil {
				s.t.record(p, time.Now().UnixNano())
			} else {
				s.t.foreign++
			}
		}
		if br.Buffered() == 0 {
			s.t.flush()
		}
	}
}

// payload returns the head of an envelope's payload, or nil. A bench
// payload is binary, so the envelope carries it as base64: decoding its
// first 28 characters gives the 20-byte stamp without parsing the JSON.
func (s *stream) payload(data []byte) []byte {
	i := bytes.Index(data, payloadKey)
	if i < 0 || !bytes.Contains(data, base64Enc) {
		return s.slowPayload(data)
	}
	b64 := data[i+len(payloadKey):]
	const n = (stampSize + 2) / 3 * 4 // 28
	if len(b64) < n {
		return nil
	}
	m, err := base64.StdEncoding.Decode(s.stamp[:], b64[:n])
	if err != nil || m < stampSize {
		return nil
	}
	return s.stamp[:m]
}

// slowPayload decodes the envelope in full, for a payload that does not
// travel as base64.
func (s *stream) slowPayload(data []byte) []byte {
	var e struct {
		Payload  json.RawMessage `json:"payload"`
		Encoding string          `json:"encoding"`
	}
	if json.Unmarshal(data, &e) != nil {
		return nil
	}
	var text string
	if json.Unmarshal(e.Payload, &text) != nil {
		return nil
	}
	if e.Encoding == "base64" {
		b, err := base64.StdEncoding.DecodeString(text)
		if err != nil {
			return nil
		}
		return b
	}
	return []byte(text)
}

func (s *stream) tally() *tally { return s.t }

func (s *stream) close() {
	if s.closing.Swap(true) {
		<-s.done
		return
	}
	s.cancel()
	<-s.done
	_ = s.resp.Body.Close()
}

func (s *stream) dropped() error {
	select {
	case <-s.done:
	default:
		return nil
	}
	if !s.early {
		return nil
	}
	if errors.Is(s.err, io.EOF) {
		return errors.New("broker ended the stream")
	}
	return s.err
}
