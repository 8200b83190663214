// Package packet sends typed packets over a network connection and keeps
// sending across reconnects.
//
// A Packet is a type byte and a payload; its wire encoding is the type, an
// 8 byte big-endian signed length, and the payload. A Decoder reads packets
// from any io.Reader within a size limit.
//
// A Stream carries packets over a connection that can be replaced while it
// runs: send on its Outgoing channel, receive from Incoming, and when the
// connection drops, hand a new one to SetConnection (or let KeepConnected
// dial). Keep-alive and a write timeout find connections that died without a
// word, and resumable sessions (Stream.EnableResume, Sessions) deliver every
// packet exactly once across reconnects. The Stream type's documentation
// says which goroutines may do what.
//
// The sections below specify the wire format, enough to write a peer in
// another language.
//
// # Data packets
//
// Every frame starts with a 9 byte header: a type byte and an 8 byte
// big-endian signed length. A data packet is the header and length bytes of
// payload, byte for byte as the original aerogo/packet wrote it:
//
//	+------+---------------------------------+-------------
//	| type | length: int64, big-endian, >= 0 | payload ...
//	+------+---------------------------------+-------------
//
// The type (Packet.Type) is any byte the application chooses. On a byte
// stream (TCP, TLS, a Unix socket) frames follow each other with nothing in
// between.
//
// # Control frames
//
// The original never writes a negative length, so a header whose length has
// its top bit set is a control frame, and no data packet can be one. Its type
// byte is the frame's kind, and its length field holds ^x, the bitwise
// complement of a 63-bit argument x. It has no payload, except as noted.
//
//	+------+---------------------------------+
//	| kind | ^x: 8 bytes, big-endian         |
//	+------+---------------------------------+
//
// For example, in hex:
//
//	00 0000000000000004 70696e67  New(0, []byte("ping"))
//	01 ffffffffffffffff           a ping
//	03 fffffffffffffffa           an ack of 5 packets
//
// The kinds:
//
//   - 0x01 ping, x = 0: sent by a stream with keep-alive on when nothing has
//     arrived for its interval.
//   - 0x02 pong, x = 0: sent by every stream in answer to pings; pings read
//     before the answer goes out share one pong.
//   - 0x03 ack, x = taken: sent in a resumable session.
//   - 0x04 hello, x = read, then a 16 byte token: sent by the dialing side
//     first on each connection of a resumable session.
//   - 0x05 welcome, x = read, then a 16 byte token: the accepting side's
//     answer to a hello.
//   - 0x06 lost, x = 0, then a 16 byte token: the accepting side's answer
//     to a hello whose token it does not know; a new session is started
//     under this token.
//   - 0x07 bye, x = delivered: ends a resumable session.
//   - 0x08 limit, x = the largest payload its sender accepts: follows every
//     hello and every welcome at once.
//   - 0x09 full, x = 0: the accepting side's answer to a hello for a new
//     session when it holds as many sessions as it may, each with its
//     client connected (ErrTooManySessions); it closes the connection.
//
// Kind 0x00 is not used. Frame kinds 0x0a and up are reserved.
//
// Control frames are sent only when the user opted in: a stream without
// SetKeepAlive or EnableResume, not from Sessions, and whose peer sends no
// ping, writes data packets only. The original library cannot read a
// control frame. Control frames never reach Incoming, and a Decoder refuses
// them like any negative length. On a byte stream, a stream that reads an
// unknown kind drops the connection (ErrNegativeLength), and one that reads
// a known kind out of place drops it with ErrHandshake: a session kind on a
// stream without a session, or a hello, welcome, lost or limit after the
// handshake. Anything that arrives counts as life for keep-alive.
//
// # Resumable sessions
//
// A session joins a dialing side (Stream.EnableResume) and an accepting side
// (Sessions.Accept) across any number of byte stream connections. Each side
// numbers the data packets it sends in the session from 0, and counts three
// things of the peer's: read, the packets it has read and kept; delivered,
// those it has put into Incoming; taken, those its application has taken
// from Incoming. taken <= delivered <= read, and each only grows. Each
// connection starts with a handshake, before any other frame:
//
//  1. The dialing side sends hello with its read count and the session's
//     token, or count 0 and 16 zero bytes for a new session, and its limit;
//     then it waits.
//  2. For a zero token the accepting side starts a session and sends welcome
//     with count 0 and a new token of 16 random bytes, never all zero; for a
//     token it knows, welcome with its read count and a fresh token, which
//     names the session from then on. The token in the hello keeps working
//     only until the dialing side shows it has the fresh one, by any frame
//     sent after the welcome (a stream sends an ack at once), so a welcome
//     lost on the way costs no session and a stolen token is of no use
//     after the client's next connection.
//     Its limit follows. A count the session cannot resume from (below
//     what the dialing side acknowledged, above what was sent) ends the
//     session, and the hello is answered as in step 3.

//  3. For a token it does not know (a restart, an expired or evicted
//     session) it starts a new session and sends lost, with count 0, the new
//     session's token and its limit. Every packet of the old session not
//     acknowledged is sent again, numbered from 0 in the new one. A welcome
//     and a lost both carry the token in bytes 9 to 24 of the answer, as a
//     hello does in bytes 9 to 24 of the question, so a proxy can route a
//     connection to the server that holds its session.
//  4. Each side then sends the packets the other has not read, from the
//     count it was given, then new ones, leaving out any over the other's
//     limit (reported on the sender with ErrTooLarge).
//
// The token in bytes 9 to 24 is what a load balancer routes on; see the
// README's "Scaling out" for a configuration of HAProxy.
//
// A hello's count only says where to resume: the packets before it stay
// with their sender until acknowledged. The connection is dropped with
// ErrHandshake for a count below what its sender had already acknowledged
// or above what the other side sent, a first frame that is not a hello,
// any other answer to a hello, a greeting without its limit, an answer with
// a zero token, or a lost in answer to a hello for a new session. Each side
// waits at most 10 s for the other's handshake frames
// (Sessions.SetHandshakeTimeout and Stream.SetHandshakeTimeout set it).
//
// Acks carry the taken count and are cumulative: the receiver of count n
// may forget its packets numbered below n, since the peer's application has
// them; what the peer only read is kept, so that a peer whose process died
// is sent it again. An ack below an earlier one, or above what was sent,
// drops the connection with ErrHandshake. This package acks after each
// 32 KiB read, headers included, and within 10 ms of a packet arriving;
// while packets wait in Incoming it looks again every 10 ms as long as the
// application takes some, twice as long apart each time up to 1 s while it
// takes none, and sends nothing while nothing changes. A sender keeps
// what is not acknowledged up to its replay limit (1 MiB of headers and
// payloads by default) and then sends nothing new.
//
// Close, on either side, sends what is queued (within the close timeout),
// then stops delivering what it reads and sends a bye with its delivered
// count, which the peer takes as its last ack; data read after it is
// dropped and left for its sender to count unsent. A side that reads a bye
// answers with its own and closes; the side that closed first waits for
// that answer, then closes the connection. So each side knows exactly which
// of its packets the other delivered. A bye's count must lie between the
// last ack and what was sent, or the connection is dropped with
// ErrHandshake. The session cannot be resumed after a bye. Without one,
// Sessions keeps a session whose client has gone for 2 minutes
// (Sessions.SetExpiry).
//
// # Datagrams
//
// Over a datagram connection (UDP, unixgram) each datagram holds whole
// frames in the same encoding, several packed together up to 1,400 bytes; a
// larger packet goes alone. A datagram whose frames do not fill it exactly,
// or with a refused header, is skipped whole (ErrMalformed, ErrTooLarge,
// ErrNegativeLength) and the connection stays up. A datagram carries only
// ping and pong; any other control frame makes it refused
// (ErrNegativeLength). Sessions need a byte stream.
//
// # Limits
//
// A reader refuses a length over its limit (DefaultMaxSize, 16 MiB, unless
// set) before it allocates; on a byte stream it then drops the connection,
// since the next header cannot be found. Over a datagram connection a
// packet is at most 65,507 bytes with its header. A hello or welcome is 25
// bytes, and so 34 with its limit frame; every other control frame is 9.
package packet

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
)

// Packet is one typed message: a type byte chosen by the application and a
// payload.
//
// The wire encoding is 1 byte Type, 8 bytes big-endian signed length, then
// the payload, byte for byte as the original aerogo/packet wrote it.
type Packet struct {
	Type byte

	// Length is len(Data) in every packet that New returns and in every
	// packet this package decodes. It is kept for the original's users: the
	// length on the wire is always len(Data), so a packet whose Length
	// disagrees is encoded from Data, and nothing here reads Length.
	Length int64

	Data []byte
}

// Decoder reads packets from a byte stream, one at a time.
//
// It reads exactly the bytes of each packet and no more, so it composes with
// any io.Reader; give it a buffered reader when the source is a connection.
// Small payloads are carved from shared blocks (see Decode); a Decoder is not
// safe for concurrent use.
type Decoder struct {
	r       io.Reader
	maxSize int
	header  [HeaderSize]byte
	slab    []byte
	packets []Packet
	// grown counts the blocks and groups allocated so far: the first are
	// small, so a connection that carries a few packets costs little, and
	// they double up to full size while traffic keeps coming.
	slabs, groups uint8
	// parked is set by idle, which put the rest of slab and packets in
	// carvings, and cleared by unpark, which takes a carving back. box
	// carries them there and back, so that parking allocates nothing.
	parked bool
	box    *carving
	// spare is a released packet whose payload alloc handed out; newPacket
	// reuses it.
	spare *Packet
	// control is set by a Stream's reader, which takes control frames:
	// Decode returns one as a nil packet, with the frame in frame.
	control bool
	frame   controlFrame
	// received counts the bytes read since the decoder was made or reset:
	// what the peer has paid for, and so may be trusted with.
	received int64
}

// HeaderSize is the length of a packet's header on the wire: the type byte
// and the 8 byte length.
const HeaderSize = 9

// DefaultMaxSize is the largest payload a Decoder or a Stream accepts unless
// told otherwise: 16 MiB.
const DefaultMaxSize = 16 << 20

// Errors of this package, wrapped with detail where they are returned or
// reported; match them with errors.Is.
var (
	// ErrTooLarge means a payload is longer than the limit in force: the
	// decoder's or stream's maximum, or what fits in one datagram.
	ErrTooLarge = errors.New("packet: payload too large")

	// ErrNegativeLength means a header claimed a length below zero.
	ErrNegativeLength = errors.New("packet: negative length")

	// ErrMalformed means a datagram's bytes do not form whole packets.
	ErrMalformed = errors.New("packet: malformed datagram")

	// ErrNilPacket means a nil *Packet was sent on a Stream's Outgoing. It
	// is reported and skipped, and the packets around it go out.
	ErrNilPacket = errors.New("packet: nil packet sent")

	// ErrUnsent means a Stream was closed with packets it could not send.
	ErrUnsent = errors.New("packet: stream closed with packets unsent")

	// ErrHandshake means a resumable connection's handshake, or a control
	// frame of its session, was not what the protocol allows.
	ErrHandshake = errors.New("packet: bad session handshake")

	// ErrSessionLost means the accepting side no longer knew a resumable
	// stream's session (it expired, or the server restarted): the stream
	// started a new one and sends again what was not acknowledged, so the
	// new server may receive a packet the old one had already received.
	ErrSessionLost = errors.New("packet: session lost")

	// ErrTooManySessions means Sessions refused a new session: it holds as
	// many as SetMaxSessions allows, each with its client connected.
	ErrTooManySessions = errors.New("packet: too many sessions")

	// ErrSessionEnded means the peer ended the session while this side still
	// had packets to send.
	ErrSessionEnded = errors.New("packet: session ended by the peer")
)

const (
	// slabSize is the block that small received payloads are carved from.
	slabSize = 32 << 10
	// slabMax is the largest payload carved from a block; larger ones get
	// their own allocation.
	slabMax = 2 << 10
	// trustedSize is the largest payload allocated whole as soon as its
	// header arrives; see readPayload for larger ones.
	trustedSize = 64 << 10
	// packetBlock is how many Packet values are allocated at once, at most.
	packetBlock = 64
	// firstSlab and firstGroup are the sizes of a decoder's first block and
	// group; each next one is twice as large, up to slabSize and packetBlock.
	firstSlab  = 512
	firstGroup = 2
	// copyLimit is the largest payload that a batch copies next to its
	// header; larger payloads are written in place (writev).
	copyLimit = 16 << 10
)

// carving is the unused rest of a decoder's block and group of Packet
// values.
type carving struct {
	slab    []byte
	packets []Packet
}

// carvings holds the carvings of decoders whose readers wait for input
// (Decoder.idle), for any decoder to carve from next: a quiet connection
// holds no block of its own, and one that wakes carves on without
// allocating.
var carvings sync.Pool

// writePool holds the batches Packet.Write encodes with, each with room for
// one copied payload.
var writePool = sync.Pool{New: func() any { return &batch{buf: make([]byte, 0, HeaderSize+copyLimit)} }}

// batch is the encoding of packets for one write: small payloads are copied
// next to their headers, large ones are referred to in place, so the whole
// batch goes out with one Write or one writev. Packet.Write and the Stream's
// writer both use it.
type batch struct {
	buf   []byte      // headers, control frames and copied payloads
	vec   net.Buffers // set once a payload is referred to in place
	out   net.Buffers // what writeTo has left to write
	start int         // buf[start:] is not yet in vec
}

// New returns a packet of the given type carrying data. The packet refers to
// data; it does not copy it.
func New(byteCode byte, data []byte) *Packet {
	return &Packet{Type: byteCode, Length: int64(len(data)), Data: data}
}

// Bytes returns the packet's wire encoding in a new slice.
func (p *Packet) Bytes() []byte {
	b, _ := p.AppendBinary(make([]byte, 0, HeaderSize+len(p.Data)))
	return b
}

// AppendBinary appends the packet's wire encoding to b and returns the
// extended slice. It never fails; the error is there for
// encoding.BinaryAppender.
func (p *Packet) AppendBinary(b []byte) ([]byte, error) {
	b = appendHeader(b, p.Type, len(p.Data))
	return append(b, p.Data...), nil
}

// Write writes the packet to w: with one Write call when the payload is
// small, and without copying the payload (writev on a TCP connection) when it
// is large.
func (p *Packet) Write(w io.Writer) error {
	b := writePool.Get().(*batch)
	buf := b.encode(b.buf, p)
	var err error
	if len(b.vec) == 0 {
		_, err = w.Write(buf) // b.buf is still empty
	} else {
		b.buf = buf
		_, err = b.writev(w)
	}
	writePool.Put(b)
	return err
}

// add appends p to the batch.
func (b *batch) add(p *Packet) {
	b.buf = b.encode(b.buf, p)
}

// encode appends p's header to buf, and its payload too when it is small;
// a large payload is referred to in place, after what buf holds so far. It
// returns the extended buf, which the batch's buf must become before a
// write.
func (b *batch) encode(buf []byte, p *Packet) []byte {
	data := p.Data // read once; after appendHeader the compiler would load it again
	buf = appendHeader(buf, p.Type, len(data))
	if copies(len(data)) {
		return append(buf, data...)
	}
	b.vec = append(b.vec, buf[b.start:], data)
	b.start = len(buf)
	return buf
}

// copies tells whether a batch copies a payload of n bytes next to its
// header; a larger one is referred to in place.
func copies(n int) bool {
	return n <= copyLimit
}

// writeTo writes the batch with one call and returns how many bytes went
// out. The batch is empty afterwards, its buffers kept for reuse.
func (b *batch) writeTo(w io.Writer) (int64, error) {
	if len(b.vec) > 0 {
		return b.writev(w)
	}
	n, err := w.Write(b.buf)
	b.buf, b.start = b.buf[:0], 0
	return int64(n), err
}

// writev is writeTo for a batch that refers to payloads in place.
func (b *batch) writev(w io.Writer) (int64, error) {
	if b.start < len(b.buf) {
		b.vec = append(b.vec, b.buf[b.start:])
	}
	// WriteTo consumes the slice it is called on; a field of b, unlike a
	// local copy, does not escape to the heap on every call.
	b.out = b.vec
	n, err := b.out.WriteTo(w)
	b.reset()
	return n, err
}

// reset empties the batch and drops its references to payloads.
func (b *batch) reset() {
	clear(b.vec)
	b.buf, b.vec, b.out, b.start = b.buf[:0], b.vec[:0], nil, 0
}

// Release hands a received packet back for reuse: a later packet read by
// any Stream or Decoder of this process may reuse the packet and its
// payload's memory. It is optional; a packet never released is reclaimed by
// the garbage collector as usual.
//
// The rule: release only a packet you received (from Incoming or Decode),
// once, when nothing refers to it or to its Data any more; after Release,
// do not touch the packet or its Data again. Never release a packet you
// sent on Outgoing. Payloads up to 2 KiB share memory with other packets
// and are not reused, so releasing them only sets Data to nil; releasing a
// packet a second time does nothing.
func (p *Packet) Release() {
	c := cap(p.Data)
	if c <= slabMax {
		p.Data = nil
		return
	}
	if len(p.Data) == 0 {
		return // released already
	}
	k := classAtMost(c)
	if k < 0 {
		p.Data = nil
		return
	}
	releasing.Store(true)
	p.Type, p.Length, p.Data = 0, 0, p.Data[:0]
	released[k].Put(p)
}

// Released packets wait for reuse in pools by the capacity of their
// payload: pool k holds packets with at least classSize(k) bytes of
// capacity. There are four classes per doubling, from 4 KiB to 64 MiB, so a
// reused payload wastes at most a quarter of its capacity.
var (
	released  [numClasses]sync.Pool
	releasing atomic.Bool // Release was called: payloads get a class's capacity
)

const (
	minClass   = 4 << 10
	numClasses = 4 * 15 // 4 KiB to 64 MiB
)

// classSize is the capacity of size class k.
func classSize(k int) int {
	return minClass << (k / 4) * (4 + k%4) / 4
}

// classAtLeast returns the smallest class of at least n bytes, or -1.
func classAtLeast(n int) int {
	for k := range numClasses {
		if classSize(k) >= n {
			return k
		}
	}
	return -1
}

// classAtMost returns the largest class of at most c bytes, or -1.
func classAtMost(c int) int {
	k := classAtLeast(c)
	switch {
	case k < 0:
		return numClasses - 1
	case classSize(k) > c:
		return k - 1
	}
	return k
}

// reuse returns a released packet whose payload can hold n bytes, or nil.
func reuse(n int) *Packet {
	if !releasing.Load() {
		return nil
	}
	if k := classAtLeast(n); k >= 0 {
		if p, _ := released[k].Get().(*Packet); p != nil {
			return p
		}
	}
	return nil
}

// makePayload allocates an n byte payload. Once packets are being released,
// its capacity is rounded up to a size class, so that it can be reused for
// the next payload of about the same size.
func makePayload(n int) []byte {
	if releasing.Load() {
		if k := classAtLeast(n); k >= 0 {
			return make([]byte, n, classSize(k))
		}
	}
	return make([]byte, n)
}

// NewDecoder returns a decoder that reads packets from r and refuses
// payloads larger than DefaultMaxSize.
func NewDecoder(r io.Reader) *Decoder {
	return &Decoder{r: r, maxSize: DefaultMaxSize}
}

// SetMaxSize sets the largest payload, in bytes, that Decode accepts.
func (d *Decoder) SetMaxSize(n int) {
	d.maxSize = n
}

// Reset makes the decoder read from r, keeping its limit.
func (d *Decoder) Reset(r io.Reader) {
	d.r = r
	d.received = 0
}

// Decode reads the next packet.
//
// It keeps the contract of encoding/binary.Read: the error is io.EOF only if
// no byte of the packet was read, and io.ErrUnexpectedEOF if the input ended
// part-way. A length that is negative or over the limit returns an error
// wrapping ErrNegativeLength or ErrTooLarge before any payload is read; a byte
// stream cannot recover from that, so stop reading it. Memory follows the
// bytes that arrive, not the length a header claims.
//
// Every returned packet and payload is the caller's: the decoder never
// writes to them again. Small payloads share memory with their neighbours,
// so keeping one small packet keeps up to 128 KiB of them alive.
func (d *Decoder) Decode() (*Packet, error) {
	m, err := io.ReadFull(d.r, d.header[:])
	d.received += int64(m)
	if err != nil {
		return nil, err
	}
	if d.control && isControl(d.header[:]) {
		d.frame, err = parseControl(d.header[:])
		return nil, err
	}
	typ, n, err := parseHeader(d.header[:], d.maxSize)
	if err != nil {
		return nil, err
	}
	data, err := d.readPayload(n)
	if err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return nil, err
	}
	if n > slabMax {
		return d.largePacket(typ, data), nil
	}
	return d.newPacket(typ, data), nil
}

// readPayload reads an n byte payload.
//
// A payload up to trustedSize, or up to what the peer has sent so far on
// this reader, is allocated whole at once. A larger claim from a peer that
// has sent less is not trusted: its buffer starts at trustedSize and grows
// fourfold at a time as bytes arrive, so a claim costs at most about four
// times what was actually sent. In steady state a large payload is one
// allocation.
func (d *Decoder) readPayload(n int) ([]byte, error) {
	if n <= trustedSize || int64(n) <= d.received {
		var data []byte
		if n > slabMax {
			data = d.allocLarge(n)
		} else {
			data = d.alloc(n)
		}
		m, err := io.ReadFull(d.r, data)
		d.received += int64(m)
		return data, err
	}
	data := make([]byte, trustedSize)
	got := 0
	for {
		m, err := io.ReadFull(d.r, data[got:])
		got += m
		d.received += int64(m)
		if err != nil {
			return nil, err
		}
		if got == n {
			return data, nil
		}
		grown := make([]byte, min(n, 4*got))
		copy(grown, data)
		data = grown
	}
}

// alloc returns a small payload of n bytes, carved from the current block.
// Its capacity is n, so appending to one payload never overwrites the next.
// Small and large payloads take separate paths so that the small ones
// inline.
func (d *Decoder) alloc(n int) []byte {
	if n > len(d.slab) {
		d.newSlab(n)
	}
	b := d.slab[:n:n]
	d.slab = d.slab[n:]
	return b
}

// allocLarge returns a payload of its own for n bytes: a released one if
// there is one, kept in spare for newPacket.
func (d *Decoder) allocLarge(n int) []byte {
	if p := reuse(n); p != nil {
		d.spare = p
		return p.Data[:n]
	}
	return makePayload(n)
}

// newSlab starts a block that holds at least n bytes.
func (d *Decoder) newSlab(n int) {
	size := min(firstSlab<<min(int(d.slabs), 6), slabSize)
	d.slab = make([]byte, max(size, n))
	d.slabs = min(d.slabs+1, 6)
}

// newPacket returns a packet for a small payload, carved from the current
// group of Packet values. A larger payload gets a packet of its own
// (largePacket), since a group keeps every payload its packets point to alive
// for as long as any of them is kept.
func (d *Decoder) newPacket(typ byte, data []byte) *Packet {
	if len(d.packets) == 0 {
		d.newGroup()
	}
	p := &d.packets[0]
	d.packets = d.packets[1:]
	p.Type, p.Length, p.Data = typ, int64(len(data)), data
	return p
}

// largePacket returns a packet of its own for a large payload: the released
// one its payload came with, if any.
func (d *Decoder) largePacket(typ byte, data []byte) *Packet {
	p := d.spare
	if p == nil {
		p = new(Packet)
	}
	d.spare = nil
	p.Type, p.Length, p.Data = typ, int64(len(data)), data
	return p
}

// newGroup starts a group of Packet values.
func (d *Decoder) newGroup() {
	d.packets = make([]Packet, min(firstGroup<<min(int(d.groups), 5), packetBlock))
	d.groups = min(d.groups+1, 5)
}

// idle parks the rest of the current block and group in carvings. A
// Stream's reader calls it before a read that may wait, and unpark once the
// read returns, so that while it waits the connection holds neither: the
// blocks that packets were carved from are kept alive by those packets
// only, and the rest is carved by whichever decoder wakes next. The growth
// counts are kept, so a block allocated after a burst is still full size.
func (d *Decoder) idle() {
	// An empty rest still points into its block.
	if len(d.slab) == 0 {
		d.slab = nil
	}
	if len(d.packets) == 0 {
		d.packets = nil
	}
	if d.slab == nil && d.packets == nil {
		return
	}
	c := d.box
	if c == nil {
		c = new(carving)
	}
	d.box = nil
	c.slab, c.packets = d.slab, d.packets
	d.slab, d.packets = nil, nil
	d.parked = true
	carvings.Put(c)
}

// unpark takes a parked carving back after idle, if one is left, to carve
// from.
func (d *Decoder) unpark() {
	if !d.parked {
		return
	}
	d.parked = false
	c, _ := carvings.Get().(*carving)
	if c == nil {
		return
	}
	d.slab, d.packets = c.slab, c.packets
	c.slab, c.packets = nil, nil
	d.box = c
}

// decodeDatagram decodes every frame in one datagram: packets go to deliver,
// control frames to control. It checks the whole datagram before it passes
// anything on, so a malformed datagram yields nothing at all. The payloads
// are copied: b may be reused by the caller.
func (d *Decoder) decodeDatagram(b []byte, deliver func(*Packet) bool, control func(controlFrame)) error {
	for rest := b; len(rest) > 0; {
		if len(rest) < HeaderSize {
			return fmt.Errorf("%w: %d bytes left after the last whole packet", ErrMalformed, len(rest))
		}
		if isControl(rest) {
			if f, err := parseControl(rest); err != nil {
				return err
			} else if f.kind != framePing && f.kind != framePong {
				// Sessions need a byte stream: a datagram carries only
				// keep-alive frames.
				return fmt.Errorf("%w: type %d, which no datagram carries", ErrNegativeLength, f.kind)
			}
			rest = rest[HeaderSize:]
			continue
		}
		_, n, err := parseHeader(rest, d.maxSize)
		if err != nil {
			return err
		}
		if n > len(rest)-HeaderSize {
			return fmt.Errorf("%w: header claims %d bytes, %d present", ErrMalformed, n, len(rest)-HeaderSize)
		}
		rest = rest[HeaderSize+n:]
	}
	for len(b) > 0 {
		if isControl(b) {
			f, _ := parseControl(b)
			control(f)
			b = b[HeaderSize:]
			continue
		}
		typ, n, _ := parseHeader(b, d.maxSize)
		var p *Packet
		if n > slabMax {
			p = d.largePacket(typ, d.allocLarge(n))
		} else {
			p = d.newPacket(typ, d.alloc(n))
		}
		copy(p.Data, b[HeaderSize:])
		b = b[HeaderSize+n:]
		if !deliver(p) {
			return nil
		}
	}
	return nil
}

// Int64ToBytes returns the 8 byte big-endian encoding of i, the form of a
// packet's length on the wire. It is kept for the original's users; new code
// can call binary.BigEndian.AppendUint64 from encoding/binary.
func Int64ToBytes(i int64) []byte {
	return binary.BigEndian.AppendUint64(make([]byte, 0, 8), uint64(i))
}

// Int64FromBytes reads a big-endian int64 from the first 8 bytes of b. With
// fewer bytes it returns an error, as encoding/binary.Read does: io.EOF for
// none, io.ErrUnexpectedEOF for some. It is kept for the original's users;
// new code can call binary.BigEndian.Uint64 from encoding/binary.
func Int64FromBytes(b []byte) (int64, error) {
	switch {
	case len(b) == 0:
		return 0, io.EOF
	case len(b) < 8:
		return 0, io.ErrUnexpectedEOF
	}
	return int64(binary.BigEndian.Uint64(b)), nil
}

// appendHeader appends a packet header for an n byte payload to b.
func appendHeader(b []byte, typ byte, n int) []byte {
	b = append(b, typ)
	return binary.BigEndian.AppendUint64(b, uint64(n))
}

// parseHeader reads the header at the start of b and checks the length
// against max.
func parseHeader(b []byte, max int) (typ byte, n int, err error) {
	length := int64(binary.BigEndian.Uint64(b[1:HeaderSize]))
	switch {
	case length < 0:
		return 0, 0, fmt.Errorf("%w: %d", ErrNegativeLength, length)
	case length > int64(max):
		return 0, 0, fmt.Errorf("%w: %d bytes, limit %d", ErrTooLarge, length, max)
	}
	return b[0], int(length), nil
}

// controlFrame is a frame no data packet can be: a header whose length field
// is negative, which the original library never writes. Its type byte says
// what it is, and its length field holds the bitwise complement of a 63-bit
// argument. Only a Stream sends and reads them, and only once its user opted
// in to what needs them; a Decoder refuses them like any negative length.
type controlFrame struct {
	kind byte
	arg  uint64
}

// The control frames, as the package doc specifies them.
const (
	framePing    = 0x01 // asks for a pong; argument 0
	framePong    = 0x02 // answers a ping; argument 0
	frameAck     = 0x03 // argument: packets the application took in the session so far
	frameHello   = 0x04 // opens a resumable connection; argument: packets read; a 16 byte token follows
	frameWelcome = 0x05 // accepts a hello; argument: packets read; a 16 byte token follows
	frameLost    = 0x06 // refuses a hello whose session is unknown; argument 0
	frameBye     = 0x07 // ends the session; argument: packets delivered
	frameLimit   = 0x08 // follows each hello and welcome; argument: the largest payload its sender accepts
	frameFull    = 0x09 // refuses a hello for a new session: too many sessions; argument 0
)

// isControl tells whether the header at the start of b is a control frame.
func isControl(b []byte) bool {
	return b[1]&0x80 != 0
}

// parseControl reads the control frame at the start of b. A kind this
// package does not know is an error wrapping ErrNegativeLength, as the same
// header is to a Decoder.
func parseControl(b []byte) (controlFrame, error) {
	length := int64(binary.BigEndian.Uint64(b[1:HeaderSize]))
	if b[0] < framePing || b[0] > frameFull {
		return controlFrame{}, fmt.Errorf("%w: %d with type %d, which is no control frame", ErrNegativeLength, length, b[0])
	}
	return controlFrame{kind: b[0], arg: ^uint64(length)}, nil
}

// appendControl appends a control frame to b.
func appendControl(b []byte, kind byte, arg uint64) []byte {
	b = append(b, kind)
	return binary.BigEndian.AppendUint64(b, ^arg)
}
