//! The kubelet's plugin watcher, our side: each resource serves the `pluginregistration` API on
//! a socket in `plugins_registry/`, beside its DevicePlugin service on the same server, so its
//! calls run on the completion-queue threads. The kubelet finds the socket by itself, asks what it
//! is, dials the endpoint it names, and tells us whether it accepted; after a kubelet restart it
//! finds the socket again, so there is nothing to redo. A refusal it does not retry by itself
//! (only a changed socket makes it try again): the control loop hears of it and serves the
//! resource on fresh sockets after a wait.

use std::path::{Path, PathBuf};

use crossbeam_channel::Sender;
use grpcio::{RpcContext, Service, UnarySink};
use log::{debug, info};

use crate::event::Event;
use crate::layout::Layout;
use crate::proto;
use crate::rpc::reply;

/// The plugin watcher's service for one resource and the socket it must be found on, in
/// plugin-watcher mode (`None` otherwise). The socket goes after the DevicePlugin socket in the
/// server's list: the plugin watcher dials the endpoint as soon as it finds this one.
pub fn registration(
    layout: &Layout,
    resource_name: &str,
    endpoint: &Path,
    events: &Sender<Event>,
) -> Option<(Service, PathBuf)> {
    let path = layout.registration_path_for(endpoint)?;
    let service = WatcherService::new(resource_name, endpoint, events.clone());
    Some((
        proto::pluginregistration::create_registration(service),
        path,
    ))
}

/// The plugin watcher's `Registration` service for one resource. Runs on a completion-queue
/// thread; answers at once.
#[derive(Clone)]
pub struct WatcherService {
    info: proto::pluginregistration::PluginInfo,
    events: Sender<Event>,
}

impl WatcherService {
    /// Tells the kubelet that `resource_name` is served by the DevicePlugin API at `endpoint`.
    pub fn new(resource_name: &str, endpoint: &Path, events: Sender<Event>) -> WatcherService {
        let mut info = proto::pluginregistration::PluginInfo::new();
        info.type_ = proto::pluginregistration::DEVICE_PLUGIN.to_owned();
        info.name = resource_name.to_owned();
        info.endpoint = endpoint.to_string_lossy().into_owned();
        info.supported_versions = vec![proto::VERSION.to_owned()];
        WatcherService { info, events }
    }

    /// Tells the kubelet that the DRA driver `driver` serves the DRAPlugin API at `endpoint`, in
    /// both versions we implement, the newest first (kubelets 1.32 and 1.33 speak only v1beta1),
    /// and the DRAResourceHealth API beside it in both of its versions. A kubelet picks the first
    /// DRAPlugin version it knows and, apart, the first health version it knows, and passes over
    /// the names it does not know.
    pub fn dra(driver: &str, endpoint: &Path, events: Sender<Event>) -> WatcherService {
        let mut info = proto::pluginregistration::PluginInfo::new();
        info.type_ = proto::pluginregistration::DRA_PLUGIN.to_owned();
        info.name = driver.to_owned();
        info.endpoint = endpoint.to_string_lossy().into_owned();
        info.supported_versions = vec![
            proto::dra::v1::SERVICE.to_owned(),
            proto::dra::v1beta1::SERVICE.to_owned(),
            proto::dra_health::v1::SERVICE.to_owned(),
            proto::dra_health::v1alpha1::SERVICE.to_owned(),
        ];
        WatcherService { info, events }
    }
}

impl proto::pluginregistration::Registration for WatcherService {
    fn get_info(
        &mut self,
        ctx: RpcContext<'_>,
        _req: proto::pluginregistration::InfoRequest,
        sink: UnarySink<proto::pluginregistration::PluginInfo>,
    ) {
        debug!("the plugin watcher asked about {}", self.info.name);
        reply(&ctx, sink, "GetInfo", Ok(self.info.clone()));
    }

    fn notify_registration_status(
        &mut self,
        ctx: RpcContext<'_>,
        req: proto::pluginregistration::RegistrationStatus,
        sink: UnarySink<proto::pluginregistration::RegistrationStatusResponse>,
    ) {
        let name = &self.info.name;
        let event = if req.plugin_registered {
            info!(
                "the kubelet's plugin watcher registered {name} (endpoint {})",
                self.info.endpoint
            );
            Event::Registered(name.clone())
        } else {
            // Logged by the control loop, with what it does about it.
            Event::RegistrationRefused {
                resource: name.clone(),
                error: req.error,
            }
        };
        // Unbounded: never blocks this completion-queue thread. Gone only at shutdown.
        let _ = self.events.send(event);
        reply(
            &ctx,
            sink,
            "NotifyRegistrationStatus",
            Ok(proto::pluginregistration::RegistrationStatusResponse::new()),
        );
    }
}
