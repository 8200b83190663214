package main

import (
	"bufio"
	"fmt"
	"log"
	"net"
	"runtime"
	"slices"
	"strconv"
	"sync"
	"time"
)

// params bounds every workload in count and time.
type params struct {
	runs   int           // runs per measurement; medians are reported
	dur    time.Duration // how long one throughput, ping-pong or allocation run sends
	conns  int           // connections held open in the idle workload
	rounds int           // round trips per connection in the many-connection workload
}

// Message types: data, then one stop marker that ends a one-way run.
const (
	typeData byte = 0
	typeStop byte = 1
)

// maxBytes bounds how much one run sends, whatever its duration.
const maxBytes = 1 << 30

// limit is how long any single run may take before the program gives up.
const limit = 2 * time.Minute

// watchdog ends the program if a run hangs, so that every wait is bounded.
func watchdog(what string) *time.Timer {
	return time.AfterFunc(limit, func() {
		log.Fatalf("benchmarks: %s did not finish within %v", what, limit)
	})
}

// listen opens a loopback listener on a free port.
func listen() net.Listener {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		log.Fatal(err)
	}
	return l
}

// pair connects two endpoints of k in this process: the server end first.
func pair(k kind) (srv, cli endpoint, done func()) {
	l := listen()
	out := make(chan endpoint, 1)
	stop := k.serve(l, out)
	cli, err := k.dial(l.Addr().String())
	if err != nil {
		log.Fatalf("%s: dial: %v", k.name, err)
	}
	srv = <-out
	return srv, cli, func() {
		stop()
		cli.close()
		srv.close()
	}
}

// count is how many messages of size bytes one run sends at most.
func count(size int) int {
	return min(maxBytes/max(size, 1), 4_000_000)
}

// sendN sends up to n messages of payload, stopping early once d has passed,
// then the stop marker. It returns how many data messages it sent.
func sendN(e endpoint, payload []byte, n int, d time.Duration) int {
	deadline := time.Now().Add(d)
	i := 0
	for ; i < n; i++ {
		// Reading the clock every message would cost as much as a small send.
		if i%64 == 0 && time.Now().After(deadline) {
			break
		}
		must(e.send(typeData, payload))
	}
	must(e.send(typeStop, nil))
	must(e.flush())
	return i
}

// recvAll receives until the stop marker and returns how many data messages
// and payload bytes arrived.
func recvAll(e endpoint) (n, bytes int) {
	for {
		typ, data, err := e.recv()
		must(err)
		if typ == typeStop {
			return n, bytes
		}
		n++
		bytes += len(data)
		if r, ok := e.(releaser); ok {
			r.release()
		}
	}
}

// echo sends every message back until the connection ends.
func echo(e endpoint) {
	for {
		typ, data, err := e.recv()
		if err != nil {
			return
		}
		if e.send(typ, data) != nil || e.flush() != nil {
			return
		}
	}
}

// throughput sends size byte messages from the server end to the client end
// and returns messages and payload megabytes per second. Server to client is
// the direction in which websocket frames are not masked.
func throughput(k kind, size int, p params) (msgs, mb float64) {
	defer watchdog(k.name + " throughput").Stop()
	srv, cli, done := pair(k)
	defer done()
	payload := make([]byte, size)
	type result struct {
		n, bytes int
		took     time.Duration
	}
	got := make(chan result)
	start := time.Now()
	go func() {
		n, bytes := recvAll(cli)
		got <- result{n, bytes, time.Since(start)}
	}()
	sent := sendN(srv, payload, count(size), p.dur)
	r := <-got
	if r.n != sent {
		log.Fatalf("%s: sent %d messages, received %d", k.name, sent, r.n)
	}
	s := r.took.Seconds()
	return float64(r.n) / s, float64(r.bytes) / 1e6 / s
}

// pingPong sends 16 byte messages from the client and waits for each echo.
// It returns the median and 99th percentile round trip in microseconds.
func pingPong(k kind, p params) (p50, p99 float64) {
	defer watchdog(k.name + " ping-pong").Stop()
	srv, cli, done := pair(k)
	defer done()
	go echo(srv)
	payload := make([]byte, 16)
	const warmup, maxRounds = 200, 100_000
	lat := make([]time.Duration, 0, maxRounds)
	deadline := time.Now().Add(p.dur)
	for i := 0; i < warmup+maxRounds && time.Now().Before(deadline); i++ {
		t := time.Now()
		must(cli.send(typeData, payload))
		must(cli.flush())
		_, _, err := cli.recv()
		must(err)
		if i >= warmup {
			lat = append(lat, time.Since(t))
		}
	}
	if len(lat) == 0 {
		log.Fatalf("%s: no round trip finished in %v", k.name, p.dur)
	}
	slices.Sort(lat)
	at := func(q float64) float64 {
		return float64(lat[int(q*float64(len(lat)-1))]) / 1e3
	}
	return at(0.50), at(0.99)
}

// allocs measures one side of a one-way run of size byte messages, with the
// other side in a child process so that the counters see this side only.
// It returns heap allocations and allocated bytes per message.
func allocs(k kind, side string, size int, p params) (perMsg, bytesPerMsg float64) {
	defer watchdog(k.name + " allocations").Stop()
	l := listen()
	out := make(chan endpoint, 1)
	stop := k.serve(l, out)
	defer stop()
	role := map[string]string{"send": "recv", "recv": "send"}[side]
	peer := startPeer(k.name, role, l.Addr().String(),
		"-size", strconv.Itoa(size), "-count", strconv.Itoa(count(size)), "-dur", p.dur.String())
	defer peer.finish()
	peer.tell("dial")
	e := <-out
	defer e.close()
	peer.expect("ready")
	payload := make([]byte, size)

	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	peer.tell("go")
	var n int
	if side == "send" {
		n = sendN(e, payload, count(size), p.dur)
		peer.expect("done") // the peer has received everything
	} else {
		n, _ = recvAll(e)
	}
	runtime.ReadMemStats(&after)
	return float64(after.Mallocs-before.Mallocs) / float64(n),
		float64(after.TotalAlloc-before.TotalAlloc) / float64(n)
}

// idleResult is what the many-connection workload measures.
type idleResult struct {
	bytes, goroutines     float64 // per connection, wrapped but unread
	bytesRd, goroutinesRd float64 // per connection, with one goroutine in recv each
	perSec                float64 // round trips per second, all connections at once
	took                  float64 // seconds for all round trips
	bytesAfter            float64 // per connection, with its goroutine, quiet again after traffic
}

// afterSize is the payload of the last round trip before the idle memory is
// measured again: large enough to need more than a small read buffer.
const afterSize = 1 << 10

// idle has a fresh child process hold p.conns connections of k, dialed from
// here, and report what they cost it (see hold). Then every connection does
// p.rounds round trips at once, timed here, and one more of afterSize bytes
// (16 for a fixed kind), untimed, after which the child reports again what
// the connections cost it now that they are quiet. A fresh process per
// measurement keeps one library's leftovers (free goroutines, cached
// stacks, a grown heap) out of the next one's numbers.
func idle(k kind, p params) idleResult {
	defer watchdog(k.name + " idle connections").Stop()
	holder := startPeer(k.name, "hold", "", "-conns", strconv.Itoa(p.conns))
	defer holder.finish()
	addr := holder.expect("listening")[1]
	eps := dialAll(k, addr, p.conns)
	defer func() {
		for _, e := range eps {
			e.close()
		}
	}()
	var r idleResult
	f := holder.expect("idle")
	for i, v := range []*float64{&r.bytes, &r.goroutines, &r.bytesRd, &r.goroutinesRd} {
		*v, _ = strconv.ParseFloat(f[i+1], 64)
	}
	start := time.Now()
	if failed := roundTrips(eps, p.rounds, 16); failed > 0 {
		log.Fatalf("benchmarks: %s: %d of %d connections failed", k.name, failed, p.conns)
	}
	r.took = time.Since(start).Seconds()
	r.perSec = float64(p.conns*p.rounds) / r.took
	size := afterSize
	if k.fixed {
		size = 16
	}
	if failed := roundTrips(eps, 1, size); failed > 0 {
		log.Fatalf("benchmarks: %s: %d of %d connections failed", k.name, failed, p.conns)
	}
	holder.tell("quiet")
	r.bytesAfter, _ = strconv.ParseFloat(holder.expect("after")[1], 64)
	return r
}

// hold is the child's side of idle: it accepts conns connections of k and
// prints, per connection, the heap and stack memory and the goroutines they
// added, first as wrapped, then with a goroutine blocked receiving on each
// (as a user's read loop would be; it echoes). Once the parent says the
// traffic is over (a line on in), it prints the memory per connection
// again. Memory is counted from before the first connection, so it
// includes the TCP connection itself.
func hold(k kind, conns int, in *bufio.Scanner) {
	l := listen()
	out := make(chan endpoint, 64)
	k.serve(l, out)
	eps := make([]endpoint, 0, conns)
	g0, m0 := settle()
	fmt.Println("listening", l.Addr())
	for len(eps) < conns {
		eps = append(eps, <-out)
	}
	g1, m1 := settle()
	for _, e := range eps {
		go echo(e)
	}
	g2, m2 := settle()
	n := float64(conns)
	fmt.Println("idle", float64(int64(m1)-int64(m0))/n, float64(g1-g0)/n,
		float64(int64(m2)-int64(m0))/n, float64(g2-g0)/n)
	if !in.Scan() {
		return
	}
	_, m3 := settle()
	fmt.Println("after", float64(int64(m3)-int64(m0))/n)
}

// settle waits until the number of goroutines has stopped changing (new ones
// have blocked, old ones have exited), collects garbage and returns the
// goroutine count and the heap and stack memory in use.
func settle() (goroutines int, mem uint64) {
	prev, same := -1, 0
	for end := time.Now().Add(10 * time.Second); same < 4 && time.Now().Before(end); {
		time.Sleep(50 * time.Millisecond)
		if g := runtime.NumGoroutine(); g == prev {
			same++
		} else {
			prev, same = g, 0
		}
	}
	runtime.GC()
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return runtime.NumGoroutine(), m.HeapInuse + m.StackInuse
}

// roundTrips does rounds round trips of size bytes on every endpoint at
// once and returns how many failed.
func roundTrips(eps []endpoint, rounds, size int) int {
	var wg sync.WaitGroup
	var mu sync.Mutex
	failed := 0
	payload := make([]byte, size)
	for _, e := range eps {
		wg.Go(func() {
			for range rounds {
				err := e.send(typeData, payload)
				if err == nil {
					err = e.flush()
				}
				if err == nil {
					_, _, err = e.recv()
				}
				if err != nil {
					mu.Lock()
					failed++
					mu.Unlock()
					return
				}
			}
		})
	}
	wg.Wait()
	return failed
}

// must stops the program on an error: a benchmark that failed has no result.
func must(err error) {
	if err != nil {
		log.Fatal(fmt.Errorf("benchmarks: %w", err))
	}
}
