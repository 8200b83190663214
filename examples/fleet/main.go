// Fleet runs resumable sessions behind HAProxy: three session servers, thirty
// clients, and a proxy that routes each connection by the session token in
// the client's hello, to the server holding the session. While the clients
// send, it resets their connections at random and crashes a server, then
// reports what the servers took. It fails on a message lost, or taken twice
// without cause, and on a client that can no longer send. It needs haproxy on
// PATH (apt-get install haproxy), stays on loopback and ends by itself within
// seconds:
//
//	go run ./examples/fleet
package main

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/aerogo/packet"
)

const (
	servers, clients, messages = 3, 30, 200
	crashed                    = 1 // the server that crashes, at crashAt
	crashAt                    = 1500 * time.Millisecond
	pace                       = 15 * time.Millisecond // between one client's messages
	cutEvery                   = 20 * time.Millisecond // a random client's connection is reset
	keepAlive                  = 200 * time.Millisecond
)

// proxyAttr is set on Linux, where the kernel then kills HAProxy with this
// process however it dies. Ctrl-C reaches HAProxy too, in the same group.
var proxyAttr *syscall.SysProcAttr

func main() {
	path, err := exec.LookPath("haproxy")
	if err != nil {
		fmt.Fprintln(os.Stderr, "fleet: needs haproxy on PATH (apt-get install haproxy, brew install haproxy)")
		os.Exit(2)
	}
	if err := run(path); err != nil {
		fmt.Fprintln(os.Stderr, "fleet:", err)
		os.Exit(1)
	}
}

// msg names a message: its payload is the client's number and its own.
type msg struct{ client, seq uint32 }

// taker is a session that took a message from Incoming, on a server.
type taker struct {
	server int
	st     *packet.Stream
}

// ledger is what the servers' handlers took.
type ledger struct {
	mu       sync.Mutex
	got      map[msg][]taker
	stranded map[msg]bool // taken from the crashed server's Incoming after the crash
	last     time.Time    // of the latest delivery
}

// server is a session server. Its handlers take each packet at once, so
// that a crash strands as little as possible in Incoming.
type server struct {
	id      int
	ln      net.Listener
	ss      *packet.Sessions
	mu      sync.Mutex
	conns   []net.Conn // all accepted, for the crash
	dead    atomic.Bool
	resumed atomic.Int32 // sessions resumed here
}

func serve(id int, l *ledger) (*server, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	s := &server{id: id, ln: ln, ss: packet.NewSessions(64)}
	go func() {
		for conn, err := ln.Accept(); err == nil; conn, err = ln.Accept() {
			s.mu.Lock()
			s.conns = append(s.conns, conn)
			s.mu.Unlock()
			if s.dead.Load() { // accepted as it crashed
				conn.Close()
				return
			}
			go s.handle(conn, l)
		}
	}()
	return s, nil
}

// handle records every message of a new session.
func (s *server) handle(conn net.Conn, l *ledger) {
	st, isNew, err := s.ss.Accept(conn)
	if err != nil || !isNew { // a connection cut before its hello fails
		if err == nil {
			s.resumed.Add(1)
		}
		return
	}
	for p := range st.Incoming {
		m := msg{binary.BigEndian.Uint32(p.Data), binary.BigEndian.Uint32(p.Data[4:])}
		l.mu.Lock()
		if s.dead.Load() {
			l.stranded[m] = true
		} else {
			l.got[m], l.last = append(l.got[m], taker{s.id, st}), time.Now()
		}
		l.mu.Unlock()
	}
}

// crash ends the server as a crash would: the listener and every connection
// reset, no goodbye to any session, and its handlers record nothing more.
func (s *server) crash() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.ln.Close()
	for _, c := range s.conns {
		c.(*net.TCPConn).SetLinger(0)
		c.Close()
	}
	s.dead.Store(true)
}

// client sends numbered messages through the proxy.
type client struct {
	st      *packet.Stream
	sent    atomic.Int32
	moved   atomic.Int32 // ErrSessionLost reports: a new session, on another server
	mu      sync.Mutex
	conn    net.Conn // the latest, for cut
	lastErr error
}

func dialClient(proxy string) *client {
	c := &client{st: packet.NewStream(64)}
	c.st.EnableResume()
	c.st.SetKeepAlive(keepAlive, 4*keepAlive)
	c.st.SetWriteTimeout(4 * keepAlive)
	c.st.OnError(func(e packet.IOError) {
		if errors.Is(e.Error, packet.ErrSessionLost) {
			c.moved.Add(1)
		}
		c.mu.Lock()
		c.lastErr = e.Error
		c.mu.Unlock()
	})
	c.st.KeepConnected(func() (net.Conn, error) {
		conn, err := net.DialTimeout("tcp", proxy, time.Second)
		if err == nil {
			c.mu.Lock()
			c.conn = conn
			c.mu.Unlock()
		}
		return conn, err
	}, 250*time.Millisecond)
	return c
}

// cut resets the client's connection, as a network failure would.
func (c *client) cut() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.conn != nil {
		c.conn.(*net.TCPConn).SetLinger(0)
		c.conn.Close()
	}
}

// run starts the servers, the proxy and the clients, cuts and crashes while
// the clients send, waits for the messages and reports.
func run(haproxy string) error {
	l := &ledger{got: map[msg][]taker{}, stranded: map[msg]bool{}}
	fleet := make([]*server, servers)
	for id := range fleet {
		var err error
		if fleet[id], err = serve(id, l); err != nil {
			return err
		}
	}
	dir, err := os.MkdirTemp("", "fleet")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	addr, stop, exited, out, err := startProxy(haproxy, filepath.Join(dir, "haproxy.cfg"), fleet)
	if err != nil {
		return err
	}
	defer stop()
	time.AfterFunc(40*time.Second, func() { stop(); fmt.Fprintln(os.Stderr, "fleet: stuck for 40s"); os.Exit(1) })
	start := time.Now()
	logf := func(format string, args ...any) {
		fmt.Printf("%5.2fs  %s\n", time.Since(start).Seconds(), fmt.Sprintf(format, args...))
	}
	logf("%d servers behind HAProxy on %s; %d clients send %d messages each", servers, addr, clients, messages)
	cs := make([]*client, clients)
	var sending sync.WaitGroup
	quit := make(chan struct{}) // a stream that takes nothing wedges its sender
	for i := range cs {
		cs[i] = dialClient(addr)
		sending.Go(func() {
			for seq := range uint32(messages) {
				select {
				case cs[i].st.Outgoing <- packet.New(1, binary.BigEndian.AppendUint32(binary.BigEndian.AppendUint32(nil, uint32(i)), seq)):
					cs[i].sent.Add(1)
				case <-quit:
					return
				}
				time.Sleep(pace)
			}
		})
	}
	sent := make(chan struct{})
	go func() { sending.Wait(); close(sent) }()
	cuts, crash, tick, wedged := 0, time.After(crashAt), time.NewTicker(cutEvery), time.After(10*time.Second)
	for busy := true; busy; {
		select {
		case <-tick.C:
			cs[rand.N(clients)].cut()
			cuts++
		case <-crash:
			fleet[crashed].crash()
			logf("server %d crashed; %d connections reset so far", crashed, cuts)
		case <-exited:
			return fmt.Errorf("haproxy exited: %s", out)
		case <-wedged:
			logf("some clients could not send for 10s")
			close(quit)
			busy = false
		case <-sent:
			busy = false
		}
	}
	tick.Stop()
	logf("sending over; %d connections reset", cuts)
	total := 0
	for _, c := range cs {
		total += int(c.sent.Load())
	}
	for { // until every message sent is in, or none came for two seconds
		l.mu.Lock()
		n, quiet := len(l.got), time.Since(l.last)
		l.mu.Unlock()
		if n == total || quiet > 2*time.Second {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	logf("done")
	var closing sync.WaitGroup
	for _, c := range cs {
		closing.Go(func() { c.st.Close() })
	}
	closing.Wait()
	for _, s := range fleet {
		if s.id != crashed {
			s.ss.Close()
		}
	}
	return report(l, cs, fleet)
}

// report prints the losses and duplicates, then the summary; each is an
// error. A message counts as delivered once a handler took it, the crashed
// server's before the crash. What sat in its Incoming then must come again
// through another server, as the library acknowledges only what the
// application took; such a loss is counted apart. A duplicate is no error
// when the client's session moved and the copies are in two sessions: the new
// server may take what the old one took but had not acknowledged.
func report(l *ledger, cs []*client, fleet []*server) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	var sent, lost, stranded, dups, badDups, moved, movedOff, resumed, stuck int
	for _, s := range fleet {
		resumed += int(s.resumed.Load())
	}
	for i, c := range cs {
		var gone, odd []uint32
		onCrashed := false
		if n := c.sent.Load(); n < messages {
			c.mu.Lock()
			fmt.Printf("client %d: wedged after %d messages; its last error: %v\n", i, n, c.lastErr)
			c.mu.Unlock()
			stuck++
		}
		sent += int(c.sent.Load())
		for seq := range uint32(c.sent.Load()) {
			m := msg{uint32(i), seq}
			takers := l.got[m]
			onCrashed = onCrashed || slices.ContainsFunc(takers, func(t taker) bool { return t.server == crashed })
			switch {
			case len(takers) == 0:
				gone = append(gone, seq)
				lost++
				if l.stranded[m] {
					stranded++
				}
			case len(takers) > 1:
				dups += len(takers) - 1
				if c.moved.Load() == 0 || twice(takers) {
					badDups++
					odd = append(odd, seq)
				}
			}
		}
		moved += int(c.moved.Load())
		if onCrashed && c.moved.Load() > 0 {
			movedOff++
		}
		if len(gone)+len(odd) > 0 {
			fmt.Printf("client %d: lost %v, duplicated in one session or with no move %v\n", i, gone, odd)
		}
	}
	fmt.Printf("summary: sent %d, wedged clients %d, delivered %d, lost %d (%d in the crashed server's Incoming), duplicates %d (%d unexplained), sessions moved %d (%d off the crashed server), resumed on own server %d\n",
		sent, stuck, len(l.got), lost, stranded, dups, badDups, moved, movedOff, resumed)
	if lost > 0 || badDups > 0 || stuck > 0 {
		return errors.New("messages lost, duplicated or not sent")
	}
	if moved > movedOff {
		return errors.New("a session moved although its server lived: a cut connection should resume on its own server")
	}
	return nil
}

// twice tells whether one session took a message more than once.
func twice(takers []taker) bool {
	for i, t := range takers {
		if slices.ContainsFunc(takers[i+1:], func(u taker) bool { return u.st == t.st }) {
			return true
		}
	}
	return false
}

// config routes a connection by the session token, bytes 9 to 25 of the
// client's hello, learnt from the same bytes of the server's answer: a
// welcome (type 0x05) or, for a session the server does not know, a lost
// (0x06) that names the new session; either names the token of the next
// connection. A new session's token is zero: it goes round-robin. HAProxy
// holds what it inspects, so any other answer, such as the 9 bytes that
// refuse a new session when the server is full, is let through at once.
const config = `global
	maxconn 1000
defaults
	mode tcp
	timeout connect 200ms
	timeout client 10s
	timeout server 10s
	retries 3
	option redispatch 1
listen fleet
	bind fd@3
	balance roundrobin
	stick-table type binary len 16 size 100k expire 10m
	tcp-request inspect-delay 5s
	tcp-request content accept if { req.len ge 25 }
	stick match req.payload(9,16) unless { req.payload(9,16) -m bin 00000000000000000000000000000000 }
	tcp-response inspect-delay 5s
	acl session res.payload(0,1) -m bin 05 06
	tcp-response content accept if session { res.len ge 25 }
	tcp-response content accept unless session
	stick store-response res.payload(9,16) if session
`

// startProxy runs HAProxy in front of the fleet, its config in file. It
// listens on a loopback socket bound here and handed over, so no one can take
// the port in between and clients may connect at once: the kernel queues them
// until HAProxy accepts. stop kills it, from any goroutine, once; exited is
// closed if it ends, and then out has what it said.
func startProxy(haproxy, file string, fleet []*server) (addr string, stop func(), exited <-chan struct{}, out *bytes.Buffer, err error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", nil, nil, nil, err
	}
	defer ln.Close() // HAProxy has its own descriptor
	f, err := ln.(*net.TCPListener).File()
	if err != nil {
		return "", nil, nil, nil, err
	}
	defer f.Close()
	cfg := config
	for _, s := range fleet {
		cfg += fmt.Sprintf("\tserver s%d %s check inter 100ms fall 2 rise 2\n", s.id, s.ln.Addr())
	}
	if err := os.WriteFile(file, []byte(cfg), 0o600); err != nil {
		return "", nil, nil, nil, err
	}
	out = new(bytes.Buffer)
	cmd := exec.Command(haproxy, "-f", file, "-db")
	cmd.Stdout, cmd.Stderr, cmd.SysProcAttr, cmd.ExtraFiles = out, out, proxyAttr, []*os.File{f} // fd 3
	if err := cmd.Start(); err != nil {
		return "", nil, nil, nil, err
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	return ln.Addr().String(), sync.OnceFunc(func() { cmd.Process.Kill(); <-done }), done, out, nil
}
