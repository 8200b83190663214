// Command benchmarks compares github.com/aerogo/packet with a standard
// library baseline of the same wire format, go-msgio and gorilla/websocket
// over loopback TCP, and prints a table of medians. See README.md.
package main

import (
	"bufio"
	"flag"
	"fmt"
	"math"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"
)

func main() {
	var pf peerFlags
	pf.register()
	quick := flag.Bool("quick", false, "smoke run of a few seconds: one run, short sends, 500 connections")
	only := flag.String("only", "1,2,3,4", "the `workloads` to run: 1 one-way, 2 ping-pong, 3 allocations, 4 many connections")
	runs := flag.Int("runs", 0, "`runs` of each workload, if not the default")
	flag.Parse()
	if pf.kind != "" {
		runPeer(pf)
		return
	}

	p := params{runs: 7, dur: 400 * time.Millisecond, conns: 10_000, rounds: 5}
	if *quick {
		p = params{runs: 1, dur: 50 * time.Millisecond, conns: 500, rounds: 2}
	}
	if *runs > 0 {
		p.runs = *runs
	}
	start := time.Now()
	fmt.Printf("machine: %s, %d cores (GOMAXPROCS %d), %s %s/%s\n",
		cpuModel(), runtime.NumCPU(), runtime.GOMAXPROCS(0), runtime.Version(), runtime.GOOS, runtime.GOARCH)
	fmt.Printf("each value is the median of %d runs, libraries alternating within each run\n", p.runs)
	for i, workload := range []func(params){oneWay, roundTrip, allocations, manyConns} {
		if strings.Contains(*only, strconv.Itoa(i+1)) {
			workload(p)
		}
	}
	fmt.Printf("\ntotal time %.0f s\n", time.Since(start).Seconds())
}

// payload sizes of the throughput and allocation workloads.
var sizes = []int{16, 1 << 10, 64 << 10, 1 << 20}

func oneWay(p params) {
	var s series
	for run := range p.runs {
		progress("1. throughput", run, p.runs)
		for _, size := range sizes {
			for _, k := range kinds {
				if !k.fixed {
					msgs, mb := throughput(k, size, p)
					s.add(sizeName(size)+"\t"+k.name, msgs, mb)
				}
			}
		}
	}
	t := newTable("1. One-way throughput, server to client (ratios: msgs/s over stdlib's and floor's; higher is faster)",
		"payload\tlibrary\tmsgs/s\tMB/s\tvs stdlib\tvs floor")
	for _, label := range s.labels {
		v, base, fl := s.median(label), s.median(baseOf(label, "stdlib")), s.median(baseOf(label, "floor"))
		t.row("%s\t%s\t%.0f\t%s\t%s", label, count3(v[0]), v[1], ratio(v[0], base[0]), ratio(v[0], fl[0]))
	}
	t.flush()
}

func roundTrip(p params) {
	var s series
	for run := range p.runs {
		progress("2. ping-pong", run, p.runs)
		for _, k := range kinds {
			if k.releases {
				continue
			}
			p50, p99 := pingPong(k, p)
			s.add(k.name, p50, p99)
		}
	}
	t := newTable("2. Ping-pong of 16 B payloads, one connection (ratios: over bare net.Conn's and floor's; lower is faster)",
		"library\tp50 µs\tvs net.Conn\tvs floor\tp99 µs\tvs net.Conn\tvs floor")
	base, fl := s.median("net.Conn"), s.median("floor")
	for _, label := range s.labels {
		v := s.median(label)
		t.row("%s\t%.1f\t%s\t%s\t%.1f\t%s\t%s", label,
			v[0], ratio(v[0], base[0]), ratio(v[0], fl[0]), v[1], ratio(v[1], base[1]), ratio(v[1], fl[1]))
	}
	t.flush()
}

func allocations(p params) {
	var s series
	for run := range p.runs {
		progress("3. allocations", run, p.runs)
		for _, side := range []string{"send", "recv"} {
			for _, size := range []int{16, 64 << 10} {
				for _, k := range kinds {
					if !k.fixed {
						n, b := allocs(k, side, size, p)
						s.add(side+"\t"+sizeName(size)+"\t"+k.name, n, b)
					}
				}
			}
		}
	}
	t := newTable("3. Heap allocations per message, one side measured, the other in a child process (ratios: over stdlib's and floor's; lower is leaner)",
		"side\tpayload\tlibrary\tallocs\tvs stdlib\tvs floor\tbytes\tvs stdlib\tvs floor")
	for _, label := range s.labels {
		v, base, fl := s.median(label), s.median(baseOf(label, "stdlib")), s.median(baseOf(label, "floor"))
		// Bytes are compared as printed, whole, so that a baseline of 0.01
		// bytes a message shows no ratio rather than a huge one.
		t.row("%s\t%.2f\t%s\t%s\t%.0f\t%s\t%s", label,
			v[0], ratio(v[0], base[0]), ratio(v[0], fl[0]),
			v[1], ratio(math.Round(v[1]), math.Round(base[1])), ratio(math.Round(v[1]), math.Round(fl[1])))
	}
	t.flush()
}

func manyConns(p params) {
	var s series
	for run := range p.runs {
		progress("4-5. many connections", run, p.runs)
		for _, k := range kinds {
			if k.releases {
				continue
			}
			r := idle(k, p)
			s.add(k.name, r.bytes, r.goroutines, r.bytesRd, r.goroutinesRd, r.perSec, r.took, r.bytesAfter)
		}
	}
	t := newTable(fmt.Sprintf("4. Idle connections, %d held by one process: heap+stack in use after GC per connection (TCP connection included) and goroutines per connection (ratios of KiB with reader; lower is leaner)", p.conns),
		"library\tKiB/conn\tgoroutines\tKiB/conn with reader\tgoroutines\tvs stdlib\tvs net.Conn\tvs floor\tKiB/conn after traffic\tvs before\tvs floor")
	base, bare, fl := s.median("stdlib"), s.median("net.Conn"), s.median("floor")
	for _, label := range s.labels {
		v := s.median(label)
		t.row("%s\t%.2f\t%.2f\t%.2f\t%.2f\t%s\t%s\t%s\t%.2f\t%s\t%s", label, v[0]/1024, v[1], v[2]/1024, v[3],
			ratio(v[2], base[2]), ratio(v[2], bare[2]), ratio(v[2], fl[2]),
			v[6]/1024, ratio(v[6], v[2]), ratio(v[6], fl[6]))
	}
	t.note(`"with reader": one goroutine per connection blocked receiving (for packet and floor, on Incoming), as a user's read loop; it echoes in workload 5.`)
	t.note(fmt.Sprintf(`"after traffic": with reader, quiet again after workload 5's round trips and one more of %d B each (16 B for net.Conn); "vs before" is over "with reader".`, afterSize))
	t.note(`stdlib holds its two 64 KiB bufio buffers (sized for throughput), so "vs net.Conn" is the fairer memory ratio.`)
	t.flush()

	t = newTable(fmt.Sprintf("5. Round trips of 16 B, %d per connection on all %d connections at once (higher is faster)", p.rounds, p.conns),
		"library\tround trips/s\ttotal s\tvs stdlib\tvs net.Conn\tvs floor")
	for _, label := range s.labels {
		v := s.median(label)
		t.row("%s\t%s\t%.2f\t%s\t%s\t%s", label, count3(v[4]), v[5], ratio(v[4], base[4]), ratio(v[4], bare[4]), ratio(v[4], fl[4]))
	}
	t.flush()
}

// series collects one vector of values per run for each label, in the order
// labels first appear.
type series struct {
	labels []string
	runs   map[string][][]float64
}

func (s *series) add(label string, v ...float64) {
	if s.runs == nil {
		s.runs = map[string][][]float64{}
	}
	if _, ok := s.runs[label]; !ok {
		s.labels = append(s.labels, label)
	}
	s.runs[label] = append(s.runs[label], v)
}

// median returns the median of each value over the runs.
func (s *series) median(label string) []float64 {
	runs := s.runs[label]
	if len(runs) == 0 {
		return nil
	}
	m := make([]float64, len(runs[0]))
	for i := range m {
		col := make([]float64, len(runs))
		for j, r := range runs {
			col[j] = r[i]
		}
		slices.Sort(col)
		m[i] = col[len(col)/2]
		if len(col)%2 == 0 {
			m[i] = (col[len(col)/2-1] + col[len(col)/2]) / 2
		}
	}
	return m
}

// baseOf returns label with its last tab-separated field, the library,
// replaced by base.
func baseOf(label, base string) string {
	return label[:strings.LastIndex(label, "\t")+1] + base
}

// table prints aligned columns under a title.
type table struct {
	w     *tabwriter.Writer
	notes []string
}

func newTable(title, header string) *table {
	fmt.Printf("\n%s\n", title)
	t := &table{w: tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', tabwriter.AlignRight)}
	fmt.Fprintln(t.w, header+"\t")
	return t
}

func (t *table) row(format string, args ...any) { fmt.Fprintf(t.w, format+"\t\n", args...) }
func (t *table) note(s string)                  { t.notes = append(t.notes, s) }

func (t *table) flush() {
	t.w.Flush()
	for _, n := range t.notes {
		fmt.Println(n)
	}
}

// ratio formats v/base, or a dash when base is too small to divide by: a
// baseline that allocates 0.001 times per message has no meaningful ratio.
func ratio(v, base float64) string {
	if base < 0.01 {
		return "-"
	}
	return fmt.Sprintf("%.2fx", v/base)
}

// count3 formats a rate with three significant digits and a k or M suffix.
func count3(v float64) string {
	suffix := ""
	switch {
	case v >= 1e6:
		v, suffix = v/1e6, "M"
	case v >= 1e3:
		v, suffix = v/1e3, "k"
	}
	switch {
	case v >= 100:
		return fmt.Sprintf("%.0f%s", v, suffix)
	case v >= 10:
		return fmt.Sprintf("%.1f%s", v, suffix)
	}
	return fmt.Sprintf("%.2f%s", v, suffix)
}

func sizeName(n int) string {
	switch {
	case n >= 1<<20:
		return fmt.Sprintf("%d MiB", n>>20)
	case n >= 1<<10:
		return fmt.Sprintf("%d KiB", n>>10)
	}
	return fmt.Sprintf("%d B", n)
}

// progress tells stderr where a long run is.
func progress(what string, run, runs int) {
	fmt.Fprintf(os.Stderr, "# %s: run %d of %d\n", what, run+1, runs)
}

// cpuModel returns the CPU's model name from /proc/cpuinfo.
func cpuModel() string {
	f, err := os.Open("/proc/cpuinfo")
	if err != nil {
		return "unknown CPU"
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if k, v, ok := strings.Cut(sc.Text(), ":"); ok && strings.TrimSpace(k) == "model name" {
			return strings.TrimSpace(v)
		}
	}
	return "unknown CPU"
}
