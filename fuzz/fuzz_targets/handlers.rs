//! Fuzzes the request handlers with arbitrary protobuf bytes: Allocate, GetPreferredAllocation and
//! PreStartContainer must answer or refuse, never panic, and never hand out an unknown device.

#![no_main]

use std::path::Path;

use kubelet_device_plugins::device::{Permissions, Resource};
use kubelet_device_plugins::device_plugin::plugin::Plugin;
use kubelet_device_plugins::proto;
use libfuzzer_sys::fuzz_target;
use protobuf::Message;

fuzz_target!(|data: &[u8]| {
    let Some((&which, bytes)) = data.split_first() else {
        return;
    };
    let resource = Resource::builtin("kvm", Path::new("/dev"), 4, Permissions::default())
        .expect("a valid built-in");
    let devices = resource.discover(Path::new("/nonexistent-sys"));
    let plugin = Plugin::new(resource, devices);
    match which % 3 {
        0 => {
            let Ok(request) = proto::AllocateRequest::parse_from_bytes(bytes) else {
                return;
            };
            if let Ok(response) = plugin.allocation(&request) {
                assert_eq!(
                    response.container_responses.len(),
                    request.container_requests.len()
                );
                for c in &response.container_responses {
                    assert!(c.devices.iter().all(|d| d.container_path == "/dev/kvm"));
                }
            }
        }
        1 => {
            let Ok(request) = proto::PreferredAllocationRequest::parse_from_bytes(bytes) else {
                return;
            };
            // Advice never fails: every container gets an answer, within its size, drawn from
            // what the kubelet offered.
            let response = plugin.preferred_allocation(&request);
            assert_eq!(
                response.container_responses.len(),
                request.container_requests.len()
            );
            for (c, r) in request
                .container_requests
                .iter()
                .zip(&response.container_responses)
            {
                let size = usize::try_from(c.allocation_size)
                    .unwrap_or(0)
                    .max(c.must_include_deviceIDs.len());
                assert!(r.deviceIDs.len() <= size);
                assert!(r.deviceIDs.iter().all(|id| c.available_deviceIDs.contains(id)
                    || c.must_include_deviceIDs.contains(id)));
            }
        }
        _ => {
            let Ok(request) = proto::PreStartContainerRequest::parse_from_bytes(bytes) else {
                return;
            };
            let _ = plugin.pre_start(&request);
        }
    }
});
