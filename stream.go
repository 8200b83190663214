package packet

import (
	"fmt"
	"net"
	"runtime"
	"sync"
	"time"
)

// Stream sends and receives packets over a connection that can be replaced
// while it runs: when a connection drops, dial again and hand the new one to
// SetConnection; nothing queued on Outgoing is lost in between.
//
// Concurrency: Outgoing may be sent on from any number of goroutines, and
// every method is safe to call from any goroutine, including from inside an
// OnError callback. The stream owns both channels' other ends: it is the only
// receiver on Outgoing and the only sender on Incoming, and it closes Incoming
// (never Outgoing). Once a packet is sent on Outgoing the stream owns it too:
// do not modify the packet or its Data afterwards, since it may be written
// again after a failure.
//
// The stream promises:
//
//   - Order: packets go out in the order they were queued, and Incoming
//     delivers each connection's packets in the order they arrived.
//   - Nothing queued is dropped: packets queued before the first connection,
//     or while there is none, wait in Outgoing (a sender blocks once it is
//     full) and go out in order on the next one. When a write fails, every
//     packet of that write not completely written goes out first on the next
//     connection, whole, so a packet cut off part-way may reach the old peer
//     in part and the new one in full. TCP itself promises less: bytes the
//     kernel accepted on a connection that later dies are gone, so an
//     application that must not lose a packet acknowledges it.
//   - Hot swap: SetConnection retires the current connection (the stream
//     closes the connections it was given) and every later write goes to the
//     new one.
//   - One report per failure: when a connection fails, including a peer's
//     orderly close (reported as io.EOF), the stream closes it and calls
//     every OnError callback once, in registration order, with that
//     connection and the first error, however many goroutines met it.
//     Closing or swapping a connection is not reported.
//   - Hostile input: a payload over the limit (SetMaxSize) or a negative
//     length is reported as an error wrapping ErrTooLarge or
//     ErrNegativeLength, and the connection is dropped, since a byte stream
//     cannot find the next packet after a bad header.
//   - Bounded memory: a peer that stops reading makes senders on Outgoing
//     block once it is full.
//
// Over a datagram connection (UDP or unixgram, recognised by the network its
// LocalAddr reports) each datagram carries whole packets, several small ones
// packed together up to 1,400 bytes. A datagram that does not decode is
// reported and skipped without dropping the connection, and a packet larger
// than a datagram can carry (65,507 bytes with its header) is reported with
// ErrTooLarge and not sent. Datagrams may be lost or reordered as usual; a
// packet is never corrupted by that.
type Stream struct {
	// Incoming delivers the packets the stream reads. The stream closes it
	// when Close is called and no reader is left.
	Incoming <-chan *Packet

	// Outgoing takes the packets to send. Sending on it after Close is the
	// caller's error: such packets are never sent.
	Outgoing chan<- *Packet

	incoming chan *Packet
	outgoing chan *Packet
	closing  chan struct{} // closed when Close starts
	kick     chan struct{} // tells a waiting writer that a connection arrived

	mu       sync.Mutex
	idle     sync.Cond // signalled when busy drops
	link     *link     // the live connection, nil when there is none
	last     net.Conn  // the connection most recently given
	handlers []func(IOError)
	maxSize  int
	closed   bool
	readers  int   // reader goroutines that have not exited
	busy     int   // stream goroutines neither exited nor inside a callback
	writing  bool  // the writer has not exited
	detached bool  // Close returned before the writer finished
	closeErr error // what the writer's final flush left unsent

	// vec is the writer's reusable list of buffers for one writev.
	vec net.Buffers
}

// IOError is a failure on one of a stream's connections, as given to the
// OnError callbacks.
type IOError struct {
	Connection net.Conn
	Error      error
}

// link is one connection's life within a stream.
type link struct {
	conn     net.Conn
	datagram bool
	done     chan struct{} // closed when the link is retired
	retired  bool          // guarded by Stream.mu
}

// connReader is a buffered reader over one connection. An idle connection is
// read into a small array; a pooled block is taken only while data keeps
// coming and is given back when it runs empty, so an idle stream holds little
// memory.
type connReader struct {
	conn  net.Conn
	buf   []byte // unread bytes are buf[r:w]
	r, w  int
	err   error // from the last read, returned once buf is empty
	busy  bool  // the last read filled the small array, so more is likely waiting
	block *[]byte
	small [smallRead]byte
}

const (
	// CloseTimeout bounds how long Close waits to send what is queued.
	CloseTimeout = time.Second

	// maxBatch is how many bytes the writer gathers for one write at most.
	maxBatch = 4 * blockSize
	// datagramSize is the most a datagram carries when it packs several
	// packets: below the usual 1,500 byte Ethernet MTU with room for IP and
	// UDP headers, so packed datagrams are not fragmented.
	datagramSize = 1400
	// maxDatagram is the largest UDP payload over IPv4.
	maxDatagram = 65507
	// smallRead is the buffer an idle connection is read into; a reader
	// takes a pooled block only while data keeps arriving.
	smallRead = 512
	// directRead is the smallest read that bypasses the buffer when it is
	// empty.
	directRead = 4 << 10
)

// blockPool holds blockSize buffers for the streams' readers and writers,
// taken only while there is something to read or write.
var blockPool = sync.Pool{New: func() any { b := make([]byte, blockSize); return &b }}

// NewStream returns a stream without a connection whose Incoming and
// Outgoing channels hold channelBufferSize packets each.
func NewStream(channelBufferSize int) *Stream {
	s := &Stream{
		incoming: make(chan *Packet, channelBufferSize),
		outgoing: make(chan *Packet, channelBufferSize),
		closing:  make(chan struct{}),
		kick:     make(chan struct{}, 1),
		maxSize:  DefaultMaxSize,
		busy:     1,
		writing:  true,
	}
	s.idle.L = &s.mu
	s.Incoming, s.Outgoing = s.incoming, s.outgoing
	go s.writeLoop()
	return s
}

// SetConnection makes conn the stream's connection, retiring and closing the
// previous one. Queued packets go out on conn first. A nil conn retires the
// current connection and leaves the stream waiting for the next. After Close,
// SetConnection closes conn and does nothing else.
func (s *Stream) SetConnection(conn net.Conn) {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		if conn != nil {
			conn.Close()
		}
		return
	}
	old := s.link
	if old != nil && old.conn == conn {
		s.mu.Unlock()
		return
	}
	if old != nil {
		s.retire(old)
	}
	var l *link
	if conn != nil {
		l = &link{conn: conn, datagram: isDatagram(conn), done: make(chan struct{})}
		s.link, s.last = l, conn
		s.readers++
		s.busy++
	}
	maxSize := s.maxSize
	s.mu.Unlock()

	if old != nil {
		old.conn.Close()
	}
	if l != nil {
		go s.readLoop(l, maxSize)
		select {
		case s.kick <- struct{}{}:
		default:
		}
	}
}

// Connection returns the connection most recently given to SetConnection,
// which may have failed since; nil before the first.
func (s *Stream) Connection() net.Conn {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.last
}

// OnError registers a callback for connection failures. Callbacks run on the
// stream's goroutines, one failure at a time per goroutine; they may call
// SetConnection and Close. A stream with no callback drops its reports.
func (s *Stream) OnError(callback func(IOError)) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.handlers = append(s.handlers, callback)
}

// SetMaxSize sets the largest payload the stream accepts from a peer,
// DefaultMaxSize unless set. It applies to connections set after the call.
func (s *Stream) SetMaxSize(n int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.maxSize = n
}

// Close stops the stream. If a live connection exists, it first sends what
// is queued in Outgoing, waiting CloseTimeout at most; then it closes the
// connection and closes Incoming once no reader is left. Packets it could
// not send are counted in an error wrapping ErrUnsent.
//
// When Close returns, the stream's goroutines have exited, except one that
// is running the OnError callback Close was called from, which exits as soon
// as the callback returns. Close is safe to call before any connection and
// more than once; later calls return nil.
func (s *Stream) Close() error {
	s.mu.Lock()
	first := !s.closed
	if first {
		s.closed = true
		close(s.closing)
		if s.readers == 0 {
			close(s.incoming)
		}
	}
	s.mu.Unlock()

	// A writer stuck on a peer that does not read is cut off in time.
	timer := time.AfterFunc(CloseTimeout, s.abort)

	s.mu.Lock()
	defer s.mu.Unlock()
	for s.busy > 0 {
		s.idle.Wait()
	}
	if s.writing {
		// Called from a callback: the writer finishes after it returns,
		// within the timer, and reports what it could not send.
		s.detached = true
		return nil
	}
	timer.Stop()
	if !first {
		return nil
	}
	return s.closeErr
}

// writeLoop is the stream's one writer. It takes packets from Outgoing and
// writes them in batches, keeping those not yet completely written in
// pending until a connection takes them.
func (s *Stream) writeLoop() {
	var pending []*Packet
	for {
		l := s.liveLink()
		select {
		case <-s.closing:
			s.finish(l, pending)
			return
		default:
		}
		if l == nil {
			select {
			case <-s.kick:
			case <-s.closing:
			}
			continue
		}
		if pending = s.drain(pending); len(pending) == 0 {
			select {
			case p := <-s.outgoing:
				pending = s.drain(append(pending, p))
			case <-l.done:
				continue
			case <-s.closing:
				continue
			}
		}
		var err error
		if pending, err = s.send(l, pending); err != nil {
			s.fail(l, err)
		}
	}
}

// finish is the writer's last act: it sends what is queued on the live
// connection, if any, then retires it.
func (s *Stream) finish(l *link, pending []*Packet) {
	var err error
	if l != nil {
		for {
			if pending = s.drain(pending); len(pending) == 0 {
				break
			}
			if pending, err = s.send(l, pending); err != nil {
				break
			}
		}
	}
	if unsent := len(pending) + len(s.outgoing); unsent > 0 {
		if err != nil {
			err = fmt.Errorf("%w: %d: %w", ErrUnsent, unsent, err)
		} else {
			err = fmt.Errorf("%w: %d", ErrUnsent, unsent)
		}
	}

	s.mu.Lock()
	l = s.link
	if l != nil {
		s.retire(l)
	}
	s.closeErr = err
	s.writing = false
	late := s.detached && err != nil
	handlers := s.handlers
	s.mu.Unlock()
	if l != nil {
		l.conn.Close()
	}
	// Close returned before this flush ended (it was called from a
	// callback), so it could not return the error: report it instead.
	if late {
		s.call(handlers, IOError{Error: err})
	}
	s.exit()
}

// drain adds to pending what waits in Outgoing, as long as the batch stays
// within one write buffer and maxBatch bytes.
func (s *Stream) drain(pending []*Packet) []*Packet {
	copied, total := 0, 0
	for _, p := range pending {
		copied, total = batchSize(p, copied, total)
	}
	taken := 0
	for copied <= blockSize-HeaderSize-copyLimit && total < maxBatch {
		select {
		case p := <-s.outgoing:
			pending = append(pending, p)
			copied, total = batchSize(p, copied, total)
			taken++
		default:
			// Senders that found Outgoing full were woken by this drain but
			// wait for this processor. When at least half the channel came
			// in, let them refill it before writing: larger writes, fewer
			// system calls.
			if taken == 0 || taken < cap(s.outgoing)/2 {
				return pending
			}
			taken = 0
			runtime.Gosched()
		}
	}
	return pending
}

// batchSize adds p to a batch's count of copied and total bytes.
func batchSize(p *Packet, copied, total int) (int, int) {
	copied += HeaderSize
	if len(p.Data) <= copyLimit {
		copied += len(p.Data)
	}
	return copied, total + HeaderSize + len(p.Data)
}

// send writes pending to l and returns, in pending's array, the packets that
// were not completely written.
func (s *Stream) send(l *link, pending []*Packet) ([]*Packet, error) {
	bp := blockPool.Get().(*[]byte)
	defer blockPool.Put(bp)
	var done int
	var err error
	if l.datagram {
		pending = s.dropOversized(l, pending)
		done, err = sendDatagrams(l.conn, pending, (*bp)[:0])
	} else {
		done, err = s.sendStream(l.conn, pending, (*bp)[:0])
	}
	rest := copy(pending, pending[done:])
	clear(pending[rest:])
	return pending[:rest], err
}

// sendStream writes pending with one call: small payloads are copied next to
// their headers, large ones are written in place with writev. It returns how
// many packets were written completely.
func (s *Stream) sendStream(conn net.Conn, pending []*Packet, buf []byte) (int, error) {
	vec := s.vec[:0]
	start := 0
	for _, p := range pending {
		buf = appendHeader(buf, p.Type, len(p.Data))
		if len(p.Data) <= copyLimit {
			buf = append(buf, p.Data...)
			continue
		}
		vec = append(vec, buf[start:], p.Data)
		start = len(buf)
	}
	var n int64
	var err error
	if len(vec) == 0 {
		var m int
		m, err = conn.Write(buf)
		n = int64(m)
	} else {
		if start < len(buf) {
			vec = append(vec, buf[start:])
		}
		s.vec = vec
		n, err = s.vec.WriteTo(conn)
		clear(vec)
		s.vec = vec[:0]
	}
	if err == nil {
		return len(pending), nil
	}
	done := 0
	for _, p := range pending {
		if n < int64(HeaderSize+len(p.Data)) {
			break
		}
		n -= int64(HeaderSize + len(p.Data))
		done++
	}
	return done, err
}

// dropOversized reports and removes the packets too large for a datagram,
// keeping the others in order.
func (s *Stream) dropOversized(l *link, pending []*Packet) []*Packet {
	kept := pending[:0]
	for _, p := range pending {
		if size := HeaderSize + len(p.Data); size > maxDatagram {
			s.report(l, fmt.Errorf("%w: %d bytes do not fit in a datagram of %d", ErrTooLarge, size, maxDatagram))
			continue
		}
		kept = append(kept, p)
	}
	clear(pending[len(kept):])
	return kept
}

// sendDatagrams writes pending as datagrams, packing small packets together
// up to datagramSize; a larger packet goes alone. It returns how many packets
// were sent.
func sendDatagrams(conn net.Conn, pending []*Packet, buf []byte) (int, error) {
	first := 0 // the first packet in buf
	for i, p := range pending {
		if len(buf) > 0 && len(buf)+HeaderSize+len(p.Data) > datagramSize {
			if _, err := conn.Write(buf); err != nil {
				return first, err
			}
			buf, first = buf[:0], i
		}
		buf = appendHeader(buf, p.Type, len(p.Data))
		buf = append(buf, p.Data...)
	}
	if len(buf) > 0 {
		if _, err := conn.Write(buf); err != nil {
			return first, err
		}
	}
	return len(pending), nil
}

// readLoop is the reader of one connection. It runs until the connection
// fails or is closed, or the stream closes.
func (s *Stream) readLoop(l *link, maxSize int) {
	defer s.readerExit()
	if l.datagram {
		s.readDatagrams(l, maxSize)
		return
	}
	cr := &connReader{conn: l.conn}
	defer cr.release()
	d := NewDecoder(cr)
	d.SetMaxSize(maxSize)
	for {
		p, err := d.Decode()
		if err != nil {
			s.fail(l, err)
			return
		}
		if !s.deliver(p) {
			return
		}
		if cr.empty() {
			// The next read is likely to wait. Let the receiver just woken
			// run here first: otherwise another processor is woken to
			// steal it while this one makes the system call, and the
			// hand-over costs several microseconds.
			runtime.Gosched()
		}
	}
}

// readDatagrams reads whole datagrams and delivers their packets. A datagram
// that does not decode is reported and skipped.
func (s *Stream) readDatagrams(l *link, maxSize int) {
	// Larger than any datagram, so none is cut short unnoticed.
	buf := make([]byte, maxDatagram+1)
	d := NewDecoder(nil)
	d.SetMaxSize(maxSize)
	for {
		n, err := l.conn.Read(buf)
		if err != nil {
			s.fail(l, err)
			return
		}
		if err := d.decodeDatagram(buf[:n], s.deliver); err != nil {
			s.report(l, err)
		}
		select {
		case <-s.closing:
			return
		default:
		}
	}
}

// deliver sends p on Incoming unless the stream closes first.
func (s *Stream) deliver(p *Packet) bool {
	// Try the send alone first: a select over two channels locks both.
	select {
	case s.incoming <- p:
		return true
	default:
	}
	select {
	case s.incoming <- p:
		return true
	case <-s.closing:
		return false
	}
}

// liveLink returns the live connection, or nil.
func (s *Stream) liveLink() *link {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.link
}

// retire ends l's life in the stream; errors met on it afterwards are the
// stream's own doing and are not reported. The caller holds s.mu and closes
// l.conn after unlocking.
func (s *Stream) retire(l *link) {
	l.retired = true
	close(l.done)
	if s.link == l {
		s.link = nil
	}
}

// fail retires l after an I/O error and reports it, unless l was already
// retired or the stream is closing.
func (s *Stream) fail(l *link, err error) {
	s.mu.Lock()
	if l.retired || s.closed {
		s.mu.Unlock()
		return
	}
	s.retire(l)
	handlers := s.handlers
	s.mu.Unlock()
	l.conn.Close()
	s.call(handlers, IOError{Connection: l.conn, Error: err})
}

// report tells the callbacks of an error that leaves l in use.
func (s *Stream) report(l *link, err error) {
	s.mu.Lock()
	if l.retired || s.closed {
		s.mu.Unlock()
		return
	}
	handlers := s.handlers
	s.mu.Unlock()
	s.call(handlers, IOError{Connection: l.conn, Error: err})
}

// call runs the callbacks. While they run, this goroutine does not count as
// busy, so a callback can call Close without waiting for itself.
func (s *Stream) call(handlers []func(IOError), e IOError) {
	s.mu.Lock()
	s.busy--
	s.idle.Broadcast()
	s.mu.Unlock()
	for _, h := range handlers {
		h(e)
	}
	s.mu.Lock()
	s.busy++
	s.mu.Unlock()
}

// abort closes the live connection, cutting off a writer that Close waits
// for too long.
func (s *Stream) abort() {
	if l := s.liveLink(); l != nil {
		l.conn.Close()
	}
}

// exit marks the calling goroutine as gone.
func (s *Stream) exit() {
	s.mu.Lock()
	s.busy--
	s.idle.Broadcast()
	s.mu.Unlock()
}

// readerExit marks a reader as gone; the last reader after Close closes
// Incoming.
func (s *Stream) readerExit() {
	s.mu.Lock()
	s.readers--
	if s.closed && s.readers == 0 {
		close(s.incoming)
	}
	s.busy--
	s.idle.Broadcast()
	s.mu.Unlock()
}

// isDatagram tells whether conn keeps message boundaries.
func isDatagram(conn net.Conn) bool {
	addr := conn.LocalAddr()
	if addr == nil {
		return false
	}
	switch addr.Network() {
	case "udp", "udp4", "udp6", "unixgram":
		return true
	}
	return false
}

// Read reads from the buffer, refilling it from the connection when empty.
func (c *connReader) Read(p []byte) (int, error) {
	if c.r == c.w {
		if c.err != nil {
			err := c.err
			c.err = nil
			return 0, err
		}
		if len(p) >= directRead {
			// A large read goes straight to its destination: a buffer
			// would only add a copy.
			c.busy = true
			return c.conn.Read(p)
		}
		if err := c.fill(); err != nil {
			return 0, err
		}
	}
	n := copy(p, c.buf[c.r:c.w])
	c.r += n
	return n, nil
}

// fill reads into the buffer: a pooled block while busy, else the small
// array.
func (c *connReader) fill() error {
	if c.busy {
		if c.block == nil {
			c.block = blockPool.Get().(*[]byte)
		}
		c.buf = *c.block
	} else {
		c.release()
		c.buf = c.small[:]
	}
	n, err := c.conn.Read(c.buf)
	c.r, c.w = 0, n
	c.busy = n >= smallRead
	if n == 0 {
		return err
	}
	c.err = err
	return nil
}

// empty tells whether everything read has been consumed.
func (c *connReader) empty() bool {
	return c.r == c.w
}

// release gives the pooled block back. The reader must not be using it:
// decoded payloads are copies, so nothing refers to it afterwards.
func (c *connReader) release() {
	if c.block != nil {
		blockPool.Put(c.block)
		c.block = nil
	}
}
