//go:build linux

package main

import (
	"runtime"
	"syscall"
)

// On Linux the kernel kills HAProxy when this process dies, even of a panic
// on a goroutine, which skips main's cleanup. The signal follows the thread
// that started the child, so main keeps its thread.
func init() {
	runtime.LockOSThread()
	proxyAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
}
