//! The daemon's plumbing (main thread): starts the threads, builds the chosen frontend, hands
//! every event to the control loop ([`crate::control`]), and stops everything in order. Both
//! modes run through here; nothing in this file decides what an event causes.
//!
//! Start order: the frontend, after every check of the operator's settings (its register thread
//! in kubelet-socket mode; nothing that serves yet), signals, http (optional), inotify (before any
//! socket, so no deletion or kubelet start slips between watching and serving), then the control
//! loop serves each endpoint. Shutdown: servers, the frontend's threads, inotify, http, signals,
//! and last the completion-queue threads.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use log::{info, warn};

use crate::config::{ConfigError, Sources};
use crate::control::{ControlError, Controller, Flow, Frontend, Host};
use crate::device::{Device, Resource, WatchTarget};
use crate::device_plugin::DevicePlugins;
use crate::dra::{self, DraError};
use crate::event::Event;
use crate::health::{HealthError, HealthServer};
use crate::http::{HttpError, HttpServer};
use crate::ids::IdBook;
use crate::inotify::{InotifyError, InotifyThread};
use crate::layout::{Layout, LayoutError, Mode};
use crate::metrics::Metrics;
use crate::nfd::FeatureFiles;
use crate::signals;
use crate::thread::Threads;

/// Everything `serve` needs, parsed once from the command line and the configuration file.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Where the resources come from, for reloads.
    pub sources: Sources,
    /// The resources to serve at start, as loaded from `sources`.
    pub resources: Vec<Resource>,
    /// Where the kernel's sysfs is, for NUMA nodes.
    pub sys_root: PathBuf,
    /// Where to serve /metrics, /healthz and /readyz, if at all.
    pub metrics_address: Option<SocketAddr>,
    /// Where to answer liveness probes, if at all.
    pub health_socket: Option<PathBuf>,
    /// Where the runtime reads CDI specs (both frontends write them).
    pub cdi_dir: PathBuf,
    /// NFD's `features.d/` directory, to label the node with what we serve, if at all.
    pub nfd_dir: Option<PathBuf>,
    /// How the devices reach the kubelet.
    pub frontend: FrontendSettings,
}

/// The frontend and what only it needs.
#[derive(Clone, Debug)]
pub enum FrontendSettings {
    /// The kubelet's device plugin API.
    DevicePlugin {
        /// The kubelet's device-plugin directory (`--plugin-dir`).
        plugin_dir: PathBuf,
        /// How the kubelet learns of our resources.
        registration: Mode,
    },
    /// A DRA driver.
    Dra(dra::Settings),
}

/// Why the daemon stopped, or could not start.
#[allow(missing_docs)]
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The kubelet's directories are not where we were told, or a name does not fit them.
    #[error(transparent)]
    Layout(#[from] LayoutError),
    /// The DRA driver cannot start.
    #[error(transparent)]
    Dra(#[from] DraError),
    /// Nothing to serve, and no configuration file that could name something later.
    #[error("no resources to serve")]
    NoResources,
    #[error("cannot start the {0} thread")]
    Spawn(&'static str, #[source] io::Error),
    #[error(transparent)]
    Inotify(#[from] InotifyError),
    #[error(transparent)]
    Http(#[from] HttpError),
    #[error(transparent)]
    Health(#[from] HealthError),
    #[error(transparent)]
    Control(#[from] ControlError),
}

impl DaemonError {
    /// Whether the operator's settings are at fault (exit code 2), in either mode.
    pub fn is_configuration(&self) -> bool {
        match self {
            DaemonError::Layout(LayoutError::SocketPath { .. }) => true,
            DaemonError::Dra(e) => e.is_configuration(),
            _ => false,
        }
    }
}

/// Serves every configured resource until SIGTERM or SIGINT.
pub fn run(settings: &Settings) -> Result<(), DaemonError> {
    if settings.resources.is_empty()
        && settings.sources.file.is_none()
        && settings.sources.late.is_empty()
    {
        return Err(DaemonError::NoResources);
    }
    let (events_tx, events) = crossbeam_channel::unbounded();
    let (env, cq_exit) = crate::rpc::environment();
    let shared = Shared {
        events_tx,
        events,
        env,
        cq_exit,
        metrics: Arc::new(Metrics::new()),
    };
    // Everything the operator may have got wrong is checked before any thread starts.
    match &settings.frontend {
        FrontendSettings::DevicePlugin {
            plugin_dir,
            registration,
        } => {
            let layout = Layout::resolve(plugin_dir, *registration)?;
            for resource in &settings.resources {
                layout.check(&resource.resource_name)?;
            }
            let socket_dir = layout.socket_dir.clone();
            // With the plugin watcher our sockets are elsewhere, but kubelet.sock still tells
            // when the kubelet restarts (readiness starts over then).
            let mut others = layout.registry_dir.iter().cloned().collect::<Vec<_>>();
            if !layout.dials_kubelet() {
                others.push(layout.kubelet_dir.clone());
            }
            let frontend = DevicePlugins::new(
                layout,
                Arc::clone(&shared.env),
                Arc::clone(&shared.metrics),
                shared.events_tx.clone(),
                &settings.cdi_dir,
            )
            .map_err(|e| DaemonError::Spawn("register", e))?;
            let others = others.iter().map(PathBuf::as_path).collect();
            serve(settings, frontend, (&socket_dir, others), shared)
        }
        FrontendSettings::Dra(dra) => {
            for resource in &settings.resources {
                dra::check_resource(resource)?;
            }
            let frontend = dra::Driver::new(
                dra.clone(),
                &settings.cdi_dir,
                Arc::clone(&shared.env),
                Arc::clone(&shared.metrics),
                shared.events_tx.clone(),
            )?;
            let (socket_dir, registry) = frontend.socket_dirs();
            serve(settings, frontend, (&socket_dir, vec![&registry]), shared)
        }
    }
}

/// What every thread of the daemon shares, made before the frontend.
struct Shared {
    events_tx: Sender<Event>,
    events: Receiver<Event>,
    env: Arc<grpcio::Environment>,
    cq_exit: crate::rpc::CqExit,
    metrics: Arc<Metrics>,
}

/// Starts the threads, runs the control loop over `frontend` until it stops, and stops
/// everything in order. `socket_dirs`: ours (where the lock files are too), then the others we
/// put sockets in (the plugin watcher's), for inotify.
fn serve<F: Frontend>(
    settings: &Settings,
    frontend: F,
    (socket_dir, other_socket_dirs): (&Path, Vec<&Path>),
    shared: Shared,
) -> Result<(), DaemonError> {
    let Shared {
        events_tx,
        events,
        env,
        cq_exit,
        metrics,
    } = shared;
    let mut threads = Threads::default();
    threads.push(signals::spawn(events_tx.clone()).map_err(|e| DaemonError::Spawn("signals", e))?);
    let http = match settings.metrics_address {
        Some(address) => Some(HttpServer::start(address, &metrics, &events_tx)?),
        None => None,
    };
    let health = match &settings.health_socket {
        Some(path) => Some(HealthServer::start(path, &metrics, &events_tx)?),
        None => None,
    };
    let targets: Vec<WatchTarget> = settings
        .resources
        .iter()
        .chain(&settings.sources.late)
        .flat_map(Resource::watch_targets)
        .collect();
    // Another instance's lock file going away is our cue to take over at once (a rollout's
    // overlap), instead of at the next retry.
    let lock_targets = vec![WatchTarget {
        dir: socket_dir.join(crate::lock::LOCK_DIR),
        name: glob::Pattern::new("*.lock").expect("a constant pattern"),
    }];
    // A node label file removed by someone else is written again (`Event::LabelsChanged`).
    let label_targets = settings
        .nfd_dir
        .iter()
        .map(|dir| WatchTarget {
            dir: dir.clone(),
            name: glob::Pattern::new(crate::nfd::FILE_PATTERN).expect("a constant pattern"),
        })
        .collect();
    let inotify = InotifyThread::spawn(
        socket_dir,
        &other_socket_dirs,
        targets,
        lock_targets,
        label_targets,
        settings.sources.file.as_deref(),
        events_tx.clone(),
    )?;
    let host = LiveHost {
        sys_root: settings.sys_root.clone(),
        ids: IdBook::new(Some(socket_dir.join(crate::ids::IDS_DIR))),
        sources: settings.sources.clone(),
        inotify,
        nfd: settings.nfd_dir.clone().map(FeatureFiles::new),
    };
    let mut controller = Controller::new(host, frontend, metrics);
    controller.start(settings.resources.clone());
    let result = loop {
        // Without a retry or periodic work due, nothing wakes this thread but an event.
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
    let (host, frontend) = controller.into_parts();
    // The frontend's own threads (the register thread, DRA's prepare and slices) end with it.
    drop(frontend);
    host.inotify.stop();
    if let Some(http) = http {
        http.stop();
    }
    if let Some(health) = health {
        health.stop();
    }
    threads.stop_all();
    // The completion-queue thread ends when the last reference to the environment goes.
    cq_exit.wait(env);
    info!("stopped");
    Ok(result?)
}

/// The real node: device nodes, the configuration file, the inotify thread, the clock.
struct LiveHost {
    sys_root: PathBuf,
    /// The IDs devices were given, kept beside our sockets for the next instance.
    ids: IdBook,
    sources: Sources,
    inotify: InotifyThread,
    /// NFD's feature files, when the operator asked for node labels.
    nfd: Option<FeatureFiles>,
}

impl Host for LiveHost {
    fn discover(&mut self, resource: &Resource) -> Vec<Device> {
        self.ids.discover(resource, &self.sys_root)
    }

    fn load(&self) -> Option<Result<Vec<Resource>, ConfigError>> {
        self.sources.file.as_ref()?;
        Some(self.sources.load())
    }

    fn watch(&mut self, mut targets: Vec<WatchTarget>) {
        targets.extend(self.sources.late.iter().flat_map(Resource::watch_targets));
        self.inotify.set_targets(targets);
    }

    fn late(&self) -> Vec<Resource> {
        self.sources.late.clone()
    }

    fn now(&self) -> Instant {
        Instant::now()
    }

    fn label_present(&self, resource: &str) -> bool {
        self.nfd
            .as_ref()
            .is_none_or(|files| files.path(resource).exists())
    }

    fn label(&mut self, resource: &str, healthy: Option<u64>) {
        let Some(files) = &self.nfd else {
            return;
        };
        let result = match healthy {
            Some(n) => files.write(resource, n),
            None => files.remove(resource),
        };
        // The label is an aid to scheduling, not our service: the next change tries again.
        if let Err(e) = result {
            warn!("{}", crate::error::error_chain(&e));
        }
    }
}
