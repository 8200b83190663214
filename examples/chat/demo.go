package main

import (
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// demo runs a room and three clients on loopback and, while they talk,
// kills the server's connections, then silences them, then crashes the
// server and starts a new one. It prints the transcript and a summary, and
// fails if a line was lost.
func demo(out io.Writer) error {
	start, lg := time.Now(), log.New(out, "", 0)
	logf := func(who, format string, args ...any) {
		lg.Printf("%5.2fs  %-6s  %s", time.Since(start).Seconds(), who, fmt.Sprintf(format, args...))
	}
	// copies counts the copies of each line that each got: "room" (the
	// servers) and the clients.
	var mu sync.Mutex
	copies := map[string]int{}
	key := func(who string, m message) string { return fmt.Sprintf("%s %s#%d", who, m.From, m.ID) }
	got := func(who string, m message) { mu.Lock(); copies[key(who, m)]++; mu.Unlock() }
	count := func(who string, m message) int {
		mu.Lock()
		defer mu.Unlock()
		return copies[key(who, m)]
	}
	// The clients dial addr, which a restart points at the new server.
	var rm *room
	var ln *faultyListener
	var addr atomic.Value
	startRoom := func() error {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return err
		}
		ln = &faultyListener{Listener: l}
		rm = serveRoom(ln, 100*time.Millisecond, func(format string, args ...any) { logf("server", format, args...) },
			func(m message) { got("room", m) })
		addr.Store(l.Addr().String())
		return nil
	}
	if err := startRoom(); err != nil {
		return err
	}
	defer func() { rm.sessions.Close() }()

	names := []string{"alice", "bob", "carol"}
	var clients []*client
	for _, name := range names {
		c, err := newClient(name, func() (net.Conn, error) { return net.Dial("tcp", addr.Load().(string)) },
			50*time.Millisecond, func(e string) { logf(name, "%s", e) },
			func(m message) {
				if got(name, m); m.From != name {
					logf(name, "heard %s: %s", m.From, m.Text)
				}
			})
		if err != nil {
			return err
		}
		defer c.leave()
		clients = append(clients, c)
	}
	var said []message
	say := func(i int, text string) {
		said = append(said, clients[i].say(text))
		logf(names[i], "says: %s", text)
	}
	round := func(texts ...string) {
		for i, text := range texts {
			say(i, text)
		}
	}
	everyone := append([]string{"room"}, names...)
	// dups counts the extra copies that whos got.
	dups := func(whos ...string) (n int) {
		for _, m := range said {
			for _, who := range whos {
				n += max(count(who, m)-1, 0)
			}
		}
		return n
	}
	// settled tells whether the room has every line and every client heard
	// those from said[from] on.
	settled := func(from int) func() bool {
		return func() bool {
			for i, m := range said {
				for _, who := range everyone {
					if count(who, m) == 0 && (who == "room" || i >= from) {
						return false
					}
				}
			}
			return true
		}
	}
	members := func(n int32) func() bool { return func() bool { return rm.size.Load() == n } }
	// wait polls cond for a few seconds, the whole demo's usual time many
	// times over. After a failure it waits no more: the demo runs on to its
	// summary.
	var failed error
	wait := func(what string, cond func() bool) {
		for deadline := time.Now().Add(5 * time.Second); failed == nil && !cond(); time.Sleep(5 * time.Millisecond) {
			if time.Now().After(deadline) {
				failed = errors.New("demo: gave up waiting for " + what)
			}
		}
	}

	wait("everyone to join", members(3))
	round("morning all", "morning! coffee's on", "hi both")
	wait("the first lines", settled(0))

	say(0, "is the build green?")
	say(1, "it was an hour ago")
	logf("server", "its connections are reset, mid-conversation")
	ln.kill()
	say(2, "I'll check")
	wait("the lines said across the reset", settled(0))

	logf("server", "its connections go silent: nothing in or out, nothing closed")
	ln.each(func(c *faultyConn) { c.silent.Store(true) })
	round("still there?", "into the void", "keep-alive will tell")
	wait("the lines said into the silence", settled(0))
	if n := dups(everyone...); n > 0 && failed == nil {
		failed = fmt.Errorf("demo: %d duplicates before the restart", n)
	}

	round("deploying the server now", "go ahead", "fingers crossed")
	logf("server", "crashes: listener and connections gone, sessions forgotten")
	ln.Close()
	ln.kill()
	if err := startRoom(); err != nil {
		return err
	}
	logf("server", "restarted on %s", addr.Load())
	wait("everyone to rejoin", members(3))
	wait("the lines said around the restart", settled(len(said)))
	last := len(said)
	round("anything lost?", "the summary will say", "bye for now")
	wait("the last lines", settled(last))

	for _, c := range clients {
		if err := c.leave(); err != nil {
			logf(c.name, "leaving: %v", err)
		}
	}
	wait("everyone to leave", members(0))
	delivered := 0
	for _, m := range said {
		delivered += min(count("room", m), 1)
	}
	fmt.Fprintf(out, "summary: sent %d, delivered %d, lost %d, duplicates %d (after the restart)\n",
		len(said), delivered, len(said)-delivered, dups("room"))
	if delivered < len(said) {
		return fmt.Errorf("demo: %d lines lost", len(said)-delivered)
	}
	return failed
}

// faultyListener is the network between the demo's clients and server: it
// hands out connections that the demo can kill or silence.
type faultyListener struct {
	net.Listener
	mu    sync.Mutex
	conns []*faultyConn // all so far: a dead one takes a fault harmlessly
}

// faultyConn is a connection that, while silent, is a black hole: it drops
// what arrives and what it is given to send, and closes nothing.
type faultyConn struct {
	net.Conn
	silent atomic.Bool
}

func (l *faultyListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	l.conns = append(l.conns, &faultyConn{Conn: c})
	return l.conns[len(l.conns)-1], nil
}

// kill resets every connection, as a crash or a middlebox would.
func (l *faultyListener) kill() {
	l.each(func(c *faultyConn) { c.Conn.(*net.TCPConn).SetLinger(0); c.Close() })
}

func (l *faultyListener) each(f func(*faultyConn)) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, c := range l.conns {
		f(c)
	}
}

func (c *faultyConn) Read(b []byte) (int, error) {
	for {
		if n, err := c.Conn.Read(b); err != nil || !c.silent.Load() {
			return n, err
		}
	}
}

func (c *faultyConn) Write(b []byte) (int, error) {
	if c.silent.Load() {
		return len(b), nil
	}
	return c.Conn.Write(b)
}
