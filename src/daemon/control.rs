//! The control loop's decisions (main thread): what each event causes, which servers to restart,
//! what to register, what a reload adds, removes or changes. Everything it does to the world goes
//! through [`Node`], so the decisions are tested in-process against a recording fake; the live
//! node, with real servers, sockets and threads, is in `daemon/mod.rs`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, error, info, log, warn, Level};

use super::reconcile;
use super::state::Resources;
use super::DaemonError;
use crate::config::ConfigError;
use crate::device::{Device, Resource, WatchTarget};
use crate::event::Event;
use crate::layout::KUBELET_SOCKET;
use crate::metrics::Metrics;
use crate::plugin::Plugin;

/// The side effects the control loop needs, and nothing else.
pub trait Node {
    /// A running server for one resource.
    type Server;
    /// The devices of `resource` on the node now.
    fn discover(&self, resource: &Resource) -> Vec<Device>;
    /// Starts serving `plugin` on fresh sockets.
    fn serve(&mut self, plugin: &Plugin) -> Result<Self::Server, DaemonError>;
    /// Whether the server's sockets are still in place.
    fn intact(&self, server: &Self::Server) -> bool;
    /// Stops a server, removing its sockets if they are still ours.
    fn stop(&mut self, server: Self::Server);
    /// Where `resource`'s DevicePlugin socket is, for the log.
    fn socket_path(&self, resource: &Resource) -> PathBuf;
    /// Whether `kubelet.sock` exists (always false in plugin-watcher mode, where we never dial).
    fn kubelet_present(&self) -> bool;
    /// Asks for a registration through `kubelet.sock`; the answer comes as `Event::Registered`.
    fn register(&mut self, plugin: &Plugin, server: &Self::Server);
    /// Drops pending registrations of a resource that stopped.
    fn forget(&mut self, resource_name: &str);
    /// Reads the configuration again; `None` when it comes from flags only.
    fn load(&self) -> Option<Result<Vec<Resource>, ConfigError>>;
    /// Watches these device entries from now on.
    fn watch(&mut self, targets: Vec<WatchTarget>);
    /// Built-ins to serve once their nodes appear (see `Sources::late`).
    fn late(&self) -> Vec<Resource>;
    /// Lets other instances serve this resource, once its server has stopped.
    fn release(&mut self, resource_name: &str);
    /// Stops a resource's server for good (the process is ending) and lets the resource go.
    fn retire(&mut self, resource_name: &str, server: Self::Server);
    /// Describes the devices to the runtime (a CDI spec, for resources that use CDI) before the
    /// kubelet can allocate them; only while we own the resource.
    fn describe(&mut self, resource: &Resource, devices: &[Device]);
    /// The time now, for retries.
    fn now(&self) -> Instant;
}

/// The first wait before serving a resource again after a failure; it doubles with every
/// failure up to `RETRY_MAX`. Short, because the usual cause is brief: another instance on its
/// way out (a rollout), a socket directory being recreated.
pub const RETRY_FIRST: Duration = Duration::from_millis(250);
/// The longest wait between tries: how late, at most, we take over from an instance that ended.
pub const RETRY_MAX: Duration = Duration::from_secs(4);

/// A resource to serve again once `at` has passed.
#[derive(Debug)]
struct Retry {
    at: Instant,
    delay: Duration,
    /// What went wrong last, so that a failure that repeats is logged once.
    reason: String,
    /// Whether a try is due at `at`; after a success the entry stays, idle, so that a kubelet
    /// that keeps refusing us meets a growing wait, until a registration succeeds.
    pending: bool,
    /// Whether another instance's lock is what stops us: tried again as soon as a lock file
    /// goes (`Event::LocksChanged`), not only at `at`.
    locked: bool,
}

/// Whether the control loop goes on after an event.
#[derive(Debug)]
pub enum Flow {
    /// Wait for the next event.
    Continue,
    /// Stop, with the process's outcome.
    Stop(Result<(), DaemonError>),
}

/// The control loop's state and decisions.
pub struct Controller<N: Node> {
    node: N,
    metrics: Arc<Metrics>,
    resources: Resources<N::Server>,
    /// Resources waiting to serve (again), by resource name.
    retries: BTreeMap<String, Retry>,
    /// Where `PluginDirGone` says the plugin directory was.
    plugin_dir: PathBuf,
}

impl<N: Node> Controller<N> {
    /// A controller serving nothing yet.
    pub fn new(node: N, metrics: Arc<Metrics>, plugin_dir: PathBuf) -> Controller<N> {
        Controller {
            node,
            metrics,
            resources: Resources::default(),
            retries: BTreeMap::new(),
            plugin_dir,
        }
    }

    /// The node, for the plumbing around the control loop.
    pub fn node(&self) -> &N {
        &self.node
    }

    /// Gives the node back once the loop is over, to stop what it runs.
    pub fn into_node(self) -> N {
        self.node
    }

    /// Serves the resources configured at start, registering each as soon as it serves. A
    /// resource that cannot serve (another instance holds it, a stray file sits where its socket
    /// belongs, a bind fails) must not take the others down, nor end the process: it is logged
    /// once and tried again with backoff (see [`Controller::deadline`]) until it serves.
    pub fn start(&mut self, resources: Vec<Resource>) {
        let kubelet_here = self.node.kubelet_present();
        for resource in resources {
            self.add(resource, kubelet_here);
        }
        // Only now does an empty set of resources mean there is nothing to serve.
        self.metrics.started();
        if self.resources.is_empty() {
            if self.node.late().is_empty() {
                warn!("no resources configured; waiting for the configuration file to change");
            } else {
                warn!("no built-in device node exists yet; each built-in is served once its node appears");
            }
        }
    }

    /// When the next retry is due, if any: the control loop waits for events until then. With
    /// every resource served there is none, and the loop sleeps until an event comes.
    pub fn deadline(&self) -> Option<Instant> {
        self.retries
            .values()
            .filter(|r| r.pending)
            .map(|r| r.at)
            .min()
    }

    /// Serves again every resource whose retry is due; those that fail again wait longer.
    pub fn retry_due(&mut self) {
        let now = self.node.now();
        let due: Vec<String> = self
            .retries
            .iter()
            .filter(|(_, r)| r.pending && r.at <= now)
            .map(|(name, _)| name.clone())
            .collect();
        for name in due {
            if self.restart(&name) {
                info!("{name}: serving after an earlier failure");
                if self.node.kubelet_present() {
                    self.register(&name);
                }
                self.log_serving(&name);
            }
        }
    }

    /// Reacts to one event.
    pub fn handle(&mut self, event: Event) -> Flow {
        match event {
            Event::KubeletSocketCreated => {
                info!(
                    "the kubelet (re)started: registering {} resources again",
                    self.resources.len()
                );
                self.metrics.kubelet_restarted();
                self.restart_missing_servers();
                self.register_all();
            }
            Event::KubeletSocketRemoved => {
                info!(
                    "{} was removed; waiting for the kubelet to return",
                    self.plugin_dir.join(KUBELET_SOCKET).display()
                );
            }
            Event::SocketRemoved(name) => {
                if let Some(resource_name) = self.resources.by_socket_name(&name) {
                    self.socket_removed(&resource_name);
                }
            }
            Event::DevicesChanged => {
                self.refresh_devices();
                self.adopt_late();
            }
            Event::LocksChanged => {
                // The instance we wait for may have let go: try now rather than at the next
                // backoff step, so that a rollout's handover leaves the kubelet without our
                // devices for as short a time as we can make it.
                let now = self.node.now();
                for retry in self.retries.values_mut() {
                    if retry.pending && retry.locked {
                        retry.at = now;
                    }
                }
                self.retry_due();
            }
            Event::ConfigChanged => self.reload("the configuration file changed"),
            Event::Reload => self.reload("SIGHUP received"),
            Event::Resync => {
                info!("checking sockets, devices, registrations and the configuration again");
                // A change of the configuration file may be among the events lost.
                if self.node.load().is_some() {
                    self.reload("inotify events were lost");
                }
                self.refresh_devices();
                self.adopt_late();
                self.restart_missing_servers();
                if self.node.kubelet_present() {
                    self.register_all();
                }
            }
            Event::RegistrationRefused { resource, error } => {
                // The plugin watcher tries again only when the registration socket changes:
                // serve on fresh sockets, after a wait that grows while it keeps refusing.
                self.metrics.refused(&resource, &error);
                let failure = format!("the kubelet refused to register {resource}: {error}");
                self.schedule_retry(&resource, &failure, Level::Error);
            }
            Event::Registered(name) => {
                self.retries.remove(&name);
                self.metrics.registered(&name);
            }
            Event::PluginDirGone(path) => {
                return Flow::Stop(Err(DaemonError::PluginDirGone { path }))
            }
            Event::InotifyFailed => return Flow::Stop(Err(DaemonError::InotifyFailed)),
            Event::ThreadPanicked(name) => {
                return Flow::Stop(Err(DaemonError::ThreadPanicked { name }))
            }
            Event::Shutdown(signal) => {
                info!("{signal} received: shutting down");
                return Flow::Stop(Ok(()));
            }
        }
        Flow::Continue
    }

    /// Stops every server, ending its streams first, and lets each resource go as soon as its
    /// server is down: an instance waiting to take over (a rollout's new pod) starts then.
    pub fn shutdown(&mut self) {
        for name in self.resources.names() {
            if let Some(served) = self.resources.get_mut(&name) {
                served.plugin.close_streams();
                match served.server.take() {
                    Some(server) => self.node.retire(&name, server),
                    None => self.node.release(&name),
                }
            }
        }
    }

    /// Starts tracking and serving a new resource; registers it if the kubelet is there. One
    /// that cannot serve yet is tracked all the same, and retried.
    fn add(&mut self, resource: Resource, kubelet_here: bool) {
        let devices = self.node.discover(&resource);
        self.metrics.track(&resource.resource_name);
        let name = resource.resource_name.clone();
        let plugin = Plugin::with_metrics(resource, devices, Arc::clone(&self.metrics));
        self.resources.insert(plugin);
        if !self.restart(&name) {
            return;
        }
        self.describe(&name);
        if kubelet_here {
            self.register(&name);
        }
        self.log_serving(&name);
    }

    /// (Re)starts the server of a resource on fresh sockets.
    fn serve(&mut self, name: &str) -> Result<(), DaemonError> {
        let Some(served) = self.resources.get_mut(name) else {
            return Ok(());
        };
        if let Some(old) = served.server.take() {
            // Streams on the old socket belong to a kubelet that will dial the new one.
            served.plugin.close_streams();
            self.node.stop(old);
        }
        served.server = Some(self.node.serve(&served.plugin)?);
        Ok(())
    }

    /// (Re)starts a server: a failure is logged once and retried with backoff.
    fn restart(&mut self, name: &str) -> bool {
        match self.serve(name) {
            Ok(()) => {
                if let Some(retry) = self.retries.get_mut(name) {
                    retry.pending = false;
                }
                self.metrics.serving(name);
                true
            }
            Err(e) => {
                let failure = crate::error_chain(&e);
                // Another instance serving it is expected for a while in every rollout: we
                // stand by, ready to take over, which is what a surge rollout waits for.
                let locked = matches!(
                    e,
                    DaemonError::Lock {
                        source: crate::lock::LockError::Held { .. },
                        ..
                    }
                );
                if locked {
                    self.metrics.standby(name, &failure);
                } else {
                    self.metrics.not_serving(name, &failure);
                }
                let level = if locked { Level::Warn } else { Level::Error };
                self.schedule_retry(name, &failure, level);
                if let Some(retry) = self.retries.get_mut(name) {
                    retry.locked = locked;
                }
                false
            }
        }
    }

    /// Tries `name` again later: soon after a first failure, then at doubling intervals. A
    /// failure is logged when it is new, not at every try.
    fn schedule_retry(&mut self, name: &str, failure: &str, level: Level) {
        let now = self.node.now();
        let delay = match self.retries.get(name) {
            Some(r) => (r.delay * 2).min(RETRY_MAX),
            None => RETRY_FIRST,
        };
        let repeated = self.retries.get(name).is_some_and(|r| r.reason == failure);
        if repeated {
            debug!("{failure}; trying again in {delay:?}");
        } else {
            log!(
                level,
                "{failure}; trying again, at least every {RETRY_MAX:?}"
            );
        }
        self.retries.insert(
            name.to_owned(),
            Retry {
                at: now + delay,
                delay,
                reason: failure.to_owned(),
                pending: true,
                locked: false,
            },
        );
    }

    fn restart_missing_servers(&mut self) {
        for name in self.resources.names() {
            let intact = self.resources.get_mut(&name).is_some_and(|served| {
                served
                    .server
                    .as_ref()
                    .is_some_and(|server| self.node.intact(server))
            });
            if !intact {
                self.restart(&name);
            }
        }
    }

    fn socket_removed(&mut self, name: &str) {
        let Some(served) = self.resources.get_mut(name) else {
            return;
        };
        if served
            .server
            .as_ref()
            .is_some_and(|server| self.node.intact(server))
        {
            // We replaced it ourselves.
            return;
        }
        let socket = self.node.socket_path(&served.plugin.resource());
        info!(
            "{} was removed: serving {name} again",
            socket.file_name().unwrap_or_default().to_string_lossy()
        );
        if self.restart(name) && self.node.kubelet_present() {
            self.register(name);
        }
    }

    /// Registers one resource now: the register thread works while the control loop goes on.
    /// A kubelet restart asks twice (our socket's removal, then kubelet.sock's creation); the
    /// register thread drops a request that would repeat one.
    fn register(&mut self, name: &str) {
        if let Some(served) = self.resources.get_mut(name) {
            if let Some(server) = &served.server {
                self.node.register(&served.plugin, server);
            }
        }
    }

    fn register_all(&mut self) {
        for name in self.resources.names() {
            self.register(&name);
        }
    }

    /// Serves each late built-in whose node is there now. Once served it stays, Unhealthy while
    /// its node is gone, like any built-in.
    fn adopt_late(&mut self) {
        let kubelet_here = self.node.kubelet_present();
        for resource in self.node.late() {
            if self.resources.get_mut(&resource.resource_name).is_some() {
                continue;
            }
            let devices = self.node.discover(&resource);
            if devices.is_empty() || !devices.iter().all(|d| d.healthy) {
                continue;
            }
            info!(
                "{}: its device node appeared; serving it",
                resource.resource_name
            );
            self.add(resource, kubelet_here);
        }
    }

    /// The runtime's description of a resource's current devices (see [`Node::describe`]).
    fn describe(&mut self, name: &str) {
        if let Some(served) = self.resources.get_mut(name) {
            let snapshot = served.plugin.snapshot();
            self.node.describe(&snapshot.resource, &snapshot.devices);
        }
    }

    /// Looks at the node again: devices that came, went, or changed health. The runtime learns of
    /// a device before the kubelet does, so that no allocation names one it cannot find.
    fn refresh_devices(&mut self) {
        for served in self.resources.iter() {
            let before = served.plugin.snapshot();
            let devices = self.node.discover(&before.resource);
            self.node.describe(&before.resource, &devices);
            if served.plugin.update(Arc::clone(&before.resource), devices) {
                log_device_changes(
                    &before.resource.resource_name,
                    &before.devices,
                    &served.plugin.snapshot().devices,
                );
            }
        }
    }

    /// Reads the configuration again and applies it: new resources start and register, removed
    /// ones stop, changed ones take effect for the next allocation. A configuration that fails
    /// its checks changes nothing.
    fn reload(&mut self, why: &str) {
        let wanted = match self.node.load() {
            None => {
                info!("{why}: no configuration file; checking devices and sockets");
                self.refresh_devices();
                self.adopt_late();
                self.restart_missing_servers();
                return;
            }
            Some(Err(e)) => {
                error!(
                    "{why}, but the new configuration is refused; the running one stays: {}",
                    crate::error_chain(&e)
                );
                self.metrics.reloaded(false);
                return;
            }
            Some(Ok(wanted)) => wanted,
        };
        self.metrics.reloaded(true);
        info!(
            "{why}: applying the configuration ({} resources)",
            wanted.len()
        );
        let configured = self.resources.configured();
        let plan = reconcile::plan(
            configured.iter().map(|(name, r)| (name.as_str(), &**r)),
            wanted,
        );
        for name in &plan.remove {
            self.remove(name);
        }
        for resource in plan.update {
            if let Some(served) = self.resources.get_mut(&resource.resource_name) {
                let devices = self.node.discover(&resource);
                self.node.describe(&resource, &devices);
                served.plugin.update(Arc::new(resource), devices);
                info!("{}: configuration updated", served.plugin.resource_name());
            }
        }
        let kubelet_here = self.node.kubelet_present();
        for resource in plan.add {
            self.add(resource, kubelet_here);
        }
        self.node.watch(self.resources.watch_targets());
        // Nodes may have come or gone while the old targets were watched.
        self.refresh_devices();
    }

    /// Stops serving a resource: its streams end, its socket goes, the kubelet drops it.
    fn remove(&mut self, name: &str) {
        let Some(served) = self.resources.remove(name) else {
            return;
        };
        self.retries.remove(name);
        self.node.forget(name);
        served.plugin.close_streams();
        if let Some(server) = served.server {
            self.node.stop(server);
        }
        self.node.release(name);
        self.metrics.forget(name);
        info!("stopped serving {name}: no longer configured");
    }

    fn log_serving(&mut self, name: &str) {
        let Some(served) = self.resources.get_mut(name) else {
            return;
        };
        let snapshot = served.plugin.snapshot();
        let healthy = snapshot.devices.iter().filter(|d| d.healthy).count();
        info!(
            "serving {name} on {}: {} device(s), {healthy} healthy, each shared by up to {} containers",
            self.node.socket_path(&snapshot.resource).display(),
            snapshot.devices.len(),
            snapshot.resource.count,
        );
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
            None => info!("{resource}: {} appeared ({})", describe(d), d.health()),
            Some(b) if b.healthy != d.healthy => {
                let how = if d.healthy { "is back" } else { "is gone" };
                info!("{resource}: {} {how}: {}", describe(d), d.health());
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{Node as DeviceNode, Permissions};
    use std::cell::RefCell;
    use std::collections::{BTreeMap, BTreeSet};
    use std::path::Path;
    use std::rc::Rc;
    use std::time::Duration;

    /// What the controller did to the world, in order.
    #[derive(Clone, Debug, PartialEq, Eq)]
    enum Call {
        Serve(&'static str, u64),
        Stop(&'static str, u64),
        Register(&'static str, u64),
        Forget(&'static str),
        Release(&'static str),
        Retire(&'static str, u64),
        Watch(usize),
    }

    /// A node whose devices, sockets, kubelet, configuration file and clock the test sets, and
    /// which records every side effect.
    struct World {
        calls: Vec<Call>,
        /// Healthy devices by resource short name; a resource absent here has no nodes at all.
        devices: BTreeMap<String, bool>,
        /// Servers whose sockets someone removed.
        broken: BTreeSet<u64>,
        /// Resources whose next serve fails.
        failing: BTreeSet<String>,
        /// Resources another instance holds the lock of.
        held: BTreeSet<String>,
        kubelet: bool,
        config: Option<Result<Vec<Resource>, String>>,
        next_server: u64,
        /// The clock the controller reads; tests move it.
        now: Instant,
        /// Built-ins to serve once their devices are there.
        late: Vec<Resource>,
        /// What was described to the runtime, in order: resource short name and each device's
        /// health, with what the resource's ListAndWatch stream had sent by then.
        described: Vec<(String, Vec<bool>)>,
    }

    impl Default for World {
        fn default() -> World {
            World {
                calls: Vec::new(),
                devices: BTreeMap::new(),
                broken: BTreeSet::new(),
                failing: BTreeSet::new(),
                held: BTreeSet::new(),
                kubelet: false,
                config: None,
                next_server: 0,
                now: Instant::now(),
                late: Vec::new(),
                described: Vec::new(),
            }
        }
    }

    #[derive(Clone, Default)]
    struct Recorder(Rc<RefCell<World>>);

    struct FakeServer {
        name: &'static str,
        id: u64,
    }

    /// Short names live as long as the test; leaking a few bytes keeps `Call` comparable.
    fn short(resource: &Resource) -> &'static str {
        Box::leak(resource.name.clone().into_boxed_str())
    }

    impl Node for Recorder {
        type Server = FakeServer;

        fn discover(&self, resource: &Resource) -> Vec<Device> {
            let world = self.0.borrow();
            match world.devices.get(&resource.name) {
                None => vec![],
                Some(&healthy) => vec![Device {
                    id_prefix: resource.name.clone(),
                    nodes: vec![DeviceNode {
                        host_path: Path::new("/dev").join(&resource.name),
                        container_path: Path::new("/dev").join(&resource.name),
                    }],
                    healthy,
                    numa_node: None,
                    identity: None,
                }],
            }
        }

        fn serve(&mut self, plugin: &Plugin) -> Result<FakeServer, DaemonError> {
            let mut world = self.0.borrow_mut();
            let name = short(&plugin.resource());
            if world.failing.contains(name) {
                return Err(DaemonError::NoResources);
            }
            if world.held.contains(name) {
                return Err(DaemonError::Lock {
                    resource: plugin.resource_name().to_owned(),
                    source: crate::lock::LockError::Held {
                        path: PathBuf::from("/x/.kdp-locks/kdp-kvm.sock.lock"),
                        holder: "41".to_owned(),
                    },
                });
            }
            world.next_server += 1;
            let id = world.next_server;
            world.calls.push(Call::Serve(name, id));
            Ok(FakeServer { name, id })
        }

        fn intact(&self, server: &FakeServer) -> bool {
            !self.0.borrow().broken.contains(&server.id)
        }

        fn stop(&mut self, server: FakeServer) {
            self.0
                .borrow_mut()
                .calls
                .push(Call::Stop(server.name, server.id));
        }

        fn socket_path(&self, resource: &Resource) -> PathBuf {
            PathBuf::from(format!("/plugins/kdp-{}.sock", resource.name))
        }

        fn kubelet_present(&self) -> bool {
            self.0.borrow().kubelet
        }

        fn register(&mut self, plugin: &Plugin, server: &FakeServer) {
            let name = short(&plugin.resource());
            self.0
                .borrow_mut()
                .calls
                .push(Call::Register(name, server.id));
        }

        fn forget(&mut self, resource_name: &str) {
            let name = resource_name.rsplit('/').next().unwrap_or_default();
            let name: &'static str = Box::leak(name.to_owned().into_boxed_str());
            self.0.borrow_mut().calls.push(Call::Forget(name));
        }

        fn load(&self) -> Option<Result<Vec<Resource>, ConfigError>> {
            self.0.borrow().config.clone().map(|c| {
                c.map_err(|message| {
                    crate::config::parse(&message, Path::new("bad.yaml"), Path::new("/dev"))
                        .expect_err("the test's bad configuration is refused")
                })
            })
        }

        fn watch(&mut self, targets: Vec<WatchTarget>) {
            self.0.borrow_mut().calls.push(Call::Watch(targets.len()));
        }

        fn late(&self) -> Vec<Resource> {
            self.0.borrow().late.clone()
        }

        fn retire(&mut self, resource_name: &str, server: FakeServer) {
            let name = resource_name.rsplit('/').next().unwrap_or_default();
            assert_eq!(name, server.name);
            self.0
                .borrow_mut()
                .calls
                .push(Call::Retire(server.name, server.id));
        }

        fn release(&mut self, resource_name: &str) {
            let name = resource_name.rsplit('/').next().unwrap_or_default();
            let name: &'static str = Box::leak(name.to_owned().into_boxed_str());
            self.0.borrow_mut().calls.push(Call::Release(name));
        }

        fn describe(&mut self, resource: &Resource, devices: &[Device]) {
            let health = devices.iter().map(|d| d.healthy).collect();
            self.0
                .borrow_mut()
                .described
                .push((short(resource).to_owned(), health));
        }

        fn now(&self) -> Instant {
            self.0.borrow().now
        }
    }

    fn builtin(name: &str, count: u32) -> Resource {
        Resource::builtin(name, Path::new("/dev"), count, Permissions::default()).unwrap()
    }

    struct Harness {
        world: Recorder,
        controller: Controller<Recorder>,
        metrics: Arc<Metrics>,
    }

    impl Harness {
        fn new(kubelet: bool, devices: &[(&str, bool)]) -> Harness {
            let world = Recorder::default();
            world.0.borrow_mut().kubelet = kubelet;
            for (name, healthy) in devices {
                world
                    .0
                    .borrow_mut()
                    .devices
                    .insert((*name).into(), *healthy);
            }
            let metrics = Arc::new(Metrics::new());
            let controller =
                Controller::new(world.clone(), Arc::clone(&metrics), "/plugins".into());
            Harness {
                world,
                controller,
                metrics,
            }
        }

        fn started(kubelet: bool, resources: &[&str]) -> Harness {
            let devices: Vec<(&str, bool)> = resources.iter().map(|r| (*r, true)).collect();
            let mut h = Harness::new(kubelet, &devices);
            h.controller
                .start(resources.iter().map(|r| builtin(r, 2)).collect());
            h.take_calls();
            h
        }

        fn take_calls(&self) -> Vec<Call> {
            std::mem::take(&mut self.world.0.borrow_mut().calls)
        }

        fn world(&self) -> std::cell::RefMut<'_, World> {
            self.world.0.borrow_mut()
        }

        fn handle(&mut self, event: Event) -> Flow {
            self.controller.handle(event)
        }

        fn served(&mut self) -> Vec<String> {
            self.controller.resources.names()
        }

        fn plugin(&mut self, resource_name: &str) -> Plugin {
            self.controller
                .resources
                .get_mut(resource_name)
                .unwrap()
                .plugin
                .clone()
        }
    }

    const KVM: &str = "devices.anza-labs.dev/kvm";
    const TUN: &str = "devices.anza-labs.dev/tun";
    const FUSE: &str = "devices.anza-labs.dev/fuse";

    #[test]
    fn start_serves_then_registers_each_resource_when_the_kubelet_is_there() {
        let mut h = Harness::new(true, &[("kvm", true), ("tun", true)]);
        h.controller
            .start(vec![builtin("kvm", 2), builtin("tun", 2)]);
        assert_eq!(
            h.take_calls(),
            [
                Call::Serve("kvm", 1),
                Call::Register("kvm", 1),
                Call::Serve("tun", 2),
                Call::Register("tun", 2),
            ]
        );
    }

    #[test]
    fn start_without_a_kubelet_serves_and_waits() {
        let mut h = Harness::new(false, &[("kvm", true)]);
        h.controller.start(vec![builtin("kvm", 2)]);
        assert_eq!(h.take_calls(), [Call::Serve("kvm", 1)]);
    }

    #[test]
    fn one_resource_that_cannot_serve_does_not_stop_the_others() {
        let mut h = Harness::new(true, &[]);
        h.world().failing.insert("kvm".into());
        h.controller
            .start(vec![builtin("kvm", 2), builtin("tun", 2)]);
        assert_eq!(
            h.take_calls(),
            [Call::Serve("tun", 1), Call::Register("tun", 1)]
        );
        // The failed one is still tracked, and tried again when the kubelet restarts.
        h.world().failing.clear();
        assert!(matches!(
            h.handle(Event::KubeletSocketCreated),
            Flow::Continue
        ));
        assert_eq!(
            h.take_calls(),
            [
                Call::Serve("kvm", 2),
                Call::Register("kvm", 2),
                Call::Register("tun", 1),
            ]
        );
    }

    #[test]
    fn a_resource_another_instance_holds_stands_by_ready_and_takes_over_when_its_lock_goes() {
        let mut h = Harness::new(true, &[]);
        h.world().held.insert("kvm".into());
        h.controller
            .start(vec![builtin("kvm", 2), builtin("tun", 2)]);
        assert_eq!(
            h.take_calls(),
            [Call::Serve("tun", 1), Call::Register("tun", 1)]
        );
        h.handle(Event::Registered(TUN.to_owned()));
        h.metrics.listed(TUN);
        // Ready while the other instance serves kvm: a surge rollout waits for exactly this.
        assert_eq!(h.metrics.ready(), Ok(()));
        // Another lock file came or went, but ours is still held: tried, still standing by.
        h.handle(Event::LocksChanged);
        assert!(h.take_calls().is_empty());
        assert_eq!(h.metrics.ready(), Ok(()));
        // The other instance let go: taken over at once, long before the backoff is due.
        h.world().held.clear();
        let before = h.world().now;
        h.handle(Event::LocksChanged);
        assert_eq!(h.world().now, before);
        assert_eq!(
            h.take_calls(),
            [Call::Serve("kvm", 2), Call::Register("kvm", 2)]
        );
        // Serving now, kvm counts again: not ready until the kubelet has it.
        assert!(h.metrics.ready().unwrap_err().contains("kvm"));
        h.handle(Event::Registered(KVM.to_owned()));
        h.metrics.listed(KVM);
        assert_eq!(h.metrics.ready(), Ok(()));
        assert_eq!(h.controller.deadline(), None);
    }

    #[test]
    fn a_lock_file_event_does_not_hurry_other_failures() {
        let mut h = Harness::new(true, &[]);
        h.world().failing.insert("kvm".into());
        h.controller.start(vec![builtin("kvm", 2)]);
        h.world().failing.clear();
        h.handle(Event::LocksChanged);
        assert!(
            h.take_calls().is_empty(),
            "a bind failure waits for its backoff"
        );
    }

    #[test]
    fn a_resource_that_cannot_serve_is_retried_with_growing_waits_and_never_ends_the_loop() {
        let mut h = Harness::new(true, &[]);
        h.world().failing.insert("kvm".into());
        h.controller.start(vec![builtin("kvm", 2)]);
        assert!(h.take_calls().is_empty());
        let start = h.world().now;
        assert_eq!(h.controller.deadline(), Some(start + RETRY_FIRST));
        assert!(h.metrics.ready().unwrap_err().contains("not serving"));
        // Not yet due: nothing is tried.
        h.controller.retry_due();
        assert!(h.take_calls().is_empty());
        // Each failure doubles the wait, up to the cap.
        let mut waits = Vec::new();
        for _ in 0..6 {
            let due = h.controller.deadline().unwrap();
            waits.push(due - h.world().now);
            h.world().now = due;
            h.controller.retry_due();
        }
        assert_eq!(
            waits,
            [250, 500, 1000, 2000, 4000, 4000].map(Duration::from_millis)
        );
        // Once it serves, it registers, and no retry is left to wake the loop.
        h.world().failing.clear();
        let due = h.controller.deadline().unwrap();
        h.world().now = due;
        h.controller.retry_due();
        assert_eq!(
            h.take_calls(),
            [Call::Serve("kvm", 1), Call::Register("kvm", 1)]
        );
        assert_eq!(h.controller.deadline(), None);
    }

    #[test]
    fn a_built_in_whose_node_appears_later_is_served_then() {
        let mut h = Harness::new(true, &[]);
        h.world().late = vec![builtin("kvm", 2), builtin("tun", 2)];
        h.controller.start(vec![]);
        assert!(h.take_calls().is_empty());
        // Something else changed: still nothing to serve.
        h.handle(Event::DevicesChanged);
        assert!(h.take_calls().is_empty());
        // kvm_intel loaded: /dev/kvm appeared.
        h.world().devices.insert("kvm".into(), true);
        h.handle(Event::DevicesChanged);
        assert_eq!(
            h.take_calls(),
            [Call::Serve("kvm", 1), Call::Register("kvm", 1)]
        );
        assert_eq!(h.served(), [KVM]);
        // Once served it stays, Unhealthy while its node is gone.
        h.world().devices.insert("kvm".into(), false);
        h.handle(Event::DevicesChanged);
        assert!(h.take_calls().is_empty());
        assert_eq!(h.served(), [KVM]);
        // SIGHUP looks again too.
        h.world().devices.insert("tun".into(), true);
        h.handle(Event::Reload);
        assert_eq!(
            h.take_calls(),
            [Call::Serve("tun", 2), Call::Register("tun", 2)]
        );
    }

    #[test]
    fn a_refused_registration_serves_on_fresh_sockets_after_a_wait_that_grows() {
        let mut h = Harness::started(false, &["kvm"]);
        h.metrics.registered(KVM);
        h.metrics.listed(KVM);
        let refused = || Event::RegistrationRefused {
            resource: KVM.into(),
            error: "bad endpoint".into(),
        };
        h.handle(refused());
        assert!(h.metrics.ready().unwrap_err().contains("bad endpoint"));
        let first = h.controller.deadline().unwrap() - h.world().now;
        h.world().now += first;
        h.controller.retry_due();
        assert_eq!(
            h.take_calls(),
            [Call::Stop("kvm", 1), Call::Serve("kvm", 2)]
        );
        assert_eq!(h.controller.deadline(), None);
        // Refused again: a longer wait, not a tight loop.
        h.handle(refused());
        let second = h.controller.deadline().unwrap() - h.world().now;
        assert!(second > first, "{first:?} then {second:?}");
        // Accepted: the next refusal starts from the shortest wait again.
        h.handle(Event::Registered(KVM.into()));
        assert_eq!(h.controller.deadline(), None);
        assert!(h.metrics.ready().is_err(), "not listed yet");
    }

    #[test]
    fn a_kubelet_restart_restarts_wiped_servers_and_registers_everything_again() {
        let mut h = Harness::started(true, &["kvm", "tun"]);
        h.metrics.registered(KVM);
        h.metrics.listed(KVM);
        // The kubelet wiped kvm's socket; tun's (say, in another directory) survived.
        h.world().broken.insert(1);
        h.handle(Event::KubeletSocketCreated);
        assert_eq!(
            h.take_calls(),
            [
                Call::Stop("kvm", 1),
                Call::Serve("kvm", 3),
                Call::Register("kvm", 3),
                Call::Register("tun", 2),
            ]
        );
        assert!(h.metrics.ready().is_err(), "readiness resets on a restart");
    }

    #[test]
    fn a_removed_socket_of_ours_is_served_and_registered_again() {
        let mut h = Harness::started(true, &["kvm", "tun"]);
        h.world().broken.insert(2);
        h.handle(Event::SocketRemoved("kdp-tun.sock".into()));
        assert_eq!(
            h.take_calls(),
            [
                Call::Stop("tun", 2),
                Call::Serve("tun", 3),
                Call::Register("tun", 3)
            ]
        );
    }

    #[test]
    fn a_socket_we_replaced_ourselves_or_someone_elses_changes_nothing() {
        let mut h = Harness::started(true, &["kvm"]);
        // Our socket is intact: the removal was of the one we replaced.
        h.handle(Event::SocketRemoved("kdp-kvm.sock".into()));
        h.handle(Event::SocketRemoved("kdp-other.sock".into()));
        assert_eq!(h.take_calls(), []);
    }

    #[test]
    fn without_a_kubelet_a_removed_socket_is_served_but_not_registered() {
        let mut h = Harness::started(false, &["kvm"]);
        h.world().broken.insert(1);
        h.handle(Event::SocketRemoved("kdp-kvm.sock".into()));
        assert_eq!(
            h.take_calls(),
            [Call::Stop("kvm", 1), Call::Serve("kvm", 2)]
        );
    }

    #[test]
    fn a_device_change_updates_the_list_without_touching_servers() {
        let mut h = Harness::started(true, &["kvm"]);
        let plugin = h.plugin(KVM);
        let stream = plugin.subscribe();
        assert!(stream.recv().is_some(), "the first list");
        h.world().devices.insert("kvm".into(), false);
        h.handle(Event::DevicesChanged);
        let list = stream.recv().expect("a new list after the change");
        assert!(!list.devices[0].healthy);
        h.world().devices.remove("kvm");
        h.handle(Event::DevicesChanged);
        assert!(stream.recv().expect("another list").devices.is_empty());
        assert_eq!(h.take_calls(), []);
    }

    #[test]
    fn the_runtime_is_told_of_devices_at_start_and_before_the_kubelet_on_every_change() {
        let mut h = Harness::started(true, &["kvm"]);
        assert_eq!(h.world().described, [("kvm".to_owned(), vec![true])]);
        let plugin = h.plugin(KVM);
        let stream = plugin.subscribe();
        assert!(stream.recv().is_some(), "the first list");
        h.world().devices.insert("kvm".into(), false);
        h.handle(Event::DevicesChanged);
        // Described with the new health, which the kubelet's stream then gets too.
        assert_eq!(
            h.world().described.last(),
            Some(&("kvm".to_owned(), vec![false]))
        );
        assert!(!stream.recv().expect("the new list").devices[0].healthy);
    }

    #[test]
    fn a_reload_removes_adds_and_updates_and_watches_the_new_targets() {
        let mut h = Harness::started(true, &["kvm", "tun"]);
        h.world().devices.insert("fuse".into(), true);
        h.world().config = Some(Ok(vec![builtin("kvm", 7), builtin("fuse", 2)]));
        h.handle(Event::ConfigChanged);
        assert_eq!(
            h.take_calls(),
            [
                Call::Forget("tun"),
                Call::Stop("tun", 2),
                Call::Release("tun"),
                Call::Serve("fuse", 3),
                Call::Register("fuse", 3),
                Call::Watch(2),
            ]
        );
        assert_eq!(h.served(), [FUSE, KVM]);
        assert_eq!(h.plugin(KVM).resource().count, 7, "updated in place");
    }

    #[test]
    fn a_refused_configuration_changes_nothing() {
        let mut h = Harness::started(true, &["kvm"]);
        h.world().config = Some(Err("resources: [{name: kvm, count: 0}]".into()));
        h.handle(Event::Reload);
        assert_eq!(h.take_calls(), []);
        assert_eq!(h.served(), [KVM]);
        assert!(h.metrics.encode().contains(r#"result="refused"} 1"#));
    }

    #[test]
    fn sighup_without_a_file_restarts_missing_servers_only() {
        let mut h = Harness::started(true, &["kvm", "tun"]);
        h.world().broken.insert(1);
        h.handle(Event::Reload);
        assert_eq!(
            h.take_calls(),
            [Call::Stop("kvm", 1), Call::Serve("kvm", 3)]
        );
    }

    #[test]
    fn a_resync_checks_everything_and_registers_if_the_kubelet_is_there() {
        let mut h = Harness::started(true, &["kvm"]);
        h.world().broken.insert(1);
        h.handle(Event::Resync);
        assert_eq!(
            h.take_calls(),
            [
                Call::Stop("kvm", 1),
                Call::Serve("kvm", 2),
                Call::Register("kvm", 2)
            ]
        );
        h.world().kubelet = false;
        h.handle(Event::Resync);
        assert_eq!(h.take_calls(), []);
    }

    #[test]
    fn a_resync_reads_the_configuration_file_again() {
        // A write of the file may be among the events an overflow lost.
        let mut h = Harness::started(true, &["kvm"]);
        h.world().devices.insert("tun".into(), true);
        h.world().config = Some(Ok(vec![builtin("kvm", 2), builtin("tun", 2)]));
        h.handle(Event::Resync);
        let calls = h.take_calls();
        assert!(calls.contains(&Call::Serve("tun", 2)), "{calls:?}");
        assert_eq!(h.served(), [KVM, TUN]);
    }

    #[test]
    fn registration_results_only_count() {
        let mut h = Harness::started(true, &["kvm"]);
        h.handle(Event::Registered(KVM.into()));
        h.handle(Event::KubeletSocketRemoved);
        assert_eq!(h.take_calls(), []);
        assert!(h
            .metrics
            .encode()
            .contains(r#"kdp_registrations_total{resource="devices.anza-labs.dev/kvm"} 1"#));
    }

    #[test]
    fn shutdown_signals_and_failures_end_the_loop() {
        let mut h = Harness::started(true, &["kvm", "tun"]);
        assert!(matches!(
            h.handle(Event::Shutdown("SIGTERM")),
            Flow::Stop(Ok(()))
        ));
        assert!(matches!(
            h.handle(Event::PluginDirGone("/plugins".into())),
            Flow::Stop(Err(DaemonError::PluginDirGone { .. }))
        ));
        assert!(matches!(
            h.handle(Event::InotifyFailed),
            Flow::Stop(Err(DaemonError::InotifyFailed))
        ));
        assert!(matches!(
            h.handle(Event::ThreadPanicked("http".into())),
            Flow::Stop(Err(DaemonError::ThreadPanicked { .. }))
        ));
        let plugin = h.plugin(TUN);
        let stream = plugin.subscribe();
        h.controller.shutdown();
        // Each resource is let go right after its server stops: an instance waiting to take
        // over starts then, not when this process has finished exiting.
        assert_eq!(
            h.take_calls(),
            [Call::Retire("kvm", 1), Call::Retire("tun", 2)]
        );
        stream.recv();
        assert!(stream.recv().is_none(), "streams end at shutdown");
    }
}
