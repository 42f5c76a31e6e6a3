// A minimal Go device plugin of the usual shape (grpc-go, deviceplugin v1beta1, one resource, no
// watchers, no logging), the benchmark's Go reference point. Not product code.
package main

import (
	"context"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"syscall"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	api "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"
)

type plugin struct {
	api.UnimplementedDevicePluginServer
	device  string
	devices []*api.Device
	known   map[string]bool
}

func (p *plugin) GetDevicePluginOptions(context.Context, *api.Empty) (*api.DevicePluginOptions, error) {
	return &api.DevicePluginOptions{}, nil
}

func (p *plugin) ListAndWatch(_ *api.Empty, s api.DevicePlugin_ListAndWatchServer) error {
	if err := s.Send(&api.ListAndWatchResponse{Devices: p.devices}); err != nil {
		return err
	}
	<-s.Context().Done()
	return nil
}

func (p *plugin) Allocate(_ context.Context, req *api.AllocateRequest) (*api.AllocateResponse, error) {
	resp := &api.AllocateResponse{}
	for _, creq := range req.ContainerRequests {
		cresp := &api.ContainerAllocateResponse{}
		for _, id := range creq.DevicesIds {
			if !p.known[id] {
				return nil, status.Errorf(codes.InvalidArgument, "unknown device %q", id)
			}
			cresp.Devices = append(cresp.Devices, &api.DeviceSpec{
				ContainerPath: p.device,
				HostPath:      p.device,
				Permissions:   "rw",
			})
		}
		resp.ContainerResponses = append(resp.ContainerResponses, cresp)
	}
	return resp, nil
}

func (p *plugin) GetPreferredAllocation(context.Context, *api.PreferredAllocationRequest) (*api.PreferredAllocationResponse, error) {
	return &api.PreferredAllocationResponse{}, nil
}

func (p *plugin) PreStartContainer(context.Context, *api.PreStartContainerRequest) (*api.PreStartContainerResponse, error) {
	return &api.PreStartContainerResponse{}, nil
}

func main() {
	kubelet := flag.String("kubelet", api.KubeletSocket, "path of kubelet.sock")
	socket := flag.String("socket", "", "absolute path of the endpoint socket to serve")
	resource := flag.String("resource", "devices.anza-labs.dev/kvm", "resource name")
	count := flag.Int("count", 10, "number of devices")
	device := flag.String("device", "/dev/kvm", "host path of the device")
	flag.Parse()

	p := &plugin{device: *device, known: map[string]bool{}}
	prefix := filepath.Base(*resource)
	for i := 0; i < *count; i++ {
		id := prefix + "-" + strconv.Itoa(i)
		p.devices = append(p.devices, &api.Device{ID: id, Health: api.Healthy})
		p.known[id] = true
	}

	if err := os.Remove(*socket); err != nil && !os.IsNotExist(err) {
		fail(err)
	}
	lis, err := net.Listen("unix", *socket)
	if err != nil {
		fail(err)
	}
	server := grpc.NewServer()
	api.RegisterDevicePluginServer(server, p)
	go server.Serve(lis)

	if err := register(*kubelet, filepath.Base(*socket), *resource); err != nil {
		server.Stop()
		os.Remove(*socket)
		fail(err)
	}

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	<-sig
	server.Stop()
	os.Remove(*socket)
}

func register(kubelet, endpoint, resource string) error {
	conn, err := grpc.NewClient("unix://"+kubelet, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer conn.Close()
	_, err = api.NewRegistrationClient(conn).Register(context.Background(), &api.RegisterRequest{
		Version:      api.Version,
		Endpoint:     endpoint,
		ResourceName: resource,
		Options:      &api.DevicePluginOptions{},
	})
	return err
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, err)
	os.Exit(1)
}
