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

// allocate makes fd at least off+n bytes long with the blocks of
// [off, off+n) allocated (Beacon's change: see BEACON.md). A filesystem
// that cannot allocate ahead gets the file's size set instead, as before.
func allocate(fd *os.File, off, n int64) error {
	for {
		err := syscall.Fallocate(int(fd.Fd()), 0, off, n)
		switch {
		case err == nil:
			return nil
		case errors.Is(err, syscall.EINTR):
			continue
		case errors.Is(err, syscall.EOPNOTSUPP), errors.Is(err, syscall.ENOSYS):
			return fd.Truncate(off + n)
		}
		return &os.PathError{Op: "fallocate", Path: fd.Name(), Err: err}
	}
}
