//! Request builders and status helpers shared by the cases.

use grpcio::RpcStatusCode;
use kubelet_device_plugins::proto;

/// The built-in resources' names, as the kubelet sees them.
pub const KVM: &str = "devices.anza-labs.dev/kvm";
pub const TUN: &str = "devices.anza-labs.dev/tun";

/// An AllocateRequest with one container request per entry.
pub fn allocate_request(containers: Vec<Vec<String>>) -> proto::AllocateRequest {
    let mut request = proto::AllocateRequest::new();
    for ids in containers {
        let mut c = proto::ContainerAllocateRequest::new();
        c.devices_ids = ids;
        request.container_requests.push(c);
    }
    request
}

/// Calls Allocate with one container request per entry.
pub fn allocate(
    client: &proto::DevicePluginClient,
    containers: &[&[&str]],
) -> grpcio::Result<proto::AllocateResponse> {
    let owned = containers
        .iter()
        .map(|ids| ids.iter().map(|id| (*id).to_owned()).collect())
        .collect();
    allocate_owned(client, owned)
}

/// Calls Allocate with one container request per entry, IDs already owned.
pub fn allocate_owned(
    client: &proto::DevicePluginClient,
    containers: Vec<Vec<String>>,
) -> grpcio::Result<proto::AllocateResponse> {
    client.allocate(&allocate_request(containers))
}

/// The status code of a failed call.
pub fn code(result: grpcio::Result<impl std::fmt::Debug>) -> RpcStatusCode {
    match result {
        Err(grpcio::Error::RpcFailure(status)) => status.code(),
        other => panic!("expected an RPC status, got {other:?}"),
    }
}
