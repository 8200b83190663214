package packet

import (
	"bytes"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"math"
	mrand "math/rand/v2"
	"net"
	"os"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// The life of a stream, for those who work on it.
//
// Goroutines, each started in one place and ended by one thing:
//   - the writer (writeLoop): started by NewStream; exits once Close has
//     started and it has flushed (finish), closing writerDone.
//   - one reader per connection (readLoop): started by setConnection; first
//     waits for the previous connection's reader to exit, so readers never
//     overlap, then reads until its connection ends; closes its done
//     channel (lastReader is the newest one's).
//   - the callbacks (callbacks.run): started by the first report queued
//     while none runs; exits when the queue is empty.
//   - the reconnect loop (redialLoop): started by KeepConnected, or by a
//     failure, while the stream has no connection; exits once one is set
//     or Close starts (a dial under way finishes first).
//   - endSession: started by a reader that read the peer's bye; closes the
//     stream and makes the last report.
//   - Sessions.Close closes its streams on a goroutine each and waits; a
//     session that cannot resume (a hello's count out of range) is closed on
//     a goroutine of its own, so that Accept does not wait for it.
//
// Timers (time.AfterFunc), none running on a plain idle stream:
//   - keep-alive (keepAliveTick), per connection while SetKeepAlive is on:
//     pings, and ends a silent connection.
//   - write timeout (writeTimedOut), armed for each write while
//     SetWriteTimeout is on: ends the connection being written.
//   - Close's abort timer: ends the live connection after the close timeout.
//   - a session's acknowledgement timer (ackNow) and, on the accepting
//     side, its expiry, which calls Close.
//
// Ending a connection: end(c, err) is the one way, and the first call wins
// (c.ended); it closes c.done, stops c's keep-alive, reports err if it is
// not nil (a failure; a swap or Close passes nil) and starts the reconnect
// loop if one is kept. The reader, the writer, the timers, a swap and Close
// may all call it.
//
// Close: marks the start (closes closing, under mu, so no connection can be
// set after it), stops the callbacks, wakes the writer, which flushes and
// ends the live connection; the abort timer cuts a stuck flush short. Then
// it waits for writerDone and for the newest reader, which waited for all
// before it, and closes Incoming.
//
// Locks: Sessions.mu is taken before Stream.mu, and Stream.mu before
// callbacks.mu; none is held while user code (a callback, a dial) runs or
// while a goroutine waits on a channel.

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
// after a failure. The stream only reads a sent packet, so one packet may be
// sent to any number of streams at once: that is how a server broadcasts. A
// nil packet is reported with ErrNilPacket and skipped. A packet received from Incoming is the receiver's, who
// may hand it back with Packet.Release when done with it. The stream owns
// the connections it is given and closes them.
//
// A stream runs one writer goroutine from NewStream until Close, so close
// every stream you make, and one reader goroutine per connection. OnError callbacks run on neither: they run one
// at a time, in registration order, on a goroutine of their own that exists
// only while there are reports to make. So a callback may take its time,
// call SetConnection or Close, and send on Outgoing, and the stream keeps
// reading and writing meanwhile. Nothing is reported once Close has started,
// with one exception: when the peer of a resumable stream ends the session,
// the stream closes itself and, if it had packets unsent, calls the
// callbacks once more with an error wrapping ErrSessionEnded.
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
//   - Exactly once, when both ends are resumable (EnableResume on the
//     dialing side, Sessions on the accepting side): every packet sent on
//     Outgoing reaches the peer's Incoming once and in order, across any
//     number of connections, for as long as the session lives. A packet is
//     acknowledged, and forgotten by its sender, only once the peer's
//     application has taken it from Incoming. So when the peer's process
//     dies, what its application had not taken is sent again to its
//     successor, which starts a new session (ErrSessionLost) and may
//     receive again a few the old one had taken; what the application had
//     taken and not finished with is the application's to keep safe.
//   - Exact accounts at the end of a session: when either side closes it,
//     every packet sent in it was delivered to the peer's Incoming or is
//     counted unsent by its sender (Close's ErrUnsent, or ErrSessionEnded
//     when the peer ended it), never both, never neither. What is in
//     Incoming when it closes is delivered: read it to the end.
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
	// and its packet is never sent. So is closing it: the stream sends what
	// was queued and takes nothing more.
	Outgoing chan<- *Packet

	incoming  chan *Packet  // sent on by the readers, closed by Close
	outgoing  chan *Packet  // received from by the writer only
	callbacks callbacks     // has its own lock
	wake      chan struct{} // capacity 1: the writer has something to look at
	closing   chan struct{} // closed, under mu, when Close starts

	writerDone chan struct{} // closed when the writer exits
	unsent     error         // what the writer could not send; set before writerDone closes

	// Settings the writer reads without the lock.
	maxSize      atomic.Int64
	writeTimeout atomic.Int64 // nanoseconds
	replayLimit  atomic.Int64

	// session is nil unless the stream is resumable. It is set under mu
	// before the first connection (EnableResume, Sessions), and the loops
	// read it only once they serve a connection, so without the lock.
	session *session

	mu               sync.Mutex    // guards the fields below
	conn             *conn         // the live connection, nil when there is none
	last             net.Conn      // the connection most recently given
	lastReader       chan struct{} // closed when the newest reader exits; each waits for the one before
	backlog          []*Packet     // read on ended connections, not yet delivered
	redial           *redialer     // set by KeepConnected
	closeTimeout     time.Duration
	handshakeTimeout time.Duration
	pingEvery        time.Duration
	silenceLimit     time.Duration
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
	datagram bool          // set before the loops start
	peerMax  int           // the largest payload c carries; set before the writer serves c
	ended    atomic.Bool   // set by end
	done     chan struct{} // closed by end
	due      atomic.Uint32 // control frames the writer is to send (due bits); set by anyone, taken by the writer
	arrived  atomic.Bool   // set by the reader on every read, taken by the keep-alive tick

	// Guarded by Stream.mu.
	keepAlive *time.Timer
	silent    time.Duration // how long nothing has arrived, in whole ticks

	// resume is set on a resumable stream's connections only; see
	// resumePoint for who writes what.
	resume *resumePoint
}

// Bits of conn.due.
const (
	duePing = 1 << iota
	duePong
	dueAck
)

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
	smallRead = 256
	// directRead is the smallest read that bypasses the buffer when it is
	// empty.
	directRead = 4 << 10
)

// blockPool holds blockSize buffers for the streams' readers and writers,
// taken only while there is something to read or write.
var blockPool = sync.Pool{New: func() any { b := make([]byte, blockSize); return &b }}

// noReader stands for the reader before the first: it has exited.
var noReader = func() chan struct{} { c := make(chan struct{}); close(c); return c }()

// ---- The stream ----

// NewStream returns a stream without a connection whose Incoming and
// Outgoing channels hold channelBufferSize packets each. It panics if
// channelBufferSize is negative.
func NewStream(channelBufferSize int) *Stream {
	if channelBufferSize < 0 {
		panic(fmt.Errorf("packet: NewStream(%d): negative channel buffer size", channelBufferSize))
	}
	s := &Stream{
		incoming:         make(chan *Packet, channelBufferSize),
		outgoing:         make(chan *Packet, channelBufferSize),
		wake:             make(chan struct{}, 1),
		closing:          make(chan struct{}),
		writerDone:       make(chan struct{}),
		lastReader:       noReader,
		closeTimeout:     DefaultCloseTimeout,
		handshakeTimeout: DefaultHandshakeTimeout,
	}
	s.maxSize.Store(DefaultMaxSize)
	s.replayLimit.Store(DefaultReplayLimit)
	s.Incoming, s.Outgoing = s.incoming, s.outgoing
	go s.writeLoop()
	return s
}

// SetConnection makes nc the stream's connection, ending and closing the
// previous one without a report. Queued packets go out on nc first. After
// Close, SetConnection closes nc and does nothing else. It panics if nc is
// nil: a failed dial is not a connection.
func (s *Stream) SetConnection(nc net.Conn) {
	if nc == nil {
		panic(errors.New("packet: SetConnection(nil): nil connection"))
	}
	s.setConnection(nc, nil)
}

// setConnection is SetConnection with the handshake state of a connection
// that Sessions.Accept has begun; nil otherwise.
func (s *Stream) setConnection(nc net.Conn, rp *resumePoint) {
	s.mu.Lock()
	if s.closeStarted() {
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
	c := &conn{Conn: nc, datagram: isDatagram(nc), peerMax: math.MaxInt, done: make(chan struct{})}
	if c.datagram {
		c.peerMax = maxDatagram - HeaderSize
	}
	if s.session != nil {
		c.resume = rp
		if rp == nil {
			c.resume = &resumePoint{}
		}
		s.session.up()
	}
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
		panic(errors.New("packet: OnError(nil): nil callback"))
	}
	s.callbacks.add(callback)
}

// SetMaxSize sets the largest payload the stream sends or accepts,
// DefaultMaxSize unless set. A packet over it is reported with ErrTooLarge:
// one queued to send is skipped, one arriving drops the connection. Reading
// uses the limit of the time the connection was set. It panics if n is
// negative.
//
// Resumable peers tell each other their limit when each connection starts,
// and a packet over the peer's is refused and reported the same way. A
// plain peer with a lower limit drops the connection at the header of a
// packet over it, and the stream sends that packet again on the next
// connection: give plain ends the same limit.
func (s *Stream) SetMaxSize(n int) {
	if n < 0 {
		panic(fmt.Errorf("packet: SetMaxSize(%d): negative size", n))
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
// is queued in Outgoing, waiting at most the close timeout (SetCloseTimeout)
// and first for a resumable connection's handshake under way; then it
// closes the connection, stops the readers and closes Incoming. On a
// resumable stream it ends the session: it tells the peer how many packets
// it delivered, and learns how many of its own the peer delivered.
// Senders blocked on a full Outgoing when Close runs are released. Packets it
// could not send, theirs included, are counted in an error wrapping
// ErrUnsent.
//
// When Close returns, the stream's reader and writer goroutines have exited.
// An OnError callback that was already running may still run (Close may be
// called from it); none starts afterwards. Close is safe to call before any
// connection, from a callback, and more than once; later calls wait for the
// stream's goroutines to stop and return nil.
func (s *Stream) Close() error {
	s.mu.Lock()
	if s.closeStarted() {
		last := s.lastReader
		s.mu.Unlock()
		<-s.writerDone
		<-last
		return nil
	}
	close(s.closing)
	s.callbacks.stop()
	timeout := s.closeTimeout
	s.mu.Unlock()
	s.wakeWriter()

	// A writer stuck on a peer that does not read is cut off in time.
	aborted := make(chan struct{})
	abort := time.AfterFunc(timeout, func() {
		defer close(aborted)
		if c := s.liveConn(); c != nil {
			s.end(c, nil)
		}
	})
	<-s.writerDone // the writer ends the live connection, so readers stop
	if !abort.Stop() {
		<-aborted
	}
	s.mu.Lock()
	last := s.lastReader
	s.backlog = nil
	s.mu.Unlock()
	<-last // each reader waits for the one before it
	close(s.incoming)
	s.mu.Lock()
	sess := s.session
	s.mu.Unlock()
	if sess != nil {
		sess.closed()
	}
	return s.unsent
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
	if s.session != nil && s.conn == nil {
		s.session.down() // before the report, which a callback may act on at once
	}
	if err != nil {
		s.callbacks.report(IOError{Connection: c.Conn, Error: err})
		s.redialLocked()
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
		s.callbacks.report(IOError{Connection: c.Conn, Error: err})
	}
}

// callbacks runs a stream's OnError callbacks: reports are queued and run
// one at a time, in the order made, each through every callback in
// registration order, on a goroutine that exists only while reports wait.
// So callbacks never overlap, and never run under a lock of the stream's.
// Its mu is taken after Stream.mu, never before.
type callbacks struct {
	mu       sync.Mutex
	handlers []func(IOError)
	queue    []IOError
	running  bool // a goroutine runs the queue
	stopped  bool // Close has started: only last queues
}

// add registers a callback.
func (cb *callbacks) add(h func(IOError)) {
	cb.mu.Lock()
	defer cb.mu.Unlock()
	cb.handlers = append(cb.handlers, h)
}

// report queues e, unless Close has started.
func (cb *callbacks) report(e IOError) {
	cb.mu.Lock()
	defer cb.mu.Unlock()
	if !cb.stopped {
		cb.queueLocked(e)
	}
}

// stop drops the reports waiting and refuses later ones; a callback
// already running goes on.
func (cb *callbacks) stop() {
	cb.mu.Lock()
	defer cb.mu.Unlock()
	cb.stopped, cb.queue = true, nil
}

// last queues a report after stop: a stream that closed itself tells what
// it could not send. It runs after any callback still running.
func (cb *callbacks) last(e IOError) {
	cb.mu.Lock()
	defer cb.mu.Unlock()
	cb.queueLocked(e)
}

// queueLocked queues e and starts the goroutine that runs the queue, if
// none runs.
func (cb *callbacks) queueLocked(e IOError) {
	if len(cb.handlers) == 0 {
		return
	}
	cb.queue = append(cb.queue, e)
	if !cb.running {
		cb.running = true
		go cb.run()
	}
}

// run runs the queued reports, outside the lock, until none is left.
func (cb *callbacks) run() {
	cb.mu.Lock()
	defer cb.mu.Unlock()
	for len(cb.queue) > 0 {
		e, handlers := cb.queue[0], cb.handlers
		cb.queue = cb.queue[1:]
		cb.mu.Unlock()
		for _, h := range handlers {
			h(e)
		}
		cb.mu.Lock()
	}
	cb.queue, cb.running = nil, false
}

// liveConn returns the live connection, or nil.
func (s *Stream) liveConn() *conn {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.conn
}

// closeStarted tells whether Close has started.
func (s *Stream) closeStarted() bool {
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

// isDatagram tells whether nc keeps message boundaries.
func isDatagram(nc net.Conn) bool {
	addr := nc.LocalAddr()
	if addr == nil {
		return false
	}
	switch addr.Network() {
	case "udp", "udp4", "udp6", "unixgram":
		return true
	}
	return false
}

// ---- The writer ----

// writer is what only the writer goroutine touches: the packets taken from
// Outgoing and not yet completely written, and its batch.
type writer struct {
	s         *Stream
	in        <-chan *Packet // Outgoing; nil once the caller closed it
	pending   []*Packet
	batch     batch
	block     *[]byte     // from blockPool while the writer is busy
	timer     *time.Timer // write timeout, made on first use
	refused   int         // packets refused by finish, which cannot report them
	finishing bool        // finish has started

	// replay is a resumable stream's replay buffer, nil on a plain stream:
	// its methods then do nothing.
	replay *replayBuffer

	// writing is the connection a write is under way to, for the write
	// timeout's timer, which reads it: the one field others touch.
	writing atomic.Pointer[conn]
}

// writeLoop is the stream's one writer. It serves one connection at a time
// and waits while there is none; when the stream closes, it flushes.
func (s *Stream) writeLoop() {
	defer close(s.writerDone)
	w := &writer{s: s, in: s.outgoing}
	for {
		if s.closeStarted() {
			s.unsent = w.finish()
			return
		}
		c := s.liveConn()
		if c == nil || !c.writable() {
			w.idle()
			<-s.wake // SetConnection, handshakes and Close wake it
			continue
		}
		w.replay = s.session.replayBuffer() // set before the first connection
		err := w.replay.resume(c, w)
		if err == nil {
			err = w.serve(c)
		}
		if err != nil {
			s.end(c, err)
		}
	}
}

// serve writes to c until c ends or the stream closes, and returns the error
// that made a write fail.
func (w *writer) serve(c *conn) error {
	for {
		if len(w.pending) == 0 && c.due.Load() == 0 {
			if w.full() {
				w.idle()
				<-w.s.wake // an acknowledgement makes room
			} else {
				w.receive(c)
			}
		}
		if c.ended.Load() || w.s.closeStarted() {
			return nil
		}
		if err := w.replay.trim(); err != nil {
			return err
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

// receive waits for a packet on Outgoing or a wake.
func (w *writer) receive(c *conn) {
	// Try the receive alone first: a select over two channels
	// locks both.
	select {
	case p, ok := <-w.in:
		w.take(c, p, ok)
	default:
		w.idle()
		select {
		case p, ok := <-w.in:
			w.take(c, p, ok)
		case <-w.s.wake:
		}
	}
}

// idle gives the writer's block back to the pool while it has nothing to
// write: an idle stream holds no buffer.
func (w *writer) idle() {
	if w.block != nil {
		blockPool.Put(w.block)
		w.block = nil
	}
}

// take adds p, received from Outgoing with ok, to pending. A closed
// Outgoing (!ok) is the caller's error: the writer stops receiving from it.
func (w *writer) take(c *conn, p *Packet, ok bool) {
	if !ok {
		w.in = nil
		return
	}
	w.takeWithin(c, p, w.sendLimit(c))
}

// takeWithin adds p to pending, unless it is nil or over limit (sendLimit,
// read once per drain): then it is refused, and takeWithin returns false.
func (w *writer) takeWithin(c *conn, p *Packet, limit int) bool {
	if p == nil || len(p.Data) > limit {
		w.refuse(c, p, limit)
		return false
	}
	w.pending = append(w.pending, p)
	w.replay.hold(p)
	return true
}

// sendLimit is the largest payload the writer sends on c: the stream's own
// limit, or less where c or its peer takes less.
func (w *writer) sendLimit(c *conn) int {
	return min(int(w.s.maxSize.Load()), c.peerMax)
}

// refuse skips a nil packet or one over the limit: it is reported, or
// counted as unsent once the stream is closing.
func (w *writer) refuse(c *conn, p *Packet, limit int) {
	switch {
	case w.finishing:
		w.refused++
	case p == nil:
		w.s.report(c, fmt.Errorf("%w: skipped", ErrNilPacket))
	default:
		w.s.report(c, fmt.Errorf("%w: %d bytes not sent, limit %d", ErrTooLarge, len(p.Data), limit))
	}
}

// full tells whether a resumable stream holds as many unacknowledged bytes
// as its replay limit allows: then it takes nothing more from Outgoing.
func (w *writer) full() bool {
	return w.replay.full(w.s.replayLimit.Load())
}

// drain adds to pending what waits in Outgoing, as long as the batch stays
// within one block and maxBatch bytes.
func (w *writer) drain(c *conn) {
	copied, total := 0, 0
	for _, p := range w.pending {
		copied, total = batchSize(p, copied, total)
	}
	taken, limit := 0, w.sendLimit(c)
	for copied <= batchCopyLimit && total < maxBatch && !w.full() {
		select {
		case p, ok := <-w.in:
			if !ok {
				w.in = nil
				return
			}
			if w.takeWithin(c, p, limit) {
				copied, total = batchSize(p, copied, total)
			}
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
	if copies(len(p.Data)) {
		copied += len(p.Data)
	}
	return copied, total + HeaderSize + len(p.Data)
}

// send writes the control frames due and pending to c, and keeps in pending
// the packets that were not completely written.
func (w *writer) send(c *conn) error {
	if w.block == nil {
		w.block = blockPool.Get().(*[]byte)
	}
	w.batch.buf = (*w.block)[:0]
	var control int
	if c.due.Load() != 0 {
		due := c.due.Swap(0)
		if due&duePing != 0 {
			w.batch.buf = appendControl(w.batch.buf, framePing, 0)
		}
		if due&duePong != 0 {
			w.batch.buf = appendControl(w.batch.buf, framePong, 0)
		}
		if due&dueAck != 0 {
			w.batch.buf = w.replay.appendAck(w.batch.buf)
		}
		control = len(w.batch.buf)
	}
	// Control frames are copied, like small payloads: the first payload
	// referred to in place comes after them.
	w.batch.start = control
	w.replay.writing(len(w.pending))
	w.startWrite(c)
	var done int
	var err error
	if c.datagram {
		done, err = w.sendDatagrams(c)
	} else {
		done, err = w.sendStream(c, control)
	}
	w.stopWrite()
	w.batch.buf = nil
	w.replay.keep(w.pending[:done])
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
	n, err := w.batch.writeTo(c.Conn) // the net.Conn itself, for writev
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

// finish is the writer's last act: it sends what is queued on the live
// connection, if any, until Close's timer ends it, ends it, and returns an
// error counting what it could not send. Close has started, so no
// connection can be set any more: the one it reads is the last.
func (w *writer) finish() error {
	w.finishing = true
	w.replay = w.s.session.replayBuffer()
	c := w.s.liveConn()
	var err error
	if c != nil {
		for !c.writable() && !c.ended.Load() {
			<-w.s.wake // a handshake under way ends, or Close's timer ends c
		}
		if c.writable() {
			if err = w.replay.resume(c, w); err == nil {
				err = w.flush(c)
			}
		}
		w.s.end(c, nil)
	}
	// Count what is left, and release senders blocked on a full Outgoing:
	// each receive lets one of them through.
	w.idle()
	w.replay.trim() // a bye may have acknowledged the rest
	unsent := len(w.pending) + w.refused + w.replay.unacked()
	for {
		select {
		case _, ok := <-w.in:
			if ok {
				unsent++
				continue
			}
			w.in = nil
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

// flush sends what is queued on c until Close's timer ends c; on a
// resumable stream it then ends the session (bye).
func (w *writer) flush(c *conn) error {
	for !c.ended.Load() && !w.replay.peerEnded() {
		if err := w.replay.trim(); err != nil {
			return err
		}
		w.drain(c)
		if len(w.pending) > 0 || c.due.Load() != 0 {
			if err := w.send(c); err != nil {
				return err
			}
			continue
		}
		if !w.full() || len(w.in) == 0 {
			break
		}
		<-w.s.wake // an acknowledgement makes room for what is queued
	}
	return w.bye(c)
}

// ---- The reader ----

// reader is one connection's reader.
type reader struct {
	s    *Stream
	c    *conn
	sess *session // nil unless resumable
	// toAck counts the bytes read since the last acknowledgement was asked
	// for.
	toAck int
	// diverted is set once c has ended while a packet waited for Incoming:
	// from then on what c still yields goes to the stream's backlog, for the
	// next connection's reader to deliver.
	diverted bool
	// confirm is set on the accepting side after a welcome: the first
	// frame that arrives shows that the client has its token.
	confirm bool
	// bye is set when the peer ended the session: the reader stops, and
	// leaves c to the writer, which answers with a bye of its own.
	bye bool
	// inGate is set on a resumable stream while the reader holds the
	// session's gate, from its first delivery after a read of the
	// connection until the next read; passed counts what it delivered
	// meanwhile, added to the session's count when it leaves.
	inGate bool
	passed uint64
}

// readLoop is the reader of one connection. It waits for the previous
// connection's reader to exit, so that packets are delivered in the order
// they arrived, then delivers the backlog and reads until the connection
// ends or the stream closes.
func (s *Stream) readLoop(c *conn, prev <-chan struct{}, done chan<- struct{}) {
	defer close(done)
	<-prev
	r := &reader{s: s, c: c, sess: s.session}
	if c.datagram {
		err := error(nil)
		if c.resume != nil {
			err = fmt.Errorf("%w: a resumable stream needs a byte stream, not %s", ErrHandshake, c.LocalAddr().Network())
		} else if r.deliverBacklog() {
			err = r.readDatagrams()
		}
		s.end(c, err)
		return
	}
	cr := &connReader{c: c}
	defer cr.release()
	d := NewDecoder(cr)
	cr.d = d
	d.SetMaxSize(int(s.maxSize.Load()))
	d.control = true
	var err error
	if c.resume != nil {
		cr.counted = r
		defer r.leaveGate()
		err = r.handshake(cr, d)
	}
	if err == nil && r.deliverBacklog() {
		err = r.readStream(cr, d)
	}
	if !r.bye {
		s.end(c, err)
	}
	// After the peer's bye the writer answers with this side's and ends c.
}

// readStream decodes packets from a byte stream until an error.
func (r *reader) readStream(cr *connReader, d *Decoder) error {
	for {
		if cr.empty() {
			// A packet ended where the bytes read did, so the next read may
			// wait, however full the last one was: a burst of packets
			// ends on a read's edge as easily as a single packet does.
			cr.streaming = false
		}
		p, err := d.Decode()
		if err != nil {
			return err
		}
		if r.confirm {
			r.confirm = false
			r.sess.owner.confirm(r.s, r.c.resume.welcomed)
		}
		if p == nil {
			if err := r.controlStream(d.frame); err != nil || r.bye {
				return err // after a bye, nil: the end is no failure
			}
			continue
		}
		if r.sess != nil {
			if !r.passCounted(p) {
				return nil
			}
			r.count(p)
		} else if !r.deliver(p) {
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
		if r.s.closeStarted() {
			return nil
		}
	}
}

// control acts on a keep-alive frame from the peer.
func (r *reader) control(f controlFrame) {
	if f.kind == framePing {
		r.c.due.Or(duePong)
		r.s.wakeWriter()
	}
	// A pong's arrival is what counts, and that is noted on every read.
}

// controlStream acts on a control frame read from a byte stream.
func (r *reader) controlStream(f controlFrame) error {
	switch {
	case f.kind == framePing || f.kind == framePong:
		r.control(f)
		return nil
	case r.sess != nil && (f.kind == frameAck || f.kind == frameBye):
		return r.acknowledged(f)
	}
	return fmt.Errorf("%w: control frame %d out of place", ErrHandshake, f.kind)
}

// deliver sends p on Incoming, or to the backlog once the connection has
// ended while p waited. It returns false when the stream closes. Its first
// try is small enough to inline, as it runs for every packet.
func (r *reader) deliver(p *Packet) bool {
	// Try the send alone first: a select over several channels locks them
	// all.
	if !r.diverted {
		select {
		case r.s.incoming <- p:
			return true
		default:
		}
	}
	return r.wait(p)
}

// wait is deliver for a packet that Incoming had no room for.
func (r *reader) wait(p *Packet) bool {
	s := r.s
	if !r.diverted {
		// Close ends the live connection too, so c's end is all there
		// is to wait for besides Incoming.
		select {
		case s.incoming <- p:
			return true
		case <-r.c.done:
			r.diverted = true
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closeStarted() {
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
		if !r.pass(p) {
			return false
		}
	}
	return true
}

// pass is deliver, counted on a resumable stream.
func (r *reader) pass(p *Packet) bool {
	if r.sess == nil {
		return r.deliver(p)
	}
	return r.passCounted(p)
}

// connReader is a buffered reader over one connection. A read that may
// wait is made into a small array, and before it the reader gives back all
// it need not hold while it waits: its pooled block and its decoder's
// (Decoder.idle). The block is taken again, and the read made into it, only
// after a read that filled its buffer, which means more is likely waiting;
// so a connection that has gone quiet holds no more memory than one that
// never carried anything, and a burst is read in blocks. Every read notes
// that something arrived, for keep-alive.
type connReader struct {
	c         *conn
	d         *Decoder // decodes what is read here; told when a read may wait
	counted   *reader  // a resumable stream's reader, which leaves its gate before each read
	buf       []byte   // unread bytes are buf[r:w]
	r, w      int
	err       error // from the last read, returned once buf is empty
	streaming bool  // the last read filled its buffer, so more is likely waiting
	block     *[]byte
	small     [smallRead]byte
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
			// would only add a copy. What follows is a header, likely of
			// another large payload: read it into the small array, so that
			// little of that payload is copied through a buffer.
			cr.streaming = false
			cr.quiet()
			cr.counted.leaveGate()
			n, err := cr.c.Read(p)
			cr.c.arrived.Store(true)
			return n, err
		}
		cr.counted.leaveGate()
		if err := cr.fill(); err != nil {
			return 0, err
		}
		// Here, not in fill, so that fill's frame stays as small as it
		// was: a reader waits with fill on its stack, and a few more
		// bytes there grow every reader's stack to 4 KiB.
		cr.d.unpark()
	}
	n := copy(p, cr.buf[cr.r:cr.w])
	cr.r += n
	return n, nil
}

// fill reads into the buffer: a pooled block while data keeps coming, else
// the small array.
func (cr *connReader) fill() error {
	if cr.streaming {
		if cr.block == nil {
			cr.block = blockPool.Get().(*[]byte)
		}
		cr.buf = *cr.block
	} else {
		cr.quiet()
		cr.buf = cr.small[:]
	}
	n, err := cr.c.Read(cr.buf)
	cr.c.arrived.Store(true)
	cr.r, cr.w = 0, n
	cr.streaming = n == len(cr.buf)
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

// quiet gives back, before a read that may wait, what the reader need not
// hold meanwhile: the pooled block and the decoder's block and group.
func (cr *connReader) quiet() {
	cr.release()
	cr.d.idle()
}

// release gives the pooled block back. The reader must not be using it:
// decoded payloads are copies, so nothing refers to it afterwards.
func (cr *connReader) release() {
	if cr.block != nil {
		blockPool.Put(cr.block)
		cr.block = nil
	}
}

// ---- Keep-alive and the reconnect loop ----

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

// KeepConnected keeps the stream connected while it is open: it dials at
// once if the stream has no connection, and again whenever a connection
// fails, then hands the new connection to SetConnection. Every failed dial
// is reported to the OnError callbacks, with a nil Connection and an error
// wrapping the dial's. It backs off while dials fail, and also while
// connections fail soon after they were made (a server that accepts and
// drops, a proxy whose backend is down): the wait starts at 50 ms and
// doubles up to maxWait (at least 50 ms), each wait drawn at random from its
// upper half so that the clients of a server that restarts do not all come
// back at once. A connection that lasted maxWait resets the wait.
//
// The dialing runs on a goroutine of its own that exists only while the
// stream has no connection, never on the callbacks' goroutine. A report that
// leaves the connection up (an oversized packet, ErrSessionLost) does not
// make it dial. Calling KeepConnected again replaces dial and maxWait. It
// panics if dial is nil.
func (s *Stream) KeepConnected(dial func() (net.Conn, error), maxWait time.Duration) {
	if dial == nil {
		panic(errors.New("packet: KeepConnected(nil, ...): nil dial function"))
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.redial == nil {
		s.redial = &redialer{wait: minRedialWait}
	}
	s.redial.dial, s.redial.maxWait = dial, max(maxWait, minRedialWait)
	s.redialLocked()
}

// minRedialWait is KeepConnected's first wait between failures.
const minRedialWait = 50 * time.Millisecond

// redialer is KeepConnected's state, guarded by Stream.mu.
type redialer struct {
	dial      func() (net.Conn, error)
	maxWait   time.Duration
	wait      time.Duration // before the next dial, after a failure
	connected time.Time     // when the last connection was set
	running   bool          // redialLoop runs
}

// redialLocked starts the reconnect loop if the stream keeps connected, has
// no connection and no loop runs. The caller holds s.mu.
func (s *Stream) redialLocked() {
	r := s.redial
	if r == nil || r.running || s.conn != nil || s.closeStarted() {
		return
	}
	r.running = true
	go s.redialLoop(r)
}

// redialLoop dials until the stream has a connection or closes.
func (s *Stream) redialLoop(r *redialer) {
	s.mu.Lock()
	defer s.mu.Unlock()
	// The first dial is at once, and so is the first after a connection
	// that lasted; after one that failed soon, back off as after a failed
	// dial.
	pause := false
	if !r.connected.IsZero() {
		if time.Since(r.connected) >= r.maxWait {
			r.wait = minRedialWait
		} else {
			pause = true
		}
	}
	for s.conn == nil && !s.closeStarted() {
		if pause {
			wait := r.wait/2 + mrand.N(r.wait/2+1)
			r.wait = min(2*r.wait, r.maxWait)
			s.mu.Unlock()
			ok := s.sleep(wait)
			s.mu.Lock()
			if !ok {
				break
			}
		}
		pause = true
		dial := r.dial
		s.mu.Unlock()
		nc, err := dial()
		s.mu.Lock()
		if err != nil {
			s.callbacks.report(IOError{Error: fmt.Errorf("packet: dial: %w", err)})
			continue
		}
		r.connected = time.Now()
		s.mu.Unlock()
		s.SetConnection(nc)
		s.mu.Lock()
	}
	r.running = false
}

// sleep waits for d; it returns false if the stream closed meanwhile.
func (s *Stream) sleep(d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-s.closing:
		return false
	}
}

// ---- Sessions: the accepting side ----

const (
	// DefaultReplayLimit is how many bytes of packets a resumable stream
	// keeps for replay until the peer acknowledges them, unless
	// SetReplayLimit says otherwise: 1 MiB, thousands of chat messages.
	DefaultReplayLimit = 1 << 20
	// DefaultHandshakeTimeout bounds a resumable connection's handshake
	// unless Sessions.SetHandshakeTimeout or Stream.SetHandshakeTimeout
	// says otherwise.
	DefaultHandshakeTimeout = 10 * time.Second
	// DefaultSessionExpiry is how long Sessions keeps a session whose client
	// has gone, unless Sessions.SetExpiry says otherwise.
	DefaultSessionExpiry = 2 * time.Minute
	// DefaultMaxSessions is how many sessions Sessions keeps at once unless
	// Sessions.SetMaxSessions says otherwise. An abandoned session costs
	// about 21 KiB, so the default bounds them to about 210 MiB.
	DefaultMaxSessions = 10000
	// DefaultSessionPing and DefaultSessionSilence are the keep-alive of a
	// session's stream on the accepting side (Stream.SetKeepAlive), unless
	// Sessions.OnSession changes it: a client that stays connected but
	// silent, and does not answer pings, is cut off, and its session then
	// expires.
	DefaultSessionPing    = 15 * time.Second
	DefaultSessionSilence = 45 * time.Second

	// tokenSize is the length of a session token: 128 random bits.
	tokenSize = 16
	// ackBytes and ackDelay say when a resumable stream acknowledges what
	// the application took: after this many bytes read, or this long after
	// the first packet not yet acknowledged, whichever comes first. An
	// acknowledgement is a 9 byte frame, so a steady flow pays one per
	// 32 KiB. While packets wait in Incoming the timer looks again, up to
	// maxAckDelay apart.
	ackBytes    = 32 << 10
	ackDelay    = 10 * time.Millisecond
	maxAckDelay = time.Second
)

// Sessions is the accepting side of resumable streams: it gives each client
// a stream that lives across the client's connections. Every method is safe
// to call from any goroutine.
//
// It is made for clients it does not control. It keeps at most
// SetMaxSessions sessions, making room by evicting the one whose client has
// been gone longest; its streams have keep-alive on, so a client that goes
// silent is found and its session expires; and the token that names a
// session changes on every connection, so a token seen by someone else is
// of no use after the client's next reconnect.
type Sessions struct {
	size int

	mu               sync.Mutex // guards the fields below; taken before Stream.mu
	streams          map[[tokenSize]byte]*Stream
	closed           bool
	handshakeTimeout time.Duration
	expiry           time.Duration
	maxSessions      int
	configure        func(*Stream) // set by OnSession
}

// NewSessions returns a registry of sessions whose streams have Incoming and
// Outgoing channels of channelBufferSize packets.
func NewSessions(channelBufferSize int) *Sessions {
	if channelBufferSize < 0 {
		panic(fmt.Errorf("packet: NewSessions(%d): negative channel buffer size", channelBufferSize))
	}
	return &Sessions{
		size:             channelBufferSize,
		streams:          make(map[[tokenSize]byte]*Stream),
		handshakeTimeout: DefaultHandshakeTimeout,
		expiry:           DefaultSessionExpiry,
		maxSessions:      DefaultMaxSessions,
	}
}

// OnSession registers configure, which Accept calls with each new session's
// stream before it reads the stream's first packet and before Accept
// returns it: so OnError, SetKeepAlive, SetMaxSize, SetReplayLimit and the
// other settings apply from the first byte, and no report is made to
// nobody. It runs on the goroutine that called Accept. A later call
// replaces it.
func (ss *Sessions) OnSession(configure func(*Stream)) {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	ss.configure = configure
}

// SetMaxSessions sets how many sessions are kept at once, DefaultMaxSessions
// unless set. A new session beyond it evicts the session whose client has
// been gone longest, whose stream closes as on expiry; if every session's
// client is connected, the new client is refused: Accept returns an error
// wrapping ErrTooManySessions and closes the connection after telling the
// client, whose stream reports ErrTooManySessions too. It panics if n is
// below 1.
func (ss *Sessions) SetMaxSessions(n int) {
	if n < 1 {
		panic(fmt.Errorf("packet: SetMaxSessions(%d): fewer than one session", n))
	}
	ss.mu.Lock()
	defer ss.mu.Unlock()
	ss.maxSessions = n
}

// SetHandshakeTimeout sets how long Accept waits for a client's hello,
// DefaultHandshakeTimeout unless set.
func (ss *Sessions) SetHandshakeTimeout(d time.Duration) {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	ss.handshakeTimeout = d
}

// SetExpiry sets how long a session whose client has gone is kept, waiting
// for the client to come back, DefaultSessionExpiry unless set. Then its
// stream is closed, and its Incoming with it. It applies to sessions
// started after the call.
func (ss *Sessions) SetExpiry(d time.Duration) {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	ss.expiry = d
}

// Accept reads a client's hello from nc and hands nc to the client's
// session. For a new session it returns a new stream and isNew, configured
// by OnSession; start a handler for it, which reads Incoming until it
// closes. For a returning client it returns the session's stream, which now
// uses nc, and the handler already running goes on.
//
// A client that sends nothing, too little or something else than a hello
// within the handshake timeout gets nc closed and an error wrapping
// ErrHandshake. A hello for a session this registry does not know (it
// expired, was evicted, or the server restarted), or with a count the
// session cannot resume from, is answered so that the client starts a new
// session on the same connection; the session of a bad count ends. A new
// client beyond SetMaxSessions is refused with ErrTooManySessions. It
// panics if nc is nil.
func (ss *Sessions) Accept(nc net.Conn) (stream *Stream, isNew bool, err error) {
	if nc == nil {
		panic(errors.New("packet: Accept(nil): nil connection"))
	}
	ss.mu.Lock()
	timeout, closed := ss.handshakeTimeout, ss.closed
	ss.mu.Unlock()
	switch {
	case closed:
		err = fmt.Errorf("packet: sessions closed: %w", net.ErrClosed)
	case isDatagram(nc):
		err = fmt.Errorf("%w: resumable sessions need a byte stream, not %s", ErrHandshake, nc.LocalAddr().Network())
	default:
		nc.SetDeadline(time.Now().Add(timeout))
		var rp *resumePoint
		stream, isNew, rp, err = ss.readHello(nc)
		if err == nil {
			nc.SetDeadline(time.Time{})
			if isNew {
				ss.mu.Lock()
				configure := ss.configure
				ss.mu.Unlock()
				if configure != nil {
					configure(stream)
				}
			}
			stream.setConnection(nc, rp)
			return stream, isNew, nil
		}
		if errors.Is(err, ErrTooManySessions) {
			nc.Write(appendControl(nil, frameFull, 0))
		}
	}
	nc.Close()
	return nil, false, err
}

// Close closes every session's stream, telling their clients that the
// session is over, and makes Accept refuse connections. It returns what the
// streams could not send.
func (ss *Sessions) Close() error {
	ss.mu.Lock()
	ss.closed = true
	streams := make([]*Stream, 0, len(ss.streams))
	for _, s := range ss.streams {
		streams = append(streams, s)
	}
	ss.mu.Unlock()
	errs := make([]error, len(streams))
	var wg sync.WaitGroup
	for i, s := range streams {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = s.Close()
		}()
	}
	wg.Wait()
	return errors.Join(errs...)
}

// readHello reads the client's hello and its limit: a known session's
// stream, or a new one. A new session that replaces one the hello named but
// this registry does not know is answered with a lost frame in place of a
// welcome.
func (ss *Sessions) readHello(nc net.Conn) (*Stream, bool, *resumePoint, error) {
	var buf [greetingSize]byte
	if _, err := io.ReadFull(nc, buf[:HeaderSize]); err != nil {
		return nil, false, nil, fmt.Errorf("%w: reading the hello: %w", ErrHandshake, err)
	}
	if !isControl(buf[:]) || buf[0] != frameHello {
		return nil, false, nil, fmt.Errorf("%w: the first frame is not a hello", ErrHandshake)
	}
	if _, err := io.ReadFull(nc, buf[HeaderSize:]); err != nil {
		return nil, false, nil, fmt.Errorf("%w: reading the hello: %w", ErrHandshake, err)
	}
	f, _ := parseControl(buf[:])
	limit, err := readLimit(bytes.NewReader(buf[HeaderSize+tokenSize:]))
	if err != nil {
		return nil, false, nil, err
	}
	var token [tokenSize]byte
	copy(token[:], buf[HeaderSize:])
	named := token != [tokenSize]byte{}
	if named {
		if s := ss.resume(token, f.arg); s != nil {
			return s, false, &resumePoint{peerRead: f.arg, peerMax: limit}, nil
		}
	}
	s, err := ss.create()
	return s, true, &resumePoint{peerMax: limit, lost: named}, err
}

// resume returns the session named by token for a client that has read
// peerRead of its packets, and names it by a fresh token, which the welcome
// carries: the old one stops working. It returns nil for a token it does
// not know, and ends the session, returning nil, for a count the session
// cannot resume from (below what the client acknowledged, above what was
// sent), so that a client, or someone who saw its token, cannot leave the
// session stuck on a count that never fits.
func (ss *Sessions) resume(token [tokenSize]byte, peerRead uint64) *Stream {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	s := ss.streams[token]
	if s == nil {
		return nil
	}
	sess := s.session
	if peerRead < sess.peerAcked.Load() || peerRead > sess.sent.Load() {
		ss.forgetLocked(s)
		go s.Close()
		return nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if token == sess.token {
		// The client has the newest token: the one it showed before is
		// of no more use.
		if sess.proven != token && ss.streams[sess.proven] == s {
			delete(ss.streams, sess.proven)
		}
		sess.proven = token
	} else {
		// The client showed the token it had proven: it never got the
		// newest, which goes.
		delete(ss.streams, sess.token)
	}
	rand.Read(sess.token[:])
	ss.streams[sess.token] = s
	return s
}

// confirm notes that the client has the token its last welcome carried:
// something arrived after that welcome, which the client sends only once it
// read it. The token it showed before stops working.
func (ss *Sessions) confirm(s *Stream, welcomed [tokenSize]byte) {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	s.mu.Lock()
	defer s.mu.Unlock()
	sess := s.session
	if sess.token != welcomed || sess.proven == welcomed {
		return
	}
	if ss.streams[sess.proven] == s {
		delete(ss.streams, sess.proven)
	}
	sess.proven = welcomed
}

// forgetLocked removes every token of s from the registry. The caller holds
// ss.mu.
func (ss *Sessions) forgetLocked(s *Stream) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, token := range [...][tokenSize]byte{s.session.token, s.session.proven} {
		if ss.streams[token] == s {
			delete(ss.streams, token)
		}
	}
}

// create starts a new session with a fresh token, making room for it if
// there are SetMaxSessions already.
func (ss *Sessions) create() (*Stream, error) {
	ss.mu.Lock()
	if ss.closed {
		ss.mu.Unlock()
		return nil, fmt.Errorf("packet: sessions closed: %w", net.ErrClosed)
	}
	var evicted *Stream
	if len(ss.streams) >= ss.maxSessions {
		if evicted = ss.evictLocked(); evicted == nil {
			ss.mu.Unlock()
			return nil, fmt.Errorf("%w: %d, each with its client connected", ErrTooManySessions, len(ss.streams))
		}
	}
	s := NewStream(ss.size)
	s.SetKeepAlive(DefaultSessionPing, DefaultSessionSilence)
	sess := newSession(s, ss)
	rand.Read(sess.token[:])
	sess.expireAfter = ss.expiry
	ss.streams[sess.token] = s
	s.mu.Lock()
	s.session = sess
	s.handshakeTimeout = ss.handshakeTimeout
	s.mu.Unlock()
	ss.mu.Unlock()
	if evicted != nil {
		evicted.Close()
	}
	return s, nil
}

// evictLocked forgets the session whose client has been gone longest and
// returns its stream, for the caller to close; nil if every session's
// client is connected. The caller holds ss.mu.
func (ss *Sessions) evictLocked() *Stream {
	var oldest *Stream
	var since int64
	for _, s := range ss.streams {
		if gone := s.session.goneSince.Load(); gone != 0 && (oldest == nil || gone < since) {
			oldest, since = s, gone
		}
	}
	if oldest != nil {
		ss.forgetLocked(oldest)
	}
	return oldest
}

// ---- Resume: the handshake, acknowledgements and replay ----

// session is a resumable stream's state beyond one connection. Packets are
// numbered implicitly, from 0, in the order they are sent. Each side counts
// three things of what it received: what its readers read and kept (read,
// which hellos and welcomes carry, so that the peer resumes after it), what
// went into Incoming (delivered, which the bye carries), and what the
// application has taken from Incoming (what acknowledgements carry, so that
// the peer forgets only what the application has, and a crashed process's
// successor is sent the rest again).
type session struct {
	s           *Stream
	owner       *Sessions     // the accepting side's registry; nil on the dialing side
	expireAfter time.Duration // on the accepting side

	// deliveries counts, from bit 2 up, the packets the readers (which
	// never overlap) put into Incoming in this session. It also lets Close
	// freeze that count: a reader sets gateInside around each delivery, and
	// once the writer has set gateFrozen and no reader is inside, the count
	// is final and readers drop what they read. One word, so that a
	// delivery costs two atomic operations. What was read and kept is the
	// count plus the backlog.
	deliveries atomic.Uint64

	// fresh is set by the reader when a new session replaced a lost one,
	// and taken by the writer, which then sends again everything not
	// acknowledged, numbered from 0; it outlives the connection that
	// learned it.
	fresh atomic.Bool

	sent      atomic.Uint64 // packets numbered so far; written by the writer
	peerAcked atomic.Uint64 // the most packets the peer said it has taken; written by the readers
	peerBye   atomic.Bool   // the peer's bye was read; set by the reader
	acked     atomic.Uint64 // the most this side acknowledged; written by the writer

	// The acknowledgement timer runs while packets wait in Incoming
	// unacknowledged, and looks again, less often each time, until the
	// application has taken them.
	ackArmed  atomic.Bool
	ackWait   atomic.Int64  // the timer's next wait, in nanoseconds
	tickTaken atomic.Uint64 // taken at the timer's last run
	ackTimer  *time.Timer   // made by the first reader that needs it

	// goneSince is when the stream lost its last connection, in Unix
	// nanoseconds, 0 while it has one; Sessions reads it to evict.
	goneSince atomic.Int64

	// Guarded by Stream.mu.
	token  [tokenSize]byte // zero until the accepting side issued one; changes on each welcome
	expiry *time.Timer
	// proven is, on the accepting side, the last token the client showed
	// it has; it stays valid beside token until the client shows it has
	// that one too, so that a welcome lost on the way costs no session.
	// Guarded by Sessions.mu as well.
	proven [tokenSize]byte

	// The writer's alone.
	replay replayBuffer
}

// Bits of session.deliveries.
const (
	gateInside   = 1 << iota // a reader is delivering a packet
	gateFrozen               // Close has counted what was delivered
	oneDelivered             // the count's unit
)

// resumePoint is where a resumable connection takes the session up: the
// reader settles it in the handshake, then the writer acts on it.
type resumePoint struct {
	peerRead uint64          // how many of our packets the peer has read and kept
	peerMax  int             // the largest payload the peer accepts
	lost     bool            // on the accepting side: the hello named an unknown session, which this one replaces
	welcomed [tokenSize]byte // on the accepting side: the token the welcome carries
	settled  atomic.Bool     // set by the reader once the fields above are final
	acted    bool            // the writer has acted on it
}

// newSession returns the session of stream s; owner is the accepting
// side's registry, nil on the dialing side.
func newSession(s *Stream, owner *Sessions) *session {
	sess := &session{s: s, owner: owner}
	sess.replay.sess = sess
	return sess
}

// EnableResume makes the stream resumable, on the dialing side: each
// connection starts with a handshake with Sessions.Accept, and every packet
// is delivered to the peer exactly once and in order, across any number of
// connections, for as long as the session lives. Call it before the first
// SetConnection; it panics afterwards. The peer must be a stream from
// Sessions. Resume over a datagram connection is refused: such a
// connection is reported with ErrHandshake and closed.
func (s *Stream) EnableResume() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.last != nil {
		panic(errors.New("packet: EnableResume after SetConnection"))
	}
	if s.session == nil {
		s.session = newSession(s, nil)
	}
}

// SetHandshakeTimeout sets how long a resumable stream waits for each new
// connection's handshake to complete (on the dialing side, for the welcome
// that answers its hello), DefaultHandshakeTimeout unless set; a
// connection whose handshake takes longer fails with an error for which
// errors.Is(err, os.ErrDeadlineExceeded) holds. A stream from Sessions
// takes the registry's handshake timeout.
func (s *Stream) SetHandshakeTimeout(d time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.handshakeTimeout = d
}

// SetReplayLimit sets how many bytes of packets a resumable stream keeps
// until the peer acknowledges them, DefaultReplayLimit unless set. When it
// is reached the stream takes nothing more from Outgoing, so senders block.
// A packet larger than the limit is still sent, alone. It panics if n is
// negative.
//
// The peer acknowledges what its application has taken from Incoming, so
// what waits there counts against this limit: a stream of large packets
// flows best with a limit above the peer's Incoming capacity times the
// packet size, or it waits, up to 10 ms at a time, for the peer to notice
// that its application took them.
func (s *Stream) SetReplayLimit(n int) {
	if n < 0 {
		panic(fmt.Errorf("packet: SetReplayLimit(%d): negative size", n))
	}
	s.replayLimit.Store(int64(n))
}

// writable tells whether c's handshake, if it has one, is done.
func (c *conn) writable() bool {
	return c.resume == nil || c.resume.settled.Load()
}

// handshake opens a resumable connection: the dialing side sends its hello
// and reads the welcome; the accepting side, whose Accept read the hello,
// sends the welcome. Each is followed by a limit frame, the largest payload
// its sender accepts. Either way the count of packets read is final, as the
// previous connection's reader has exited.
func (r *reader) handshake(cr *connReader, d *Decoder) error {
	c, s, sess := r.c, r.s, r.sess
	s.mu.Lock()
	token, timeout := sess.token, s.handshakeTimeout
	s.mu.Unlock()
	c.SetDeadline(time.Now().Add(timeout))
	defer c.SetDeadline(time.Time{})
	if sess.owner != nil {
		kind := byte(frameWelcome)
		if c.resume.lost {
			kind = frameLost
		}
		if _, err := c.Write(greeting(kind, r.readCount(), token, d.maxSize)); err != nil {
			return err
		}
		c.resume.welcomed, r.confirm = token, true
		return r.resumeAt(c.resume.peerRead, c.resume.peerMax)
	}
	if _, err := c.Write(greeting(frameHello, r.readCount(), token, d.maxSize)); err != nil {
		return err
	}
	p, err := d.Decode()
	f := d.frame
	switch {
	case err != nil:
		return err
	case p == nil && f.kind == frameFull:
		return fmt.Errorf("%w: the server refused a new session", ErrTooManySessions)
	case p == nil && (f.kind == frameWelcome || f.kind == frameLost && token != [tokenSize]byte{}):
	default:
		return fmt.Errorf("%w: no welcome in answer to the hello", ErrHandshake)
	}
	var issued [tokenSize]byte
	if _, err := io.ReadFull(cr, issued[:]); err != nil {
		return err
	}
	if issued == [tokenSize]byte{} {
		return fmt.Errorf("%w: the answer to the hello names no session", ErrHandshake)
	}
	limit, err := readLimit(cr)
	if err != nil {
		return err
	}
	from := f.arg
	if f.kind == frameLost {
		// The server no longer knows the session and started a new one:
		// everything not acknowledged goes out again, numbered from 0.
		s.report(c, fmt.Errorf("%w: starting a new session", ErrSessionLost))
		sess.restart()
		sess.fresh.Store(true)
		from = 0
	}
	s.mu.Lock()
	sess.token = issued
	s.mu.Unlock()
	// The first frame after the welcome, an acknowledgement at once, shows
	// the server this side has the token it issued.
	c.due.Or(dueAck)
	return r.resumeAt(from, limit)
}

// greeting returns a hello or welcome with the sender's count and token,
// followed by its limit frame.
func greeting(kind byte, read uint64, token [tokenSize]byte, limit int) []byte {
	b := appendControl(make([]byte, 0, greetingSize), kind, read)
	b = append(b, token[:]...)
	return appendControl(b, frameLimit, uint64(limit))
}

// greetingSize is the length of a hello or welcome with its limit frame.
const greetingSize = HeaderSize + tokenSize + HeaderSize

// readLimit reads the limit frame that follows a hello or a welcome.
func readLimit(r io.Reader) (int, error) {
	var b [HeaderSize]byte
	if _, err := io.ReadFull(r, b[:]); err != nil {
		return 0, err
	}
	f, err := parseControl(b[:])
	if err != nil || !isControl(b[:]) || f.kind != frameLimit {
		return 0, fmt.Errorf("%w: no limit frame after the greeting", ErrHandshake)
	}
	return int(min(f.arg, math.MaxInt)), nil
}

// delivered returns how many packets the readers put into Incoming in this
// session.
func (sess *session) delivered() uint64 {
	return sess.deliveries.Load() / oneDelivered
}

// readCount returns how many packets of this session the readers read and
// kept: those delivered and those in the backlog, which the next reader
// delivers. The previous reader has exited, so the count is final.
func (r *reader) readCount() uint64 {
	r.s.mu.Lock()
	backlog := len(r.s.backlog)
	r.s.mu.Unlock()
	return r.sess.delivered() + uint64(backlog)
}

// restart starts the counts of a session again, when a lost one is
// replaced by a new one.
func (sess *session) restart() {
	for {
		v := sess.deliveries.Load()
		if sess.deliveries.CompareAndSwap(v, v&gateFrozen) {
			break
		}
	}
	sess.peerAcked.Store(0)
	sess.acked.Store(0)
}

// resumeAt ends the handshake: the peer has read from packets of ours and
// takes payloads up to peerMax; the writer may start.
func (r *reader) resumeAt(from uint64, peerMax int) error {
	r.c.resume.peerRead = from
	r.c.resume.peerMax = peerMax
	r.c.resume.settled.Store(true)
	r.s.wakeWriter()
	return nil
}

// passCounted is deliver on a resumable stream: it counts what goes into
// Incoming, and once Close has taken that count it drops p, which the peer
// then counts as unsent. The reader enters the session's gate at its first
// delivery after a read and leaves it before the next (leaveGate), so the
// gate costs two atomic operations per read, not per packet.
func (r *reader) passCounted(p *Packet) bool {
	if !r.inGate {
		sess := r.sess
		v := sess.deliveries.Load()
		if v&gateFrozen != 0 || !sess.deliveries.CompareAndSwap(v, v|gateInside) {
			return true // frozen: only Close changes the word meanwhile
		}
		r.inGate = true
	}
	ok := r.deliver(p)
	if ok && !r.diverted {
		r.passed++
	}
	return ok
}

// leaveGate adds what the reader delivered to the session's count and
// leaves the gate, before a read that may wait; nil, or outside the gate,
// it does nothing.
func (r *reader) leaveGate() {
	if r == nil || !r.inGate {
		return
	}
	r.inGate = false
	leave := r.passed*oneDelivered - gateInside
	r.passed = 0
	if r.sess.deliveries.Add(leave)&gateFrozen != 0 {
		r.s.wakeWriter() // Close waits for the reader to leave
	}
	if r.toAck >= ackBytes {
		// Asked for here, once the count is out and the application had
		// its chance to take what it was given (readStream yields before
		// a read that may wait), so the acknowledgement frees the sender.
		r.toAck = 0
		r.c.due.Or(dueAck)
		r.s.wakeWriter()
	}
}

// count notes a packet read on a resumable stream for acknowledgement and
// starts the acknowledgement timer if it does not run.
func (r *reader) count(p *Packet) {
	sess := r.sess
	r.toAck += HeaderSize + len(p.Data) // leaveGate asks for an acknowledgement by bytes
	// What the application takes later is acknowledged by the timer, also
	// after an acknowledgement by bytes, which counts only what was taken
	// by then.
	if !sess.ackArmed.Load() && !sess.ackArmed.Swap(true) {
		sess.ackWait.Store(int64(ackDelay))
		if sess.ackTimer == nil {
			sess.ackTimer = time.AfterFunc(ackDelay, sess.ackNow)
		} else {
			sess.ackTimer.Reset(ackDelay)
		}
	}
}

// ackNow runs on the acknowledgement timer: it asks the writer for an
// acknowledgement if the application took something since the last one,
// and looks again while packets wait in Incoming: after ackDelay while the
// application keeps taking them, twice as long each time, up to
// maxAckDelay, while it takes none.
func (sess *session) ackNow() {
	sess.ackArmed.Store(false)
	taken, waiting := sess.taken()
	if c := sess.s.liveConn(); c != nil && taken > sess.acked.Load() {
		c.due.Or(dueAck)
		sess.s.wakeWriter()
	}
	if waiting && !sess.ackArmed.Swap(true) {
		wait := ackDelay
		if sess.tickTaken.Swap(taken) == taken {
			wait = min(2*time.Duration(sess.ackWait.Load()), maxAckDelay)
		}
		sess.ackWait.Store(int64(wait))
		sess.ackTimer.Reset(wait)
	}
}

// taken returns how many packets of this session the application has taken
// from Incoming, and whether some it was given wait there still. It may
// count low, never high: delivered is read before Incoming's length.
func (sess *session) taken() (uint64, bool) {
	delivered := sess.delivered()
	inChannel := uint64(len(sess.s.incoming))
	if inChannel >= delivered {
		return 0, delivered > 0
	}
	return delivered - inChannel, inChannel > 0
}

// ackCount returns the count for this side's next acknowledgement: what the
// application has taken, never less than an acknowledgement before it.
func (sess *session) ackCount() uint64 {
	taken, _ := sess.taken()
	for {
		last := sess.acked.Load()
		if taken <= last || sess.acked.CompareAndSwap(last, taken) {
			return max(taken, last)
		}
	}
}

// acknowledged acts on the peer's ack or bye. Its count must lie between
// the peer's last acknowledgement and what was sent, or the connection is
// dropped. A bye ends the session: the reader stops, and the writer
// answers it.
func (r *reader) acknowledged(f controlFrame) error {
	sess := r.sess
	last, sent := sess.peerAcked.Load(), sess.sent.Load()
	if f.arg < last || f.arg > sent {
		return fmt.Errorf("%w: control frame %d counts %d packets, %d to %d allowed", ErrHandshake, f.kind, f.arg, last, sent)
	}
	sess.peerAcked.Store(f.arg) // the readers alone write it
	if f.kind == frameBye {
		r.bye = true
		sess.peerBye.Store(true)
		go r.s.endSession()
	}
	r.s.wakeWriter()
	return nil
}

// down notes that the stream has no connection: on the accepting side, the
// session expires unless the client comes back in time. The caller holds
// Stream.mu.
func (sess *session) down() {
	if sess.owner == nil {
		return
	}
	sess.goneSince.Store(time.Now().UnixNano())
	if sess.expireAfter <= 0 {
		return
	}
	if sess.expiry == nil {
		sess.expiry = time.AfterFunc(sess.expireAfter, func() { sess.s.Close() })
		return
	}
	sess.expiry.Reset(sess.expireAfter)
}

// up notes that the stream has a connection again. The caller holds
// Stream.mu.
func (sess *session) up() {
	sess.goneSince.Store(0)
	if sess.expiry != nil {
		sess.expiry.Stop()
	}
}

// closed forgets a closed stream's session.
func (sess *session) closed() {
	s := sess.s
	s.mu.Lock()
	if sess.expiry != nil {
		sess.expiry.Stop()
	}
	s.mu.Unlock()
	if sess.ackTimer != nil {
		sess.ackTimer.Stop()
	}
	if ss := sess.owner; ss != nil {
		ss.mu.Lock()
		ss.forgetLocked(s)
		ss.mu.Unlock()
	}
}

// endSession closes a stream whose peer ended the session. What it could not
// send is reported, since nobody else learns of it.
func (s *Stream) endSession() {
	if err := s.Close(); err != nil {
		s.callbacks.last(IOError{Error: fmt.Errorf("%w: %w", ErrSessionEnded, err)})
	}
}

// replayBuffer is what a resumable stream's writer keeps of the packets it
// wrote until the peer acknowledges them: numbered from first in the order
// written, they go out again first on the next connection. Only the writer
// touches it. A plain stream's writer has a nil replay buffer, whose
// methods do nothing, so the writer reads as it would without sessions.
type replayBuffer struct {
	sess    *session
	packets []*Packet
	first   uint64 // the number of packets[0]: how many the peer has acknowledged
	held    int    // the bytes of packets and of the writer's pending
}

// replayBuffer returns the session's replay buffer, nil on a plain stream.
func (sess *session) replayBuffer() *replayBuffer {
	if sess == nil {
		return nil
	}
	return &sess.replay
}

// hold counts p, taken from Outgoing, against the replay limit.
func (b *replayBuffer) hold(p *Packet) {
	if b != nil {
		b.held += HeaderSize + len(p.Data)
	}
}

// full tells whether as many bytes are held as limit allows. A packet
// larger than the limit is taken when nothing else is held.
func (b *replayBuffer) full(limit int64) bool {
	return b != nil && b.held > 0 && int64(b.held) >= limit
}

// unacked returns how many written packets the peer has not acknowledged.
func (b *replayBuffer) unacked() int {
	if b == nil {
		return 0
	}
	return len(b.packets)
}

// writing notes, before a write of pending packets, how many the peer may
// acknowledge once it has read them.
func (b *replayBuffer) writing(pending int) {
	if b != nil {
		b.sess.sent.Store(b.first + uint64(len(b.packets)+pending))
	}
}

// keep adds packets just written.
func (b *replayBuffer) keep(written []*Packet) {
	if b != nil {
		b.packets = append(b.packets, written...)
	}
}

// appendAck appends an acknowledgement of what this side has read: it goes
// out with the writer's next write when the reader asks for one.
func (b *replayBuffer) appendAck(buf []byte) []byte {
	if b == nil {
		return buf
	}
	return appendControl(buf, frameAck, b.sess.ackCount())
}

// resume acts on a resumable connection's handshake before the writer
// serves it: it drops what the peer has read and puts the rest in front of
// w's pending, to go out again first.
func (b *replayBuffer) resume(c *conn, w *writer) error {
	if b == nil || c.resume.acted {
		return nil
	}
	c.resume.acted = true
	if b.sess.fresh.Swap(false) {
		w.pending = append(b.packets, w.pending...)
		b.packets, b.first = nil, 0
	}
	from, written := c.resume.peerRead, b.first+uint64(len(b.packets))
	if from < b.first || from > written {
		if b.sess.owner != nil {
			// The session cannot go on; its client starts a new one.
			go b.sess.s.Close()
		}
		return fmt.Errorf("%w: the peer has read %d packets, %d to %d were expected", ErrHandshake, from, b.first, written)
	}
	// What the peer has read stays until its application has taken it; the
	// rest goes out again first, within the peer's limit.
	c.peerMax = min(c.peerMax, c.resume.peerMax)
	if n := int(from - b.first); n < len(b.packets) {
		w.pending = append(slices.Clone(b.packets[n:]), w.pending...)
		clear(b.packets[n:])
		b.packets = b.packets[:n]
	}
	limit := w.sendLimit(c)
	w.pending = slices.DeleteFunc(w.pending, func(p *Packet) bool {
		if len(p.Data) <= limit {
			return false
		}
		b.held -= HeaderSize + len(p.Data)
		w.refuse(c, p, limit)
		return true
	})
	return nil
}

// peerEnded tells whether the peer said bye.
func (b *replayBuffer) peerEnded() bool {
	return b != nil && b.sess.peerBye.Load()
}

// trim drops what the peer has acknowledged.
func (b *replayBuffer) trim() error {
	if b == nil {
		return nil
	}
	to := b.sess.peerAcked.Load()
	if to <= b.first {
		return nil
	}
	if written := b.first + uint64(len(b.packets)); to > written {
		return fmt.Errorf("%w: acknowledges %d packets, %d written", ErrHandshake, to, written)
	}
	b.drop(int(to - b.first))
	return nil
}

// drop removes the first n packets, keeping the array for reuse.
func (b *replayBuffer) drop(n int) {
	for _, p := range b.packets[:n] {
		b.held -= HeaderSize + len(p.Data)
	}
	rest := copy(b.packets, b.packets[n:])
	clear(b.packets[rest:])
	b.packets = b.packets[:rest]
	b.first += uint64(n)
}

// bye ends a resumable stream's session on c: it freezes the count of
// what this side delivered, which from then on drops what it reads, sends
// that count in a bye, and waits for the peer's bye, which counts what the
// peer delivered of ours, or for c's end. So every packet is either
// delivered or counted unsent by its sender. A plain stream has no session
// to end.
func (w *writer) bye(c *conn) error {
	if w.replay == nil {
		return nil
	}
	sess := w.replay.sess
	sess.deliveries.Or(gateFrozen)
	for sess.deliveries.Load()&gateInside != 0 && !c.ended.Load() {
		<-w.s.wake // a delivery under way ends, or Close's timer ends c
	}
	if c.ended.Load() {
		return nil
	}
	w.startWrite(c)
	_, err := c.Write(appendControl(nil, frameBye, sess.delivered()))
	w.stopWrite()
	for err == nil && !sess.peerBye.Load() && !c.ended.Load() {
		<-w.s.wake // the peer's bye, or Close's timer
	}
	return err
}
