package clustertest

import (
	"os/exec"
	"syscall"
)

// dieWithParent makes the server die with the test process, also when
// the test binary is killed (a timeout) before its cleanups run.
func dieWithParent(cmd *exec.Cmd) {
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
}
