package main

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/aerogo/packet"
	"github.com/gorilla/websocket"
	"github.com/libp2p/go-msgio"
)

// endpoint is one end of a connection, used the way each library is meant to
// be used. Every workload is written once against it.
type endpoint interface {
	// send queues one message; flush makes sure queued messages go out.
	// data is never modified afterwards, so it may be shared.
	send(typ byte, data []byte) error
	flush() error
	// recv returns the next message. Its data is the caller's to keep
	// (except for the bare reference, which only ever compares timings).
	recv() (typ byte, data []byte, err error)
	close() error
}

// kind is one way of sending typed messages over TCP.
type kind struct {
	name string
	// serve wraps every connection accepted on l and sends it to out,
	// until the returned function is called.
	serve func(l net.Listener, out chan<- endpoint) (stop func())
	dial  func(addr string) (endpoint, error)
	// fixed means the kind only carries 16 byte payloads (the bare
	// reference), so only the ping-pong and idle workloads use it.
	fixed bool
	// releases means the receiver hands each message back to the library
	// once it has counted it, which only the throughput and allocation
	// workloads do; the others echo what they receive.
	releases bool
}

// releaser is an endpoint that can hand the message recv last returned
// back to its library for reuse.
type releaser interface {
	release()
}

// kinds lists what is compared. The baselines come first: ratios are taken
// to stdlib (to bare for ping-pong) and to floor.
var kinds = []kind{
	{name: "net.Conn", serve: acceptLoop(newBare), dial: dialWith(newBare), fixed: true},
	{name: "stdlib", serve: acceptLoop(newBuffered), dial: dialWith(newBuffered)},
	{name: "floor", serve: acceptLoop(newFloorEnd), dial: dialWith(newFloorEnd)},
	{name: "packet", serve: acceptLoop(newStream), dial: dialWith(newStream)},
	{name: "packet+Release", serve: acceptLoop(newReleasingStream), dial: dialWith(newReleasingStream), releases: true},
	{name: "go-msgio", serve: acceptLoop(newMsgio), dial: dialWith(newMsgio)},
	{name: "go-msgio+Release", serve: acceptLoop(newReleasingMsgio), dial: dialWith(newReleasingMsgio), releases: true},
	{name: "websocket", serve: serveWebsocket, dial: dialWebsocket},
}

// errShort means a message carried no type byte.
var errShort = errors.New("benchmarks: message without a type byte")

// maxSize is the payload limit every receiver is given: above the largest
// payload sent, as a real receiver would set one.
const maxSize = 8 << 20

// acceptLoop returns a serve function that wraps raw TCP connections.
func acceptLoop(wrap func(net.Conn) endpoint) func(net.Listener, chan<- endpoint) func() {
	return func(l net.Listener, out chan<- endpoint) func() {
		go func() {
			for {
				c, err := l.Accept()
				if err != nil {
					return
				}
				out <- wrap(c)
			}
		}()
		return func() { l.Close() }
	}
}

// dialWith returns a dial function that wraps a raw TCP connection.
func dialWith(wrap func(net.Conn) endpoint) func(string) (endpoint, error) {
	return func(addr string) (endpoint, error) {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			return nil, err
		}
		return wrap(c), nil
	}
}

// bare is the reference for round trips: one Write of the 25 byte frame
// (header and 16 byte payload) and one ReadFull of 25 bytes, no buffering,
// no allocation.
type bare struct {
	c   net.Conn
	out []byte
	in  [packet.HeaderSize + 16]byte
}

func newBare(c net.Conn) endpoint { return &bare{c: c} }

func (e *bare) send(typ byte, data []byte) error {
	e.out = binary.BigEndian.AppendUint64(append(e.out[:0], typ), uint64(len(data)))
	e.out = append(e.out, data...)
	_, err := e.c.Write(e.out)
	return err
}

func (e *bare) flush() error { return nil }

func (e *bare) recv() (byte, []byte, error) {
	_, err := io.ReadFull(e.c, e.in[:])
	return e.in[0], e.in[packet.HeaderSize:], err
}

func (e *bare) close() error { return e.c.Close() }

// buffered is the standard-library baseline of the same wire format: the
// format's limit. Header and payload go through a bufio.Writer that is only
// flushed when asked (or full), and are read through a bufio.Reader. Both
// hold 64 KiB, the block size the library reads and writes with while busy,
// so that neither side is held back by smaller system calls (the default
// 4 KiB halves the baseline's small-message throughput). Each received
// payload gets its own allocation, because a real receiver hands it off and
// cannot reuse the buffer.
type buffered struct {
	c      net.Conn
	r      *bufio.Reader
	w      *bufio.Writer
	header [packet.HeaderSize]byte // for send
	peek   [packet.HeaderSize]byte // for recv, which may run concurrently
}

// bufSize is the baseline's buffer size, each way.
const bufSize = 64 << 10

func newBuffered(c net.Conn) endpoint {
	return &buffered{c: c, r: bufio.NewReaderSize(c, bufSize), w: bufio.NewWriterSize(c, bufSize)}
}

func (e *buffered) send(typ byte, data []byte) error {
	e.header[0] = typ
	binary.BigEndian.PutUint64(e.header[1:], uint64(len(data)))
	e.w.Write(e.header[:])
	_, err := e.w.Write(data) // bufio.Writer errors are sticky
	return err
}

func (e *buffered) flush() error { return e.w.Flush() }

func (e *buffered) recv() (byte, []byte, error) {
	if _, err := io.ReadFull(e.r, e.peek[:]); err != nil {
		return 0, nil, err
	}
	n := int64(binary.BigEndian.Uint64(e.peek[1:]))
	if n < 0 || n > maxSize {
		return 0, nil, fmt.Errorf("benchmarks: bad length %d", n)
	}
	data := make([]byte, n)
	_, err := io.ReadFull(e.r, data)
	return e.peek[0], data, err
}

func (e *buffered) close() error { return e.c.Close() }

// stream is this library: a Stream with channels of 16 on each end.
type stream struct {
	s *packet.Stream

	mu  sync.Mutex
	err error // the first connection error reported
}

func newStream(c net.Conn) endpoint {
	e := &stream{s: packet.NewStream(16)}
	e.s.SetMaxSize(maxSize)
	e.s.OnError(func(ioe packet.IOError) {
		e.mu.Lock()
		if e.err == nil {
			e.err = ioe.Error
		}
		e.mu.Unlock()
	})
	e.s.SetConnection(c)
	return e
}

func (e *stream) send(typ byte, data []byte) error {
	e.s.Outgoing <- packet.New(typ, data)
	return nil
}

// flush does nothing: the stream's writer sends whatever is queued.
func (e *stream) flush() error { return nil }

func (e *stream) recv() (byte, []byte, error) {
	p, ok := <-e.s.Incoming
	if !ok {
		e.mu.Lock()
		defer e.mu.Unlock()
		if e.err != nil {
			return 0, nil, e.err
		}
		return 0, nil, io.EOF
	}
	return p.Type, p.Data, nil
}

func (e *stream) close() error { return e.s.Close() }

// releasingStream is stream with a receiver that calls Packet.Release on
// each packet once it has counted it.
type releasingStream struct {
	*stream
	last *packet.Packet
}

func newReleasingStream(c net.Conn) endpoint {
	return &releasingStream{stream: newStream(c).(*stream)}
}

func (e *releasingStream) recv() (byte, []byte, error) {
	p, ok := <-e.s.Incoming
	if !ok {
		return e.stream.recv()
	}
	e.last = p
	return p.Type, p.Data, nil
}

func (e *releasingStream) release() {
	e.last.Release()
	e.last = nil
}

// floorEnd is the design's floor (see floor.go), used as the library is:
// channels of 16 each way, a packet.New for every message sent.
type floorEnd struct {
	f *floor
}

func newFloorEnd(c net.Conn) endpoint { return floorEnd{newFloor(c, 16)} }

func (e floorEnd) send(typ byte, data []byte) error {
	e.f.Outgoing <- packet.New(typ, data)
	return nil
}

// flush does nothing: the floor's writer sends whatever is queued.
func (e floorEnd) flush() error { return nil }

func (e floorEnd) recv() (byte, []byte, error) {
	p, ok := <-e.f.Incoming
	if !ok {
		return 0, nil, io.EOF
	}
	return p.Type, p.Data, nil
}

func (e floorEnd) close() error { return e.f.Close() }

// framed carries the type as the first byte of each message, for the
// libraries that frame messages but have no type: the sender copies type and
// payload into one reused buffer, and the receiver splits the message it got.
type framed struct {
	buf []byte
}

func (f *framed) join(typ byte, data []byte) []byte {
	f.buf = append(append(f.buf[:0], typ), data...)
	return f.buf
}

func split(msg []byte, err error) (byte, []byte, error) {
	if err != nil {
		return 0, nil, err
	}
	if len(msg) == 0 {
		return 0, nil, errShort
	}
	return msg[0], msg[1:], nil
}

// msgioEnd is go-msgio used as its README shows: NewReader and NewWriter
// straight on the connection. The writer copies each message behind its
// length for one Write; the reader reads length and message with two reads.
// Received messages are not given back with ReleaseMsg, because the receiver
// hands them off.
type msgioEnd struct {
	framed
	c net.Conn
	r msgio.ReadCloser
	w msgio.WriteCloser
}

func newMsgio(c net.Conn) endpoint {
	return &msgioEnd{c: c, r: msgio.NewReaderSize(c, maxSize+1), w: msgio.NewWriter(c)}
}

func (e *msgioEnd) send(typ byte, data []byte) error { return e.w.WriteMsg(e.join(typ, data)) }
func (e *msgioEnd) flush() error                     { return nil }
func (e *msgioEnd) recv() (byte, []byte, error)      { return split(e.r.ReadMsg()) }
func (e *msgioEnd) close() error                     { return e.c.Close() }

// releasingMsgio is msgioEnd with a receiver that gives each message back
// with ReleaseMsg once it has counted it.
type releasingMsgio struct {
	*msgioEnd
	last []byte
}

func newReleasingMsgio(c net.Conn) endpoint {
	return &releasingMsgio{msgioEnd: newMsgio(c).(*msgioEnd)}
}

func (e *releasingMsgio) recv() (byte, []byte, error) {
	msg, err := e.r.ReadMsg()
	e.last = msg
	return split(msg, err)
}

func (e *releasingMsgio) release() {
	e.r.ReleaseMsg(e.last)
	e.last = nil
}

// wsEnd is gorilla/websocket with binary messages and default buffer sizes.
type wsEnd struct {
	framed
	c *websocket.Conn
}

func (e *wsEnd) send(typ byte, data []byte) error {
	return e.c.WriteMessage(websocket.BinaryMessage, e.join(typ, data))
}

func (e *wsEnd) flush() error { return nil }

func (e *wsEnd) recv() (byte, []byte, error) {
	_, msg, err := e.c.ReadMessage()
	return split(msg, err)
}

func (e *wsEnd) close() error { return e.c.Close() }

// serveWebsocket runs an http.Server on l that upgrades every request, as a
// websocket server would.
func serveWebsocket(l net.Listener, out chan<- endpoint) func() {
	up := websocket.Upgrader{}
	srv := &http.Server{
		ReadHeaderTimeout: 10 * time.Second,
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			c, err := up.Upgrade(w, r, nil)
			if err != nil {
				return
			}
			c.SetReadLimit(maxSize + 1)
			out <- &wsEnd{c: c}
		}),
	}
	go srv.Serve(l)
	return func() { srv.Close() }
}

// dialWebsocket connects with a Dialer that uses no proxy.
func dialWebsocket(addr string) (endpoint, error) {
	d := websocket.Dialer{HandshakeTimeout: 10 * time.Second}
	c, _, err := d.Dial("ws://"+addr+"/", nil)
	if err != nil {
		return nil, err
	}
	c.SetReadLimit(maxSize + 1)
	return &wsEnd{c: c}, nil
}
