//! The daemon (main thread): starts the threads, hands every event to the controller, and stops
//! everything in order. The plumbing lives here, with [`LiveNode`], the side effects on the real
//! node; what each event causes is decided in [`control`], and what a reload changes in
//! [`reconcile`].
//!
//! Start order: signals, http (optional), inotify (before any socket, so no deletion or kubelet
//! start slips between watching and serving), register (kubelet-socket mode), then each
//! resource's server. Shutdown runs it backwards: servers, register, inotify, http, signals, and
//! last the completion-queue threads.

pub mod control;
pub mod reconcile;
pub mod state;

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::{RecvTimeoutError, Sender};

use grpcio::Environment;
use log::{error, info};

use crate::cdi::SpecFiles;
use crate::config::{ConfigError, Sources};
use crate::device::{Device, Resource, WatchTarget};
use crate::event::{Event, RegisterCommand, RegisterJob};
use crate::http::{HttpError, HttpServer};
use crate::inotify::{InotifyError, InotifyThread};
use crate::layout::{self, Layout, LayoutError, Mode};
use crate::lock::{self, LockError, SocketLock};
use crate::metrics::Metrics;
use crate::plugin::Plugin;
use crate::proto;
use crate::registration::kubelet_socket::RegisterThread;
use crate::registration::plugin_watcher;
use crate::server::{ResourceServer, ServerError};
use crate::signals;
use crate::thread::Threads;

use control::{Controller, Flow, Node as _};

/// What the daemon serves, and where.
#[derive(Clone, Debug)]
pub struct Config {
    /// The kubelet's device-plugin directory (`--plugin-dir`).
    pub plugin_dir: PathBuf,
    /// Where the kernel's sysfs is, for NUMA nodes.
    pub sys_root: PathBuf,
    /// Where the resources come from, for reloads.
    pub sources: Sources,
    /// The resources to serve at start, as loaded from `sources`.
    pub resources: Vec<Resource>,
    /// Where to serve /metrics, /healthz and /readyz, if at all.
    pub metrics_address: Option<SocketAddr>,
    /// How the kubelet learns of our resources.
    pub registration: Mode,
    /// Where the runtime reads CDI specs.
    pub cdi_dir: PathBuf,
}

/// Why the daemon stopped, or could not start.
#[allow(missing_docs)]
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The kubelet's directories are not where we were told.
    #[error(transparent)]
    Layout(#[from] LayoutError),
    /// Nothing to serve, and no configuration file that could name something later.
    #[error("no resources to serve")]
    NoResources,
    /// The signals thread did not start.
    #[error("cannot start the signals thread")]
    Signals(#[source] io::Error),
    /// The register thread did not start.
    #[error("cannot start the register thread")]
    Register(#[source] io::Error),
    /// The inotify thread did not start.
    #[error(transparent)]
    Inotify(#[from] InotifyError),
    /// The metrics endpoint did not start.
    #[error(transparent)]
    Http(#[from] HttpError),
    /// Another instance serves the resource, or its lock cannot be taken.
    #[error("cannot serve {resource}")]
    Lock {
        /// The resource name.
        resource: String,
        /// Who holds it, or what failed.
        #[source]
        source: LockError,
    },
    /// A resource's server did not start.
    #[error("cannot serve {resource}")]
    Serve {
        /// The resource name.
        resource: String,
        /// What failed.
        #[source]
        source: Box<ServerError>,
    },
    /// The directory of our sockets went away under us.
    #[error("the directory {path}, which holds our sockets, was removed; exiting so that we start again cleanly")]
    PluginDirGone {
        /// The directory that went: the kubelet's device-plugin directory, or in plugin-watcher
        /// mode ours or `plugins_registry/`.
        path: PathBuf,
    },
    /// The inotify thread stopped.
    #[error("the inotify thread stopped; exiting rather than miss kubelet restarts")]
    InotifyFailed,
    /// A thread of ours panicked.
    #[error("the {name} thread panicked; exiting rather than go on without it")]
    ThreadPanicked {
        /// The thread's name.
        name: String,
    },
}

/// Serves every configured resource until SIGTERM or SIGINT.
pub fn run(config: Config) -> Result<(), DaemonError> {
    if config.resources.is_empty()
        && config.sources.file.is_none()
        && config.sources.late.is_empty()
    {
        return Err(DaemonError::NoResources);
    }
    let layout = Layout::resolve(&config.plugin_dir, config.registration)?;
    for resource in &config.resources {
        layout.check(&resource.resource_name)?;
    }

    let (events_tx, events) = crossbeam_channel::unbounded();
    let mut threads = Threads::default();
    threads.push(signals::spawn(events_tx.clone()).map_err(DaemonError::Signals)?);
    let (env, cq_exit) = crate::rpc::environment();
    let metrics = Arc::new(Metrics::new());
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
    let other_socket_dirs: Vec<&std::path::Path> =
        layout.registry_dir.as_deref().into_iter().collect();
    // Another instance's lock file going away is our cue to take over at once (a rollout's
    // overlap), instead of at the next retry.
    let lock_targets = vec![WatchTarget {
        dir: layout.socket_dir.join(crate::lock::LOCK_DIR),
        name: glob::Pattern::new("*.lock").expect("a constant pattern"),
    }];
    let inotify = InotifyThread::spawn(
        &layout.socket_dir,
        &other_socket_dirs,
        targets,
        lock_targets,
        config.sources.file.as_deref(),
        events_tx.clone(),
    )?;
    let register = if layout.dials_kubelet() {
        let thread =
            RegisterThread::spawn(Arc::clone(&env), layout.kubelet_socket(), events_tx.clone())
                .map_err(DaemonError::Register)?;
        Some(thread)
    } else {
        None
    };
    let node = LiveNode {
        layout,
        env: Arc::clone(&env),
        sys_root: config.sys_root,
        sources: config.sources,
        events: events_tx.clone(),
        inotify,
        register,
        locks: HashMap::new(),
        cdi: SpecFiles::new(&config.cdi_dir),
    };
    let mut controller = Controller::new(node, metrics, config.plugin_dir);
    controller.start(config.resources);
    let node = controller.node();
    if node.layout.dials_kubelet() && !node.kubelet_present() {
        info!(
            "waiting for the kubelet: {} does not exist yet",
            node.layout.kubelet_socket().display()
        );
    }
    let result = loop {
        // Without a retry due, nothing wakes this thread but an event.
        let event = match controller.deadline() {
            None => events.recv().map_err(|_| RecvTimeoutError::Disconnected),
            Some(at) => events.recv_deadline(at),
        };
        match event {
            Ok(event) => {
                if let Flow::Stop(end) = controller.handle(event) {
                    break end;
                }
            }
            Err(RecvTimeoutError::Timeout) => controller.retry_due(),
            Err(RecvTimeoutError::Disconnected) => break Ok(()),
        }
    };

    controller.shutdown();
    let node = controller.into_node();
    if let Some(register) = node.register {
        register.stop();
    }
    node.inotify.stop();
    if let Some(http) = http {
        http.stop();
    }
    threads.stop_all();
    // The completion-queue thread ends when the last reference to the environment goes.
    drop(node.env);
    cq_exit.wait(env);
    info!("stopped");
    result
}

/// The real node: servers on real sockets, the register and inotify threads, the file system.
pub struct LiveNode {
    layout: Layout,
    env: Arc<Environment>,
    sys_root: PathBuf,
    sources: Sources,
    /// For the plugin watcher's answers, which come on completion-queue threads.
    events: Sender<Event>,
    inotify: InotifyThread,
    register: Option<RegisterThread>,
    /// The resources whose sockets we own on this node, by resource name: the socket slot we
    /// hold (`layout::SLOTS`) and its lock.
    locks: HashMap<String, (usize, SocketLock)>,
    /// CDI specs of the resources we serve that use CDI; removed when this is dropped.
    cdi: SpecFiles,
}

impl LiveNode {
    /// The first free socket slot of the resource, locked. Sockets of the other slots that no
    /// one holds were left by an instance that was killed, or that ended while another served
    /// (`ResourceServer::stop_leaving_announcement`): removed, so that the plugin watcher stops
    /// dialling them.
    fn take_slot(&self, resource_name: &str) -> Result<(usize, SocketLock), DaemonError> {
        let mut refusal = None;
        for slot in 0..layout::SLOTS {
            let name = layout::slot_socket_name(resource_name, slot);
            match SocketLock::try_acquire(&self.layout.socket_dir, &name) {
                Ok(lock) => {
                    for other in (0..layout::SLOTS).filter(|s| *s != slot) {
                        self.clear_if_stale(resource_name, other);
                    }
                    return Ok((slot, lock));
                }
                Err(e @ LockError::Held { .. }) => refusal = Some(e),
                Err(source) => {
                    return Err(DaemonError::Lock {
                        resource: resource_name.to_owned(),
                        source,
                    })
                }
            }
        }
        Err(DaemonError::Lock {
            resource: resource_name.to_owned(),
            source: refusal.unwrap_or_else(|| LockError::Held {
                path: self.layout.socket_dir.join(lock::LOCK_DIR),
                holder: "unknown".to_owned(),
            }),
        })
    }

    /// Whether another instance holds a socket slot of the resource other than `ours`.
    fn others_serve(&self, resource_name: &str, ours: usize) -> bool {
        (0..layout::SLOTS)
            .filter(|s| *s != ours)
            .any(|s| self.slot_held(resource_name, s))
    }

    /// Whether another instance holds the resource's socket slot `slot`.
    fn slot_held(&self, resource_name: &str, slot: usize) -> bool {
        let name = layout::slot_socket_name(resource_name, slot);
        matches!(
            SocketLock::try_acquire(&self.layout.socket_dir, &name),
            Err(LockError::Held { .. })
        )
    }

    /// Removes the sockets of a slot whose lock is free (held for the check, so that no
    /// instance can bind them meanwhile).
    fn clear_if_stale(&self, resource_name: &str, slot: usize) {
        let name = layout::slot_socket_name(resource_name, slot);
        let Ok(_lock) = SocketLock::try_acquire(&self.layout.socket_dir, &name) else {
            return;
        };
        let endpoint = self.layout.socket_path_in(resource_name, slot);
        let registration = self.layout.registration_path_for(&endpoint);
        for path in std::iter::once(endpoint).chain(registration) {
            let is_socket = std::fs::symlink_metadata(&path)
                .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()));
            if is_socket && std::fs::remove_file(&path).is_ok() {
                info!(
                    "removed {}, left by an instance that is gone",
                    path.display()
                );
            }
        }
    }
}

impl control::Node for LiveNode {
    type Server = ResourceServer;

    fn discover(&self, resource: &Resource) -> Vec<Device> {
        resource.discover(&self.sys_root)
    }

    fn serve(&mut self, plugin: &Plugin) -> Result<ResourceServer, DaemonError> {
        let resource = plugin.resource();
        // Ours before anything at the socket paths is touched: a socket there is then stale.
        let slot = match self.locks.get(&resource.resource_name) {
            Some((slot, _)) => *slot,
            None => {
                let (slot, lock) = self.take_slot(&resource.resource_name)?;
                self.locks
                    .insert(resource.resource_name.clone(), (slot, lock));
                slot
            }
        };
        let endpoint = self.layout.socket_path_in(&resource.resource_name, slot);
        let mut services = vec![proto::create_device_plugin(plugin.clone())];
        let mut sockets = vec![endpoint.clone()];
        if let Some((service, path)) = plugin_watcher::registration(
            &self.layout,
            plugin.resource_name(),
            &endpoint,
            &self.events,
        ) {
            services.push(service);
            sockets.push(path);
        }
        ResourceServer::start(Arc::clone(&self.env), services, &sockets).map_err(|source| {
            DaemonError::Serve {
                resource: plugin.resource_name().to_owned(),
                source: Box::new(source),
            }
        })
    }

    fn intact(&self, server: &ResourceServer) -> bool {
        server.socket_intact()
    }

    fn stop(&mut self, server: ResourceServer) {
        let path = server.path().to_owned();
        server.stop();
        log::debug!("stopped serving on {}", path.display());
    }

    fn socket_path(&self, resource: &Resource) -> PathBuf {
        let slot = self
            .locks
            .get(&resource.resource_name)
            .map_or(0, |(slot, _)| *slot);
        self.layout.socket_path_in(&resource.resource_name, slot)
    }

    fn kubelet_present(&self) -> bool {
        self.layout.dials_kubelet() && self.layout.kubelet_socket().exists()
    }

    fn register(&mut self, plugin: &Plugin, server: &ResourceServer) {
        // In plugin-watcher mode the kubelet finds the registration socket by itself.
        let Some(register) = &self.register else {
            return;
        };
        register.send(RegisterCommand::Register(RegisterJob {
            resource_name: plugin.resource_name().to_owned(),
            endpoint: server
                .path()
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned(),
            options: Plugin::options(),
            server: server.id(),
        }));
    }

    fn forget(&mut self, resource_name: &str) {
        if let Some(register) = &self.register {
            register.send(RegisterCommand::Forget(resource_name.to_owned()));
        }
    }

    fn load(&self) -> Option<Result<Vec<Resource>, ConfigError>> {
        let file = self.sources.file.as_ref()?;
        let checked = self.sources.load().and_then(|resources| {
            for r in &resources {
                self.layout
                    .check(&r.resource_name)
                    .map_err(|e| ConfigError::Invalid {
                        path: file.clone(),
                        field: r.name.clone(),
                        problem: crate::error_chain(&e),
                    })?;
            }
            Ok(resources)
        });
        Some(checked)
    }

    fn watch(&mut self, mut targets: Vec<WatchTarget>) {
        targets.extend(self.sources.late.iter().flat_map(Resource::watch_targets));
        self.inotify.set_targets(targets);
    }

    fn late(&self) -> Vec<Resource> {
        self.sources.late.clone()
    }

    fn release(&mut self, resource_name: &str) {
        let Some((slot, lock)) = self.locks.remove(resource_name) else {
            return;
        };
        // The spec stays while another instance serves the resource (a surge rollout's other
        // pod, whose allocations name the same CDI devices); the last one out removes it.
        if self.others_serve(resource_name, slot) {
            self.cdi.forget(resource_name);
        } else {
            self.cdi.withdraw(resource_name);
        }
        drop(lock);
    }

    fn retire(&mut self, resource_name: &str, server: ResourceServer) {
        let slot = self.locks.get(resource_name).map(|(slot, _)| *slot);
        match slot {
            Some(slot) if self.others_serve(resource_name, slot) => {
                server.stop_leaving_announcement();
            }
            _ => {
                server.stop();
                // The last one out: what killed or earlier instances left goes too.
                for other in (0..layout::SLOTS).filter(|s| Some(*s) != slot) {
                    self.clear_if_stale(resource_name, other);
                }
            }
        }
        self.release(resource_name);
    }

    fn describe(&mut self, resource: &Resource, devices: &[Device]) {
        // Only an owner writes: another instance may be serving this resource still.
        if !self.locks.contains_key(&resource.resource_name) {
            return;
        }
        if let Err(e) = self.cdi.publish(resource, devices) {
            error!(
                "{}: allocations name CDI devices the runtime cannot find: {}",
                resource.resource_name,
                crate::error_chain(&e)
            );
        }
    }

    fn now(&self) -> Instant {
        Instant::now()
    }
}
