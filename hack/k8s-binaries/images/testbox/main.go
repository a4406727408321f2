// Command testbox is the dev node's test image: a multi-call program for images that
// have no shell.
//
//	testbox serve [PORT]      HTTP server: GET / answers "<hostname> <path>"
//	testbox get URL           prints the body of GET URL (exit 1 on failure)
//	testbox lookup NAME       prints NAME's addresses, one a line
//	testbox dial HOST:PORT    opens a TCP connection, prints "connected HOST:PORT"
//	testbox write PATH TEXT   writes TEXT to PATH
//	testbox alloc MIB         allocates and touches MIB mebibytes, then sleeps
//	testbox id                prints "uid=N gid=N"
//	testbox cat PATH          prints the file
//	testbox echo WORDS...     prints the words
//	testbox sleep SECONDS     sleeps (SIGTERM ends it at once)
package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"
)

func main() {
	if len(os.Args) < 2 {
		fail("usage: testbox serve|get|lookup|dial|write|alloc|id|cat|echo|sleep ...")
	}
	args := os.Args[2:]
	switch os.Args[1] {
	case "serve":
		port := "8080"
		if len(args) > 0 {
			port = args[0]
		}
		serve(port)
	case "get":
		need(args, 1)
		get(args[0])
	case "lookup":
		need(args, 1)
		lookup(args[0])
	case "dial":
		need(args, 1)
		conn, err := net.DialTimeout("tcp", args[0], 10*time.Second)
		check(err)
		conn.Close()
		fmt.Println("connected", args[0])
	case "alloc":
		need(args, 1)
		mib, err := strconv.Atoi(args[0])
		check(err)
		alloc(mib)
	case "write":
		need(args, 2)
		check(os.WriteFile(args[0], []byte(args[1]), 0o644))
	case "id":
		fmt.Printf("uid=%d gid=%d\n", os.Getuid(), os.Getgid())
	case "cat":
		need(args, 1)
		data, err := os.ReadFile(args[0])
		check(err)
		os.Stdout.Write(data)
	case "echo":
		fmt.Println(strings.Join(args, " "))
	case "sleep":
		need(args, 1)
		seconds, err := strconv.Atoi(args[0])
		check(err)
		sleep(time.Duration(seconds) * time.Second)
	default:
		fail("unknown command: " + os.Args[1])
	}
}

func serve(port string) {
	hostname, _ := os.Hostname()
	http.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "%s %s\n", hostname, r.URL.Path)
	})
	server := &http.Server{Addr: ":" + port, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		stop := make(chan os.Signal, 1)
		signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
		<-stop
		server.Close()
	}()
	fmt.Printf("serving on :%s\n", port)
	if err := server.ListenAndServe(); err != http.ErrServerClosed {
		check(err)
	}
}

func get(url string) {
	client := &http.Client{Timeout: 10 * time.Second}
	response, err := client.Get(url)
	check(err)
	defer response.Body.Close()
	body, err := io.ReadAll(response.Body)
	check(err)
	os.Stdout.Write(body)
	if response.StatusCode >= 400 {
		fail(response.Status)
	}
}

func lookup(name string) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	addrs, err := net.DefaultResolver.LookupHost(ctx, name)
	check(err)
	for _, addr := range addrs {
		fmt.Println(addr)
	}
}

// alloc holds mib MiB of touched memory (so it is resident, and a memory limit below
// it ends the process), printing its progress, then sleeps until SIGTERM.
func alloc(mib int) {
	held := make([][]byte, 0, mib)
	for i := 0; i < mib; i++ {
		chunk := make([]byte, 1<<20)
		for j := range chunk {
			chunk[j] = byte(j)
		}
		held = append(held, chunk)
		if (i+1)%64 == 0 {
			fmt.Println("allocated MiB:", i+1)
		}
	}
	fmt.Println("holding MiB:", len(held))
	sleep(24 * time.Hour)
}

func sleep(d time.Duration) {
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	select {
	case <-stop:
	case <-time.After(d):
	}
}

func need(args []string, n int) {
	if len(args) < n {
		fail(fmt.Sprintf("%s needs %d argument(s)", os.Args[1], n))
	}
}

func check(err error) {
	if err != nil {
		fail(err.Error())
	}
}

func fail(message string) {
	fmt.Fprintln(os.Stderr, "testbox:", message)
	os.Exit(1)
}
