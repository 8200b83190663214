package main

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	mrand "math/rand/v2"
	"net"
	"slices"
	"sync"
	"time"

	"github.com/aerogo/packet"
)

// Packet types of the chat protocol.
const (
	// typeJoin from a client is the first packet on each of its
	// connections: its name, its session and the first line it has not seen
	// acknowledged; the server answers with a typeAck. From the server it
	// announces a newcomer.
	typeJoin byte = iota + 1
	// typeSay from a client is one numbered line; from the server it is a
	// line and the name of the member who said it.
	typeSay
	// typeLeave from a client says goodbye; from the server it names who
	// left.
	typeLeave
	// typeAck goes from the server to a client: every line of the client's
	// session up to Seq is in the room.
	typeAck
)

const (
	// bufferSize is the size of every stream's Incoming and Outgoing
	// channels.
	bufferSize = 1024
	// maxPayload is the largest packet a stream accepts from its peer.
	maxPayload = 64 << 10
	// maxAhead is how far past a gap the server keeps a session's lines;
	// lines further ahead are dropped, and the client resends them after
	// its next reconnect.
	maxAhead = 4096
	// handshakeTimeout bounds a dial and the server's answer to the join.
	handshakeTimeout = 5 * time.Second
	// firstBackoff is the wait after the first failed redial; each failure
	// doubles it up to the client's maximum.
	firstBackoff = 50 * time.Millisecond
)

// message is the payload of every packet, as JSON. Each packet type uses
// some of the fields.
type message struct {
	Name    string `json:"name,omitempty"`
	Session string `json:"session,omitempty"`
	Seq     uint64 `json:"seq,omitempty"`
	Text    string `json:"text,omitempty"`
	Resent  bool   `json:"resent,omitempty"`
}

// server is a chat room. It takes each session's lines once and in the
// session's order, however often the client reconnects and resends, and
// relays them to the other members. Its memory of sessions dies with it.
type server struct {
	logf      func(format string, args ...any)
	delivered func(m message) // if set, sees each line the room takes, in order

	wg sync.WaitGroup

	mu      sync.Mutex
	ln      net.Listener
	stopped bool
	members map[*packet.Stream]*message   // every open stream; its join once it sent one
	next    map[string]uint64             // per session: the next line to deliver
	pending map[string]map[uint64]message // per session: lines that arrived past a gap
}

// client is one member of a chat room. It keeps its stream connected, and
// keeps every line it says until the server acknowledges it.
type client struct {
	name       string
	addr       string
	session    string
	maxBackoff time.Duration
	stream     *packet.Stream
	dead       chan packet.IOError              // the stream's failure reports, for the reconnect loop
	events     func(format string, args ...any) // news about the connection
	heard      func(typ byte, m message)        // what the room says

	cancel   context.CancelFunc
	loops    sync.WaitGroup // the reconnect loop and its resends
	received chan struct{}  // closed when Incoming is drained

	mu         sync.Mutex
	seq        uint64    // the last sequence number used
	unacked    []message // said but not acknowledged, oldest first
	offline    bool      // the stream reported its connection dead and has no other yet
	reconnects int
}

// newServer returns an empty room that logs with logf. delivered, if not
// nil, is called with each line the room takes.
func newServer(logf func(string, ...any), delivered func(message)) *server {
	return &server{
		logf:      logf,
		delivered: delivered,
		members:   make(map[*packet.Stream]*message),
		next:      make(map[string]uint64),
		pending:   make(map[string]map[uint64]message),
	}
}

// serve accepts connections on ln, in the background, until stop.
func (s *server) serve(ln net.Listener) {
	s.mu.Lock()
	s.ln = ln
	s.mu.Unlock()
	s.wg.Go(func() {
		for {
			conn, err := ln.Accept()
			if errors.Is(err, net.ErrClosed) {
				return
			}
			if err != nil {
				// Out of file descriptors, say: wait rather than spin.
				s.logf("accept: %v", err)
				time.Sleep(100 * time.Millisecond)
				continue
			}
			s.wg.Go(func() { s.handle(conn) })
		}
	})
}

// stop closes the listener and every connection, sending what is queued for
// each first, and waits for the room's goroutines to end.
func (s *server) stop() {
	s.mu.Lock()
	s.stopped = true
	if s.ln != nil {
		s.ln.Close()
	}
	for st := range s.members {
		s.wg.Go(func() { st.Close() })
	}
	s.mu.Unlock()
	s.wg.Wait()
}

// handle serves one connection until it fails, the client leaves or the
// server stops. A client that comes back does so on a new connection.
func (s *server) handle(conn net.Conn) {
	st := packet.NewStream(bufferSize)
	st.SetMaxSize(maxPayload)
	st.OnError(func(packet.IOError) { st.Close() })
	s.mu.Lock()
	if s.stopped {
		s.mu.Unlock()
		conn.Close()
		st.Close()
		return
	}
	s.members[st] = nil
	s.mu.Unlock()
	st.SetConnection(conn)

	var me *message
	for p := range st.Incoming {
		var m message
		if json.Unmarshal(p.Data, &m) != nil {
			break
		}
		if me == nil {
			if p.Type != typeJoin || m.Session == "" {
				break // a client introduces itself first
			}
			me = &message{Name: m.Name, Session: m.Session}
			s.join(st, me, m.Seq)
			continue
		}
		if p.Type == typeLeave {
			s.leave(st, me)
			break
		}
		if p.Type == typeSay {
			s.take(st, me, m)
		}
	}
	st.Close()
	s.mu.Lock()
	delete(s.members, st)
	s.mu.Unlock()
}

// join makes st a member. first is the client's oldest unacknowledged line:
// a server that does not know the session yet starts there.
func (s *server) join(st *packet.Stream, me *message, first uint64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	_, known := s.next[me.Session]
	s.members[st] = me
	if first > s.next[me.Session] {
		s.next[me.Session] = first
		for seq := range s.pending[me.Session] {
			if seq < first {
				delete(s.pending[me.Session], seq)
			}
		}
	}
	if known {
		s.logf("%s reconnected", me.Name)
	} else {
		s.logf("%s joined", me.Name)
		s.broadcast(typeJoin, message{Name: me.Name}, me.Session)
	}
	s.flush(st, me)
}

// take receives a line from me. A line past a gap waits for the gap to
// fill; a line the room has already is dropped. Either way the client hears
// how far the room has got. A stopping server takes no more lines: it could
// not acknowledge them, so the client would resend them to the next server,
// which would deliver them again.
func (s *server) take(st *packet.Stream, me *message, m message) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.stopped {
		return
	}
	next := s.next[me.Session]
	if m.Seq >= next && m.Seq < next+maxAhead {
		lines := s.pending[me.Session]
		if lines == nil {
			lines = make(map[uint64]message)
			s.pending[me.Session] = lines
		}
		if _, ok := lines[m.Seq]; !ok {
			lines[m.Seq] = m
		}
	}
	s.flush(st, me)
}

// leave ends me's membership and tells the others.
func (s *server) leave(st *packet.Stream, me *message) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.members[st] = nil
	delete(s.next, me.Session)
	delete(s.pending, me.Session)
	s.logf("%s left", me.Name)
	s.broadcast(typeLeave, message{Name: me.Name}, me.Session)
}

// flush delivers me's lines that are now in order, relays them, and
// acknowledges them on st. The caller holds s.mu.
func (s *server) flush(st *packet.Stream, me *message) {
	next, lines := s.next[me.Session], s.pending[me.Session]
	for m, ok := lines[next]; ok; m, ok = lines[next] {
		delete(lines, next)
		next++
		m.Name = me.Name
		if m.Resent {
			s.logf("%s: %s  (resent)", m.Name, m.Text)
		} else {
			s.logf("%s: %s", m.Name, m.Text)
		}
		if s.delivered != nil {
			s.delivered(m)
		}
		s.broadcast(typeSay, message{Name: m.Name, Text: m.Text}, me.Session)
	}
	s.next[me.Session] = next
	if next > 0 {
		s.send(st, typeAck, message{Seq: next - 1})
	}
}

// broadcast sends m to every member outside session from. The caller holds
// s.mu.
func (s *server) broadcast(typ byte, m message, from string) {
	for st, member := range s.members {
		if member != nil && member.Session != from {
			s.send(st, typ, m)
		}
	}
}

// send queues m on st without waiting. A member too far behind to take it
// is disconnected rather than allowed to stall the room: it reconnects and
// resends what it has not seen acknowledged. The caller holds s.mu.
func (s *server) send(st *packet.Stream, typ byte, m message) {
	select {
	case st.Outgoing <- packet.New(typ, encode(m)):
	default:
		s.wg.Go(func() { st.Close() })
	}
}

// memberCount returns how many clients are in the room.
func (s *server) memberCount() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for _, member := range s.members {
		if member != nil {
			n++
		}
	}
	return n
}

// connect dials addr once, so that a wrong address fails at once, and
// returns a client that from then on reconnects by itself, waiting at most
// maxBackoff between tries. events hears about the connection, heard about
// the room; both are called from the client's goroutines.
func connect(addr, name string, maxBackoff time.Duration, events func(string, ...any), heard func(byte, message)) (*client, error) {
	ctx, cancel := context.WithCancel(context.Background())
	c := &client{
		name:       name,
		addr:       addr,
		session:    rand.Text(),
		maxBackoff: maxBackoff,
		stream:     packet.NewStream(bufferSize),
		dead:       make(chan packet.IOError, 1),
		events:     events,
		heard:      heard,
		cancel:     cancel,
		received:   make(chan struct{}),
	}
	conn, err := c.dial(ctx)
	if err != nil {
		cancel()
		c.stream.Close()
		return nil, err
	}
	c.stream.SetMaxSize(maxPayload)
	c.stream.OnError(func(e packet.IOError) {
		select {
		case c.dead <- e:
		default: // the loop has a report to act on already
		}
	})
	c.stream.SetConnection(conn)
	go c.receive()
	c.loops.Go(func() { c.keepConnected(ctx) })
	return c, nil
}

// keepConnected is the reconnect loop. When the stream reports its
// connection dead, it redials and hands the new connection to the stream,
// which sends what queued up meanwhile. It returns when ctx is done.
func (c *client) keepConnected(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case e := <-c.dead:
			if e.Connection != c.stream.Connection() {
				continue // not about the current connection
			}
			c.mu.Lock()
			c.offline = true
			c.mu.Unlock()
			c.events("connection lost (%v); reconnecting", e.Error)
			conn, tries, err := c.redial(ctx)
			if err != nil {
				return
			}
			c.attach(ctx, conn)
			c.events("reconnected after %d tries", tries)
		}
	}
}

// redial dials until it succeeds or ctx is done, with capped exponential
// backoff between tries.
func (c *client) redial(ctx context.Context) (conn net.Conn, tries int, err error) {
	wait := firstBackoff
	for tries = 1; ; tries++ {
		if conn, err = c.dial(ctx); err == nil {
			return conn, tries, nil
		}
		// Jitter keeps clients that lost the same server from redialing
		// in step.
		select {
		case <-ctx.Done():
			return nil, tries, ctx.Err()
		case <-time.After(wait/2 + mrand.N(wait/2)):
		}
		wait = min(2*wait, c.maxBackoff)
	}
}

// dial connects to the server and introduces the client, before the stream
// takes the connection: the join goes ahead of the lines that queued up while
// the client was away, and the server's acknowledgement shows that a chat
// server answered.
func (c *client) dial(ctx context.Context) (net.Conn, error) {
	d := net.Dialer{Timeout: handshakeTimeout}
	conn, err := d.DialContext(ctx, "tcp", c.addr)
	if err != nil {
		return nil, err
	}
	if err := c.handshake(conn); err != nil {
		conn.Close()
		return nil, err
	}
	return conn, nil
}

// handshake sends the join and reads the reply. The decoder reads exactly
// one packet, so whatever follows is left for the stream.
func (c *client) handshake(conn net.Conn) error {
	c.mu.Lock()
	join := message{Name: c.name, Session: c.session, Seq: c.seq + 1}
	if len(c.unacked) > 0 {
		join.Seq = c.unacked[0].Seq
	}
	c.mu.Unlock()
	conn.SetDeadline(time.Now().Add(handshakeTimeout))
	if err := packet.New(typeJoin, encode(join)).Write(conn); err != nil {
		return err
	}
	dec := packet.NewDecoder(conn)
	dec.SetMaxSize(maxPayload)
	p, err := dec.Decode()
	if err != nil {
		return fmt.Errorf("no answer from a chat server: %w", err)
	}
	var ack message
	if p.Type != typeAck || json.Unmarshal(p.Data, &ack) != nil {
		return errors.New("the answer is not from a chat server")
	}
	c.acknowledge(ack.Seq)
	return conn.SetDeadline(time.Time{})
}

// attach gives conn to the stream, then queues again every line not yet
// acknowledged, since the dead connection may have swallowed some: bytes
// the kernel accepted on it are gone. The server drops the copies it has.
// The resends run on their own goroutine so that a full queue cannot hold up
// the next redial.
func (c *client) attach(ctx context.Context, conn net.Conn) {
	c.stream.SetConnection(conn)
	c.mu.Lock()
	c.offline = false
	c.reconnects++
	resend := slices.Clone(c.unacked)
	c.mu.Unlock()
	if len(resend) == 0 {
		return
	}
	c.loops.Go(func() {
		for _, m := range resend {
			m.Resent = true
			select {
			case c.stream.Outgoing <- packet.New(typeSay, encode(m)):
			case <-ctx.Done():
				return
			}
		}
	})
}

// say queues a line. It returns the line's number, and whether the client
// was offline from before the line was queued until after: such a line
// waits in the stream for the next connection.
func (c *client) say(text string) (seq uint64, offline bool) {
	c.mu.Lock()
	c.seq++
	m := message{Seq: c.seq, Text: text}
	c.unacked = append(c.unacked, m)
	before := c.offline
	c.mu.Unlock()
	c.stream.Outgoing <- packet.New(typeSay, encode(m))
	c.mu.Lock()
	defer c.mu.Unlock()
	return m.Seq, before && c.offline
}

// receive handles what the server sends until the stream closes.
func (c *client) receive() {
	defer close(c.received)
	for p := range c.stream.Incoming {
		var m message
		if json.Unmarshal(p.Data, &m) != nil {
			continue
		}
		if p.Type != typeAck {
			if c.heard != nil {
				c.heard(p.Type, m)
			}
			continue
		}
		c.acknowledge(m.Seq)
	}
}

// acknowledge forgets the lines up to seq: the room has them.
func (c *client) acknowledge(seq uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	acked := 0
	for acked < len(c.unacked) && c.unacked[acked].Seq <= seq {
		acked++
	}
	c.unacked = slices.Delete(c.unacked, 0, acked)
}

// leave stops reconnecting, says goodbye and closes the stream. The error
// is Close's: it wraps packet.ErrUnsent if the goodbye, or anything else,
// could not be sent.
func (c *client) leave() error {
	c.cancel()
	c.loops.Wait()
	select {
	case c.stream.Outgoing <- packet.New(typeLeave, encode(message{})):
	default:
	}
	err := c.stream.Close()
	<-c.received
	return err
}

// unackedLines returns how many lines the server has not acknowledged.
func (c *client) unackedLines() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.unacked)
}

// isOffline tells whether the client is waiting for a new connection.
func (c *client) isOffline() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.offline
}

// reconnectCount returns how many times the client reconnected.
func (c *client) reconnectCount() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.reconnects
}

// encode returns m as JSON; a message always encodes.
func encode(m message) []byte {
	b, _ := json.Marshal(m)
	return b
}
