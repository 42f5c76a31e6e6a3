//! The `DevicePlugin` service of one resource. Handlers run on the gRPC completion-queue threads and
//! never block: they compute an answer under a short lock and hand it to the sink; each
//! ListAndWatch stream is a future on that thread, woken by the broadcast or by the client leaving.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashSet};
use std::sync::Arc;

use crossbeam_channel::Sender;
use grpcio::{RpcContext, RpcStatus, RpcStatusCode, ServerStreamingSink, UnarySink};
use log::{info, warn};

use crate::broadcast::{Broadcast, Subscription};
use crate::cdi;
use crate::device::{device_list, Device, IdTable, Resource};
use crate::event::{Event, KubeletCalls};
use crate::metrics::Metrics;
use crate::proto;
use crate::rpc::{reply, stream_latest, StreamEnd};

/// How many offending IDs an error message names before it just counts the rest.
const IDS_IN_MESSAGE: usize = 8;

/// Everything the handlers answer from, replaced whole on every change: the configuration, the
/// devices on the node with their health, and the list built from them.
#[derive(Debug)]
pub struct Snapshot {
    /// The resource as configured.
    pub resource: Arc<Resource>,
    /// Its devices on the node, with their health.
    pub devices: Vec<Device>,
    /// Device IDs to devices and slots.
    pub ids: IdTable,
    /// The ListAndWatch message for all of them.
    pub list: proto::ListAndWatchResponse,
}

impl Snapshot {
    fn new(resource: Arc<Resource>, devices: Vec<Device>) -> Snapshot {
        Snapshot {
            ids: IdTable::new(&devices, resource.count),
            list: device_list(&devices, resource.count),
            resource,
            devices,
        }
    }
}

/// The service for one resource; clones share state, so the kubelet sees the same devices across
/// server restarts.
#[derive(Clone)]
pub struct Plugin {
    shared: Arc<Shared>,
    /// The kubelet's calls to the server this clone serves in.
    kubelet_calls: KubeletCalls,
}

struct Shared {
    resource_name: String,
    metrics: Arc<Metrics>,
    /// Where the end of the kubelet's own stream is reported; `None` for tools and tests.
    events: Option<Sender<Event>>,
    state: Broadcast<Arc<Snapshot>>,
}

impl Plugin {
    /// A plugin with metrics of its own, for tools and tests.
    pub fn new(resource: Resource, devices: Vec<Device>) -> Plugin {
        Plugin::shared(Arc::new(resource), devices, Arc::new(Metrics::new()), None)
    }

    /// The daemon's plugin: it reports its calls to the daemon's metrics (the control loop keeps
    /// the device gauges) and the end of the kubelet's stream to the control loop.
    pub(crate) fn shared(
        resource: Arc<Resource>,
        devices: Vec<Device>,
        metrics: Arc<Metrics>,
        events: Option<Sender<Event>>,
    ) -> Plugin {
        Plugin {
            shared: Arc::new(Shared {
                resource_name: resource.resource_name.clone(),
                metrics,
                events,
                state: Broadcast::new(Arc::new(Snapshot::new(resource, devices))),
            }),
            kubelet_calls: KubeletCalls::default(),
        }
    }

    /// The service for one server, counting the kubelet's calls to it in `calls`.
    pub(crate) fn counting(&self, calls: KubeletCalls) -> Plugin {
        Plugin {
            shared: Arc::clone(&self.shared),
            kubelet_calls: calls,
        }
    }

    /// The extended resource name, `<domain>/<name>`.
    pub fn resource_name(&self) -> &str {
        &self.shared.resource_name
    }

    /// The resource as currently configured.
    pub fn resource(&self) -> Arc<Resource> {
        Arc::clone(&self.snapshot().resource)
    }

    /// The options we implement; also sent in `RegisterRequest`.
    pub fn options() -> proto::DevicePluginOptions {
        let mut options = proto::DevicePluginOptions::new();
        options.pre_start_required = false;
        options.get_preferred_allocation_available = true;
        options
    }

    /// What the handlers answer from now.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.shared.state.latest()
    }

    /// Takes a new configuration or device set; sends the new list to every stream only if
    /// something changed. Returns whether it did.
    pub fn update(&self, resource: Arc<Resource>, devices: Vec<Device>) -> bool {
        let current = self.snapshot();
        if current.resource == resource && current.devices == devices {
            return false;
        }
        self.shared
            .state
            .publish(Arc::new(Snapshot::new(resource, devices)));
        true
    }

    /// Ends every open ListAndWatch stream, e.g. before the server stops.
    pub fn close_streams(&self) {
        self.shared.state.close();
    }

    /// Open ListAndWatch streams.
    pub fn stream_count(&self) -> usize {
        self.shared.state.subscriber_count()
    }

    /// A subscription to every new snapshot, starting with the current one.
    pub fn subscribe(&self) -> Subscription<Arc<Snapshot>> {
        self.shared.state.subscribe()
    }

    /// Answers an AllocateRequest: one response per container request, in order.
    pub fn allocation(
        &self,
        request: &proto::AllocateRequest,
    ) -> Result<proto::AllocateResponse, RpcStatus> {
        let snapshot = self.snapshot();
        let mut response = proto::AllocateResponse::new();
        for container in &request.container_requests {
            let devices = self.resolve(&snapshot, &container.devices_ids, true)?;
            response
                .container_responses
                .push(container_response(&snapshot, &devices));
        }
        Ok(response)
    }

    /// Maps IDs to distinct device indexes in first-seen order. Unknown IDs, and unhealthy ones
    /// when `need_healthy`, fail the whole request with one message naming them.
    fn resolve(
        &self,
        snapshot: &Snapshot,
        ids: &[String],
        need_healthy: bool,
    ) -> Result<Vec<usize>, RpcStatus> {
        let mut devices = Vec::new();
        let mut unknown = Vec::new();
        let mut unhealthy = Vec::new();
        for id in ids {
            match snapshot.ids.lookup(id) {
                None => unknown.push(id.as_str()),
                Some((device, _)) if need_healthy && !snapshot.devices[device].healthy => {
                    unhealthy.push(id.as_str());
                }
                Some((device, _)) => {
                    if !devices.contains(&device) {
                        devices.push(device);
                    }
                }
            }
        }
        if unknown.is_empty() && unhealthy.is_empty() {
            return Ok(devices);
        }
        let mut problems = Vec::new();
        if !unknown.is_empty() {
            problems.push(format!("unknown device IDs {}", name_ids(&unknown)));
        }
        if !unhealthy.is_empty() {
            problems.push(format!("unhealthy device IDs {}", name_ids(&unhealthy)));
        }
        Err(RpcStatus::with_message(
            RpcStatusCode::INVALID_ARGUMENT,
            format!("{}: {}", self.shared.resource_name, problems.join("; ")),
        ))
    }

    /// Chooses devices for each container: the must-include IDs first, then slots of the
    /// healthy devices that are least in use right now, spreading one request over devices.
    ///
    /// Current use comes from the request itself: a device's slots the kubelet does not list as
    /// available are held by running containers. (Counting our own Allocate calls would never
    /// forget a container that ended.) The answer is advice, which the kubelet intersects with
    /// what is available, and an error from us would fail the pod's admission: IDs we do not know
    /// are passed over, not refused.
    pub fn preferred_allocation(
        &self,
        request: &proto::PreferredAllocationRequest,
    ) -> proto::PreferredAllocationResponse {
        let snapshot = self.snapshot();
        let mut response = proto::PreferredAllocationResponse::new();
        for container in &request.container_requests {
            let mut answer = proto::ContainerPreferredAllocationResponse::new();
            answer.deviceIDs = choose(&snapshot, container);
            response.container_responses.push(answer);
        }
        response
    }

    /// Checks the IDs a container is about to start with; we need no preparation.
    pub fn pre_start(
        &self,
        request: &proto::PreStartContainerRequest,
    ) -> Result<proto::PreStartContainerResponse, RpcStatus> {
        self.resolve(&self.snapshot(), &request.devices_ids, false)?;
        Ok(proto::PreStartContainerResponse::new())
    }
}

/// One container's preferred IDs (see [`Plugin::preferred_allocation`]).
fn choose(
    snapshot: &Snapshot,
    container: &proto::ContainerPreferredAllocationRequest,
) -> Vec<String> {
    let size = usize::try_from(container.allocation_size).unwrap_or(0);
    let mut chosen: Vec<String> = Vec::with_capacity(size.min(container.available_deviceIDs.len()));
    let mut taken: HashSet<&str> = HashSet::new();
    // Slots held by containers per device; the must-include IDs count as held from now on.
    let mut in_use = vec![0_usize; snapshot.devices.len()];
    for id in &container.must_include_deviceIDs {
        if taken.insert(id.as_str()) {
            chosen.push(id.clone());
            if let Some((device, _)) = snapshot.ids.lookup(id) {
                in_use[device] += 1;
            }
        }
    }
    // Free slots per device, the lowest slot last (popped first). The kubelet lists must-include
    // IDs among the available ones, so every slot it does not list is held by a container.
    let mut free: Vec<Vec<(u32, &String)>> = vec![Vec::new(); snapshot.devices.len()];
    let mut listed = vec![0_usize; snapshot.devices.len()];
    let mut seen: HashSet<&str> = HashSet::new();
    for id in &container.available_deviceIDs {
        let Some((device, slot)) = snapshot.ids.lookup(id) else {
            continue;
        };
        if seen.insert(id.as_str()) {
            listed[device] += 1;
            if !taken.contains(id.as_str()) {
                free[device].push((slot, id));
            }
        }
    }
    let count = snapshot.resource.count as usize;
    let mut queue: BinaryHeap<Reverse<(bool, usize, usize)>> = BinaryHeap::new();
    for (device, slots) in free.iter_mut().enumerate() {
        if !slots.is_empty() {
            slots.sort_unstable_by_key(|&(slot, _)| Reverse(slot));
            let held = count.saturating_sub(listed[device]) + in_use[device];
            queue.push(Reverse((!snapshot.devices[device].healthy, held, device)));
        }
    }
    while chosen.len() < size {
        let Some(Reverse((unhealthy, held, device))) = queue.pop() else {
            break;
        };
        if let Some((_, id)) = free[device].pop() {
            chosen.push(id.clone());
        }
        if !free[device].is_empty() {
            queue.push(Reverse((unhealthy, held + 1, device)));
        }
    }
    chosen
}

/// What one container gets: its devices' nodes, and the resource's mounts, environment,
/// annotations and CDI names.
fn container_response(snapshot: &Snapshot, devices: &[usize]) -> proto::ContainerAllocateResponse {
    let resource = &snapshot.resource;
    let mut response = proto::ContainerAllocateResponse::new();
    if resource.device_specs {
        for &device in devices {
            for node in &snapshot.devices[device].nodes {
                let mut spec = proto::DeviceSpec::new();
                spec.host_path = node.host_path.to_string_lossy().into_owned();
                spec.container_path = node.container_path.to_string_lossy().into_owned();
                spec.permissions = resource.permissions.to_string();
                response.devices.push(spec);
            }
        }
    }
    if devices.is_empty() {
        return response;
    }
    for m in &resource.mounts {
        let mut mount = proto::Mount::new();
        mount.host_path = m.host_path.to_string_lossy().into_owned();
        mount.container_path = m.container_path.to_string_lossy().into_owned();
        mount.read_only = m.read_only;
        response.mounts.push(mount);
    }
    response.envs = resource
        .env
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    response.annotations = resource
        .annotations
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let mut names = resource.cdi_devices.clone();
    if resource.cdi {
        // Slots of one device share its CDI name: named once.
        let mut seen = HashSet::new();
        names.extend(
            devices
                .iter()
                .filter(|&&d| seen.insert(d))
                .map(|&d| cdi::qualified_name(resource, &snapshot.devices[d])),
        );
    }
    for name in names {
        let mut cdi = proto::CDIDevice::new();
        cdi.name = name;
        response.cdi_devices.push(cdi);
    }
    response
}

fn name_ids(ids: &[&str]) -> String {
    let shown: Vec<String> = ids
        .iter()
        .take(IDS_IN_MESSAGE)
        .map(|id| format!("{:?}", truncate(id, 80)))
        .collect();
    let rest = ids.len().saturating_sub(IDS_IN_MESSAGE);
    if rest == 0 {
        format!("[{}]", shown.join(", "))
    } else {
        format!("[{}, and {rest} more]", shown.join(", "))
    }
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((end, _)) => &s[..end],
        None => s,
    }
}

impl proto::DevicePlugin for Plugin {
    fn get_device_plugin_options(
        &mut self,
        ctx: RpcContext<'_>,
        _req: proto::Empty,
        sink: UnarySink<proto::DevicePluginOptions>,
    ) {
        if from_kubelet(&ctx) {
            self.kubelet_calls.add();
        }
        reply(&ctx, sink, "GetDevicePluginOptions", Ok(Plugin::options()));
    }

    fn list_and_watch(
        &mut self,
        ctx: RpcContext<'_>,
        _req: proto::Empty,
        sink: ServerStreamingSink<proto::ListAndWatchResponse>,
    ) {
        let resource = self.shared.resource_name.clone();
        let kubelet = from_kubelet(&ctx);
        let who = if kubelet {
            ""
        } else {
            " by a client other than the kubelet (not counted for readiness)"
        };
        info!("ListAndWatch stream opened for {resource}{who}");
        if kubelet {
            self.kubelet_calls.add();
        }
        // Only the kubelet's stream counts for readiness.
        let metrics = kubelet.then(|| Arc::clone(&self.shared.metrics));
        let events = self.shared.events.clone().filter(|_| kubelet);
        let what = format!("ListAndWatch stream for {resource}");
        let listed = resource.clone();
        let stream = stream_latest(
            sink,
            self.subscribe(),
            what,
            |snapshot: Arc<Snapshot>| snapshot.list.clone(),
            move || {
                if let Some(metrics) = &metrics {
                    metrics.listed(&listed);
                }
            },
        );
        ctx.spawn(async move {
            // The kubelet ends its own stream only when it drops our endpoint (from 1.25 to 1.36,
            // also another instance's when an older one's stream ends): we are not registered
            // any more, whatever it said before.
            if stream.await == StreamEnd::Client {
                if let Some(events) = events {
                    let _ = events.send(Event::StreamLost(resource));
                }
            }
        });
    }

    fn get_preferred_allocation(
        &mut self,
        ctx: RpcContext<'_>,
        req: proto::PreferredAllocationRequest,
        sink: UnarySink<proto::PreferredAllocationResponse>,
    ) {
        reply(
            &ctx,
            sink,
            "GetPreferredAllocation",
            Ok(self.preferred_allocation(&req)),
        );
    }

    fn allocate(
        &mut self,
        ctx: RpcContext<'_>,
        req: proto::AllocateRequest,
        sink: UnarySink<proto::AllocateResponse>,
    ) {
        let answer = self.allocation(&req);
        if let Err(status) = &answer {
            warn!("Allocate refused: {}", status.message());
        }
        self.shared
            .metrics
            .allocated(&self.shared.resource_name, answer.is_ok());
        reply(&ctx, sink, "Allocate", answer);
    }

    fn pre_start_container(
        &mut self,
        ctx: RpcContext<'_>,
        req: proto::PreStartContainerRequest,
        sink: UnarySink<proto::PreStartContainerResponse>,
    ) {
        reply(&ctx, sink, "PreStartContainer", self.pre_start(&req));
    }
}

/// Whether the caller is the kubelet, whose gRPC library (grpc-go) names itself in the user
/// agent; `probe`, built on the gRPC core, and other tools do not. Only the kubelet's stream
/// makes us ready: a probe that read our list has told the kubelet nothing.
fn from_kubelet(ctx: &RpcContext<'_>) -> bool {
    ctx.request_headers()
        .iter()
        .any(|(key, value)| key == "user-agent" && value.starts_with(b"grpc-go/"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{DeviceNode, Mount, Permissions, Source, DOMAIN};
    use std::path::PathBuf;

    fn devices(healthy: &[bool]) -> Vec<Device> {
        healthy
            .iter()
            .enumerate()
            .map(|(i, &healthy)| Device {
                id_prefix: format!("dev{i}"),
                nodes: vec![DeviceNode {
                    host_path: PathBuf::from(format!("/host/d{i}")),
                    container_path: PathBuf::from(format!("/dev/d{i}")),
                }],
                healthy,
                numa_node: None,
                numbers: None,
                identity: None,
            })
            .collect()
    }

    fn resource(count: u32) -> Resource {
        Resource::new(
            DOMAIN,
            "test",
            vec![Source::Fixed(vec![])],
            count,
            "rwm".parse::<Permissions>().unwrap(),
        )
        .unwrap()
    }

    fn plugin(count: u32, healthy: &[bool]) -> Plugin {
        Plugin::new(resource(count), devices(healthy))
    }

    fn set_health(p: &Plugin, healthy: &[bool]) -> bool {
        p.update(p.resource(), devices(healthy))
    }

    fn allocate_request(containers: &[&[&str]]) -> proto::AllocateRequest {
        let mut request = proto::AllocateRequest::new();
        for ids in containers {
            let mut c = proto::ContainerAllocateRequest::new();
            c.devices_ids = ids.iter().map(std::string::ToString::to_string).collect();
            request.container_requests.push(c);
        }
        request
    }

    fn host_paths(r: &proto::ContainerAllocateResponse) -> Vec<&str> {
        r.devices.iter().map(|d| d.host_path.as_str()).collect()
    }

    #[test]
    fn allocate_answers_each_container_in_order() {
        let p = plugin(3, &[true, true]);
        let response = p
            .allocation(&allocate_request(&[
                &["dev1-0"],
                &["dev0-2", "dev0-1"],
                &[],
            ]))
            .unwrap();
        assert_eq!(response.container_responses.len(), 3);
        assert_eq!(host_paths(&response.container_responses[0]), ["/host/d1"]);
        // Two slots of one device give the node once.
        assert_eq!(host_paths(&response.container_responses[1]), ["/host/d0"]);
        assert!(response.container_responses[2].devices.is_empty());
        let spec = &response.container_responses[0].devices[0];
        assert_eq!(
            (spec.container_path.as_str(), spec.permissions.as_str()),
            ("/dev/d1", "rwm")
        );
    }

    #[test]
    fn allocate_adds_mounts_env_annotations_and_cdi_names() {
        let mut r = resource(1);
        r.mounts.push(Mount {
            host_path: "/usr/lib/dri".into(),
            container_path: "/lib/dri".into(),
            read_only: true,
        });
        r.env.insert("GPU".into(), "1".into());
        r.annotations.insert("example.com/gpu".into(), "yes".into());
        r.cdi_devices.push("example.com/gpu=all".into());
        r.device_specs = false;
        let p = Plugin::new(r, devices(&[true]));
        let response = p
            .allocation(&allocate_request(&[&["dev0-0"], &[]]))
            .unwrap();
        let c = &response.container_responses[0];
        assert!(c.devices.is_empty(), "device specs were turned off");
        assert_eq!(
            (c.mounts[0].container_path.as_str(), c.mounts[0].read_only),
            ("/lib/dri", true)
        );
        assert_eq!(c.envs.get("GPU").map(String::as_str), Some("1"));
        assert_eq!(
            c.annotations.get("example.com/gpu").map(String::as_str),
            Some("yes")
        );
        assert_eq!(c.cdi_devices[0].name, "example.com/gpu=all");
        // A container that asked for nothing gets nothing.
        assert_eq!(
            response.container_responses[1],
            proto::ContainerAllocateResponse::new()
        );
    }

    #[test]
    fn with_cdi_allocate_names_each_device_once_by_its_cdi_name_and_gives_no_device_specs() {
        let mut r = resource(2);
        r.cdi = true;
        r.device_specs = false;
        r.cdi_devices.push("example.com/extra=all".into());
        let p = Plugin::new(r, devices(&[true, true]));
        let response = p
            .allocation(&allocate_request(&[&["dev0-0", "dev0-1", "dev1-0"]]))
            .unwrap();
        let c = &response.container_responses[0];
        assert!(c.devices.is_empty());
        let names: Vec<&str> = c.cdi_devices.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "example.com/extra=all",
                "devices.anza-labs.dev/test=dev0",
                "devices.anza-labs.dev/test=dev1"
            ]
        );
    }

    #[test]
    fn allocate_refuses_unknown_ids_by_name() {
        let p = plugin(2, &[true]);
        let status = p
            .allocation(&allocate_request(&[&["dev0-0"], &["dev0-2", "gpu-0"]]))
            .unwrap_err();
        assert_eq!(status.code(), RpcStatusCode::INVALID_ARGUMENT);
        assert!(
            status
                .message()
                .contains(r#"unknown device IDs ["dev0-2", "gpu-0"]"#),
            "{}",
            status.message()
        );
        assert!(
            status.message().starts_with("devices.anza-labs.dev/test: "),
            "{}",
            status.message()
        );
    }

    #[test]
    fn allocate_refuses_unhealthy_devices() {
        let p = plugin(1, &[true, false]);
        let status = p
            .allocation(&allocate_request(&[&["dev0-0", "dev1-0"]]))
            .unwrap_err();
        assert_eq!(status.code(), RpcStatusCode::INVALID_ARGUMENT);
        assert!(
            status
                .message()
                .contains(r#"unhealthy device IDs ["dev1-0"]"#),
            "{}",
            status.message()
        );
        assert!(set_health(&p, &[true, true]));
        assert!(p
            .allocation(&allocate_request(&[&["dev0-0", "dev1-0"]]))
            .is_ok());
    }

    #[test]
    fn error_messages_stay_short_for_huge_requests() {
        let p = plugin(1, &[true]);
        let ids: Vec<String> = (0..5000)
            .map(|i| format!("bogus-{i}-{}", "x".repeat(1000)))
            .collect();
        let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        let status = p.allocation(&allocate_request(&[&refs])).unwrap_err();
        assert!(
            status.message().len() < 1500,
            "{} bytes",
            status.message().len()
        );
        assert!(status.message().contains("and 4992 more"));
    }

    #[test]
    fn update_reports_only_changes() {
        let p = plugin(2, &[true]);
        assert!(!set_health(&p, &[true]));
        assert!(set_health(&p, &[false]));
        assert!(p
            .snapshot()
            .list
            .devices
            .iter()
            .all(|d| d.health == proto::UNHEALTHY));
        // A new count is a change too.
        assert!(p.update(Arc::new(resource(3)), devices(&[false])));
        assert_eq!(p.snapshot().list.devices.len(), 3);
    }

    fn preferred(p: &Plugin, available: &[&str], must: &[&str], size: i32) -> Vec<String> {
        let mut c = proto::ContainerPreferredAllocationRequest::new();
        c.available_deviceIDs = available
            .iter()
            .map(std::string::ToString::to_string)
            .collect();
        c.must_include_deviceIDs = must.iter().map(std::string::ToString::to_string).collect();
        c.allocation_size = size;
        let mut request = proto::PreferredAllocationRequest::new();
        request.container_requests.push(c);
        p.preferred_allocation(&request).container_responses[0]
            .deviceIDs
            .clone()
    }

    #[test]
    fn preferred_allocation_puts_must_include_first_then_least_used() {
        let p = plugin(2, &[true, true]);
        let all = ["dev0-0", "dev0-1", "dev1-0", "dev1-1"];
        assert_eq!(preferred(&p, &all, &["dev1-1"], 2), ["dev1-1", "dev0-0"]);
        // dev0-0 held by a running container: dev1 is preferred.
        assert_eq!(preferred(&p, &all[1..], &[], 1), ["dev1-0"]);
        // One request spreads over devices.
        assert_eq!(preferred(&p, &all, &[], 2), ["dev0-0", "dev1-0"]);
        // Unhealthy devices come last.
        set_health(&p, &[true, false]);
        assert_eq!(preferred(&p, &all[1..], &[], 2), ["dev0-1", "dev1-0"]);
    }

    #[test]
    fn preferred_allocation_follows_current_use_not_past_allocations() {
        // Device 0 served three pods that have ended; device 1 holds two running pods.
        let p = plugin(3, &[true, true]);
        for _ in 0..3 {
            p.allocation(&allocate_request(&[&["dev0-0"]])).unwrap();
        }
        p.allocation(&allocate_request(&[&["dev1-0", "dev1-1"]]))
            .unwrap();
        let available = ["dev0-0", "dev0-1", "dev0-2", "dev1-2"];
        assert_eq!(preferred(&p, &available, &[], 1), ["dev0-0"]);
    }

    #[test]
    fn preferred_allocation_never_repeats_or_overshoots() {
        let p = plugin(3, &[true]);
        assert_eq!(
            preferred(&p, &["dev0-0", "dev0-0", "dev0-1"], &["dev0-0"], 2),
            ["dev0-0", "dev0-1"]
        );
        assert_eq!(preferred(&p, &["dev0-0"], &[], 5), ["dev0-0"]);
        assert!(preferred(&p, &["dev0-0"], &[], -1).is_empty());
    }

    #[test]
    fn preferred_allocation_passes_over_ids_it_does_not_know() {
        // Advice: the kubelet fails the pod's admission on an error, so unknown IDs are skipped.
        let p = plugin(2, &[true]);
        assert_eq!(
            preferred(&p, &["nope", "dev0-7", "dev0-1"], &[], 2),
            ["dev0-1"]
        );
        assert!(preferred(&p, &["nope"], &[], 1).is_empty());
    }

    #[test]
    fn pre_start_checks_ids() {
        let p = plugin(1, &[false]);
        assert!(p.pre_start(&proto::PreStartContainerRequest::new()).is_ok());
        let mut request = proto::PreStartContainerRequest::new();
        request.devices_ids = vec!["dev0-0".into()];
        assert!(p.pre_start(&request).is_ok());
        request.devices_ids = vec!["dev0-1".into()];
        assert_eq!(
            p.pre_start(&request).unwrap_err().code(),
            RpcStatusCode::INVALID_ARGUMENT
        );
    }
}
