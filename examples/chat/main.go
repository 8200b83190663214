// Chat is a small chat room built on github.com/aerogo/packet: a server,
// and clients that keep talking while the server is away and reconnect by
// themselves when it comes back.
//
// Usage:
//
//	chat                            run a demo on loopback, print its transcript and exit
//	chat -serve ADDR                run a server, e.g. -serve 127.0.0.1:7000
//	chat -connect ADDR -name NAME   chat: lines from stdin go to the room, the room's to stdout
//
// # Delivery
//
// A packet.Stream keeps the packets queued while it has no connection and
// sends them in order on the next one, and it resends a write that failed.
// It cannot recover bytes the kernel accepted on a connection that then
// died: those are lost without an error. So the protocol does what TCP
// cannot across connections. Each client numbers its lines and keeps them
// until the server acknowledges them; after every reconnect it sends again
// whatever is unacknowledged. The server delivers each session's lines in
// order, holds back lines that arrive past a gap, and drops the copies it
// already has. A line is delivered once, or, if the server restarts and so
// forgets a session, at least once: a line whose acknowledgement died with
// the old server is delivered again by the new one.
//
// # The demo's accounting
//
// The demo's second server is a new one, as after a real restart. A line
// counts as sent when a client says it and as delivered when a room takes it
// (each server reports the lines it takes), so lost is sent minus delivered,
// once every client has had its lines acknowledged or the demo has given up
// waiting. Resends would hide a stream that dropped packets, so the lines a
// client queued while it knew it had no connection, which the stream itself
// promises to deliver, are checked apart: each must reach the server in its
// first transmission. The demo exits with status 1 if any line was lost or
// any of those needed a resend. The summary also counts the lines that did
// need a resend (the kernel took them on a dying connection) and those a
// second server delivered again.
//
// Members hear the others' lines while they are connected; one that is away
// misses them, as on IRC. Only its own lines wait for it.
package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"time"
)

const (
	// maxName is the longest name a client may choose, in bytes.
	maxName = 32
	// maxLine is the longest line a client sends, in bytes: well within
	// the peer's packet limit, so a line can never get its sender
	// disconnected.
	maxLine = 4 << 10
)

func main() {
	os.Exit(run(os.Args[1:], os.Stdin, os.Stdout, os.Stderr))
}

// run is the program with its surroundings passed in; it returns the exit
// status.
func run(args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	flags := flag.NewFlagSet("chat", flag.ContinueOnError)
	flags.SetOutput(io.Discard)
	serveAddr := flags.String("serve", "", "run only the server, listening on `ADDR`")
	connectAddr := flags.String("connect", "", "chat with the server at `ADDR`")
	name := flags.String("name", "", "your `NAME` in the room (with -connect)")
	err := flags.Parse(args)
	if errors.Is(err, flag.ErrHelp) {
		fmt.Fprintln(stdout, "usage: chat [-serve ADDR | -connect ADDR -name NAME]")
		fmt.Fprintln(stdout, "Without flags chat runs a demo on loopback and exits.")
		flags.SetOutput(stdout)
		flags.PrintDefaults()
		return 0
	}
	if err == nil {
		err = checkFlags(flags, *serveAddr, *connectAddr, *name)
	}
	if err != nil {
		fmt.Fprintf(stderr, "chat: %v (chat -h for usage)\n", err)
		return 2
	}

	switch {
	case *serveAddr != "":
		err = serve(*serveAddr, stdout)
	case *connectAddr != "":
		err = talk(*connectAddr, *name, stdin, stdout)
	default:
		err = demo(stdout)
	}
	if err != nil {
		fmt.Fprintf(stderr, "chat: %v\n", err)
		return 1
	}
	return 0
}

// checkFlags reports a combination of flags that makes no sense.
func checkFlags(flags *flag.FlagSet, serveAddr, connectAddr, name string) error {
	switch {
	case flags.NArg() > 0:
		return fmt.Errorf("unexpected argument %q", flags.Arg(0))
	case serveAddr != "" && connectAddr != "":
		return errors.New("-serve and -connect do not go together")
	case connectAddr != "" && strings.TrimSpace(name) == "":
		return errors.New("-connect needs -name")
	case connectAddr == "" && name != "":
		return errors.New("-name goes with -connect")
	case len(name) > maxName:
		return fmt.Errorf("-name is longer than %d bytes", maxName)
	case strings.ContainsFunc(name, func(r rune) bool { return r < ' ' || r == 0x7f }):
		return errors.New("-name contains a control character")
	}
	return nil
}

// serve runs a server on addr until interrupted.
func serve(addr string, out io.Writer) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	logger := log.New(out, "", log.Ltime)
	srv := newServer(logger.Printf, nil)
	srv.serve(ln)
	logger.Printf("listening on %s", ln.Addr())
	<-ctx.Done()
	logger.Printf("shutting down")
	srv.stop()
	return nil
}

// talk is the interactive client: it says each line read from in and prints
// what the others say, until in ends or the user interrupts.
func talk(addr, name string, in io.Reader, out io.Writer) error {
	var mu sync.Mutex
	printf := func(format string, args ...any) {
		mu.Lock()
		defer mu.Unlock()
		fmt.Fprintf(out, format+"\n", args...)
	}
	heard := func(typ byte, m message) {
		switch typ {
		case typeSay:
			printf("%s: %s", m.Name, m.Text)
		case typeJoin:
			printf("* %s joined", m.Name)
		case typeLeave:
			printf("* %s left", m.Name)
		}
	}
	events := func(format string, args ...any) { printf("* "+format, args...) }

	c, err := connect(addr, name, 5*time.Second, events, heard)
	if err != nil {
		return fmt.Errorf("cannot connect to %s: %w", addr, err)
	}
	printf("* connected to %s as %s; type to talk, end with Ctrl-D", addr, name)

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	lines := make(chan string)
	go func() {
		scanner := bufio.NewScanner(in)
		for scanner.Scan() {
			lines <- scanner.Text()
		}
		if err := scanner.Err(); err != nil {
			printf("* reading input: %v", err)
		}
		close(lines)
	}()
	for reading := true; reading; {
		select {
		case <-ctx.Done():
			reading = false
		case line, ok := <-lines:
			switch {
			case !ok:
				reading = false
			case len(line) > maxLine:
				printf("* not sent: a line holds %d bytes at most", maxLine)
			case strings.TrimSpace(line) != "":
				if _, offline := c.say(line); offline {
					printf("* offline: the line goes out when the connection is back")
				}
			}
		}
	}
	stop() // a second interrupt ends the program at once

	// Give the last lines a moment to be acknowledged, then leave.
	waitFor(5*time.Second, func() bool { return c.unackedLines() == 0 })
	unacked := c.unackedLines()
	c.leave()
	if unacked > 0 {
		return fmt.Errorf("%d line(s) not acknowledged by the server", unacked)
	}
	return nil
}

// names and script are the demo's cast and what each says, round by round.
var (
	names  = []string{"alice", "bob", "carol"}
	script = [][]string{
		{"morning all", "morning! coffee's on", "hi both"},
		{"is the build green?", "it was an hour ago", "I'll check"},
		{"hm, the chat server just went away", "did someone deploy?", "not me"},
		{"are these getting through?", "they wait in our streams", "and go out in order"},
		{"still no server", "the backoff is doing its job", "patience"},
		{"and we're back", "told you", "anything lost?"},
		{"the summary will say", "lunch at noon?", "sure, bye for now"},
	}
)

// demo runs a server and three clients on loopback, stops the server while
// they talk, starts a new one on the same address, and checks that every
// line arrived.
func demo(out io.Writer) error {
	t := newTranscript(out)
	book := newLedger()

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	addr := ln.Addr().String()
	srv := newServer(t.printer("server"), book.deliver)
	srv.serve(ln)
	defer func() { srv.stop() }()
	t.log("demo", "server listening on %s", addr)

	var clients []*client
	defer func() {
		for _, c := range clients {
			c.leave()
		}
	}()
	for _, name := range names {
		c, err := connect(addr, name, 400*time.Millisecond, t.printer(name), nil)
		if err != nil {
			return err
		}
		clients = append(clients, c)
	}
	// round has each client say its line of round r. Lines said while
	// offline are logged; so are all the others if show is set, since the
	// server's log may not show them.
	round := func(r int, show bool) {
		for i, c := range clients {
			text := script[r][i]
			seq, offline := c.say(text)
			book.say(c.name, seq, offline)
			switch {
			case offline:
				t.log(c.name, "offline, queued: %s", text)
			case show:
				t.log(c.name, "said: %s", text)
			}
			// Not for synchronization: a pause keeps the transcript
			// readable, like people typing.
			time.Sleep(15 * time.Millisecond)
		}
	}
	all := func(ok func(c *client) bool) func() bool {
		return func() bool {
			for _, c := range clients {
				if !ok(c) {
					return false
				}
			}
			return true
		}
	}
	acked := all(func(c *client) bool { return c.unackedLines() == 0 })
	offline := all((*client).isOffline)
	online := all(func(c *client) bool { return !c.isOffline() })

	round(0, false)
	round(1, false)
	if !waitFor(5*time.Second, acked) {
		return errors.New("demo: the server did not acknowledge the first lines")
	}

	t.log("demo", "stopping the server; the clients keep talking")
	stopped := make(chan struct{})
	go func() {
		srv.stop()
		close(stopped)
	}()
	round(2, true)
	<-stopped
	if !waitFor(5*time.Second, offline) {
		return errors.New("demo: the clients did not notice that the server stopped")
	}
	t.log("demo", "every client knows it is offline; its lines wait in its stream")
	round(3, false)
	round(4, false)

	t.log("demo", "starting a new server on %s", addr)
	if ln, err = listenAgain(addr, 5*time.Second); err != nil {
		return err
	}
	srv = newServer(t.printer("server"), book.deliver)
	srv.serve(ln)
	round(5, false)
	if !waitFor(10*time.Second, func() bool { return online() && acked() }) {
		t.log("demo", "gave up waiting for every line to be acknowledged")
	}
	round(6, false)
	waitFor(5*time.Second, acked)
	for _, c := range clients {
		if err := c.leave(); err != nil {
			t.log(c.name, "leaving: %v", err)
		}
	}
	reconnects := 0
	for _, c := range clients {
		reconnects += c.reconnectCount()
	}
	clients = nil
	waitFor(5*time.Second, func() bool { return srv.memberCount() == 0 })
	srv.stop()

	sum := book.tally()
	fmt.Fprintf(out, "summary: sent %d, delivered %d, lost %d, reconnects %d "+
		"(queued during the outage %d, missing from the first send %d; resent after a reconnect %d; duplicates %d)\n",
		sum.sent, sum.delivered, sum.lost, reconnects, sum.outage, sum.outageMissed, sum.resent, sum.duplicates)
	if sum.lost > 0 || sum.outageMissed > 0 {
		return fmt.Errorf("demo: %d lines lost, %d lines queued during the outage missing from the first send",
			sum.lost, sum.outageMissed)
	}
	return nil
}

// listenAgain listens on addr, retrying for up to d: the address was ours a
// moment ago, but another socket may hold it briefly.
func listenAgain(addr string, d time.Duration) (net.Listener, error) {
	deadline := time.Now().Add(d)
	for {
		ln, err := net.Listen("tcp", addr)
		if err == nil || time.Now().After(deadline) {
			return ln, err
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// waitFor polls cond until it holds or d has passed, and tells whether it
// held.
func waitFor(d time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(5 * time.Millisecond)
	}
	return true
}

// ledger is the demo's accounting: every line said, and the copy of each
// that the room took.
type ledger struct {
	mu         sync.Mutex
	said       map[lineID]bool    // each line said: was it queued during the outage?
	delivered  map[lineID]message // the first copy the room took
	duplicates int                // lines a second server took again
}

// lineID names one line: its client and number.
type lineID struct {
	name string
	seq  uint64
}

// summary is what the ledger adds up to.
type summary struct {
	sent, delivered, lost, outage, outageMissed, resent, duplicates int
}

func newLedger() *ledger {
	return &ledger{said: make(map[lineID]bool), delivered: make(map[lineID]message)}
}

// say records a line a client said.
func (l *ledger) say(name string, seq uint64, outage bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.said[lineID{name, seq}] = outage
}

// deliver records a line the room took.
func (l *ledger) deliver(m message) {
	l.mu.Lock()
	defer l.mu.Unlock()
	id := lineID{m.Name, m.Seq}
	if _, ok := l.delivered[id]; ok {
		l.duplicates++
		return
	}
	l.delivered[id] = m
}

// tally adds up the ledger.
func (l *ledger) tally() summary {
	l.mu.Lock()
	defer l.mu.Unlock()
	s := summary{sent: len(l.said), duplicates: l.duplicates}
	for id, outage := range l.said {
		m, ok := l.delivered[id]
		if ok {
			s.delivered++
		} else {
			s.lost++
		}
		if ok && m.Resent {
			s.resent++
		}
		if outage {
			s.outage++
			if !ok || m.Resent {
				s.outageMissed++
			}
		}
	}
	return s
}

// transcript prints timestamped lines from several goroutines.
type transcript struct {
	mu    sync.Mutex
	out   io.Writer
	start time.Time
}

func newTranscript(out io.Writer) *transcript {
	return &transcript{out: out, start: time.Now()}
}

// log prints one line on behalf of who.
func (t *transcript) log(who, format string, args ...any) {
	t.mu.Lock()
	defer t.mu.Unlock()
	fmt.Fprintf(t.out, "%5.2fs  %-6s  %s\n", time.Since(t.start).Seconds(), who, fmt.Sprintf(format, args...))
}

// printer returns a log function for who.
func (t *transcript) printer(who string) func(string, ...any) {
	return func(format string, args ...any) { t.log(who, format, args...) }
}
