package packet

import (
	"fmt"
	"net"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"time"
)

// Stream sends and receives packets over a connection that can be replaced
// while it runs: when a connection drops, dial again and hand the new one to
// SetConnection; nothing queued on Outgoing is lost in between.
//
// # Concurrency
//
// Outgoing may be sent on from any number of goroutines, and every method is
// safe to call from any goroutine. The stream is the only receiver on
// Outgoing and the only sender on Incoming; it closes Incoming after Close
// (never Outgoing). Once a packet is sent on Outgoing the stream owns it: do
// not modify the packet or its Data afterwards, since it may be written again
// after a failure. The stream owns the connections it is given and closes
// them.
//
// A stream runs one writer goroutine for its whole life and one reader
// goroutine per connection. OnError callbacks run on neither: they run one
// at a time, in registration order, on a goroutine of their own that exists
// only while there are reports to make. So a callback may take its time,
// call SetConnection or Close, and send on Outgoing, and the stream keeps
// reading and writing meanwhile.
//
// # Promises
//
//   - Order: packets go out in the order they were queued, and Incoming
//     delivers them in the order they arrived, across connections too: what
//     a swapped-away connection had already read is delivered before what the
//     next one reads.
//   - Nothing queued is dropped: packets queued before the first connection,
//     or while there is none, wait in Outgoing (a sender blocks once it is
//     full) and go out in order on the next one. When a write fails, every
//     packet of that write not completely written goes out first on the next
//     connection, whole, so a packet cut off part-way may reach the old peer
//     in part and the new one in full. TCP itself promises less: bytes the
//     kernel accepted on a connection that later dies are gone, unless both
//     ends are resumable (EnableResume and Sessions).
//   - Hot swap: SetConnection ends the current connection, closing it at once,
//     and every later write goes to the new one.
//   - One report per failure: when a connection fails, including a peer's
//     orderly close (reported as io.EOF), the stream closes it and calls
//     every OnError callback once with that connection and the first error,
//     however many goroutines met it. Ending a connection with SetConnection
//     or Close is not a failure and is not reported.
//   - Limits: a packet over the size limit (SetMaxSize), in either direction,
//     is reported with ErrTooLarge. One queued to send is skipped; one
//     arriving drops the connection, since a byte stream cannot find the next
//     packet after a bad header. So does a negative length that is not a
//     control frame (ErrNegativeLength).
//   - Bounded memory: a peer that stops reading makes senders on Outgoing
//     block once it is full.
//   - Liveness, when asked for: SetKeepAlive fails a connection on which
//     nothing arrived for a while, SetWriteTimeout one that does not take
//     what is written. Every stream answers a peer's pings.
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
	// once Close has stopped every reader.
	Incoming <-chan *Packet

	// Outgoing takes the packets to send. Sending on it after Close is the
	// caller's error: such a send blocks for ever once the channel is full,
	// and its packet is never sent.
	Outgoing chan<- *Packet

	incoming chan *Packet
	outgoing chan *Packet
	wake     chan struct{} // capacity 1: the writer has something to look at
	closing  chan struct{} // closed when Close starts
	closed   chan struct{} // closed when Close has finished

	writerDone chan struct{} // closed when the writer exits
	unsent     error         // what the writer could not send; set before writerDone closes

	// Settings the writer reads without the lock.
	maxSize      atomic.Int64
	writeTimeout atomic.Int64 // nanoseconds

	mu           sync.Mutex // guards the fields below
	conn         *conn      // the live connection, nil when there is none
	last         net.Conn   // the connection most recently given
	lastReader   chan struct{}
	backlog      []*Packet // read on ended connections, not yet delivered
	handlers     []func(IOError)
	reports      []IOError // waiting for the callbacks
	dispatching  bool      // a goroutine is running the callbacks
	isClosing    bool
	closeTimeout time.Duration
	pingEvery    time.Duration
	silenceLimit time.Duration
}

// IOError is a failure on one of a stream's connections, as given to the
// OnError callbacks.
type IOError struct {
	Connection net.Conn
	Error      error
}

// conn is one connection's life within a stream: from SetConnection until
// end, which the first of the reader, the writer, a timer, a swap and Close
// to get there calls.
type conn struct {
	net.Conn
	datagram bool
	ended    atomic.Bool   // set by end
	done     chan struct{} // closed by end
	due      atomic.Uint32 // control frames the writer is to send (dueFrame bits)
	arrived  atomic.Bool   // something was read since the last keep-alive tick

	// Guarded by Stream.mu.
	keepAlive *time.Timer
	silent    time.Duration // how long nothing has arrived, in whole ticks
}

// Bits of conn.due.
const (
	duePing = 1 << iota
	duePong
)

// writer is what only the writer goroutine touches: the packets taken from
// Outgoing and not yet completely written, and its batch.
type writer struct {
	s       *Stream
	pending []*Packet
	batch   batch
	timer   *time.Timer // write timeout, made on first use
	writing atomic.Pointer[conn]
	closing bool // finish has started
	refused int  // packets over the limit met by finish, which cannot report them
}

// reader is one connection's reader.
type reader struct {
	s *Stream
	c *conn
	// diverted is set once c has ended while a packet waited for Incoming:
	// from then on what c still yields goes to the stream's backlog, for the
	// next connection's reader to deliver.
	diverted bool
}

const (
	// DefaultCloseTimeout is how long Close waits to send what is queued
	// unless SetCloseTimeout says otherwise.
	DefaultCloseTimeout = time.Second

	// blockSize is the size of the pooled buffers a stream reads into and
	// encodes batches in.
	blockSize = 64 << 10
	// batchCopyLimit is how many bytes of headers and copied payloads a batch
	// may hold before a packet is added: room is left for one more copied
	// payload, so a batch never outgrows its block.
	batchCopyLimit = blockSize - HeaderSize - copyLimit
	// maxBatch is how many bytes the writer gathers for one write at most,
	// payloads written in place included.
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

// noReader stands for the reader before the first: it has exited.
var noReader = func() chan struct{} { c := make(chan struct{}); close(c); return c }()

// NewStream returns a stream without a connection whose Incoming and
// Outgoing channels hold channelBufferSize packets each. It panics if
// channelBufferSize is negative.
func NewStream(channelBufferSize int) *Stream {
	if channelBufferSize < 0 {
		panic(fmt.Sprintf("packet: NewStream(%d): negative channel buffer size", channelBufferSize))
	}
	s := &Stream{
		incoming:     make(chan *Packet, channelBufferSize),
		outgoing:     make(chan *Packet, channelBufferSize),
		wake:         make(chan struct{}, 1),
		closing:      make(chan struct{}),
		closed:       make(chan struct{}),
		writerDone:   make(chan struct{}),
		lastReader:   noReader,
		closeTimeout: DefaultCloseTimeout,
	}
	s.maxSize.Store(DefaultMaxSize)
	s.Incoming, s.Outgoing = s.incoming, s.outgoing
	go s.writeLoop()
	return s
}

// SetConnection makes conn the stream's connection, ending and closing the
// previous one without a report. Queued packets go out on conn first. After
// Close, SetConnection closes conn and does nothing else. It panics if conn
// is nil: a failed dial is not a connection.
func (s *Stream) SetConnection(nc net.Conn) {
	if nc == nil {
		panic("packet: SetConnection(nil)")
	}
	s.mu.Lock()
	if s.isClosing {
		s.mu.Unlock()
		nc.Close()
		return
	}
	old := s.conn
	if old != nil && old.Conn == nc {
		s.mu.Unlock()
		return
	}
	if old != nil {
		s.endLocked(old, nil)
	}
	c := &conn{Conn: nc, datagram: isDatagram(nc), done: make(chan struct{})}
	s.conn, s.last = c, nc
	s.startKeepAlive(c)
	prev, done := s.lastReader, make(chan struct{})
	s.lastReader = done
	s.mu.Unlock()

	if old != nil {
		s.closeConn(old)
	}
	go s.readLoop(c, prev, done)
	s.wakeWriter()
}

// Connection returns the connection most recently given to SetConnection,
// which may have failed since; nil before the first.
func (s *Stream) Connection() net.Conn {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.last
}

// OnError registers a callback for connection failures; see Stream for
// where and when callbacks run. After Close starts nothing is reported: Close
// returns what it could not send. It panics if callback is nil.
func (s *Stream) OnError(callback func(IOError)) {
	if callback == nil {
		panic("packet: OnError(nil)")
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.handlers = append(s.handlers, callback)
}

// SetMaxSize sets the largest payload the stream sends or accepts,
// DefaultMaxSize unless set. A packet over it is reported with ErrTooLarge:
// one queued to send is skipped, one arriving drops the connection. Reading
// uses the limit of the time the connection was set. It panics if n is
// negative.
//
// A peer with a lower limit drops the connection at the header of a packet
// over its limit, and the stream sends that packet again on the next
// connection: give both ends the same limit.
func (s *Stream) SetMaxSize(n int) {
	if n < 0 {
		panic(fmt.Sprintf("packet: SetMaxSize(%d): negative size", n))
	}
	s.maxSize.Store(int64(n))
}

// SetCloseTimeout sets how long Close waits to send what is queued,
// DefaultCloseTimeout unless set.
func (s *Stream) SetCloseTimeout(d time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.closeTimeout = d
}

// SetKeepAlive watches the connection for silence: when nothing has arrived
// for interval, the stream sends a ping, which every stream answers with a
// pong; when nothing at all has arrived for timeout, it fails the connection
// with an error for which errors.Is(err, os.ErrDeadlineExceeded) holds. Both
// are checked once per interval, so a dead peer is found between timeout and
// timeout+interval after the last thing it sent. 0 turns it off, the default.
// It applies to the live connection and to later ones.
//
// A peer running the original aerogo/packet cannot take a ping: turn
// keep-alive on only when both ends run this package.
func (s *Stream) SetKeepAlive(interval, timeout time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if interval <= 0 || timeout <= 0 {
		interval, timeout = 0, 0
	}
	s.pingEvery, s.silenceLimit = interval, timeout
	if s.conn != nil {
		s.startKeepAlive(s.conn)
	}
}

// SetWriteTimeout fails the connection when a write to it has not completed
// within d, with an error for which errors.Is(err, os.ErrDeadlineExceeded)
// holds; the packets not completely written go out on the next connection.
// 0 turns it off, the default. It applies to the live connection's next
// write and to later connections.
func (s *Stream) SetWriteTimeout(d time.Duration) {
	s.writeTimeout.Store(int64(max(d, 0)))
}

// Close stops the stream. If a live connection exists, it first sends what
// is queued in Outgoing, waiting at most the close timeout (SetCloseTimeout);
// then it closes the connection, stops the readers and closes Incoming.
// Senders blocked on a full Outgoing when Close runs are released. Packets it
// could not send, theirs included, are counted in an error wrapping
// ErrUnsent.
//
// When Close returns, the stream's reader and writer goroutines have exited.
// An OnError callback that was already running may still run (Close may be
// called from it); none starts afterwards. Close is safe to call before any
// connection, from a callback, and more than once; later calls wait for the
// first to finish and return nil.
func (s *Stream) Close() error {
	s.mu.Lock()
	if s.isClosing {
		s.mu.Unlock()
		<-s.closed
		return nil
	}
	s.isClosing = true
	close(s.closing)
	timeout := s.closeTimeout
	s.mu.Unlock()
	s.wakeWriter()

	// A writer stuck on a peer that does not read is cut off in time.
	abort := time.AfterFunc(timeout, func() {
		if c := s.liveConn(); c != nil {
			s.end(c, nil)
		}
	})
	<-s.writerDone // the writer ends the live connection, so readers stop
	abort.Stop()
	s.mu.Lock()
	last := s.lastReader
	s.backlog = nil
	s.mu.Unlock()
	<-last // each reader waits for the one before it
	close(s.incoming)
	close(s.closed)
	return s.unsent
}

// ---- The writer ----

// writeLoop is the stream's one writer. It serves one connection at a time
// and waits while there is none; when the stream closes, it flushes.
func (s *Stream) writeLoop() {
	defer close(s.writerDone)
	w := &writer{s: s}
	for {
		c := s.liveConn()
		if s.closingNow() {
			s.unsent = w.finish(c)
			return
		}
		if c == nil {
			<-s.wake // SetConnection and Close wake it
			continue
		}
		if err := w.serve(c); err != nil {
			s.end(c, err)
		}
	}
}

// serve writes to c until c ends or the stream closes, and returns the error
// that made a write fail.
func (w *writer) serve(c *conn) error {
	for {
		if len(w.pending) == 0 && c.due.Load() == 0 {
			// Try the receive alone first: a select over two channels
			// locks both.
			select {
			case p := <-w.s.outgoing:
				w.take(c, p)
			default:
				select {
				case p := <-w.s.outgoing:
					w.take(c, p)
				case <-w.s.wake:
				}
			}
		}
		if c.ended.Load() || w.s.closingNow() {
			return nil
		}
		w.drain(c)
		if len(w.pending) == 0 && c.due.Load() == 0 {
			continue
		}
		if err := w.send(c); err != nil {
			return err
		}
	}
}

// finish is the writer's last act: it sends what is queued on c, if any,
// until Close's timer ends c, ends c, and returns an error counting what it
// could not send.
func (w *writer) finish(c *conn) error {
	w.closing = true
	var err error
	if c != nil {
		for !c.ended.Load() {
			w.drain(c)
			if len(w.pending) == 0 {
				break
			}
			if err = w.send(c); err != nil {
				break
			}
		}
		w.s.end(c, nil)
	}
	// Count what is left, and release senders blocked on a full Outgoing:
	// each receive lets one of them through.
	unsent := len(w.pending) + w.refused
	for {
		select {
		case <-w.s.outgoing:
			unsent++
			continue
		default:
		}
		break
	}
	w.pending = nil
	switch {
	case unsent == 0:
		return nil
	case err != nil:
		return fmt.Errorf("%w: %d: %w", ErrUnsent, unsent, err)
	default:
		return fmt.Errorf("%w: %d", ErrUnsent, unsent)
	}
}

// take adds p to pending, unless it is over the limit for c: then it is
// reported and skipped.
func (w *writer) take(c *conn, p *Packet) {
	limit := int(w.s.maxSize.Load())
	if c.datagram {
		limit = min(limit, maxDatagram-HeaderSize)
	}
	if len(p.Data) > limit {
		if w.closing {
			w.refused++
			return
		}
		w.s.report(c, fmt.Errorf("%w: %d bytes not sent, limit %d", ErrTooLarge, len(p.Data), limit))
		return
	}
	w.pending = append(w.pending, p)
}

// drain adds to pending what waits in Outgoing, as long as the batch stays
// within one block and maxBatch bytes.
func (w *writer) drain(c *conn) {
	copied, total := 0, 0
	for _, p := range w.pending {
		copied, total = batchSize(p, copied, total)
	}
	taken := 0
	for copied <= batchCopyLimit && total < maxBatch {
		select {
		case p := <-w.s.outgoing:
			w.take(c, p)
			copied, total = batchSize(p, copied, total)
			taken++
		default:
			// Senders that found Outgoing full were woken by this drain but
			// wait for this processor. When at least half the channel came
			// in, let them refill it before writing: larger writes, fewer
			// system calls.
			if taken == 0 || taken < cap(w.s.outgoing)/2 {
				return
			}
			taken = 0
			runtime.Gosched()
		}
	}
}

// batchSize adds p to a batch's count of copied and total bytes.
func batchSize(p *Packet, copied, total int) (int, int) {
	copied += HeaderSize
	if len(p.Data) <= copyLimit {
		copied += len(p.Data)
	}
	return copied, total + HeaderSize + len(p.Data)
}

// send writes the control frames due and pending to c, and keeps in pending
// the packets that were not completely written.
func (w *writer) send(c *conn) error {
	bp := blockPool.Get().(*[]byte)
	defer blockPool.Put(bp)
	w.batch.buf = (*bp)[:0]
	var control int
	if due := c.due.Swap(0); due != 0 {
		if due&duePing != 0 {
			w.batch.buf = appendControl(w.batch.buf, framePing, 0)
		}
		if due&duePong != 0 {
			w.batch.buf = appendControl(w.batch.buf, framePong, 0)
		}
		control = len(w.batch.buf)
		w.batch.start = control
	}
	w.startWrite(c)
	var done int
	var err error
	if c.datagram {
		done, err = w.sendDatagrams(c)
	} else {
		done, err = w.sendStream(c, control)
	}
	w.stopWrite()
	w.batch.buf = nil // the block goes back to the pool
	rest := copy(w.pending, w.pending[done:])
	clear(w.pending[rest:])
	w.pending = w.pending[:rest]
	return err
}

// sendStream writes the batch with one call and returns how many pending
// packets were written completely.
func (w *writer) sendStream(c *conn, control int) (int, error) {
	for _, p := range w.pending {
		w.batch.add(p)
	}
	n, err := w.batch.writeTo(c)
	if err == nil {
		return len(w.pending), nil
	}
	n -= int64(control)
	done := 0
	for _, p := range w.pending {
		if n < int64(HeaderSize+len(p.Data)) {
			break
		}
		n -= int64(HeaderSize + len(p.Data))
		done++
	}
	return done, err
}

// sendDatagrams writes the batch's control frames and pending as datagrams,
// packing small packets together up to datagramSize; a larger packet goes
// alone. It returns how many packets were sent.
func (w *writer) sendDatagrams(c *conn) (int, error) {
	buf := w.batch.buf
	first := 0 // the first packet in buf
	for i, p := range w.pending {
		if len(buf) > 0 && len(buf)+HeaderSize+len(p.Data) > datagramSize {
			if _, err := c.Write(buf); err != nil {
				return first, err
			}
			buf, first = buf[:0], i
		}
		buf = appendHeader(buf, p.Type, len(p.Data))
		buf = append(buf, p.Data...)
	}
	w.batch.reset()
	if len(buf) > 0 {
		if _, err := c.Write(buf); err != nil {
			return first, err
		}
	}
	return len(w.pending), nil
}

// startWrite arms the write timeout, if one is set, for a write to c.
func (w *writer) startWrite(c *conn) {
	d := time.Duration(w.s.writeTimeout.Load())
	if d == 0 {
		return
	}
	w.writing.Store(c)
	if w.timer == nil {
		w.timer = time.AfterFunc(d, w.writeTimedOut)
		return
	}
	w.timer.Reset(d)
}

// stopWrite disarms the write timeout.
func (w *writer) stopWrite() {
	if w.timer != nil {
		w.timer.Stop()
		w.writing.Store(nil)
	}
}

// writeTimedOut fails the connection being written to when the write
// timeout fires.
func (w *writer) writeTimedOut() {
	if c := w.writing.Load(); c != nil {
		w.s.end(c, fmt.Errorf("packet: write not completed within %v: %w",
			time.Duration(w.s.writeTimeout.Load()), os.ErrDeadlineExceeded))
	}
}

// ---- The reader ----

// readLoop is the reader of one connection. It waits for the previous
// connection's reader to exit, so that packets are delivered in the order
// they arrived, then delivers the backlog and reads until the connection
// ends or the stream closes.
func (s *Stream) readLoop(c *conn, prev <-chan struct{}, done chan<- struct{}) {
	defer close(done)
	<-prev
	r := &reader{s: s, c: c}
	if !r.deliverBacklog() {
		return
	}
	var err error
	if c.datagram {
		err = r.readDatagrams()
	} else {
		err = r.readStream()
	}
	s.end(c, err)
}

// readStream decodes packets from a byte stream until an error.
func (r *reader) readStream() error {
	cr := &connReader{c: r.c}
	defer cr.release()
	d := NewDecoder(cr)
	d.SetMaxSize(int(r.s.maxSize.Load()))
	for {
		p, f, err := d.next(true)
		if err != nil {
			return err
		}
		if p == nil {
			r.control(f)
			continue
		}
		if !r.deliver(p) {
			return nil
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
func (r *reader) readDatagrams() error {
	// Larger than any datagram, so none is cut short unnoticed.
	buf := make([]byte, maxDatagram+1)
	d := NewDecoder(nil)
	d.SetMaxSize(int(r.s.maxSize.Load()))
	for {
		n, err := r.c.Read(buf)
		if err != nil {
			return err
		}
		r.c.arrived.Store(true)
		if err := d.decodeDatagram(buf[:n], r.deliver, r.control); err != nil {
			r.s.report(r.c, err)
		}
		if r.s.closingNow() {
			return nil
		}
	}
}

// control acts on a control frame from the peer.
func (r *reader) control(f controlFrame) {
	switch f.kind {
	case framePing:
		r.c.due.Or(duePong)
		r.s.wakeWriter()
	case framePong:
		// Its arrival is what counts, and that is noted on every read.
	}
}

// deliver sends p on Incoming, or to the backlog once the connection has
// ended while p waited. It returns false when the stream closes.
func (r *reader) deliver(p *Packet) bool {
	s := r.s
	if !r.diverted {
		// Try the send alone first: a select over several channels locks
		// them all.
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
		case <-r.c.done:
			r.diverted = true
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.isClosing {
		return false
	}
	s.backlog = append(s.backlog, p)
	return true
}

// deliverBacklog delivers what earlier connections read and could not
// deliver. It returns false when the stream closes.
func (r *reader) deliverBacklog() bool {
	r.s.mu.Lock()
	backlog := r.s.backlog
	r.s.backlog = nil
	r.s.mu.Unlock()
	for i, p := range backlog {
		backlog[i] = nil
		if !r.deliver(p) {
			return false
		}
	}
	return true
}

// ---- Connection lifecycle ----

// end ends c's life in the stream; the first call wins. A non-nil err is a
// failure and is reported, unless the stream is closing; a nil err is the
// stream's own doing (a swap, Close) and is not.
func (s *Stream) end(c *conn, err error) {
	s.mu.Lock()
	ended := s.endLocked(c, err)
	s.mu.Unlock()
	if ended {
		s.closeConn(c)
	}
}

// endLocked is end for a caller that holds s.mu; it returns whether this
// call ended c, and then the caller must call closeConn after unlocking.
func (s *Stream) endLocked(c *conn, err error) bool {
	if c.ended.Swap(true) {
		return false
	}
	close(c.done)
	if s.conn == c {
		s.conn = nil
	}
	if c.keepAlive != nil {
		c.keepAlive.Stop()
	}
	if err != nil {
		s.reportLocked(IOError{Connection: c.Conn, Error: err})
	}
	return true
}

// closeConn closes an ended connection and tells the writer.
func (s *Stream) closeConn(c *conn) {
	c.Close()
	s.wakeWriter()
}

// report tells the callbacks of an error that leaves c in use.
func (s *Stream) report(c *conn, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !c.ended.Load() {
		s.reportLocked(IOError{Connection: c.Conn, Error: err})
	}
}

// reportLocked queues a report for the callbacks and starts a goroutine to
// run them if none runs. Nothing is reported once Close has started.
func (s *Stream) reportLocked(e IOError) {
	if s.isClosing || len(s.handlers) == 0 {
		return
	}
	s.reports = append(s.reports, e)
	if !s.dispatching {
		s.dispatching = true
		go s.dispatch()
	}
}

// dispatch runs the callbacks for each queued report, in order, outside the
// lock, until none is left or the stream closes.
func (s *Stream) dispatch() {
	s.mu.Lock()
	for len(s.reports) > 0 && !s.isClosing {
		e, handlers := s.reports[0], s.handlers
		s.reports = s.reports[1:]
		s.mu.Unlock()
		for _, h := range handlers {
			h(e)
		}
		s.mu.Lock()
	}
	s.reports = nil
	s.dispatching = false
	s.mu.Unlock()
}

// startKeepAlive starts or stops c's keep-alive timer to match the stream's
// setting. The caller holds s.mu.
func (s *Stream) startKeepAlive(c *conn) {
	if c.keepAlive != nil {
		c.keepAlive.Stop()
		c.keepAlive = nil
	}
	c.silent = 0
	if s.pingEvery > 0 {
		c.keepAlive = time.AfterFunc(s.pingEvery, func() { s.keepAliveTick(c) })
	}
}

// keepAliveTick runs once per keep-alive interval: it pings a connection
// that was silent for the interval and fails one that was silent for the
// timeout.
func (s *Stream) keepAliveTick(c *conn) {
	s.mu.Lock()
	if c.ended.Load() || c.keepAlive == nil {
		s.mu.Unlock()
		return
	}
	if c.arrived.Swap(false) {
		c.silent = 0
	} else {
		c.silent += s.pingEvery
	}
	if c.silent >= s.silenceLimit {
		err := fmt.Errorf("packet: nothing arrived for %v: %w", c.silent, os.ErrDeadlineExceeded)
		ended := s.endLocked(c, err)
		s.mu.Unlock()
		if ended {
			s.closeConn(c)
		}
		return
	}
	ping := c.silent > 0
	if ping {
		c.due.Or(duePing)
	}
	c.keepAlive.Reset(s.pingEvery)
	s.mu.Unlock()
	if ping {
		s.wakeWriter()
	}
}

// liveConn returns the live connection, or nil.
func (s *Stream) liveConn() *conn {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.conn
}

// closingNow tells whether Close has started.
func (s *Stream) closingNow() bool {
	select {
	case <-s.closing:
		return true
	default:
		return false
	}
}

// wakeWriter makes the writer look at the stream's state again.
func (s *Stream) wakeWriter() {
	select {
	case s.wake <- struct{}{}:
	default:
	}
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

// ---- connReader ----

// connReader is a buffered reader over one connection. An idle connection is
// read into a small array; a pooled block is taken only while data keeps
// coming and is given back when it runs empty, so an idle stream holds little
// memory. Every read notes that something arrived, for keep-alive.
type connReader struct {
	c     *conn
	buf   []byte // unread bytes are buf[r:w]
	r, w  int
	err   error // from the last read, returned once buf is empty
	full  bool  // the last read filled the small array, so more is likely waiting
	block *[]byte
	small [smallRead]byte
}

// Read reads from the buffer, refilling it from the connection when empty.
func (cr *connReader) Read(p []byte) (int, error) {
	if cr.r == cr.w {
		if cr.err != nil {
			err := cr.err
			cr.err = nil
			return 0, err
		}
		if len(p) >= directRead {
			// A large read goes straight to its destination: a buffer
			// would only add a copy.
			cr.full = true
			n, err := cr.c.Read(p)
			cr.c.arrived.Store(true)
			return n, err
		}
		if err := cr.fill(); err != nil {
			return 0, err
		}
	}
	n := copy(p, cr.buf[cr.r:cr.w])
	cr.r += n
	return n, nil
}

// fill reads into the buffer: a pooled block while data keeps coming, else
// the small array.
func (cr *connReader) fill() error {
	if cr.full {
		if cr.block == nil {
			cr.block = blockPool.Get().(*[]byte)
		}
		cr.buf = *cr.block
	} else {
		cr.release()
		cr.buf = cr.small[:]
	}
	n, err := cr.c.Read(cr.buf)
	cr.c.arrived.Store(true)
	cr.r, cr.w = 0, n
	cr.full = n >= smallRead
	if n == 0 {
		return err
	}
	cr.err = err
	return nil
}

// empty tells whether everything read has been consumed.
func (cr *connReader) empty() bool {
	return cr.r == cr.w
}

// release gives the pooled block back. The reader must not be using it:
// decoded payloads are copies, so nothing refers to it afterwards.
func (cr *connReader) release() {
	if cr.block != nil {
		blockPool.Put(cr.block)
		cr.block = nil
	}
}
