/*
 * SPDX-FileCopyrightText: © Hypermode Inc. <hello@hypermode.com>
 * SPDX-License-Identifier: Apache-2.0
 */

package z

import (
	"errors"
	"os"
	"syscall"
)

// NoSpace, when set, is called when an allocation for path fails for
// want of space; when it frees some (it returns true) the allocation is
// tried once more. Beacon's store keeps an emergency file it gives up
// here, so that badger can always create its next memtable: a memtable
// badger fails to create leaves it without one, and its next write is a
// fatal assertion.
var NoSpace func(path string) bool

// allocate makes fd at least off+n bytes long with the blocks of
// [off, off+n) allocated (Beacon's change: see BEACON.md). A filesystem
// that cannot allocate ahead gets the file's size set instead, as before.
func allocate(fd *os.File, off, n int64) error {
	retried := false
	for {
		err := syscall.Fallocate(int(fd.Fd()), 0, off, n)
		switch {
		case err == nil:
			return nil
		case errors.Is(err, syscall.EINTR):
			continue
		case errors.Is(err, syscall.EOPNOTSUPP), errors.Is(err, syscall.ENOSYS):
			return fd.Truncate(off + n)
		case errors.Is(err, syscall.ENOSPC) && !retried && NoSpace != nil && NoSpace(fd.Name()):
			retried = true
			continue
		}
		return &os.PathError{Op: "fallocate", Path: fd.Name(), Err: err}
	}
}
