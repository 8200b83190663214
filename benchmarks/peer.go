package main

import (
	"bufio"
	"flag"
	"fmt"
	"io"
	"log"
	"os"
	"os/exec"
	"strings"
	"sync"
	"time"
)

// A peer is this program run again as a child process that holds one end of
// the connections, so that the measured side's counters see only that side,
// and each process stays under the file descriptor limit with 10,000
// connections. The two talk in lines on the child's stdin and stdout, and
// closing the child's stdin ends it:
//
//   - roles "send" and "recv": the parent says "dial", the child dials one
//     connection and says "ready"; the parent says "go", the child sends or
//     receives a one-way run and says "done".
//   - role "hold": the child listens and says "listening ADDR", accepts the
//     connections the parent dials and reports on them ("idle ..."); once
//     the parent says "quiet", it reports on them again ("after ...", see
//     hold).
type peer struct {
	cmd *exec.Cmd
	in  io.WriteCloser
	out *bufio.Scanner
}

// startPeer starts the child for kind kindName in role, dialing addr; extra
// holds more flags.
func startPeer(kindName, role, addr string, extra ...string) *peer {
	self, err := os.Executable()
	must(err)
	args := append([]string{"-peer", kindName, "-role", role, "-addr", addr}, extra...)
	cmd := exec.Command(self, args...)
	cmd.Stderr = os.Stderr
	in, err := cmd.StdinPipe()
	must(err)
	out, err := cmd.StdoutPipe()
	must(err)
	must(cmd.Start())
	return &peer{cmd: cmd, in: in, out: bufio.NewScanner(out)}
}

// tell sends the child one line.
func (p *peer) tell(line string) {
	_, err := fmt.Fprintln(p.in, line)
	must(err)
}

// expect reads the child's next line, which must start with word, and
// returns its fields.
func (p *peer) expect(word string) []string {
	if !p.out.Scan() {
		log.Fatalf("benchmarks: peer ended before saying %q", word)
	}
	f := strings.Fields(p.out.Text())
	if len(f) == 0 || f[0] != word {
		log.Fatalf("benchmarks: peer said %q, want %q", p.out.Text(), word)
	}
	return f
}

// finish ends the child and waits for it.
func (p *peer) finish() {
	p.in.Close()
	p.cmd.Wait()
}

// peerFlags are the child's instructions.
type peerFlags struct {
	kind, role, addr string
	size, count      int
	dur              time.Duration
	conns            int
}

func (f *peerFlags) register() {
	flag.StringVar(&f.kind, "peer", "", "run as the child peer for this kind (internal)")
	flag.StringVar(&f.role, "role", "", "peer role: send, recv or hold (internal)")
	flag.StringVar(&f.addr, "addr", "", "address the peer dials (internal)")
	flag.IntVar(&f.size, "size", 16, "peer payload size (internal)")
	flag.IntVar(&f.count, "count", 1, "most messages the peer sends (internal)")
	flag.DurationVar(&f.dur, "dur", time.Second, "longest the peer sends (internal)")
	flag.IntVar(&f.conns, "conns", 1, "connections the peer holds (internal)")
}

// runPeer is the child's whole life.
func runPeer(f peerFlags) {
	// The child ends when its stdin closes; the timer is for a hung run.
	time.AfterFunc(limit, func() { log.Fatal("benchmarks: peer timed out") })
	var k kind
	for _, c := range kinds {
		if c.name == f.kind {
			k = c
		}
	}
	if k.name == "" {
		log.Fatalf("benchmarks: unknown kind %q", f.kind)
	}
	in := bufio.NewScanner(os.Stdin)
	// next waits for the parent's next line; a closed stdin ends the child.
	next := func() {
		if !in.Scan() {
			os.Exit(0)
		}
	}
	if f.role == "hold" {
		hold(k, f.conns, in)
		waitEOF(in)
	}

	next() // dial
	eps := dialAll(k, f.addr, 1)
	fmt.Println("ready")
	next() // go
	if f.role == "send" {
		sendN(eps[0], make([]byte, f.size), f.count, f.dur)
	} else {
		recvAll(eps[0])
	}
	fmt.Println("done")
	// Keep the connection until the parent has read everything.
	waitEOF(in)
}

// waitEOF ends the child once the parent closes its stdin.
func waitEOF(in *bufio.Scanner) {
	for in.Scan() {
	}
	os.Exit(0)
}

// dialAll opens n connections, a few at a time so the listener's backlog
// never overflows.
func dialAll(k kind, addr string, n int) []endpoint {
	eps := make([]endpoint, n)
	var wg sync.WaitGroup
	next := make(chan int)
	for range 32 {
		wg.Go(func() {
			for i := range next {
				e, err := k.dial(addr)
				if err != nil {
					log.Fatalf("benchmarks: %s dial %d: %v", k.name, i, err)
				}
				eps[i] = e
			}
		})
	}
	for i := range n {
		next <- i
	}
	close(next)
	wg.Wait()
	return eps
}
