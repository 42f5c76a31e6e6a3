//! The control loop's decisions (main thread), for both frontends: what each event causes, which
//! endpoints to serve again, what to register, what a reload adds, removes or changes, when to
//! retry and when to stand by. Everything it does to the world goes through [`Host`] (the node:
//! devices, configuration, inotify targets, the clock) and [`Frontend`] (the device plugin or the
//! DRA driver), so the decisions are tested in-process against a recording fake in both modes;
//! the live implementations are in `daemon.rs`, `device_plugin/` and `dra/`.

pub mod reconcile;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, error, info, log, warn, Level};

use crate::config::ConfigError;
use crate::device::{healthy_ids, Device, Found, Inventory, Resource, WatchTarget};
use crate::event::Event;
use crate::lock::LockError;
use crate::metrics::Metrics;

/// The node around the control loop: what both frontends read the same way.
pub trait Host {
    /// The devices of `resource` on the node now, each device that stays present keeping its ID.
    fn discover(&mut self, resource: &Resource) -> Vec<Device>;
    /// Reads the configuration again; `None` when it comes from flags only.
    fn load(&self) -> Option<Result<Vec<Resource>, ConfigError>>;
    /// Watches these device entries from now on.
    fn watch(&mut self, targets: Vec<WatchTarget>);
    /// Built-ins to serve once their nodes appear (see `Sources::late`).
    fn late(&self) -> Vec<Resource>;
    /// The time now, for retries.
    fn now(&self) -> Instant;
    /// Labels the node with `resource`'s healthy device IDs (NFD's feature file), or takes the
    /// label away (`None`).
    fn label(&mut self, resource: &str, healthy: Option<u64>);
    /// Whether `resource`'s label is still in place (no one removed its file).
    fn label_present(&self, resource: &str) -> bool;
}

/// How the devices reach the kubelet: the side effects one frontend needs, and nothing else.
/// An endpoint is what serves on sockets of its own under one lock: one per resource for the
/// device plugin, one for the whole driver in DRA mode.
pub trait Frontend {
    /// A running server for one endpoint.
    type Server;
    /// The endpoints that serve this device model, by name, each with the resources it serves.
    fn endpoints(&self, inventory: &Inventory) -> BTreeMap<String, Vec<String>>;
    /// Whether the frontend can serve `resource` at all (names it must fit in, for example); the
    /// problem if not.
    fn check(&self, resource: &Resource) -> Result<(), String>;
    /// Takes the latest device model, whole: every configured resource with its devices.
    fn publish(&mut self, inventory: &Inventory);
    /// Starts serving `endpoint` on fresh sockets, taking its lock first if it is not ours yet.
    fn serve(&mut self, endpoint: &str) -> Result<Self::Server, ServeError>;
    /// Whether the server's sockets are still in place.
    fn intact(&self, server: &Self::Server) -> bool;
    /// Stops a server to serve again: its streams end and its sockets go if they are still ours.
    fn stop(&mut self, endpoint: &str, server: Self::Server);
    /// Lets other instances serve `endpoint` (no longer wanted, or its server could not start).
    fn release(&mut self, endpoint: &str);
    /// Takes again every lock whose file was deleted under us. Where another instance took it
    /// first, lets go of the endpoint, leaving every file it shares (CDI specs, checkpoint) to
    /// that instance, and returns it: the caller stops its server, and it stands by.
    fn keep_locks(&mut self) -> Vec<String>;
    /// Stops an endpoint's server for good (the process is ending) and lets the endpoint go.
    fn retire(&mut self, endpoint: &str, server: Self::Server);
    /// Whether `kubelet.sock` exists (always false where we never dial it).
    fn kubelet_present(&self) -> bool;
    /// Asks for a registration through `kubelet.sock`; the answer comes as `Event::Registered`.
    fn register(&mut self, endpoint: &str, server: &Self::Server);
    /// Asks at once, through `kubelet.sock` in either registration mode, that the kubelet which
    /// ended our stream take the same server back; false where that cannot be asked (no
    /// `kubelet.sock`, or a frontend the kubelet does not stream from).
    fn register_again(&mut self, endpoint: &str, server: &Self::Server) -> bool;
    /// Drops pending registrations of an endpoint that stopped.
    fn forget(&mut self, endpoint: &str);
    /// The kubelet accepted `endpoint`.
    fn registered(&mut self, endpoint: &str);
    /// Whether another instance of ours serves `endpoint` on this node now (a surge rollout's
    /// other pod, say).
    fn another_instance_serves(&self, endpoint: &str) -> bool;
    /// The endpoint whose socket has this file name, if any.
    fn endpoint_of_socket(&self, file_name: &OsStr) -> Option<String>;
    /// Where `endpoint` serves, for the log.
    fn location(&self, endpoint: &str) -> PathBuf;
    /// What readiness waits for once the kubelet has an endpoint, for `/readyz`.
    fn listing(&self) -> &'static str;
    /// When the frontend has periodic work due, if ever.
    fn deadline(&self) -> Option<Instant>;
    /// Does the periodic work due at `now`.
    fn tick(&mut self, now: Instant);
}

/// Why an endpoint could not serve.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Another instance holds its lock: we stand by, ready to take over.
    #[error("cannot serve {endpoint}")]
    Held {
        /// The endpoint.
        endpoint: String,
        /// Who holds it.
        #[source]
        source: LockError,
    },
    /// Anything else: a lock that cannot be taken, a bind that fails, a thread that does not
    /// start.
    #[error("cannot serve {endpoint}")]
    Failed {
        /// The endpoint.
        endpoint: String,
        /// What failed.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Why the control loop ended the process.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The directory of our sockets went away under us.
    #[error("the directory {path}, which holds our sockets, was removed; exiting so that we start again cleanly")]
    SocketDirGone {
        /// The directory that went.
        path: PathBuf,
    },
    /// The inotify thread stopped.
    #[error(
        "the inotify thread stopped; exiting rather than miss kubelet restarts and device changes"
    )]
    InotifyFailed,
    /// A thread of ours panicked.
    #[error("the {name} thread panicked; exiting rather than go on without it")]
    ThreadPanicked {
        /// The thread's name.
        name: String,
    },
}

/// The first wait before serving an endpoint again after a failure; it doubles with every
/// failure up to `RETRY_MAX`. Short, because the usual cause is brief: another instance on its
/// way out (a rollout), a socket directory being recreated.
pub const RETRY_FIRST: Duration = Duration::from_millis(250);
/// The longest wait between tries: how late, at most, we take over from an instance that ended
/// (one killed with SIGKILL lets its lock go without a trace inotify could see).
pub const RETRY_MAX: Duration = Duration::from_secs(4);
/// How soon after a lost stream a second loss still counts as the kubelet tearing down the
/// clients it dropped, not as something taking turns with us.
const TEARDOWN: Duration = Duration::from_millis(500);

/// An endpoint to serve again once `at` has passed.
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
    /// Whether the kubelet dropped our stream: we serve and register again, but only once no
    /// other instance serves the endpoint (the kubelet then holds that one's, and taking it
    /// back would only make the two take turns).
    lost: bool,
}

/// Whether the control loop goes on after an event.
#[derive(Debug)]
pub enum Flow {
    /// Wait for the next event.
    Continue,
    /// Stop, with the process's outcome.
    Stop(Result<(), ControlError>),
}

/// The control loop's state and decisions.
pub struct Controller<H: Host, F: Frontend> {
    host: H,
    frontend: F,
    metrics: Arc<Metrics>,
    /// The device model: each configured resource with the devices found for it.
    inventory: Inventory,
    /// Every endpoint the frontend serves, with its running server (`None` while it could not
    /// start), by name.
    endpoints: BTreeMap<String, Option<F::Server>>,
    /// Endpoints waiting to serve (again), by name.
    retries: BTreeMap<String, Retry>,
    /// When each endpoint was first registered again at once after a lost stream lately, and
    /// how many times since.
    losses: BTreeMap<String, (Instant, u32)>,
    /// Endpoints another instance of ours served at the last look (a lock change, a serve),
    /// and when one stopped serving each: a rollout's old pod that just left.
    others_here: BTreeSet<String>,
    others_left: BTreeMap<String, Instant>,
    /// The node labels we last set: each resource's endpoint and healthy device IDs.
    labelled: BTreeMap<String, (String, u64)>,
}

impl<H: Host, F: Frontend> Controller<H, F> {
    /// A controller serving nothing yet.
    pub fn new(host: H, frontend: F, metrics: Arc<Metrics>) -> Controller<H, F> {
        Controller {
            host,
            frontend,
            metrics,
            inventory: Inventory::new(),
            endpoints: BTreeMap::new(),
            retries: BTreeMap::new(),
            losses: BTreeMap::new(),
            others_here: BTreeSet::new(),
            others_left: BTreeMap::new(),
            labelled: BTreeMap::new(),
        }
    }

    /// Gives the host and the frontend back once the loop is over, to stop what they run.
    pub fn into_parts(self) -> (H, F) {
        (self.host, self.frontend)
    }

    /// Serves the resources configured at start, registering each endpoint as soon as it
    /// serves. An endpoint that cannot serve (another instance holds it, a stray file sits where
    /// its socket belongs, a bind fails) must not take the others down, nor end the process: it
    /// is logged once and tried again with backoff (see [`Controller::deadline`]) until it
    /// serves.
    pub fn start(&mut self, resources: Vec<Resource>) {
        for resource in resources {
            self.insert(resource);
        }
        self.apply_endpoints();
        self.relabel();
        // Only now does an empty set of endpoints mean there is nothing to serve.
        self.metrics.started();
        if self.inventory.is_empty() {
            if self.host.late().is_empty() {
                warn!("no resources configured; waiting for the configuration file to change");
            } else {
                warn!("no built-in device node exists yet; each built-in is served once its node appears");
            }
        }
    }

    /// When the next retry or periodic work is due, if any: the control loop waits for events
    /// until then. With every endpoint served there is no retry, and the loop sleeps until an
    /// event comes.
    pub fn deadline(&self) -> Option<Instant> {
        self.retries
            .values()
            .filter(|r| r.pending)
            .map(|r| r.at)
            .chain(self.frontend.deadline())
            .min()
    }

    /// Serves again every endpoint whose retry is due; those that fail again wait longer. Does
    /// the frontend's periodic work if it is due.
    pub fn retry_due(&mut self) {
        self.retry_due_endpoints();
        self.relabel();
    }

    fn retry_due_endpoints(&mut self) {
        let now = self.host.now();
        if self.frontend.deadline().is_some_and(|at| at <= now) {
            self.frontend.tick(now);
        }
        let due: Vec<String> = self
            .retries
            .iter()
            .filter(|(_, r)| r.pending && r.at <= now)
            .map(|(name, _)| name.clone())
            .collect();
        for name in due {
            let lost = self.retries.get(&name).is_some_and(|r| r.lost);
            if lost && self.frontend.another_instance_serves(&name) {
                let reason = format!(
                    "the kubelet holds another instance's endpoint for {name}; \
                     registering again once that instance is gone"
                );
                self.metrics.standby(&name, &reason);
                self.schedule_retry(&name, &reason, Level::Info);
                if let Some(retry) = self.retries.get_mut(&name) {
                    retry.lost = true;
                    retry.locked = true;
                }
                continue;
            }
            if self.restart(&name) {
                info!("{name}: serving after an earlier failure");
                if self.frontend.kubelet_present() {
                    self.register(&name);
                }
                self.log_serving(&name);
            }
        }
    }

    /// Reacts to one event.
    pub fn handle(&mut self, event: Event) -> Flow {
        let flow = self.react(event);
        self.relabel();
        flow
    }

    fn react(&mut self, event: Event) -> Flow {
        match event {
            Event::KubeletSocketCreated => {
                if self.frontend.kubelet_present() {
                    info!(
                        "the kubelet (re)started: registering {} endpoints again",
                        self.endpoints.len()
                    );
                } else {
                    info!("the kubelet (re)started: its plugin watcher registers us again");
                }
                // Ready again only once the new kubelet holds every endpoint.
                self.metrics.kubelet_restarted();
                self.restart_missing_servers();
                self.register_all();
            }
            Event::KubeletSocketRemoved => {
                info!("kubelet.sock was removed; waiting for the kubelet to return");
            }
            Event::SocketRemoved(name) => {
                if let Some(endpoint) = self.frontend.endpoint_of_socket(&name) {
                    self.socket_removed(&endpoint);
                }
            }
            Event::DevicesChanged => {
                self.refresh_devices();
                self.adopt_late();
            }
            Event::LocksChanged => {
                self.look_for_others();
                // One of ours may be the file that went (a cleanup script): take it again before
                // another instance takes the same slot, or stand down if one did.
                self.keep_locks();
                // The instance we wait for may have let go: try now rather than at the next
                // backoff step, so that a rollout's handover leaves the kubelet without our
                // devices for as short a time as we can make it.
                let now = self.host.now();
                for retry in self.retries.values_mut() {
                    if retry.pending && retry.locked {
                        retry.at = now;
                    }
                }
                self.retry_due_endpoints();
            }
            Event::LabelsChanged => self.restore_labels(),
            Event::ConfigChanged => self.reload("the configuration file changed"),
            Event::Reload => self.reload("SIGHUP received"),
            Event::Resync => {
                info!("checking sockets, devices, registrations and the configuration again");
                // A change of the configuration file may be among the events lost.
                if self.host.load().is_some() {
                    self.reload("inotify events were lost");
                }
                self.keep_locks();
                self.refresh_devices();
                self.adopt_late();
                self.restart_missing_servers();
                self.restore_labels();
                if self.frontend.kubelet_present() {
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
            Event::StreamLost(name) => {
                if !self.endpoints.contains_key(&name) {
                    return Flow::Continue;
                }
                self.metrics.lost(&name);
                if self.register_again_at_once(&name) {
                    return Flow::Continue;
                }
                // Not registered any more, whatever the kubelet said before: serve on fresh
                // sockets (the plugin watcher dials only a new one) and register again, after
                // the same growing wait as a refusal.
                let failure = format!("the kubelet ended its ListAndWatch stream of {name}");
                self.schedule_retry(&name, &failure, Level::Warn);
                if let Some(retry) = self.retries.get_mut(&name) {
                    retry.lost = true;
                }
            }
            Event::Registered(name) => {
                self.retries.remove(&name);
                self.metrics.registered(&name);
                self.frontend.registered(&name);
            }
            Event::SocketDirGone(path) => {
                return Flow::Stop(Err(ControlError::SocketDirGone { path }))
            }
            Event::InotifyFailed => return Flow::Stop(Err(ControlError::InotifyFailed)),
            Event::ThreadPanicked(name) => {
                return Flow::Stop(Err(ControlError::ThreadPanicked { name }))
            }
            Event::Shutdown(signal) => {
                info!("{signal} received: shutting down");
                return Flow::Stop(Ok(()));
            }
            Event::Ping(pong) => pong.answer(),
        }
        Flow::Continue
    }

    /// After the kubelet ended our stream while another instance of ours serves the resource:
    /// the same server registered again at once, when the last such loss is a while ago.
    /// Kubelets 1.25 to 1.36 end it when another instance's stream ends (a surge rollout's old pod exiting), and refuse every pod asking for the
    /// resource until something registers again: each millisecond counts. The same server, so
    /// that no stream of ours ends by our hand, which the kubelet would take out on whoever it
    /// holds; a loss that comes back soon (something takes turns with us) meets the growing
    /// wait instead.
    fn register_again_at_once(&mut self, name: &str) -> bool {
        let now = self.host.now();
        // A second loss right after the first registration again is the same kubelet's doing:
        // 1.25 to 1.36 disconnect whichever client holds the name once each dropped stream's
        // teardown ends, and ours can land before the second teardown (seen on 1.36.3 and on the
        // fake kubelet that models it). Answered at once too, once the other instance is gone; a
        // third, a later second, or one while it still serves is something taking turns with us.
        let episode = self
            .losses
            .get(name)
            .filter(|(first, _)| now.saturating_duration_since(*first) < RETRY_MAX)
            .copied();

        // Only while another instance of ours serves the resource or just stopped (a rollout's
        // old pod on its way out): that is when those kubelets drop us. Alone, the stream's end
        // is the kubelet's own doing (its plugin watcher replacing a registration, as after a
        // node reboot), and it registers us again itself: a registration of ours beside the
        // watcher's makes 1.37 refuse the watcher's and lose track of the socket for good.
        // Looked at now: the old pod lets its lock go right after its stream ends, so the
        // kubelet's disconnect can reach us with the lock gone and its LocksChanged still queued.
        self.look_for_other(name);
        if let Some((first, times)) = episode {
            // While the other instance still serves, the kubelet keeps dropping us for it.
            if times >= 2
                || now.saturating_duration_since(first) >= TEARDOWN
                || self.others_here.contains(name)
            {
                return false;
            }
        }
        let left_lately = self
            .others_left
            .get(name)
            .is_some_and(|left| now.saturating_duration_since(*left) < RETRY_MAX);
        if !left_lately && !self.others_here.contains(name) {
            return false;
        }
        let Some(Some(server)) = self.endpoints.get(name) else {
            return false;
        };
        if !self.frontend.register_again(name, server) {
            return false;
        }
        warn!("the kubelet ended its ListAndWatch stream of {name}; registering it again at once");
        let (first, times) = episode.unwrap_or((now, 0));
        self.losses.insert(name.to_owned(), (first, times + 1));
        true
    }

    /// Notes which endpoints another instance of ours serves now, and when one stopped.
    fn look_for_others(&mut self) {
        let names: Vec<String> = self.endpoints.keys().cloned().collect();
        for name in names {
            self.look_for_other(&name);
        }
    }

    /// Notes whether another instance of ours serves `name` now, or stopped since the last look.
    fn look_for_other(&mut self, name: &str) {
        if self.frontend.another_instance_serves(name) {
            self.others_here.insert(name.to_owned());
        } else if self.others_here.remove(name) {
            self.others_left.insert(name.to_owned(), self.host.now());
        }
    }

    /// Stops every server, ending its streams first, and lets each endpoint go as soon as its
    /// server is down: an instance waiting to take over (a rollout's new pod) starts then.
    pub fn shutdown(&mut self) {
        // Before the locks go: an instance that takes over labels the node itself, and must not
        // see its label taken away after it set it.
        for (resource, (endpoint, _)) in std::mem::take(&mut self.labelled) {
            self.unlabel(&resource, &endpoint);
        }
        for (name, server) in std::mem::take(&mut self.endpoints) {
            match server {
                Some(server) => self.frontend.retire(&name, server),
                None => self.frontend.release(&name),
            }
        }
    }

    /// Adds a resource to the device model, with its devices as found now.
    fn insert(&mut self, resource: Resource) {
        let devices = self.host.discover(&resource);
        self.metrics
            .set_devices(&resource.resource_name, &devices, resource.count);
        self.inventory.insert(
            resource.resource_name.clone(),
            Found {
                resource: Arc::new(resource),
                devices,
            },
        );
    }

    /// Hands the frontend the device model, then makes the endpoints match it: those no longer
    /// wanted stop, new ones serve and register.
    fn apply_endpoints(&mut self) {
        let wanted = self.frontend.endpoints(&self.inventory);
        let gone: Vec<String> = self
            .endpoints
            .keys()
            .filter(|name| !wanted.contains_key(*name))
            .cloned()
            .collect();
        for name in &gone {
            self.remove_endpoint(name);
        }
        self.frontend.publish(&self.inventory);
        let kubelet_here = self.frontend.kubelet_present();
        for name in wanted.into_keys() {
            if self.endpoints.contains_key(&name) {
                continue;
            }
            self.metrics.track(&name, self.frontend.listing());
            self.endpoints.insert(name.clone(), None);
            if !self.restart(&name) {
                continue;
            }
            if kubelet_here {
                self.register(&name);
            }
            self.log_serving(&name);
        }
    }

    /// (Re)starts the server of an endpoint on fresh sockets.
    fn serve(&mut self, name: &str) -> Result<(), ServeError> {
        let Some(slot) = self.endpoints.get_mut(name) else {
            return Ok(());
        };
        if let Some(old) = slot.take() {
            // Streams on the old socket belong to a kubelet that will dial the new one.
            self.frontend.stop(name, old);
        }
        let server = self.frontend.serve(name)?;
        self.endpoints.insert(name.to_owned(), Some(server));
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
                if self.frontend.another_instance_serves(name) {
                    self.others_here.insert(name.to_owned());
                }
                true
            }
            Err(e) => {
                let failure = crate::error::error_chain(&e);
                // Another instance serving it is expected for a while in every rollout: we
                // stand by, ready to take over, which is what a surge rollout waits for.
                let locked = matches!(e, ServeError::Held { .. });
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
        if !self.endpoints.contains_key(name) {
            debug!("{failure}; not served any more");
            return;
        }
        let now = self.host.now();
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
                lost: false,
            },
        );
    }

    /// Whether the endpoint's server runs with its sockets in place.
    fn intact(&self, name: &str) -> bool {
        self.endpoints
            .get(name)
            .and_then(Option::as_ref)
            .is_some_and(|server| self.frontend.intact(server))
    }

    /// Serves again every endpoint whose server is down or lost a socket.
    fn restart_missing_servers(&mut self) {
        let names: Vec<String> = self.endpoints.keys().cloned().collect();
        for name in names {
            if !self.intact(&name) {
                self.restart(&name);
            }
        }
    }

    fn socket_removed(&mut self, name: &str) {
        if !self.endpoints.contains_key(name) || self.intact(name) {
            // We replaced it ourselves.
            return;
        }
        info!(
            "{} was removed: serving {name} again",
            self.frontend
                .location(name)
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
        );
        if self.restart(name) && self.frontend.kubelet_present() {
            self.register(name);
        }
    }

    /// Registers one endpoint now: the register thread works while the control loop goes on.
    /// A kubelet restart asks twice (our socket's removal, then kubelet.sock's creation); the
    /// register thread drops a request that would repeat one.
    fn register(&mut self, name: &str) {
        if let Some(Some(server)) = self.endpoints.get(name) {
            self.frontend.register(name, server);
        }
    }

    fn register_all(&mut self) {
        let names: Vec<String> = self.endpoints.keys().cloned().collect();
        for name in names {
            self.register(&name);
        }
    }

    /// Serves each late built-in whose node is there now. Once served it stays, Unhealthy while
    /// its node is gone, like any built-in.
    fn adopt_late(&mut self) {
        let mut adopted = false;
        for resource in self.host.late() {
            if self.inventory.contains_key(&resource.resource_name) {
                continue;
            }
            let devices = self.host.discover(&resource);
            if devices.is_empty() || !devices.iter().all(|d| d.healthy) {
                continue;
            }
            info!(
                "{}: its device node appeared; serving it",
                resource.resource_name
            );
            self.insert(resource);
            adopted = true;
        }
        if adopted {
            self.apply_endpoints();
        }
    }

    /// Looks at the node again: devices that came, went, or changed health. The frontend hears
    /// of it only if something changed.
    fn refresh_devices(&mut self) {
        let mut changed = false;
        for (name, found) in &mut self.inventory {
            let devices = self.host.discover(&found.resource);
            if devices == found.devices {
                continue;
            }
            log_device_changes(name, &found.devices, &devices);
            // Metrics first, so a scrape after the kubelet's update already shows it.
            self.metrics
                .set_devices(name, &devices, found.resource.count);
            found.devices = devices;
            changed = true;
        }
        if changed {
            self.frontend.publish(&self.inventory);
        }
    }

    /// Reads the configuration again and applies it: new resources start and register, removed
    /// ones stop, changed ones take effect for the next allocation. A configuration that fails
    /// its checks changes nothing. Applied while we stand by too, so that we take over with the
    /// configuration of now, not the one we started with.
    fn reload(&mut self, why: &str) {
        let loaded = self.host.load().map(|loaded| {
            let resources = loaded.map_err(|e| crate::error::error_chain(&e))?;
            for r in &resources {
                self.frontend
                    .check(r)
                    .map_err(|problem| format!("{}: {problem}", r.resource_name))?;
            }
            Ok::<_, String>(resources)
        });
        let wanted = match loaded {
            None => {
                info!("{why}: no configuration file; checking devices and sockets");
                self.refresh_devices();
                self.adopt_late();
                self.restart_missing_servers();
                return;
            }
            Some(Err(problem)) => {
                error!(
                    "{why}, but the new configuration is refused; the running one stays: {problem}"
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
        let plan = reconcile::plan(
            self.inventory
                .iter()
                .map(|(name, found)| (name.as_str(), &*found.resource)),
            wanted,
        );
        for name in &plan.remove {
            self.inventory.remove(name);
            self.metrics.forget_devices(name);
            info!("stopped serving {name}: no longer configured");
        }
        for resource in plan.update.into_iter().chain(plan.add) {
            let updated = self.inventory.contains_key(&resource.resource_name);
            let name = resource.resource_name.clone();
            self.insert(resource);
            if updated {
                info!("{name}: configuration updated");
            }
        }
        self.apply_endpoints();
        let targets = self
            .inventory
            .values()
            .flat_map(|found| found.resource.watch_targets())
            .collect();
        self.host.watch(targets);
        // Nodes may have come or gone while the old targets were watched.
        self.refresh_devices();
    }

    /// Stands down from every endpoint whose lock another instance took after our lock file was
    /// deleted: two instances on one slot would replace each other's sockets forever (or, for
    /// DRA, publish one pool and write one checkpoint). We stand by as after any lost lock.
    fn keep_locks(&mut self) {
        for name in self.frontend.keep_locks() {
            let Some(slot) = self.endpoints.get_mut(&name) else {
                continue;
            };
            let failure = format!(
                "another instance took the lock of {name} after its file was deleted under us: standing by"
            );
            warn!("{failure}");
            if let Some(server) = slot.take() {
                self.frontend.stop(&name, server);
            }
            self.frontend.forget(&name);
            self.metrics.standby(&name, &failure);
            self.schedule_retry(&name, &failure, Level::Warn);
            if let Some(retry) = self.retries.get_mut(&name) {
                retry.locked = true;
            }
        }
    }

    /// Stops serving an endpoint: its streams end, its socket goes, the kubelet drops it.
    fn remove_endpoint(&mut self, name: &str) {
        let Some(server) = self.endpoints.remove(name) else {
            return;
        };
        self.retries.remove(name);
        self.losses.remove(name);
        self.others_here.remove(name);
        self.others_left.remove(name);
        self.frontend.forget(name);
        if let Some(server) = server {
            self.frontend.stop(name, server);
        }
        self.frontend.release(name);
        self.metrics.untrack(name);
    }

    /// Makes the node's labels match what we serve: each resource whose endpoint we serve is
    /// labelled with its healthy device IDs. A resource no longer configured loses its label,
    /// unless another instance serves it (that one labels it); one we stand by for, or cannot
    /// serve for a while, keeps whatever label it has, which its holder, or we once we serve
    /// again, keep up to date.
    fn relabel(&mut self) {
        let served = self.frontend.endpoints(&self.inventory);
        let mut wanted = BTreeMap::new();
        for (endpoint, resources) in served {
            if !matches!(self.endpoints.get(&endpoint), Some(Some(_))) {
                continue;
            }
            for resource in resources {
                if let Some(found) = self.inventory.get(&resource) {
                    let healthy = healthy_ids(&found.devices, found.resource.count);
                    wanted.insert(resource, (endpoint.clone(), healthy));
                }
            }
        }
        let before = std::mem::take(&mut self.labelled);
        for (resource, (endpoint, _)) in &before {
            if !wanted.contains_key(resource) && !self.inventory.contains_key(resource) {
                self.unlabel(resource, endpoint);
            }
        }
        for (resource, labelled) in &wanted {
            if before.get(resource).map(|(_, n)| n) != Some(&labelled.1) {
                self.host.label(resource, Some(labelled.1));
            }
        }
        self.labelled = wanted;
    }

    /// Takes `resource`'s label away, unless another instance serves its endpoint: that one
    /// labels the node itself.
    fn unlabel(&mut self, resource: &str, endpoint: &str) {
        if !self.frontend.another_instance_serves(endpoint) {
            self.host.label(resource, None);
        }
    }

    /// Writes again every label of ours whose file someone removed (a cleanup script); our own
    /// writes, which also wake us, find their files in place and write nothing.
    fn restore_labels(&mut self) {
        for (resource, (_, healthy)) in &self.labelled {
            if !self.host.label_present(resource) {
                warn!("the node label file of {resource} was removed; writing it again");
                self.host.label(resource, Some(*healthy));
            }
        }
    }

    fn log_serving(&self, name: &str) {
        let endpoints = self.frontend.endpoints(&self.inventory);
        let served = endpoints.get(name).into_iter().flatten();
        let (mut devices, mut healthy, mut count) = (0, 0, 0);
        for found in served.filter_map(|r| self.inventory.get(r)) {
            devices += found.devices.len();
            healthy += found.devices.iter().filter(|d| d.healthy).count();
            count = count.max(found.resource.count);
        }
        info!(
            "serving {name} on {}: {devices} device(s), {healthy} healthy, each shared by up to {count} containers",
            self.frontend.location(name).display(),
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
    use crate::device::{DeviceNode, Permissions};
    use std::cell::RefCell;
    use std::collections::BTreeSet;
    use std::path::Path;
    use std::rc::Rc;

    /// What the controller did to the world, in order; endpoints by short name (`kvm`, or
    /// `driver` for the DRA-shaped frontend).
    #[derive(Clone, Debug, PartialEq, Eq)]
    enum Call {
        Serve(&'static str, u64),
        Stop(&'static str, u64),
        Register(&'static str, u64),
        RegisterAgain(&'static str, u64),
        Forget(&'static str),
        Release(&'static str),
        Retire(&'static str, u64),
        Watch(usize),
    }

    /// The two shapes of frontend: one endpoint per resource (the device plugin), or one for
    /// every resource (the DRA driver).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Shape {
        PerResource,
        Driver,
    }

    const BOTH: [Shape; 2] = [Shape::PerResource, Shape::Driver];

    /// A node and a frontend whose devices, sockets, kubelet, configuration file and clock the
    /// test sets, and which record every side effect.
    struct World {
        shape: Shape,
        calls: Vec<Call>,
        /// Healthy devices by resource short name; a resource absent here has no nodes at all.
        devices: BTreeMap<String, bool>,
        /// Servers whose sockets someone removed.
        broken: BTreeSet<u64>,
        /// Endpoints whose next serve fails.
        failing: BTreeSet<String>,
        /// Endpoints another instance holds the lock of.
        held: BTreeSet<String>,
        /// Endpoints another instance serves beside ours (the other socket slot).
        others: BTreeSet<String>,
        /// Endpoints whose lock another instance took after our lock file was deleted.
        locks_taken: Vec<&'static str>,
        kubelet: bool,
        /// Whether `kubelet.sock` is there to register again through (either mode).
        kubelet_sock: bool,
        config: Option<Result<Vec<Resource>, String>>,
        next_server: u64,
        /// The clock the controller reads; tests move it.
        now: Instant,
        /// Built-ins to serve once their devices are there.
        late: Vec<Resource>,
        /// Every device model the frontend was handed: resource short name and each device's
        /// health.
        published: Vec<Vec<(String, Vec<bool>)>>,
        /// Endpoints the kubelet accepted (what the DRA frontend re-checks its slices for).
        accepted: Vec<String>,
        /// The frontend's periodic work: when it is due, and how often it ran.
        tick_at: Option<Instant>,
        ticks: usize,
        /// The node's labels from NFD feature files: resource short name and healthy IDs.
        labels: BTreeMap<&'static str, u64>,
        /// How many times a label was written or removed.
        label_writes: usize,
    }

    impl World {
        fn new(shape: Shape) -> World {
            World {
                shape,
                calls: Vec::new(),
                devices: BTreeMap::new(),
                broken: BTreeSet::new(),
                failing: BTreeSet::new(),
                held: BTreeSet::new(),
                others: BTreeSet::new(),
                locks_taken: Vec::new(),
                kubelet: false,
                kubelet_sock: true,
                config: None,
                next_server: 0,
                now: Instant::now(),
                late: Vec::new(),
                published: Vec::new(),
                accepted: Vec::new(),
                tick_at: None,
                ticks: 0,
                labels: BTreeMap::new(),
                label_writes: 0,
            }
        }
    }

    #[derive(Clone)]
    struct Recorder(Rc<RefCell<World>>);

    struct FakeServer {
        name: &'static str,
        id: u64,
    }

    /// Short names live as long as the test; leaking a few bytes keeps `Call` comparable.
    fn short(name: &str) -> &'static str {
        let name = name.rsplit('/').next().unwrap_or_default();
        Box::leak(name.to_owned().into_boxed_str())
    }

    impl Host for Recorder {
        fn discover(&mut self, resource: &Resource) -> Vec<Device> {
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
                    numbers: None,
                    identity: None,
                }],
            }
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

        fn now(&self) -> Instant {
            self.0.borrow().now
        }

        fn label_present(&self, resource: &str) -> bool {
            self.0.borrow().labels.contains_key(short(resource))
        }

        fn label(&mut self, resource: &str, healthy: Option<u64>) {
            let mut world = self.0.borrow_mut();
            world.label_writes += 1;
            match healthy {
                Some(n) => world.labels.insert(short(resource), n),
                None => world.labels.remove(short(resource)),
            };
        }
    }

    impl Frontend for Recorder {
        type Server = FakeServer;

        fn endpoints(&self, inventory: &Inventory) -> BTreeMap<String, Vec<String>> {
            let all = inventory.keys().cloned();
            match self.0.borrow().shape {
                Shape::PerResource => all.map(|name| (name.clone(), vec![name])).collect(),
                Shape::Driver => BTreeMap::from([("driver".to_owned(), all.collect())]),
            }
        }

        fn check(&self, resource: &Resource) -> Result<(), String> {
            if resource.name.len() > 20 {
                return Err("too long for a socket".into());
            }
            Ok(())
        }

        fn publish(&mut self, inventory: &Inventory) {
            let model = inventory
                .values()
                .map(|found| {
                    let health = found.devices.iter().map(|d| d.healthy).collect();
                    (found.resource.name.clone(), health)
                })
                .collect();
            self.0.borrow_mut().published.push(model);
        }

        fn serve(&mut self, endpoint: &str) -> Result<FakeServer, ServeError> {
            let mut world = self.0.borrow_mut();
            let name = short(endpoint);
            if world.failing.contains(name) {
                return Err(ServeError::Failed {
                    endpoint: endpoint.to_owned(),
                    source: "bind failed".into(),
                });
            }
            if world.held.contains(name) {
                return Err(ServeError::Held {
                    endpoint: endpoint.to_owned(),
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

        fn stop(&mut self, endpoint: &str, server: FakeServer) {
            assert_eq!(short(endpoint), server.name);
            self.0
                .borrow_mut()
                .calls
                .push(Call::Stop(server.name, server.id));
        }

        fn release(&mut self, endpoint: &str) {
            self.0
                .borrow_mut()
                .calls
                .push(Call::Release(short(endpoint)));
        }

        fn keep_locks(&mut self) -> Vec<String> {
            let mut world = self.0.borrow_mut();
            let taken = std::mem::take(&mut world.locks_taken);
            taken
                .into_iter()
                .map(|name| match world.shape {
                    Shape::PerResource => format!("{}/{name}", crate::device::DOMAIN),
                    Shape::Driver => name.to_owned(),
                })
                .collect()
        }

        fn retire(&mut self, endpoint: &str, server: FakeServer) {
            assert_eq!(short(endpoint), server.name);
            self.0
                .borrow_mut()
                .calls
                .push(Call::Retire(server.name, server.id));
        }

        fn kubelet_present(&self) -> bool {
            self.0.borrow().kubelet
        }

        fn register(&mut self, endpoint: &str, server: &FakeServer) {
            assert_eq!(short(endpoint), server.name);
            self.0
                .borrow_mut()
                .calls
                .push(Call::Register(server.name, server.id));
        }

        fn register_again(&mut self, endpoint: &str, server: &FakeServer) -> bool {
            assert_eq!(short(endpoint), server.name);
            let mut world = self.0.borrow_mut();
            if world.shape == Shape::Driver || !world.kubelet_sock {
                return false;
            }
            world
                .calls
                .push(Call::RegisterAgain(server.name, server.id));
            true
        }

        fn forget(&mut self, endpoint: &str) {
            self.0
                .borrow_mut()
                .calls
                .push(Call::Forget(short(endpoint)));
        }

        fn registered(&mut self, endpoint: &str) {
            self.0.borrow_mut().accepted.push(endpoint.to_owned());
        }

        fn another_instance_serves(&self, endpoint: &str) -> bool {
            self.0.borrow().others.contains(short(endpoint))
        }

        fn endpoint_of_socket(&self, file_name: &OsStr) -> Option<String> {
            let name = file_name
                .to_str()?
                .strip_prefix("kdp-")?
                .strip_suffix(".sock")?;
            Some(match self.0.borrow().shape {
                Shape::PerResource => format!("{}/{name}", crate::device::DOMAIN),
                Shape::Driver if name == "driver" => "driver".to_owned(),
                Shape::Driver => return None,
            })
        }

        fn location(&self, endpoint: &str) -> PathBuf {
            PathBuf::from(format!("/plugins/kdp-{}.sock", short(endpoint)))
        }

        fn listing(&self) -> &'static str {
            match self.0.borrow().shape {
                Shape::PerResource => "sent the kubelet its device list",
                Shape::Driver => "published its ResourceSlices",
            }
        }

        fn deadline(&self) -> Option<Instant> {
            self.0.borrow().tick_at
        }

        fn tick(&mut self, now: Instant) {
            let mut world = self.0.borrow_mut();
            world.ticks += 1;
            world.tick_at = Some(now + Duration::from_secs(300));
        }
    }

    fn builtin(name: &str, count: u32) -> Resource {
        Resource::builtin(name, Path::new("/dev"), count, Permissions::default()).unwrap()
    }

    struct Harness {
        world: Recorder,
        controller: Controller<Recorder, Recorder>,
        metrics: Arc<Metrics>,
    }

    impl Harness {
        fn new(shape: Shape, kubelet: bool, devices: &[(&str, bool)]) -> Harness {
            let world = Recorder(Rc::new(RefCell::new(World::new(shape))));
            world.0.borrow_mut().kubelet = kubelet;
            for (name, healthy) in devices {
                world
                    .0
                    .borrow_mut()
                    .devices
                    .insert((*name).into(), *healthy);
            }
            let metrics = Arc::new(Metrics::new());
            let controller = Controller::new(world.clone(), world.clone(), Arc::clone(&metrics));
            Harness {
                world,
                controller,
                metrics,
            }
        }

        fn started(shape: Shape, kubelet: bool, resources: &[&str]) -> Harness {
            let devices: Vec<(&str, bool)> = resources.iter().map(|r| (*r, true)).collect();
            let mut h = Harness::new(shape, kubelet, &devices);
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

        fn served(&self) -> Vec<String> {
            self.controller.inventory.keys().cloned().collect()
        }

        /// The last device model the frontend was handed.
        fn published(&self) -> Vec<(String, Vec<bool>)> {
            self.world
                .0
                .borrow()
                .published
                .last()
                .cloned()
                .unwrap_or_default()
        }

        /// Moves the clock to the next deadline and runs what is due there.
        fn wait_for_deadline(&mut self) -> Duration {
            let due = self.controller.deadline().expect("a retry is due");
            let waited = due - self.world().now;
            self.world().now = due;
            self.controller.retry_due();
            waited
        }
    }

    const KVM: &str = "devices.anza-labs.dev/kvm";
    const TUN: &str = "devices.anza-labs.dev/tun";

    /// What serving an endpoint again on fresh sockets and registering it looks like.
    fn served_again(name: &'static str, old: u64, new: u64) -> [Call; 3] {
        [
            Call::Stop(name, old),
            Call::Serve(name, new),
            Call::Register(name, new),
        ]
    }
    const FUSE: &str = "devices.anza-labs.dev/fuse";

    /// The endpoint that serves kvm in each shape, by full and by short name.
    fn kvm_endpoint(shape: Shape) -> (&'static str, &'static str) {
        match shape {
            Shape::PerResource => (KVM, "kvm"),
            Shape::Driver => ("driver", "driver"),
        }
    }

    #[test]
    fn start_serves_then_registers_each_resource_when_the_kubelet_is_there() {
        let mut h = Harness::new(Shape::PerResource, true, &[("kvm", true), ("tun", true)]);
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
    fn a_driver_serves_one_endpoint_for_every_resource_with_the_whole_model_first() {
        let mut h = Harness::new(Shape::Driver, false, &[("kvm", true), ("tun", false)]);
        h.controller
            .start(vec![builtin("kvm", 2), builtin("tun", 2)]);
        assert_eq!(h.take_calls(), [Call::Serve("driver", 1)]);
        // The frontend had the whole model once before it served, not one resource at a time.
        assert_eq!(h.world().published.len(), 1);
        assert_eq!(
            h.published(),
            [
                ("kvm".to_owned(), vec![true]),
                ("tun".to_owned(), vec![false])
            ]
        );
    }

    #[test]
    fn start_without_a_kubelet_serves_and_waits() {
        let mut h = Harness::new(Shape::PerResource, false, &[("kvm", true)]);
        h.controller.start(vec![builtin("kvm", 2)]);
        assert_eq!(h.take_calls(), [Call::Serve("kvm", 1)]);
    }

    #[test]
    fn one_resource_that_cannot_serve_does_not_stop_the_others() {
        let mut h = Harness::new(Shape::PerResource, true, &[]);
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
    fn an_endpoint_another_instance_holds_stands_by_ready_and_takes_over_when_its_lock_goes() {
        for shape in BOTH {
            let (endpoint, name) = kvm_endpoint(shape);
            let mut h = Harness::new(shape, true, &[("kvm", true)]);
            h.world().held.insert(name.into());
            h.controller.start(vec![builtin("kvm", 2)]);
            assert_eq!(h.take_calls(), [], "{shape:?}");
            // Ready while the other instance serves: a surge rollout waits for exactly this.
            assert_eq!(h.metrics.ready(), Ok(()), "{shape:?}");
            // Another lock file came or went, but ours is still held: tried, still standing by.
            h.handle(Event::LocksChanged);
            assert!(h.take_calls().is_empty());
            assert_eq!(h.metrics.ready(), Ok(()));
            // The other instance let go: taken over at once, long before the backoff is due.
            h.world().held.clear();
            let before = h.world().now;
            h.handle(Event::LocksChanged);
            assert_eq!(h.world().now, before);
            let calls = h.take_calls();
            assert_eq!(calls[0], Call::Serve(name, 1), "{shape:?}");
            // Serving now, it counts again: not ready until the kubelet has it.
            assert!(h.metrics.ready().unwrap_err().contains(endpoint));
            h.handle(Event::Registered(endpoint.to_owned()));
            h.metrics.listed(endpoint);
            assert_eq!(h.metrics.ready(), Ok(()));
            assert_eq!(h.controller.deadline(), None);
        }
    }

    #[test]
    fn an_endpoint_whose_lock_another_instance_took_stands_down_and_takes_over_later() {
        for shape in BOTH {
            let (endpoint, name) = kvm_endpoint(shape);
            let mut h = Harness::new(shape, true, &[("kvm", true)]);
            h.controller.start(vec![builtin("kvm", 2)]);
            h.handle(Event::Registered(endpoint.to_owned()));
            h.take_calls();
            // Our lock file deleted and taken again by us: nothing to do.
            h.handle(Event::LocksChanged);
            assert_eq!(h.take_calls(), [], "{shape:?}");
            // Taken by another instance first: we stop serving, let go and stand by, Ready.
            h.world().locks_taken.push(name);
            h.world().held.insert(name.into());
            h.handle(Event::LocksChanged);
            assert_eq!(
                h.take_calls(),
                [Call::Stop(name, 1), Call::Forget(name)],
                "{shape:?}"
            );
            assert_eq!(h.metrics.ready(), Ok(()), "{shape:?}");
            // Until it lets go.
            h.world().held.clear();
            h.handle(Event::LocksChanged);
            assert_eq!(
                h.take_calls(),
                [Call::Serve(name, 2), Call::Register(name, 2)],
                "{shape:?}"
            );
        }
    }

    /// The node's labels, as NFD reads them from our feature files.
    fn labels(h: &Harness) -> Vec<(&'static str, u64)> {
        h.world.0.borrow().labels.clone().into_iter().collect()
    }

    #[test]
    fn served_resources_label_the_node_with_their_healthy_ids_as_devices_come_and_go() {
        for shape in BOTH {
            let mut h = Harness::started(shape, true, &["kvm", "tun"]);
            // Each device is shared by up to two containers: two IDs each.
            assert_eq!(labels(&h), [("kvm", 2), ("tun", 2)], "{shape:?}");
            let writes = h.world().label_writes;
            h.world().devices.insert("kvm".into(), false);
            h.handle(Event::DevicesChanged);
            assert_eq!(labels(&h), [("kvm", 0), ("tun", 2)], "{shape:?}");
            assert_eq!(h.world().label_writes, writes + 1, "{shape:?}: only kvm's");
            // Events that change no count write nothing.
            h.handle(Event::DevicesChanged);
            h.handle(Event::Resync);
            h.handle(Event::KubeletSocketCreated);
            assert_eq!(h.world().label_writes, writes + 1, "{shape:?}");
            h.world().devices.insert("kvm".into(), true);
            h.handle(Event::DevicesChanged);
            assert_eq!(labels(&h), [("kvm", 2), ("tun", 2)], "{shape:?}");
        }
    }

    #[test]
    fn a_resource_no_longer_configured_loses_its_label_and_a_new_one_gets_one() {
        for shape in BOTH {
            let mut h = Harness::started(shape, true, &["kvm", "tun"]);
            h.world().devices.insert("fuse".into(), true);
            h.world().config = Some(Ok(vec![builtin("kvm", 5), builtin("fuse", 1)]));
            h.handle(Event::ConfigChanged);
            assert_eq!(labels(&h), [("fuse", 1), ("kvm", 5)], "{shape:?}");
        }
    }

    #[test]
    fn a_standby_labels_nothing_and_labels_what_it_takes_over() {
        for shape in BOTH {
            let (_, name) = kvm_endpoint(shape);
            let mut h = Harness::new(shape, true, &[("kvm", true)]);
            h.world().held.insert(name.into());
            // The holder's label, as the holder wrote it.
            h.world().labels.insert("kvm", 2);
            h.controller.start(vec![builtin("kvm", 2)]);
            h.world().devices.insert("kvm".into(), false);
            h.handle(Event::DevicesChanged);
            assert_eq!(
                h.world().label_writes,
                0,
                "{shape:?}: the holder's to write"
            );
            h.world().held.clear();
            h.handle(Event::LocksChanged);
            assert_eq!(labels(&h), [("kvm", 0)], "{shape:?}");
        }
    }

    #[test]
    fn a_label_file_someone_removed_is_written_again_and_ours_are_left_alone() {
        for shape in BOTH {
            let mut h = Harness::started(shape, true, &["kvm", "tun"]);
            let writes = h.world().label_writes;
            // Our own write wakes us too: nothing to do.
            h.handle(Event::LabelsChanged);
            assert_eq!(h.world().label_writes, writes, "{shape:?}");
            h.world().labels.remove("kvm");
            h.handle(Event::LabelsChanged);
            assert_eq!(labels(&h), [("kvm", 2), ("tun", 2)], "{shape:?}");
            assert_eq!(h.world().label_writes, writes + 1, "{shape:?}: only kvm's");
        }
    }

    #[test]
    fn shutdown_takes_labels_away_before_the_locks_unless_another_instance_serves() {
        let mut h = Harness::started(Shape::PerResource, true, &["kvm", "tun"]);
        // A surge rollout's new pod serves kvm on the other slot, and labels it itself.
        h.world().others.insert("kvm".into());
        h.controller.shutdown();
        assert_eq!(labels(&h), [("kvm", 2)]);
        let mut h = Harness::started(Shape::Driver, true, &["kvm", "tun"]);
        h.controller.shutdown();
        assert_eq!(labels(&h), []);
    }

    #[test]
    fn a_standby_takes_over_from_a_killed_holder_within_the_longest_wait_without_any_event() {
        // SIGKILL frees a lock without a trace inotify sees: only the backoff finds it free.
        for shape in BOTH {
            let (_, name) = kvm_endpoint(shape);
            let mut h = Harness::new(shape, false, &[("kvm", true)]);
            h.world().held.insert(name.into());
            h.controller.start(vec![builtin("kvm", 2)]);
            let mut waited = Duration::ZERO;
            for _ in 0..8 {
                waited += h.wait_for_deadline();
            }
            assert!(h.take_calls().is_empty());
            h.world().held.clear();
            let last = h.wait_for_deadline();
            assert!(last <= RETRY_MAX, "{shape:?}: {last:?}");
            assert_eq!(h.take_calls(), [Call::Serve(name, 1)], "{shape:?}");
            assert!(waited > RETRY_MAX);
        }
    }

    #[test]
    fn a_standby_applies_configuration_changes_and_serves_the_newest_when_it_takes_over() {
        for shape in BOTH {
            let (_, name) = kvm_endpoint(shape);
            let mut h = Harness::new(shape, false, &[("kvm", true), ("tun", true)]);
            h.world().held.insert(name.into());
            h.controller.start(vec![builtin("kvm", 2)]);
            h.world().config = Some(Ok(vec![builtin("kvm", 5), builtin("tun", 2)]));
            h.handle(Event::ConfigChanged);
            h.handle(Event::Reload);
            assert_eq!(h.served(), [KVM, TUN], "{shape:?}");
            assert_eq!(
                h.controller.inventory[KVM].resource.count, 5,
                "{shape:?}: the standby keeps the newest configuration"
            );
            h.world().held.clear();
            h.take_calls();
            h.handle(Event::LocksChanged);
            let calls = h.take_calls();
            assert!(
                calls
                    .iter()
                    .any(|c| matches!(c, Call::Serve(n, _) if *n == name)),
                "{shape:?}: {calls:?}"
            );
            assert_eq!(
                h.published(),
                [
                    ("kvm".to_owned(), vec![true]),
                    ("tun".to_owned(), vec![true])
                ]
            );
        }
    }

    #[test]
    fn a_lock_file_event_does_not_hurry_other_failures() {
        for shape in BOTH {
            let (_, name) = kvm_endpoint(shape);
            let mut h = Harness::new(shape, true, &[]);
            h.world().failing.insert(name.into());
            h.controller.start(vec![builtin("kvm", 2)]);
            h.world().failing.clear();
            h.handle(Event::LocksChanged);
            assert!(
                h.take_calls().is_empty(),
                "{shape:?}: a bind failure waits for its backoff"
            );
        }
    }

    #[test]
    fn an_endpoint_that_cannot_serve_is_retried_with_growing_waits_and_never_ends_the_loop() {
        for shape in BOTH {
            let (_, name) = kvm_endpoint(shape);
            let mut h = Harness::new(shape, true, &[]);
            h.world().failing.insert(name.into());
            h.controller.start(vec![builtin("kvm", 2)]);
            assert!(h.take_calls().is_empty());
            let start = h.world().now;
            assert_eq!(h.controller.deadline(), Some(start + RETRY_FIRST));
            assert!(h.metrics.ready().unwrap_err().contains("not serving"));
            // Not yet due: nothing is tried.
            h.controller.retry_due();
            assert!(h.take_calls().is_empty());
            // Each failure doubles the wait, up to the cap.
            let waits: Vec<Duration> = (0..6).map(|_| h.wait_for_deadline()).collect();
            assert_eq!(
                waits,
                [250, 500, 1000, 2000, 4000, 4000].map(Duration::from_millis),
                "{shape:?}"
            );
            // Once it serves, it registers, and no retry is left to wake the loop.
            h.world().failing.clear();
            h.wait_for_deadline();
            let calls = h.take_calls();
            assert_eq!(calls[0], Call::Serve(name, 1), "{shape:?}");
            assert_eq!(h.controller.deadline(), None);
        }
    }

    #[test]
    fn a_built_in_whose_node_appears_later_is_served_then() {
        let mut h = Harness::new(Shape::PerResource, true, &[]);
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
        for shape in BOTH {
            let (endpoint, name) = kvm_endpoint(shape);
            let mut h = Harness::started(shape, false, &["kvm"]);
            h.metrics.registered(endpoint);
            h.metrics.listed(endpoint);
            let refused = || Event::RegistrationRefused {
                resource: endpoint.into(),
                error: "bad endpoint".into(),
            };
            h.handle(refused());
            assert!(h.metrics.ready().unwrap_err().contains("bad endpoint"));
            let first = h.wait_for_deadline();
            assert_eq!(
                h.take_calls(),
                [Call::Stop(name, 1), Call::Serve(name, 2)],
                "{shape:?}"
            );
            assert_eq!(h.controller.deadline(), None);
            // Refused again: a longer wait, not a tight loop.
            h.handle(refused());
            let second = h.controller.deadline().unwrap() - h.world().now;
            assert!(second > first, "{first:?} then {second:?}");
            // Accepted: the next refusal starts from the shortest wait again.
            h.handle(Event::Registered(endpoint.into()));
            assert_eq!(h.controller.deadline(), None);
            assert!(h.metrics.ready().is_err(), "not listed yet");
        }
    }

    #[test]
    fn a_lost_stream_registers_the_same_server_again_at_once_in_both_registration_modes() {
        // Kubelets 1.25 to 1.36 disconnect the newest instance when an older one's stream ends,
        // and refuse pods until something registers again: no wait, and no stream of ours ended
        // by our hand (the kubelet would disconnect whoever it holds then). Through kubelet.sock
        // in plugin-watcher mode too: the watcher's next pass is up to a second away.
        for kubelet_socket_mode in [true, false] {
            let mut h = Harness::started(Shape::PerResource, kubelet_socket_mode, &["kvm", "tun"]);
            h.world().others.insert("kvm".into());
            for name in [KVM, TUN] {
                h.metrics.registered(name);
                h.metrics.listed(name);
            }
            h.handle(Event::StreamLost(KVM.into()));
            let reason = h.metrics.ready().unwrap_err();
            assert!(reason.contains("ListAndWatch stream"), "{reason}");
            assert_eq!(h.take_calls(), [Call::RegisterAgain("kvm", 1)]);
            assert_eq!(h.controller.deadline(), None, "nothing waits");
            h.handle(Event::Registered(KVM.into()));
            h.metrics.listed(KVM);
            assert_eq!(h.metrics.ready(), Ok(()));
        }
    }

    #[test]
    fn a_lost_stream_that_comes_back_soon_serves_on_fresh_sockets_after_a_growing_wait() {
        // Something takes turns with us: the second loss within RETRY_MAX is not answered at
        // once; a loss long after is again.
        let mut h = Harness::started(Shape::PerResource, true, &["kvm", "tun"]);
        h.world().others.insert("kvm".into());
        h.handle(Event::StreamLost(KVM.into()));
        assert_eq!(h.take_calls(), [Call::RegisterAgain("kvm", 1)]);
        h.handle(Event::Registered(KVM.into()));
        h.world().others.clear();
        h.world().now += RETRY_MAX / 2;
        h.handle(Event::StreamLost(KVM.into()));
        assert_eq!(h.take_calls(), []);
        assert_eq!(h.wait_for_deadline(), RETRY_FIRST);
        assert_eq!(h.take_calls(), served_again("kvm", 1, 3));
        h.handle(Event::Registered(KVM.into()));
        h.world().now += RETRY_MAX;
        h.world().others.insert("kvm".into());
        h.handle(Event::StreamLost(KVM.into()));
        assert_eq!(h.take_calls(), [Call::RegisterAgain("kvm", 3)]);
    }

    #[test]
    fn a_second_loss_during_the_kubelets_teardown_is_registered_again_at_once_a_third_is_not() {
        // 1.25 to 1.36 disconnect whoever holds the name when each dropped stream's teardown
        // ends: our first registration again can land before the second.
        let mut h = Harness::started(Shape::PerResource, true, &["kvm", "tun"]);
        h.world().others.insert("kvm".into());
        h.handle(Event::StreamLost(KVM.into()));
        assert_eq!(h.take_calls(), [Call::RegisterAgain("kvm", 1)]);
        h.world().others.clear();
        h.handle(Event::LocksChanged);
        h.take_calls();
        h.world().now += Duration::from_millis(5);
        h.handle(Event::StreamLost(KVM.into()));
        assert_eq!(h.take_calls(), [Call::RegisterAgain("kvm", 1)]);
        h.world().now += Duration::from_millis(5);
        h.handle(Event::StreamLost(KVM.into()));
        assert_eq!(h.take_calls(), []);
        assert_eq!(h.wait_for_deadline(), RETRY_FIRST);
    }

    #[test]
    fn a_lost_stream_just_after_the_other_instance_left_is_registered_again_at_once() {
        // The old pod's lock can go before its stream's end reaches us.
        let mut h = Harness::started(Shape::PerResource, true, &["kvm", "tun"]);
        h.world().others.insert("kvm".into());
        h.handle(Event::LocksChanged);
        h.world().others.clear();
        h.handle(Event::LocksChanged);
        h.take_calls();
        h.world().now += RETRY_MAX / 2;
        h.handle(Event::StreamLost(KVM.into()));
        assert_eq!(h.take_calls(), [Call::RegisterAgain("kvm", 1)]);
        // Long after it left, the kubelet's own doing.
        h.world().now += RETRY_MAX * 2;
        h.handle(Event::StreamLost(TUN.into()));
        assert_eq!(h.take_calls(), []);
    }

    #[test]
    fn a_lost_stream_is_registered_again_at_once_when_the_other_left_before_we_heard_of_it() {
        // The old pod lets its lock go right after its stream ends: the kubelet's disconnect can
        // reach us with the lock gone and the LocksChanged that says so still queued behind it
        // (seen on kubelet 1.36.3, plugin-watcher mode).
        let mut h = Harness::started(Shape::PerResource, true, &["kvm"]);
        h.world().others.insert("kvm".into());
        h.handle(Event::LocksChanged);
        h.take_calls();
        h.world().others.clear();
        h.handle(Event::StreamLost(KVM.into()));
        assert_eq!(h.take_calls(), [Call::RegisterAgain("kvm", 1)]);
        h.handle(Event::LocksChanged);
        assert_eq!(h.take_calls(), []);
    }

    #[test]
    fn a_lost_stream_with_no_other_instance_is_left_to_the_kubelet_then_served_afresh() {
        // Alone, the kubelet's plugin watcher ended it (replacing a registration, as after a
        // node reboot) and registers us itself; a registration of ours beside its own makes 1.37
        // refuse the watcher's and lose track of the socket.
        let mut h = Harness::started(Shape::PerResource, false, &["kvm"]);
        h.handle(Event::StreamLost(KVM.into()));
        assert_eq!(h.take_calls(), []);
        h.handle(Event::Registered(KVM.into()));
        assert_eq!(h.controller.deadline(), None);
        assert_eq!(h.take_calls(), []);
    }

    #[test]
    fn a_lost_stream_with_no_kubelet_sock_serves_on_fresh_sockets_after_a_short_wait() {
        // The plugin watcher dials only a new registration socket.
        let mut h = Harness::started(Shape::PerResource, false, &["kvm"]);
        h.world().kubelet_sock = false;
        h.handle(Event::StreamLost(KVM.into()));
        assert_eq!(h.take_calls(), []);
        assert_eq!(h.wait_for_deadline(), RETRY_FIRST);
        assert_eq!(
            h.take_calls(),
            [Call::Stop("kvm", 1), Call::Serve("kvm", 2)]
        );
    }

    #[test]
    fn a_second_lost_stream_while_another_instance_serves_waits_for_that_instance_to_go() {
        // The kubelet holds the other instance's endpoint: serving on fresh sockets would end
        // our stream and disconnect that one, and the two would take turns. Once that instance
        // is gone, we are the one to register.
        let mut h = Harness::started(Shape::PerResource, true, &["kvm"]);
        h.world().others.insert("kvm".into());
        h.handle(Event::StreamLost(KVM.into()));
        assert_eq!(h.take_calls(), [Call::RegisterAgain("kvm", 1)]);
        h.handle(Event::StreamLost(KVM.into()));
        for _ in 0..6 {
            h.wait_for_deadline();
        }
        assert_eq!(h.take_calls(), []);
        assert_eq!(h.metrics.ready(), Ok(()), "the node is served by the other");
        h.handle(Event::LocksChanged);
        assert_eq!(h.take_calls(), [], "still there");
        h.world().others.clear();
        let before = h.world().now;
        h.handle(Event::LocksChanged);
        assert_eq!(h.world().now, before, "at once, not at the next wait");
        assert_eq!(h.take_calls(), served_again("kvm", 1, 2));
    }

    #[test]
    fn a_registration_after_a_lost_stream_leaves_nothing_to_do() {
        // A kubelet restart ends the stream too, and registers us again by itself (the plugin
        // watcher) or through our Register (kubelet.sock) before the wait is over.
        // (With kubelet.sock there, the register thread drops what we asked of the old kubelet
        // once the new one replaces the socket.)
        let mut h = Harness::started(Shape::PerResource, true, &["kvm"]);
        h.world().kubelet_sock = false;
        h.handle(Event::StreamLost(KVM.into()));
        h.handle(Event::StreamLost(TUN.into()));
        h.handle(Event::Registered(KVM.into()));
        assert_eq!(h.controller.deadline(), None);
        assert_eq!(h.take_calls(), []);
    }

    #[test]
    fn a_refusal_for_an_endpoint_we_do_not_serve_schedules_nothing() {
        let mut h = Harness::started(Shape::PerResource, false, &["kvm"]);
        h.handle(Event::RegistrationRefused {
            resource: TUN.into(),
            error: "late answer".into(),
        });
        assert_eq!(h.controller.deadline(), None);
    }

    #[test]
    fn a_kubelet_restart_restarts_wiped_servers_and_registers_everything_again() {
        let mut h = Harness::started(Shape::PerResource, true, &["kvm", "tun"]);
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
        let mut h = Harness::started(Shape::PerResource, true, &["kvm", "tun"]);
        h.world().broken.insert(2);
        h.handle(Event::SocketRemoved("kdp-tun.sock".into()));
        assert_eq!(h.take_calls(), served_again("tun", 2, 3));
    }

    #[test]
    fn a_socket_we_replaced_ourselves_or_someone_elses_changes_nothing() {
        for shape in BOTH {
            let mut h = Harness::started(shape, true, &["kvm"]);
            // Our socket is intact: the removal was of the one we replaced.
            h.handle(Event::SocketRemoved("kdp-kvm.sock".into()));
            h.handle(Event::SocketRemoved("kdp-driver.sock".into()));
            h.handle(Event::SocketRemoved("kdp-other.sock".into()));
            assert_eq!(h.take_calls(), [], "{shape:?}");
        }
    }

    #[test]
    fn without_a_kubelet_a_removed_socket_is_served_but_not_registered() {
        for shape in BOTH {
            let (_, name) = kvm_endpoint(shape);
            let mut h = Harness::started(shape, false, &["kvm"]);
            h.world().broken.insert(1);
            h.handle(Event::SocketRemoved(format!("kdp-{name}.sock").into()));
            assert_eq!(
                h.take_calls(),
                [Call::Stop(name, 1), Call::Serve(name, 2)],
                "{shape:?}"
            );
        }
    }

    #[test]
    fn a_device_change_hands_the_frontend_the_new_model_without_touching_servers() {
        for shape in BOTH {
            let mut h = Harness::started(shape, true, &["kvm"]);
            assert_eq!(h.published(), [("kvm".to_owned(), vec![true])]);
            let handed = h.world().published.len();
            // Nothing changed: the frontend is not bothered.
            h.handle(Event::DevicesChanged);
            assert_eq!(h.world().published.len(), handed, "{shape:?}");
            h.world().devices.insert("kvm".into(), false);
            h.handle(Event::DevicesChanged);
            assert_eq!(h.published(), [("kvm".to_owned(), vec![false])]);
            h.world().devices.remove("kvm");
            h.handle(Event::DevicesChanged);
            assert_eq!(h.published(), [("kvm".to_owned(), vec![])]);
            assert_eq!(h.take_calls(), [], "{shape:?}");
        }
    }

    #[test]
    fn the_device_gauges_follow_the_model_in_both_shapes() {
        for shape in BOTH {
            let mut h = Harness::started(shape, true, &["kvm"]);
            let gauge = |h: &Harness, health: &str| {
                let line = format!(r#"kdp_devices{{resource="{KVM}",health="{health}"}} "#);
                h.metrics
                    .encode()
                    .lines()
                    .find_map(|l| l.strip_prefix(&line).map(str::to_owned))
            };
            assert_eq!(gauge(&h, "Healthy").as_deref(), Some("2"), "{shape:?}");
            h.world().devices.insert("kvm".into(), false);
            h.handle(Event::DevicesChanged);
            assert_eq!(gauge(&h, "Healthy").as_deref(), Some("0"), "{shape:?}");
            assert_eq!(gauge(&h, "Unhealthy").as_deref(), Some("2"), "{shape:?}");
            h.world().config = Some(Ok(vec![]));
            h.handle(Event::Reload);
            assert_eq!(
                gauge(&h, "Healthy"),
                None,
                "{shape:?}: gone with the resource"
            );
        }
    }

    #[test]
    fn readiness_says_what_each_shape_waits_for() {
        let h = Harness::started(Shape::Driver, false, &["kvm"]);
        h.metrics.registered("driver");
        assert_eq!(
            h.metrics.ready().unwrap_err(),
            "driver has not published its ResourceSlices"
        );
        let h = Harness::started(Shape::PerResource, false, &["kvm"]);
        h.metrics.registered(KVM);
        assert_eq!(
            h.metrics.ready().unwrap_err(),
            format!("{KVM} has not sent the kubelet its device list")
        );
    }

    #[test]
    fn a_reload_removes_adds_and_updates_and_watches_the_new_targets() {
        let mut h = Harness::started(Shape::PerResource, true, &["kvm", "tun"]);
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
        assert_eq!(
            h.controller.inventory[KVM].resource.count, 7,
            "updated in place"
        );
    }

    #[test]
    fn a_reload_changes_a_drivers_model_but_not_its_one_endpoint() {
        let mut h = Harness::started(Shape::Driver, true, &["kvm", "tun"]);
        h.world().devices.insert("fuse".into(), true);
        h.world().config = Some(Ok(vec![builtin("kvm", 7), builtin("fuse", 2)]));
        h.handle(Event::ConfigChanged);
        assert_eq!(h.take_calls(), [Call::Watch(2)]);
        assert_eq!(
            h.published(),
            [
                ("fuse".to_owned(), vec![true]),
                ("kvm".to_owned(), vec![true])
            ]
        );
        // Nothing configured: the driver still serves, an empty pool.
        h.world().config = Some(Ok(vec![]));
        h.handle(Event::ConfigChanged);
        assert_eq!(h.take_calls(), [Call::Watch(0)]);
        assert_eq!(h.published(), []);
    }

    #[test]
    fn a_refused_configuration_changes_nothing() {
        for shape in BOTH {
            let mut h = Harness::started(shape, true, &["kvm"]);
            h.world().config = Some(Err("resources: [{name: kvm, count: 0}]".into()));
            h.handle(Event::Reload);
            assert_eq!(h.take_calls(), []);
            assert_eq!(h.served(), [KVM]);
            assert!(h.metrics.encode().contains(r#"result="refused"} 1"#));
        }
    }

    #[test]
    fn a_configuration_the_frontend_cannot_serve_is_refused_whole() {
        for shape in BOTH {
            let mut h = Harness::started(shape, true, &["kvm"]);
            let long = Resource::new(
                "example.com",
                "a-name-longer-than-the-socket-allows",
                vec![],
                2,
                Permissions::default(),
            )
            .unwrap();
            h.world().config = Some(Ok(vec![builtin("tun", 2), long]));
            h.handle(Event::Reload);
            assert_eq!(h.take_calls(), [], "{shape:?}");
            assert_eq!(h.served(), [KVM]);
            assert!(h.metrics.encode().contains(r#"result="refused"} 1"#));
        }
    }

    #[test]
    fn sighup_without_a_file_restarts_missing_servers_only() {
        let mut h = Harness::started(Shape::PerResource, true, &["kvm", "tun"]);
        h.world().broken.insert(1);
        h.handle(Event::Reload);
        assert_eq!(
            h.take_calls(),
            [Call::Stop("kvm", 1), Call::Serve("kvm", 3)]
        );
    }

    #[test]
    fn a_resync_checks_our_sockets_and_registers_if_the_kubelet_is_there() {
        // After an inotify overflow the removal of our socket may be among the events lost.
        for shape in BOTH {
            let (_, name) = kvm_endpoint(shape);
            let mut h = Harness::started(shape, true, &["kvm"]);
            h.world().broken.insert(1);
            h.handle(Event::Resync);
            let calls = h.take_calls();
            assert_eq!(
                calls[..2],
                [Call::Stop(name, 1), Call::Serve(name, 2)],
                "{shape:?}"
            );
            h.world().kubelet = false;
            h.handle(Event::Resync);
            assert_eq!(h.take_calls(), []);
        }
        let mut h = Harness::started(Shape::PerResource, true, &["kvm"]);
        h.world().broken.insert(1);
        h.handle(Event::Resync);
        assert_eq!(h.take_calls(), served_again("kvm", 1, 2));
    }

    #[test]
    fn a_resync_reads_the_configuration_file_again() {
        // A write of the file may be among the events an overflow lost.
        for shape in BOTH {
            let mut h = Harness::started(shape, true, &["kvm"]);
            h.world().devices.insert("tun".into(), true);
            h.world().config = Some(Ok(vec![builtin("kvm", 2), builtin("tun", 2)]));
            h.handle(Event::Resync);
            assert_eq!(h.served(), [KVM, TUN], "{shape:?}");
            assert!(h.published().contains(&("tun".to_owned(), vec![true])));
        }
    }

    #[test]
    fn registration_results_count_and_reach_the_frontend() {
        for shape in BOTH {
            let (endpoint, _) = kvm_endpoint(shape);
            let mut h = Harness::started(shape, true, &["kvm"]);
            h.handle(Event::Registered(endpoint.into()));
            h.handle(Event::KubeletSocketRemoved);
            assert_eq!(h.take_calls(), []);
            assert!(h.metrics.encode().contains(&format!(
                r#"kdp_registrations_total{{resource="{endpoint}"}} 1"#
            )));
            assert_eq!(h.world().accepted, [endpoint]);
        }
    }

    #[test]
    fn the_frontends_periodic_work_wakes_the_loop_when_due() {
        let mut h = Harness::started(Shape::Driver, false, &["kvm"]);
        assert_eq!(h.controller.deadline(), None);
        let due = h.world().now + Duration::from_secs(300);
        h.world().tick_at = Some(due);
        assert_eq!(h.controller.deadline(), Some(due));
        h.controller.retry_due();
        assert_eq!(h.world().ticks, 0, "not due yet");
        h.wait_for_deadline();
        assert_eq!(h.world().ticks, 1);
        assert_eq!(h.take_calls(), []);
    }

    #[test]
    fn shutdown_signals_and_failures_end_the_loop() {
        for shape in BOTH {
            let mut h = Harness::started(shape, true, &["kvm", "tun"]);
            assert!(matches!(
                h.handle(Event::Shutdown("SIGTERM")),
                Flow::Stop(Ok(()))
            ));
            assert!(matches!(
                h.handle(Event::SocketDirGone("/plugins".into())),
                Flow::Stop(Err(ControlError::SocketDirGone { .. }))
            ));
            assert!(matches!(
                h.handle(Event::InotifyFailed),
                Flow::Stop(Err(ControlError::InotifyFailed))
            ));
            assert!(matches!(
                h.handle(Event::ThreadPanicked("http".into())),
                Flow::Stop(Err(ControlError::ThreadPanicked { .. }))
            ));
            h.controller.shutdown();
            // Each endpoint is let go right after its server stops: an instance waiting to take
            // over starts then, not when this process has finished exiting.
            let expected = match shape {
                Shape::PerResource => vec![Call::Retire("kvm", 1), Call::Retire("tun", 2)],
                Shape::Driver => vec![Call::Retire("driver", 1)],
            };
            assert_eq!(h.take_calls(), expected);
        }
    }

    #[test]
    fn shutdown_releases_an_endpoint_that_never_served() {
        let mut h = Harness::new(Shape::Driver, false, &[("kvm", true)]);
        h.world().held.insert("driver".into());
        h.controller.start(vec![builtin("kvm", 2)]);
        h.controller.shutdown();
        assert_eq!(h.take_calls(), [Call::Release("driver")]);
    }
}
