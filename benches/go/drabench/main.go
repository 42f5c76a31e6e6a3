// drabench measures one DRA driver on a real node against a real API server, from inside the
// node's namespaces (integration/cluster/test_dra_bench.py runs it once per driver and
// repetition, ours and the Go peer in turn). It starts the driver itself so that start-up counts
// from the exec, and reports as JSON:
//   - start-up: exec to the registration socket (inotify), to registered (the kubelet's
//     plugin_manager_total_plugins, actual state) and to the slice published (a watch event);
//   - NodePrepareResources and NodeUnprepareResources as the kubelet calls them (its generated
//     client, one claim per call, the endpoint from the driver's GetInfo), on claims allocated in
//     the API server, one caller and then CALLERS at once; the driver's CPU per call from
//     schedstat;
//   - pods with a claim from a template, created until Running, through the real scheduler;
//   - an idle window: RSS, threads, context switches, and the API server's requests on slices,
//     claims and nodes (apiserver_request_total, which counts every client: the caller runs one
//     driver at a time and measures the cluster alone too);
//   - a hotplug: the device node removed until the slice carries the taint, restored until it
//     is gone, and the requests that cost.
//
// Not product code.
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	corev1 "k8s.io/api/core/v1"
	resourceapi "k8s.io/api/resource/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	drav1 "k8s.io/kubelet/pkg/apis/dra/v1"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
)

type settings struct {
	kubeconfig, metricsURL, node, driver, class, namespace, image string
	registry, hostDevice                                          string
	devices, callers, calls, pods                                 int
	concurrentFor, idleFor                                        time.Duration
}

type latencies struct {
	P50Us        float64 `json:"p50_us"`
	P99Us        float64 `json:"p99_us"`
	Calls        int     `json:"calls"`
	CPUUsPerCall float64 `json:"cpu_us_per_call"`
}

type result struct {
	SocketMs      float64            `json:"socket_ms"`
	RegisteredMs  float64            `json:"registered_ms"`
	PublishedMs   float64            `json:"published_ms"`
	Prepare       latencies          `json:"prepare"`
	Unprepare     latencies          `json:"unprepare"`
	CPrepare      latencies          `json:"concurrent_prepare"`
	CUnprepare    latencies          `json:"concurrent_unprepare"`
	CallsPerS     float64            `json:"concurrent_calls_per_s"`
	PodsMs        []float64          `json:"pod_running_ms"`
	IdleS         float64            `json:"idle_s"`
	RSSKiB        int64              `json:"rss_kib"`
	AnonKiB       int64              `json:"anon_kib"`
	Threads       int64              `json:"threads"`
	IdleSwitches  int64              `json:"idle_context_switches"`
	IdleRequests  map[string]float64 `json:"idle_requests"`
	Watches       float64            `json:"slice_watches"`
	TaintMs       float64            `json:"taint_ms"`
	UntaintMs     float64            `json:"untaint_ms"`
	HotplugReqs   map[string]float64 `json:"hotplug_requests"`
	DriverExitErr string             `json:"driver_exit,omitempty"`
}

func main() {
	var s settings
	flag.StringVar(&s.kubeconfig, "kubeconfig", "", "the cluster admin's kubeconfig")
	flag.StringVar(&s.metricsURL, "kubelet-metrics", "", "the kubelet's /metrics on its read-only port")
	flag.StringVar(&s.node, "node", "", "the node's name")
	flag.StringVar(&s.driver, "driver", "devices.anza-labs.dev", "the driver's name")
	flag.StringVar(&s.class, "class", "", "the DeviceClass the claims ask for")
	flag.StringVar(&s.namespace, "namespace", "kdp-bench", "where claims and pods go")
	flag.StringVar(&s.image, "image", "", "the pods' image (one with sleep)")
	flag.StringVar(&s.registry, "registry", "", "the kubelet's plugins_registry")
	flag.StringVar(&s.hostDevice, "host-device", "", "the device node both drivers serve, removed for the hotplug")
	flag.IntVar(&s.devices, "devices", 8, "devices the driver publishes")
	flag.IntVar(&s.callers, "callers", 8, "concurrent callers (each on its own claim)")
	flag.IntVar(&s.calls, "calls", 1000, "sequential prepare and unprepare pairs")
	flag.IntVar(&s.pods, "pods", 3, "pods created one after another")
	flag.DurationVar(&s.concurrentFor, "for", 3*time.Second, "the concurrent window")
	flag.DurationVar(&s.idleFor, "idle", 30*time.Second, "the idle window")
	flag.Parse()
	if flag.NArg() == 0 || s.kubeconfig == "" || s.node == "" || s.class == "" || s.registry == "" || s.hostDevice == "" {
		fmt.Fprintln(os.Stderr, "usage: drabench -kubeconfig F -kubelet-metrics URL -node N -class C -registry DIR -host-device PATH [...] -- DRIVER ARGS...")
		os.Exit(2)
	}
	r, err := s.run(flag.Args())
	if err != nil {
		fmt.Fprintln(os.Stderr, "drabench:", err)
		os.Exit(1)
	}
	if err := json.NewEncoder(os.Stdout).Encode(r); err != nil {
		fmt.Fprintln(os.Stderr, "drabench:", err)
		os.Exit(1)
	}
}

func (s *settings) run(argv []string) (*result, error) {
	config, err := clientcmd.BuildConfigFromFlags("", s.kubeconfig)
	if err != nil {
		return nil, err
	}
	config.QPS, config.Burst = 1000, 1000
	cs, err := kubernetes.NewForConfig(config)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()
	r := &result{}

	slices := cs.ResourceV1().ResourceSlices()
	selector := "spec.driver=" + s.driver + ",spec.nodeName=" + s.node
	if err := slices.DeleteCollection(ctx, metav1.DeleteOptions{}, metav1.ListOptions{FieldSelector: selector}); err != nil {
		return nil, fmt.Errorf("delete the slices left: %w", err)
	}
	// Every watch starts where a list left off: a watch with no resourceVersion is what a 1.37
	// API server takes for a streaming list, which it refuses over an etcd without progress
	// notifications (the suite's).
	listed, err := slices.List(ctx, metav1.ListOptions{FieldSelector: selector})
	if err != nil {
		return nil, fmt.Errorf("list slices: %w", err)
	}
	w, err := slices.Watch(ctx, metav1.ListOptions{FieldSelector: selector, ResourceVersion: listed.ResourceVersion})
	if err != nil {
		return nil, fmt.Errorf("watch slices: %w", err)
	}
	defer w.Stop()
	// The previous run's registration is gone once the kubelet's plugin manager has noticed its
	// socket went (a reconciler pass, every second).
	var before map[string]bool
	for waited := 0; ; waited++ {
		if before, err = s.registered(); err != nil {
			return nil, err
		}
		if len(before) == 0 {
			break
		}
		if waited == 300 {
			return nil, fmt.Errorf("the kubelet still holds %v", before)
		}
		time.Sleep(100 * time.Millisecond)
	}
	ino, err := unix.InotifyInit1(unix.IN_CLOEXEC)
	if err != nil {
		return nil, err
	}
	defer unix.Close(ino)
	if _, err := unix.InotifyAddWatch(ino, s.registry, unix.IN_CREATE|unix.IN_MOVED_TO); err != nil {
		return nil, fmt.Errorf("watch %s: %w", s.registry, err)
	}

	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	start := time.Now()
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", argv[0], err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	defer func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(20 * time.Second):
			_ = cmd.Process.Kill()
		}
	}()
	pid := cmd.Process.Pid

	socket, err := waitSocket(ino)
	if err != nil {
		return nil, err
	}
	r.SocketMs = ms(time.Since(start))
	var regErr error
	var regWG sync.WaitGroup
	regWG.Add(1)
	go func() {
		defer regWG.Done()
		for {
			now, err := s.registered()
			if err != nil {
				regErr = err
				return
			}
			if now[socket] && !before[socket] {
				r.RegisteredMs = ms(time.Since(start))
				return
			}
			if time.Since(start) > time.Minute {
				regErr = fmt.Errorf("%s not registered within a minute", socket)
				return
			}
			time.Sleep(5 * time.Millisecond)
		}
	}()
	slice, err := waitSlice(w, time.Minute, func(sl *resourceapi.ResourceSlice) bool { return len(sl.Spec.Devices) == s.devices })
	if err != nil {
		return nil, err
	}
	r.PublishedMs = ms(time.Since(start))
	regWG.Wait()
	if regErr != nil {
		return nil, regErr
	}

	endpoint, err := s.endpointOf(ctx, socket)
	if err != nil {
		return nil, err
	}
	if err := s.claimsAndCalls(ctx, cs, slice, endpoint, pid, r); err != nil {
		return nil, err
	}
	if err := s.podsWithClaims(ctx, cs, r); err != nil {
		return nil, err
	}

	// Idle: the kubelet connected, the watch open, nothing changing.
	time.Sleep(2 * time.Second)
	switches0, err := contextSwitches(pid)
	if err != nil {
		return nil, err
	}
	req0, _, err := apiRequests(ctx, cs)
	if err != nil {
		return nil, err
	}
	idleStart := time.Now()
	time.Sleep(s.idleFor)
	req1, watches, err := apiRequests(ctx, cs)
	if err != nil {
		return nil, err
	}
	switches1, err := contextSwitches(pid)
	if err != nil {
		return nil, err
	}
	r.IdleS = time.Since(idleStart).Seconds()
	r.IdleSwitches = switches1 - switches0
	r.IdleRequests = delta(req0, req1)
	r.Watches = watches
	if r.RSSKiB, r.AnonKiB, r.Threads, err = footprint(pid); err != nil {
		return nil, err
	}

	// A hotplug: the device node goes and comes back.
	var st unix.Stat_t
	if err := unix.Stat(s.hostDevice, &st); err != nil {
		return nil, err
	}
	tainted := func(want bool) func(*resourceapi.ResourceSlice) bool {
		return func(sl *resourceapi.ResourceSlice) bool {
			for _, d := range sl.Spec.Devices {
				if (len(d.Taints) > 0) != want {
					return false
				}
			}
			return len(sl.Spec.Devices) > 0
		}
	}
	hot0, _, err := apiRequests(ctx, cs)
	if err != nil {
		return nil, err
	}
	gone := time.Now()
	if err := os.Remove(s.hostDevice); err != nil {
		return nil, err
	}
	if _, err := waitSlice(w, 30*time.Second, tainted(true)); err != nil {
		_ = unix.Mknod(s.hostDevice, st.Mode, int(st.Rdev))
		return nil, err
	}
	r.TaintMs = ms(time.Since(gone))
	back := time.Now()
	if err := unix.Mknod(s.hostDevice, st.Mode, int(st.Rdev)); err != nil {
		return nil, err
	}
	if _, err := waitSlice(w, 30*time.Second, tainted(false)); err != nil {
		return nil, err
	}
	r.UntaintMs = ms(time.Since(back))
	// Let the last write's answer land before counting.
	time.Sleep(time.Second)
	hot1, _, err := apiRequests(ctx, cs)
	if err != nil {
		return nil, err
	}
	r.HotplugReqs = delta(hot0, hot1)
	select {
	case err := <-exited:
		return nil, fmt.Errorf("the driver exited during the run: %v", err)
	default:
	}
	return r, nil
}

// claimsAndCalls allocates one claim per caller in the API server, as the scheduler would, then
// prepares and unprepares them through the driver's DRA endpoint.
func (s *settings) claimsAndCalls(ctx context.Context, cs *kubernetes.Clientset, slice *resourceapi.ResourceSlice, endpoint string, pid int, r *result) error {
	if len(slice.Spec.Devices) < s.callers {
		return fmt.Errorf("%d devices for %d callers", len(slice.Spec.Devices), s.callers)
	}
	claims := cs.ResourceV1().ResourceClaims(s.namespace)
	var refs [][]*drav1.Claim
	for i := 0; i < s.callers; i++ {
		name := fmt.Sprintf("bench-%d", i)
		_ = claims.Delete(ctx, name, metav1.DeleteOptions{})
		c := &resourceapi.ResourceClaim{
			ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: s.namespace},
			Spec: resourceapi.ResourceClaimSpec{Devices: resourceapi.DeviceClaim{Requests: []resourceapi.DeviceRequest{{
				Name: "dev", Exactly: &resourceapi.ExactDeviceRequest{DeviceClassName: s.class},
			}}}},
		}
		var err error
		for try := 0; ; try++ {
			c2, err2 := claims.Create(ctx, c, metav1.CreateOptions{})
			if err2 == nil {
				c = c2
				break
			}
			// The delete above may still be finishing.
			if try > 100 {
				return fmt.Errorf("create claim %s: %w", name, err2)
			}
			time.Sleep(50 * time.Millisecond)
		}
		c.Status.Allocation = &resourceapi.AllocationResult{Devices: resourceapi.DeviceAllocationResult{
			Results: []resourceapi.DeviceRequestAllocationResult{{
				Request: "dev", Driver: s.driver, Pool: slice.Spec.Pool.Name, Device: slice.Spec.Devices[i].Name,
			}},
		}}
		if c, err = claims.UpdateStatus(ctx, c, metav1.UpdateOptions{}); err != nil {
			return fmt.Errorf("allocate claim %s: %w", name, err)
		}
		refs = append(refs, []*drav1.Claim{{Namespace: s.namespace, Name: name, Uid: string(c.UID)}})
	}
	defer func() {
		for i := range refs {
			_ = claims.Delete(context.Background(), refs[i][0].Name, metav1.DeleteOptions{})
		}
	}()

	// As the kubelet dials a DRA plugin: its endpoint as a unix:// target, no TLS.
	conn, err := grpc.NewClient("unix://"+endpoint, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer conn.Close()
	client := drav1.NewDRAPluginClient(conn)
	// Warm the connection and each claim once, as a pod's first start would.
	for _, c := range refs {
		if _, _, err := pair(client, c); err != nil {
			return err
		}
	}

	cpu0, err := cpuNs(pid)
	if err != nil {
		return err
	}
	var prep, unprep []float64
	for i := 0; i < s.calls; i++ {
		p, u, err := pair(client, refs[0])
		if err != nil {
			return err
		}
		prep, unprep = append(prep, p), append(unprep, u)
	}
	cpu1, err := cpuNs(pid)
	if err != nil {
		return err
	}
	perCall := float64(cpu1-cpu0) / 1e3 / float64(2*s.calls)
	r.Prepare, r.Unprepare = summary(prep, perCall), summary(unprep, perCall)

	var mu sync.Mutex
	var failed error
	prep, unprep = nil, nil
	var wg sync.WaitGroup
	deadline := time.Now().Add(s.concurrentFor)
	began := time.Now()
	for i := 0; i < s.callers; i++ {
		wg.Add(1)
		go func(c []*drav1.Claim) {
			defer wg.Done()
			var p, u []float64
			for time.Now().Before(deadline) {
				a, b, err := pair(client, c)
				if err != nil {
					mu.Lock()
					failed = err
					mu.Unlock()
					return
				}
				p, u = append(p, a), append(u, b)
			}
			mu.Lock()
			prep, unprep = append(prep, p...), append(unprep, u...)
			mu.Unlock()
		}(refs[i])
	}
	wg.Wait()
	took := time.Since(began).Seconds()
	if failed != nil {
		return failed
	}
	cpu2, err := cpuNs(pid)
	if err != nil {
		return err
	}
	calls := len(prep) + len(unprep)
	perCall = float64(cpu2-cpu1) / 1e3 / float64(calls)
	r.CPrepare, r.CUnprepare = summary(prep, perCall), summary(unprep, perCall)
	r.CallsPerS = float64(calls) / took
	return nil
}

// pair prepares a claim and unprepares it, each under the kubelet's deadline for a batch.
func pair(client drav1.DRAPluginClient, claim []*drav1.Claim) (float64, float64, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 45*time.Second)
	defer cancel()
	t := time.Now()
	p, err := client.NodePrepareResources(ctx, &drav1.NodePrepareResourcesRequest{Claims: claim})
	if err != nil {
		return 0, 0, fmt.Errorf("prepare: %w", err)
	}
	prep := float64(time.Since(t).Nanoseconds()) / 1e3
	for uid, c := range p.Claims {
		if c.Error != "" {
			return 0, 0, fmt.Errorf("prepare %s: %s", uid, c.Error)
		}
		if len(c.Devices) == 0 {
			return 0, 0, fmt.Errorf("prepare %s: no device", uid)
		}
	}
	t = time.Now()
	u, err := client.NodeUnprepareResources(ctx, &drav1.NodeUnprepareResourcesRequest{Claims: claim})
	if err != nil {
		return 0, 0, fmt.Errorf("unprepare: %w", err)
	}
	unprep := float64(time.Since(t).Nanoseconds()) / 1e3
	for uid, c := range u.Claims {
		if c.Error != "" {
			return 0, 0, fmt.Errorf("unprepare %s: %s", uid, c.Error)
		}
	}
	return prep, unprep, nil
}

// podsWithClaims creates pods with a claim from a template one after another, each timed from
// its creation until Running, then deleted and waited for (its claim unprepared by the kubelet).
func (s *settings) podsWithClaims(ctx context.Context, cs *kubernetes.Clientset, r *result) error {
	templates := cs.ResourceV1().ResourceClaimTemplates(s.namespace)
	_ = templates.Delete(ctx, "bench", metav1.DeleteOptions{})
	if _, err := templates.Create(ctx, &resourceapi.ResourceClaimTemplate{
		ObjectMeta: metav1.ObjectMeta{Name: "bench", Namespace: s.namespace},
		Spec: resourceapi.ResourceClaimTemplateSpec{Spec: resourceapi.ResourceClaimSpec{
			Devices: resourceapi.DeviceClaim{Requests: []resourceapi.DeviceRequest{{
				Name: "dev", Exactly: &resourceapi.ExactDeviceRequest{DeviceClassName: s.class},
			}}},
		}},
	}, metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("create the claim template: %w", err)
	}
	pods := cs.CoreV1().Pods(s.namespace)
	zero := int64(0)
	template := "bench"
	for i := 0; i < s.pods; i++ {
		name := fmt.Sprintf("bench-pod-%d", i)
		pod := &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: s.namespace},
			Spec: corev1.PodSpec{
				TerminationGracePeriodSeconds: &zero,
				ResourceClaims:                []corev1.PodResourceClaim{{Name: "dev", ResourceClaimTemplateName: &template}},
				Containers: []corev1.Container{{
					Name: "c", Image: s.image, ImagePullPolicy: corev1.PullNever,
					Command:   []string{"sleep", "3600"},
					Resources: corev1.ResourceRequirements{Claims: []corev1.ResourceClaim{{Name: "dev"}}},
				}},
			},
		}
		w, err := watchPod(ctx, cs, s.namespace, name)
		if err != nil {
			return err
		}
		t := time.Now()
		if _, err := pods.Create(ctx, pod, metav1.CreateOptions{}); err != nil {
			w.Stop()
			return fmt.Errorf("create %s: %w", name, err)
		}
		err = waitEvent(w, 2*time.Minute, func(e watch.Event) bool {
			p, ok := e.Object.(*corev1.Pod)
			return ok && p.Status.Phase == corev1.PodRunning
		})
		w.Stop()
		if err != nil {
			return fmt.Errorf("%s running: %w", name, err)
		}
		r.PodsMs = append(r.PodsMs, ms(time.Since(t)))
		if err := deleteAndWait(ctx, cs, s.namespace, name); err != nil {
			return err
		}
	}
	return nil
}

func deleteAndWait(ctx context.Context, cs *kubernetes.Clientset, ns, name string) error {
	pods := cs.CoreV1().Pods(ns)
	w, err := watchPod(ctx, cs, ns, name)
	if err != nil {
		return err
	}
	defer w.Stop()
	if err := pods.Delete(ctx, name, metav1.DeleteOptions{}); err != nil {
		return err
	}
	if err := waitEvent(w, 2*time.Minute, func(e watch.Event) bool { return e.Type == watch.Deleted }); err != nil {
		return fmt.Errorf("%s deleted: %w", name, err)
	}
	// Its generated claim goes once the kubelet has unprepared it.
	for deadline := time.Now().Add(2 * time.Minute); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		list, err := cs.ResourceV1().ResourceClaims(ns).List(ctx, metav1.ListOptions{})
		if err != nil {
			return err
		}
		left := false
		for _, c := range list.Items {
			if strings.HasPrefix(c.Name, name+"-") {
				left = true
			}
		}
		if !left {
			return nil
		}
	}
	return fmt.Errorf("the claim of %s stayed", name)
}

// watchPod watches one pod from where a list of it left off.
func watchPod(ctx context.Context, cs *kubernetes.Clientset, ns, name string) (watch.Interface, error) {
	pods := cs.CoreV1().Pods(ns)
	opts := metav1.ListOptions{FieldSelector: "metadata.name=" + name}
	list, err := pods.List(ctx, opts)
	if err != nil {
		return nil, err
	}
	opts.ResourceVersion = list.ResourceVersion
	return pods.Watch(ctx, opts)
}

func waitEvent(w watch.Interface, timeout time.Duration, done func(watch.Event) bool) error {
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	for {
		select {
		case e, ok := <-w.ResultChan():
			if !ok {
				return fmt.Errorf("the watch ended")
			}
			if e.Type == watch.Error {
				return fmt.Errorf("the watch failed: %v", e.Object)
			}
			if done(e) {
				return nil
			}
		case <-timer.C:
			return fmt.Errorf("not within %s", timeout)
		}
	}
}

func waitSlice(w watch.Interface, timeout time.Duration, done func(*resourceapi.ResourceSlice) bool) (*resourceapi.ResourceSlice, error) {
	var found *resourceapi.ResourceSlice
	err := waitEvent(w, timeout, func(e watch.Event) bool {
		sl, ok := e.Object.(*resourceapi.ResourceSlice)
		if ok && e.Type != watch.Deleted && done(sl) {
			found = sl
			return true
		}
		return false
	})
	if err != nil {
		return nil, fmt.Errorf("slice: %w", err)
	}
	return found, nil
}

// waitSocket returns the path of the first socket created in the registry.
func waitSocket(ino int) (string, error) {
	buf := make([]byte, 4096)
	fds := []unix.PollFd{{Fd: int32(ino), Events: unix.POLLIN}}
	deadline := time.Now().Add(time.Minute)
	for time.Now().Before(deadline) {
		n, err := unix.Poll(fds, 1000)
		if err != nil && err != unix.EINTR {
			return "", err
		}
		if n == 0 {
			continue
		}
		k, err := unix.Read(ino, buf)
		if err != nil {
			return "", err
		}
		for off := 0; off+unix.SizeofInotifyEvent <= k; {
			ev := (*unix.InotifyEvent)(unsafe.Pointer(&buf[off]))
			name := strings.TrimRight(string(buf[off+unix.SizeofInotifyEvent:off+unix.SizeofInotifyEvent+int(ev.Len)]), "\x00")
			off += unix.SizeofInotifyEvent + int(ev.Len)
			if strings.HasSuffix(name, ".sock") {
				return name, nil
			}
		}
	}
	return "", fmt.Errorf("no registration socket within a minute")
}

var gauge = regexp.MustCompile(`^plugin_manager_total_plugins\{socket_path="([^"]+)",state="actual_state_of_world"\} (\S+)`)

// registered is the set of registration sockets (file names) the kubelet has registered.
func (s *settings) registered() (map[string]bool, error) {
	resp, err := http.Get(s.metricsURL)
	if err != nil {
		return nil, fmt.Errorf("the kubelet's metrics: %w", err)
	}
	defer resp.Body.Close()
	out := map[string]bool{}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		if m := gauge.FindStringSubmatch(sc.Text()); m != nil && m[2] != "0" {
			out[filepath.Base(m[1])] = true
		}
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	return out, sc.Err()
}

// endpointOf asks the registration socket for the DRA endpoint, as the kubelet does.
func (s *settings) endpointOf(ctx context.Context, socketName string) (string, error) {
	conn, err := grpc.NewClient("unix://"+filepath.Join(s.registry, socketName),
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return "", err
	}
	defer conn.Close()
	info, err := registerapi.NewRegistrationClient(conn).GetInfo(ctx, &registerapi.InfoRequest{})
	if err != nil {
		return "", fmt.Errorf("GetInfo on %s: %w", socketName, err)
	}
	return info.Endpoint, nil
}

var counted = map[string]bool{"resourceslices": true, "resourceclaims": true, "nodes": true}
var labelRe = regexp.MustCompile(`(\w+)="([^"]*)"`)

// apiRequests reads the API server's request counters for slices, claims and nodes, by verb
// and resource, and the watches open on slices.
func apiRequests(ctx context.Context, cs *kubernetes.Clientset) (map[string]float64, float64, error) {
	raw, err := cs.CoreV1().RESTClient().Get().AbsPath("/metrics").DoRaw(ctx)
	if err != nil {
		return nil, 0, fmt.Errorf("the API server's metrics: %w", err)
	}
	out := map[string]float64{}
	watches := 0.0
	for _, line := range strings.Split(string(raw), "\n") {
		var name string
		switch {
		case strings.HasPrefix(line, "apiserver_request_total{"):
			name = "total"
		case strings.HasPrefix(line, "apiserver_longrunning_requests{"):
			name = "long"
		default:
			continue
		}
		end := strings.LastIndex(line, "} ")
		if end < 0 {
			continue
		}
		labels := map[string]string{}
		for _, m := range labelRe.FindAllStringSubmatch(line[:end], -1) {
			labels[m[1]] = m[2]
		}
		v, err := strconv.ParseFloat(strings.TrimSpace(line[end+2:]), 64)
		if err != nil {
			continue
		}
		if name == "total" && counted[labels["resource"]] && labels["subresource"] == "" {
			out[labels["verb"]+" "+labels["resource"]] += v
		}
		if name == "long" && labels["verb"] == "WATCH" && labels["resource"] == "resourceslices" {
			watches += v
		}
	}
	return out, watches, nil
}

func delta(a, b map[string]float64) map[string]float64 {
	out := map[string]float64{}
	for k, v := range b {
		if d := v - a[k]; d != 0 {
			out[k] = d
		}
	}
	return out
}

// perTask sums what `count` reads from each of the process's threads' `file` under
// /proc/PID/task (a thread that ended meanwhile counts nothing).
func perTask(pid int, file string, count func(text string) int64) (int64, error) {
	tasks, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	if err != nil {
		return 0, err
	}
	var total int64
	for _, t := range tasks {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/%s", pid, t.Name(), file))
		if err == nil {
			total += count(string(b))
		}
	}
	return total, nil
}

// cpuNs is the time the process's threads have spent on a CPU (schedstat), in nanoseconds.
func cpuNs(pid int) (int64, error) {
	return perTask(pid, "schedstat", func(text string) int64 {
		f := strings.Fields(text)
		if len(f) == 0 {
			return 0
		}
		n, _ := strconv.ParseInt(f[0], 10, 64)
		return n
	})
}

// contextSwitches counts the process's threads' voluntary and involuntary switches.
func contextSwitches(pid int) (int64, error) {
	return perTask(pid, "status", func(text string) int64 {
		var n int64
		for _, line := range strings.Split(text, "\n") {
			if f := strings.Fields(line); len(f) == 2 && strings.HasSuffix(f[0], "ctxt_switches:") {
				v, _ := strconv.ParseInt(f[1], 10, 64)
				n += v
			}
		}
		return n
	})
}

// footprint: VmRSS, RssAnon (KiB) and threads.
func footprint(pid int) (rss, anon, threads int64, err error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, 0, 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		n, _ := strconv.ParseInt(f[1], 10, 64)
		switch f[0] {
		case "VmRSS:":
			rss = n
		case "RssAnon:":
			anon = n
		case "Threads:":
			threads = n
		}
	}
	return rss, anon, threads, nil
}

func summary(us []float64, cpu float64) latencies {
	sort.Float64s(us)
	q := func(p float64) float64 {
		if len(us) == 0 {
			return 0
		}
		return us[int(p*float64(len(us)-1)+0.5)]
	}
	return latencies{P50Us: q(0.5), P99Us: q(0.99), Calls: len(us), CPUUsPerCall: cpu}
}

func ms(d time.Duration) float64 { return float64(d.Nanoseconds()) / 1e6 }
