//go:build !linux

/*
 * SPDX-FileCopyrightText: © Hypermode Inc. <hello@hypermode.com>
 * SPDX-License-Identifier: Apache-2.0
 */

package z

import "os"

// allocate sets fd's size to off+n (Beacon's change allocates the blocks
// ahead on Linux only).
func allocate(fd *os.File, off, n int64) error { return fd.Truncate(off + n) }
