package main

import (
	"bufio"
	"encoding/binary"
	"io"
	"net"
	"sync"

	"github.com/aerogo/packet"
)

// floor is the library's design in its barest form: a channel of packets
// each way, one goroutine that reads and decodes, one that encodes and
// writes, on the library's wire format. It has none of the library's
// guarantees: no hot swap of the connection, no resend, no size limit, no
// error reports, and Close does not wait for queued packets. What it costs
// is what the channel hand-over costs; what the library costs beyond it is
// the library's own.
type floor struct {
	Incoming <-chan *packet.Packet
	Outgoing chan<- *packet.Packet

	conn net.Conn
	done chan struct{} // closed by Close, to stop the writer
	once sync.Once
}

// newFloor starts the reader and writer on conn, with channels of n packets
// each way.
func newFloor(conn net.Conn, n int) *floor {
	in := make(chan *packet.Packet, n)
	out := make(chan *packet.Packet, n)
	f := &floor{Incoming: in, Outgoing: out, conn: conn, done: make(chan struct{})}
	go f.read(in)
	go f.write(out)
	return f
}

// read decodes packets until the connection ends, then closes Incoming.
// Every payload gets its own allocation, since the receiver keeps it.
func (f *floor) read(in chan<- *packet.Packet) {
	defer close(in)
	r := bufio.NewReader(f.conn)
	var h [packet.HeaderSize]byte
	for {
		if _, err := io.ReadFull(r, h[:]); err != nil {
			return
		}
		n := int64(binary.BigEndian.Uint64(h[1:]))
		if n < 0 {
			return // make would panic; this is no limit, just not a crash
		}
		data := make([]byte, n)
		if _, err := io.ReadFull(r, data); err != nil {
			return
		}
		// A plain send: a reader blocked on a full Incoming at Close stays
		// blocked, which no workload here does.
		in <- packet.New(h[0], data)
	}
}

// write waits for a packet, adds whatever else is queued at that moment to
// the same buffer and makes one Write of it. Taking only what is queued
// bounds a batch by the channel's size, so a sender that never pauses
// cannot grow the buffer without end.
func (f *floor) write(out <-chan *packet.Packet) {
	var buf []byte
	for {
		var p *packet.Packet
		select {
		case p = <-out:
		case <-f.done:
			return
		}
		buf = appendPacket(buf[:0], p)
		for range len(out) {
			buf = appendPacket(buf, <-out)
		}
		if _, err := f.conn.Write(buf); err != nil {
			// Closing the connection ends the reader too, so the
			// receiver sees Incoming close.
			f.conn.Close()
			return
		}
	}
}

// appendPacket appends p's wire encoding: type, 8 byte big-endian length,
// payload.
func appendPacket(b []byte, p *packet.Packet) []byte {
	b = binary.BigEndian.AppendUint64(append(b, p.Type), uint64(len(p.Data)))
	return append(b, p.Data...)
}

// Close stops the writer and closes the connection, which ends the reader.
// Packets still queued are dropped.
func (f *floor) Close() error {
	f.once.Do(func() { close(f.done) })
	return f.conn.Close()
}
