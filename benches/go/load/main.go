// The benchmark's load client: dials a device plugin's socket as the kubelet 1.37 device manager
// does, keeps a ListAndWatch stream open, and times Allocate calls, sequential and concurrent.
// Prints one JSON object on stdout. Not product code.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	api "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"
)

type result struct {
	SeqUs    []float64 `json:"seq_us"`
	SeqCPUNs int64     `json:"seq_cpu_ns"`
	ConcCall int       `json:"conc_calls"`
	ConcSecs float64   `json:"conc_secs"`
	ConcUs   []float64 `json:"conc_us"`
	// On-CPU time over the concurrent phase: the plugin's, and this client's own, which shares
	// the machine's cores with the plugin and so bounds the calls/s either plugin can reach.
	ConcCPUNs       int64 `json:"conc_cpu_ns"`
	ConcClientCPUNs int64 `json:"conc_client_cpu_ns"`
}

// dial mirrors dial() in k8s.io/kubernetes@v1.37.2/pkg/kubelet/cm/devicemanager/plugin/v1beta1/client.go:
// grpc.DialContext with a 10 s timeout, authority "localhost", insecure credentials, WithBlock,
// and a context dialer on "unix" with a zero net.Dialer.
func dial(socket string) (*grpc.ClientConn, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	//lint:ignore SA1019 the kubelet still uses DialContext and WithBlock
	return grpc.DialContext(ctx, socket,
		grpc.WithAuthority("localhost"),
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithBlock(),
		grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", addr)
		}),
	)
}

// cpuNs sums the first field of /proc/PID/task/*/schedstat: on-CPU ns of all the process's threads.
func cpuNs(pid int) (int64, error) {
	paths, err := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/schedstat", pid))
	if err != nil {
		return 0, err
	}
	if len(paths) == 0 {
		return 0, fmt.Errorf("no threads found for pid %d", pid)
	}
	var sum int64
	for _, p := range paths {
		b, err := os.ReadFile(p)
		if err != nil {
			if os.IsNotExist(err) {
				continue // the thread exited
			}
			return 0, err
		}
		fields := strings.Fields(string(b))
		if len(fields) == 0 {
			return 0, fmt.Errorf("%s: empty", p)
		}
		n, err := strconv.ParseInt(fields[0], 10, 64)
		if err != nil {
			return 0, fmt.Errorf("%s: %v", p, err)
		}
		sum += n
	}
	return sum, nil
}

// selfCPUNs is this process's user and system time, all threads.
func selfCPUNs() int64 {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return ru.Utime.Nano() + ru.Stime.Nano()
}

func us(d time.Duration) float64 { return float64(d.Nanoseconds()) / 1e3 }

func main() {
	socket := flag.String("socket", "", "path of the plugin's endpoint socket")
	ids := flag.String("ids", "kvm-0", "comma-separated device IDs to allocate")
	seq := flag.Int("seq", 0, "number of sequential Allocate calls")
	pid := flag.Int("pid", 0, "plugin's pid, for its CPU time over the calls")
	callers := flag.Int("callers", 0, "concurrent callers")
	dur := flag.Duration("for", 3*time.Second, "how long the concurrent callers run")
	flag.Parse()
	if err := run(*socket, strings.Split(*ids, ","), *seq, *pid, *callers, *dur); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}

func run(socket string, ids []string, seq, pid, callers int, dur time.Duration) error {
	conn, err := dial(socket)
	if err != nil {
		return fmt.Errorf("dial %s: %v", socket, err)
	}
	defer conn.Close()
	client := api.NewDevicePluginClient(conn)

	// The kubelet keeps ListAndWatch open for as long as it is connected.
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	stream, err := client.ListAndWatch(ctx, &api.Empty{})
	if err != nil {
		return fmt.Errorf("ListAndWatch: %v", err)
	}
	if _, err := stream.Recv(); err != nil {
		return fmt.Errorf("ListAndWatch: %v", err)
	}

	req := &api.AllocateRequest{
		ContainerRequests: []*api.ContainerAllocateRequest{{DevicesIds: ids}},
	}
	allocate := func() error {
		_, err := client.Allocate(context.Background(), req)
		if err != nil {
			return fmt.Errorf("Allocate: %v", err)
		}
		return nil
	}

	res := result{SeqUs: []float64{}, ConcUs: []float64{}}
	if seq > 0 {
		for i := 0; i < 200; i++ {
			if err := allocate(); err != nil {
				return err
			}
		}
		var before int64
		if pid > 0 {
			if before, err = cpuNs(pid); err != nil {
				return err
			}
		}
		res.SeqUs = make([]float64, 0, seq)
		for i := 0; i < seq; i++ {
			t := time.Now()
			if err := allocate(); err != nil {
				return err
			}
			res.SeqUs = append(res.SeqUs, us(time.Since(t)))
		}
		if pid > 0 {
			after, err := cpuNs(pid)
			if err != nil {
				return err
			}
			res.SeqCPUNs = after - before
		}
	}

	if callers > 0 {
		var (
			wg       sync.WaitGroup
			mu       sync.Mutex
			firstErr error
		)
		lat := make([][]float64, callers)
		var before int64
		if pid > 0 {
			if before, err = cpuNs(pid); err != nil {
				return err
			}
		}
		clientBefore := selfCPUNs()
		start := time.Now()
		deadline := start.Add(dur)
		for c := 0; c < callers; c++ {
			wg.Add(1)
			go func(c int) {
				defer wg.Done()
				for time.Now().Before(deadline) {
					t := time.Now()
					if err := allocate(); err != nil {
						mu.Lock()
						if firstErr == nil {
							firstErr = err
						}
						mu.Unlock()
						return
					}
					lat[c] = append(lat[c], us(time.Since(t)))
				}
			}(c)
		}
		wg.Wait()
		res.ConcSecs = time.Since(start).Seconds()
		res.ConcClientCPUNs = selfCPUNs() - clientBefore
		if firstErr != nil {
			return firstErr
		}
		if pid > 0 {
			after, err := cpuNs(pid)
			if err != nil {
				return err
			}
			res.ConcCPUNs = after - before
		}
		for _, l := range lat {
			res.ConcUs = append(res.ConcUs, l...)
		}
		res.ConcCall = len(res.ConcUs)
	}

	return json.NewEncoder(os.Stdout).Encode(res)
}
