//! The DRA frontend (main thread): the same devices served as a Dynamic Resource Allocation
//! driver instead of a device plugin. The kubelet finds us through its plugin watcher (type
//! DRAPlugin) and calls NodePrepareResources / NodeUnprepareResources on one socket that serves
//! both API versions; the scheduler learns of the devices from the ResourceSlices we publish; the
//! runtime injects them from our CDI specs. The control loop decides when to serve, retry, stand
//! by and stop, as for the device plugin; this file does it for the one endpoint, the driver.
//!
//! During a rolling update two instances serve the kubelet at once, on sockets named after their
//! pods (kubelet 1.33 and later; [`kubelet`] finds out): both prepare claims, in turns at one
//! checkpoint; one, the holder of the driver's lock, publishes the slices.
//!
//! Threads it runs: while it holds the driver's lock, "slices" and "slice-watch" ([`slices`]: the
//! API server); while it serves, "prepare" and "claim-reader-N" ([`claims`]: the kubelet's
//! batches, the claims, the checkpoint); once, "kubelet-release" ([`kubelet`]). Its services ([`service`], and
//! [`health`]'s streams) run on gRPC's completion-queue thread.

pub mod claims;
pub mod health;
pub mod kube;
pub mod kubelet;
pub mod model;
pub mod service;
pub mod slices;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::Sender;
use grpcio::Environment;
use log::{debug, error, info, warn};

use crate::broadcast::Broadcast;
use crate::cdi::SpecFiles;
use crate::control::{Frontend, ServeError};
use crate::device::{self, Device, Inventory, Resource, DOMAIN};
use crate::event::Event;
use crate::layout::{self, LayoutError, REGISTRY_DIR, SOCKET_PREFIX, WATCHER_SOCKET_DIR};
use crate::lock::{LockError, SocketLock};
use crate::metrics::Metrics;
use crate::proto;
use crate::registration::plugin_watcher::WatcherService;
use crate::server::ResourceServer;

use claims::{Checkpoint, PrepareThread};
use kube::{Client, KubeError};
use model::Latest;
use slices::{Pool, SlicesCommand, SlicesThread};

/// What DRA mode serves as, and where.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The kubelet's root directory (holding `plugins/` and `plugins_registry/`).
    pub kubelet_dir: PathBuf,
    /// The driver name: ResourceSlices' `spec.driver`, the plugin watcher's plugin name.
    pub driver: String,
    /// Our node's name, from the downward API.
    pub node_name: String,
    /// The ServiceAccount credentials (token, ca.crt).
    pub credentials: PathBuf,
    /// Our pod's UID, from the downward API: with it, a rolling update's new instance serves
    /// beside the old one on sockets of its own (kubelet 1.33 and later); without it, one
    /// instance serves at a time.
    pub pod_uid: Option<String>,
}

/// Why the DRA frontend cannot start. Names the operator must fix are told apart
/// ([`DraError::is_configuration`]).
#[allow(missing_docs)]
#[derive(Debug, thiserror::Error)]
pub enum DraError {
    #[error("the DRA driver name {0:?} is not a DNS subdomain of at most 63 characters")]
    DriverName(String),
    #[error("the node name {0:?} is not a DNS subdomain: set KDP_NODE_NAME from spec.nodeName")]
    NodeName(String),
    #[error(transparent)]
    SocketPath(LayoutError),
    #[error("cannot find the kubelet's plugin watcher directory {path}")]
    Registry {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create our socket directory {path}")]
    SocketDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot reach the API server")]
    Kube(#[from] KubeError),
    #[error("{resource}: {problem}")]
    Resource { resource: String, problem: String },
    #[error("cannot start the thread that looks up the kubelet's release")]
    Lookup(#[source] std::io::Error),
}

impl DraError {
    /// Whether the operator's settings are at fault (exit code 2), not the node.
    pub fn is_configuration(&self) -> bool {
        matches!(
            self,
            DraError::DriverName(_)
                | DraError::NodeName(_)
                | DraError::SocketPath(_)
                | DraError::Resource { .. }
        )
    }
}

/// Whether DRA mode can serve `resource`: every resource is described to the runtime in CDI
/// here, whose kinds must start with a letter (a name like `9p` would make a spec the runtime
/// refuses, and no claim of it could start).
pub fn check_resource(resource: &Resource) -> Result<(), DraError> {
    crate::cdi::check_kind(&resource.resource_name).map_err(|problem| DraError::Resource {
        resource: resource.resource_name.clone(),
        problem: format!("DRA mode describes every device in CDI: {problem}"),
    })
}

/// The file names of one driver's socket, lock and checkpoint: two drivers on one node never
/// share them. The default driver keeps the short names it always had; any other adds a hash of
/// its name, which keeps the socket path short whatever the name's length.
fn stem(driver: &str) -> String {
    if driver == DOMAIN {
        "dra".to_owned()
    } else {
        format!("dra-{:08x}", device::fnv1a(driver.as_bytes()) as u32)
    }
}

/// An instance's tag in the names of its sockets and lock, during rolling updates: its pod
/// UID's first eight hex digits (what `kubectl get pod -o jsonpath='{.metadata.uid}'` starts
/// with), or a hash of the UID when that is not a UUID. Short, so every name fits the socket
/// path's limit under any kubelet root we support.
fn instance_tag(pod_uid: &str) -> String {
    let head: String = pod_uid.chars().take(8).collect();
    if head.len() == 8
        && head
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        head
    } else {
        format!("{:08x}", device::fnv1a(pod_uid.as_bytes()) as u32)
    }
}

/// The name of the lock an instance holds while it serves (`dra~1a2b3c4d`): no stem holds `~`,
/// so it is never a driver's lock; another instance reads from it that this one is alive.
fn instance_lock_name(driver: &str, tag: &str) -> String {
    format!("{}~{tag}", stem(driver))
}

/// The socket the plugin watcher finds, named after the driver so an operator can tell whose it
/// is (cut and hashed when the name is long, like a resource's), and after the instance's tag
/// when instances serve side by side.
fn registration_name(driver: &str, tag: Option<&str>) -> String {
    let readable = format!("dra-{driver}");
    let (whole, identity) = match tag {
        Some(tag) => (format!("{readable}~{tag}"), format!("{driver}~{tag}")),
        None => (readable.clone(), driver.to_owned()),
    };
    layout::short_socket_name(&whole, &readable, &identity, layout::MAX_REGISTRATION_NAME)
}

/// Our DRAPlugin socket's file name, in our own directory under `plugins/`.
pub fn socket_name(driver: &str, tag: Option<&str>) -> String {
    match tag {
        Some(tag) => format!("{SOCKET_PREFIX}{}.sock", instance_lock_name(driver, tag)),
        None => format!("{SOCKET_PREFIX}{}.sock", stem(driver)),
    }
}

/// The prepared claims' file name, beside the socket.
pub fn checkpoint_name(driver: &str) -> String {
    format!("{}-checkpoint.json", stem(driver))
}

/// What runs while we hold the driver's lock: we publish its slices. One instance at a time.
struct Owned {
    lock: SocketLock,
    slices: SlicesThread,
}

/// What runs while we serve the kubelet. During a rolling update two instances do, taking turns
/// at the one checkpoint; each holds a lock of its own meanwhile, which says it is alive.
struct Serving {
    prepare: PrepareThread,
    instance_lock: Option<SocketLock>,
}

/// The DRA driver on the real node.
pub struct Driver {
    settings: Settings,
    socket_dir: PathBuf,
    endpoint: PathBuf,
    registration: PathBuf,
    checkpoint: PathBuf,
    client: Client,
    pool: Pool,
    env: Arc<Environment>,
    metrics: Arc<Metrics>,
    events: Sender<Event>,
    /// The resources as DRA serves them (CDI always on), with their devices.
    found: Vec<(Resource, Vec<Device>)>,
    /// Their DRA view, which the prepare thread, the slices and the health streams read.
    devices: Latest,
    /// CDI specs, written while we serve, withdrawn only while we own the driver and no other
    /// instance serves.
    cdi: SpecFiles,
    owned: Option<Owned>,
    serving: Option<Serving>,
    /// Our tag when instances may serve side by side (see [`instance_tag`]).
    tag: Option<String>,
    /// Whether our kubelet keeps two instances of a driver; looked up only with a tag.
    kubelet: Option<kubelet::KubeletRelease>,
    /// Whether another instance served beside us at the last look.
    others_were_serving: bool,
    /// When the health streams get the unchanged list again.
    refresh_at: Instant,
}

impl Driver {
    /// Checks the names and directories and reads the credentials; serves nothing yet.
    pub fn new(
        settings: Settings,
        cdi_dir: &std::path::Path,
        env: Arc<Environment>,
        metrics: Arc<Metrics>,
        events: Sender<Event>,
    ) -> Result<Driver, DraError> {
        if !device::is_dns_subdomain(&settings.driver) || settings.driver.len() > 63 {
            return Err(DraError::DriverName(settings.driver));
        }
        if settings.node_name.is_empty() || !device::is_dns_subdomain(&settings.node_name) {
            return Err(DraError::NodeName(settings.node_name));
        }
        let registry = settings.kubelet_dir.join(REGISTRY_DIR);
        let socket_dir = settings.kubelet_dir.join(WATCHER_SOCKET_DIR);
        let tag = settings
            .pod_uid
            .as_deref()
            .filter(|uid| !uid.is_empty())
            .map(instance_tag);
        let endpoint = socket_dir.join(socket_name(&settings.driver, tag.as_deref()));
        let registration = registry.join(registration_name(&settings.driver, tag.as_deref()));
        for path in [&endpoint, &registration] {
            layout::check_bindable(&settings.driver, path).map_err(DraError::SocketPath)?;
        }
        std::fs::metadata(&registry).map_err(|source| DraError::Registry {
            path: registry.clone(),
            source,
        })?;
        std::fs::create_dir_all(&socket_dir).map_err(|source| DraError::SocketDir {
            path: socket_dir.clone(),
            source,
        })?;
        let client = Client::in_cluster(&settings.credentials)?;
        let kubelet = match tag {
            Some(_) => Some(
                kubelet::KubeletRelease::look_up(
                    client.clone(),
                    settings.node_name.clone(),
                    events.clone(),
                )
                .map_err(DraError::Lookup)?,
            ),
            None => None,
        };
        let pool = Pool {
            driver: settings.driver.clone(),
            node_name: settings.node_name.clone(),
        };
        Ok(Driver {
            checkpoint: socket_dir.join(checkpoint_name(&settings.driver)),
            cdi: SpecFiles::complete(cdi_dir),
            settings,
            socket_dir,
            endpoint,
            registration,
            client,
            pool,
            env,
            metrics,
            events,
            found: Vec::new(),
            devices: Arc::new(Broadcast::new(Arc::new(Vec::new()))),
            owned: None,
            serving: None,
            tag,
            kubelet,
            others_were_serving: false,
            refresh_at: Instant::now() + health::REFRESH,
        })
    }

    /// The directories inotify must watch for our sockets: ours and the plugin watcher's.
    pub fn socket_dirs(&self) -> (PathBuf, PathBuf) {
        (
            self.socket_dir.clone(),
            self.settings.kubelet_dir.join(REGISTRY_DIR),
        )
    }

    /// Describes the devices to the runtime (CDI specs), before anyone can be given them; while
    /// we serve. The spec of a resource no longer configured stays while a prepared claim names
    /// it: the runtime reads it again each time one of the claim's containers starts, and a
    /// container that restarts without it cannot start. It goes at the first look after the last
    /// such claim is unprepared (a device change or the periodic refresh), by the instance that
    /// owns the driver, and only while no other serves: one beside us (a rolling update's, whose
    /// configuration may differ) writes the specs of its own resources, and prepares claims of
    /// them. A spec someone else deleted is written again.
    fn describe(&mut self) {
        if self.serving.is_none() {
            return;
        }
        if self.owned.is_some() && !self.others_serve() {
            let in_use = Checkpoint::load(&self.checkpoint).kinds_in_use();
            for gone in self.cdi.names() {
                if self.found.iter().any(|(r, _)| r.resource_name == gone) {
                    continue;
                }
                if in_use.contains(&gone) {
                    debug!("keeping the CDI spec of {gone}, no longer configured: a prepared claim names it");
                } else {
                    self.cdi.withdraw(&gone);
                }
            }
        }
        for (r, devices) in &self.found {
            if let Err(e) = self.cdi.publish(r, devices) {
                error!("{}", crate::error::error_chain(&e));
            }
        }
        for e in self.cdi.restore_missing() {
            error!("{}", crate::error::error_chain(&e));
        }
    }

    /// Whether another instance of our driver serves the kubelet on this node now: one that
    /// holds its instance lock (only instances with a tag take one).
    fn others_serve(&self) -> bool {
        let prefix = format!("{}~", stem(&self.settings.driver));
        let ours = self
            .tag
            .as_deref()
            .map(|tag| instance_lock_name(&self.settings.driver, tag));
        let Ok(entries) = std::fs::read_dir(self.socket_dir.join(crate::lock::LOCK_DIR)) else {
            return false;
        };
        entries.flatten().any(|entry| {
            let name = entry.file_name();
            let Some(lock) = name.to_str().and_then(|n| n.strip_suffix(".lock")) else {
                return false;
            };
            lock.starts_with(&prefix)
                && ours.as_deref() != Some(lock)
                && SocketLock::is_held(&self.socket_dir, lock)
        })
    }

    /// Whether we may serve while another instance owns the driver: we have a tag, our kubelet
    /// keeps two instances of a driver side by side, and the owner is an instance that takes
    /// turns at the checkpoint (one that holds an instance lock; an earlier release does not).
    fn may_serve_beside(&self) -> bool {
        self.tag.is_some()
            && self
                .kubelet
                .as_ref()
                .and_then(kubelet::KubeletRelease::side_by_side)
                == Some(true)
            && self.others_serve()
    }

    /// Removes the sockets of instances of our driver that are gone without removing them
    /// (killed, or the node lost power): an instance's sockets outlive it only when its lock is
    /// free, since it takes the lock before it binds them. The plugin watcher would otherwise
    /// dial a dead registration socket after every kubelet restart.
    fn sweep_stale_sockets(&self) {
        let Some(tag) = self.tag.as_deref() else {
            return;
        };
        let driver = &self.settings.driver;
        let prefix = format!("{SOCKET_PREFIX}{}~", stem(driver));
        let Ok(entries) = std::fs::read_dir(&self.socket_dir) else {
            return;
        };
        let registry = self.settings.kubelet_dir.join(REGISTRY_DIR);
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(other) = name
                .to_str()
                .and_then(|n| n.strip_prefix(&prefix))
                .and_then(|n| n.strip_suffix(".sock"))
            else {
                continue;
            };
            if other == tag
                || SocketLock::is_held(&self.socket_dir, &instance_lock_name(driver, other))
            {
                continue;
            }
            for path in [
                entry.path(),
                registry.join(registration_name(driver, Some(other))),
            ] {
                match std::fs::remove_file(&path) {
                    Ok(()) => info!(
                        "removed {}, left by an instance that is gone",
                        path.display()
                    ),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => warn!(
                        "cannot remove {}, left by an instance that is gone: {e}",
                        path.display()
                    ),
                }
            }
        }
    }

    /// Takes the driver's lock and starts publishing its slices.
    fn own(&mut self) -> Result<(), ServeError> {
        // Named by the stem alone: `dra.lock` for the default driver, as earlier releases name
        // it, so that during an upgrade we stand by while an earlier release's instance serves.
        let lock = match SocketLock::try_acquire(&self.socket_dir, &stem(&self.settings.driver)) {
            Ok(lock) => lock,
            Err(source @ LockError::Held { .. }) => {
                return Err(ServeError::Held {
                    endpoint: self.settings.driver.clone(),
                    source,
                })
            }
            Err(e) => return Err(self.failed(Box::new(e))),
        };
        let slices = SlicesThread::spawn(
            self.client.clone(),
            self.pool.clone(),
            Arc::clone(&self.devices),
            Arc::clone(&self.metrics),
            self.events.clone(),
        )
        .map_err(|e| self.failed(Box::new(e)))?;
        self.owned = Some(Owned { lock, slices });
        Ok(())
    }

    /// Starts answering the kubelet's prepares: with a tag, under our instance lock, after
    /// removing what instances that are gone left.
    fn start_serving(&mut self) -> Result<(), ServeError> {
        let instance_lock = match &self.tag {
            Some(tag) => Some(
                SocketLock::try_acquire(
                    &self.socket_dir,
                    &instance_lock_name(&self.settings.driver, tag),
                )
                .map_err(|e| self.failed(Box::new(e)))?,
            ),
            None => None,
        };
        self.sweep_stale_sockets();
        let prepare = PrepareThread::spawn(
            self.client.clone(),
            self.pool.clone(),
            &self.checkpoint,
            Arc::clone(&self.devices),
            Arc::clone(&self.metrics),
            self.events.clone(),
        )
        .map_err(|e| self.failed(Box::new(e)))?;
        self.serving = Some(Serving {
            prepare,
            instance_lock,
        });
        self.others_were_serving = self.others_serve();
        self.describe();
        Ok(())
    }

    /// Takes the driver over from an instance that let it go, while we serve beside it.
    fn take_over(&mut self) {
        match self.own() {
            Ok(()) => {
                info!(
                    "{}: the other instance let the driver go; publishing its slices now",
                    self.settings.driver
                );
                self.describe();
            }
            Err(ServeError::Held { .. }) => {}
            Err(e) => error!("{}", crate::error::error_chain(&e)),
        }
    }

    /// The kubelet forgets every device's health of the driver when any instance's health stream
    /// ends (a rolling update's old pod exiting), and hears of them again only at our next report:
    /// up to `health::REFRESH` of health unknown in its pods' status. So when another instance
    /// stops serving beside us (its lock goes), we report at once.
    fn tell_health_again_if_another_left(&mut self) {
        let others = self.serving.is_some() && self.others_serve();
        if self.others_were_serving && !others {
            debug!("another instance of the driver stopped; reporting every device's health again");
            self.devices.publish(self.devices.latest());
            self.refresh_at = Instant::now() + health::REFRESH;
        }
        self.others_were_serving = others;
    }

    fn stop_publishing(&mut self) {
        if let Some(owned) = self.owned.take() {
            owned.slices.stop();
            drop(owned.lock);
        }
    }

    fn failed(&self, source: Box<dyn std::error::Error + Send + Sync>) -> ServeError {
        ServeError::Failed {
            endpoint: self.settings.driver.clone(),
            source,
        }
    }
}

impl Frontend for Driver {
    type Server = ResourceServer;

    fn endpoints(&self, inventory: &Inventory) -> BTreeMap<String, Vec<String>> {
        // One driver serves every resource, and serves an empty pool too: its slices must say
        // that the node has nothing.
        BTreeMap::from([(
            self.settings.driver.clone(),
            inventory.keys().cloned().collect(),
        )])
    }

    fn check(&self, resource: &Resource) -> Result<(), String> {
        check_resource(resource).map_err(|e| e.to_string())
    }

    fn publish(&mut self, inventory: &Inventory) {
        self.found = inventory
            .values()
            .map(|found| {
                // CDI is how DRA hands devices to the runtime: always on here.
                let mut resource = (*found.resource).clone();
                resource.cdi = true;
                (resource, found.devices.clone())
            })
            .collect();
        let latest = model::dra_devices(&self.found);
        // The runtime first: a claim may be prepared the moment the new list is out.
        self.describe();
        if *self.devices.latest() == latest {
            return;
        }
        let healthy = latest.iter().filter(|d| d.healthy).count();
        info!(
            "{} devices ({healthy} healthy) in {} resources",
            latest.len(),
            self.found.len()
        );
        self.devices.publish(Arc::new(latest));
        self.refresh_at = Instant::now() + health::REFRESH;
        if let Some(owned) = &self.owned {
            owned.slices.send(SlicesCommand::Check);
        }
    }

    fn serve(&mut self, endpoint: &str) -> Result<ResourceServer, ServeError> {
        if self.serving.is_none() {
            if self.owned.is_none() {
                match self.own() {
                    Ok(()) => {}
                    Err(ServeError::Held { .. }) if self.may_serve_beside() => info!(
                        "{}: another instance publishes the driver's slices; serving the kubelet \
                         beside it, taking turns at the prepared claims, until it exits",
                        self.settings.driver
                    ),
                    Err(e) => return Err(e),
                }
            }
            if let Err(e) = self.start_serving() {
                self.stop_publishing();
                return Err(e);
            }
        }
        let service = service::DraService::new(
            self.serving
                .as_ref()
                .map(|serving| serving.prepare.jobs())
                .expect("serving just above"),
            Arc::clone(&self.metrics),
        );
        let reports =
            health::HealthService::new(Arc::clone(&self.devices), self.settings.node_name.clone());
        let watcher =
            WatcherService::dra(&self.settings.driver, &self.endpoint, self.events.clone());
        ResourceServer::start(
            Arc::clone(&self.env),
            vec![
                proto::dra::v1::create_dra_plugin(service.clone()),
                proto::dra::v1beta1::create_dra_plugin(service),
                proto::dra_health::v1::create_dra_resource_health(reports.clone()),
                proto::dra_health::v1alpha1::create_dra_resource_health(reports),
                proto::pluginregistration::create_registration(watcher),
            ],
            &[self.endpoint.clone(), self.registration.clone()],
        )
        .map_err(|source| ServeError::Failed {
            endpoint: endpoint.to_owned(),
            source: Box::new(source),
        })
    }

    fn intact(&self, server: &ResourceServer) -> bool {
        server.socket_intact()
    }

    fn stop(&mut self, _endpoint: &str, server: ResourceServer) {
        server.stop();
    }

    fn release(&mut self, _endpoint: &str) {
        let Some(serving) = self.serving.take() else {
            self.stop_publishing();
            return;
        };
        serving.prepare.stop();
        self.stop_publishing();
        if self.others_serve() {
            // Another instance serves the kubelet on: the specs and the checkpoint are its too.
            for name in self.cdi.names() {
                self.cdi.forget(&name);
            }
        } else {
            // A spec that a prepared claim names stays: its containers may restart while we are
            // down, and the runtime resolves their devices from the spec each time. The rest go
            // (when the driver is uninstalled, with no device pods left, that is all of them).
            let checkpoint = Checkpoint::load(&self.checkpoint);
            let in_use = checkpoint.kinds_in_use();
            for name in self.cdi.names() {
                if in_use.contains(&name) {
                    self.cdi.forget(&name);
                } else {
                    self.cdi.withdraw(&name);
                }
            }
            checkpoint.remove_if_empty();
            // Made again by the next instance's first turn; nothing of ours stays behind.
            let turns = claims::turns_path(&self.checkpoint);
            if let Err(e) = std::fs::remove_file(&turns) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    warn!("cannot remove {}: {e}", turns.display());
                }
            }
        }
        // Last: another instance that sees it go takes the driver over.
        drop(serving.instance_lock);
    }

    fn keep_locks(&mut self) -> Vec<String> {
        self.tell_health_again_if_another_left();
        if let Some(Serving {
            instance_lock: Some(lock),
            ..
        }) = &mut self.serving
        {
            // Others take a socket whose instance lock is free for one left by the dead.
            match lock.keep() {
                Ok(false) => {}
                Ok(true) => warn!(
                    "the lock file {} was deleted under us; took it again",
                    lock.path().display()
                ),
                Err(e) => error!("{}", crate::error::error_chain(&e)),
            }
        }
        let Some(owned) = &mut self.owned else {
            // Serving beside another instance: the one we waited for may have let go.
            if self.serving.is_some() {
                self.take_over();
            }
            return Vec::new();
        };
        match owned.lock.keep() {
            Ok(false) => Vec::new(),
            Ok(true) => {
                warn!(
                    "the lock file {} was deleted under us; took it again",
                    owned.lock.path().display()
                );
                Vec::new()
            }
            Err(LockError::Held { .. }) => {
                // The other instance publishes the same pool now. One that takes turns at the
                // checkpoint with us may serve beside us; any other writes the same checkpoint
                // and CDI specs unguarded: stop our threads and leave every shared file to it.
                self.stop_publishing();
                if self.serving.is_some() && self.may_serve_beside() {
                    info!(
                        "{}: another instance took the driver's lock after its file was deleted \
                         under us; it publishes the slices, and we serve beside it",
                        self.settings.driver
                    );
                    return Vec::new();
                }
                if let Some(serving) = self.serving.take() {
                    serving.prepare.stop();
                }
                for name in self.cdi.names() {
                    self.cdi.forget(&name);
                }
                vec![self.settings.driver.clone()]
            }
            Err(e) => {
                error!(
                    "{}; another instance of the driver may take over beside us",
                    crate::error::error_chain(&e)
                );
                Vec::new()
            }
        }
    }

    fn retire(&mut self, endpoint: &str, server: ResourceServer) {
        // Health streams end with OK first: the kubelet takes that for a driver that stopped.
        self.devices.close();
        server.stop();
        self.release(endpoint);
    }

    fn kubelet_present(&self) -> bool {
        false
    }

    fn register(&mut self, _endpoint: &str, _server: &ResourceServer) {}

    fn register_again(&mut self, _endpoint: &str, _server: &ResourceServer) -> bool {
        // The kubelet holds no stream of a DRA driver's to end.
        false
    }

    fn forget(&mut self, _endpoint: &str) {}

    fn registered(&mut self, _endpoint: &str) {
        // A kubelet that registers us again may have just wiped our slices.
        if let Some(owned) = &self.owned {
            owned.slices.send(SlicesCommand::Verify);
        } else if self.serving.is_some() {
            // Beside the instance that publishes them: what we serve is listed, by it. Ready
            // now, or a surge rollout would never stop the old pod.
            self.metrics.listed(&self.settings.driver);
        }
    }

    fn another_instance_serves(&self, _endpoint: &str) -> bool {
        // One instance of a driver serves at a time; the others stand by on its lock.
        false
    }

    fn endpoint_of_socket(&self, file_name: &OsStr) -> Option<String> {
        let ours = [&self.endpoint, &self.registration]
            .iter()
            .any(|path| path.file_name() == Some(file_name));
        ours.then(|| self.settings.driver.clone())
    }

    fn location(&self, _endpoint: &str) -> PathBuf {
        self.endpoint.clone()
    }

    fn listing(&self) -> &'static str {
        "published its ResourceSlices"
    }

    fn deadline(&self) -> Option<Instant> {
        // The health streams hear of every change, and of the unchanged list once per REFRESH.
        self.serving.as_ref().map(|_| self.refresh_at)
    }

    fn tick(&mut self, now: Instant) {
        self.devices.publish(self.devices.latest());
        self.describe();
        self.refresh_at = now + health::REFRESH;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn a_resource_cdi_cannot_name_is_refused_as_the_operators_to_fix() {
        let config =
            "resources:\n  - name: 9p\n    devices:\n      - path: /dev/null\n  - name: kvm\n";
        let resources =
            crate::config::parse(config, Path::new("c.yaml"), Path::new("/dev")).unwrap();
        let e = check_resource(&resources[0]).unwrap_err();
        assert!(e.is_configuration());
        let text = e.to_string();
        assert!(text.starts_with("devices.anza-labs.dev/9p: "), "{text}");
        assert!(text.contains("start with a letter"), "{text}");
        assert!(check_resource(&resources[1]).is_ok());
    }

    #[test]
    fn each_driver_has_a_socket_and_checkpoint_of_its_own_and_the_default_keeps_its_names() {
        assert_eq!(socket_name(DOMAIN, None), "kdp-dra.sock");
        assert_eq!(checkpoint_name(DOMAIN), "dra-checkpoint.json");
        let gpu = socket_name("gpu.example.com", None);
        assert_ne!(gpu, socket_name(DOMAIN, None));
        assert_ne!(gpu, socket_name("gpu.example.org", None));
        assert_eq!(
            gpu,
            socket_name("gpu.example.com", None),
            "the same after a restart"
        );
        assert_ne!(checkpoint_name("gpu.example.com"), checkpoint_name(DOMAIN));
        // Short whatever the name's length, so the endpoint fits under the default root.
        let longest = format!("{}.example.com", "d".repeat(51));
        let endpoint = Path::new("/var/lib/kubelet")
            .join(WATCHER_SOCKET_DIR)
            .join(socket_name(&longest, None));
        assert!(layout::check_bindable(&longest, &endpoint).is_ok());
        // The registration socket too, under MicroK8s's root; the default keeps its name.
        assert_eq!(
            registration_name(DOMAIN, None),
            "kdp-dra-devices.anza-labs.dev.sock"
        );
        let microk8s = Path::new("/var/snap/microk8s/common/var/lib/kubelet");
        let registration = microk8s
            .join(REGISTRY_DIR)
            .join(registration_name(&longest, None));
        assert!(layout::check_bindable(&longest, &registration).is_ok());
        assert_ne!(
            registration_name(&longest, None),
            registration_name("x.example.com", None)
        );
    }

    #[test]
    fn instances_serving_side_by_side_have_names_of_their_own_that_fit_any_root() {
        let uid = "1a2b3c4d-5e6f-4a7b-8c9d-0e1f2a3b4c5d";
        assert_eq!(instance_tag(uid), "1a2b3c4d");
        // Not a UUID: a hash, the same on every start.
        let odd = instance_tag("Pod/ÜID");
        assert_eq!(odd.len(), 8);
        assert_eq!(odd, instance_tag("Pod/ÜID"));
        assert_ne!(odd, instance_tag("Pod/UID"));
        assert_eq!(
            socket_name(DOMAIN, Some("1a2b3c4d")),
            "kdp-dra~1a2b3c4d.sock"
        );
        assert_eq!(
            registration_name(DOMAIN, Some("1a2b3c4d")),
            "kdp-dra-devices.anza-labs.dev~1a2b3c4d.sock"
        );
        // Never a driver's own names, nor another instance's.
        assert_ne!(
            socket_name(DOMAIN, Some("1a2b3c4d")),
            socket_name(DOMAIN, None)
        );
        assert_ne!(
            registration_name(DOMAIN, Some("1a2b3c4d")),
            registration_name(DOMAIN, Some("9a2b3c4d"))
        );
        let longest = format!("{}.example.com", "d".repeat(51));
        let microk8s = Path::new("/var/snap/microk8s/common/var/lib/kubelet");
        for driver in [DOMAIN, longest.as_str()] {
            let endpoint = microk8s
                .join(WATCHER_SOCKET_DIR)
                .join(socket_name(driver, Some("1a2b3c4d")));
            assert!(layout::check_bindable(driver, &endpoint).is_ok());
            let registration = microk8s
                .join(REGISTRY_DIR)
                .join(registration_name(driver, Some("1a2b3c4d")));
            assert!(layout::check_bindable(driver, &registration).is_ok());
            assert_ne!(
                registration_name(driver, Some("1a2b3c4d")),
                registration_name(driver, Some("9a2b3c4d"))
            );
        }
    }
}
