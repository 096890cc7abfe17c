package main

import (
	"io"
	"os"

	"golang.org/x/sys/unix"
)

// noEcho turns the terminal's echo off while a secret is typed on it, and
// returns the function that turns it back on. r that is not a terminal is
// left alone.
func noEcho(r io.Reader, prompt io.Writer) func() {
	f, ok := r.(*os.File)
	if !ok {
		return func() {}
	}
	fd := int(f.Fd())
	old, err := unix.IoctlGetTermios(fd, unix.TCGETS)
	if err != nil {
		return func() {} // not a terminal: a pipe or a file
	}
	quiet := *old
	quiet.Lflag &^= unix.ECHO
	if unix.IoctlSetTermios(fd, unix.TCSETS, &quiet) != nil {
		return func() {}
	}
	_, _ = io.WriteString(prompt, "secret (not shown): ")
	return func() {
		_ = unix.IoctlSetTermios(fd, unix.TCSETS, old)
		_, _ = io.WriteString(prompt, "\n")
	}
}
