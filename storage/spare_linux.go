package storage

import (
	"os"
	"syscall"
)

func fallocate(f *os.File, n int64) error { return syscall.Fallocate(int(f.Fd()), 0, 0, n) }
