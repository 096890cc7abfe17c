package storage

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"
)

// ErrNoSpace is wrapped by the error [DB.Room] returns when the volume's
// free space is below the reserve: new data is refused before anything
// is acknowledged, while deletes (acks, expiry) keep working.
var ErrNoSpace = errors.New("storage: free disk space below the reserve")

// SpaceError is ErrNoSpace with the numbers behind it.
type SpaceError struct {
	Free, Reserve uint64
}

func (e *SpaceError) Error() string {
	return fmt.Sprintf("disk space low: %s free, reserve %s", FormatBytes(e.Free), FormatBytes(e.Reserve))
}

func (e *SpaceError) Unwrap() error { return ErrNoSpace }

// Reserve is how much of its volume the store keeps free: Bytes, or
// Percent of the volume's size, whichever is smaller (a zero part does
// not count; both zero is the default, 5% or 512 MiB).
type Reserve struct {
	Bytes   uint64
	Percent float64
}

// DefaultReserve is 5% of the volume or 512 MiB, whichever is smaller.
var DefaultReserve = Reserve{Bytes: 512 << 20, Percent: 5}

// ParseReserve reads "512MiB", "2GB", "1048576", "5%", or both joined by
// a comma ("5%,512MiB": whichever is smaller). "" is the default.
func ParseReserve(s string) (Reserve, error) {
	s = strings.TrimSpace(s)
	if s == "" {
		return DefaultReserve, nil
	}
	var r Reserve
	for _, part := range strings.Split(s, ",") {
		part = strings.TrimSpace(part)
		if p, ok := strings.CutSuffix(part, "%"); ok {
			f, err := strconv.ParseFloat(strings.TrimSpace(p), 64)
			if err != nil || f <= 0 || f >= 100 || r.Percent != 0 {
				return Reserve{}, fmt.Errorf("%q: a percentage must be above 0 and below 100, given once", part)
			}
			r.Percent = f
			continue
		}
		n, err := ParseBytes(part)
		if err != nil || r.Bytes != 0 {
			return Reserve{}, fmt.Errorf("%q: use a size (e.g. 512MiB, 2GB), a percentage of the volume (5%%), or both (5%%,512MiB)", part)
		}
		r.Bytes = n
	}
	return r, nil
}

// of is the reserve on a volume of total bytes.
func (r Reserve) of(total uint64) uint64 {
	if r == (Reserve{}) {
		r = DefaultReserve
	}
	var out uint64
	if r.Percent > 0 {
		out = uint64(float64(total) * r.Percent / 100)
	}
	if r.Bytes > 0 && (out == 0 || r.Bytes < out) {
		out = r.Bytes
	}
	return out
}

// ParseBytes reads a size: a number with an optional unit (B, KB, MB, GB,
// TB powers of 1000; KiB, MiB, GiB, TiB powers of 1024).
func ParseBytes(s string) (uint64, error) {
	s = strings.TrimSpace(s)
	i := strings.IndexFunc(s, func(r rune) bool { return (r < '0' || r > '9') && r != '.' })
	num, unit := s, ""
	if i >= 0 {
		num, unit = s[:i], strings.TrimSpace(s[i:])
	}
	f, err := strconv.ParseFloat(num, 64)
	if err != nil || f < 0 {
		return 0, fmt.Errorf("invalid size %q", s)
	}
	mult := map[string]float64{"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12,
		"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}[strings.ToLower(unit)]
	if mult == 0 {
		return 0, fmt.Errorf("invalid size %q: unknown unit %q", s, unit)
	}
	return uint64(f * mult), nil
}

// FormatBytes writes n in binary units, e.g. "12.5 MiB".
func FormatBytes(n uint64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := uint64(unit), 0
	for m := n / unit; m >= unit && exp < 4; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTP"[exp])
}

// Space is the store's view of its volume.
type Space struct {
	Total, Free uint64 // bytes of the volume, bytes available to the process
	Reserve     uint64 // what the store keeps free
	Low         bool   // Free is below Reserve: new data is refused
	Refused     int64  // writes refused for space since start
}

// space watches the volume's free space. Between two statfs calls it
// counts what the store wrote, so a burst cannot run through the reserve
// unseen (spaceAmplification).
type space struct {
	dir     string
	total   uint64
	reserve uint64
	free    atomic.Uint64 // at the last statfs
	written atomic.Int64  // bytes committed since the last statfs
	low     atomic.Bool
	refused atomic.Int64
	kick    chan struct{} // asks the watcher for a statfs now
}

// spaceAmplification is how many bytes of disk a byte written may take
// before compaction gives space back: the memtable's log, its level-0
// table, and the copy a compaction writes before it deletes the inputs.
const spaceAmplification = 3

// memtablesReserved is the least reserve, in memtables: room for badger
// to allocate the next memtable logs and flush and compact what it holds
// while new data is refused.
const memtablesReserved = 12

func statfs(dir string) (total, free uint64, err error) {
	var st syscall.Statfs_t
	if err := syscall.Statfs(dir, &st); err != nil {
		return 0, 0, fmt.Errorf("statfs %q: %w", dir, err)
	}
	return st.Blocks * uint64(st.Bsize), st.Bavail * uint64(st.Bsize), nil
}

func newSpace(dir string, r Reserve, floor uint64) (*space, error) {
	total, free, err := statfs(dir)
	if err != nil {
		return nil, err
	}
	s := &space{dir: dir, total: total, reserve: max(r.of(total), floor), kick: make(chan struct{}, 1)}
	s.free.Store(free)
	s.low.Store(free < s.reserve)
	return s, nil
}

// room reports whether n more bytes fit above the reserve, by the last
// statfs less what was written since.
func (s *space) room(n int) error {
	if !s.low.Load() {
		if s.estimate(n) >= s.reserve {
			return nil
		}
		// The estimate crossed the line: look at the volume now rather
		// than refuse on a guess, and let the watcher log any change.
		err := s.update()
		select {
		case s.kick <- struct{}{}:
		default:
		}
		if err == nil && !s.low.Load() && s.estimate(n) >= s.reserve {
			return nil
		}
	}
	s.refused.Add(1)
	return &SpaceError{Free: s.free.Load(), Reserve: s.reserve}
}

// estimate is the free space after n more bytes: the last statfs less
// what was written since, amplified.
func (s *space) estimate(n int) uint64 {
	used := uint64(max(s.written.Load()+int64(n), 0)) * spaceAmplification
	if free := s.free.Load(); free > used {
		return free - used
	}
	return 0
}

// update takes a statfs.
func (s *space) update() error {
	_, free, err := statfs(s.dir)
	if err != nil {
		return err
	}
	s.written.Store(0)
	s.free.Store(free)
	// Resume only with a margin above the reserve, so a volume hovering
	// at the line (compaction giving back a little, writes taking it)
	// does not flap between refusing and accepting.
	line := s.reserve
	if s.low.Load() {
		line += s.reserve / 10
	}
	s.low.Store(free < line)
	return nil
}

// watch takes a statfs every interval (4 times as often while low, so
// publishing resumes soon after space returns) and on a kick, and logs
// each change, and once a minute while low.
func (d *DB) watchSpace(interval time.Duration) {
	defer d.wg.Done()
	s := d.space
	t := time.NewTimer(interval)
	defer t.Stop()
	var lastWarn time.Time
	var lastRefused int64
	var lastReopen time.Time
	wasLow := false
	if s.low.Load() {
		s.kick <- struct{}{} // log at once that it starts low
	}
	for {
		select {
		case <-d.done:
			return
		case <-t.C:
		case <-s.kick:
		}
		if err := s.update(); err != nil {
			d.log.Error("watching free disk space", "error", err)
		}
		if d.readOnly.Load() {
			if !s.low.Load() && time.Since(lastReopen) >= 5*time.Second {
				lastReopen = time.Now()
				d.reopen()
			}
			if d.readOnly.Load() {
				s.low.Store(true) // read-only refuses every write whatever the volume says
			}
		}
		sp := d.Space()
		changed := sp.Low != wasLow
		wasLow = sp.Low
		switch {
		case changed && sp.Low:
			d.log.Warn("disk space below the reserve: refusing new messages and sessions until space returns "+
				"(storage.min_free)", "dir", d.opts.Dir, "free", FormatBytes(sp.Free), "reserve", FormatBytes(sp.Reserve))
			lastWarn, lastRefused = time.Now(), sp.Refused
		case changed:
			d.log.Info("disk space above the reserve again: accepting messages", "free", FormatBytes(sp.Free),
				"reserve", FormatBytes(sp.Reserve), "refused_while_low", sp.Refused-lastRefused)
		case sp.Low && time.Since(lastWarn) >= time.Minute:
			d.log.Warn("disk space still below the reserve", "free", FormatBytes(sp.Free), "reserve", FormatBytes(sp.Reserve),
				"refused_last_minute", sp.Refused-lastRefused)
			lastWarn, lastRefused = time.Now(), sp.Refused
		}
		next := interval
		if sp.Low {
			next = max(interval/4, 10*time.Millisecond)
		}
		t.Reset(next)
	}
}

// Room reports whether n more bytes of new data may be written: nil, or
// a *SpaceError (wrapping ErrNoSpace) while the volume's free space is
// below the reserve. Writers of new data (messages, sessions) ask before
// writing; deletes and acknowledgements never need to.
func (d *DB) Room(n int) error {
	if d.readOnly.Load() {
		d.space.refused.Add(1)
		return &SpaceError{Free: d.space.free.Load(), Reserve: d.space.reserve}
	}
	return d.space.room(n)
}

// Space returns the volume's size, free space and reserve as last seen.
func (d *DB) Space() Space {
	s := d.space
	return Space{Total: s.total, Free: s.free.Load(), Reserve: s.reserve, Low: s.low.Load(), Refused: s.refused.Load()}
}
