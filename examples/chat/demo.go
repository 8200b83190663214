package main

import (
	"fmt"
	"log"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"
)

// demo runs a room and three clients on loopback and, while they talk, resets
// the server's connections, silences them, then crashes and restarts the
// server. It prints the transcript and a summary, and fails on any loss.
func demo() error {
	start, lg := time.Now(), log.New(os.Stdout, "", 0)
	logf := func(who, format string, args ...any) {
		lg.Printf("%5.2fs  %-6s  %s", time.Since(start).Seconds(), who, fmt.Sprintf(format, args...))
	}
	var mu sync.Mutex
	got, copies, sent := map[message]bool{}, 0, 0 // got: the lines the room took, copies: how many times
	var rm *room
	var ln *faultyListener
	listen := func(addr string) error {
		l, err := net.Listen("tcp", addr)
		if err == nil {
			ln = &faultyListener{Listener: l}
			rm = serveRoom(ln, 100*time.Millisecond, func(format string, args ...any) { logf("server", format, args...) },
				func(m message) { mu.Lock(); got[m], copies = true, copies+1; mu.Unlock() })
		}
		return err
	}
	if err := listen("127.0.0.1:0"); err != nil {
		return err
	}
	addr := ln.Addr().String()

	var clients []*client
	for _, name := range []string{"alice", "bob", "carol"} {
		clients = append(clients, newClient(name, func() (net.Conn, error) { return net.Dial("tcp", addr) },
			50*time.Millisecond, func(format string, args ...any) { logf(name, format, args...) }))
	}
	round := func(texts ...string) { // clients[i] says texts[i]
		for i, text := range texts {
			clients[i].say(text)
			logf(clients[i].name, "says: %s", text)
			sent++
		}
	}
	// settle waits for the room to have every line and n members; after 5s it gives up.
	gaveUp := false
	delivered := func() bool { mu.Lock(); defer mu.Unlock(); return len(got) == sent }
	settle := func(n int32) {
		for deadline := time.Now().Add(5 * time.Second); !gaveUp && !(delivered() && rm.size.Load() == n); {
			gaveUp = time.Now().After(deadline)
			time.Sleep(5 * time.Millisecond)
		}
	}
	reset := func(c *faultyConn) { c.Conn.(*net.TCPConn).SetLinger(0); c.Close() }

	settle(3)
	round("morning all", "morning! coffee's on", "hi both")
	settle(3)
	round("is the build green?", "it was an hour ago", "I'll check")
	logf("server", "its connections are reset, mid-conversation")
	ln.each(reset)
	settle(3)
	logf("server", "its connections go silent: nothing in or out, nothing closed")
	ln.each(func(c *faultyConn) { c.silent.Store(true) })
	round("still there?", "into the void", "keep-alive will tell")
	settle(3)
	round("deploying the server now", "go ahead", "fingers crossed")
	logf("server", "crashes: listener and connections gone, sessions forgotten")
	ln.Close()
	ln.each(reset)
	if err := listen(addr); err != nil {
		return err
	}
	logf("server", "restarted, with no sessions")
	round("anything lost?", "the summary will say", "bye for now")
	settle(3)

	for _, c := range clients {
		c.leave()
	}
	settle(0)
	fmt.Printf("summary: sent %d, delivered %d, lost %d, duplicates %d (after the restart)\n",
		sent, len(got), sent-len(got), copies-len(got))
	if lost := sent - len(got); lost > 0 || gaveUp {
		return fmt.Errorf("demo: %d lines lost, gave up waiting: %v", lost, gaveUp)
	}
	return nil
}

// faultyListener hands out connections that the demo can reset or silence. A
// silent one is a black hole: it drops what comes and goes, and closes nothing.
type faultyListener struct {
	net.Listener
	mu    sync.Mutex
	conns []*faultyConn // all so far: a dead one takes a fault harmlessly
}

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

func (l *faultyListener) each(f func(*faultyConn)) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, c := range l.conns {
		f(c)
	}
}

func (c *faultyConn) Read(b []byte) (n int, err error) {
	for n, err = c.Conn.Read(b); err == nil && c.silent.Load(); n, err = c.Conn.Read(b) {
	}
	return n, err
}

func (c *faultyConn) Write(b []byte) (int, error) {
	if c.silent.Load() {
		return len(b), nil
	}
	return c.Conn.Write(b)
}
