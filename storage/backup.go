package storage

import (
	"bufio"
	"compress/gzip"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
	"time"
)

// backupMagic opens a backup file; the JSON header follows on the next
// line, then badger's backup stream, gzipped.
const backupMagic = "BEACON-BACKUP 1\n"

// BackupHeader describes a backup.
type BackupHeader struct {
	Format  int       `json:"format"`
	Created time.Time `json:"created"`
	Version string    `json:"version,omitempty"` // Beacon's, of the broker that made it
}

// Backup writes a consistent copy of everything committed (sessions,
// subscriptions, queues, retained messages, the message log and history,
// devices, webhook outboxes) to w, from one read snapshot, while the
// broker runs. It returns the bytes of records written (before
// compression).
func (d *DB) Backup(w io.Writer, version string) (int64, error) {
	h, _ := json.Marshal(BackupHeader{Format: 1, Created: time.Now().UTC(), Version: version})
	if _, err := io.WriteString(w, backupMagic+string(h)+"\n"); err != nil {
		return 0, err
	}
	zw := gzip.NewWriter(w)
	cw := &countWriter{w: zw}
	d.dbMu.RLock()
	_, err := d.db.Backup(cw, 0)
	d.dbMu.RUnlock()
	if err != nil {
		return cw.n, fmt.Errorf("backup: %w", err)
	}
	if err := zw.Close(); err != nil {
		return cw.n, fmt.Errorf("backup: %w", err)
	}
	return cw.n, nil
}

type countWriter struct {
	w io.Writer
	n int64
}

func (c *countWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	return n, err
}

// ReadBackupHeader reads a backup's header from r, leaving r at the
// records.
func ReadBackupHeader(r *bufio.Reader) (BackupHeader, error) {
	var h BackupHeader
	magic, err := r.ReadString('\n')
	if err != nil || magic != backupMagic {
		return h, errors.New("not a Beacon backup (no BEACON-BACKUP header)")
	}
	line, err := r.ReadString('\n')
	if err != nil {
		return h, fmt.Errorf("backup header: %w", err)
	}
	if err := json.Unmarshal([]byte(strings.TrimSpace(line)), &h); err != nil || h.Format != 1 {
		return h, fmt.Errorf("backup header %q: unsupported", strings.TrimSpace(line))
	}
	return h, nil
}

// Restore loads a backup into dir, which must not hold a store: the
// store is opened, the records loaded, and shut down. A truncated or
// damaged backup fails (gzip's checksum); the directory then holds a
// partial store: remove it before trying again.
func Restore(dir string, r io.Reader) (BackupHeader, error) {
	br := bufio.NewReader(r)
	h, err := ReadBackupHeader(br)
	if err != nil {
		return h, err
	}
	f, err := listStore(dir)
	if err != nil {
		return h, err
	}
	if f.manifest || f.marker || len(f.data) > 0 {
		return h, fmt.Errorf("%s already holds a store: restore into a new or empty directory (move this one away first)", dir)
	}
	zr, err := gzip.NewReader(br)
	if err != nil {
		return h, fmt.Errorf("backup records: %w", err)
	}
	d, err := Open(Options{Dir: dir, Sync: SyncAlways})
	if err != nil {
		return h, err
	}
	d.dbMu.RLock()
	err = d.db.Load(zr, 256)
	d.dbMu.RUnlock()
	if err == nil {
		// Load stops at the end of badger's stream; gzip's checksum and
		// length are checked only when the rest is read.
		_, err = io.Copy(io.Discard, zr)
	}
	if serr := d.Shutdown(context.Background()); err == nil {
		err = serr
	}
	if err != nil {
		return h, fmt.Errorf("restore: %w (the backup is truncated or damaged; %s is incomplete: remove it)", err, dir)
	}
	return h, nil
}
