package packet_test

import (
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"runtime"
	"testing"
	"testing/iotest"

	"github.com/aerogo/packet"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// ---- Vectors and helpers ----

// wireVectors are the lines of shared/wire/vectors.txt, produced by the
// original aerogo/packet encoder. The payload and encoding are hex; "-" is
// the empty payload.
var wireVectors = []struct {
	typ      byte
	payload  string
	encoding string
}{
	{0, "70696e67", "00000000000000000470696e67"},
	{0, "706f6e67", "000000000000000004706f6e67"},
	{0, "-", "000000000000000000"},
	{1, "-", "010000000000000000"},
	{255, "00010203feff", "ff000000000000000600010203feff"},
	{7, "68c3a96c6c6f2c20e4b896e7958c", "07000000000000000e68c3a96c6c6f2c20e4b896e7958c"},
}

// invalidVectors are the lines of shared/wire/invalid.txt with the error each
// must produce under the default limit.
var invalidVectors = []struct {
	name     string
	encoding string
	want     error
}{
	{"negative-length", "00ffffffffffffffff", packet.ErrNegativeLength},
	{"huge-length", "007fffffffffffffff", packet.ErrTooLarge},
	{"claims-1TiB-sends-4-bytes", "00000001000000000070696e67", packet.ErrTooLarge},
	{"truncated-header", "000000", io.ErrUnexpectedEOF},
	{"truncated-payload", "00000000000000000470", io.ErrUnexpectedEOF},
}

// shortReaders chop a byte stream in the ways a network connection may.
var shortReaders = []struct {
	name string
	wrap func(io.Reader) io.Reader
}{
	{"Whole", func(r io.Reader) io.Reader { return r }},
	{"HalfReader", iotest.HalfReader},
	{"OneByteReader", iotest.OneByteReader},
	{"DataErrReader", iotest.DataErrReader},
	{"OneByteDataErrReader", func(r io.Reader) io.Reader { return iotest.DataErrReader(iotest.OneByteReader(r)) }},
}

var errBoom = errors.New("boom")

// fuzzMaxSize is the decoder limit in FuzzDecode.
const fuzzMaxSize = 1 << 20

var benchSizes = []struct {
	name string
	n    int
}{
	{"16B", 16},
	{"1KiB", 1 << 10},
	{"64KiB", 64 << 10},
	{"1MiB", 1 << 20},
}

// unhex decodes a hex literal from the vectors; "-" is the empty payload.
func unhex(tb testing.TB, s string) []byte {
	tb.Helper()
	if s == "-" {
		return []byte{}
	}
	b, err := hex.DecodeString(s)
	if err != nil {
		tb.Fatalf("bad hex literal %q: %v", s, err)
	}
	return b
}

// wireHeader builds a header by hand, independent of the package, so that it
// can claim any length.
func wireHeader(typ byte, length int64) []byte {
	return binary.BigEndian.AppendUint64([]byte{typ}, uint64(length))
}

// testPayload returns n bytes that do not repeat with any short period, so
// that a misplaced chunk shows up.
func testPayload(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i) ^ byte(i>>8)*7 ^ byte(i>>16)*13 ^ seed
	}
	return b
}

// truncationPoints returns the cuts worth trying in an n byte encoding:
// every cut for small ones, and around the header and chunk sizes for large.
func truncationPoints(n int) []int {
	if n <= 64 {
		cuts := make([]int, n)
		for i := range cuts {
			cuts[i] = i
		}
		return cuts
	}
	var cuts []int
	for _, c := range []int{0, 1, 8, 9, 10, 2 << 10, 32 << 10, 64 << 10, 64<<10 + 9, n - 1} {
		if c < n {
			cuts = append(cuts, c)
		}
	}
	return cuts
}

// decodeUntilError decodes packets until Decode fails and returns them with
// the error.
func decodeUntilError(d *packet.Decoder) ([]*packet.Packet, error) {
	var packets []*packet.Packet
	for {
		p, err := d.Decode()
		if err != nil {
			return packets, err
		}
		packets = append(packets, p)
	}
}

// specDecode decodes the packet at the start of b straight from the wire
// format's definition; it is the fuzzer's oracle.
func specDecode(b []byte, max int) (*packet.Packet, error) {
	switch {
	case len(b) == 0:
		return nil, io.EOF
	case len(b) < packet.HeaderSize:
		return nil, io.ErrUnexpectedEOF
	}
	length := int64(binary.BigEndian.Uint64(b[1:packet.HeaderSize]))
	switch {
	case length < 0:
		return nil, packet.ErrNegativeLength
	case length > int64(max):
		return nil, packet.ErrTooLarge
	case length > int64(len(b)-packet.HeaderSize):
		return nil, io.ErrUnexpectedEOF
	}
	return packet.New(b[0], b[packet.HeaderSize:packet.HeaderSize+length]), nil
}

func samePacket(a, b *packet.Packet) bool {
	return a != nil && b != nil && a.Type == b.Type && bytes.Equal(a.Data, b.Data)
}

// assertPayload compares byte slices, treating nil and empty as equal, and
// names the first difference rather than printing megabytes.
func assertPayload(t *testing.T, want, got []byte) {
	t.Helper()
	if bytes.Equal(want, got) {
		return
	}
	if len(want) <= 64 && len(got) <= 64 {
		assert.Equal(t, hex.EncodeToString(want), hex.EncodeToString(got))
		return
	}
	i := 0
	for i < len(want) && i < len(got) && want[i] == got[i] {
		i++
	}
	assert.Fail(t, "payloads differ", "want %d bytes, got %d; first difference at byte %d", len(want), len(got), i)
}

func assertPackets(t *testing.T, want, got []*packet.Packet) {
	t.Helper()
	if !assert.Len(t, got, len(want)) {
		return
	}
	for i := range want {
		assert.Equal(t, want[i].Type, got[i].Type, "packet %d", i)
		assertPayload(t, want[i].Data, got[i].Data)
	}
}

// minAllocated returns the fewest bytes f allocated over a few runs, so that
// an allocation elsewhere in the process does not fail the test.
func minAllocated(f func()) uint64 {
	least := uint64(math.MaxUint64)
	for range 3 {
		var before, after runtime.MemStats
		runtime.GC()
		runtime.ReadMemStats(&before)
		f()
		runtime.ReadMemStats(&after)
		least = min(least, after.TotalAlloc-before.TotalAlloc)
	}
	return least
}

// ---- Fake writers ----

// countingWriter counts the Write calls it gets.
type countingWriter struct {
	bytes.Buffer
	calls int
}

func (w *countingWriter) Write(p []byte) (int, error) {
	w.calls++
	return w.Buffer.Write(p)
}

// failingWriter accepts every Write before the failAt-th (counting from 0)
// and fails that one and all after it.
type failingWriter struct {
	failAt int
	calls  int
	failed bool
}

func (w *failingWriter) Write(b []byte) (int, error) {
	w.calls++
	if w.calls > w.failAt {
		w.failed = true
		return 0, errBoom
	}
	return len(b), nil
}

// ---- Encoding ----

func TestEncodingMatchesWireVectors(t *testing.T) {
	for _, v := range wireVectors {
		t.Run(v.encoding, func(t *testing.T) {
			p := packet.New(v.typ, unhex(t, v.payload))
			want := unhex(t, v.encoding)

			assert.Equal(t, v.encoding, hex.EncodeToString(p.Bytes()), "Bytes")

			var buf bytes.Buffer
			require.NoError(t, p.Write(&buf))
			assert.Equal(t, v.encoding, hex.EncodeToString(buf.Bytes()), "Write")

			got, err := p.AppendBinary(nil)
			require.NoError(t, err)
			assert.Equal(t, v.encoding, hex.EncodeToString(got), "AppendBinary(nil)")

			prefix := []byte("prefix")
			got, err = p.AppendBinary(prefix)
			require.NoError(t, err)
			assert.Equal(t, append([]byte("prefix"), want...), got, "AppendBinary(prefix)")
		})
	}
}

// TestWriteExactAroundCopyLimit covers payloads on both sides of the size at which
// Write stops copying the payload next to its header.
func TestWriteExactAroundCopyLimit(t *testing.T) {
	for _, n := range []int{16<<10 - 1, 16 << 10, 16<<10 + 1, 100 << 10, 1<<20 + 3} {
		t.Run(fmt.Sprint(n), func(t *testing.T) {
			payload := testPayload(n, 5)
			p := packet.New(42, payload)
			want := append(wireHeader(42, int64(n)), payload...)

			var buf bytes.Buffer
			require.NoError(t, p.Write(&buf))
			assertPayload(t, want, buf.Bytes())
			assertPayload(t, want, p.Bytes())

			got, err := p.AppendBinary(nil)
			require.NoError(t, err)
			assertPayload(t, want, got)
		})
	}
}

// A packet with a payload up to 16 KiB goes out in one Write call, header
// and payload together.
func TestWriteSmallPacketInOneCall(t *testing.T) {
	for _, n := range []int{0, 4, 1000, 16 << 10} {
		w := &countingWriter{}
		p := packet.New(7, testPayload(n, 1))
		require.NoError(t, p.Write(w))
		assert.Equal(t, 1, w.calls, "payload of %d bytes", n)
		assert.Equal(t, p.Bytes(), w.Bytes())
	}
}

// TestWriteOverTCPSendsExactBytes writes to a real TCP connection, where large payloads
// go out with writev.
func TestWriteOverTCPSendsExactBytes(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	t.Cleanup(func() { ln.Close() })

	type result struct {
		b   []byte
		err error
	}
	received := make(chan result, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			received <- result{err: err}
			return
		}
		defer c.Close()
		b, err := io.ReadAll(c)
		received <- result{b, err}
	}()

	c, err := net.Dial("tcp", ln.Addr().String())
	require.NoError(t, err)
	t.Cleanup(func() { c.Close() })

	packets := []*packet.Packet{
		packet.New(1, []byte("small")),
		packet.New(2, testPayload(100<<10, 1)),
		packet.New(3, nil),
		packet.New(4, testPayload(16<<10+1, 2)),
	}
	var want []byte
	for _, p := range packets {
		require.NoError(t, p.Write(c))
		want = append(want, p.Bytes()...)
	}
	require.NoError(t, c.Close())

	r := <-received
	require.NoError(t, r.err)
	assertPayload(t, want, r.b)
}

func TestWriteReturnsWriterError(t *testing.T) {
	for _, n := range []int{0, 10, 16 << 10, 16<<10 + 1, 100 << 10} {
		p := packet.New(1, testPayload(n, 0))
		t.Run(fmt.Sprintf("%d/first", n), func(t *testing.T) {
			err := p.Write(&failingWriter{failAt: 0})
			assert.ErrorIs(t, err, errBoom)
		})
		t.Run(fmt.Sprintf("%d/second", n), func(t *testing.T) {
			// A writer that takes the first Write and fails the next: if
			// Write needed a second call, its error must reach the caller.
			w := &failingWriter{failAt: 1}
			err := p.Write(w)
			if w.failed {
				assert.ErrorIs(t, err, errBoom)
			} else {
				assert.NoError(t, err)
			}
		})
	}
}

// The wire carries len(Data): a packet whose Length disagrees, as a caller
// of the original might leave it, is encoded from Data.
func TestLengthDisagreeingIsEncodedFromData(t *testing.T) {
	for _, length := range []int64{0, 3, 100, -1} {
		p := &packet.Packet{Type: 9, Length: length, Data: []byte("abcd")}
		want := "09000000000000000461626364"
		assert.Equal(t, want, hex.EncodeToString(p.Bytes()), "Bytes, Length %d", length)
		var buf bytes.Buffer
		require.NoError(t, p.Write(&buf))
		assert.Equal(t, want, hex.EncodeToString(buf.Bytes()), "Write, Length %d", length)
	}
}

// Int64ToBytes and Int64FromBytes, kept for the original's users, are the
// big-endian form of a length on the wire; short input is an error, not a
// panic.
func TestInt64Helpers(t *testing.T) {
	for _, i := range []int64{0, 1, 4, -1, math.MaxInt64, math.MinInt64} {
		b := packet.Int64ToBytes(i)
		assert.Equal(t, binary.BigEndian.AppendUint64(nil, uint64(i)), b)
		got, err := packet.Int64FromBytes(b)
		require.NoError(t, err)
		assert.Equal(t, i, got)
	}
	got, err := packet.Int64FromBytes(unhex(t, "0000000000000004ff"))
	require.NoError(t, err, "bytes after the first 8 are ignored")
	assert.Equal(t, int64(4), got)
	_, err = packet.Int64FromBytes(nil)
	assert.ErrorIs(t, err, io.EOF)
	_, err = packet.Int64FromBytes([]byte{0, 0, 4})
	assert.ErrorIs(t, err, io.ErrUnexpectedEOF)
}

// ---- Decoding ----

func TestWireVectorsDecodeThenEOF(t *testing.T) {
	for _, v := range wireVectors {
		t.Run(v.encoding, func(t *testing.T) {
			d := packet.NewDecoder(bytes.NewReader(unhex(t, v.encoding)))
			p, err := d.Decode()
			require.NoError(t, err)
			assert.Equal(t, v.typ, p.Type)
			assertPayload(t, unhex(t, v.payload), p.Data)

			p, err = d.Decode()
			assert.Nil(t, p)
			assert.Equal(t, io.EOF, err)
		})
	}
}

func TestInvalidVectorsRefused(t *testing.T) {
	for _, v := range invalidVectors {
		for _, sr := range shortReaders {
			t.Run(v.name+"/"+sr.name, func(t *testing.T) {
				d := packet.NewDecoder(sr.wrap(bytes.NewReader(unhex(t, v.encoding))))
				p, err := d.Decode()
				assert.Nil(t, p)
				require.Error(t, err)
				assert.ErrorIs(t, err, v.want)
			})
		}
	}
}

func TestDecodeEmptyInputIsEOF(t *testing.T) {
	for _, sr := range shortReaders {
		t.Run(sr.name, func(t *testing.T) {
			d := packet.NewDecoder(sr.wrap(bytes.NewReader(nil)))
			p, err := d.Decode()
			assert.Nil(t, p)
			assert.Equal(t, io.EOF, err, "io.EOF itself, not wrapped")
		})
	}
}

// TestDecodeTruncatedIsUnexpectedEOF cuts every encoding at every byte: no byte read is
// io.EOF, anything in between is io.ErrUnexpectedEOF.
func TestDecodeTruncatedIsUnexpectedEOF(t *testing.T) {
	encodings := [][]byte{append(wireHeader(9, 70<<10), testPayload(70<<10, 3)...)}
	for _, v := range wireVectors {
		encodings = append(encodings, unhex(t, v.encoding))
	}
	for _, enc := range encodings {
		for _, cut := range truncationPoints(len(enc)) {
			d := packet.NewDecoder(bytes.NewReader(enc[:cut]))
			p, err := d.Decode()
			assert.Nil(t, p)
			if cut == 0 {
				assert.Equal(t, io.EOF, err, "cut at 0 of %d", len(enc))
			} else {
				assert.Equal(t, io.ErrUnexpectedEOF, err, "cut at %d of %d", cut, len(enc))
			}
		}
	}
}

// TestDecodeReturnsReadError checks that a read error other than EOF reaches the
// caller unchanged, wherever in the packet it happens.
func TestDecodeReturnsReadError(t *testing.T) {
	large := append(wireHeader(9, 200<<10), testPayload(200<<10, 3)...)
	small := unhex(t, wireVectors[0].encoding)
	for _, tc := range []struct {
		name  string
		input []byte
	}{
		{"before-header", nil},
		{"in-header", small[:4]},
		{"after-header", small[:packet.HeaderSize]},
		{"in-small-payload", small[:len(small)-1]},
		{"in-large-payload-first-chunk", large[:1000]},
		{"in-large-payload-later-chunk", large[:150<<10]},
		{"at-large-payload-chunk-boundary", large[:packet.HeaderSize+128<<10]},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := packet.NewDecoder(io.MultiReader(bytes.NewReader(tc.input), iotest.ErrReader(errBoom)))
			p, err := d.Decode()
			assert.Nil(t, p)
			assert.ErrorIs(t, err, errBoom)
		})
	}
}

// TestDecodeReadsNoFurtherThanItsPacket checks that Decode leaves the bytes after a packet in
// the reader, so the reader can be handed on.
func TestDecodeReadsNoFurtherThanItsPacket(t *testing.T) {
	for _, n := range []int{0, 4, 3000, 70 << 10} {
		p := packet.New(1, testPayload(n, 0))
		r := bytes.NewReader(append(p.Bytes(), "trailer"...))
		got, err := packet.NewDecoder(r).Decode()
		require.NoError(t, err)
		assertPayload(t, p.Data, got.Data)
		assert.Equal(t, len("trailer"), r.Len(), "payload of %d bytes", n)
	}

	// A refused header is all that is read of a refused packet.
	r := bytes.NewReader(append(wireHeader(1, 101), testPayload(101, 0)...))
	d := packet.NewDecoder(r)
	d.SetMaxSize(100)
	_, err := d.Decode()
	require.ErrorIs(t, err, packet.ErrTooLarge)
	assert.Equal(t, 101, r.Len())
}

// TestDecodeRoundTripsDocumentedSizes round-trips payloads around every size the decoder's
// documentation names: 2 KiB, 32 KiB, 64 KiB, and multiples of 64 KiB.
func TestDecodeRoundTripsDocumentedSizes(t *testing.T) {
	sizes := []int{0, 1, 2<<10 - 1, 2 << 10, 2<<10 + 1, 32<<10 - 1, 32 << 10, 32<<10 + 1,
		64<<10 - 1, 64 << 10, 64<<10 + 1, 128 << 10, 128<<10 + 1, 1<<20 + 3}
	for _, n := range sizes {
		t.Run(fmt.Sprint(n), func(t *testing.T) {
			want := testPayload(n, byte(n))
			d := packet.NewDecoder(iotest.HalfReader(bytes.NewReader(packet.New(3, want).Bytes())))
			p, err := d.Decode()
			require.NoError(t, err)
			assert.Equal(t, byte(3), p.Type)
			assertPayload(t, want, p.Data)
			_, err = d.Decode()
			assert.Equal(t, io.EOF, err)
		})
	}
}

// Once a reader has sent as many bytes as a large payload claims, the
// decoder allocates the payload whole; before that it grows it as bytes
// arrive. Both ways give the same packets.
func TestDecodeLargePayloadsSameAfterTraffic(t *testing.T) {
	sizes := []int{300 << 10, 100 << 10, 300 << 10, 1<<20 + 5, 70 << 10}
	var stream bytes.Buffer
	var want [][]byte
	for i, n := range sizes {
		data := testPayload(n, byte(i))
		want = append(want, data)
		stream.Write(packet.New(byte(i), data).Bytes())
	}
	d := packet.NewDecoder(iotest.HalfReader(&stream))
	for i := range sizes {
		p, err := d.Decode()
		require.NoError(t, err)
		assert.Equal(t, byte(i), p.Type)
		assertPayload(t, want[i], p.Data)
	}
	_, err := d.Decode()
	assert.Equal(t, io.EOF, err)
}

func TestDecodeIndifferentToShortReads(t *testing.T) {
	var stream []byte
	var want []*packet.Packet
	add := func(p *packet.Packet) {
		want = append(want, p)
		stream = append(stream, p.Bytes()...)
	}
	for _, v := range wireVectors {
		add(packet.New(v.typ, unhex(t, v.payload)))
	}
	add(packet.New(10, testPayload(3000, 1)))
	add(packet.New(11, testPayload(70<<10, 2)))
	add(packet.New(12, nil))
	add(packet.New(13, testPayload(200<<10, 3)))
	add(packet.New(14, []byte("last")))

	for _, sr := range shortReaders {
		t.Run(sr.name, func(t *testing.T) {
			for _, v := range wireVectors {
				got, err := decodeUntilError(packet.NewDecoder(sr.wrap(bytes.NewReader(unhex(t, v.encoding)))))
				assert.Equal(t, io.EOF, err)
				assertPackets(t, []*packet.Packet{packet.New(v.typ, unhex(t, v.payload))}, got)
			}

			got, err := decodeUntilError(packet.NewDecoder(sr.wrap(bytes.NewReader(stream))))
			assert.Equal(t, io.EOF, err)
			assertPackets(t, want, got)
		})
	}
}

// Every decoded packet's Length is len(Data), small, large and reused.
func TestDecodedLengthIsLenData(t *testing.T) {
	sizes := []int{0, 5, 2 << 10, 2<<10 + 1, 100 << 10}
	var stream bytes.Buffer
	for round := range 2 {
		stream.Reset()
		for _, n := range sizes {
			stream.Write(packet.New(1, testPayload(n, byte(n))).Bytes())
		}
		d := packet.NewDecoder(&stream)
		for _, n := range sizes {
			p, err := d.Decode()
			require.NoError(t, err)
			assert.Equal(t, int64(n), p.Length, "round %d, %d bytes", round, n)
			assert.Len(t, p.Data, n)
			p.Release() // the second round reuses what this one released
		}
	}
}

// ---- Limits ----

func TestSetMaxSizeAcceptsAtLimitRefusesOver(t *testing.T) {
	for _, limit := range []int{0, 1, 100, 64 << 10, 1<<20 + 3} {
		t.Run(fmt.Sprint(limit), func(t *testing.T) {
			atLimit := packet.New(1, testPayload(limit, 7))
			d := packet.NewDecoder(bytes.NewReader(atLimit.Bytes()))
			d.SetMaxSize(limit)
			p, err := d.Decode()
			require.NoError(t, err)
			assertPayload(t, atLimit.Data, p.Data)

			over := packet.New(1, testPayload(limit+1, 7))
			d = packet.NewDecoder(bytes.NewReader(over.Bytes()))
			d.SetMaxSize(limit)
			p, err = d.Decode()
			assert.Nil(t, p)
			assert.ErrorIs(t, err, packet.ErrTooLarge)
		})
	}
}

func TestDefaultMaxSizeIs16MiB(t *testing.T) {
	assert.Equal(t, 16<<20, packet.DefaultMaxSize)

	// One byte over the default is refused from the header alone.
	d := packet.NewDecoder(bytes.NewReader(wireHeader(0, packet.DefaultMaxSize+1)))
	_, err := d.Decode()
	assert.ErrorIs(t, err, packet.ErrTooLarge)

	// At the default the header is accepted, and the missing payload is what
	// fails.
	d = packet.NewDecoder(bytes.NewReader(wireHeader(0, packet.DefaultMaxSize)))
	_, err = d.Decode()
	assert.Equal(t, io.ErrUnexpectedEOF, err)
}

func TestMaxSizeSurvivesReset(t *testing.T) {
	d := packet.NewDecoder(bytes.NewReader(nil))
	d.SetMaxSize(10)
	d.Reset(bytes.NewReader(packet.New(0, make([]byte, 11)).Bytes()))
	_, err := d.Decode()
	assert.ErrorIs(t, err, packet.ErrTooLarge)
}

// TestMemoryFollowsBytesNotClaimedLength checks that a header claiming much while little follows
// costs memory in proportion to what arrived, not to the claim.
func TestMemoryFollowsBytesNotClaimedLength(t *testing.T) {
	for _, tc := range []struct {
		name  string
		claim int64
		max   int
	}{
		{"8MiB", 8 << 20, packet.DefaultMaxSize},
		{"DefaultMaxSize", packet.DefaultMaxSize, packet.DefaultMaxSize},
		{"1TiB", 1 << 40, math.MaxInt},
		{"MaxInt64", math.MaxInt64, math.MaxInt},
	} {
		t.Run(tc.name, func(t *testing.T) {
			input := append(wireHeader(0, tc.claim), testPayload(10, 0)...)
			var err error
			allocated := minAllocated(func() {
				d := packet.NewDecoder(bytes.NewReader(input))
				d.SetMaxSize(tc.max)
				_, err = d.Decode()
			})
			assert.Equal(t, io.ErrUnexpectedEOF, err)
			assert.Less(t, allocated, uint64(1<<20), "bytes allocated")
		})
	}
}

// ---- Ownership and memory ----

func TestDecodedPacketsAreTheCallersToModify(t *testing.T) {
	// Enough packets to span several shared payload blocks and several groups
	// of Packet values.
	var stream []byte
	var want [][]byte
	for i := range 300 {
		payload := testPayload(1+(i*131)%2100, byte(i))
		want = append(want, payload)
		stream = append(stream, packet.New(byte(i), payload).Bytes()...)
	}
	got, err := decodeUntilError(packet.NewDecoder(bytes.NewReader(stream)))
	require.Equal(t, io.EOF, err)
	require.Len(t, got, len(want))

	// The case that matters most: the next payload is likely carved right
	// after the first.
	first, second := got[0], got[1]
	first.Data = append(first.Data, 0xee, 0xee, 0xee, 0xee)
	first.Type = 0xee
	assertPayload(t, want[1], second.Data)
	assert.Equal(t, byte(1), second.Type)

	for _, p := range got[1:] {
		p.Data = append(p.Data, bytes.Repeat([]byte{0xee}, 64)...)
		p.Type = 0xee
	}
	for i, p := range got {
		assertPayload(t, want[i], p.Data[:len(want[i])])
	}
}

// TestDecodedPacketsSurviveReset checks that packets from one reader survive the
// decoder moving to another.
func TestDecodedPacketsSurviveReset(t *testing.T) {
	d := packet.NewDecoder(bytes.NewReader(packet.New(1, []byte("first")).Bytes()))
	p1, err := d.Decode()
	require.NoError(t, err)

	d.Reset(bytes.NewReader(packet.New(2, []byte("second")).Bytes()))
	p2, err := d.Decode()
	require.NoError(t, err)

	assert.Equal(t, "first", string(p1.Data))
	assert.Equal(t, byte(1), p1.Type)
	assert.Equal(t, "second", string(p2.Data))
	assert.Equal(t, byte(2), p2.Type)
}

// A decoder keeps no large payload alive once the caller has dropped its
// packet: 64 packets of 256 KiB, dropped as they come, leave the heap about
// where it was.
func TestDecodeRetainsNoPayload(t *testing.T) {
	const n, size = 64, 256 << 10
	var stream bytes.Buffer
	for i := range n {
		stream.Write(packet.New(byte(i), testPayload(size, byte(i))).Bytes())
	}
	d := packet.NewDecoder(&stream)
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	for range n {
		p, err := d.Decode()
		require.NoError(t, err)
		require.Len(t, p.Data, size)
	}
	runtime.GC()
	runtime.ReadMemStats(&after)
	grown := int64(after.HeapAlloc) - int64(before.HeapAlloc)
	assert.Less(t, grown, int64(4*size), "the decoder keeps %d bytes alive", grown)
	runtime.KeepAlive(d)
}

// A released packet's memory is reused for a later packet of about the same
// size: decoding and releasing large packets allocates (almost) nothing,
// where it costs a payload and a Packet each without Release. The race
// detector makes sync.Pool drop a quarter of what it is given, hence the
// margin.
func TestReleaseReusesPayloads(t *testing.T) {
	var wire bytes.Buffer
	var want [][]byte
	for i := range 200 {
		want = append(want, testPayload(100<<10-i, byte(i)))
		wire.Write(packet.New(byte(i), want[i]).Bytes())
	}
	d := packet.NewDecoder(bytes.NewReader(wire.Bytes()))
	i, wrong := 0, 0
	allocs := testing.AllocsPerRun(100, func() {
		p, err := d.Decode()
		if err != nil || !bytes.Equal(p.Data, want[i]) {
			wrong++
		}
		i++
		p.Release()
	})
	assert.Zero(t, wrong, "payloads decoded into reused memory are exact")
	assert.Less(t, allocs, 1.0)
}

// Release misused: a second Release of the same packet does nothing, so no
// two later packets share memory; small payloads and payloads of a capacity
// the pools do not use are only dropped.
func TestReleaseMisuse(t *testing.T) {
	var wire bytes.Buffer
	for i := range 3 {
		wire.Write(packet.New(byte(i), testPayload(64<<10, byte(i))).Bytes())
	}
	d := packet.NewDecoder(bytes.NewReader(wire.Bytes()))
	p, err := d.Decode()
	require.NoError(t, err)
	p.Release()
	p.Release()
	a, err := d.Decode()
	require.NoError(t, err)
	b, err := d.Decode()
	require.NoError(t, err)
	assert.NotSame(t, a, b)
	assert.NotSame(t, &a.Data[0], &b.Data[0], "two packets share a payload")
	assertPayload(t, testPayload(64<<10, 1), a.Data)
	assertPayload(t, testPayload(64<<10, 2), b.Data)

	small := packet.New(1, []byte("small"))
	small.Release()
	assert.Nil(t, small.Data)
	odd := packet.New(1, make([]byte, 3000, 3000))
	odd.Release()
	assert.Nil(t, odd.Data, "a capacity below the smallest class is dropped")
}

// ---- Fuzzing ----

func FuzzDecode(f *testing.F) {
	var all []byte
	for _, v := range wireVectors {
		enc := unhex(f, v.encoding)
		f.Add(enc)
		all = append(all, enc...)
	}
	for _, v := range invalidVectors {
		f.Add(unhex(f, v.encoding))
	}
	f.Add(all)
	f.Add(append(append([]byte{}, all...), unhex(f, "00000000000000000470")...))
	f.Add(append(unhex(f, wireVectors[0].encoding), unhex(f, "00ffffffffffffffff")...))
	f.Add(append(unhex(f, wireVectors[4].encoding), wireHeader(1, fuzzMaxSize+1)...))
	f.Add([]byte{})

	f.Fuzz(func(t *testing.T, data []byte) {
		d := packet.NewDecoder(bytes.NewReader(data))
		d.SetMaxSize(fuzzMaxSize)
		chopped := packet.NewDecoder(iotest.OneByteReader(bytes.NewReader(data)))
		chopped.SetMaxSize(fuzzMaxSize)

		for off := 0; ; {
			p, err := d.Decode()
			want, wantErr := specDecode(data[off:], fuzzMaxSize)

			cp, cerr := chopped.Decode()
			if fmt.Sprint(cerr) != fmt.Sprint(err) || (err == nil && !samePacket(p, cp)) {
				t.Fatalf("at offset %d: one byte at a time gave %v, %v; whole gave %v, %v", off, cp, cerr, p, err)
			}

			if err != nil {
				if p != nil {
					t.Fatalf("at offset %d: packet %v with error %v", off, p, err)
				}
				if !errors.Is(err, wantErr) {
					t.Fatalf("at offset %d: error %v, want %v", off, err, wantErr)
				}
				if (wantErr == io.EOF || wantErr == io.ErrUnexpectedEOF) && err != wantErr {
					t.Fatalf("at offset %d: error %#v, want %v itself", off, err, wantErr)
				}
				return
			}
			if wantErr != nil {
				t.Fatalf("at offset %d: decoded %v, want error %v", off, p, wantErr)
			}
			enc := p.Bytes()
			if !bytes.HasPrefix(data[off:], enc) {
				t.Fatalf("at offset %d: packet re-encodes to %x, input has %x", off, enc, data[off:])
			}
			if !samePacket(p, want) {
				t.Fatalf("at offset %d: decoded %v, want %v", off, p, want)
			}
			off += len(enc)
		}
	})
}

// ---- Examples ----

func ExampleNew() {
	p := packet.New(0, []byte("ping"))

	var conn bytes.Buffer // stands in for a net.Conn
	if err := p.Write(&conn); err != nil {
		panic(err)
	}
	fmt.Printf("%x\n", conn.Bytes())
	// Output: 00000000000000000470696e67
}

func ExamplePacket_Bytes() {
	fmt.Printf("%x\n", packet.New(0, []byte("ping")).Bytes())
	// Output: 00000000000000000470696e67
}

func ExamplePacket_AppendBinary() {
	var buf []byte
	for _, msg := range []string{"ping", "pong"} {
		buf, _ = packet.New(1, []byte(msg)).AppendBinary(buf)
	}
	fmt.Println(len(buf), "bytes")
	// Output: 26 bytes
}

func ExampleDecoder() {
	var stream []byte
	stream = append(stream, packet.New(1, []byte("ping")).Bytes()...)
	stream = append(stream, packet.New(2, []byte("pong")).Bytes()...)

	d := packet.NewDecoder(bytes.NewReader(stream))
	for {
		p, err := d.Decode()
		if err == io.EOF {
			break
		}
		if err != nil {
			fmt.Println("error:", err)
			return
		}
		fmt.Println(p.Type, string(p.Data))
	}
	// Output:
	// 1 ping
	// 2 pong
}

func ExampleDecoder_SetMaxSize() {
	d := packet.NewDecoder(bytes.NewReader(packet.New(1, []byte("too long")).Bytes()))
	d.SetMaxSize(4)
	_, err := d.Decode()
	fmt.Println(errors.Is(err, packet.ErrTooLarge))
	// Output: true
}

// ---- Benchmarks ----

func BenchmarkEncode(b *testing.B) {
	for _, s := range benchSizes {
		p := packet.New(1, testPayload(s.n, 0))
		b.Run("AppendBinary/"+s.name, func(b *testing.B) {
			b.ReportAllocs()
			b.SetBytes(int64(packet.HeaderSize + s.n))
			buf := make([]byte, 0, packet.HeaderSize+s.n)
			for b.Loop() {
				buf, _ = p.AppendBinary(buf[:0])
			}
		})
		b.Run("Write/"+s.name, func(b *testing.B) {
			b.ReportAllocs()
			b.SetBytes(int64(packet.HeaderSize + s.n))
			for b.Loop() {
				if err := p.Write(io.Discard); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func BenchmarkDecode(b *testing.B) {
	for _, s := range benchSizes {
		b.Run(s.name, func(b *testing.B) {
			enc := packet.New(1, testPayload(s.n, 0)).Bytes()
			r := bytes.NewReader(enc)
			d := packet.NewDecoder(r)
			b.ReportAllocs()
			b.SetBytes(int64(len(enc)))
			for b.Loop() {
				r.Reset(enc)
				if _, err := d.Decode(); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
