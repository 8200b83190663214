package packet_test

import (
	"errors"
	"io"
	"net"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/aerogo/packet"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// proxy forwards loopback TCP connections to a target address. It can be
// told to stop forwarding, both ways, without closing anything: a black
// hole, as a peer whose machine lost power or a NAT that forgot the
// connection looks from either end.
type proxy struct {
	ln     net.Listener
	target string
	hole   atomic.Bool
	wg     sync.WaitGroup
	mu     sync.Mutex
	conns  []net.Conn
}

// newProxy starts a proxy to target, stopped when the test ends.
func newProxy(t testing.TB, target string) *proxy {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	p := &proxy{ln: ln, target: target}
	p.wg.Add(1)
	go p.serve()
	t.Cleanup(p.close)
	return p
}

func (p *proxy) addr() string { return p.ln.Addr().String() }

func (p *proxy) serve() {
	defer p.wg.Done()
	for {
		in, err := p.ln.Accept()
		if err != nil {
			return
		}
		out, err := net.Dial("tcp", p.target)
		if err != nil {
			in.Close()
			continue
		}
		p.mu.Lock()
		p.conns = append(p.conns, in, out)
		p.mu.Unlock()
		p.wg.Add(2)
		go p.forward(out, in)
		go p.forward(in, out)
	}
}

// forward copies from src to dst, dropping what it reads while the hole is
// open.
func (p *proxy) forward(dst, src net.Conn) {
	defer p.wg.Done()
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 && !p.hole.Load() {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			dst.Close()
			return
		}
	}
}

func (p *proxy) close() {
	p.ln.Close()
	p.mu.Lock()
	for _, c := range p.conns {
		c.Close()
	}
	p.mu.Unlock()
	p.wg.Wait()
}

// listen returns a loopback listener closed when the test ends.
func listen(t testing.TB) net.Listener {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	t.Cleanup(func() { ln.Close() })
	return ln
}

// acceptStreams accepts connections on ln and passes each, on a new stream,
// to out, until ln is closed.
func acceptStreams(t testing.TB, ln net.Listener, out chan<- *packet.Stream) {
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s := packet.NewStream(64)
			t.Cleanup(func() { s.Close() })
			s.SetConnection(c)
			out <- s
		}
	}()
}

// A peer that went silent behind a black hole is found by keep-alive within
// about one timeout and reported with os.ErrDeadlineExceeded; packets queued
// afterwards go out on the next connection.
func TestKeepAliveFindsBlackHole(t *testing.T) {
	ln := listen(t)
	servers := make(chan *packet.Stream, 4)
	acceptStreams(t, ln, servers)
	px := newProxy(t, ln.Addr().String())

	client := newStream(t, 64)
	errs := collectErrors(client)
	conn, err := net.Dial("tcp", px.addr())
	require.NoError(t, err)
	client.SetConnection(conn)
	const interval, timeout = 50 * time.Millisecond, 300 * time.Millisecond
	client.SetKeepAlive(interval, timeout) // on the live connection
	server := <-servers
	client.Outgoing <- packet.New(1, []byte("before"))
	assert.Equal(t, "before", string(receive(t, server).Data))

	px.hole.Store(true)
	start := time.Now()
	e := receiveError(t, errs)
	took := time.Since(start)
	assert.ErrorIs(t, e.Error, os.ErrDeadlineExceeded)
	assert.Equal(t, conn, e.Connection)
	assert.GreaterOrEqual(t, took, timeout-interval, "not failed before the timeout")
	assert.Less(t, took, 5*time.Second)

	for i := range 10 {
		client.Outgoing <- numbered(i, 8)
	}
	conn2, err := net.Dial("tcp", ln.Addr().String())
	require.NoError(t, err)
	client.SetConnection(conn2)
	server2 := <-servers
	for i := range 10 {
		assert.Equal(t, i, number(receive(t, server2)))
	}
	assert.Empty(t, errs)
}

// A quiet peer that is alive is never failed: not with keep-alive on both
// ends, nor with it on only one, whose pings the other answers.
func TestKeepAliveQuietPeerStaysUp(t *testing.T) {
	const interval, timeout = 10 * time.Millisecond, 50 * time.Millisecond
	for _, tc := range []struct {
		name   string
		aOn    bool
		bOn    bool
		viaUDP bool
	}{
		{"both", true, true, false},
		{"only dialer", true, false, false},
		{"only acceptor", false, true, false},
		{"udp, one end", true, false, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var a, b *packet.Stream
			if tc.viaUDP {
				a, b = udpStreams(t, 16)
			} else {
				ca, cb := tcpPair(t)
				a, b = streamsOn(t, ca, cb, 16)
			}
			errs := make(chan packet.IOError, 16)
			for _, s := range []*packet.Stream{a, b} {
				s.OnError(func(e packet.IOError) { errs <- e })
			}
			if tc.aOn {
				a.SetKeepAlive(interval, timeout)
			}
			if tc.bOn {
				b.SetKeepAlive(interval, timeout)
			}
			select {
			case e := <-errs:
				require.FailNow(t, "a quiet live peer was failed", "%v", e.Error)
			case <-time.After(10 * timeout):
			}
			a.Outgoing <- packet.New(1, []byte("still"))
			assert.Equal(t, "still", string(receive(t, b).Data))
			b.Outgoing <- packet.New(2, []byte("here"))
			assert.Equal(t, "here", string(receive(t, a).Data))
			assert.Empty(t, a.Incoming, "pings and pongs are never delivered")
			assert.Empty(t, b.Incoming, "pings and pongs are never delivered")
		})
	}
}

// A peer that accepts and never reads trips the write timeout; the packets
// not completely written arrive, in order, on the next connection.
func TestWriteTimeoutPeerNotReading(t *testing.T) {
	ln := listen(t)
	stuck, err := net.Dial("tcp", ln.Addr().String())
	require.NoError(t, err)
	stuckPeer, err := ln.Accept()
	require.NoError(t, err)
	t.Cleanup(func() { stuckPeer.Close() })

	s := newStream(t, 16)
	errs := collectErrors(s)
	s.SetConnection(stuck)
	s.SetWriteTimeout(100 * time.Millisecond)

	const n = 2000 // 32 MiB: more than the kernel buffers of both ends hold
	go func() {
		for i := range n {
			s.Outgoing <- numbered(i, 16<<10)
		}
	}()
	e := receiveError(t, errs)
	assert.ErrorIs(t, e.Error, os.ErrDeadlineExceeded)
	assert.Equal(t, stuck, e.Connection)

	// What the stuck peer's kernel took, it can still read: a prefix.
	firstGot := make(chan int, n)
	readNumbers(stuckPeer, firstGot)
	close(firstGot)
	next := 0
	for i := range firstGot {
		require.Equal(t, next, i)
		next++
	}
	require.Less(t, next, n, "the write timed out before everything was written")

	fresh, peer := dialAccept(t, ln)
	s.SetConnection(fresh)
	got := make(chan int, n)
	go readNumbers(peer, got)
	first := <-got
	assert.LessOrEqual(t, first, next, "no packet is lost between the connections")
	for i := first + 1; i < n; i++ {
		select {
		case m := <-got:
			require.Equal(t, i, m)
		case <-time.After(10 * time.Second):
			require.FailNow(t, "packets missing", "after %d", i-1)
		}
	}
	assert.Empty(t, errs)
}

// Over UDP, keep-alive finds a peer that no longer answers; packets queued
// afterwards go out on the next socket.
func TestKeepAliveUDPBlackHole(t *testing.T) {
	a, void := udpPair(t)
	go io.Copy(io.Discard, void) // reads everything, answers nothing

	s := newStream(t, 16)
	errs := collectErrors(s)
	s.SetKeepAlive(20*time.Millisecond, 120*time.Millisecond)
	s.SetConnection(a)
	e := receiveError(t, errs)
	assert.ErrorIs(t, e.Error, os.ErrDeadlineExceeded)
	assert.Equal(t, a, e.Connection)

	s.Outgoing <- packet.New(1, []byte("queued"))
	b, peerConn := udpPair(t)
	peer := newStream(t, 16)
	peer.SetConnection(peerConn)
	s.SetConnection(b)
	assert.Equal(t, "queued", string(receive(t, peer).Data))
	assert.Empty(t, errs)
}

// A ping is answered with exactly one pong frame: the bytes on the wire.
func TestPingAnsweredWithPong(t *testing.T) {
	a, raw := tcpPair(t)
	s := newStream(t, 16)
	s.SetConnection(a)
	ping := []byte{0x01, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff}
	pong := []byte{0x02, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff}
	_, err := raw.Write(ping)
	require.NoError(t, err)
	got := make([]byte, len(pong))
	_, err = io.ReadFull(raw, got)
	require.NoError(t, err)
	assert.Equal(t, pong, got)
	assert.Empty(t, s.Incoming)
}

// A flood of pings gets at most one pong each, allocates nothing per ping,
// delivers nothing of its own and does not hold back data.
func TestPingFlood(t *testing.T) {
	a, raw := tcpPair(t)
	s := newStream(t, 16)
	errs := collectErrors(s)
	s.SetConnection(a)

	pongs := make(chan int, 1)
	go func() {
		n := 0
		buf := make([]byte, 9)
		for {
			if _, err := io.ReadFull(raw, buf); err != nil {
				pongs <- n
				return
			}
			n++
		}
	}()

	const rounds, pingsPerRound = 100, 1000
	var frame []byte
	for range pingsPerRound {
		frame = append(frame, 0x01, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff)
	}
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	for i := range rounds {
		_, err := raw.Write(frame)
		require.NoError(t, err)
		_, err = raw.Write(numbered(i, 8).Bytes())
		require.NoError(t, err)
		require.Equal(t, i, number(receive(t, s)), "data goes through the flood")
	}
	runtime.ReadMemStats(&after)
	assert.Less(t, after.Mallocs-before.Mallocs, uint64(rounds*pingsPerRound/10),
		"allocations for %d pings", rounds*pingsPerRound)
	require.NoError(t, s.Close())
	n := <-pongs
	assert.Greater(t, n, 0)
	assert.LessOrEqual(t, n, rounds*pingsPerRound)
	assert.Empty(t, s.Incoming)
	assert.Empty(t, errs)
}

// A control frame the stream does not know is reported like any bad header
// and drops the connection.
func TestUnknownControlFrame(t *testing.T) {
	a, raw := tcpPair(t)
	s := newStream(t, 16)
	errs := collectErrors(s)
	s.SetConnection(a)
	_, err := raw.Write([]byte{0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xfe})
	require.NoError(t, err)
	e := receiveError(t, errs)
	assert.ErrorIs(t, e.Error, packet.ErrNegativeLength)
	_, err = raw.Read(make([]byte, 1))
	assert.True(t, errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed), "dropped: %v", err)
}

// BenchmarkKeepAliveCost runs the one-way and ping-pong benchmarks with
// keep-alive off and on, side by side.
func BenchmarkKeepAliveCost(b *testing.B) {
	for _, on := range []bool{false, true} {
		name := map[bool]string{false: "off", true: "on"}[on]
		setup := func(b *testing.B) (*packet.Stream, *packet.Stream) {
			x, y := tcpStreams(b, 16)
			if on {
				x.SetKeepAlive(time.Second, 10*time.Second)
				y.SetKeepAlive(time.Second, 10*time.Second)
			}
			return x, y
		}
		b.Run("OneWay16B/"+name, func(b *testing.B) {
			sender, receiver := setup(b)
			oneWay(b, sender, receiver, 16)
		})
		b.Run("PingPong/"+name, func(b *testing.B) {
			client, server := setup(b)
			pingPong(b, client, server)
		})
	}
}

// oneWay sends b.N packets of size bytes from sender to receiver.
func oneWay(b *testing.B, sender, receiver *packet.Stream, size int) {
	p := packet.New(1, make([]byte, size))
	b.ReportAllocs()
	b.SetBytes(int64(size))
	b.ResetTimer()
	go func() {
		for range b.N {
			sender.Outgoing <- p
		}
	}()
	for range b.N {
		<-receiver.Incoming
	}
}

// pingPong makes b.N round trips of a 16 byte packet to server, which
// echoes.
func pingPong(b *testing.B, client, server *packet.Stream) {
	go func() {
		for p := range server.Incoming {
			server.Outgoing <- p
		}
	}()
	p := packet.New(1, make([]byte, 16))
	b.ReportAllocs()
	b.SetBytes(16)
	b.ResetTimer()
	for range b.N {
		client.Outgoing <- p
		<-client.Incoming
	}
}

// BenchmarkIdleStream measures what an idle stream with a connection costs:
// heap and stack bytes, and goroutines, per stream.
func BenchmarkIdleStream(b *testing.B) {
	const n = 500
	var before, after runtime.MemStats
	goroutines := 0
	for range b.N {
		b.StopTimer()
		conns := make([]net.Conn, 0, 2*n)
		for range n {
			x, y := net.Pipe()
			conns = append(conns, x, y)
		}
		runtime.GC()
		runtime.ReadMemStats(&before)
		g := runtime.NumGoroutine()
		b.StartTimer()
		streams := make([]*packet.Stream, n)
		for i := range streams {
			streams[i] = packet.NewStream(16)
			streams[i].SetConnection(conns[2*i])
		}
		b.StopTimer()
		for runtime.NumGoroutine()-g < 2*n { // every reader has started
			runtime.Gosched()
		}
		runtime.GC()
		runtime.ReadMemStats(&after)
		goroutines = runtime.NumGoroutine() - g
		for _, s := range streams {
			s.Close()
		}
		for _, c := range conns {
			c.Close()
		}
		b.StartTimer()
	}
	used := (after.HeapInuse + after.StackInuse) - (before.HeapInuse + before.StackInuse)
	b.ReportMetric(float64(used)/n, "B/stream")
	b.ReportMetric(float64(goroutines)/n, "goroutines/stream")
}
