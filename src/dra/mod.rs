//! The DRA frontend (main thread): the same devices served as a Dynamic Resource Allocation
//! driver instead of a device plugin. The kubelet finds us through its plugin watcher (type
//! DRAPlugin) and calls NodePrepareResources / NodeUnprepareResources on one socket that serves
//! both API versions; the scheduler learns of the devices from the ResourceSlices we publish; the
//! runtime injects them from our CDI specs. The control loop decides when to serve, retry, stand
//! by and stop, as for the device plugin; this file does it for the one endpoint, the driver.
//!
//! Threads it runs while it holds the driver's lock: "slices" and "slice-watch" ([`slices`]: the
//! API server), "prepare" ([`claims`]: the kubelet's batches, the claims, the checkpoint); its
//! services ([`service`], and [`health`]'s streams) run on gRPC's completion-queue thread.

pub mod claims;
pub mod health;
pub mod kube;
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

/// The socket the plugin watcher finds, named after the driver so an operator can tell whose it
/// is (cut and hashed when the name is long, like a resource's).
fn registration_name(driver: &str) -> String {
    let name = format!("dra-{driver}");
    layout::short_socket_name(&name, &name, driver, layout::MAX_REGISTRATION_NAME)
}

/// Our DRAPlugin socket's file name, in our own directory under `plugins/`.
pub fn socket_name(driver: &str) -> String {
    format!("{SOCKET_PREFIX}{}.sock", stem(driver))
}

/// The prepared claims' file name, beside the socket.
pub fn checkpoint_name(driver: &str) -> String {
    format!("{}-checkpoint.json", stem(driver))
}

/// What runs while we hold the driver's lock.
struct Owned {
    lock: SocketLock,
    prepare: PrepareThread,
    slices: SlicesThread,
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
    /// CDI specs, written only while we own the driver.
    cdi: SpecFiles,
    owned: Option<Owned>,
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
        let endpoint = socket_dir.join(socket_name(&settings.driver));
        let registration = registry.join(registration_name(&settings.driver));
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

    /// Describes the devices to the runtime (CDI specs), before anyone can be given them; only
    /// while we own the driver. The spec of a resource no longer configured stays while a
    /// prepared claim names it: the runtime reads it again each time one of the claim's
    /// containers starts, and a container that restarts without it cannot start. It goes at the
    /// first look after the last such claim is unprepared (a device change or the periodic
    /// refresh). A spec someone else deleted is written again.
    fn describe(&mut self) {
        if self.owned.is_none() {
            return;
        }
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
        for (r, devices) in &self.found {
            if let Err(e) = self.cdi.publish(r, devices) {
                error!("{}", crate::error::error_chain(&e));
            }
        }
        for e in self.cdi.restore_missing() {
            error!("{}", crate::error::error_chain(&e));
        }
    }

    /// Takes the driver's lock and starts the threads that need it.
    fn own(&mut self) -> Result<(), ServeError> {
        let failed = |source: Box<dyn std::error::Error + Send + Sync>| ServeError::Failed {
            endpoint: self.settings.driver.clone(),
            source,
        };
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
            Err(e) => return Err(failed(Box::new(e))),
        };
        let prepare = PrepareThread::spawn(
            self.client.clone(),
            self.pool.clone(),
            &self.checkpoint,
            Arc::clone(&self.devices),
            Arc::clone(&self.metrics),
            self.events.clone(),
        )
        .map_err(|e| failed(Box::new(e)))?;
        let slices = match SlicesThread::spawn(
            self.client.clone(),
            self.pool.clone(),
            Arc::clone(&self.devices),
            Arc::clone(&self.metrics),
            self.events.clone(),
        ) {
            Ok(slices) => slices,
            Err(e) => {
                prepare.stop();
                return Err(failed(Box::new(e)));
            }
        };
        self.owned = Some(Owned {
            lock,
            prepare,
            slices,
        });
        self.describe();
        Ok(())
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
        if self.owned.is_none() {
            self.own()?;
        }
        let service = service::DraService::new(
            self.owned
                .as_ref()
                .map(|owned| owned.prepare.jobs())
                .expect("owned just above"),
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
        let Some(owned) = self.owned.take() else {
            return;
        };
        owned.prepare.stop();
        owned.slices.stop();
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
        drop(owned.lock);
    }

    fn keep_locks(&mut self) -> Vec<String> {
        let Some(owned) = &mut self.owned else {
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
                // The other instance publishes the same pool and writes the same checkpoint and
                // CDI specs now: stop our threads and leave every shared file to it.
                if let Some(owned) = self.owned.take() {
                    owned.prepare.stop();
                    owned.slices.stop();
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
            owned.slices.send(SlicesCommand::Check);
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
        self.owned.as_ref().map(|_| self.refresh_at)
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
        assert_eq!(socket_name(DOMAIN), "kdp-dra.sock");
        assert_eq!(checkpoint_name(DOMAIN), "dra-checkpoint.json");
        let gpu = socket_name("gpu.example.com");
        assert_ne!(gpu, socket_name(DOMAIN));
        assert_ne!(gpu, socket_name("gpu.example.org"));
        assert_eq!(
            gpu,
            socket_name("gpu.example.com"),
            "the same after a restart"
        );
        assert_ne!(checkpoint_name("gpu.example.com"), checkpoint_name(DOMAIN));
        // Short whatever the name's length, so the endpoint fits under the default root.
        let longest = format!("{}.example.com", "d".repeat(51));
        let endpoint = Path::new("/var/lib/kubelet")
            .join(WATCHER_SOCKET_DIR)
            .join(socket_name(&longest));
        assert!(layout::check_bindable(&longest, &endpoint).is_ok());
        // The registration socket too, under MicroK8s's root; the default keeps its name.
        assert_eq!(
            registration_name(DOMAIN),
            "kdp-dra-devices.anza-labs.dev.sock"
        );
        let microk8s = Path::new("/var/snap/microk8s/common/var/lib/kubelet");
        let registration = microk8s
            .join(REGISTRY_DIR)
            .join(registration_name(&longest));
        assert!(layout::check_bindable(&longest, &registration).is_ok());
        assert_ne!(
            registration_name(&longest),
            registration_name("x.example.com")
        );
    }
}
