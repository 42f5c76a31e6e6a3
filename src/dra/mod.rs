//! DRA mode (main thread): the same devices served as a Dynamic Resource Allocation driver
//! instead of a device plugin. The kubelet finds us through its plugin watcher (type DRAPlugin)
//! and calls NodePrepareResources / NodeUnprepareResources on one socket that serves both API
//! versions; the scheduler learns of the devices from the ResourceSlices we publish; the runtime
//! injects them from our CDI specs.
//!
//! Threads: "signals", "http" (optional), "inotify" (device nodes, the configuration file, our
//! sockets), "slices" and "slice-watch" ([`slices`]: the API server), "prepare" ([`claims`]: the
//! kubelet's batches, the claims, the checkpoint), and gRPC's completion-queue thread
//! ([`service`], and [`health`]'s streams). The main thread turns events into the latest device
//! list ([`model`]) and hands it on.

pub mod claims;
pub mod health;
pub mod kube;
pub mod model;
pub mod service;
pub mod slices;

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use log::{error, info, warn};

use crate::broadcast::Broadcast;
use crate::cdi::SpecFiles;
use crate::config::Sources;
use crate::device::{self, Device, Resource, WatchTarget};
use crate::event::Event;
use crate::http::{HttpError, HttpServer};
use crate::inotify::{InotifyError, InotifyThread};
use crate::layout::{REGISTRY_DIR, WATCHER_SOCKET_DIR};
use crate::lock::{LockError, SocketLock};
use crate::metrics::Metrics;
use crate::proto;
use crate::registration::plugin_watcher::WatcherService;
use crate::server::{ResourceServer, ServerError};
use crate::signals;
use crate::thread::Threads;

use claims::{Checkpoint, PrepareThread};
use kube::{Client, KubeError};
use model::DraDevice;
use slices::{Pool, SlicesCommand, SlicesThread};

/// Our DRAPlugin socket, in our own directory under `plugins/`.
pub const SOCKET: &str = "kdp-dra.sock";
/// The prepared claims, beside the socket.
pub const CHECKPOINT: &str = "dra-checkpoint.json";

/// What DRA mode serves, and where.
#[derive(Clone, Debug)]
pub struct Config {
    /// The kubelet's root directory (holding `plugins/` and `plugins_registry/`).
    pub kubelet_dir: PathBuf,
    /// Where the kernel's sysfs is, for NUMA nodes.
    pub sys_root: PathBuf,
    /// Where the resources come from, for reloads.
    pub sources: Sources,
    /// The resources to serve at start.
    pub resources: Vec<Resource>,
    /// Where to serve /metrics, /healthz and /readyz, if at all.
    pub metrics_address: Option<SocketAddr>,
    /// Where the runtime reads CDI specs.
    pub cdi_dir: PathBuf,
    /// The driver name: ResourceSlices' `spec.driver`, the plugin watcher's plugin name.
    pub driver: String,
    /// Our node's name, from the downward API.
    pub node_name: String,
    /// The ServiceAccount credentials (token, ca.crt).
    pub credentials: PathBuf,
}

/// Why DRA mode stopped, or could not start.
#[allow(missing_docs)]
#[derive(Debug, thiserror::Error)]
pub enum DraError {
    #[error("the DRA driver name {0:?} is not a DNS subdomain")]
    DriverName(String),
    #[error("the node name {0:?} is not a DNS subdomain: set KDP_NODE_NAME from spec.nodeName")]
    NodeName(String),
    #[error("cannot find the kubelet's plugin watcher directory {path}")]
    Registry {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot create our socket directory {path}")]
    SocketDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot reach the API server")]
    Kube(#[from] KubeError),
    #[error("cannot start the {0} thread")]
    Spawn(&'static str, #[source] io::Error),
    #[error(transparent)]
    Inotify(#[from] InotifyError),
    #[error(transparent)]
    Http(#[from] HttpError),
    #[error("cannot take the DRA driver's lock")]
    Lock(#[source] LockError),
    #[error("cannot serve the DRAPlugin API")]
    Serve(#[source] Box<ServerError>),
    #[error("the directory {0}, which holds our sockets, was removed; exiting so that we start again cleanly")]
    SocketDirGone(PathBuf),
    #[error("the inotify thread stopped; exiting rather than miss device changes")]
    InotifyFailed,
    #[error("the {0} thread panicked; exiting rather than go on without it")]
    ThreadPanicked(String),
}

/// Serves every configured resource as a DRA driver until SIGTERM or SIGINT.
pub fn run(config: Config) -> Result<(), DraError> {
    if !device::is_dns_subdomain(&config.driver) {
        return Err(DraError::DriverName(config.driver));
    }
    if config.node_name.is_empty() || !device::is_dns_subdomain(&config.node_name) {
        return Err(DraError::NodeName(config.node_name));
    }
    let registry = config.kubelet_dir.join(REGISTRY_DIR);
    std::fs::metadata(&registry).map_err(|source| DraError::Registry {
        path: registry.clone(),
        source,
    })?;
    let socket_dir = config.kubelet_dir.join(WATCHER_SOCKET_DIR);
    std::fs::create_dir_all(&socket_dir).map_err(|source| DraError::SocketDir {
        path: socket_dir.clone(),
        source,
    })?;
    let client = Client::in_cluster(&config.credentials)?;
    let pool = Pool {
        driver: config.driver.clone(),
        node_name: config.node_name.clone(),
    };

    let (events_tx, events) = crossbeam_channel::unbounded();
    let mut threads = Threads::default();
    threads.push(signals::spawn(events_tx.clone()).map_err(|e| DraError::Spawn("signals", e))?);
    let metrics = Arc::new(Metrics::new());
    metrics.track(&config.driver);
    metrics.started();
    let http = match config.metrics_address {
        Some(address) => Some(HttpServer::start(address, &metrics, &events_tx)?),
        None => None,
    };
    let targets: Vec<WatchTarget> = config
        .resources
        .iter()
        .chain(&config.sources.late)
        .flat_map(Resource::watch_targets)
        .collect();
    let lock_targets = vec![WatchTarget {
        dir: socket_dir.join(crate::lock::LOCK_DIR),
        name: glob::Pattern::new("*.lock").expect("a constant pattern"),
    }];
    let inotify = InotifyThread::spawn(
        &socket_dir,
        &[registry.as_path()],
        targets,
        lock_targets,
        config.sources.file.as_deref(),
        events_tx.clone(),
    )?;

    let result = match wait_for_lock(&socket_dir, &events, &metrics, &config.driver) {
        Ok(Some(lock)) => serve(
            &config,
            client,
            pool,
            &socket_dir,
            &registry,
            &events_tx,
            &events,
            &metrics,
            &inotify,
        )
        .map(|()| drop(lock)),
        Ok(None) => Ok(()),
        Err(e) => Err(e),
    };
    inotify.stop();
    if let Some(http) = http {
        http.stop();
    }
    threads.stop_all();
    info!("stopped");
    result
}

/// The driver's lock, once no other instance on the node holds it; `None` if told to stop first.
/// Two drivers of one name on one node would publish over each other's slices.
fn wait_for_lock(
    socket_dir: &Path,
    events: &Receiver<Event>,
    metrics: &Metrics,
    driver: &str,
) -> Result<Option<SocketLock>, DraError> {
    loop {
        match SocketLock::try_acquire(socket_dir, "dra") {
            Ok(lock) => {
                metrics.serving(driver);
                return Ok(Some(lock));
            }
            Err(LockError::Held { holder, .. }) => {
                info!("another instance serves the DRA driver ({holder}); waiting for it to stop");
                metrics.standby(driver, &holder);
            }
            Err(e) => return Err(DraError::Lock(e)),
        }
        loop {
            match events.recv() {
                Ok(Event::LocksChanged) => break,
                Ok(Event::Shutdown(signal)) => {
                    info!("{signal}: stopping");
                    return Ok(None);
                }
                Ok(Event::ThreadPanicked(name)) => return Err(DraError::ThreadPanicked(name)),
                Ok(Event::InotifyFailed) => return Err(DraError::InotifyFailed),
                Ok(_) => {}
                Err(_) => return Ok(None),
            }
        }
    }
}

/// The devices found now and their DRA view; the CDI specs rewritten to match.
struct Devices {
    sys_root: PathBuf,
    resources: Vec<Resource>,
    cdi: SpecFiles,
    latest: Arc<Vec<DraDevice>>,
}

impl Devices {
    fn refresh(&mut self) -> Option<Arc<Vec<DraDevice>>> {
        let found: Vec<(Resource, Vec<Device>)> = self
            .resources
            .iter()
            .map(|r| {
                // CDI is how DRA hands devices to the runtime: always on here.
                let mut r = r.clone();
                r.cdi = true;
                let devices = r.discover(&self.sys_root);
                (r, devices)
            })
            .collect();
        for gone in self.cdi.names() {
            if !found.iter().any(|(r, _)| r.resource_name == gone) {
                self.cdi.withdraw(&gone);
            }
        }
        for (r, devices) in &found {
            if let Err(e) = self.cdi.publish(r, devices) {
                error!("{}", crate::error_chain(&e));
            }
        }
        let numbers: Vec<Vec<Option<(u64, u64)>>> = found
            .iter()
            .map(|(_, devices)| devices.iter().map(numbers_of).collect())
            .collect();
        let view: Vec<model::Found<'_>> = found
            .iter()
            .zip(numbers)
            .map(|((resource, devices), numbers)| model::Found {
                resource,
                devices,
                numbers,
            })
            .collect();
        let latest = model::dra_devices(&view);
        if *self.latest == latest {
            return None;
        }
        let healthy = latest.iter().filter(|d| d.healthy).count();
        info!(
            "{} devices ({healthy} healthy) in {} resources",
            latest.len(),
            found.len()
        );
        self.latest = Arc::new(latest);
        Some(Arc::clone(&self.latest))
    }
}

/// The device numbers of a device's first node, if it is a device node now.
fn numbers_of(device: &Device) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let node = device.nodes.first()?;
    let meta = std::fs::metadata(&node.host_path).ok()?;
    let rdev = meta.rdev();
    (rdev != 0).then(|| (device::major(rdev), device::minor(rdev)))
}

#[allow(clippy::too_many_arguments)]
fn serve(
    config: &Config,
    client: Client,
    pool: Pool,
    socket_dir: &Path,
    registry: &Path,
    events_tx: &Sender<Event>,
    events: &Receiver<Event>,
    metrics: &Arc<Metrics>,
    inotify: &InotifyThread,
) -> Result<(), DraError> {
    let (env, cq_exit) = crate::rpc::environment();
    let prepare = PrepareThread::spawn(
        client.clone(),
        pool.clone(),
        &socket_dir.join(CHECKPOINT),
        events_tx.clone(),
    )
    .map_err(|e| DraError::Spawn("prepare", e))?;
    let slices = SlicesThread::spawn(client, pool, Arc::clone(metrics), events_tx.clone())
        .map_err(|e| DraError::Spawn("slices", e))?;
    let mut devices = Devices {
        sys_root: config.sys_root.clone(),
        resources: config.resources.clone(),
        cdi: SpecFiles::complete(&config.cdi_dir),
        latest: Arc::new(Vec::new()),
    };
    let first = devices
        .refresh()
        .unwrap_or_else(|| Arc::clone(&devices.latest));
    prepare.devices(Arc::clone(&first));
    let health: health::Devices = Arc::new(Broadcast::new(Arc::clone(&first)));
    slices.send(SlicesCommand::Publish(first));

    let endpoint = socket_dir.join(SOCKET);
    let registration = registry.join(format!("kdp-dra-{}.sock", config.driver));
    let start_server = || {
        let service = service::DraService::new(prepare.jobs());
        let reports = health::HealthService::new(Arc::clone(&health), config.node_name.clone());
        let watcher = WatcherService::dra(&config.driver, &endpoint, events_tx.clone());
        ResourceServer::start(
            Arc::clone(&env),
            vec![
                proto::dra::v1::create_dra_plugin(service.clone()),
                proto::dra::v1beta1::create_dra_plugin(service),
                proto::dra_health::v1::create_dra_resource_health(reports.clone()),
                proto::dra_health::v1alpha1::create_dra_resource_health(reports),
                proto::pluginregistration::create_registration(watcher),
            ],
            &[endpoint.clone(), registration.clone()],
        )
        .map_err(|e| DraError::Serve(Box::new(e)))
    };
    let mut server = Some(start_server()?);
    info!(
        "serving DRA driver {} on {} for node {}",
        config.driver,
        endpoint.display(),
        config.node_name
    );

    // The health streams hear of every change, and of the unchanged list once per REFRESH.
    let mut refresh_at = Instant::now() + health::REFRESH;
    let result = loop {
        let event = match events.recv_deadline(refresh_at) {
            Ok(event) => event,
            Err(RecvTimeoutError::Timeout) => {
                health.publish(health.latest());
                refresh_at = Instant::now() + health::REFRESH;
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => break Ok(()),
        };
        match event {
            Event::DevicesChanged | Event::Resync | Event::ConfigChanged | Event::Reload => {
                if matches!(event, Event::ConfigChanged | Event::Reload | Event::Resync)
                    && reload(&config.sources, &mut devices, metrics)
                {
                    // New resources may have their nodes in directories not watched yet.
                    inotify.set_targets(
                        devices
                            .resources
                            .iter()
                            .flat_map(Resource::watch_targets)
                            .collect(),
                    );
                }
                if let Some(latest) = devices.refresh() {
                    prepare.devices(Arc::clone(&latest));
                    health.publish(Arc::clone(&latest));
                    refresh_at = Instant::now() + health::REFRESH;
                    slices.send(SlicesCommand::Publish(latest));
                }
            }
            Event::Registered(_) => {
                metrics.registered(&config.driver);
                // A kubelet that registers us again may have just wiped our slices.
                slices.send(SlicesCommand::Check);
            }
            Event::RegistrationRefused { error, .. } => {
                error!(
                    "the kubelet refused the DRA driver {}: {error}",
                    config.driver
                );
                metrics.refused(&config.driver, &error);
            }
            Event::SocketRemoved(_) => {
                if server.as_ref().is_some_and(|s| !s.socket_intact()) {
                    warn!("one of our sockets was removed; serving on fresh ones");
                    if let Some(old) = server.take() {
                        old.stop();
                    }
                    server = Some(start_server()?);
                }
            }
            Event::PluginDirGone(path) => break Err(DraError::SocketDirGone(path)),
            Event::InotifyFailed => break Err(DraError::InotifyFailed),
            Event::ThreadPanicked(name) => break Err(DraError::ThreadPanicked(name)),
            Event::Shutdown(signal) => {
                info!("{signal}: stopping");
                break Ok(());
            }
            Event::KubeletSocketCreated | Event::KubeletSocketRemoved | Event::LocksChanged => {}
        }
    };
    // Health streams end with OK first: the kubelet takes that for a driver that stopped.
    health.close();
    if let Some(server) = server {
        server.stop();
    }
    prepare.stop();
    slices.stop();
    // A spec that a prepared claim names stays: its containers may restart while we are down,
    // and the runtime resolves their devices from the spec each time. The rest go (when the
    // driver is uninstalled, with no device pods left, that is all of them).
    let checkpoint = Checkpoint::load(&socket_dir.join(CHECKPOINT));
    let in_use = checkpoint.kinds_in_use();
    for name in devices.cdi.names() {
        if in_use.contains(&name) {
            devices.cdi.forget(&name);
        }
    }
    drop(devices);
    checkpoint.remove_if_empty();
    cq_exit.wait(env);
    result
}

/// Reads the configuration again; a bad one is refused whole and the old one stays. Whether
/// the resources changed.
fn reload(sources: &Sources, devices: &mut Devices, metrics: &Metrics) -> bool {
    if sources.file.is_none() {
        return false;
    }
    match sources.load() {
        Ok(resources) => {
            metrics.reloaded(true);
            if resources == devices.resources {
                return false;
            }
            info!("applying the configuration: {} resources", resources.len());
            devices.resources = resources;
            true
        }
        Err(e) => {
            metrics.reloaded(false);
            error!(
                "{}; still serving the configuration before it",
                crate::error_chain(&e)
            );
            false
        }
    }
}
