//go:build !linux

package main

import "io"

// noEcho is a no-op where Beacon does not control the terminal: pipe the
// secret in (echo "$SECRET" | beacon devices add NAME --secret-stdin).
func noEcho(io.Reader, io.Writer) func() { return func() {} }
