package packet_test

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/big"
	mrand "math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/aerogo/packet"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// ---- Helpers ----

// TestMain fails the run if any stream goroutine outlives the tests: every
// test closes its streams, and Close promises they exit.
func TestMain(m *testing.M) {
	// The check finds stream goroutines by their frames: make sure it
	// still does, so that a rename cannot blind it.
	s := packet.NewStream(0)
	if streamGoroutines() == "" {
		fmt.Fprintln(os.Stderr, "the leak check cannot see a stream's writer goroutine")
		os.Exit(1)
	}
	s.Close()
	code := m.Run()
	if code == 0 {
		if leaked := waitForStreamGoroutines(5 * time.Second); leaked != "" {
			fmt.Fprintf(os.Stderr, "stream goroutines left after the tests:\n%s\n", leaked)
			code = 1
		}
	}
	os.Exit(code)
}

// streamGoroutines returns the stacks of goroutines running, or started by,
// the library's code.
func streamGoroutines() string {
	buf := make([]byte, 1<<20)
	buf = buf[:runtime.Stack(buf, true)]
	var found []string
	for _, g := range strings.Split(string(buf), "\n\n") {
		if strings.Contains(g, "github.com/aerogo/packet.") {
			found = append(found, g)
		}
	}
	return strings.Join(found, "\n\n")
}

// testSeed returns the seed of a test's random choices: PACKET_SEED if set,
// to run a failure again, else a new one. It is logged either way.
func testSeed(t testing.TB) uint64 {
	seed := mrand.Uint64()
	if v := os.Getenv("PACKET_SEED"); v != "" {
		var err error
		seed, err = strconv.ParseUint(v, 10, 64)
		require.NoError(t, err, "PACKET_SEED")
	}
	t.Logf("seed %d (run again with PACKET_SEED=%d)", seed, seed)
	return seed
}

// waitForStreamGoroutines polls until no stream goroutine runs, for at most
// d, and returns what is left.
func waitForStreamGoroutines(d time.Duration) string {
	deadline := time.Now().Add(d)
	for {
		left := streamGoroutines()
		if left == "" || time.Now().After(deadline) {
			return left
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// tcpPair returns the two ends of a loopback TCP connection.
func tcpPair(t testing.TB) (net.Conn, net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer ln.Close()
	return dialAccept(t, ln)
}

// dialAccept dials ln and returns the dialed and the accepted end.
func dialAccept(t testing.TB, ln net.Listener) (net.Conn, net.Conn) {
	t.Helper()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			accepted <- nil
			return
		}
		accepted <- c
	}()
	c, err := net.Dial(ln.Addr().Network(), ln.Addr().String())
	require.NoError(t, err)
	s := <-accepted
	require.NotNil(t, s)
	t.Cleanup(func() { c.Close(); s.Close() })
	return c, s
}

// udpPair returns two loopback UDP sockets connected to each other.
func udpPair(t testing.TB) (*net.UDPConn, *net.UDPConn) {
	t.Helper()
	loopback := &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)}
	a, err := net.ListenUDP("udp", loopback)
	require.NoError(t, err)
	b, err := net.DialUDP("udp", loopback, a.LocalAddr().(*net.UDPAddr))
	require.NoError(t, err)
	// Connect a to b by opening it again on the same address.
	addr := a.LocalAddr().(*net.UDPAddr)
	a.Close()
	a, err = net.DialUDP("udp", addr, b.LocalAddr().(*net.UDPAddr))
	require.NoError(t, err)
	t.Cleanup(func() { a.Close(); b.Close() })
	return a, b
}

// tlsPair returns the two ends of a TLS connection over loopback TCP, with a
// certificate made for the test.
func tlsPair(t *testing.T) (net.Conn, net.Conn) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		DNSNames:     []string{"localhost"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	require.NoError(t, err)
	cert, err := x509.ParseCertificate(der)
	require.NoError(t, err)
	pool := x509.NewCertPool()
	pool.AddCert(cert)

	a, b := tcpPair(t)
	client := tls.Client(a, &tls.Config{RootCAs: pool, ServerName: "localhost"})
	server := tls.Server(b, &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key}}})
	return client, server
}

// newStream returns a stream that is closed when the test ends.
func newStream(t testing.TB, size int) *packet.Stream {
	s := packet.NewStream(size)
	t.Cleanup(func() { s.Close() })
	return s
}

// streamsOn returns two streams, on a and on b.
func streamsOn(t testing.TB, a, b net.Conn, size int) (*packet.Stream, *packet.Stream) {
	sa, sb := newStream(t, size), newStream(t, size)
	sa.SetConnection(a)
	sb.SetConnection(b)
	return sa, sb
}

// tcpStreams returns two streams talking over loopback TCP.
func tcpStreams(b *testing.B, size int) (*packet.Stream, *packet.Stream) {
	a, c := tcpPair(b)
	return streamsOn(b, a, c, size)
}

// udpStreams returns two streams talking over loopback UDP.
func udpStreams(t testing.TB, size int) (*packet.Stream, *packet.Stream) {
	a, b := udpPair(t)
	return streamsOn(t, a, b, size)
}

// collectErrors registers a callback that passes every report to the
// returned channel.
func collectErrors(s *packet.Stream) <-chan packet.IOError {
	errs := make(chan packet.IOError, 1024)
	s.OnError(func(e packet.IOError) { errs <- e })
	return errs
}

// numbered returns packet i, with i in its payload.
func numbered(i int, size int) *packet.Packet {
	data := make([]byte, max(size, 8))
	binary.BigEndian.PutUint64(data, uint64(i))
	return packet.New(byte(i), data)
}

// number reads the number numbered put in p.
func number(p *packet.Packet) int {
	return int(binary.BigEndian.Uint64(p.Data))
}

// receive waits for the next packet on s, failing the test after a while.
func receive(t testing.TB, s *packet.Stream) *packet.Packet {
	t.Helper()
	select {
	case p, ok := <-s.Incoming:
		require.True(t, ok, "Incoming closed")
		return p
	case <-time.After(10 * time.Second):
		require.FailNow(t, "no packet within 10s")
		return nil
	}
}

// receiveError waits for the next report, failing the test after a while.
func receiveError(t testing.TB, errs <-chan packet.IOError) packet.IOError {
	t.Helper()
	select {
	case e := <-errs:
		return e
	case <-time.After(10 * time.Second):
		require.FailNow(t, "no error reported within 10s")
		return packet.IOError{}
	}
}

// readNumbers decodes packets from conn until it fails and sends their
// numbers on out; it returns the error that ended it.
func readNumbers(conn net.Conn, out chan<- int) error {
	d := packet.NewDecoder(conn)
	for {
		p, err := d.Decode()
		if err != nil {
			return err
		}
		out <- number(p)
	}
}

// waitBlockedSend polls until a goroutine of the calling test is blocked
// sending on a channel.
func waitBlockedSend(t *testing.T, function string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	buf := make([]byte, 1<<20)
	for time.Now().Before(deadline) {
		stacks := string(buf[:runtime.Stack(buf, true)])
		for _, g := range strings.Split(stacks, "\n\n") {
			if strings.Contains(g, "[chan send") && strings.Contains(g, function) {
				return
			}
		}
		time.Sleep(time.Millisecond)
	}
	require.FailNow(t, "no goroutine blocked sending", function)
}

// blockingCallback registers a callback that signals its first call on
// entered and then waits for release, as a callback that dials would. It
// returns release, which is also called when the test ends.
func blockingCallback(t *testing.T, s *packet.Stream, entered chan<- struct{}) (release func()) {
	var once sync.Once
	gate := make(chan struct{})
	release = func() { once.Do(func() { close(gate) }) }
	var first sync.Once
	s.OnError(func(packet.IOError) {
		first.Do(func() {
			close(entered)
			<-gate
		})
	})
	t.Cleanup(release)
	return release
}

// pongServer answers the first packet on one connection with pong.
func pongServer(listener net.Listener) {
	conn, err := listener.Accept()
	if err != nil {
		return
	}
	server := packet.NewStream(1024)
	server.SetConnection(conn)
	if _, ok := <-server.Incoming; ok {
		server.Outgoing <- packet.New(0, []byte("pong"))
	}
	server.Close()
}

// ---- Fault types ----

// faultConn fails its failAt-th Write, after passing on half of it when
// partial is set.
type faultConn struct {
	net.Conn
	failAt  int
	partial bool
	writes  int
}

var errFault = errors.New("injected write fault")

func (c *faultConn) Write(p []byte) (int, error) {
	c.writes++
	if c.writes < c.failAt {
		return c.Conn.Write(p)
	}
	if c.writes > c.failAt {
		return 0, errFault
	}
	n := 0
	if c.partial {
		n, _ = c.Conn.Write(p[:len(p)/2])
	}
	return n, errFault
}

// countingConn counts the Write calls on a connection.
type countingConn struct {
	net.Conn
	writes atomic.Int32
}

func (c *countingConn) Write(p []byte) (int, error) {
	c.writes.Add(1)
	return c.Conn.Write(p)
}

// writeFails is a connection whose writes fail.
type writeFails struct{ net.Conn }

func (writeFails) Write([]byte) (int, error) { return 0, errors.New("write fails") }

// writeEntered closes entered when its first Write begins.
type writeEntered struct {
	net.Conn
	once    sync.Once
	entered chan struct{}
}

func (c *writeEntered) Write(p []byte) (int, error) {
	c.once.Do(func() { close(c.entered) })
	return c.Conn.Write(p)
}

// ---- Proxies and servers ----

// proxy forwards loopback TCP connections to a target address, for tests
// of what a network does to them. It can be told to stop forwarding, both
// ways, without closing anything (hole): a black hole, as a peer whose
// machine lost power or a NAT that forgot the connection looks from either
// end. With a budget, each direction of a connection forwards a random number
// of bytes and then the connection is cut: with a reset, or, with holeAfter,
// by turning into a black hole.
type proxy struct {
	ln        net.Listener
	target    func() string
	hole      atomic.Bool
	budget    func() int // nil: no cut
	holeAfter bool
	cuts      atomic.Int32
	mu        sync.Mutex
	conns     []net.Conn
	wg        sync.WaitGroup
}

// newProxy starts a proxy to target, stopped when the test ends.
func newProxy(t testing.TB, target string) *proxy {
	return startProxy(t, &proxy{target: func() string { return target }})
}

// newCutProxy starts a proxy that cuts each connection after a random number
// of bytes, up to 40 KiB each way, with resets or into black holes.
func newCutProxy(t testing.TB, target func() string, holeAfter bool, seed uint64) *proxy {
	rng := mrand.New(mrand.NewPCG(seed, 1))
	var mu sync.Mutex
	budget := func() int { mu.Lock(); defer mu.Unlock(); return rng.IntN(40 << 10) }
	return startProxy(t, &proxy{target: target, budget: budget, holeAfter: holeAfter})
}

func startProxy(t testing.TB, p *proxy) *proxy {
	p.ln = listen(t)
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
		out, err := net.Dial("tcp", p.target())
		if err != nil {
			in.Close()
			continue
		}
		p.mu.Lock()
		p.conns = append(p.conns, in, out)
		p.mu.Unlock()
		budgets := [2]int{-1, -1}
		if p.budget != nil {
			budgets = [2]int{p.budget(), p.budget()}
		}
		var cut sync.Once
		var dead atomic.Bool // the connection was cut
		kill := func() {
			cut.Do(func() {
				p.cuts.Add(1)
				dead.Store(true)
				if !p.holeAfter {
					in.(*net.TCPConn).SetLinger(0)
					out.(*net.TCPConn).SetLinger(0)
					in.Close()
					out.Close()
				}
			})
		}
		p.wg.Add(2)
		go p.forward(out, in, budgets[0], kill, &dead)
		go p.forward(in, out, budgets[1], kill, &dead)
	}
}

// forward copies src to dst, dropping what it reads while the hole is open
// or once the connection was cut; budget bytes pass at most, unless it is
// negative.
func (p *proxy) forward(dst, src net.Conn, budget int, kill func(), dead *atomic.Bool) {
	defer p.wg.Done()
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 && !p.hole.Load() && !dead.Load() {
			if budget >= 0 && n > budget {
				dst.Write(buf[:budget])
				kill()
			} else {
				budget -= n
				if _, werr := dst.Write(buf[:n]); werr != nil {
					kill()
					return
				}
			}
		}
		if err != nil {
			if !dead.Load() && !p.holeAfter {
				dst.Close()
			}
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

// serveEach accepts connections on ln until it is closed and calls handle
// with each, on the accepting goroutine; the test's end closes ln and waits
// for the loop.
func serveEach(t testing.TB, ln net.Listener, handle func(net.Conn)) {
	done := make(chan struct{})
	t.Cleanup(func() { ln.Close(); <-done })
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			handle(c)
		}
	}()
}

// refusedAddr returns a loopback address where nothing listens.
func refusedAddr(t testing.TB) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	ln.Close()
	return ln.Addr().String()
}

// closeEach is a serveEach handler for a server that accepts and drops.
func closeEach(c net.Conn) { c.Close() }

// acceptStreams accepts connections on ln and passes each, on a new stream,
// to out, until ln is closed; the streams are closed when the test ends.
func acceptStreams(t testing.TB, ln net.Listener, out chan<- *packet.Stream) {
	var mu sync.Mutex
	var streams []*packet.Stream
	stop, done := make(chan struct{}), make(chan struct{})
	t.Cleanup(func() {
		ln.Close()
		close(stop)
		<-done
		mu.Lock()
		defer mu.Unlock()
		for _, s := range streams {
			s.Close()
		}
	})
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s := packet.NewStream(64)
			mu.Lock()
			streams = append(streams, s)
			mu.Unlock()
			s.SetConnection(c)
			select {
			case out <- s:
			case <-stop:
				return
			}
		}
	}()
}

// echoServer serves resumable sessions on a loopback listener: each new
// session's handler checks that packets arrive numbered 0, 1, 2, ... and
// echoes them. Closed when the test ends.
type echoServer struct {
	t        testing.TB
	ln       net.Listener
	sessions *packet.Sessions
	mu       sync.Mutex
	stopped  bool                // the test has ended: start no more goroutines
	running  sync.WaitGroup      // accepting and handling goroutines
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
		e.mu.Lock()
		e.stopped = true
		e.mu.Unlock()
		e.sessions.Close()
		e.running.Wait()
	})
	return e
}

// start counts a goroutine about to start, unless the test has ended.
func (e *echoServer) start() bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.stopped {
		return false
	}
	e.running.Add(1)
	return true
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
		if !e.start() {
			c.Close()
			return
		}
		go func() {
			defer e.running.Done()
			s, isNew, err := e.sessions.Accept(c)
			if err != nil || !isNew {
				return
			}
			if e.setup != nil {
				e.setup(s)
			}
			if !e.start() {
				s.Close()
				return
			}
			go e.handle(s)
		}()
	}
}

// handle echoes numbered packets, checking that each arrives exactly once
// and in order.
func (e *echoServer) handle(s *packet.Stream) {
	defer e.running.Done()
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
// come back exactly once and in order. before, if set, runs before each echo
// is awaited.
func exchange(t *testing.T, client *packet.Stream, n int, before func(i int)) {
	go func() {
		for i := range n {
			client.Outgoing <- numbered(i, 8+i%40)
		}
	}()
	for i := range n {
		if before != nil {
			before(i)
		}
		select {
		case p := <-client.Incoming:
			require.Equal(t, i, number(p), "echo")
		case <-time.After(20 * time.Second):
			require.FailNow(t, "echo missing", "%d of %d", i, n)
		}
	}
}

// ---- Order and queueing ----

// Packets arrive in the order they were queued.
func TestPacketsArriveInQueuedOrder(t *testing.T) {
	a, b := tcpPair(t)
	sender, receiver := streamsOn(t, a, b, 64)

	const n = 20000
	go func() {
		for i := range n {
			sender.Outgoing <- numbered(i, 8+i%300)
		}
	}()
	for i := range n {
		p := receive(t, receiver)
		require.Equal(t, i, number(p))
		require.Equal(t, byte(i), p.Type)
		require.Len(t, p.Data, 8+i%300)
	}
}

// Packets queued before the first connection wait for it.
func TestPacketsQueuedBeforeConnectionWaitForIt(t *testing.T) {
	s := newStream(t, 100)
	for i := range 100 {
		s.Outgoing <- numbered(i, 8)
	}
	assert.Nil(t, s.Connection())

	a, b := tcpPair(t)
	s.SetConnection(a)
	assert.Equal(t, a, s.Connection())
	got := make(chan int, 100)
	go readNumbers(b, got)
	for i := range 100 {
		assert.Equal(t, i, <-got)
	}
}

// Packets queued while the connection is down go out, in order,
// on the next one.
func TestPacketsQueuedWhileDownGoOutOnNextConnection(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	t.Cleanup(func() { ln.Close() })

	s := newStream(t, 100)
	errs := collectErrors(s)
	a, peer := dialAccept(t, ln)
	s.SetConnection(a)
	peer.Close()
	e := receiveError(t, errs)
	assert.ErrorIs(t, e.Error, io.EOF, "a peer's orderly close is reported as io.EOF")
	assert.Equal(t, a, e.Connection)
	assert.Equal(t, a, s.Connection(), "Connection keeps the last connection given")

	for i := range 100 {
		s.Outgoing <- numbered(i, 8)
	}
	b, peer2 := dialAccept(t, ln)
	s.SetConnection(b)
	got := make(chan int, 100)
	go readNumbers(peer2, got)
	for i := range 100 {
		assert.Equal(t, i, <-got)
	}
}

// The writer sends what waits in Outgoing with one write: 100 queued packets
// cost one system call, not 100.
func TestQueuedPacketsGoOutInOneWrite(t *testing.T) {
	s := newStream(t, 100)
	for i := range 100 {
		s.Outgoing <- numbered(i, 8)
	}
	a, peer := tcpPair(t)
	counted := &countingConn{Conn: a}
	s.SetConnection(counted)
	got := make(chan int, 100)
	go readNumbers(peer, got)
	for i := range 100 {
		assert.Equal(t, i, <-got)
	}
	require.NoError(t, s.Close())
	assert.Equal(t, int32(1), counted.writes.Load())
}

// ---- Programmer errors ----

// Programmer errors panic at once, on the caller's goroutine, with an error
// whose message names them, as the original's did: nil for SetConnection (a
// failed dial is not a connection), OnError and KeepConnected, negative
// sizes, EnableResume too late.
func TestProgrammerErrorsPanicWithErrors(t *testing.T) {
	s := newStream(t, 16)
	for _, c := range []struct {
		call func()
		want string
	}{
		{func() { s.SetConnection(nil) }, "packet: SetConnection(nil): nil connection"},
		{func() { s.OnError(nil) }, "packet: OnError(nil): nil callback"},
		{func() { s.KeepConnected(nil, time.Second) }, "packet: KeepConnected(nil, ...): nil dial function"},
		{func() { s.SetMaxSize(-1) }, "packet: SetMaxSize(-1): negative size"},
		{func() { s.SetReplayLimit(-1) }, "packet: SetReplayLimit(-1): negative size"},
		{func() { packet.NewStream(-1) }, "packet: NewStream(-1): negative channel buffer size"},
		{func() { packet.NewSessions(-1) }, "packet: NewSessions(-1): negative channel buffer size"},
		{func() { packet.NewSessions(1).Accept(nil) }, "packet: Accept(nil): nil connection"},
		{func() { packet.NewSessions(1).SetMaxSessions(0) }, "packet: SetMaxSessions(0): fewer than one session"},
	} {
		assert.PanicsWithError(t, c.want, c.call)
	}
	late := newStream(t, 1)
	a, _ := tcpPair(t)
	late.SetConnection(a)
	assert.PanicsWithError(t, "packet: EnableResume after SetConnection", late.EnableResume)

	// The stream is unharmed: the next failure reaches the callbacks.
	errs := collectErrors(s)
	a, peer := tcpPair(t)
	s.SetConnection(a)
	peer.Close()
	assert.ErrorIs(t, receiveError(t, errs).Error, io.EOF)
}

// ---- The original's tests ----

// What the original aerogo/packet's own test file checks, in our words: its
// two nil panics read as recover().(error), its helpers and Length, a write
// deadline in the past, read errors, and its ping-pong (Example,
// ExampleStream_SetConnection).

// The original's TestNilConnection and TestNilOnError.
func TestOriginalNilPanicsAreErrors(t *testing.T) {
	for name, call := range map[string]func(*packet.Stream){
		"SetConnection": func(s *packet.Stream) { s.SetConnection(nil) },
		"OnError":       func(s *packet.Stream) { s.OnError(nil) },
	} {
		t.Run(name, func(t *testing.T) {
			defer func() {
				err := recover()
				require.NotNil(t, err)
				assert.Contains(t, err.(error).Error(), "nil")
			}()
			call(newStream(t, 0))
		})
	}
}

// The original's TestUtils: Length is the payload's length, and the helpers
// round-trip it.
func TestOriginalUtils(t *testing.T) {
	ping := packet.New(0, []byte("ping"))
	assert.Len(t, ping.Bytes(), 1+8+4)
	assert.Equal(t, int64(4), ping.Length)
	length, err := packet.Int64FromBytes(packet.Int64ToBytes(ping.Length))
	require.NoError(t, err)
	assert.Equal(t, ping.Length, length)
}

// The original's TestWriteTimeout: a write deadline already passed fails the
// write; the stream reports it and the process lives.
func TestOriginalWriteDeadlinePassed(t *testing.T) {
	a, _ := tcpPair(t)
	s := newStream(t, 0)
	errs := collectErrors(s)
	s.SetConnection(a)
	require.NoError(t, a.SetWriteDeadline(time.Now()))
	s.Outgoing <- packet.New(0, []byte("ping"))
	e := receiveError(t, errs)
	assert.ErrorIs(t, e.Error, os.ErrDeadlineExceeded)
	assert.Same(t, a, e.Connection)
}

// readFails fails its failAt-th Read.
type readFails struct {
	net.Conn
	reads, failAt int
}

var errReadFault = errors.New("injected read fault")

func (c *readFails) Read(p []byte) (int, error) {
	c.reads++
	if c.reads == c.failAt {
		return 0, errReadFault
	}
	return c.Conn.Read(p)
}

// The original's TestReadError: a connection whose first, second or third
// read fails is reported with that error; a stream on a sound connection to
// the same server then gets its pong.
func TestOriginalReadErrors(t *testing.T) {
	ln := listen(t)
	servers := make(chan *packet.Stream, 8)
	acceptStreams(t, ln, servers)
	go func() {
		for s := range servers {
			go func() {
				for range s.Incoming {
					s.Outgoing <- packet.New(0, []byte("pong"))
				}
			}()
		}
	}()
	t.Cleanup(func() { close(servers) })
	for failAt := 1; failAt <= 3; failAt++ {
		conn, err := net.Dial("tcp", ln.Addr().String())
		require.NoError(t, err)
		client := newStream(t, 1)
		errs := collectErrors(client)
		client.SetConnection(&readFails{Conn: conn, failAt: failAt})
		// Reads before the failing one deliver pongs: keep asking until
		// the failure is reported.
		deadline := time.After(10 * time.Second)
		for reported := false; !reported; {
			select {
			case client.Outgoing <- packet.New(0, []byte("ping")):
			case <-deadline:
				require.FailNow(t, "no report", "read %d", failAt)
			}
			select {
			case p := <-client.Incoming:
				assert.Equal(t, "pong", string(p.Data))
			case e := <-errs:
				assert.ErrorIs(t, e.Error, errReadFault, "read %d", failAt)
				reported = true
			case <-deadline:
				require.FailNow(t, "no report", "read %d", failAt)
			}
		}
	}
	conn, err := net.Dial("tcp", ln.Addr().String())
	require.NoError(t, err)
	client := newStream(t, 0)
	client.SetConnection(conn)
	client.Outgoing <- packet.New(0, []byte("ping"))
	assert.Equal(t, "pong", string(receive(t, client).Data))
}

// Packets a stream receives have Length set, over a byte stream and over
// datagrams, as the original's did.
func TestReceivedLengthIsLenData(t *testing.T) {
	for name, pair := range map[string]func() (net.Conn, net.Conn){
		"TCP": func() (net.Conn, net.Conn) { return tcpPair(t) },
		"UDP": func() (net.Conn, net.Conn) { a, b := udpPair(t); return a, b },
	} {
		t.Run(name, func(t *testing.T) {
			a, b := pair()
			sender, receiver := streamsOn(t, a, b, 8)
			sizes := []int{0, 4, 3000, 40 << 10}
			for _, n := range sizes {
				sender.Outgoing <- packet.New(1, make([]byte, n))
			}
			for _, n := range sizes {
				p := receive(t, receiver)
				assert.Equal(t, int64(n), p.Length)
				assert.Len(t, p.Data, n)
			}
		})
	}
}

// ---- Caller slips ----

// A nil packet on Outgoing is reported and skipped: the packets around it
// arrive in order and the connection stays up.
func TestNilPacketReportedAndSkipped(t *testing.T) {
	a, b := tcpPair(t)
	sender, receiver := streamsOn(t, a, b, 16)
	errs := collectErrors(sender)
	sender.Outgoing <- packet.New(1, []byte("before"))
	sender.Outgoing <- nil
	sender.Outgoing <- packet.New(2, []byte("after"))
	assert.Equal(t, "before", string(receive(t, receiver).Data))
	assert.Equal(t, "after", string(receive(t, receiver).Data))
	e := receiveError(t, errs)
	assert.ErrorIs(t, e.Error, packet.ErrNilPacket)
	assert.Same(t, a, e.Connection)
	// Still up: a packet after the report arrives on the same connection.
	sender.Outgoing <- packet.New(3, []byte("later"))
	assert.Equal(t, "later", string(receive(t, receiver).Data))
	assert.Same(t, a, sender.Connection())
	assert.Empty(t, errs)
}

// A nil packet queued when Close runs is counted as unsent, like any other.
func TestNilPacketAtCloseCountedUnsent(t *testing.T) {
	s := packet.NewStream(4)
	s.Outgoing <- packet.New(1, nil)
	s.Outgoing <- nil
	err := s.Close()
	assert.ErrorIs(t, err, packet.ErrUnsent)
	assert.Contains(t, err.Error(), "unsent: 2")
}

// Closing Outgoing, a caller's error, neither panics nor spins: what was
// queued goes out, and Close returns.
func TestClosedOutgoingSendsQueued(t *testing.T) {
	a, b := tcpPair(t)
	sender, receiver := streamsOn(t, a, b, 16)
	sender.Outgoing <- packet.New(1, []byte("last"))
	close(sender.Outgoing)
	assert.Equal(t, "last", string(receive(t, receiver).Data))
	assert.NoError(t, sender.Close())
}

// One packet sent to many streams at once, as a server broadcasts, reaches
// every peer intact; the race detector watches that no stream writes to it.
func TestBroadcastOnePacketToManyStreams(t *testing.T) {
	const streams = 50
	ln := listen(t)
	senders, receivers := make([]*packet.Stream, streams), make([]*packet.Stream, streams)
	for i := range streams {
		a, b := dialAccept(t, ln)
		senders[i], receivers[i] = streamsOn(t, a, b, 4)
	}
	msg := packet.New(7, bytes.Repeat([]byte("broadcast "), 3000)) // 30 KB: written in place
	small := packet.New(8, []byte("hi"))
	for _, s := range senders {
		s.Outgoing <- msg
		s.Outgoing <- small
	}
	for i, r := range receivers {
		got := receive(t, r)
		assert.Equal(t, msg.Type, got.Type, "stream %d", i)
		assert.Equal(t, msg.Data, got.Data, "stream %d", i)
		assert.Equal(t, "hi", string(receive(t, r).Data), "stream %d", i)
	}
}

// ---- Hot swap ----

// A swap closes the old connection, sends later packets on the
// new one, and reports nothing.
func TestHotSwapMovesTrafficAndReportsNothing(t *testing.T) {
	s := newStream(t, 16)
	errs := collectErrors(s)
	a, peerA := tcpPair(t)
	b, peerB := tcpPair(t)

	s.SetConnection(a)
	s.Outgoing <- packet.New(1, []byte("to a"))
	p, err := packet.NewDecoder(peerA).Decode()
	require.NoError(t, err)
	assert.Equal(t, "to a", string(p.Data))

	peerA.Write(packet.New(2, []byte("from a")).Bytes())
	assert.Equal(t, "from a", string(receive(t, s).Data))

	s.SetConnection(b)
	assert.Equal(t, b, s.Connection())
	s.Outgoing <- packet.New(1, []byte("to b"))
	p, err = packet.NewDecoder(peerB).Decode()
	require.NoError(t, err)
	assert.Equal(t, "to b", string(p.Data))

	// The old connection was closed by the stream: its peer sees the end.
	_, err = packet.NewDecoder(peerA).Decode()
	assert.ErrorIs(t, err, io.EOF)

	peerB.Write(packet.New(2, []byte("from b")).Bytes())
	assert.Equal(t, "from b", string(receive(t, s).Data))

	require.NoError(t, s.Close())
	assert.Empty(t, errs, "a swap is not an error")
}

// While the application does not read Incoming, swapping connections leaves
// one reader, not one per swapped-away connection; what the old readers had
// read is delivered later, in order, before what newer connections read.
func TestSwapsDoNotPileUpReaders(t *testing.T) {
	s := newStream(t, 1)
	base := runtime.NumGoroutine()
	const swaps = 200
	var peers sync.WaitGroup
	for i := range swaps {
		a, b := net.Pipe()
		peers.Add(1)
		go func() {
			defer peers.Done()
			defer b.Close()
			numbered(2*i, 8).Write(b)
			numbered(2*i+1, 8).Write(b)
			io.Copy(io.Discard, b)
		}()
		s.SetConnection(a)
	}
	// Left: the live connection's reader and its peer. Each swapped-away
	// connection's reader and peer end, since the stream closed it.
	deadline := time.Now().Add(10 * time.Second)
	for runtime.NumGoroutine()-base > 2 && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	assert.LessOrEqual(t, runtime.NumGoroutine()-base, 2, "goroutines left after %d swaps", swaps)

	// What the old readers read comes first, in order.
	last := -1
	received := 0
	for received < 2 {
		p := receive(t, s)
		require.Greater(t, number(p), last, "packets arrive in the order they were read")
		last = number(p)
		if last >= 2*(swaps-1) {
			received++
		}
	}
	require.NoError(t, s.Close())
	peers.Wait()
}

// ---- Failures and callbacks ----

// Writes that fail, with nothing or part of the bytes
// written, lose no packet; each failed connection is reported once; with
// nothing partial, no packet arrives twice.
func TestFailedWritesLoseNothing(t *testing.T) {
	for _, partial := range []bool{false, true} {
		t.Run(fmt.Sprintf("partial=%v", partial), func(t *testing.T) {
			const n = 30000
			ln := listen(t)

			// The peer reads each connection to its end, in the order they
			// were made, as one server would see a client come back.
			got := make(chan int, n)
			serveEach(t, ln, func(c net.Conn) {
				readNumbers(c, got)
				c.Close()
			})

			s := newStream(t, 256)
			var conns []*faultConn
			var reports []packet.IOError
			var mu sync.Mutex
			dial := func(i int) {
				c, err := net.Dial("tcp", ln.Addr().String())
				if err != nil {
					t.Error(err)
					return
				}
				fc := &faultConn{Conn: c, failAt: 2 + i%5, partial: partial}
				if i >= 20 {
					fc.failAt = 1 << 30
				}
				mu.Lock()
				conns = append(conns, fc)
				mu.Unlock()
				s.SetConnection(fc)
			}
			s.OnError(func(e packet.IOError) {
				mu.Lock()
				reports = append(reports, e)
				i := len(reports)
				mu.Unlock()
				dial(i)
			})
			dial(0)

			go func() {
				for i := range n {
					s.Outgoing <- numbered(i, 8+i%64)
				}
			}()
			seen := make([]int, n)
			for next := 0; next < n; {
				select {
				case i := <-got:
					require.Less(t, i, n)
					seen[i]++
					if partial {
						require.LessOrEqual(t, i, next, "packets arrive in order")
					} else {
						require.Equal(t, next, i, "packets arrive in order, each once")
					}
					if i == next {
						next++
					}
				case <-time.After(10 * time.Second):
					require.FailNow(t, "packets stopped arriving", "next is %d", next)
				}
			}
			require.NoError(t, s.Close())

			for i, c := range seen {
				require.GreaterOrEqual(t, c, 1, "packet %d lost", i)
				if !partial {
					require.Equal(t, 1, c, "packet %d duplicated", i)
				}
			}
			mu.Lock()
			defer mu.Unlock()
			failed := 0
			for _, c := range conns {
				if c.writes >= c.failAt {
					failed++
				}
			}
			require.GreaterOrEqual(t, failed, 5, "enough faults were injected")
			require.Len(t, reports, failed, "one report per failed connection")
			for i, e := range reports {
				assert.Same(t, conns[i], e.Connection)
				assert.ErrorIs(t, e.Error, errFault)
			}
		})
	}
}

// A connection that both the reader and the writer see fail is
// reported once.
func TestOneReportWhenReaderAndWriterFail(t *testing.T) {
	for range 5 {
		a, peer := tcpPair(t)
		s := packet.NewStream(16)
		var reports atomic.Int32
		failed := make(chan packet.IOError, 10)
		s.OnError(func(e packet.IOError) {
			reports.Add(1)
			failed <- e
		})
		s.SetConnection(a)

		// Keep the writer busy so that it meets the reset the reader meets.
		stop := make(chan struct{})
		sending := make(chan struct{})
		go func() {
			defer close(sending)
			for {
				select {
				case s.Outgoing <- packet.New(0, make([]byte, 1000)):
				case <-stop:
					return
				}
			}
		}()
		peer.(*net.TCPConn).SetLinger(0) // close with a reset
		peer.Close()
		e := receiveError(t, failed)
		assert.Equal(t, a, e.Connection)
		close(stop)
		<-sending
		if err := s.Close(); err != nil {
			require.ErrorIs(t, err, packet.ErrUnsent, "only packets without a connection may be left")
		}
		assert.Equal(t, int32(1), reports.Load())
	}
}

// OnError may be called from any goroutine. When a connection fails, every
// callback registered runs exactly once with that connection; a callback may
// reconnect with SetConnection and register a further callback, and the next
// failure, on the new connection, runs every callback, the one registered
// from inside a callback too, exactly once.
func TestCallbacksRunOncePerFailureAndMayReconnectAndRegister(t *testing.T) {
	s := newStream(t, 16)
	a, peerA := tcpPair(t)
	b, peerB := tcpPair(t)

	const registrars, perRegistrar = 8, 50
	const (
		reconnector = registrars*perRegistrar + iota // registered after the others
		late                                         // registered by reconnector
		total
	)
	// calls[c][id] counts the runs of callback id for a failure of c.
	var mu sync.Mutex
	calls := map[net.Conn][]int{}
	record := func(id int, e packet.IOError) {
		mu.Lock()
		defer mu.Unlock()
		if calls[e.Connection] == nil {
			calls[e.Connection] = make([]int, total)
		}
		calls[e.Connection][id]++
	}
	// assertRanOnce checks that callbacks 0 to last-1 ran exactly once for a
	// failure of c.
	assertRanOnce := func(c net.Conn, last int, name string) {
		t.Helper()
		mu.Lock()
		defer mu.Unlock()
		got := calls[c]
		if got == nil {
			got = make([]int, total)
		}
		for id := range last {
			assert.Equal(t, 1, got[id], "runs of callback %d for the failure of %s", id, name)
		}
	}

	var wg sync.WaitGroup
	start := make(chan struct{})
	for g := range registrars {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			for i := range perRegistrar {
				id := g*perRegistrar + i
				s.OnError(func(e packet.IOError) { record(id, e) })
			}
		}()
	}
	close(start)
	wg.Wait()

	// Callbacks run in registration order, so when reconnector or late runs
	// for a failure, every callback registered before it has run for it.
	reconnected := make(chan struct{}, 1)
	lateRan := make(chan packet.IOError, 1)
	s.OnError(func(e packet.IOError) {
		record(reconnector, e)
		if e.Connection != a {
			return
		}
		s.SetConnection(b)
		s.OnError(func(e packet.IOError) {
			record(late, e)
			if e.Connection == b {
				lateRan <- e
			}
		})
		reconnected <- struct{}{}
	})

	s.SetConnection(a)
	peerA.Close() // the first failure
	select {
	case <-reconnected:
	case <-time.After(10 * time.Second):
		require.FailNow(t, "the callbacks did not run for the first failure")
	}
	assertRanOnce(a, reconnector+1, "a")

	// The stream uses the connection the callback set.
	assert.Equal(t, b, s.Connection())
	s.Outgoing <- packet.New(1, []byte("after reconnect"))
	p, err := packet.NewDecoder(peerB).Decode()
	require.NoError(t, err)
	assert.Equal(t, "after reconnect", string(p.Data))

	peerB.Close() // the second failure, on the connection the callback set
	e := receiveError(t, lateRan)
	assert.ErrorIs(t, e.Error, io.EOF)
	require.NoError(t, s.Close())

	assertRanOnce(a, reconnector+1, "a")
	assertRanOnce(b, total, "b")
	mu.Lock()
	defer mu.Unlock()
	assert.LessOrEqual(t, calls[a][late], 1, "runs of the late callback for the failure of a")
	assert.Len(t, calls, 2, "reports for a and b only")
}

// A callback may send on a full Outgoing: the writer keeps draining it while
// callbacks run.
func TestCallbackMaySendOnOutgoing(t *testing.T) {
	s := newStream(t, 1)
	bad, badPeer := net.Pipe()
	t.Cleanup(func() { badPeer.Close() })
	good, peer := net.Pipe()
	got := make(chan int, 100)
	go readNumbers(peer, got)
	var once sync.Once
	s.OnError(func(packet.IOError) {
		once.Do(func() {
			s.SetConnection(good)
			for i := 1; i <= 20; i++ { // many times what Outgoing holds
				s.Outgoing <- numbered(i, 8)
			}
		})
	})
	s.SetConnection(writeFails{bad})
	s.Outgoing <- numbered(0, 8)
	for i := range 21 {
		select {
		case n := <-got:
			require.Equal(t, i, n)
		case <-time.After(10 * time.Second):
			require.FailNow(t, "the callback's sends are stuck", "got %d of 21", i)
		}
	}
}

// ---- Close ----

// Close sends what is queued, closes the connection and
// Incoming, and leaves no goroutine behind.
func TestCloseFlushesQueuedAndClosesIncoming(t *testing.T) {
	a, peer := tcpPair(t)
	s := packet.NewStream(1000)
	s.SetConnection(a)
	for i := range 1000 {
		s.Outgoing <- numbered(i, 100)
	}
	require.NoError(t, s.Close())
	assert.Empty(t, waitForStreamGoroutines(5*time.Second), "every stream goroutine has exited")

	got := make(chan int, 1000)
	err := readNumbers(peer, got)
	assert.ErrorIs(t, err, io.EOF, "the stream closed its connection")
	require.Len(t, got, 1000)
	for i := range 1000 {
		assert.Equal(t, i, <-got)
	}
	_, ok := <-s.Incoming
	assert.False(t, ok, "Incoming is closed")
}

// Close is safe before any connection and twice, and says what
// it could not send.
func TestCloseSafeWithoutConnectionAndTwice(t *testing.T) {
	s := packet.NewStream(4)
	require.NoError(t, s.Close())
	require.NoError(t, s.Close())
	for range s.Incoming {
		t.Fatal("no packet expected")
	}

	s = packet.NewStream(4)
	s.Outgoing <- packet.New(0, nil)
	s.Outgoing <- packet.New(0, nil)
	err := s.Close()
	require.ErrorIs(t, err, packet.ErrUnsent)
	assert.Equal(t, "packet: stream closed with packets unsent: 2", err.Error())
	assert.Nil(t, s.Connection())

	// A connection given after Close is closed, not used.
	a, peer := tcpPair(t)
	s.SetConnection(a)
	_, err = peer.Read(make([]byte, 1))
	assert.ErrorIs(t, err, io.EOF)
}

// Close ends a range over Incoming while the reader is blocked
// delivering, and ends in bounded time when the peer does not read.
func TestCloseUnblocksReaderAndStuckWriter(t *testing.T) {
	a, peer := net.Pipe()
	t.Cleanup(func() { peer.Close() })
	s := packet.NewStream(1)
	s.SetConnection(a)

	// The peer sends more than Incoming holds and never reads.
	go func() {
		for range 10 {
			if _, err := peer.Write(packet.New(0, []byte("x")).Bytes()); err != nil {
				return
			}
		}
	}()
	s.Outgoing <- packet.New(0, []byte("never read"))
	done := make(chan error)
	go func() { done <- s.Close() }()
	received := 0
	for range s.Incoming {
		received++
	}
	err := <-done
	assert.ErrorIs(t, err, packet.ErrUnsent, "the peer never read the queued packet")
	assert.LessOrEqual(t, received, 10)
	assert.Empty(t, waitForStreamGoroutines(5*time.Second))
}

// A send that blocked on a full Outgoing before Close is released by Close,
// and its packet is counted as unsent.
func TestSendersBlockedAtCloseAreReleased(t *testing.T) {
	s := packet.NewStream(1)
	s.Outgoing <- packet.New(0, nil) // Outgoing is full: there is no connection
	done := make(chan struct{})
	go func() {
		s.Outgoing <- packet.New(0, nil)
		close(done)
	}()
	waitBlockedSend(t, "TestSendersBlockedAtCloseAreReleased")
	err := s.Close()
	require.ErrorIs(t, err, packet.ErrUnsent)
	assert.Equal(t, "packet: stream closed with packets unsent: 2", err.Error())
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		require.FailNow(t, "the sender is still blocked after Close returned")
	}
}

// Close from inside a callback does not deadlock, and the
// stream's goroutines exit as soon as the callback returns.
func TestCloseFromCallbackReturnsAndEndsGoroutines(t *testing.T) {
	s := packet.NewStream(16)
	closed := make(chan error, 1)
	s.OnError(func(packet.IOError) { closed <- s.Close() })
	a, peer := tcpPair(t)
	s.SetConnection(a)
	peer.Close()

	select {
	case err := <-closed:
		assert.NoError(t, err)
	case <-time.After(10 * time.Second):
		require.FailNow(t, "Close from a callback did not return")
	}
	_, ok := <-s.Incoming
	assert.False(t, ok, "Incoming is closed")
	assert.Empty(t, waitForStreamGoroutines(5*time.Second))
	assert.NoError(t, s.Close())
}

// Close called from a callback returns what the writer could not send, like
// Close from anywhere else.
func TestCloseFromCallbackReportsUnsent(t *testing.T) {
	a, peer := tcpPair(t)
	go io.Copy(io.Discard, peer)
	s := packet.NewStream(16)
	reports := make(chan packet.IOError, 4)
	closed := make(chan error, 4)
	s.OnError(func(e packet.IOError) {
		reports <- e
		closed <- s.Close()
	})
	s.Outgoing <- packet.New(1, []byte("fails"))
	s.SetConnection(&faultConn{Conn: a, failAt: 1})

	first := receiveError(t, reports)
	assert.ErrorIs(t, first.Error, errFault)
	err := <-closed
	require.ErrorIs(t, err, packet.ErrUnsent)
	assert.Equal(t, "packet: stream closed with packets unsent: 1", err.Error())
	assert.Empty(t, reports, "nothing is reported after Close")
	assert.Empty(t, waitForStreamGoroutines(5*time.Second))
}

// streamInCallback returns a stream whose write of first failed and whose
// OnError callback for it is now running, blocked until the test ends, as a
// callback that dials would be.
func streamInCallback(t *testing.T, first *packet.Packet) *packet.Stream {
	bad, peer := net.Pipe()
	t.Cleanup(func() { peer.Close() })
	s := packet.NewStream(16)
	entered := make(chan struct{})
	blockingCallback(t, s, entered)
	s.SetConnection(writeFails{bad})
	s.Outgoing <- first
	<-entered
	return s
}

// Close racing a swap ends the connection set last: Close returns and
// Incoming closes, whichever of the two came first.
func TestCloseRacingSwap(t *testing.T) {
	for range 200 {
		s := packet.NewStream(4)
		a, peerA := net.Pipe()
		b, peerB := net.Pipe()
		s.SetConnection(a)
		swapped := make(chan struct{})
		go func() {
			s.SetConnection(b)
			close(swapped)
		}()
		closed := make(chan error, 1)
		go func() { closed <- s.Close() }()
		select {
		case err := <-closed:
			require.NoError(t, err)
		case <-time.After(10 * time.Second):
			require.FailNow(t, "Close did not return")
		}
		<-swapped
		_, ok := <-s.Incoming
		require.False(t, ok)
		_, err := peerB.Read(make([]byte, 1))
		require.Error(t, err, "the connection set last was closed")
		_, err = peerA.Read(make([]byte, 1))
		require.Error(t, err, "the connection swapped away was closed")
		peerA.Close()
		peerB.Close()
	}
}

// Close from the application while a callback runs sends what it can and
// counts the rest: it never returns nil with packets unsent.
func TestCloseWhileCallbackRunsCountsUnsent(t *testing.T) {
	s := streamInCallback(t, packet.New(0, []byte("first")))
	for range 5 {
		s.Outgoing <- packet.New(0, []byte("queued"))
	}
	err := s.Close()
	require.ErrorIs(t, err, packet.ErrUnsent)
	assert.Equal(t, "packet: stream closed with packets unsent: 6", err.Error())
}

// A connection set while a callback runs is used at once, and Close flushes
// to it instead of cutting it off.
func TestCloseWhileCallbackRunsFlushesLiveConnection(t *testing.T) {
	s := streamInCallback(t, numbered(0, 8))

	good, peer := net.Pipe()
	got := make(chan int, 10)
	read := make(chan error, 1)
	go func() { read <- readNumbers(peer, got) }()
	s.SetConnection(good)
	for i := 1; i <= 5; i++ {
		s.Outgoing <- numbered(i, 8)
	}
	require.NoError(t, s.Close())
	assert.ErrorIs(t, <-read, io.EOF, "the stream closed the live connection after flushing")
	require.Len(t, got, 6, "the failed packet and the five queued")
	for i := range 6 {
		assert.Equal(t, i, <-got)
	}
}

// ---- Limits and hostile input ----

// A peer that does not read makes senders block: once the stream's write is
// stuck, the stream takes packets only until Outgoing is full, and then no
// more however often it is tried, so what it holds stays far below what was
// offered.
func TestPeerThatDoesNotReadBlocksSenders(t *testing.T) {
	s := newStream(t, 16)
	a, peer := net.Pipe() // synchronous: a write blocks until read, and peer never reads
	t.Cleanup(func() { peer.Close() })
	conn := &writeEntered{Conn: a, entered: make(chan struct{})}
	s.SetConnection(conn)

	accepted, tries := 0, 0
	offer := func() bool {
		tries++
		select {
		case s.Outgoing <- packet.New(0, make([]byte, 1024)):
			accepted++
			return true
		default:
			runtime.Gosched()
			return false
		}
	}

	// Feed the stream until its writer is inside a Write that never returns.
	deadline := time.After(10 * time.Second)
	for stuck := false; !stuck; {
		select {
		case s.Outgoing <- packet.New(0, make([]byte, 1024)):
			accepted++
			tries++
		case <-conn.entered:
			stuck = true
		case <-deadline:
			require.FailNow(t, "the stream never wrote", "accepted %d packets", accepted)
		}
	}

	// From now on nothing takes packets out of Outgoing: the number accepted
	// grows until it is full, then stops.
	const limit = 1 << 20
	for offer() {
		require.Less(t, tries, limit, "the stream kept accepting packets that cannot be sent")
	}
	stoppedAt := accepted
	const further = 100000
	for range further {
		offer()
	}
	assert.Equal(t, stoppedAt, accepted, "packets accepted in %d tries after the stream stopped accepting", further)
	assert.GreaterOrEqual(t, accepted, cap(s.Outgoing), "Outgoing takes what it holds")
	assert.Less(t, accepted*100, tries, "accepted %d of %d tries", accepted, tries)
}

// A bad length is reported, drops the connection and delivers nothing; the
// next connection works.
func TestBadLengthReportedAndDropsConnection(t *testing.T) {
	for _, tc := range []struct {
		name   string
		header []byte
		want   error
	}{
		{"negative", []byte{0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff}, packet.ErrNegativeLength},
		{"huge", []byte{0, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff}, packet.ErrTooLarge},
		{"over 1KiB", []byte{0, 0, 0, 0, 0, 0, 0, 4, 1}, packet.ErrTooLarge},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := newStream(t, 16)
			s.SetMaxSize(1024)
			errs := collectErrors(s)
			a, peer := tcpPair(t)
			s.SetConnection(a)
			peer.Write(append(tc.header, "some bytes that follow"...))

			e := receiveError(t, errs)
			assert.ErrorIs(t, e.Error, tc.want)
			assert.Equal(t, a, e.Connection)
			_, err := peer.Read(make([]byte, 1))
			assert.ErrorIs(t, err, io.EOF, "the connection was dropped")
			assert.Empty(t, s.Incoming, "nothing was delivered")

			b, peer2 := tcpPair(t)
			s.SetConnection(b)
			peer2.Write(packet.New(3, make([]byte, 1024)).Bytes())
			p := receive(t, s)
			assert.Equal(t, byte(3), p.Type)
			assert.Len(t, p.Data, 1024)
		})
	}
}

// SetMaxSize bounds what the stream sends: a packet over it is reported with
// ErrTooLarge and skipped, the connection stays up, and the packets behind
// it go out, where a peer with that limit would have dropped the connection
// at its header on every reconnect.
func TestOversizedOutgoingPacketSkipped(t *testing.T) {
	a, peer := tcpPair(t)
	s := newStream(t, 16)
	s.SetMaxSize(1 << 20) // the peer's limit too
	errs := collectErrors(s)
	s.SetConnection(a)
	s.Outgoing <- packet.New(1, make([]byte, 20<<20))
	s.Outgoing <- packet.New(2, []byte("hello"))

	e := receiveError(t, errs)
	assert.ErrorIs(t, e.Error, packet.ErrTooLarge)
	assert.Equal(t, a, e.Connection)
	d := packet.NewDecoder(peer)
	d.SetMaxSize(1 << 20)
	p, err := d.Decode()
	require.NoError(t, err)
	assert.Equal(t, "hello", string(p.Data))
	assert.Empty(t, errs, "the connection stayed up")
}

// ---- Connection kinds ----

// A stream works over TCP, Unix sockets, TLS and net.Pipe.
func TestStreamWorksOverEveryConnectionKind(t *testing.T) {
	kinds := map[string]func(t *testing.T) (net.Conn, net.Conn){
		"tcp":  func(t *testing.T) (net.Conn, net.Conn) { return tcpPair(t) },
		"pipe": func(t *testing.T) (net.Conn, net.Conn) { return net.Pipe() },
		"unix": func(t *testing.T) (net.Conn, net.Conn) {
			ln, err := net.Listen("unix", filepath.Join(t.TempDir(), "s"))
			require.NoError(t, err)
			defer ln.Close()
			return dialAccept(t, ln)
		},
		"tls": tlsPair,
	}
	for name, pair := range kinds {
		t.Run(name, func(t *testing.T) {
			a, b := pair(t)
			client, server := streamsOn(t, a, b, 16)
			// Send, echo and receive at once: net.Pipe holds nothing.
			go func() {
				for i := range 100 {
					client.Outgoing <- numbered(i, 10+i*300)
				}
			}()
			go func() {
				for i := range 100 {
					p := <-server.Incoming
					if p == nil || number(p) != i || len(p.Data) != 10+i*300 {
						t.Errorf("server got %v, want packet %d", p, i)
						return
					}
					server.Outgoing <- p
				}
			}()
			for i := range 100 {
				require.Equal(t, i, number(receive(t, client)))
			}
		})
	}
}

// ---- Datagrams ----

// Over UDP, numbered packets arrive intact and in order: loopback neither
// drops nor reorders datagrams while the receiver keeps up. The packets go
// in windows of 100, about eight datagrams, so that a receiver slowed down
// by the race detector never finds its socket buffer full: the kernel drops
// what does not fit, and this test is about the stream, not the kernel.
func TestUDPDeliversInOrderOnLoopback(t *testing.T) {
	sender, receiver := udpStreams(t, 100)
	errs := collectErrors(receiver)
	for window := 0; window < 1000; window += 100 {
		for i := window; i < window+100; i++ {
			sender.Outgoing <- numbered(i, 100)
		}
		for i := window; i < window+100; i++ {
			p := receive(t, receiver)
			require.Equal(t, i, number(p))
			require.Len(t, p.Data, 100)
		}
	}
	assert.Empty(t, errs)
}

// Over UDP, payloads up to what a datagram holds arrive intact.
func TestUDPDeliversPayloadsUpToDatagramSize(t *testing.T) {
	sender, receiver := udpStreams(t, 16)
	for _, size := range []int{0, 1, 1400, 1500, 60000, 65507 - packet.HeaderSize} {
		data := make([]byte, size)
		rand.Read(data)
		sender.Outgoing <- packet.New(7, data)
		p := receive(t, receiver)
		assert.Equal(t, byte(7), p.Type)
		assert.True(t, bytes.Equal(data, p.Data), "payload of %d bytes", size)
	}
}

// A packet too large for a datagram is reported and skipped; the stream goes
// on with the next one over the same connection.
func TestUDPTooLargeReportedAndSkipped(t *testing.T) {
	sender, receiver := udpStreams(t, 16)
	errs := collectErrors(sender)
	sender.Outgoing <- packet.New(1, make([]byte, 70000))
	sender.Outgoing <- packet.New(2, []byte("next"))

	e := receiveError(t, errs)
	assert.ErrorIs(t, e.Error, packet.ErrTooLarge)
	assert.Equal(t, sender.Connection(), e.Connection)
	p := receive(t, receiver)
	assert.Equal(t, "next", string(p.Data))
	sender.Outgoing <- packet.New(3, []byte("still up"))
	assert.Equal(t, "still up", string(receive(t, receiver).Data))
	assert.Empty(t, errs)
}

// A malformed datagram is reported and skipped, and the good datagrams
// around it, with one packet or several, are delivered.
func TestUDPMalformedDatagramSkipped(t *testing.T) {
	a, b := udpPair(t)
	receiver := newStream(t, 16)
	receiver.SetMaxSize(1000)
	errs := collectErrors(receiver)
	receiver.SetConnection(b)

	one := packet.New(1, []byte("one")).Bytes()
	two := append(packet.New(2, []byte("two")).Bytes(), packet.New(3, nil).Bytes()...)
	bad := map[string]struct {
		datagram []byte
		err      error
	}{
		"claims more than present": {append(packet.New(9, []byte("abc")).Bytes(), 0, 0, 0, 0, 0, 0, 0, 0, 99, 'x'), packet.ErrMalformed},
		"trailing bytes":           {append(packet.New(9, nil).Bytes(), 1, 2, 3), packet.ErrMalformed},
		"negative length":          {[]byte{9, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff}, packet.ErrNegativeLength},
		"over the limit":           {packet.New(9, make([]byte, 1001)).Bytes(), packet.ErrTooLarge},
	}
	for name, tc := range bad {
		_, err := a.Write(one)
		require.NoError(t, err)
		_, err = a.Write(tc.datagram)
		require.NoError(t, err)
		_, err = a.Write(two)
		require.NoError(t, err)

		assert.Equal(t, "one", string(receive(t, receiver).Data), name)
		e := receiveError(t, errs)
		assert.ErrorIs(t, e.Error, tc.err, name)
		assert.Equal(t, b, e.Connection)
		assert.Equal(t, "two", string(receive(t, receiver).Data), name)
		assert.Equal(t, byte(3), receive(t, receiver).Type, name)
	}
	assert.Empty(t, errs)
}

// A UDP stream swaps to a new socket like a TCP one.
func TestUDPHotSwapMovesTrafficAndReportsNothing(t *testing.T) {
	a1, peer1 := udpPair(t)
	a2, peer2 := udpPair(t)
	s := newStream(t, 16)
	errs := collectErrors(s)
	s.SetConnection(a1)
	s.Outgoing <- packet.New(1, []byte("first"))
	buf := make([]byte, 100)
	n, err := peer1.Read(buf)
	require.NoError(t, err)
	assert.Equal(t, packet.New(1, []byte("first")).Bytes(), buf[:n])

	s.SetConnection(a2)
	s.Outgoing <- packet.New(2, []byte("second"))
	n, err = peer2.Read(buf)
	require.NoError(t, err)
	assert.Equal(t, packet.New(2, []byte("second")).Bytes(), buf[:n])
	_, err = a1.Write([]byte("x"))
	assert.ErrorIs(t, err, net.ErrClosed, "the old socket was closed")

	peer2.Write(packet.New(3, []byte("back")).Bytes())
	assert.Equal(t, "back", string(receive(t, s).Data))
	assert.Empty(t, errs)
}

// "Connection refused" that UDP reports when nobody listens is reported like
// any failure, and packets queued afterwards go out on the next connection.
func TestUDPRefusedReportedAndQueuedSentOnNext(t *testing.T) {
	ln, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	require.NoError(t, err)
	nobody := ln.LocalAddr().(*net.UDPAddr)
	ln.Close()
	c, err := net.DialUDP("udp", nil, nobody)
	require.NoError(t, err)

	s := newStream(t, 16)
	errs := collectErrors(s)
	s.SetConnection(c)
	s.Outgoing <- packet.New(1, []byte("into the void"))
	e := receiveError(t, errs)
	assert.ErrorIs(t, e.Error, syscall.ECONNREFUSED)
	assert.Equal(t, c, e.Connection)

	s.Outgoing <- packet.New(2, []byte("queued"))
	a, peer := udpPair(t)
	s.SetConnection(a)
	buf := make([]byte, 100)
	for {
		n, err := peer.Read(buf)
		require.NoError(t, err)
		p, err := packet.NewDecoder(bytes.NewReader(buf[:n])).Decode()
		require.NoError(t, err)
		if p.Type == 2 {
			assert.Equal(t, "queued", string(p.Data))
			break
		}
	}
}

// Over UDP, Close from the callback that reports an oversized packet sends
// the packet queued behind it, well within its close timeout.
func TestUDPCloseFromTooLargeCallbackSendsQueued(t *testing.T) {
	a, peer := udpPair(t)
	s := packet.NewStream(16)
	s.SetCloseTimeout(time.Minute) // Close must not need it
	closed := make(chan error, 1)
	var once sync.Once
	s.OnError(func(e packet.IOError) {
		once.Do(func() { closed <- s.Close() })
	})
	s.Outgoing <- packet.New(0, make([]byte, 70000)) // reported with ErrTooLarge, skipped
	s.Outgoing <- packet.New(1, []byte("small"))
	s.SetConnection(a)
	require.NoError(t, <-closed)
	peer.SetReadDeadline(time.Now().Add(10 * time.Second))
	buf := make([]byte, 2048)
	n, err := peer.Read(buf)
	require.NoError(t, err)
	assert.Equal(t, packet.New(1, []byte("small")).Bytes(), buf[:n])
}

// Streams work over unixgram socket pairs too.
func TestUnixgramDeliversInOrder(t *testing.T) {
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_DGRAM, 0)
	require.NoError(t, err)
	conn := func(fd int) net.Conn {
		f := os.NewFile(uintptr(fd), "unixgram")
		defer f.Close()
		c, err := net.FileConn(f)
		require.NoError(t, err)
		require.Equal(t, "unixgram", c.LocalAddr().Network())
		return c
	}
	ca, cb := conn(fds[0]), conn(fds[1])
	t.Cleanup(func() { ca.Close(); cb.Close() })

	sender, receiver := streamsOn(t, ca, cb, 64)
	// A unixgram sender blocks while the receiver's queue is full.
	go func() {
		for i := range 200 {
			sender.Outgoing <- numbered(i, 100+i*100)
		}
	}()
	for i := range 200 {
		p := receive(t, receiver)
		require.Equal(t, i, number(p))
		require.Len(t, p.Data, 100+i*100)
	}
}

// ---- Keep-alive and write timeout ----

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

// A write that carried only a control frame leaves nothing behind in the
// next batch: a large packet after a pong goes out byte for byte.
func TestPongThenLargePacket(t *testing.T) {
	a, raw := tcpPair(t)
	s := newStream(t, 16)
	s.SetConnection(a)
	ping := []byte{0x01, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff}
	_, err := raw.Write(ping)
	require.NoError(t, err)
	pong := make([]byte, 9)
	_, err = io.ReadFull(raw, pong)
	require.NoError(t, err)
	require.Equal(t, byte(0x02), pong[0])

	large := numbered(7, 20<<10)
	s.Outgoing <- large
	p, err := packet.NewDecoder(raw).Decode()
	require.NoError(t, err)
	assert.Equal(t, large.Type, p.Type)
	assert.Equal(t, large.Data, p.Data)
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
	// Pongs due at once go out as one: a pong per ping would be 100,000.
	n := <-pongs
	assert.Greater(t, n, 0)
	assert.LessOrEqual(t, n, rounds*pingsPerRound/10)
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

// dialLog records when a KeepConnected dial function was called.
type dialLog struct {
	mu    sync.Mutex
	times []time.Time
}

// dialer returns a dial function that records each call and dials addr.
func (l *dialLog) dialer(addr string) func() (net.Conn, error) {
	return func() (net.Conn, error) {
		l.mu.Lock()
		l.times = append(l.times, time.Now())
		l.mu.Unlock()
		return net.Dial("tcp", addr)
	}
}

// calls returns how many dials were made.
func (l *dialLog) calls() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.times)
}

// gaps returns the time between each dial and the one before it.
func (l *dialLog) gaps() []time.Duration {
	l.mu.Lock()
	defer l.mu.Unlock()
	var gaps []time.Duration
	for i := 1; i < len(l.times); i++ {
		gaps = append(gaps, l.times[i].Sub(l.times[i-1]))
	}
	return gaps
}

// waitFor polls cond until it holds, failing the test after 10 seconds.
func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			require.FailNow(t, "timed out waiting", what)
		}
		time.Sleep(time.Millisecond)
	}
}

// KeepConnected reconnects after a failure, and backs off when connections
// fail as soon as they are made, as to a server that accepts and drops.
func TestKeepConnectedBacksOff(t *testing.T) {
	ln := listen(t)
	serveEach(t, ln, closeEach)
	var log dialLog
	s := newStream(t, 16)
	s.KeepConnected(log.dialer(ln.Addr().String()), 100*time.Millisecond)
	waitFor(t, "six dials", func() bool { return log.calls() >= 6 })
	require.NoError(t, s.Close())
	// The first dial is at once; after a connection that failed soon the
	// wait is drawn from 25-50 ms, then from 50-100 ms (maxWait).
	for i, gap := range log.gaps() {
		least := 50 * time.Millisecond
		if i == 0 {
			least = 25 * time.Millisecond
		}
		assert.GreaterOrEqual(t, gap, least, "wait before dial %d", i+2)
	}
}

// A maxWait of 0 does not make KeepConnected spin: it waits at least the
// lower half of its 50 ms first wait between dials, and reports every
// failed dial with the dial's error and no connection.
func TestKeepConnectedZeroMaxWaitReportsEveryDial(t *testing.T) {
	refused := refusedAddr(t)
	var log dialLog
	s := newStream(t, 16)
	errs := collectErrors(s)
	s.KeepConnected(log.dialer(refused), 0)
	for i := range 5 {
		e := receiveError(t, errs)
		assert.ErrorIs(t, e.Error, syscall.ECONNREFUSED, "report %d", i)
		assert.Nil(t, e.Connection, "report %d", i)
	}
	require.NoError(t, s.Close())
	assert.LessOrEqual(t, log.calls(), 5+len(errs)+1, "one report per dial")
	for i, gap := range log.gaps() {
		assert.GreaterOrEqual(t, gap, 25*time.Millisecond, "wait before dial %d", i+2)
	}
}

// Calling KeepConnected twice makes one connection, not two, and the second
// call's dial function is the one used from then on.
func TestKeepConnectedTwiceOneLoop(t *testing.T) {
	ln := listen(t)
	accepted := make(chan net.Conn, 16)
	serveEach(t, ln, func(c net.Conn) { accepted <- c })
	var first, second dialLog
	s := newStream(t, 16)
	errs := collectErrors(s)
	s.KeepConnected(first.dialer(ln.Addr().String()), time.Minute)
	s.KeepConnected(second.dialer(ln.Addr().String()), time.Minute)
	server := <-accepted
	server.Close() // the next connection is dialed with the second function
	receiveError(t, errs)
	next := <-accepted
	defer next.Close()
	waitFor(t, "the second dial", func() bool { return first.calls()+second.calls() == 2 })
	s.Outgoing <- packet.New(1, []byte("on the second"))
	p, err := packet.NewDecoder(next).Decode()
	require.NoError(t, err)
	assert.Equal(t, "on the second", string(p.Data))
	require.NoError(t, s.Close())
	assert.Equal(t, 2, first.calls()+second.calls(), "dials")
	assert.LessOrEqual(t, first.calls(), 1, "the replaced function dials at most at start")
	assert.Empty(t, accepted, "connections beyond two")
}

// ---- Resumable sessions ----

// overlapCheck is an OnError callback that fails the test if two calls of
// it ever overlap, and counts its calls.
type overlapCheck struct {
	t      *testing.T
	inside atomic.Int32
	calls  atomic.Int32
	// first, if set, is closed when the first call starts, which then
	// waits for gate.
	first, gate chan struct{}
}

func (o *overlapCheck) callback(e packet.IOError) {
	if !o.inside.CompareAndSwap(0, 1) {
		o.t.Errorf("two callbacks at once; the second for %v", e.Error)
		return
	}
	if o.calls.Add(1) == 1 && o.first != nil {
		close(o.first)
		<-o.gate
	}
	for range 100 {
		runtime.Gosched() // give an overlapping call time to show
	}
	o.inside.Store(0)
}

// Callbacks run one at a time whatever reports: failed connections, failed
// dials, nil and oversized packets, all at once.
func TestCallbacksNeverOverlap(t *testing.T) {
	ln := listen(t)
	serveEach(t, ln, closeEach)
	refused := refusedAddr(t)
	var dials atomic.Int32
	check := &overlapCheck{t: t}
	s := newStream(t, 64)
	s.SetMaxSize(10)
	s.OnError(check.callback)
	s.KeepConnected(func() (net.Conn, error) {
		if dials.Add(1)%2 == 0 {
			return net.Dial("tcp", refused)
		}
		return net.Dial("tcp", ln.Addr().String())
	}, 50*time.Millisecond)
	stop := make(chan struct{})
	var senders sync.WaitGroup
	for range 2 {
		senders.Add(1)
		go func() {
			defer senders.Done()
			for {
				for _, p := range []*packet.Packet{nil, packet.New(1, make([]byte, 11)), packet.New(2, nil)} {
					select {
					case s.Outgoing <- p:
					case <-stop:
						return
					}
				}
			}
		}()
	}
	waitFor(t, "50 reports", func() bool { return check.calls.Load() >= 50 })
	close(stop)
	senders.Wait()
}

// handshakeRaw plays the accepting side of a resumable connection by hand:
// it reads the client's hello and its limit frame and answers with a
// welcome saying it has read nothing, under token, and a limit of 1 MiB,
// followed by extra. It returns the hello. Call it on the test's goroutine.
func handshakeRaw(t *testing.T, raw net.Conn, token [16]byte, extra ...[]byte) []byte {
	t.Helper()
	hello := make([]byte, 9+16+9)
	_, err := io.ReadFull(raw, hello)
	require.NoError(t, err)
	require.Equal(t, byte(0x04), hello[0], "a hello")
	require.Equal(t, byte(0x08), hello[25], "a limit frame")
	welcome := append(controlFrame(0x05, 0), token[:]...)
	welcome = append(welcome, controlFrame(0x08, 1<<20)...)
	for _, e := range extra {
		welcome = append(welcome, e...)
	}
	_, err = raw.Write(welcome)
	require.NoError(t, err)
	return hello
}

// controlFrame returns a control frame's bytes: its kind, then the bitwise
// complement of its argument.
func controlFrame(kind byte, arg uint64) []byte {
	return binary.BigEndian.AppendUint64([]byte{kind}, ^arg)
}

// When the peer ends a session while a callback runs, the report of what
// was left unsent waits for that callback to return.
func TestSessionEndedReportWaitsForRunningCallback(t *testing.T) {
	a, raw := tcpPair(t)
	check := &overlapCheck{t: t, first: make(chan struct{}), gate: make(chan struct{})}
	s := newStream(t, 16)
	s.EnableResume()
	s.OnError(check.callback)
	s.SetConnection(a)
	handshakeRaw(t, raw, [16]byte{1})
	s.Outgoing <- nil // the first report: its callback waits for the gate
	<-check.first
	for i := range 5 {
		s.Outgoing <- numbered(i, 8)
	}
	// The peer has read nothing when it ends the session: five unsent.
	_, err := raw.Write(controlFrame(0x07, 0))
	require.NoError(t, err)
	waitFor(t, "the stream closed", func() bool {
		select {
		case _, ok := <-s.Incoming:
			return !ok
		default:
			return false
		}
	})
	close(check.gate)
	waitFor(t, "the ended report", func() bool { return check.calls.Load() == 2 })
}

// The dialing side's handshake wait is the stream's handshake timeout.
func TestDialingHandshakeTimeout(t *testing.T) {
	a, _ := tcpPair(t) // the peer never answers the hello
	s := newStream(t, 16)
	s.EnableResume()
	s.SetHandshakeTimeout(50 * time.Millisecond)
	errs := collectErrors(s)
	start := time.Now()
	s.SetConnection(a)
	e := receiveError(t, errs)
	assert.ErrorIs(t, e.Error, os.ErrDeadlineExceeded)
	assert.Less(t, time.Since(start), packet.DefaultHandshakeTimeout, "the default did not apply")
}

// A resumable stream talks to its session like a plain one; Close on the
// client ends the session on the server at once, and leaves no goroutine.
func TestResumeEcho(t *testing.T) {
	serverErrs := make(chan packet.IOError, 16)
	server := newEchoServer(t, func(s *packet.Stream) {
		s.OnError(func(e packet.IOError) { serverErrs <- e })
	})
	client := resumableClient(t, server.addr)
	exchange(t, client, 1000, nil)
	require.NoError(t, client.Close())
	select {
	case <-server.ended:
	case <-time.After(10 * time.Second):
		require.FailNow(t, "the server's Incoming did not close after the client ended the session")
	}
	// The client read every echo, and its bye says so: the server has
	// nothing unsent to report, once its stream has wound up.
	assert.Empty(t, waitForStreamGoroutines(5*time.Second))
	assert.Empty(t, serverErrs)
	_, ok := <-client.Incoming
	assert.False(t, ok)
}

// Hot swaps of a resumable stream, while packets flow both ways, lose
// nothing and repeat nothing: what the old connection had in flight is
// replayed on the new one.
func TestResumeThroughHotSwaps(t *testing.T) {
	server := newEchoServer(t, nil)
	client := packet.NewStream(64)
	client.EnableResume()
	t.Cleanup(func() { client.Close() })
	dial := func() net.Conn {
		c, err := net.Dial("tcp", server.addr())
		require.NoError(t, err)
		return c
	}
	client.SetConnection(dial())
	exchange(t, client, 5000, func(i int) {
		if i%250 == 0 {
			client.SetConnection(dial()) // the old connection is alive
		}
	})
}

// With both ends resumable, 20,000 numbered packets each way arrive exactly
// once and in order while a proxy cuts the connections with resets at random
// points, in both directions.
func TestResumeThroughResets(t *testing.T) {
	server := newEchoServer(t, nil)
	px := newCutProxy(t, server.addr, false, testSeed(t))
	client := resumableClient(t, px.addr)
	exchange(t, client, 20000, nil)
	assert.Greater(t, px.cuts.Load(), int32(5), "connections were cut")
}

// The same through black holes: keep-alive on both ends finds each one.
func TestResumeThroughBlackHoles(t *testing.T) {
	const interval, timeout = 10 * time.Millisecond, 60 * time.Millisecond
	server := newEchoServer(t, func(s *packet.Stream) { s.SetKeepAlive(interval, timeout) })
	px := newCutProxy(t, server.addr, true, testSeed(t))
	client := resumableClient(t, px.addr)
	client.SetKeepAlive(interval, timeout)
	exchange(t, client, 5000, nil)
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
	exchange(t, client, 10, nil)
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
	exchange(t, client, 100, nil)

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
	exchange(t, client, 10, nil)
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
	s := newStream(t, 4)
	s.EnableResume()
	s.SetReplayLimit(16 << 10)
	s.SetConnection(a)
	// A server that welcomes the client and then only reads.
	hello := handshakeRaw(t, raw, [16]byte{7})
	go io.Copy(io.Discard, raw)
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
	// A new session's hello: kind 4, ^0 packets read, a zero token; then
	// the limit frame: kind 8, ^16 MiB.
	wantHello := append([]byte{0x04, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff}, make([]byte, 16)...)
	wantHello = append(wantHello, 0x08, 0xff, 0xff, 0xff, 0xff, 0xfe, 0xff, 0xff, 0xff)
	assert.Equal(t, wantHello, hello)
}

// ---- Exactly once at the edges ----

// crashServer serves resumable sessions on a loopback listener and hands
// each new session's stream to handle. crash drops every connection with a
// reset and stops accepting, as a process that died would; its sessions are
// closed only when the test ends.
type crashServer struct {
	ln       net.Listener
	sessions *packet.Sessions
	mu       sync.Mutex
	conns    []net.Conn
}

func newCrashServer(t testing.TB, size int, handle func(*packet.Stream)) *crashServer {
	cs := &crashServer{ln: listen(t), sessions: packet.NewSessions(size)}
	var handlers sync.WaitGroup
	t.Cleanup(func() { cs.sessions.Close(); handlers.Wait() })
	serveEach(t, cs.ln, func(c net.Conn) {
		cs.mu.Lock()
		cs.conns = append(cs.conns, c)
		cs.mu.Unlock()
		handlers.Add(1)
		go func() {
			defer handlers.Done()
			if s, isNew, err := cs.sessions.Accept(c); err == nil && isNew {
				handle(s)
			}
		}()
	})
	return cs
}

func (cs *crashServer) addr() string { return cs.ln.Addr().String() }

func (cs *crashServer) crash() {
	cs.ln.Close()
	cs.mu.Lock()
	defer cs.mu.Unlock()
	for _, c := range cs.conns {
		if tc, ok := c.(*net.TCPConn); ok {
			tc.SetLinger(0) // a reset, not an orderly close
		}
		c.Close()
	}
}

// switchAddr is an address that a test can move, for a client's dial.
type switchAddr struct {
	mu   sync.Mutex
	addr string
}

func (a *switchAddr) get() string  { a.mu.Lock(); defer a.mu.Unlock(); return a.addr }
func (a *switchAddr) set(s string) { a.mu.Lock(); defer a.mu.Unlock(); a.addr = s }

// numbersTo returns a session handler that passes on the number of every
// packet it takes.
func numbersTo(got chan<- int) func(*packet.Stream) {
	return func(s *packet.Stream) {
		for p := range s.Incoming {
			got <- number(p)
		}
	}
}

// expectNumbers waits for the numbers 0 to n-1 on got, in order.
func expectNumbers(t testing.TB, got <-chan int, n int) {
	t.Helper()
	for want := range n {
		select {
		case i := <-got:
			require.Equal(t, want, i)
		case <-time.After(10 * time.Second):
			require.FailNow(t, "not received", "packet %d", want)
		}
	}
}

// A server that crashes with packets in a session's Incoming, not yet taken
// by its application, has not acknowledged them: its successor, which knows
// nothing of the session, receives them.
func TestCrashedServerSuccessorGetsWhatItsAppDidNotTake(t *testing.T) {
	untaken := make(chan *packet.Stream, 1)
	old := newCrashServer(t, 16, func(s *packet.Stream) { untaken <- s }) // takes nothing
	addr := &switchAddr{addr: old.addr()}
	client := resumableClient(t, addr.get)
	errs := collectErrors(client)
	for i := range 10 {
		client.Outgoing <- numbered(i, 8)
	}
	s := <-untaken
	waitFor(t, "ten packets in the old server's Incoming", func() bool { return len(s.Incoming) == 10 })
	time.Sleep(3 * 10 * time.Millisecond) // the acknowledgement timer has had its chance

	got := make(chan int, 100)
	successor := newCrashServer(t, 16, numbersTo(got))
	addr.set(successor.addr())
	old.crash()
	for lost := false; !lost; {
		lost = errors.Is(receiveError(t, errs).Error, packet.ErrSessionLost)
	}
	expectNumbers(t, got, 10)
}

// Clients whose server crashes at a random moment lose nothing that the
// server's application did not take: each of its packets reaches the
// application of the old server or of its successor.
func TestCrashAtRandomLosesNothingUntaken(t *testing.T) {
	const clients, packets = 50, 200
	rng := mrand.New(mrand.NewPCG(testSeed(t), 2))
	var mu sync.Mutex
	taken := make([]map[int]bool, clients) // by either server's application
	for i := range taken {
		taken[i] = map[int]bool{}
	}
	var crashed atomic.Bool
	record := func(s *packet.Stream, pause time.Duration) {
		for p := range s.Incoming {
			id, n := int(p.Data[8]), number(p)
			mu.Lock()
			taken[id][n] = true
			mu.Unlock()
			if pause > 0 && crashed.Load() {
				return // the old server's application died with it
			}
			time.Sleep(pause)
		}
	}
	// The old server's application is slow, so its sessions' Incoming
	// holds packets when it crashes.
	old := newCrashServer(t, 16, func(s *packet.Stream) { record(s, 200*time.Microsecond) })
	addr := &switchAddr{addr: old.addr()}
	streams := make([]*packet.Stream, clients)
	for id := range streams {
		streams[id] = resumableClient(t, addr.get)
		go func() {
			for i := range packets {
				p := numbered(i, 9)
				p.Data[8] = byte(id)
				streams[id].Outgoing <- p
			}
		}()
	}
	time.Sleep(time.Duration(5+rng.IntN(30)) * time.Millisecond) // a random crash moment
	successor := newCrashServer(t, 16, func(s *packet.Stream) { record(s, 0) })
	addr.set(successor.addr())
	crashed.Store(true)
	old.crash()
	waitFor(t, "every packet taken by one of the servers", func() bool {
		mu.Lock()
		defer mu.Unlock()
		for id := range taken {
			if len(taken[id]) < packets {
				return false
			}
		}
		return true
	})
}

// A connection that dies right after the server said the session was lost
// leaves the stream to start the new session on the next one: it does not
// keep trying to resume the old numbering.
func TestSessionLostThenCutRecovers(t *testing.T) {
	got := make(chan int, 100)
	record := numbersTo(got)
	old := newCrashServer(t, 16, record)
	addr := &switchAddr{addr: old.addr()}
	client := resumableClient(t, addr.get)
	client.OnError(func(e packet.IOError) {
		if errors.Is(e.Error, packet.ErrSessionLost) {
			e.Connection.Close() // the network fails right after the lost frame
		}
	})
	for i := range 5 {
		client.Outgoing <- numbered(i, 8)
		require.Equal(t, i, <-got)
	}
	successor := newCrashServer(t, 16, record)
	addr.set(successor.addr())
	old.crash()
	client.Outgoing <- numbered(5, 8)
	for {
		select {
		case n := <-got:
			if n == 5 {
				return
			}
		case <-time.After(10 * time.Second):
			require.FailNow(t, "the stream did not recover from a cut after lost")
		}
	}
}

// Large packets keep flowing to a receiver whose application falls behind
// until the sender's replay limit is reached: what the application takes
// later is acknowledged without more arriving.
func TestLargePacketsFlowPastTheReplayLimit(t *testing.T) {
	client, server := resumablePair(t, 16)
	client.SetReplayLimit(100 << 10)
	const n = 200
	go func() {
		for i := range n {
			client.Outgoing <- numbered(i, 40<<10)
		}
	}()
	// The application falls behind: Incoming fills, and the sender's
	// replay limit (two and a half packets) is reached.
	waitFor(t, "Incoming full", func() bool { return len(server.Incoming) >= 2 })
	for i := range n {
		require.Equal(t, i, number(receive(t, server)))
	}
}

// Close right after SetConnection on a resumable stream waits for the
// handshake, then sends what is queued.
func TestCloseDuringHandshakeSendsQueued(t *testing.T) {
	got := make(chan int, 100)
	server := newCrashServer(t, 16, numbersTo(got))
	for range 20 {
		conn, err := net.Dial("tcp", server.addr())
		require.NoError(t, err)
		client := packet.NewStream(16)
		client.EnableResume()
		client.SetConnection(conn)
		for i := range 5 {
			client.Outgoing <- numbered(i, 8)
		}
		require.NoError(t, client.Close())
		expectNumbers(t, got, 5)
	}
}

// side is one end of a resumable pair in TestBothSidesCloseAccountExactly.
type side struct {
	s         *packet.Stream
	sent      int
	delivered atomic.Int64
	unsent    atomic.Int64
	done      chan struct{} // Incoming closed
}

// unsentIn adds the count in an ErrUnsent error to the side's unsent.
func (sd *side) unsentIn(t *testing.T, err error) {
	if err == nil {
		return
	}
	var n int64
	_, scan := fmt.Sscanf(err.Error()[strings.Index(err.Error(), "unsent: ")+len("unsent: "):], "%d", &n)
	require.NoError(t, scan, err.Error())
	sd.unsent.Add(n)
}

// Both sides of a session closing at once account for every packet
// exactly: each one sent is delivered to the peer's application or counted
// unsent by its sender, never neither, never both; with fast and slow
// handlers, and Incoming unbuffered or buffered.
func TestBothSidesCloseAccountExactly(t *testing.T) {
	rng := mrand.New(mrand.NewPCG(testSeed(t), 3))
	for i := range 500 {
		size, slow := []int{0, 16}[i%2], i%4 >= 2
		client, server := resumablePair(t, size)
		sides := []*side{{s: client, done: make(chan struct{})}, {s: server, done: make(chan struct{})}}
		for _, sd := range sides {
			sd.s.OnError(func(e packet.IOError) {
				if errors.Is(e.Error, packet.ErrSessionEnded) {
					sd.unsentIn(t, e.Error)
				}
			})
			go func() {
				defer close(sd.done)
				for range sd.s.Incoming {
					sd.delivered.Add(1)
					if slow {
						time.Sleep(50 * time.Microsecond)
					}
				}
			}()
		}
		var senders sync.WaitGroup
		for _, sd := range sides {
			senders.Add(1)
			n := rng.IntN(40)
			go func() {
				defer senders.Done()
				for range n {
					sd.s.Outgoing <- packet.New(1, []byte("x"))
					sd.sent++
				}
			}()
		}
		senders.Wait()
		var closing sync.WaitGroup
		for _, sd := range sides {
			closing.Add(1)
			go func() {
				defer closing.Done()
				sd.unsentIn(t, sd.s.Close())
			}()
		}
		closing.Wait()
		for _, sd := range sides {
			<-sd.done
		}
		for k, sd := range sides {
			peer := sides[1-k]
			waitFor(t, "the accounts to settle", func() bool {
				// A report of what was unsent may still be on its way.
				return int64(sd.sent) <= peer.delivered.Load()+sd.unsent.Load()
			})
			require.Equal(t, int64(sd.sent), peer.delivered.Load()+sd.unsent.Load(),
				"round %d, side %d (size %d, slow %v): sent %d, the peer delivered %d, unsent %d",
				i, k, size, slow, sd.sent, peer.delivered.Load(), sd.unsent.Load())
		}
	}
}

// A resumable pair tells each other its limit: a packet over the peer's
// limit is refused on the sender with ErrTooLarge and skipped, the one
// behind it arrives, on the same connection.
func TestResumablePeersKeepEachOthersLimit(t *testing.T) {
	ln := listen(t)
	sessions := packet.NewSessions(16)
	t.Cleanup(func() { sessions.Close() })
	accepted := make(chan *packet.Stream, 1)
	serveEach(t, ln, func(c net.Conn) {
		if s, _, err := sessions.Accept(c); err == nil {
			accepted <- s
		}
	})
	client := newStream(t, 16)
	client.EnableResume()
	client.SetMaxSize(1024)
	clientErrs := collectErrors(client)
	conn, err := net.Dial("tcp", ln.Addr().String())
	require.NoError(t, err)
	client.SetConnection(conn)
	server := <-accepted
	serverErrs := collectErrors(server)
	server.Outgoing <- packet.New(1, make([]byte, 2048))
	server.Outgoing <- packet.New(2, []byte("behind it"))
	assert.Equal(t, "behind it", string(receive(t, client).Data))
	e := receiveError(t, serverErrs)
	assert.ErrorIs(t, e.Error, packet.ErrTooLarge)
	assert.Same(t, conn, client.Connection())
	assert.Empty(t, clientErrs, "the client's connection stayed up")
}

// An acknowledgement that goes backwards, and a bye that counts more than
// was sent, are refused with ErrHandshake and drop the connection.
func TestStrictSessionFrames(t *testing.T) {
	for name, frames := range map[string][]byte{
		"ack backwards":    append(controlFrame(0x03, 2), controlFrame(0x03, 1)...),
		"bye above sent":   controlFrame(0x07, 4),
		"ack above sent":   controlFrame(0x03, 4),
		"limit after hand": controlFrame(0x08, 100),
	} {
		t.Run(name, func(t *testing.T) {
			a, raw := tcpPair(t)
			s := newStream(t, 16)
			s.EnableResume()
			errs := collectErrors(s)
			s.SetConnection(a)
			handshakeRaw(t, raw, [16]byte{9})
			for i := range 3 {
				s.Outgoing <- numbered(i, 8)
			}
			ack := make([]byte, 9)
			_, err := io.ReadFull(raw, ack)
			require.NoError(t, err)
			require.Equal(t, controlFrame(0x03, 0), ack, "the client shows at once it has the token")
			d := packet.NewDecoder(raw)
			for range 3 {
				_, err := d.Decode()
				require.NoError(t, err)
			}
			_, err = raw.Write(frames)
			require.NoError(t, err)
			assert.ErrorIs(t, receiveError(t, errs).Error, packet.ErrHandshake)
			raw.SetReadDeadline(time.Now().Add(10 * time.Second))
			_, err = io.Copy(io.Discard, raw)
			assert.NoError(t, err, "the stream closed the connection")
		})
	}
}

// ---- Sessions on the open internet ----

// rawHello returns a hello for token with count read, and its limit frame.
func rawHello(token [16]byte, read uint64) []byte {
	b := append(controlFrame(0x04, read), token[:]...)
	return append(b, controlFrame(0x08, 1<<20)...)
}

// readWelcome reads a welcome and its limit frame and returns the token;
// for any other answer it returns the answer's kind and a zero token.
func readWelcome(t *testing.T, c net.Conn) ([16]byte, byte) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	defer c.SetReadDeadline(time.Time{})
	head := make([]byte, 9)
	_, err := io.ReadFull(c, head)
	require.NoError(t, err)
	var token [16]byte
	if head[0] != 0x05 {
		return token, head[0]
	}
	rest := make([]byte, 16+9)
	_, err = io.ReadFull(c, rest)
	require.NoError(t, err)
	copy(token[:], rest)
	return token, 0x05
}

// greet dials addr, says hello for token and reads the answer: the token it
// names and its kind (0x05 welcome, 0x06 lost). The connection is closed
// when the test ends.
func greet(t *testing.T, addr string, token [16]byte) (net.Conn, [16]byte, byte) {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	require.NoError(t, err)
	t.Cleanup(func() { c.Close() })
	_, err = c.Write(rawHello(token, 0))
	require.NoError(t, err)
	named, kind := readWelcome(t, c)
	return c, named, kind
}

// sessionsOn accepts connections on ln into sessions, each new session's
// stream configured by OnSession's configure and handed to handle, until the
// test ends.
func sessionsOn(t *testing.T, ln net.Listener, sessions *packet.Sessions, handle func(*packet.Stream)) <-chan error {
	refused := make(chan error, 10000)
	var handlers sync.WaitGroup
	t.Cleanup(func() { sessions.Close(); handlers.Wait() })
	serveEach(t, ln, func(c net.Conn) {
		handlers.Add(1)
		go func() {
			defer handlers.Done()
			s, isNew, err := sessions.Accept(c)
			switch {
			case err != nil:
				refused <- err
			case isNew && handle != nil:
				handle(s)
			}
		}()
	})
	return refused
}

// OnSession's callbacks see everything a new session's stream reports,
// even a bad frame sent in the same write as the hello.
func TestOnSessionSeesTheFirstByte(t *testing.T) {
	ln := listen(t)
	sessions := packet.NewSessions(4)
	reports := make(chan error, 200)
	sessions.OnSession(func(s *packet.Stream) {
		s.OnError(func(e packet.IOError) { reports <- e.Error })
	})
	sessionsOn(t, ln, sessions, nil)
	for i := range 100 {
		c, err := net.Dial("tcp", ln.Addr().String())
		require.NoError(t, err)
		bad := []byte{0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xfe}
		_, err = c.Write(append(rawHello([16]byte{}, 0), bad...))
		require.NoError(t, err)
		select {
		case err := <-reports:
			assert.ErrorIs(t, err, packet.ErrNegativeLength, "try %d", i)
		case <-time.After(10 * time.Second):
			require.FailNow(t, "the bad frame was reported to nobody", "try %d", i)
		}
		c.Close()
	}
}

// Clients that say hello and then nothing, not even a pong, are found by the
// sessions' keep-alive; their sessions expire, every one.
func TestSilentClientsSessionsReclaimed(t *testing.T) {
	ln := listen(t)
	sessions := packet.NewSessions(4)
	sessions.SetExpiry(50 * time.Millisecond)
	sessions.OnSession(func(s *packet.Stream) { s.SetKeepAlive(20*time.Millisecond, 60*time.Millisecond) })
	ended := make(chan struct{}, 100)
	sessionsOn(t, ln, sessions, func(s *packet.Stream) {
		for range s.Incoming {
		}
		ended <- struct{}{}
	})
	const silent = 20
	for range silent {
		c, err := net.Dial("tcp", ln.Addr().String())
		require.NoError(t, err)
		t.Cleanup(func() { c.Close() })
		_, err = c.Write(rawHello([16]byte{}, 0))
		require.NoError(t, err)
		go io.Copy(io.Discard, c) // reads the pings, never answers
	}
	// Keep-alive cuts each connection within 80 ms and the session expires
	// 50 ms later; allow for a loaded machine.
	deadline := time.After(10 * time.Second)
	for i := range silent {
		select {
		case <-ended:
		case <-deadline:
			require.FailNow(t, "sessions not reclaimed", "%d of %d", i, silent)
		}
	}
}

// A session's stream pings a silent client, with the documented default
// keep-alive or, as here to see it soon, one that OnSession sets.
func TestSessionStreamsPingSilentClients(t *testing.T) {
	assert.Equal(t, 15*time.Second, packet.DefaultSessionPing)
	assert.Equal(t, 45*time.Second, packet.DefaultSessionSilence)
	ln := listen(t)
	sessions := packet.NewSessions(4)
	sessions.OnSession(func(s *packet.Stream) {
		// Shorten the default to see it work; a zero would turn it off.
		s.SetKeepAlive(10*time.Millisecond, time.Minute)
	})
	sessionsOn(t, ln, sessions, nil)
	c, _, kind := greet(t, ln.Addr().String(), [16]byte{})
	require.Equal(t, byte(0x05), kind)
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	ping := make([]byte, 9)
	_, err := io.ReadFull(c, ping)
	require.NoError(t, err)
	assert.Equal(t, controlFrame(0x01, 0), ping)
}

// helloAndVanish opens a session and drops its connection at once, waiting
// for the server to have seen it gone when gone is given.
func helloAndVanish(t *testing.T, addr string, gone <-chan struct{}) {
	c, _, kind := greet(t, addr, [16]byte{})
	require.Equal(t, byte(0x05), kind)
	c.Close()
	if gone != nil {
		select {
		case <-gone:
		case <-time.After(10 * time.Second):
			require.FailNow(t, "the server did not see the client go")
		}
	}
}

// With SetMaxSessions(100), 300 clients that say hello and vanish leave 100
// sessions: each new one evicts the session whose client has been gone
// longest.
func TestMaxSessionsEvictsGoneLongest(t *testing.T) {
	ln := listen(t)
	sessions := packet.NewSessions(4)
	sessions.SetMaxSessions(100)
	var mu sync.Mutex
	order := map[*packet.Stream]int{} // numbered before the welcome goes out
	gone := []chan struct{}{}         // by number: the server saw the client go
	ended := map[int]bool{}
	sessions.OnSession(func(s *packet.Stream) {
		seen := make(chan struct{}, 1)
		mu.Lock()
		order[s] = len(order)
		gone = append(gone, seen)
		mu.Unlock()
		s.OnError(func(packet.IOError) {
			select {
			case seen <- struct{}{}:
			default:
			}
		})
	})
	sessionsOn(t, ln, sessions, func(s *packet.Stream) {
		for range s.Incoming {
		}
		mu.Lock()
		ended[order[s]] = true
		mu.Unlock()
	})
	for i := range 300 {
		helloAndVanish(t, ln.Addr().String(), nil)
		mu.Lock()
		seen := gone[i]
		mu.Unlock()
		select {
		case <-seen:
		case <-time.After(10 * time.Second):
			require.FailNow(t, "the server did not see the client go", "session %d", i)
		}
	}
	waitFor(t, "200 evicted", func() bool { mu.Lock(); defer mu.Unlock(); return len(ended) >= 200 })
	mu.Lock()
	defer mu.Unlock()
	assert.Len(t, ended, 200, "sessions left: 100")
	for i := range 200 {
		assert.True(t, ended[i], "session %d, gone longer than the last 100, was evicted", i)
	}
}

// With 100 clients connected and a limit of 100, the 101st is refused:
// Accept returns ErrTooManySessions, and so does the client's stream.
func TestMaxSessionsRefusesWhenAllConnected(t *testing.T) {
	ln := listen(t)
	sessions := packet.NewSessions(4)
	sessions.SetMaxSessions(100)
	refused := sessionsOn(t, ln, sessions, func(s *packet.Stream) {
		for p := range s.Incoming {
			s.Outgoing <- p
		}
	})
	for i := range 100 {
		c := resumableClient(t, func() string { return ln.Addr().String() })
		c.Outgoing <- numbered(i, 8)
		require.Equal(t, i, number(receive(t, c)))
	}
	extra := resumableClient(t, func() string { return ln.Addr().String() })
	errs := collectErrors(extra)
	assert.ErrorIs(t, receiveError(t, errs).Error, packet.ErrTooManySessions)
	select {
	case err := <-refused:
		assert.ErrorIs(t, err, packet.ErrTooManySessions)
	case <-time.After(10 * time.Second):
		require.FailNow(t, "Accept did not refuse")
	}
}

// A flood of 3,000 clients that say hello and vanish leaves memory and
// goroutines bounded by the limit, not by the flood.
func TestSessionFloodBounded(t *testing.T) {
	ln := listen(t)
	sessions := packet.NewSessions(4)
	sessions.SetMaxSessions(100)
	sessionsOn(t, ln, sessions, func(s *packet.Stream) {
		for range s.Incoming {
		}
	})
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	goroutines := runtime.NumGoroutine()
	var flood sync.WaitGroup
	for range 8 {
		flood.Add(1)
		go func() {
			defer flood.Done()
			for range 3000 / 8 {
				c, err := net.Dial("tcp", ln.Addr().String())
				if err != nil {
					t.Error(err)
					return
				}
				c.Write(rawHello([16]byte{}, 0))
				c.Read(make([]byte, 34))
				c.Close()
			}
		}()
	}
	flood.Wait()
	// What is left: at most 100 sessions, each a writer and a handler.
	waitFor(t, "the flood to settle", func() bool { return runtime.NumGoroutine()-goroutines <= 2*100+10 })
	runtime.GC()
	runtime.ReadMemStats(&after)
	heap := int64(after.HeapInuse) - int64(before.HeapInuse)
	assert.Less(t, heap, int64(100*64<<10), "heap after the flood: %d bytes", heap)
}

// A token seen on one connection is refused once the client has
// reconnected: each welcome names the session by a fresh token.
func TestTokensRotate(t *testing.T) {
	ln := listen(t)
	sessions := packet.NewSessions(4)
	sessionsOn(t, ln, sessions, nil)
	first, captured, kind := greet(t, ln.Addr().String(), [16]byte{})
	require.Equal(t, byte(0x05), kind)
	first.Close()

	// The client reconnects with the token it was given.
	again, next, kind := greet(t, ln.Addr().String(), captured)
	require.Equal(t, byte(0x05), kind, "the session resumes")
	assert.NotEqual(t, captured, next, "under a fresh token")
	// The client shows it has the new token by sending anything, as a
	// stream does at once; a ping answered means the server read it.
	_, err := again.Write(append(controlFrame(0x03, 0), controlFrame(0x01, 0)...))
	require.NoError(t, err)
	pong := make([]byte, 9)
	_, err = io.ReadFull(again, pong)
	require.NoError(t, err)
	require.Equal(t, controlFrame(0x02, 0), pong)

	_, _, kind = greet(t, ln.Addr().String(), captured)
	assert.Equal(t, byte(0x06), kind, "the captured token is answered lost")
}

// A welcome lost on the way costs no session: until the client shows it
// has the new token, the one it showed before still resumes the session.
func TestLostWelcomeKeepsSession(t *testing.T) {
	ln := listen(t)
	sessions := packet.NewSessions(4)
	sessionsOn(t, ln, sessions, nil)
	first, token, kind := greet(t, ln.Addr().String(), [16]byte{})
	require.Equal(t, byte(0x05), kind)
	first.Close()
	for range 3 { // each welcome lost: the client never reads it
		c, err := net.Dial("tcp", ln.Addr().String())
		require.NoError(t, err)
		_, err = c.Write(rawHello(token, 0))
		require.NoError(t, err)
		c.Close()
	}
	_, _, kind = greet(t, ln.Addr().String(), token)
	assert.Equal(t, byte(0x05), kind, "the session resumes with the token the client has")
}

// sniffer forwards connections to target and keeps the token of the last
// welcome it saw, as an eavesdropper on the path would.
type sniffer struct {
	ln     net.Listener
	target string
	mu     sync.Mutex
	token  [16]byte
}

func newSniffer(t *testing.T, target string) *sniffer {
	sn := &sniffer{ln: listen(t), target: target}
	var pipes sync.WaitGroup
	t.Cleanup(pipes.Wait)
	serveEach(t, sn.ln, func(in net.Conn) {
		out, err := net.Dial("tcp", target)
		if err != nil {
			in.Close()
			return
		}
		t.Cleanup(func() { in.Close(); out.Close() })
		pipes.Add(2)
		go func() { defer pipes.Done(); io.Copy(out, in); out.Close() }()
		go func() {
			defer pipes.Done()
			head := make([]byte, 9, 25)
			if _, err := io.ReadFull(out, head); err == nil && (head[0] == 0x05 || head[0] == 0x06) {
				// A welcome, or a lost with the new session's: a token follows.
				head = head[:25]
				if _, err := io.ReadFull(out, head[9:]); err == nil {
					sn.mu.Lock()
					copy(sn.token[:], head[9:])
					sn.mu.Unlock()
				}
			}
			in.Write(head)
			io.Copy(in, out)
			in.Close()
		}()
	})
	return sn
}

// Whatever a connection with the client's token sends (here two packets
// and an acknowledgement of more than was sent), the real client's next
// connection resumes or starts a new session, and traffic flows both ways.
func TestStolenTokenCannotWedgeSession(t *testing.T) {
	ln := listen(t)
	sessions := packet.NewSessions(16)
	sessionsOn(t, ln, sessions, func(s *packet.Stream) {
		for p := range s.Incoming {
			if p.Type == 1 {
				s.Outgoing <- p // echo what the real client sends after the attack
			}
		}
	})
	sn := newSniffer(t, ln.Addr().String())
	client := resumableClient(t, func() string { return sn.ln.Addr().String() })
	for i := range 8 {
		client.Outgoing <- numbered(i, 8)
	}
	waitFor(t, "the welcome seen", func() bool { sn.mu.Lock(); defer sn.mu.Unlock(); return sn.token != [16]byte{} })
	sn.mu.Lock()
	stolen := sn.token
	sn.mu.Unlock()

	attacker, err := net.Dial("tcp", ln.Addr().String())
	require.NoError(t, err)
	defer attacker.Close()
	_, err = attacker.Write(rawHello(stolen, 0))
	require.NoError(t, err)
	readWelcome(t, attacker)
	attack := append(numbered(100, 8).Bytes(), numbered(101, 8).Bytes()...)
	attacker.Write(append(attack, controlFrame(0x03, 12)...))

	const n = 1000
	go func() {
		for i := range n {
			p := numbered(1000+i, 8)
			p.Type = 1
			client.Outgoing <- p
		}
	}()
	for want := 1000; want < 1000+n; {
		select {
		case p := <-client.Incoming:
			if number(p) == want {
				want++
			}
		case <-time.After(10 * time.Second):
			require.FailNow(t, "traffic stopped after the attack", "waiting for %d", want)
		}
	}
}

// ---- Examples ----

// Example shows the original README's first example against a server that
// answers ping with pong.
func Example() {
	listener, _ := net.Listen("tcp", "127.0.0.1:0")
	defer listener.Close()
	go pongServer(listener)

	// Connect to a server
	conn, _ := net.Dial("tcp", listener.Addr().String())

	// Create a stream
	stream := packet.NewStream(1024)
	stream.SetConnection(conn)

	// Send a message
	stream.Outgoing <- packet.New(0, []byte("ping"))

	// Receive message
	msg := <-stream.Incoming

	// Check message contents
	fmt.Println(string(msg.Data))
	stream.Close()
	// Output: pong
}

// ExampleStream_SetConnection shows the original README's hot swap: a packet
// sent while the server is down waits for the new connection.
func ExampleStream_SetConnection() {
	listener, _ := net.Listen("tcp", "127.0.0.1:0")
	defer listener.Close()
	accepted := make(chan net.Conn)
	go func() {
		for {
			conn, err := listener.Accept()
			if err != nil {
				return
			}
			accepted <- conn
		}
	}()

	client := packet.NewStream(1024)
	defer client.Close()
	disconnected := make(chan struct{}, 1)
	client.OnError(func(packet.IOError) { disconnected <- struct{}{} })
	conn, _ := net.Dial("tcp", listener.Addr().String())
	client.SetConnection(conn)
	server := <-accepted

	// Close server connection to simulate server death
	server.Close()
	<-disconnected

	// Send packet while server is down (will be buffered until it reconnects)
	client.Outgoing <- packet.New(0, []byte("ping"))

	// Reconnect
	newServer, _ := net.Dial("tcp", listener.Addr().String())

	// Hot-swap connection
	client.SetConnection(newServer)

	// The previously buffered messages in the Outgoing channel will be sent now.
	serverSide := <-accepted
	defer serverSide.Close()
	msg, _ := packet.NewDecoder(serverSide).Decode()
	fmt.Println(string(msg.Data))
	// Output: ping
}

// ExampleStream_KeepConnected keeps a client connected to a server that
// drops its first connection: the stream dials again by itself, and the
// packet queued meanwhile goes out on the new connection.
func ExampleStream_KeepConnected() {
	listener, _ := net.Listen("tcp", "127.0.0.1:0")
	defer listener.Close()
	go func() {
		first, _ := listener.Accept()
		first.Close() // the server drops the first connection
		second, _ := listener.Accept()
		defer second.Close()
		msg, _ := packet.NewDecoder(second).Decode()
		fmt.Println("server got:", string(msg.Data))
		second.Write(packet.New(0, []byte("welcome back")).Bytes())
	}()

	client := packet.NewStream(1024)
	defer client.Close()
	dropped := make(chan struct{}, 1)
	client.OnError(func(packet.IOError) { dropped <- struct{}{} })
	client.KeepConnected(func() (net.Conn, error) {
		return net.Dial("tcp", listener.Addr().String())
	}, time.Second)
	<-dropped // a plain stream sends on what it has: wait for the drop
	client.Outgoing <- packet.New(0, []byte("hello"))
	fmt.Println("client got:", string((<-client.Incoming).Data))
	// Output:
	// server got: hello
	// client got: welcome back
}

// ExampleSessions_Accept is the accept loop of a server of resumable
// sessions: one stream per client, and a handler for each new session.
func ExampleSessions_Accept() {
	listener, _ := net.Listen("tcp", "127.0.0.1:0")
	defer listener.Close()
	sessions := packet.NewSessions(1024)
	defer sessions.Close()
	go func() {
		for {
			conn, err := listener.Accept()
			if err != nil {
				return
			}
			go func() {
				stream, isNew, err := sessions.Accept(conn)
				if err != nil || !isNew {
					return // a bad handshake, or a returning client whose handler goes on
				}
				for p := range stream.Incoming {
					stream.Outgoing <- packet.New(p.Type, append([]byte("echo: "), p.Data...))
				}
			}()
		}
	}()

	client := packet.NewStream(1024)
	defer client.Close()
	client.EnableResume()
	client.KeepConnected(func() (net.Conn, error) {
		return net.Dial("tcp", listener.Addr().String())
	}, time.Second)
	client.Outgoing <- packet.New(0, []byte("hi"))
	fmt.Println(string((<-client.Incoming).Data))
	// Output: echo: hi
}

// ExampleStream_EnableResume shows a resumable client surviving the loss of
// its connection: the packets sent around the cut reach the server once
// each, in order.
func ExampleStream_EnableResume() {
	listener, _ := net.Listen("tcp", "127.0.0.1:0")
	defer listener.Close()
	sessions := packet.NewSessions(1024)
	defer sessions.Close()
	conns := make(chan net.Conn, 2)
	received := make(chan string)
	go func() {
		for {
			conn, err := listener.Accept()
			if err != nil {
				return
			}
			conns <- conn
			go func() {
				stream, isNew, err := sessions.Accept(conn)
				if err == nil && isNew {
					for p := range stream.Incoming {
						received <- string(p.Data)
					}
				}
			}()
		}
	}()

	client := packet.NewStream(1024)
	defer client.Close()
	client.EnableResume() // before the first connection
	client.KeepConnected(func() (net.Conn, error) {
		return net.Dial("tcp", listener.Addr().String())
	}, time.Second)
	client.Outgoing <- packet.New(0, []byte("one"))
	fmt.Println(<-received)
	(<-conns).Close() // the server's end of the connection dies
	client.Outgoing <- packet.New(0, []byte("two"))
	client.Outgoing <- packet.New(0, []byte("three"))
	fmt.Println(<-received)
	fmt.Println(<-received)
	// Output:
	// one
	// two
	// three
}

// ExampleStream_SetKeepAlive finds a peer that went silent without closing
// its connection, as one whose machine lost power does.
func ExampleStream_SetKeepAlive() {
	listener, _ := net.Listen("tcp", "127.0.0.1:0")
	defer listener.Close()
	go func() {
		conn, _ := listener.Accept()
		defer conn.Close()
		io.Copy(io.Discard, conn) // reads the pings, never answers
	}()

	conn, _ := net.Dial("tcp", listener.Addr().String())
	stream := packet.NewStream(1024)
	defer stream.Close()
	failed := make(chan error, 1)
	stream.OnError(func(e packet.IOError) { failed <- e.Error })
	stream.SetKeepAlive(20*time.Millisecond, 100*time.Millisecond)
	stream.SetConnection(conn)
	fmt.Println(errors.Is(<-failed, os.ErrDeadlineExceeded))
	// Output: true
}

// ---- Benchmarks ----

// BenchmarkStreamOneWay sends packets from one stream to another over
// loopback TCP. The packet is sent again and again, so the allocations are
// the library's own, both sides together.
func BenchmarkStreamOneWay(b *testing.B) {
	for _, bs := range benchSizes {
		b.Run(bs.name, func(b *testing.B) {
			sender, receiver := tcpStreams(b, 16)
			oneWay(b, sender, receiver, bs.n)
		})
	}
}

// BenchmarkStreamOneWayRelease is BenchmarkStreamOneWay with a receiver
// that releases each packet once it is done with it.
func BenchmarkStreamOneWayRelease(b *testing.B) {
	for _, bs := range benchSizes {
		b.Run(bs.name, func(b *testing.B) {
			sender, receiver := tcpStreams(b, 16)
			p := packet.New(1, make([]byte, bs.n))
			b.ReportAllocs()
			b.SetBytes(int64(bs.n))
			b.ResetTimer()
			go func() {
				for range b.N {
					sender.Outgoing <- p
				}
			}()
			for range b.N {
				(<-receiver.Incoming).Release()
			}
		})
	}
}

// BenchmarkStreamManySenders is BenchmarkStreamOneWay/16B with eight
// goroutines sending on one stream.
func BenchmarkStreamManySenders(b *testing.B) {
	const senders = 8
	sender, receiver := tcpStreams(b, 1024)
	p := packet.New(1, make([]byte, 16))
	b.ReportAllocs()
	b.SetBytes(16)
	b.ResetTimer()
	for g := range senders {
		go func() {
			for i := g; i < b.N; i += senders {
				sender.Outgoing <- p
			}
		}()
	}
	for range b.N {
		<-receiver.Incoming
	}
}

// BenchmarkStreamPingPong measures round trips of a 16 byte packet to a
// stream that echoes it.
func BenchmarkStreamPingPong(b *testing.B) {
	client, server := tcpStreams(b, 16)
	pingPong(b, client, server)
}

// BenchmarkConnPingPong is BenchmarkStreamPingPong on a bare connection,
// with the same bytes on the wire: the reference for the stream's latency.
func BenchmarkConnPingPong(b *testing.B) {
	client, server := tcpPair(b)
	go func() {
		buf := make([]byte, packet.HeaderSize+16)
		for {
			if _, err := io.ReadFull(server, buf); err != nil {
				return
			}
			if _, err := server.Write(buf); err != nil {
				return
			}
		}
	}()
	msg := packet.New(1, make([]byte, 16)).Bytes()
	buf := make([]byte, len(msg))
	b.ReportAllocs()
	b.SetBytes(16)
	b.ResetTimer()
	for range b.N {
		if _, err := client.Write(msg); err != nil {
			b.Fatal(err)
		}
		if _, err := io.ReadFull(client, buf); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkUDP sends 16 byte packets over loopback UDP, in windows small
// enough that no datagram is dropped for want of buffer space.
func BenchmarkUDP(b *testing.B) {
	const window = 256
	sender, receiver := udpStreams(b, window)
	p := packet.New(1, make([]byte, 16))
	b.ReportAllocs()
	b.SetBytes(16)
	b.ResetTimer()
	for done := 0; done < b.N; {
		n := min(window, b.N-done)
		for range n {
			sender.Outgoing <- p
		}
		lost := time.After(5 * time.Second)
		for range n {
			select {
			case <-receiver.Incoming:
			case <-lost:
				b.Fatalf("a datagram was lost after %d packets", done)
			}
		}
		done += n
	}
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

// BenchmarkIdleStreamAfterTraffic is BenchmarkIdleStream for streams whose
// connection has gone quiet after carrying traffic (idleTraffic, and none,
// the baseline measured the same way), written to the far end of each
// connection and dropped on arrival: heap and stack bytes per stream once
// the heap has settled, and heap bytes alone. Its time includes the waits
// for the heap to settle and is of no interest.
func BenchmarkIdleStreamAfterTraffic(b *testing.B) {
	const n = 500
	for _, tc := range append([]idleCase{{"none", 0, 0}}, idleTraffic...) {
		wire := bytes.Repeat(packet.New(1, make([]byte, tc.size)).Bytes(), tc.packets)
		b.Run(tc.name, func(b *testing.B) {
			var heap, stack uint64
			for range b.N {
				conns := make([]net.Conn, 0, 2*n)
				for range n {
					x, y := net.Pipe()
					conns = append(conns, x, y)
				}
				before := settle()
				streams := make([]*packet.Stream, n)
				var wg sync.WaitGroup
				for i := range streams {
					s := packet.NewStream(16)
					s.SetConnection(conns[2*i])
					streams[i] = s
					if len(wire) > 0 {
						wg.Go(func() {
							if _, err := conns[2*i+1].Write(wire); err != nil {
								b.Error(err)
							}
						})
					}
					wg.Go(func() {
						for range tc.packets {
							<-s.Incoming
						}
					})
				}
				wg.Wait()
				after := settle()
				heap, stack = after.HeapInuse-before.HeapInuse, after.StackInuse-before.StackInuse
				for _, s := range streams {
					s.Close()
				}
				for _, c := range conns {
					c.Close()
				}
			}
			b.ReportMetric(float64(heap+stack)/n, "B/stream")
			b.ReportMetric(float64(heap)/n, "heap-B/stream")
		})
	}
}

// idleTraffic is what a connection carries before it goes quiet, in the
// idle memory test and benchmark: one packet of each size, or a burst.
var idleTraffic = []idleCase{
	{"100B", 100, 1},
	{"1KiB", 1 << 10, 1},
	{"16KiB", 16 << 10, 1},
	{"64KiB", 64 << 10, 1},
	{"burst256KiB", 1 << 10, 256},
}

// idleCase is packets of size bytes, one after the other.
type idleCase struct {
	name          string
	size, packets int
}

// TestIdleMemoryAfterTraffic checks that memory comes back once a connection
// goes quiet: 1,000 connections, each with a stream at both ends, hold no
// more after carrying any of idleTraffic one way than 1,000 that never
// carried anything, within 4 KiB a connection. The receiver drops every
// packet, so what is left is the streams' own.
func TestIdleMemoryAfterTraffic(t *testing.T) {
	const conns, slack = 1000, 4 << 10
	// The first streams of a process cost more than later ones: the
	// runtime keeps what their goroutines were made of for reuse.
	idleHeap(t, conns, 0, 0)
	never := idleHeap(t, conns, 0, 0)
	t.Logf("never used: %.0f B/conn", never)
	for _, tc := range idleTraffic {
		used := idleHeap(t, conns, tc.size, tc.packets)
		t.Logf("after %s: %.0f B/conn, %+.0f", tc.name, used, used-never)
		assert.Less(t, used-never, float64(slack), "after %s, B/conn above a never-used connection's", tc.name)
	}
}

// idleHeap makes conns connections over net.Pipe with a stream at each end,
// sends packets of size bytes one way on each, and returns the heap in use
// per connection once every packet has been received and dropped and the
// heap has settled.
func idleHeap(t *testing.T, conns, size, packets int) float64 {
	t.Helper()
	ends := make([]net.Conn, 0, 2*conns)
	for range conns {
		x, y := net.Pipe()
		ends = append(ends, x, y)
	}
	t.Cleanup(func() {
		for _, c := range ends {
			c.Close()
		}
	})
	before := settle().HeapInuse
	streams := make([]*packet.Stream, len(ends))
	for i, c := range ends {
		streams[i] = newStream(t, 16)
		streams[i].SetConnection(c)
	}
	p := packet.New(1, make([]byte, size))
	var wg sync.WaitGroup
	for i := 0; i < len(streams); i += 2 {
		sender, receiver := streams[i], streams[i+1]
		wg.Go(func() {
			for range packets {
				sender.Outgoing <- p
			}
		})
		wg.Go(func() {
			timeout := time.After(10 * time.Second)
			for range packets {
				select {
				case <-receiver.Incoming:
				case <-timeout:
					t.Error("a packet did not arrive")
					return
				}
			}
		})
	}
	wg.Wait()
	used := float64(settle().HeapInuse-before) / float64(conns)
	for _, s := range streams {
		s.Close()
	}
	return used
}

// settle collects garbage until the heap in use stays the same, within 64
// KiB, three times in a row, for at most 5 seconds, and returns the memory
// statistics: by then the readers have gone back to waiting and the pools
// have been emptied.
func settle() runtime.MemStats {
	var m runtime.MemStats
	prev, same := uint64(0), 0
	for deadline := time.Now().Add(5 * time.Second); same < 3 && time.Now().Before(deadline); {
		time.Sleep(time.Millisecond) // let the readers run
		runtime.GC()
		runtime.GC() // the second empties what pools held at the first
		runtime.ReadMemStats(&m)
		if max(m.HeapInuse, prev)-min(m.HeapInuse, prev) <= 64<<10 {
			same++
		} else {
			same = 0
		}
		prev = m.HeapInuse
	}
	return m
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
