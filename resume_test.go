package packet_test

import (
	"errors"
	"io"
	"math/rand/v2"
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

// echoServer serves resumable sessions on a loopback listener: each new
// session's handler checks that packets arrive numbered 0, 1, 2, ... and
// echoes them. Closed when the test ends.
type echoServer struct {
	t        testing.TB
	ln       net.Listener
	sessions *packet.Sessions
	handlers sync.WaitGroup
	ended    chan *packet.Stream // a handler's Incoming closed
	raw      chan net.Conn       // every accepted connection
	setup    func(*packet.Stream)
	// restarted says a session may begin with any number, as one does when
	// a client sends again what a server before a restart had read.
	restarted bool
}

func newEchoServer(t testing.TB, setup func(*packet.Stream)) *echoServer {
	ln := listen(t)
	e := &echoServer{t: t, ln: ln, sessions: packet.NewSessions(64), ended: make(chan *packet.Stream, 100), raw: make(chan net.Conn, 10000), setup: setup}
	go e.serve()
	t.Cleanup(func() {
		ln.Close()
		e.sessions.Close()
		e.handlers.Wait()
	})
	return e
}

func (e *echoServer) addr() string { return e.ln.Addr().String() }

func (e *echoServer) serve() {
	for {
		c, err := e.ln.Accept()
		if err != nil {
			return
		}
		select {
		case e.raw <- c:
		default:
		}
		go func() {
			s, isNew, err := e.sessions.Accept(c)
			if err != nil || !isNew {
				return
			}
			if e.setup != nil {
				e.setup(s)
			}
			e.handlers.Add(1)
			go e.handle(s)
		}()
	}
}

// handle echoes numbered packets, checking that each arrives exactly once
// and in order.
func (e *echoServer) handle(s *packet.Stream) {
	defer e.handlers.Done()
	next := 0
	for p := range s.Incoming {
		if e.restarted && next == 0 {
			next = number(p)
		}
		if n := number(p); n != next {
			e.t.Errorf("server got %d, want %d", n, next)
		}
		next++
		s.Outgoing <- p
	}
	e.ended <- s
}

// resumableClient returns a resumable stream that keeps itself connected to
// addr(); closed when the test ends.
func resumableClient(t testing.TB, addr func() string) *packet.Stream {
	s := packet.NewStream(64)
	s.EnableResume()
	s.KeepConnected(func() (net.Conn, error) { return net.Dial("tcp", addr()) }, 20*time.Millisecond)
	t.Cleanup(func() { s.Close() })
	return s
}

// exchange sends n numbered packets on client and checks that the echoes
// come back exactly once and in order.
func exchange(t *testing.T, client *packet.Stream, n int) {
	go func() {
		for i := range n {
			client.Outgoing <- numbered(i, 8+i%40)
		}
	}()
	for i := range n {
		select {
		case p := <-client.Incoming:
			require.Equal(t, i, number(p), "echo")
		case <-time.After(20 * time.Second):
			require.FailNow(t, "echo missing", "%d of %d", i, n)
		}
	}
}

// A resumable stream talks to its session like a plain one; Close on the
// client ends the session on the server at once, and leaves no goroutine.
func TestResumeEcho(t *testing.T) {
	server := newEchoServer(t, nil)
	client := resumableClient(t, server.addr)
	exchange(t, client, 1000)
	require.NoError(t, client.Close())
	select {
	case <-server.ended:
	case <-time.After(10 * time.Second):
		require.FailNow(t, "the server's Incoming did not close after the client ended the session")
	}
	_, ok := <-client.Incoming
	assert.False(t, ok)
}

// cutProxy forwards connections to a target and, after a random number of
// bytes in either direction, either cuts both sides with a reset or turns
// into a black hole that forwards nothing and closes nothing.
type cutProxy struct {
	ln     net.Listener
	target func() string
	hole   bool
	rng    *rand.Rand
	mu     sync.Mutex
	conns  []net.Conn
	wg     sync.WaitGroup
	cuts   atomic.Int32
}

func newCutProxy(t testing.TB, target func() string, hole bool, seed uint64) *cutProxy {
	p := &cutProxy{ln: listen(t), target: target, hole: hole, rng: rand.New(rand.NewPCG(seed, 1))}
	p.wg.Add(1)
	go p.serve()
	t.Cleanup(func() {
		p.ln.Close()
		p.mu.Lock()
		for _, c := range p.conns {
			c.Close()
		}
		p.mu.Unlock()
		p.wg.Wait()
	})
	return p
}

func (p *cutProxy) addr() string { return p.ln.Addr().String() }

func (p *cutProxy) serve() {
	defer p.wg.Done()
	for {
		in, err := p.ln.Accept()
		if err != nil {
			return
		}
		out, err := net.Dial("tcp", p.target())
		if err != nil {
			in.Close()
			continue
		}
		p.mu.Lock()
		p.conns = append(p.conns, in, out)
		budgets := [2]int{p.rng.IntN(40 << 10), p.rng.IntN(40 << 10)}
		p.mu.Unlock()
		var cut sync.Once
		kill := func() {
			cut.Do(func() {
				p.cuts.Add(1)
				if !p.hole {
					in.(*net.TCPConn).SetLinger(0)
					out.(*net.TCPConn).SetLinger(0)
					in.Close()
					out.Close()
				}
			})
		}
		var dead atomic.Bool
		p.wg.Add(2)
		go p.forward(out, in, budgets[0], kill, &dead)
		go p.forward(in, out, budgets[1], kill, &dead)
	}
}

// forward copies src to dst until budget bytes have passed; then it cuts or
// holes the connection.
func (p *cutProxy) forward(dst, src net.Conn, budget int, kill func(), dead *atomic.Bool) {
	defer p.wg.Done()
	buf := make([]byte, 4096)
	for {
		n, err := src.Read(buf)
		if n > 0 && !dead.Load() {
			if n > budget {
				dst.Write(buf[:budget])
				dead.Store(true)
				kill()
			} else {
				budget -= n
				if _, err := dst.Write(buf[:n]); err != nil {
					kill()
					return
				}
			}
		}
		if err != nil {
			if !dead.Load() && !p.hole {
				dst.Close()
			}
			return
		}
	}
}

// With both ends resumable, 20,000 numbered packets each way arrive exactly
// once and in order while a proxy cuts the connections with resets at random
// points, in both directions.
func TestResumeThroughResets(t *testing.T) {
	server := newEchoServer(t, nil)
	seed := rand.Uint64()
	t.Logf("seed %d", seed)
	px := newCutProxy(t, server.addr, false, seed)
	client := resumableClient(t, px.addr)
	exchange(t, client, 20000)
	assert.Greater(t, px.cuts.Load(), int32(5), "connections were cut")
}

// The same through black holes: keep-alive on both ends finds each one.
func TestResumeThroughBlackHoles(t *testing.T) {
	const interval, timeout = 10 * time.Millisecond, 60 * time.Millisecond
	server := newEchoServer(t, func(s *packet.Stream) { s.SetKeepAlive(interval, timeout) })
	seed := rand.Uint64()
	t.Logf("seed %d", seed)
	px := newCutProxy(t, server.addr, true, seed)
	client := resumableClient(t, px.addr)
	client.SetKeepAlive(interval, timeout)
	exchange(t, client, 5000)
	assert.Greater(t, px.cuts.Load(), int32(2), "connections went silent")
}

// Accept bounds the handshake: a peer that sends nothing, too little or
// garbage gets an error wrapping ErrHandshake in time and leaves no
// goroutine behind; a claimed length is never allocated.
func TestAcceptHostileHandshakes(t *testing.T) {
	sessions := packet.NewSessions(16)
	t.Cleanup(func() { sessions.Close() })
	sessions.SetHandshakeTimeout(100 * time.Millisecond)
	unknown := append([]byte{0x04, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff}, make([]byte, 16)...)
	unknown[9] = 1
	for _, tc := range []struct {
		name    string
		send    []byte
		timeout bool
	}{
		{"nothing", nil, true},
		{"too little", []byte{0x04, 0xff, 0xff}, true},
		{"a data packet", packet.New(1, []byte("hello")).Bytes(), false},
		{"a claim of 1 TiB", []byte{0, 0, 0, 1, 0, 0, 0, 0, 0}, false},
		{"a ping", []byte{0x01, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff}, false},
		{"unknown session twice", append(append([]byte{}, unknown...), unknown...), false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			base := runtime.NumGoroutine()
			server, client := tcpPair(t)
			go io.Copy(io.Discard, client)
			client.Write(append(tc.send, make([]byte, 25-min(len(tc.send), 25))...)[:max(len(tc.send), 0)])
			var before, after runtime.MemStats
			runtime.ReadMemStats(&before)
			s, isNew, err := sessions.Accept(server)
			runtime.ReadMemStats(&after)
			require.ErrorIs(t, err, packet.ErrHandshake)
			assert.Nil(t, s)
			assert.False(t, isNew)
			assert.Equal(t, tc.timeout, errors.Is(err, os.ErrDeadlineExceeded), "%v", err)
			assert.Less(t, after.TotalAlloc-before.TotalAlloc, uint64(64<<10))
			_, err = server.Write([]byte{0})
			assert.ErrorIs(t, err, net.ErrClosed, "Accept closed the connection")
			client.Close()
			deadline := time.Now().Add(5 * time.Second)
			for runtime.NumGoroutine() > base && time.Now().Before(deadline) {
				time.Sleep(time.Millisecond)
			}
			assert.LessOrEqual(t, runtime.NumGoroutine(), base, "no goroutine left")
		})
	}
}

// Accept is safe to call concurrently: each client gets its own session.
func TestAcceptConcurrent(t *testing.T) {
	server := newEchoServer(t, nil)
	var wg sync.WaitGroup
	for range 20 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			client := resumableClient(t, server.addr)
			for i := range 50 {
				client.Outgoing <- numbered(i, 8)
			}
			for i := range 50 {
				select {
				case p := <-client.Incoming:
					if number(p) != i {
						t.Errorf("got %d, want %d", number(p), i)
						return
					}
				case <-time.After(20 * time.Second):
					t.Errorf("echo %d missing", i)
					return
				}
			}
		}()
	}
	wg.Wait()
}

// A session whose client has gone for longer than the expiry is closed: its
// stream's Incoming closes, so the handler's range ends.
func TestSessionExpiry(t *testing.T) {
	server := newEchoServer(t, nil)
	server.sessions.SetExpiry(100 * time.Millisecond)
	px := newProxy(t, server.addr())
	client := packet.NewStream(16)
	client.EnableResume()
	conn, err := net.Dial("tcp", px.addr())
	require.NoError(t, err)
	client.SetConnection(conn)
	exchange(t, client, 10)
	px.close() // the client is gone and does not come back
	select {
	case <-server.ended:
	case <-time.After(10 * time.Second):
		require.FailNow(t, "the expired session's Incoming did not close")
	}
	client.Close()
}

// A server restart loses the session: the client is told with
// ErrSessionLost, starts a new session and sends again what was not
// acknowledged, so nothing is lost; the new server may get some packets the
// old one had.
func TestServerRestartLosesSession(t *testing.T) {
	old := newEchoServer(t, nil)
	var mu sync.Mutex
	addr := old.addr()
	client := resumableClient(t, func() string { mu.Lock(); defer mu.Unlock(); return addr })
	errs := collectErrors(client)
	exchange(t, client, 100)

	// The old server dies without a word: listener and connections.
	old.ln.Close()
	for len(old.raw) > 0 {
		(<-old.raw).Close()
	}
	restarted := newEchoServer(t, nil)
	restarted.restarted = true
	mu.Lock()
	addr = restarted.addr()
	mu.Unlock()

	for i := 100; i < 200; i++ {
		client.Outgoing <- numbered(i, 8)
	}
	lost := false
	for !lost {
		e := receiveError(t, errs)
		lost = errors.Is(e.Error, packet.ErrSessionLost)
	}
	// The echoes of 100..199 come back from the new session, after those
	// of the packets sent again, if any.
	for want := 100; want < 200; {
		p := receive(t, client)
		if number(p) >= 100 {
			require.Equal(t, want, number(p))
			want++
		}
	}
}

// Close on the accepting side ends the session: the client's Incoming
// closes at once.
func TestSessionsCloseEndsClients(t *testing.T) {
	server := newEchoServer(t, nil)
	client := resumableClient(t, server.addr)
	exchange(t, client, 10)
	require.NoError(t, server.sessions.Close())
	select {
	case _, ok := <-client.Incoming:
		assert.False(t, ok)
	case <-time.After(10 * time.Second):
		require.FailNow(t, "the client's Incoming did not close")
	}
}

// Resume over a datagram connection is refused with a clear error.
func TestResumeRefusesDatagrams(t *testing.T) {
	a, b := udpPair(t)
	s := newStream(t, 16)
	s.EnableResume()
	errs := collectErrors(s)
	s.SetConnection(a)
	assert.ErrorIs(t, receiveError(t, errs).Error, packet.ErrHandshake)
	_, _, err := packet.NewSessions(16).Accept(b)
	assert.ErrorIs(t, err, packet.ErrHandshake)
}

// With a peer that acknowledges nothing, a resumable stream holds at most its
// replay limit and then stops taking from Outgoing.
func TestReplayLimitBlocksSenders(t *testing.T) {
	a, raw := tcpPair(t)
	go func() {
		// A server that welcomes the client and then only reads.
		hello := make([]byte, 25)
		if _, err := io.ReadFull(raw, hello); err != nil {
			return
		}
		welcome := append([]byte{0x05, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff}, make([]byte, 16)...)
		welcome[9] = 7
		raw.Write(welcome)
		io.Copy(io.Discard, raw)
	}()
	s := newStream(t, 4)
	s.EnableResume()
	s.SetReplayLimit(16 << 10)
	s.SetConnection(a)
	accepted := 0
	for stalled := 0; stalled < 100000; {
		select {
		case s.Outgoing <- packet.New(0, make([]byte, 1024)):
			accepted++
			stalled = 0
		default:
			stalled++
			runtime.Gosched()
		}
	}
	assert.GreaterOrEqual(t, accepted, 16)
	assert.LessOrEqual(t, accepted, 16+4+1, "replay limit and Outgoing")
}

// resumablePair returns a resumable client stream and its session's stream
// on the accepting side, over loopback TCP.
func resumablePair(t testing.TB, size int) (*packet.Stream, *packet.Stream) {
	ln := listen(t)
	sessions := packet.NewSessions(size)
	t.Cleanup(func() { sessions.Close() })
	accepted := make(chan *packet.Stream, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		s, _, err := sessions.Accept(c)
		if err == nil {
			accepted <- s
		}
	}()
	client := newStream(t, size)
	client.EnableResume()
	conn, err := net.Dial("tcp", ln.Addr().String())
	require.NoError(t, err)
	client.SetConnection(conn)
	return client, <-accepted
}

// BenchmarkResumeCost runs the one-way and ping-pong benchmarks on plain and
// on resumable streams, side by side.
func BenchmarkResumeCost(b *testing.B) {
	for _, resumable := range []bool{false, true} {
		name := map[bool]string{false: "plain", true: "resumable"}[resumable]
		setup := func(b *testing.B) (*packet.Stream, *packet.Stream) {
			if resumable {
				return resumablePair(b, 16)
			}
			return tcpStreams(b, 16)
		}
		for _, bs := range benchSizes {
			b.Run("OneWay"+bs.name+"/"+name, func(b *testing.B) {
				x, y := setup(b)
				oneWay(b, x, y, bs.n)
			})
		}
		b.Run("PingPong/"+name, func(b *testing.B) {
			x, y := setup(b)
			pingPong(b, x, y)
		})
	}
}
