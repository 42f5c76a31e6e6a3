// dra is the DRA benchmark's Go peer: a minimal driver of the usual shape, on Kubernetes' own
// helpers (k8s.io/dynamic-resource-allocation: kubeletplugin for the kubelet's side, its
// ResourceSlice controller for publishing). It serves COUNT devices of one device node, with the
// attributes ours gives them, prepares a claim by returning the CDI IDs of a spec it wrote at
// start, and taints the devices while the node is missing (inotify on its directory). Nothing
// else: no checkpoint, no health stream, no configuration. Not product code.
//
//	dra -node NAME -credentials DIR -plugin-dir DIR -registry-dir DIR -cdi-dir DIR \
//	    -device /dev/kvm [-dev-root DIR] -resource kvm -count N
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
	resourceapi "k8s.io/api/resource/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/dynamic-resource-allocation/kubeletplugin"
	"k8s.io/dynamic-resource-allocation/resourceslice"
	"k8s.io/klog/v2"
)

type driver struct {
	name, node, kind string
	device, devRoot  string
	resource         string
	count            int
	helper           *kubeletplugin.Helper
	mu               sync.Mutex
}

func main() {
	d := &driver{}
	flag.StringVar(&d.name, "driver", "devices.anza-labs.dev", "the driver's name")
	flag.StringVar(&d.node, "node", "", "the node's name (its pool)")
	creds := flag.String("credentials", "", "a directory with the ServiceAccount's token and ca.crt")
	pluginDir := flag.String("plugin-dir", "", "the driver's directory under the kubelet's plugins/")
	registryDir := flag.String("registry-dir", "", "the kubelet's plugins_registry")
	cdiDir := flag.String("cdi-dir", "/var/run/cdi", "where the CDI spec goes")
	flag.StringVar(&d.device, "device", "/dev/kvm", "the device node, as containers see it")
	flag.StringVar(&d.devRoot, "dev-root", "", "where the host's /dev is, as ours takes it")
	flag.StringVar(&d.resource, "resource", "kvm", "the resource's short name")
	flag.IntVar(&d.count, "count", 1, "how many devices the node is shared as")
	qps := flag.Float64("kube-api-qps", 5, "client-go's request rate to the API server (its default: 5)")
	burst := flag.Int("kube-api-burst", 10, "client-go's burst above that rate (its default: 10)")
	flag.Parse()
	klog.SetOutput(os.Stderr)
	d.kind = d.name + "/" + d.resource
	if err := d.run(*creds, *pluginDir, *registryDir, *cdiDir, float32(*qps), *burst); err != nil {
		fmt.Fprintln(os.Stderr, "dra:", err)
		os.Exit(1)
	}
}

func (d *driver) run(creds, pluginDir, registryDir, cdiDir string, qps float32, burst int) error {
	config := &rest.Config{
		Host:            "https://" + net.JoinHostPort(os.Getenv("KUBERNETES_SERVICE_HOST"), os.Getenv("KUBERNETES_SERVICE_PORT")),
		BearerTokenFile: filepath.Join(creds, "token"),
		TLSClientConfig: rest.TLSClientConfig{CAFile: filepath.Join(creds, "ca.crt")},
		QPS:             qps,
		Burst:           burst,
	}
	client, err := kubernetes.NewForConfig(config)
	if err != nil {
		return fmt.Errorf("make the API client: %w", err)
	}
	spec, err := d.writeSpec(cdiDir)
	if err != nil {
		return err
	}
	defer os.Remove(spec)
	ctx, cancel := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer cancel()
	if err := os.MkdirAll(pluginDir, 0o750); err != nil {
		return err
	}
	d.helper, err = kubeletplugin.Start(ctx, d,
		kubeletplugin.DriverName(d.name),
		kubeletplugin.NodeName(d.node),
		kubeletplugin.KubeClient(client),
		kubeletplugin.PluginDataDirectoryPath(pluginDir),
		kubeletplugin.RegistrarDirectoryPath(registryDir),
	)
	if err != nil {
		return fmt.Errorf("start the kubelet plugin: %w", err)
	}
	defer d.helper.Stop()
	if err := d.publish(ctx); err != nil {
		return err
	}
	go d.watch(ctx)
	<-ctx.Done()
	return nil
}

// hostPath is the device node as this process finds it.
func (d *driver) hostPath() string {
	if d.devRoot == "" {
		return d.device
	}
	return filepath.Join(d.devRoot, strings.TrimPrefix(d.device, "/dev/"))
}

// publish sends the devices, tainted while the device node is missing.
func (d *driver) publish(ctx context.Context) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	var st unix.Stat_t
	healthy := unix.Stat(d.hostPath(), &st) == nil && st.Mode&unix.S_IFMT == unix.S_IFCHR
	var devices []resourceapi.Device
	for i := 0; i < d.count; i++ {
		dev := resourceapi.Device{
			Name: d.resource + "-" + strconv.Itoa(i),
			Attributes: map[resourceapi.QualifiedName]resourceapi.DeviceAttribute{
				"resource": {StringValue: &d.resource},
				"path":     {StringValue: &d.device},
			},
		}
		if healthy {
			major, minor := int64(unix.Major(st.Rdev)), int64(unix.Minor(st.Rdev))
			dev.Attributes["major"] = resourceapi.DeviceAttribute{IntValue: &major}
			dev.Attributes["minor"] = resourceapi.DeviceAttribute{IntValue: &minor}
		} else {
			value := "DeviceNodeMissing"
			dev.Taints = []resourceapi.DeviceTaint{{Key: d.name + "/unhealthy", Value: value, Effect: resourceapi.DeviceTaintEffectNoSchedule}}
		}
		devices = append(devices, dev)
	}
	return d.helper.PublishResources(ctx, resourceslice.DriverResources{
		Pools: map[string]resourceslice.Pool{d.node: {Slices: []resourceslice.Slice{{Devices: devices}}}},
	})
}

// watch publishes again whenever the device node's directory changes.
func (d *driver) watch(ctx context.Context) {
	fd, err := unix.InotifyInit1(unix.IN_CLOEXEC)
	if err != nil {
		klog.ErrorS(err, "inotify")
		return
	}
	if _, err := unix.InotifyAddWatch(fd, filepath.Dir(d.hostPath()), unix.IN_CREATE|unix.IN_DELETE|unix.IN_MOVED_FROM|unix.IN_MOVED_TO|unix.IN_ATTRIB); err != nil {
		klog.ErrorS(err, "inotify watch")
		return
	}
	buf := make([]byte, 4096)
	for ctx.Err() == nil {
		if _, err := unix.Read(fd, buf); err != nil {
			klog.ErrorS(err, "inotify read")
			return
		}
		if err := d.publish(ctx); err != nil {
			klog.ErrorS(err, "publish")
		}
	}
}

func (d *driver) writeSpec(dir string) (string, error) {
	type node struct {
		Path     string `json:"path"`
		HostPath string `json:"hostPath"`
	}
	type device struct {
		Name  string `json:"name"`
		Edits struct {
			DeviceNodes []node `json:"deviceNodes"`
		} `json:"containerEdits"`
	}
	spec := struct {
		Version string   `json:"cdiVersion"`
		Kind    string   `json:"kind"`
		Devices []device `json:"devices"`
	}{Version: "0.6.0", Kind: d.kind}
	for i := 0; i < d.count; i++ {
		dev := device{Name: d.resource + "-" + strconv.Itoa(i)}
		dev.Edits.DeviceNodes = []node{{Path: d.device, HostPath: d.hostPath()}}
		spec.Devices = append(spec.Devices, dev)
	}
	data, err := json.Marshal(spec)
	if err != nil {
		return "", err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	path := filepath.Join(dir, "go-dra-"+d.resource+".json")
	return path, os.WriteFile(path, data, 0o644)
}

// PrepareResourceClaims answers with the CDI ID of each device allocated from our driver.
func (d *driver) PrepareResourceClaims(_ context.Context, claims []*resourceapi.ResourceClaim) (map[types.UID]kubeletplugin.PrepareResult, error) {
	out := make(map[types.UID]kubeletplugin.PrepareResult, len(claims))
	for _, c := range claims {
		var result kubeletplugin.PrepareResult
		for _, r := range c.Status.Allocation.Devices.Results {
			if r.Driver != d.name {
				continue
			}
			result.Devices = append(result.Devices, kubeletplugin.Device{
				Requests:     []string{r.Request},
				PoolName:     r.Pool,
				DeviceName:   r.Device,
				CDIDeviceIDs: []string{d.kind + "=" + r.Device},
			})
		}
		out[c.UID] = result
	}
	return out, nil
}

// UnprepareResourceClaims has nothing to undo: the spec stays for the next claim.
func (d *driver) UnprepareResourceClaims(_ context.Context, claims []kubeletplugin.NamespacedObject) (map[types.UID]error, error) {
	out := make(map[types.UID]error, len(claims))
	for _, c := range claims {
		out[c.UID] = nil
	}
	return out, nil
}

func (d *driver) HandleError(_ context.Context, err error, msg string) {
	klog.ErrorS(err, msg)
	if !errors.Is(err, kubeletplugin.ErrRecoverable) {
		os.Exit(1)
	}
}

func (d *driver) WatchHealthStatus(context.Context, chan<- kubeletplugin.DeviceHealthReport) error {
	return kubeletplugin.ErrHealthNotSupported
}
