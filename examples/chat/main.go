// Chat is a small chat room built on github.com/aerogo/packet's resumable
// sessions: nothing said is lost when a connection dies, goes silent or the
// server restarts. Without flags it runs a demo on loopback; -serve ADDR runs
// a server; -connect ADDR -name NAME sends stdin's lines and prints the room's.
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"log"
	"net"
	"os"
	"os/signal"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/aerogo/packet"
)

func main() {
	serveAddr := flag.String("serve", "", "run a server listening on `ADDR`")
	connectAddr := flag.String("connect", "", "chat with the server at `ADDR`")
	name := flag.String("name", "", "your `NAME` in the room (with -connect)")
	flag.Parse() // no flags: run the demo
	if flag.NArg() > 0 || *serveAddr != "" && *connectAddr != "" || (*connectAddr == "") != (*name == "") {
		flag.Usage()
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	var err error
	switch {
	case *serveAddr != "":
		err = serve(ctx, *serveAddr)
	case *connectAddr != "":
		err = talk(ctx, *connectAddr, *name)
	default:
		err = demo()
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "chat:", err)
		os.Exit(1)
	}
}

// serve runs a room on addr until interrupted, then ends every session.
func serve(ctx context.Context, addr string) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	lg := log.New(os.Stdout, "", log.Ltime)
	r := serveRoom(ln, 5*time.Second, lg.Printf, func(m message) { lg.Printf("%s: %s", m.From, m.Text) })
	lg.Printf("listening on %s", ln.Addr())
	<-ctx.Done()
	r.sessions.Close()
	return nil
}

// talk sends each line from stdin and prints the room's, until stdin ends.
func talk(ctx context.Context, addr, name string) error {
	dial := func() (net.Conn, error) { return net.DialTimeout("tcp", addr, 5*time.Second) }
	c := newClient(name, dial, time.Second, log.New(os.Stdout, "", 0).Printf)
	fmt.Printf("* talking to %s as %s; end with Ctrl-D\n", addr, name)
	go func() { <-ctx.Done(); c.leave(); os.Exit(0) }()
	for sc := bufio.NewScanner(os.Stdin); sc.Scan(); {
		if strings.TrimSpace(sc.Text()) != "" {
			c.say(sc.Text())
		}
	}
	return c.leave()
}

// message is every packet's payload, as JSON. ID tells a line sent twice from two lines.
type message struct {
	From string `json:"from"`
	ID   int    `json:"id"`
	Text string `json:"text"`
}

// room is a chat server; run owns the members. A member is a session, not a
// connection: a client that reconnects is still in the room.
type room struct {
	sessions    *packet.Sessions
	logf        func(format string, args ...any)
	heard       func(message) // called by run with every line the room takes
	join, leave chan *packet.Stream
	said        chan *packet.Packet
	size        atomic.Int32 // members, for the demo to wait on
}

// serveRoom runs a room for the clients ln accepts. A new session gets a read
// pump; a returning client's connection just resumes it.
func serveRoom(ln net.Listener, keepAlive time.Duration, logf func(string, ...any), heard func(message)) *room {
	r := &room{sessions: packet.NewSessions(64), logf: logf, heard: heard,
		join: make(chan *packet.Stream), leave: make(chan *packet.Stream), said: make(chan *packet.Packet)}
	go r.run()
	go func() {
		for conn, err := ln.Accept(); err == nil; conn, err = ln.Accept() {
			go func() {
				if st, isNew, err := r.sessions.Accept(conn); err == nil && isNew {
					st.SetKeepAlive(keepAlive, 4*keepAlive)
					r.join <- st
					for p := range st.Incoming {
						r.said <- p
					}
					r.leave <- st
				}
			}()
		}
	}()
	return r
}

// run relays every line to every member, its author too.
func (r *room) run() {
	members := make(map[*packet.Stream]bool)
	for {
		select {
		case st := <-r.join:
			members[st] = true
			r.logf("a session started: %d members", len(members))
		case st := <-r.leave:
			delete(members, st)
			r.logf("a session ended: %d members", len(members))
		case p := <-r.said:
			if m := (message{}); json.Unmarshal(p.Data, &m) == nil {
				r.heard(m)
			}
			for st := range members {
				select {
				case st.Outgoing <- p:
				default: // too far behind: dropped, not waited for
					delete(members, st)
					go st.Close()
				}
			}
		}
		r.size.Store(int32(len(members)))
	}
}

// client is a member's end: its stream resumes the session on each new connection.
type client struct {
	name   string
	stream *packet.Stream
	lastID int           // used only by the goroutine that calls say
	done   chan struct{} // closed when the read pump has ended
}

// newClient keeps a client connected; it logs connection trouble and what
// others say.
func newClient(name string, dial func() (net.Conn, error), keepAlive time.Duration, logf func(string, ...any)) *client {
	st := packet.NewStream(64)
	st.EnableResume()
	st.SetKeepAlive(keepAlive, 4*keepAlive)
	st.SetWriteTimeout(4 * keepAlive)
	st.OnError(func(e packet.IOError) { logf("* %v", e.Error) }) // then KeepConnected redials
	st.KeepConnected(dial, 4*keepAlive)
	c := &client{name: name, stream: st, done: make(chan struct{})}
	go func() {
		defer close(c.done)
		for p := range st.Incoming {
			if m := (message{}); json.Unmarshal(p.Data, &m) == nil && m.From != name { // not our own echo
				logf("%s: %s", m.From, m.Text)
			}
		}
		logf("* the session has ended")
	}()
	return c
}

// say queues a line for the room.
func (c *client) say(text string) {
	c.lastID++
	data, _ := json.Marshal(message{From: c.name, ID: c.lastID, Text: text})
	c.stream.Outgoing <- packet.New(1, data)
}

// leave ends the session once the last lines are acknowledged.
func (c *client) leave() error {
	err := c.stream.Close()
	<-c.done
	return err
}
