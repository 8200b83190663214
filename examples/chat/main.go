// Chat is a small chat room built on github.com/aerogo/packet's resumable
// sessions: the server keeps each client's session across its connections,
// and clients dial again by themselves, so nothing said is lost when a
// connection dies, goes silent or the server restarts.
//
// Usage:
//
//	chat                            run a demo on loopback, print its transcript and exit
//	chat -serve ADDR                run a server, e.g. -serve 127.0.0.1:7000
//	chat -connect ADDR -name NAME   chat: lines from stdin go to the room, the room's to stdout
package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"
)

// maxName is the longest name a client may choose, in bytes.
const maxName = 32

func main() { os.Exit(run(os.Args[1:], os.Stdin, os.Stdout, os.Stderr)) }

// run is the program with its surroundings passed in; it returns the exit
// status.
func run(args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	flags := flag.NewFlagSet("chat", flag.ContinueOnError)
	flags.SetOutput(io.Discard)
	serveAddr := flags.String("serve", "", "run only the server, listening on `ADDR`")
	connectAddr := flags.String("connect", "", "chat with the server at `ADDR`")
	name := flags.String("name", "", "your `NAME` in the room (with -connect)")
	err := flags.Parse(args)
	if errors.Is(err, flag.ErrHelp) {
		fmt.Fprintln(stdout, "usage: chat [-serve ADDR | -connect ADDR -name NAME]\nWithout flags chat runs a demo on loopback and exits.")
		flags.SetOutput(stdout)
		flags.PrintDefaults()
		return 0
	}
	if err == nil {
		err = checkFlags(flags, *serveAddr, *connectAddr, *name)
	}
	if err != nil {
		fmt.Fprintf(stderr, "chat: %v (chat -h for usage)\n", err)
		return 2
	}

	switch {
	case *serveAddr != "":
		err = serve(*serveAddr, stdout)
	case *connectAddr != "":
		err = talk(*connectAddr, *name, stdin, stdout)
	default:
		err = demo(stdout)
	}
	if err != nil {
		fmt.Fprintf(stderr, "chat: %v\n", err)
		return 1
	}
	return 0
}

// checkFlags reports a combination of flags that makes no sense.
func checkFlags(flags *flag.FlagSet, serveAddr, connectAddr, name string) error {
	switch {
	case flags.NArg() > 0:
		return fmt.Errorf("unexpected argument %q", flags.Arg(0))
	case serveAddr != "" && connectAddr != "":
		return errors.New("-serve and -connect do not go together")
	case connectAddr != "" && strings.TrimSpace(name) == "":
		return errors.New("-connect needs -name")
	case connectAddr == "" && name != "":
		return errors.New("-name goes with -connect")
	case len(name) > maxName:
		return fmt.Errorf("-name is longer than %d bytes", maxName)
	case strings.ContainsFunc(name, func(r rune) bool { return r < ' ' || r == 0x7f }):
		return errors.New("-name contains a control character")
	}
	return nil
}

// serve runs a room on addr until interrupted, then ends every session.
func serve(addr string, out io.Writer) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	lg := log.New(out, "", log.Ltime)
	r := serveRoom(ln, 5*time.Second, lg.Printf, func(m message) { lg.Printf("%s: %s", m.From, m.Text) })
	lg.Printf("listening on %s", ln.Addr())
	<-ctx.Done()
	ln.Close()
	r.sessions.Close()
	return nil
}

// talk is the interactive client: it says each line read from in and prints
// what the others say, until in ends, the user interrupts or the server ends
// the session.
func talk(addr, name string, in io.Reader, out io.Writer) error {
	lg := log.New(out, "", 0) // safe from the client's goroutines
	dial := func() (net.Conn, error) { return net.DialTimeout("tcp", addr, 5*time.Second) }
	c, err := newClient(name, dial, time.Second, func(e string) { lg.Print("* ", e) }, func(m message) {
		if m.From != name { // the room's echo of our own line
			lg.Printf("%s: %s", m.From, m.Text)
		}
	})
	if err != nil {
		return err
	}
	lg.Printf("* connected to %s as %s; type to talk, end with Ctrl-D", addr, name)
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	lines := make(chan string) // read apart, so that an interrupt ends a wait for input
	go func() {
		for sc := bufio.NewScanner(in); sc.Scan(); {
			lines <- sc.Text()
		}
		close(lines)
	}()
	for {
		select {
		case <-ctx.Done():
			return c.leave()
		case <-c.done:
			return errors.Join(errors.New("the server ended the session"), c.leave())
		case line, ok := <-lines:
			if !ok {
				return c.leave()
			}
			if strings.TrimSpace(line) != "" {
				c.say(line)
			}
		}
	}
}
