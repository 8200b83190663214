package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"sync/atomic"
	"time"

	"github.com/aerogo/packet"
)

// message is every packet's payload, as JSON. ID numbers one client's
// lines, so that a line delivered twice can be told from two lines.
type message struct {
	From string `json:"from"`
	ID   int    `json:"id"`
	Text string `json:"text"`
}

// room is a chat server. Its members are owned by run; other goroutines
// talk to it through the channels. A member is a session, not a connection:
// a client that reconnects is still in the room.
type room struct {
	sessions    *packet.Sessions
	logf        func(format string, args ...any)
	delivered   func(message) // if set, run calls it with every line it takes
	join, leave chan *packet.Stream
	said        chan *packet.Packet
	size        atomic.Int32 // members, for the demo to wait on
}

// serveRoom runs a room for the clients ln accepts, with keep-alive so that
// a client gone silent does not hold its connection for ever.
func serveRoom(ln net.Listener, keepAlive time.Duration, logf func(string, ...any), delivered func(message)) *room {
	r := &room{sessions: packet.NewSessions(64), logf: logf, delivered: delivered,
		join: make(chan *packet.Stream), leave: make(chan *packet.Stream), said: make(chan *packet.Packet)}
	go r.run()
	go func() {
		for conn, err := ln.Accept(); err == nil; conn, err = ln.Accept() {
			go r.accept(conn, keepAlive)
		}
	}()
	return r
}

// accept hands conn to its session. A new session gets a read pump, which
// runs until the session ends; a returning client's pump just goes on. The
// stream's own writer goroutine is the member's write pump.
func (r *room) accept(conn net.Conn, keepAlive time.Duration) {
	st, isNew, err := r.sessions.Accept(conn)
	if err != nil {
		r.logf("refused a connection: %v", err)
	}
	if !isNew {
		return
	}
	st.SetKeepAlive(keepAlive, 4*keepAlive)
	r.join <- st
	for p := range st.Incoming {
		r.said <- p
	}
	r.leave <- st
}

// run relays every line to every member, its author too, as a sign that the
// room took it. It never waits for a member: one whose Outgoing is full is
// too far behind and is dropped, as gorilla/websocket's chat hub does.
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
			var m message
			if json.Unmarshal(p.Data, &m) != nil {
				continue
			}
			if r.delivered != nil {
				r.delivered(m)
			}
			for st := range members {
				select {
				case st.Outgoing <- p:
				default:
					delete(members, st)
					go st.Close()
				}
			}
		}
		r.size.Store(int32(len(members)))
	}
}

// client is a member's end. Its stream resumes the session across
// connections, so say never waits for the network and nothing said is lost.
type client struct {
	name   string
	stream *packet.Stream
	lastID int           // used only by the goroutine that calls say
	done   chan struct{} // closed when the read pump has ended
}

// newClient dials once, so that a wrong address fails at once, then keeps
// the client connected, listening for silence every keepAlive. events hears
// about the connection, heard about the room, on the client's goroutines.
func newClient(name string, dial func() (net.Conn, error), keepAlive time.Duration, events func(string), heard func(message)) (*client, error) {
	conn, err := dial()
	if err != nil {
		return nil, err
	}
	st := packet.NewStream(64)
	st.EnableResume()
	st.SetKeepAlive(keepAlive, 4*keepAlive)
	st.SetWriteTimeout(4 * keepAlive)
	st.OnError(func(e packet.IOError) { events(describe(e.Error)) }) // told before KeepConnected redials
	st.SetConnection(conn)
	st.KeepConnected(dial, 4*keepAlive)
	c := &client{name: name, stream: st, done: make(chan struct{})}
	go func() { // the read pump
		defer close(c.done)
		for p := range st.Incoming {
			var m message
			if json.Unmarshal(p.Data, &m) == nil {
				heard(m)
			}
		}
	}()
	return c, nil
}

// say queues a line for the room and returns it.
func (c *client) say(text string) message {
	c.lastID++
	m := message{From: c.name, ID: c.lastID, Text: text}
	data, _ := json.Marshal(m) // strings and an int always encode
	c.stream.Outgoing <- packet.New(1, data)
	return m
}

// leave closes the stream, which waits a moment for the last lines to be
// acknowledged and ends the session, and waits for the read pump.
func (c *client) leave() error {
	err := c.stream.Close()
	<-c.done
	return err
}

// describe tells a connection's failure in the chat's words.
func describe(err error) string {
	switch {
	case errors.Is(err, packet.ErrSessionLost):
		return "session lost (the server restarted): new session, unacknowledged lines go again"
	case errors.Is(err, os.ErrDeadlineExceeded):
		return "keep-alive found silence: dropping the connection, reconnecting"
	}
	return fmt.Sprintf("connection lost (%v), reconnecting", err)
}
