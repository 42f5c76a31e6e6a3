//! The control loop, run on the main thread: starts every thread and server, reacts to events from
//! the inotify, register and signals threads, and shuts everything down in order.

use std::ffi::OsString;
use std::fs;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use grpcio::{EnvBuilder, Environment};
use log::{debug, error, info, warn};

use crate::config::Sources;
use crate::device::{Device, Resource, WatchTarget};
use crate::http::{HttpError, HttpServer};
use crate::metrics::Metrics;
use crate::plugin::Plugin;
use crate::registration::{self, Command, Job, Mode, WatcherService};
use crate::server::{ResourceServer, ServerError};
use crate::signals::SignalThread;
use crate::watcher::{WatchError, Watcher, KUBELET_SOCKET};

/// How long shutdown waits for the completion-queue thread to finish.
const CQ_EXIT_TIMEOUT: Duration = Duration::from_secs(5);

/// Everything the control loop reacts to.
#[derive(Debug)]
pub enum Event {
    /// `kubelet.sock` appeared: the kubelet started (or restarted) and wiped our sockets.
    KubeletSocketCreated,
    KubeletSocketRemoved,
    /// One of our sockets (by file name) was removed.
    SocketRemoved(OsString),
    /// A device node may have appeared or disappeared.
    DevicesChanged,
    /// The configuration file was written or replaced.
    ConfigChanged,
    /// Events were lost: check everything.
    Resync,
    PluginDirGone,
    WatcherFailed,
    /// The kubelet accepted the registration of this resource.
    Registered(String),
    /// SIGHUP: read the configuration again.
    Reload,
    Shutdown(&'static str),
}

/// What the daemon serves, and where.
#[derive(Clone, Debug)]
pub struct Config {
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
}

/// Where our sockets live, by registration mode.
#[derive(Clone, Debug)]
struct Layout {
    /// Our DevicePlugin sockets.
    socket_dir: PathBuf,
    /// The plugin watcher's directory, in plugin-watcher mode.
    registry_dir: Option<PathBuf>,
}

/// Our own directory for DevicePlugin sockets in plugin-watcher mode: outside `device-plugins/`,
/// which the kubelet wipes when it starts.
pub const WATCHER_SOCKET_DIR: &str = "plugins/kubelet-device-plugins";

impl Layout {
    /// Resolves `auto` and checks that the directories the mode needs are there.
    fn resolve(plugin_dir: &Path, mode: Mode) -> Result<Layout, DaemonError> {
        let root = plugin_dir.parent().unwrap_or(Path::new("/"));
        let registry_dir = root.join("plugins_registry");
        let mode = match mode {
            Mode::Auto if registry_dir.is_dir() => Mode::PluginWatcher,
            Mode::Auto => Mode::KubeletSocket,
            explicit => explicit,
        };
        if mode == Mode::KubeletSocket {
            check_dir(plugin_dir)?;
            info!(
                "registering through {}",
                plugin_dir.join(KUBELET_SOCKET).display()
            );
            return Ok(Layout {
                socket_dir: plugin_dir.to_owned(),
                registry_dir: None,
            });
        }
        check_dir(&registry_dir)?;
        let socket_dir = root.join(WATCHER_SOCKET_DIR);
        fs::create_dir_all(&socket_dir).map_err(|source| DaemonError::PluginDir {
            path: socket_dir.clone(),
            source,
        })?;
        info!(
            "registering through the kubelet's plugin watcher: registration sockets in {}, device plugin sockets in {}",
            registry_dir.display(),
            socket_dir.display()
        );
        Ok(Layout {
            socket_dir,
            registry_dir: Some(registry_dir),
        })
    }
}

fn check_dir(path: &Path) -> Result<(), DaemonError> {
    let error = |source| DaemonError::PluginDir {
        path: path.to_owned(),
        source,
    };
    if !fs::metadata(path).map_err(error)?.is_dir() {
        return Err(error(io::Error::new(
            io::ErrorKind::NotADirectory,
            "not a directory",
        )));
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("the directory {path} is not usable (is the kubelet's root directory elsewhere? see --plugin-dir)")]
    PluginDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("no resources to serve")]
    NoResources,
    #[error("cannot start the signals thread")]
    Signals(#[source] io::Error),
    #[error("cannot start the register thread")]
    Register(#[source] io::Error),
    #[error(transparent)]
    Watch(#[from] WatchError),
    #[error(transparent)]
    Http(#[from] HttpError),
    #[error("cannot serve {resource}")]
    Serve {
        resource: String,
        #[source]
        source: Box<ServerError>,
    },
    #[error("the plugin directory {path} was removed; exiting so that we start again cleanly")]
    PluginDirGone { path: PathBuf },
    #[error("the inotify thread stopped; exiting rather than miss kubelet restarts")]
    WatcherFailed,
}

/// Serves every configured resource until SIGTERM or SIGINT.
pub fn run(config: Config) -> Result<(), DaemonError> {
    if config.resources.is_empty() && config.sources.file.is_none() {
        return Err(DaemonError::NoResources);
    }
    let layout = Layout::resolve(&config.plugin_dir, config.registration)?;

    let (events_tx, events_rx) = crossbeam_channel::unbounded();
    let signals = SignalThread::spawn(events_tx.clone()).map_err(DaemonError::Signals)?;
    let (cq_done_tx, cq_done_rx) = crossbeam_channel::bounded(1);
    let env = Arc::new(
        EnvBuilder::new()
            .cq_count(1)
            .name_prefix("grpc")
            .before_stop(move || {
                let _ = cq_done_tx.try_send(());
            })
            .build(),
    );

    let metrics = Arc::new(Metrics::new());
    let http = match config.metrics_address {
        Some(address) => match HttpServer::start(address, Arc::clone(&metrics)) {
            Ok(http) => Some(http),
            Err(e) => {
                signals.stop();
                return Err(e.into());
            }
        },
        None => None,
    };
    let mut daemon = Daemon::new(config, layout, Arc::clone(&env), metrics);
    let result = daemon.start(events_tx, events_rx);
    daemon.shutdown();
    if let Some(http) = http {
        http.stop();
    }
    signals.stop();
    // The completion-queue thread ends when the last reference to the environment goes.
    drop(daemon);
    drop(env);
    if cq_done_rx.recv_timeout(CQ_EXIT_TIMEOUT).is_err() {
        warn!("the gRPC completion-queue thread did not stop within {CQ_EXIT_TIMEOUT:?}");
    }
    info!("stopped");
    result
}

/// One served resource: its service (kept across server restarts) and its running server.
struct Served {
    plugin: Plugin,
    server: Option<ResourceServer>,
}

struct Daemon {
    layout: Layout,
    metrics: Arc<Metrics>,
    plugin_dir: PathBuf,
    sys_root: PathBuf,
    sources: Sources,
    env: Arc<Environment>,
    served: Vec<Served>,
    watcher: Option<Watcher>,
    register: Option<(Sender<Command>, std::thread::JoinHandle<()>)>,
}

impl Daemon {
    fn new(config: Config, layout: Layout, env: Arc<Environment>, metrics: Arc<Metrics>) -> Daemon {
        let served = config
            .resources
            .into_iter()
            .map(|r| {
                let devices = r.discover(&config.sys_root);
                metrics.track(&r.resource_name);
                let plugin = Plugin::with_metrics(r, devices, Arc::clone(&metrics));
                Served {
                    plugin,
                    server: None,
                }
            })
            .collect();
        Daemon {
            metrics,
            plugin_dir: config.plugin_dir,
            layout,
            sys_root: config.sys_root,
            sources: config.sources,
            env,
            served,
            watcher: None,
            register: None,
        }
    }

    fn kubelet_socket(&self) -> PathBuf {
        self.plugin_dir.join(KUBELET_SOCKET)
    }

    /// Whether we register through kubelet.sock (rather than being found by the plugin watcher).
    fn dials_kubelet(&self) -> bool {
        self.layout.registry_dir.is_none()
    }

    fn watch_targets(&self) -> Vec<WatchTarget> {
        self.served
            .iter()
            .flat_map(|s| s.plugin.resource().watch_targets())
            .collect()
    }

    /// Starts the threads and servers, then runs the control loop until asked to stop.
    fn start(
        &mut self,
        events_tx: Sender<Event>,
        events: Receiver<Event>,
    ) -> Result<(), DaemonError> {
        // Watch before serving, so no deletion or kubelet start can slip between the two.
        let registry_dir = self.layout.registry_dir.as_deref();
        let watcher = Watcher::spawn(
            &self.layout.socket_dir,
            registry_dir.as_slice(),
            self.watch_targets(),
            self.sources.file.as_deref(),
            events_tx.clone(),
        )?;
        self.watcher = Some(watcher);
        // A node that came or went before the watch began is caught here.
        self.refresh_devices();
        if self.dials_kubelet() {
            let (commands_tx, commands_rx) = crossbeam_channel::unbounded();
            let thread = registration::spawn(
                Arc::clone(&self.env),
                self.kubelet_socket(),
                commands_rx,
                events_tx,
            )
            .map_err(DaemonError::Register)?;
            self.register = Some((commands_tx, thread));
        }

        // A resource that cannot serve (say, a stray file where its socket belongs) must not take
        // the others down: it is logged and tried again at the next kubelet start or reload.
        // Each resource registers as soon as it serves, while the next one starts.
        let kubelet_here = self.kubelet_socket().exists();
        let mut first_failure = None;
        for i in 0..self.served.len() {
            match self.serve(i) {
                Ok(()) => {
                    if kubelet_here {
                        self.register(i);
                    }
                    self.log_serving(i);
                }
                Err(e) => {
                    error!("{}", crate::error_chain(&e));
                    first_failure.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_failure.filter(|_| self.served.iter().all(|s| s.server.is_none())) {
            return Err(e);
        }
        if self.served.is_empty() {
            warn!("no resources configured; waiting for the configuration file to change");
        }
        if self.dials_kubelet() && !kubelet_here {
            info!(
                "waiting for the kubelet: {} does not exist yet",
                self.kubelet_socket().display()
            );
        }
        self.control_loop(&events)
    }

    fn log_serving(&self, i: usize) {
        let snapshot = self.served[i].plugin.snapshot();
        let healthy = snapshot.devices.iter().filter(|d| d.healthy).count();
        info!(
            "serving {} on {}: {} device(s), {healthy} healthy, each shared by up to {} containers",
            snapshot.resource.resource_name,
            self.socket_path(i).display(),
            snapshot.devices.len(),
            snapshot.resource.count,
        );
    }

    fn control_loop(&mut self, events: &Receiver<Event>) -> Result<(), DaemonError> {
        while let Ok(event) = events.recv() {
            if let Some(end) = self.handle(event) {
                return end;
            }
        }
        Ok(())
    }

    /// Reacts to one event; `Some` ends the control loop.
    fn handle(&mut self, event: Event) -> Option<Result<(), DaemonError>> {
        match event {
            Event::KubeletSocketCreated => {
                info!(
                    "the kubelet (re)started: registering {} resources again",
                    self.served.len()
                );
                self.metrics.kubelet_restarted();
                self.restart_missing_servers();
                self.register_all();
            }
            Event::KubeletSocketRemoved => {
                info!(
                    "{} was removed; waiting for the kubelet to return",
                    self.kubelet_socket().display()
                )
            }
            Event::SocketRemoved(name) => self.socket_removed(Path::new(&name)),
            Event::DevicesChanged => self.refresh_devices(),
            Event::ConfigChanged => self.reload("the configuration file changed"),
            Event::Reload => self.reload("SIGHUP received"),
            Event::Resync => {
                info!("checking sockets, devices and registrations again");
                self.refresh_devices();
                self.restart_missing_servers();
                if self.kubelet_socket().exists() {
                    self.register_all();
                }
            }
            Event::Registered(name) => self.metrics.registered(&name),
            Event::PluginDirGone => {
                return Some(Err(DaemonError::PluginDirGone {
                    path: self.plugin_dir.clone(),
                }))
            }
            Event::WatcherFailed => return Some(Err(DaemonError::WatcherFailed)),
            Event::Shutdown(signal) => {
                info!("{signal} received: shutting down");
                return Some(Ok(()));
            }
        }
        None
    }

    fn socket_path(&self, i: usize) -> PathBuf {
        self.layout
            .socket_dir
            .join(self.served[i].plugin.resource().socket_name())
    }

    /// (Re)starts the server of resource `i` on a fresh socket.
    fn serve(&mut self, i: usize) -> Result<(), DaemonError> {
        let path = self.socket_path(i);
        let s = &mut self.served[i];
        if let Some(old) = s.server.take() {
            // Streams on the old socket belong to a kubelet that will dial the new one.
            s.plugin.close_streams();
            old.stop();
        }
        let registration = self.layout.registry_dir.as_ref().map(|dir| {
            let service =
                WatcherService::new(s.plugin.resource_name(), &path, Arc::clone(&self.metrics));
            (dir.join(s.plugin.resource().socket_name()), service)
        });
        let server =
            ResourceServer::start(Arc::clone(&self.env), s.plugin.clone(), &path, registration)
                .map_err(|source| DaemonError::Serve {
                    resource: s.plugin.resource_name().to_owned(),
                    source: Box::new(source),
                })?;
        s.server = Some(server);
        Ok(())
    }

    fn restart_missing_servers(&mut self) {
        for i in 0..self.served.len() {
            if !self.served[i]
                .server
                .as_ref()
                .is_some_and(ResourceServer::socket_intact)
            {
                self.restart(i);
            }
        }
    }

    /// Restarts a server at run time: a failure is logged and retried at the next kubelet start.
    fn restart(&mut self, i: usize) -> bool {
        match self.serve(i) {
            Ok(()) => true,
            Err(e) => {
                error!("{}", crate::error_chain(&e));
                false
            }
        }
    }

    fn socket_removed(&mut self, name: &Path) {
        let Some(i) = self
            .served
            .iter()
            .position(|s| Path::new(&s.plugin.resource().socket_name()) == name)
        else {
            return;
        };
        if self.served[i]
            .server
            .as_ref()
            .is_some_and(ResourceServer::socket_intact)
        {
            // We replaced it ourselves.
            return;
        }
        info!(
            "{} was removed: serving {} again",
            name.display(),
            self.served[i].plugin.resource_name()
        );
        if self.restart(i) && self.kubelet_socket().exists() {
            self.register(i);
        }
    }

    /// Looks at the node again: devices that came, went, or changed health.
    fn refresh_devices(&mut self) {
        for s in &self.served {
            let before = s.plugin.snapshot();
            let devices = before.resource.discover(&self.sys_root);
            if s.plugin.update(Arc::clone(&before.resource), devices) {
                log_device_changes(
                    &before.resource.resource_name,
                    &before.devices,
                    &s.plugin.snapshot().devices,
                );
            }
        }
    }

    /// Reads the configuration again and applies it: new resources start and register, removed
    /// ones stop, changed ones take effect for the next allocation. A configuration that fails
    /// its checks changes nothing.
    fn reload(&mut self, why: &str) {
        if self.sources.file.is_none() {
            info!("{why}: no configuration file; checking devices and sockets");
            self.refresh_devices();
            self.restart_missing_servers();
            return;
        }
        let resources = match self.sources.load() {
            Ok(resources) => resources,
            Err(e) => {
                error!(
                    "{why}, but the new configuration is refused; the running one stays: {}",
                    crate::error_chain(&e)
                );
                self.metrics.reloaded(false);
                return;
            }
        };
        self.metrics.reloaded(true);
        info!(
            "{why}: applying the configuration ({} resources)",
            resources.len()
        );
        let mut i = 0;
        while i < self.served.len() {
            if resources
                .iter()
                .any(|r| r.resource_name == self.served[i].plugin.resource_name())
            {
                i += 1;
            } else {
                self.remove(i);
            }
        }
        let kubelet_here = self.kubelet_socket().exists();
        for resource in resources {
            let devices = resource.discover(&self.sys_root);
            match self
                .served
                .iter()
                .position(|s| s.plugin.resource_name() == resource.resource_name)
            {
                Some(i) => {
                    let plugin = &self.served[i].plugin;
                    if *plugin.resource() != resource {
                        plugin.update(Arc::new(resource), devices);
                        info!("{}: configuration updated", plugin.resource_name());
                    }
                }
                None => {
                    self.metrics.track(&resource.resource_name);
                    let plugin = Plugin::with_metrics(resource, devices, Arc::clone(&self.metrics));
                    self.served.push(Served {
                        plugin,
                        server: None,
                    });
                    let i = self.served.len() - 1;
                    if self.restart(i) {
                        self.log_serving(i);
                        if kubelet_here {
                            self.register(i);
                        }
                    }
                }
            }
        }
        if let Some(watcher) = &self.watcher {
            watcher.set_targets(self.watch_targets());
        }
        // Nodes may have come or gone while the old targets were watched.
        self.refresh_devices();
    }

    /// Stops serving resource `i`: its streams end, its socket goes, the kubelet drops it.
    fn remove(&mut self, i: usize) {
        let s = self.served.remove(i);
        if let Some((tx, _)) = &self.register {
            let _ = tx.send(Command::Forget(s.plugin.resource_name().to_owned()));
        }
        s.plugin.close_streams();
        if let Some(server) = s.server {
            server.stop();
        }
        self.metrics.forget(s.plugin.resource_name());
        info!(
            "stopped serving {}: no longer configured",
            s.plugin.resource_name()
        );
    }

    /// Registers resource `i` now: the register thread works while the control loop goes on
    /// (serving the next resource, say). A kubelet restart asks twice (our socket's removal, then
    /// kubelet.sock's creation); the register thread drops a request that would repeat one.
    fn register(&self, i: usize) {
        // In plugin-watcher mode the kubelet finds the registration socket by itself.
        let (Some((tx, _)), Some(server)) = (&self.register, &self.served[i].server) else {
            return;
        };
        let plugin = &self.served[i].plugin;
        let job = Job {
            resource_name: plugin.resource_name().to_owned(),
            endpoint: plugin.resource().socket_name(),
            options: Plugin::options(),
            server: server.id(),
        };
        // The register thread outlives the control loop.
        let _ = tx.send(Command::Register(job));
    }

    fn register_all(&self) {
        for i in 0..self.served.len() {
            self.register(i);
        }
    }

    /// Stops servers (ending streams first), the register thread and the inotify thread.
    fn shutdown(&mut self) {
        if let Some((tx, thread)) = self.register.take() {
            drop(tx);
            if thread.join().is_err() {
                error!("the register thread panicked");
            }
        }
        for s in &mut self.served {
            s.plugin.close_streams();
            if let Some(server) = s.server.take() {
                let path = server.path().to_owned();
                server.stop();
                debug!("stopped serving on {}", path.display());
            }
        }
        if let Some(watcher) = self.watcher.take() {
            watcher.stop();
        }
    }
}

/// One line per device that appeared, disappeared or changed health.
fn log_device_changes(resource: &str, before: &[Device], after: &[Device]) {
    let describe = |d: &Device| {
        d.nodes
            .iter()
            .map(|n| n.host_path.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    for d in after {
        match before.iter().find(|b| b.id_prefix == d.id_prefix) {
            None => info!(
                "{resource}: {} appeared ({})",
                describe(d),
                health_word(d.healthy)
            ),
            Some(b) if b.healthy != d.healthy => {
                let how = if d.healthy { "is back" } else { "is gone" };
                info!(
                    "{resource}: {} {how}: {}",
                    describe(d),
                    health_word(d.healthy)
                );
            }
            Some(_) => {}
        }
    }
    for b in before
        .iter()
        .filter(|b| !after.iter().any(|d| d.id_prefix == b.id_prefix))
    {
        info!(
            "{resource}: {} disappeared; its devices are no longer listed",
            describe(b)
        );
    }
}

fn health_word(healthy: bool) -> &'static str {
    if healthy {
        "Healthy"
    } else {
        "Unhealthy"
    }
}
