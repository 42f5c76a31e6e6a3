// draclient calls a DRA driver's DRAPlugin service as the kubelet does, with the kubelet's own
// generated client (k8s.io/kubelet/pkg/apis/dra), and prints the answer as JSON. The cluster
// suite uses it to repeat a prepare the kubelet already made, in either API version.
//
//	draclient -socket PATH [-version v1|v1beta1] prepare|unprepare NAMESPACE/NAME/UID...
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	drav1 "k8s.io/kubelet/pkg/apis/dra/v1"
	drav1beta1 "k8s.io/kubelet/pkg/apis/dra/v1beta1"
)

func main() {
	socket := flag.String("socket", "", "the driver's DRAPlugin socket")
	version := flag.String("version", "v1", "v1 or v1beta1")
	flag.Parse()
	if *socket == "" || flag.NArg() < 2 {
		fmt.Fprintln(os.Stderr, "usage: draclient -socket PATH [-version v1|v1beta1] prepare|unprepare NS/NAME/UID...")
		os.Exit(2)
	}
	// The kubelet's own deadline for a batch.
	ctx, cancel := context.WithTimeout(context.Background(), 45*time.Second)
	defer cancel()
	conn, err := grpc.NewClient("unix://"+*socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		fail(err)
	}
	defer conn.Close()
	answer, err := call(ctx, conn, *version, flag.Arg(0), flag.Args()[1:])
	if err != nil {
		fail(err)
	}
	out, err := json.Marshal(answer)
	if err != nil {
		fail(err)
	}
	fmt.Println(string(out))
}

func call(ctx context.Context, conn *grpc.ClientConn, version, verb string, refs []string) (any, error) {
	type claim struct{ ns, name, uid string }
	var claims []claim
	for _, r := range refs {
		p := strings.Split(r, "/")
		if len(p) != 3 {
			return nil, fmt.Errorf("%q is not NAMESPACE/NAME/UID", r)
		}
		claims = append(claims, claim{p[0], p[1], p[2]})
	}
	switch version {
	case "v1":
		var cs []*drav1.Claim
		for _, c := range claims {
			cs = append(cs, &drav1.Claim{Namespace: c.ns, Name: c.name, Uid: c.uid})
		}
		client := drav1.NewDRAPluginClient(conn)
		if verb == "prepare" {
			return client.NodePrepareResources(ctx, &drav1.NodePrepareResourcesRequest{Claims: cs})
		}
		return client.NodeUnprepareResources(ctx, &drav1.NodeUnprepareResourcesRequest{Claims: cs})
	case "v1beta1":
		var cs []*drav1beta1.Claim
		for _, c := range claims {
			cs = append(cs, &drav1beta1.Claim{Namespace: c.ns, Name: c.name, Uid: c.uid})
		}
		client := drav1beta1.NewDRAPluginClient(conn)
		if verb == "prepare" {
			return client.NodePrepareResources(ctx, &drav1beta1.NodePrepareResourcesRequest{Claims: cs})
		}
		return client.NodeUnprepareResources(ctx, &drav1beta1.NodeUnprepareResourcesRequest{Claims: cs})
	}
	return nil, fmt.Errorf("unknown version %q", version)
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "draclient:", err)
	os.Exit(1)
}
