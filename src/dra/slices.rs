//! Our node's ResourceSlices: what they should hold (pure, unit-tested below), the "slices"
//! thread that makes the API server hold it, and the "slice-watch" thread that watches them.
//! The "slices" thread is told the latest device list (state, never a diff) and asked to check
//! again whenever our slices may no longer hold it: the watch saw someone else change or delete
//! one (the kubelet deletes them all as it starts, in the background and maybe well after
//! registering us, and 30 s after losing us; an admin may too), or the kubelet registered us
//! again. It plans against what it knows of our slices, its last list and its own writes since,
//! and lists them again only when someone else changed them: a change to our devices costs its
//! writes alone, and nothing changing costs nothing.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError};
use k8s_openapi::api::resource::v1::{
    CapacityRequestPolicy, Device, DeviceAttribute, DeviceCapacity, DeviceTaint, ResourcePool,
    ResourceSlice, ResourceSliceSpec,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, WatchEvent};
use k8s_openapi::List;
use log::{debug, info, warn};

use super::kube::{escape, Client, KubeError};
use super::model::{Attribute, DraDevice, Latest};
use crate::event::Event;
use crate::metrics::Metrics;
use crate::thread::ThreadHandle;

/// The most devices one slice may hold once any device has a taint (the API's limit).
pub const MAX_DEVICES_PER_SLICE: usize = 64;
/// The taint an unhealthy device carries: its node is missing or is not a device node.
pub const UNHEALTHY_TAINT: &str = "unhealthy";
/// The capacity of a device many claims may share: how many may hold it at once (in the
/// driver's domain, as a name without one is).
pub const SLOTS_CAPACITY: &str = "slots";
/// While our Node cannot be read (the API server too busy to answer, say), our slices are
/// published without their owner; the next look for it waits this long, doubling up to
/// `MAX_OWNER_RETRY`, so that a permanent refusal costs a list and a get every 5 minutes.
const FIRST_OWNER_RETRY: Duration = Duration::from_secs(15);
const MAX_OWNER_RETRY: Duration = Duration::from_secs(300);
/// The first wait after a failed update; it doubles up to `MAX_RETRY`.
const FIRST_RETRY: Duration = Duration::from_secs(1);
const MAX_RETRY: Duration = Duration::from_secs(30);
/// Syncs that write may start at most this many times a minute; past that the next waits. Our
/// own writes come back as watch events that prompt a check, so whatever makes a write not stick
/// would otherwise write as fast as the API server answers.
const MAX_WRITING_SYNCS_PER_MINUTE: usize = 10;
/// Our writes whose watch events are awaited at most (see `Publisher::await_echo`); a pool has
/// one slice per 64 devices (128 per 8,192 devices), and each is written once per change.
const MAX_ECHOES: usize = 256;
/// How long each watch of our slices lasts before the API server ends it and we resume it where
/// it ended: long enough to be quiet, short enough for a connection lost in silence to be noticed.
const WATCH_SECONDS: u64 = 290;

/// Where our slices are and whose they are.
#[derive(Clone, Debug)]
pub struct Pool {
    /// The driver name, also the domain of our attributes.
    pub driver: String,
    /// Our node; also the pool's name, since our devices are this node's alone.
    pub node_name: String,
}

impl Pool {
    /// The field selector of our slices: our node's, of our driver.
    fn selector(&self) -> String {
        escape(&format!(
            "spec.nodeName={},spec.driver={}",
            self.node_name, self.driver
        ))
    }
}

/// The devices of our pool, split into slices of at most `MAX_DEVICES_PER_SLICE`, in the API's
/// types. A pool with no devices still has one (empty) slice, so that schedulers see it. An
/// unhealthy device carries a taint; where the API server stores no taints (`taints` false) it is
/// left out instead, so that no new claim can get it.
pub fn desired(pool: &Pool, devices: &[DraDevice], taints: bool) -> Vec<Vec<Device>> {
    let converted: Vec<Device> = devices
        .iter()
        .filter(|d| taints || d.healthy)
        .map(|d| api_device(pool, d))
        .collect();
    if converted.is_empty() {
        return vec![Vec::new()];
    }
    converted
        .chunks(MAX_DEVICES_PER_SLICE)
        .map(<[Device]>::to_vec)
        .collect()
}

fn api_device(pool: &Pool, d: &DraDevice) -> Device {
    let attributes = d
        .attributes
        .iter()
        .map(|(k, v)| {
            let value = match v {
                Attribute::String(s) => DeviceAttribute {
                    string: Some(s.clone()),
                    ..DeviceAttribute::default()
                },
                Attribute::Int(i) => DeviceAttribute {
                    int: Some(*i),
                    ..DeviceAttribute::default()
                },
            };
            (k.clone(), value)
        })
        .collect::<BTreeMap<_, _>>();
    let taints = (!d.healthy).then(|| {
        vec![DeviceTaint {
            key: format!("{}/{UNHEALTHY_TAINT}", pool.driver),
            value: Some("DeviceNodeMissing".to_owned()),
            effect: "NoSchedule".to_owned(),
            time_added: None,
        }]
    });
    // Each claim takes one slot unless it asks for more, so at most `shared_by` claims hold
    // the device at once.
    let capacity = d.shared_by.map(|slots| {
        BTreeMap::from([(
            SLOTS_CAPACITY.to_owned(),
            DeviceCapacity {
                value: Quantity(slots.to_string()),
                request_policy: Some(CapacityRequestPolicy {
                    default: Some(Quantity("1".to_owned())),
                    ..CapacityRequestPolicy::default()
                }),
            },
        )])
    });
    Device {
        name: d.name.clone(),
        attributes: Some(attributes),
        taints,
        allow_multiple_allocations: d.shared_by.is_some().then_some(true),
        capacity,
        ..Device::default()
    }
}

/// What to do to make `existing` (our slices as listed) hold `want`.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    /// Slices to replace, as they should be stored (with their resourceVersion).
    pub update: Vec<ResourceSlice>,
    /// Slices to create.
    pub create: Vec<ResourceSlice>,
    /// Names of slices to delete.
    pub delete: Vec<String>,
}

impl Plan {
    /// Whether the slices already hold what they should.
    pub fn is_empty(&self) -> bool {
        self.update.is_empty() && self.create.is_empty() && self.delete.is_empty()
    }
}

/// The changes that bring `existing` to `want`, under a new pool generation if anything changes
/// (consumers use only the newest generation, so every slice of the pool carries it). `stores`
/// is what the API server is known to make of `want` (`want` itself unless it dropped something):
/// slices that hold that are up to date.
pub fn plan(
    pool: &Pool,
    owner: Option<&OwnerReference>,
    mut existing: Vec<ResourceSlice>,
    want: &[Vec<Device>],
    stores: &[Vec<Device>],
) -> Plan {
    existing.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    let count = want.len() as i64;
    let generation = existing
        .iter()
        .map(|s| s.spec.pool.generation)
        .max()
        .unwrap_or(0);
    let same_generation = existing
        .iter()
        .all(|s| s.spec.pool.generation == generation);
    let current = existing.len() == want.len()
        && stores.len() == want.len()
        && same_generation
        && existing.iter().zip(stores).all(|(s, devices)| {
            s.spec.pool.resource_slice_count == count
                && s.spec.pool.name == pool.node_name
                && s.spec.node_name.as_deref() == Some(pool.node_name.as_str())
                && comparable(s.spec.devices.as_deref().unwrap_or_default()) == *devices
                && owner.is_none_or(|o| owned_by(s, o))
        });
    if current {
        return Plan::default();
    }
    let spec = |devices: &Vec<Device>| ResourceSliceSpec {
        driver: pool.driver.clone(),
        node_name: Some(pool.node_name.clone()),
        pool: ResourcePool {
            name: pool.node_name.clone(),
            generation: generation + 1,
            resource_slice_count: count,
        },
        devices: Some(devices.clone()),
        ..ResourceSliceSpec::default()
    };
    let mut plan = Plan::default();
    for (i, devices) in want.iter().enumerate() {
        match existing.get(i) {
            Some(old) => {
                // An owner learnt after the slice was made (our Node could not be read then).
                let mut metadata = old.metadata.clone();
                if let Some(o) = owner.filter(|o| !owned_by(old, o)) {
                    metadata
                        .owner_references
                        .get_or_insert_with(Vec::new)
                        .push(o.clone());
                }
                plan.update.push(ResourceSlice {
                    metadata,
                    spec: spec(devices),
                });
            }
            None => plan.create.push(ResourceSlice {
                metadata: ObjectMeta {
                    generate_name: Some(format!("{}-{}-", pool.node_name, pool.driver)),
                    owner_references: owner.map(|o| vec![o.clone()]),
                    ..ObjectMeta::default()
                },
                spec: spec(devices),
            }),
        }
    }
    plan.delete = existing
        .iter()
        .skip(want.len())
        .filter_map(|s| s.metadata.name.clone())
        .collect();
    plan
}

fn owned_by(slice: &ResourceSlice, owner: &OwnerReference) -> bool {
    slice
        .metadata
        .owner_references
        .iter()
        .flatten()
        .any(|r| r.uid == owner.uid)
}

/// Devices as stored, less what the API server fills in itself (a taint's time).
fn comparable(devices: &[Device]) -> Vec<Device> {
    devices
        .iter()
        .cloned()
        .map(|mut d| {
            for t in d.taints.iter_mut().flatten() {
                t.time_added = None;
            }
            d
        })
        .collect()
}

/// Whether the API server stored devices we sent tainted without their taints (DRADeviceTaints
/// off, say), comparing what we sent (`sent`, slice by slice) with what it answered it stored.
/// Anything else it changed shows as `sent != stored`.
pub fn taints_dropped(sent: &[Vec<Device>], stored: &[Vec<Device>]) -> bool {
    let tainted = |d: &Device| d.taints.as_ref().is_some_and(|t| !t.is_empty());
    sent.iter().zip(stored).any(|(sent, stored)| {
        sent.iter()
            .filter(|d| tainted(d))
            .any(|d| !stored.iter().any(|s| s.name == d.name && tainted(s)))
    })
}

/// Whether the API server stored a device we offer to many claims without saying so: it drops
/// `allowMultipleAllocations` where the DRAConsumableCapacity feature gate is off (alpha in 1.34
/// and 1.35), and the scheduler then gives the device to one claim at a time.
pub fn sharing_dropped(sent: &[Vec<Device>], stored: &[Vec<Device>]) -> bool {
    let shared = |d: &Device| d.allow_multiple_allocations == Some(true);
    sent.iter().zip(stored).any(|(sent, stored)| {
        sent.iter()
            .filter(|d| shared(d))
            .any(|d| !stored.iter().any(|s| s.name == d.name && shared(s)))
    })
}

/// The starts of recent syncs that wrote, to keep them under `MAX_WRITING_SYNCS_PER_MINUTE`.
#[derive(Debug, Default)]
struct WriteBudget {
    starts: std::collections::VecDeque<Instant>,
}

impl WriteBudget {
    const WINDOW: Duration = Duration::from_secs(60);

    /// When a sync that writes may start, if not now.
    fn wait_until(&mut self, now: Instant) -> Option<Instant> {
        while self
            .starts
            .front()
            .is_some_and(|&t| now.duration_since(t) >= Self::WINDOW)
        {
            self.starts.pop_front();
        }
        if self.starts.len() < MAX_WRITING_SYNCS_PER_MINUTE {
            return None;
        }
        self.starts.front().map(|&t| t + Self::WINDOW)
    }

    fn spend(&mut self, now: Instant) {
        self.starts.push_back(now);
    }
}

/// What one sync did.
#[derive(Debug, PartialEq, Eq)]
enum Synced {
    /// Our slices hold what they should (now, or as far as the API server keeps it).
    Done,
    /// The API server drops taints: sync again at once, leaving unhealthy devices out.
    Again,
    /// Too many writes this minute: the next sync waits until then.
    Deferred(Instant),
}

/// What the control loop and the "slice-watch" thread tell the "slices" thread.
#[derive(Debug)]
pub enum SlicesCommand {
    /// Make the slices match the latest devices now: they changed.
    Check,
    /// Make them match after listing them: they may have changed unseen (the kubelet wipes them
    /// when it registers us; the watch started afresh and missed what happened meanwhile).
    Verify,
    /// The watch saw one of our slices change: by our own write, or by someone else.
    Seen(SliceChange),
    /// Stop.
    Stop,
}

/// One of our slices as a watch event shows it changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceChange {
    /// The slice's name.
    pub name: String,
    /// Its resourceVersion after the change (a deletion's is new too).
    pub resource_version: Option<String>,
    /// Whether the change deleted it.
    pub deleted: bool,
}

/// The running "slices" thread and the "slice-watch" thread that prompts it.
pub struct SlicesThread {
    tx: Sender<SlicesCommand>,
    handle: ThreadHandle,
    watch: ThreadHandle,
}

impl SlicesThread {
    /// Starts the thread; it publishes `devices` at once, and again whenever it is told to check.
    pub fn spawn(
        client: Client,
        pool: Pool,
        devices: Latest,
        metrics: Arc<Metrics>,
        events: Sender<Event>,
    ) -> std::io::Result<SlicesThread> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let stop_tx = tx.clone();
        let watch = SliceWatch {
            client: client.for_watching(),
            selector: pool.selector(),
            check: tx.clone(),
        }
        .spawn(events.clone())?;
        let handle = ThreadHandle::spawn(
            "slices",
            events,
            move || Publisher::new(client, pool, metrics).run(&devices, &rx),
            move || {
                let _ = stop_tx.send(SlicesCommand::Stop);
            },
        )?;
        Ok(SlicesThread { tx, handle, watch })
    }

    /// Hands the thread a command; never blocks.
    pub fn send(&self, command: SlicesCommand) {
        // Gone only if the thread panicked, which the control loop hears of.
        let _ = self.tx.send(command);
    }

    /// Stops the thread and waits for it. Our slices stay: a restarted plugin takes them over,
    /// and the kubelet deletes them itself 30 s after it lost us.
    pub fn stop(self) {
        self.watch.stop();
        self.handle.stop();
    }
}

/// Where the watch of our slices resumes, and what each event asks of the "slices" thread.
#[derive(Debug, Default)]
struct Cursor {
    resource_version: Option<String>,
}

impl Cursor {
    /// The watch to open next, from where the last one ended (or the list before it).
    fn path(&self, selector: &str) -> String {
        let mut path = format!(
            "{SLICES}?watch=true&allowWatchBookmarks=true&timeoutSeconds={WATCH_SECONDS}&fieldSelector={selector}"
        );
        if let Some(v) = &self.resource_version {
            path.push_str(&format!("&resourceVersion={}", escape(v)));
        }
        path
    }

    /// Takes in one event: the change to one of our slices it shows, if any (the "slices"
    /// thread tells its own writes from others'). An error event (the place to resume from
    /// expired, say) leaves the next watch to start from a new list.
    fn seen(&mut self, event: WatchEvent<ResourceSlice>) -> Result<Option<SliceChange>, KubeError> {
        let (slice, deleted) = match event {
            WatchEvent::Added(slice) | WatchEvent::Modified(slice) => (slice, false),
            WatchEvent::Deleted(slice) => (slice, true),
            WatchEvent::Bookmark {
                resource_version, ..
            } => {
                self.resource_version = Some(resource_version);
                return Ok(None);
            }
            WatchEvent::ErrorStatus(status) => {
                self.resource_version = None;
                return Err(KubeError::Status {
                    action: WATCHING.to_owned(),
                    code: status.code.map_or(0, |c| u16::try_from(c).unwrap_or(0)),
                    message: status.message.unwrap_or_default(),
                });
            }
            WatchEvent::ErrorOther(_) => {
                self.resource_version = None;
                return Err(KubeError::Status {
                    action: WATCHING.to_owned(),
                    code: 0,
                    message: "an error event that is not a Status".to_owned(),
                });
            }
        };
        if let Some(v) = &slice.metadata.resource_version {
            self.resource_version = Some(v.clone());
        }
        Ok(Some(SliceChange {
            name: slice.metadata.name.unwrap_or_default(),
            resource_version: slice.metadata.resource_version,
            deleted,
        }))
    }
}

const WATCHING: &str = "watch our ResourceSlices";

/// The "slice-watch" thread: follows our slices for as long as it runs, resuming each watch
/// where the last ended, and tells the "slices" thread of every change to them.
struct SliceWatch {
    client: Client,
    selector: String,
    check: Sender<SlicesCommand>,
}

impl SliceWatch {
    /// Starts the thread. Stopping it interrupts the watch it waits on.
    fn spawn(self, events: Sender<Event>) -> std::io::Result<ThreadHandle> {
        let (stop, stopped) = crossbeam_channel::bounded::<()>(0);
        let interrupt = self.client.clone();
        ThreadHandle::spawn(
            "slice-watch",
            events,
            move || self.run(&stopped),
            move || {
                drop(stop);
                interrupt.interrupt();
            },
        )
    }

    fn run(self, stopped: &Receiver<()>) {
        let mut cursor = Cursor::default();
        let mut retry = FIRST_RETRY;
        loop {
            let result = self.follow(&mut cursor, &mut retry);
            if !matches!(stopped.try_recv(), Err(TryRecvError::Empty)) {
                return;
            }
            match result {
                // The API server ended the watch at our timeout: resume it where it was.
                Ok(()) => retry = FIRST_RETRY,
                // Too old a place to resume from: list again, and check what we missed.
                Err(KubeError::Status { code: 410, .. }) => {
                    debug!("the watch of our ResourceSlices expired; listing them again");
                    cursor.resource_version = None;
                }
                Err(e) => {
                    let wait = e.retry_after().map_or(retry, |asked| asked.max(retry));
                    warn!(
                        "{}; trying again in {wait:?}",
                        crate::error::error_chain(&e)
                    );
                    match stopped.recv_timeout(wait) {
                        Err(RecvTimeoutError::Timeout) => {}
                        Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
                    }
                    retry = (retry * 2).min(MAX_RETRY);
                }
            }
        }
    }

    /// One watch, to its end. With nowhere to resume from, it starts where a list of our slices
    /// leaves off, and the slices are checked: whatever happened to them while nobody watched
    /// is seen by that check. (A watch with no resourceVersion is what an API server with the
    /// WatchList feature, 1.37's for one, takes for a streaming list, and refuses over an etcd
    /// without progress notifications; a list first works everywhere.)
    fn follow(&self, cursor: &mut Cursor, retry: &mut Duration) -> Result<(), KubeError> {
        if cursor.resource_version.is_none() {
            let list: List<ResourceSlice> = self.client.list(
                &format!("{SLICES}?fieldSelector={}", self.selector),
                "list our ResourceSlices to watch them",
            )?;
            cursor.resource_version = list.metadata.resource_version;
            let _ = self.check.send(SlicesCommand::Verify);
        }
        let mut watch = self
            .client
            .watch::<ResourceSlice>(&cursor.path(&self.selector), WATCHING)?;
        while let Some(event) = watch.next_event()? {
            // A watch that delivers events works: a later failure starts the backoff afresh.
            *retry = FIRST_RETRY;
            if let Some(change) = cursor.seen(event)? {
                // Gone only once the "slices" thread stopped, which stops us next.
                let _ = self.check.send(SlicesCommand::Seen(change));
            }
        }
        Ok(())
    }
}

/// Slices' devices as we sent them, and as the API server stored them.
type StoredForm = (Vec<Vec<Device>>, Vec<Vec<Device>>);

struct Publisher {
    client: Client,
    pool: Pool,
    metrics: Arc<Metrics>,
    owner: Option<OwnerReference>,
    /// Whether the API server keeps device taints; false once it was seen dropping them.
    taints: bool,
    /// Whether we said that the API server drops `allowMultipleAllocations` (once is enough).
    told_sharing_dropped: bool,
    /// The slices we last wrote and what the API server stored of them, where it dropped
    /// something: while we want the same again, that is up to date, and not written again.
    stored_form: Option<StoredForm>,
    budget: WriteBudget,
    /// Our slices as the API server holds them, by our last list and our writes since; dropped
    /// when anyone else changes them (the watch tells), so that the next sync lists them again.
    /// While it is kept, a change to our devices costs its writes alone.
    known: Option<Vec<ResourceSlice>>,
    /// Our own writes whose watch events are still to come: the slice's name and the
    /// resourceVersion each left, or none for a deletion. Such an event changes nothing we do
    /// not know. Several writes of one slice may await theirs (a device back before the event
    /// of its going came).
    echoes: HashSet<(String, Option<String>)>,
}

impl Publisher {
    fn new(client: Client, pool: Pool, metrics: Arc<Metrics>) -> Publisher {
        Publisher {
            client,
            pool,
            metrics,
            owner: None,
            taints: true,
            told_sharing_dropped: false,
            stored_form: None,
            budget: WriteBudget::default(),
            known: None,
            echoes: HashSet::new(),
        }
    }

    /// Takes in one command: whether it asks for a sync; `None` to stop.
    fn take(&mut self, command: SlicesCommand) -> Option<bool> {
        match command {
            SlicesCommand::Check => Some(true),
            SlicesCommand::Verify => {
                self.forget_known();
                Some(true)
            }
            SlicesCommand::Seen(change) => {
                if self.is_echo(&change) {
                    return Some(false);
                }
                debug!(
                    "our ResourceSlice {} was {} by someone else; checking them",
                    change.name,
                    if change.deleted { "deleted" } else { "written" }
                );
                self.forget_known();
                Some(true)
            }
            SlicesCommand::Stop => None,
        }
    }

    /// Whether `change` is the event of a write of ours (and so nothing new).
    fn is_echo(&mut self, change: &SliceChange) -> bool {
        // A deletion's event carries a resourceVersion of its own, which our DELETE never saw.
        let version = (!change.deleted)
            .then(|| change.resource_version.clone())
            .flatten();
        self.echoes.remove(&(change.name.clone(), version))
    }

    /// Forgets what we know of our slices: the next sync lists them. The echoes still awaited
    /// stay: they may yet come, and are still nothing new when they do.
    fn forget_known(&mut self) {
        self.known = None;
    }

    fn run(mut self, devices: &Latest, rx: &Receiver<SlicesCommand>) {
        // With our slices as we want them, nothing is due: the watch tells us of every change to
        // them (a deletion by the kubelet, an expired watch's new list) and the control loop of
        // every change to the devices. A check on a timer would only cost the API server a list
        // per node, and a fleet of nodes a list each, for nothing.
        let mut due = Some(Instant::now());
        let mut owner_retry = FIRST_OWNER_RETRY;
        let mut owner_look: Option<Instant> = None;
        let mut retry = FIRST_RETRY;
        // After a failure, a throttled answer or a spent budget, checks wait for `due` too: the
        // watch's events (our own writes' among them) would otherwise skip every wait.
        let mut holding = false;
        loop {
            let command = match due {
                Some(at) => rx.recv_deadline(at),
                None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
            };
            let mut wanted = match command {
                Ok(command) => match self.take(command) {
                    Some(wanted) => wanted,
                    None => return,
                },
                Err(RecvTimeoutError::Timeout) => true,
                Err(RecvTimeoutError::Disconnected) => return,
            };
            // One sync answers every command already waiting; each is taken in all the same,
            // since someone else's change means we no longer know our slices.
            for command in rx.try_iter() {
                match self.take(command) {
                    Some(w) => wanted |= w,
                    None => return,
                }
            }
            if !wanted || (holding && due.is_some_and(|at| Instant::now() < at)) {
                continue;
            }
            holding = false;
            match self.sync(&devices.latest()) {
                Ok(Synced::Done) => {
                    // Readiness: the scheduler can see our devices.
                    self.metrics.listed(&self.pool.driver);
                    retry = FIRST_RETRY;
                    due = match self.owner {
                        Some(_) => None,
                        // A check before the look is due (our own write's echo) keeps its time.
                        None => {
                            let now = Instant::now();
                            let at = match owner_look {
                                Some(at) if at > now => at,
                                _ => {
                                    let at = now + owner_retry;
                                    owner_retry = (owner_retry * 2).min(MAX_OWNER_RETRY);
                                    at
                                }
                            };
                            owner_look = Some(at);
                            Some(at)
                        }
                    };
                }
                Ok(Synced::Again) => due = Some(Instant::now()),
                Ok(Synced::Deferred(until)) => {
                    self.metrics.stale(
                        &self.pool.driver,
                        "our ResourceSlices are out of date: their writes are over budget"
                            .to_owned(),
                    );
                    due = Some(until);
                    holding = true;
                }
                Err(e) => {
                    let wait = e.retry_after().map_or(retry, |asked| asked.max(retry));
                    let chain = crate::error::error_chain(&e);
                    warn!("{chain}; trying again in {wait:?}");
                    // The scheduler may be placing claims on devices that are gone.
                    self.metrics.stale(
                        &self.pool.driver,
                        format!("our ResourceSlices may be out of date: {chain}"),
                    );
                    due = Some(Instant::now() + wait);
                    holding = true;
                    retry = (retry * 2).min(MAX_RETRY);
                }
            }
        }
    }

    fn sync(&mut self, devices: &[DraDevice]) -> Result<Synced, KubeError> {
        if self.owner.is_none() {
            self.owner = self.node_owner();
        }
        let existing = match self.known.take() {
            Some(known) => known,
            None => {
                let list: List<ResourceSlice> = self.client.list(
                    &format!("{SLICES}?fieldSelector={}", self.pool.selector()),
                    "list our ResourceSlices",
                )?;
                list.items
            }
        };
        let want = desired(&self.pool, devices, self.taints);
        let stores = match &self.stored_form {
            Some((sent, stored)) if *sent == want => stored.as_slice(),
            _ => want.as_slice(),
        };
        let plan = plan(
            &self.pool,
            self.owner.as_ref(),
            existing.clone(),
            &want,
            stores,
        );
        if plan.is_empty() {
            debug!("our ResourceSlices are up to date");
            self.known = Some(existing);
            return Ok(Synced::Done);
        }
        let now = Instant::now();
        if let Some(until) = self.budget.wait_until(now) {
            warn!(
                "our ResourceSlices were written {MAX_WRITING_SYNCS_PER_MINUTE} times in the last \
                 minute; the next write waits {:?}",
                until.saturating_duration_since(now)
            );
            self.known = Some(existing);
            return Ok(Synced::Deferred(until));
        }
        self.budget.spend(now);
        let generation = plan
            .update
            .iter()
            .chain(&plan.create)
            .map(|s| s.spec.pool.generation)
            .next()
            .unwrap_or_default();
        // What the API server stored, in the order of `want`: the updates, then the creations.
        // Until every write is through, what we know is the list's, or nothing.
        let mut known: BTreeMap<String, ResourceSlice> = existing
            .into_iter()
            .map(|s| (s.metadata.name.clone().unwrap_or_default(), s))
            .collect();
        let mut stored = Vec::with_capacity(want.len());
        for slice in &plan.update {
            let name = slice.metadata.name.as_deref().unwrap_or_default();
            let written = self.counted(self.client.replace(
                &format!("{SLICES}/{}", escape(name)),
                slice,
                &format!("update the ResourceSlice {name}"),
            ));
            let written: ResourceSlice = match written {
                Ok(written) => written,
                // Changed since we read it, by someone whose event may still be on its way: the
                // sync after this lists (the budget bounds how often).
                Err(KubeError::Status { code: 409, .. }) => {
                    debug!("our ResourceSlice {name} changed since we knew it; listing them");
                    return Ok(Synced::Again);
                }
                Err(e) => return Err(e),
            };
            stored.push(comparable(
                written.spec.devices.as_deref().unwrap_or_default(),
            ));
            self.written(&mut known, written);
        }
        for slice in &plan.create {
            let written: ResourceSlice = self.counted(self.client.create(
                SLICES,
                slice,
                "create a ResourceSlice for our devices",
            ))?;
            stored.push(comparable(
                written.spec.devices.as_deref().unwrap_or_default(),
            ));
            self.written(&mut known, written);
        }
        for name in &plan.delete {
            self.counted(self.client.delete(
                &format!("{SLICES}/{}", escape(name)),
                &format!("delete the ResourceSlice {name}"),
            ))?;
            known.remove(name);
            self.await_echo();
            self.echoes.insert((name.clone(), None));
        }
        self.known = Some(known.into_values().collect());
        info!(
            "published {} devices in {} ResourceSlice(s) of pool {}, generation {generation}",
            devices.len(),
            want.len(),
            self.pool.node_name
        );
        Ok(self.learn(want, stored))
    }

    /// Takes in a slice as our write left it: what we know, and the event to come of it.
    fn written(&mut self, known: &mut BTreeMap<String, ResourceSlice>, slice: ResourceSlice) {
        let name = slice.metadata.name.clone().unwrap_or_default();
        self.await_echo();
        self.echoes
            .insert((name.clone(), slice.metadata.resource_version.clone()));
        known.insert(name, slice);
    }

    /// Makes room for one more awaited echo. An echo a watch missed (it listed again after the
    /// write) never comes; a deleted slice's name is never used again, so its entry would stay
    /// for good. Past `MAX_ECHOES` they are all dropped: at worst, one echo more is taken for
    /// someone else's change, and costs a list.
    fn await_echo(&mut self) {
        if self.echoes.len() >= MAX_ECHOES {
            self.echoes.clear();
        }
    }

    /// Counts a write in the metrics, by its result.
    fn counted<T>(&self, result: Result<T, KubeError>) -> Result<T, KubeError> {
        self.metrics.slice_written(result.is_ok());
        result
    }

    /// Compares what the API server stored with what we sent, and remembers what it drops, so
    /// that we neither write it again nor count on it: written again, a dropped field comes back
    /// as our own watch event, a check, and the same write, as fast as the server answers.
    fn learn(&mut self, sent: Vec<Vec<Device>>, stored: Vec<Vec<Device>>) -> Synced {
        if taints_dropped(&sent, &stored) && self.taints {
            warn!(
                "the API server stored our ResourceSlices without the taints of unhealthy \
                 devices (is the DRADeviceTaints feature gate off?); unhealthy devices are left \
                 out of our slices instead, until we restart"
            );
            self.taints = false;
            self.stored_form = None;
            return Synced::Again;
        }
        if sent == stored {
            self.stored_form = None;
            return Synced::Done;
        }
        if !self.told_sharing_dropped && sharing_dropped(&sent, &stored) {
            warn!(
                "the API server stored our ResourceSlices without allowMultipleAllocations (is \
                 the DRAConsumableCapacity feature gate off?); each shared device can go to one \
                 claim at a time only"
            );
            self.told_sharing_dropped = true;
        }
        if self
            .stored_form
            .as_ref()
            .is_none_or(|(before, _)| *before != sent)
        {
            warn!(
                "the API server stored our ResourceSlices other than we sent them (a field this \
                 release drops, or fills in); not writing them again until our devices change"
            );
        }
        self.stored_form = Some((sent, stored));
        Synced::Done
    }

    /// Our Node as the slices' owner, so that they go when the Node does; without it (no
    /// permission, say) the slices are published all the same.
    fn node_owner(&self) -> Option<OwnerReference> {
        let path = format!("/api/v1/nodes/{}", escape(&self.pool.node_name));
        match self
            .client
            .get::<k8s_openapi::api::core::v1::Node>(&path, "read our Node")
        {
            Ok(node) => Some(OwnerReference {
                api_version: "v1".to_owned(),
                kind: "Node".to_owned(),
                name: self.pool.node_name.clone(),
                uid: node.metadata.uid.unwrap_or_default(),
                controller: Some(true),
                ..OwnerReference::default()
            }),
            Err(e) => {
                warn!(
                    "{}; our ResourceSlices will not be owned by it",
                    crate::error::error_chain(&e)
                );
                None
            }
        }
    }
}

const SLICES: &str = "/apis/resource.k8s.io/v1/resourceslices";

#[cfg(test)]
mod tests {
    use super::*;

    fn pool() -> Pool {
        Pool {
            driver: "devices.anza-labs.dev".into(),
            node_name: "n1".into(),
        }
    }

    fn device(name: &str, healthy: bool) -> DraDevice {
        DraDevice {
            name: name.into(),
            resource_name: "devices.anza-labs.dev/kvm".into(),
            cdi_id: "devices.anza-labs.dev/kvm=kvm".into(),
            healthy,
            unit: format!("/dev/{name}#0"),
            attributes: [("resource".to_owned(), Attribute::String("kvm".into()))].into(),
            shared_by: None,
        }
    }

    /// The slices as the API server would store what `plan` asked for.
    fn stored(plan: &Plan, before: &[ResourceSlice]) -> Vec<ResourceSlice> {
        let mut out: Vec<ResourceSlice> = before
            .iter()
            .filter(|s| !plan.delete.contains(s.metadata.name.as_ref().unwrap()))
            .cloned()
            .collect();
        for u in &plan.update {
            let slot = out
                .iter_mut()
                .find(|s| s.metadata.name == u.metadata.name)
                .unwrap();
            *slot = u.clone();
        }
        for (i, c) in plan.create.iter().enumerate() {
            let mut c = c.clone();
            c.metadata.name = Some(format!(
                "{}x{i}{}",
                c.metadata.generate_name.clone().unwrap(),
                out.len()
            ));
            // The API server stamps a taint's time.
            for d in c.spec.devices.iter_mut().flatten() {
                for t in d.taints.iter_mut().flatten() {
                    t.time_added = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                        k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
                    ));
                }
            }
            out.push(c);
        }
        out
    }

    #[test]
    fn a_new_pool_is_created_then_left_alone() {
        let devices = vec![device("kvm-0", true), device("kvm-1", false)];
        let want = desired(&pool(), &devices, true);
        let first = plan(&pool(), None, vec![], &want, &want);
        assert_eq!(first.create.len(), 1);
        assert!(first.update.is_empty() && first.delete.is_empty());
        let spec = &first.create[0].spec;
        assert_eq!(spec.pool.generation, 1);
        assert_eq!(spec.pool.resource_slice_count, 1);
        assert_eq!(spec.node_name.as_deref(), Some("n1"));
        let d = spec.devices.as_ref().unwrap();
        assert!(d[0].taints.is_none());
        let taint = &d[1].taints.as_ref().unwrap()[0];
        assert_eq!(taint.key, "devices.anza-labs.dev/unhealthy");
        assert_eq!(taint.effect, "NoSchedule");
        let now = stored(&first, &[]);
        assert!(plan(&pool(), None, now, &want, &want).is_empty());
    }

    #[test]
    fn slices_made_before_our_node_could_be_read_get_it_as_their_owner_later() {
        let devices = vec![device("kvm-0", true)];
        let want = desired(&pool(), &devices, true);
        let now = stored(&plan(&pool(), None, vec![], &want, &want), &[]);
        assert!(now[0].metadata.owner_references.is_none());
        let node = OwnerReference {
            api_version: "v1".into(),
            kind: "Node".into(),
            name: "n1".into(),
            uid: "node-uid".into(),
            controller: Some(true),
            ..OwnerReference::default()
        };
        let p = plan(&pool(), Some(&node), now.clone(), &want, &want);
        assert_eq!(p.update.len(), 1);
        assert_eq!(
            p.update[0].metadata.owner_references.as_deref(),
            Some(&[node.clone()][..])
        );
        assert_eq!(p.update[0].metadata.name, now[0].metadata.name);
        let owned = stored(&p, &now);
        assert!(plan(&pool(), Some(&node), owned, &want, &want).is_empty());
    }

    #[test]
    fn a_change_bumps_the_generation_of_every_slice() {
        let many: Vec<DraDevice> = (0..100)
            .map(|i| device(&format!("kvm-{i}"), true))
            .collect();
        let want = desired(&pool(), &many, true);
        assert_eq!(want.len(), 2);
        let now = stored(&plan(&pool(), None, vec![], &want, &want), &[]);
        let mut fewer = many.clone();
        fewer.truncate(10);
        fewer[3].healthy = false;
        let fewer = desired(&pool(), &fewer, true);
        let p = plan(&pool(), None, now.clone(), &fewer, &fewer);
        assert_eq!(p.update.len(), 1);
        assert_eq!(p.delete.len(), 1);
        assert!(p.create.is_empty());
        assert_eq!(p.update[0].spec.pool.generation, 2);
        assert_eq!(p.update[0].spec.pool.resource_slice_count, 1);
        // Kept: the stored object's name and resourceVersion, for the update to apply.
        assert!(now
            .iter()
            .any(|s| s.metadata.name == p.update[0].metadata.name));
    }

    #[test]
    fn slices_of_an_older_generation_are_rewritten() {
        let want = desired(&pool(), &[device("kvm-0", true)], true);
        let mut now = stored(&plan(&pool(), None, vec![], &want, &want), &[]);
        let mut other = now[0].clone();
        other.metadata.name = Some("zz".into());
        other.spec.pool.generation = 7;
        now.push(other);
        let p = plan(&pool(), None, now, &want, &want);
        assert_eq!(p.update.len(), 1);
        assert_eq!(p.delete, ["zz"]);
        assert_eq!(p.update[0].spec.pool.generation, 8);
    }

    /// One watch event on a slice of ours, as the API server sends it (one line).
    fn line(kind: &str, rv: &str) -> String {
        serde_json::to_string(&serde_json::json!({
            "type": kind,
            "object": {"apiVersion": "resource.k8s.io/v1", "kind": "ResourceSlice",
                       "metadata": {"name": "n1-x", "resourceVersion": rv},
                       "spec": {"driver": "devices.anza-labs.dev", "nodeName": "n1",
                                "pool": {"name": "n1", "generation": 1, "resourceSliceCount": 1}}}
        }))
        .unwrap()
    }

    fn event(kind: &str, rv: &str) -> WatchEvent<ResourceSlice> {
        serde_json::from_str(&line(kind, rv)).unwrap()
    }

    #[test]
    fn the_watch_reports_each_change_and_resumes_where_it_ended() {
        let mut cursor = Cursor::default();
        let selector = pool().selector();
        assert!(!cursor.path(&selector).contains("resourceVersion"));
        let change = |rv: &str, deleted| {
            Some(SliceChange {
                name: "n1-x".into(),
                resource_version: Some(rv.into()),
                deleted,
            })
        };
        assert_eq!(
            cursor.seen(event("ADDED", "5")).unwrap(),
            change("5", false)
        );
        assert_eq!(
            cursor.seen(event("DELETED", "6")).unwrap(),
            change("6", true)
        );
        assert_eq!(
            cursor.seen(event("MODIFIED", "7")).unwrap(),
            change("7", false)
        );
        let bookmark = serde_json::from_value(serde_json::json!({
            "type": "BOOKMARK",
            "object": {"apiVersion": "resource.k8s.io/v1", "kind": "ResourceSlice",
                       "metadata": {"resourceVersion": "9"}}
        }))
        .unwrap();
        assert_eq!(cursor.seen(bookmark).unwrap(), None);
        let path = cursor.path(&selector);
        assert!(path.ends_with("&resourceVersion=9"), "{path}");
        assert!(
            path.contains("watch=true") && path.contains(&selector),
            "{path}"
        );

        let expired = serde_json::from_value(serde_json::json!({
            "type": "ERROR",
            "object": {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                       "message": "too old resource version: 9 (12)", "reason": "Expired", "code": 410}
        }))
        .unwrap();
        let e = cursor.seen(expired).unwrap_err();
        assert!(matches!(e, KubeError::Status { code: 410, .. }), "{e}");
        assert!(!cursor.path(&selector).contains("resourceVersion"));
    }

    #[test]
    fn our_own_writes_events_change_nothing_and_anyone_elses_make_the_next_sync_list() {
        let client = Client::with_tls(
            "http://127.0.0.1:1",
            ureq::tls::TlsConfig::default(),
            "/nonexistent/token".into(),
        );
        let metrics = Arc::new(Metrics::new());
        let mut p = Publisher::new(client, pool(), metrics);
        let want = desired(&pool(), &[device("kvm-0", true)], true);
        let slice = |name: &str, rv: &str| {
            let mut s = stored(&plan(&pool(), None, vec![], &want, &want), &[])[0].clone();
            s.metadata.name = Some(name.into());
            s.metadata.resource_version = Some(rv.into());
            s
        };
        let seen = |name: &str, rv: &str, deleted| {
            SlicesCommand::Seen(SliceChange {
                name: name.into(),
                resource_version: Some(rv.into()),
                deleted,
            })
        };
        let mut known = BTreeMap::new();
        p.written(&mut known, slice("a", "9"));
        p.written(&mut known, slice("a", "10"));
        p.written(&mut known, slice("b", "11"));
        p.known = Some(known.into_values().collect());
        // Our updates' and our creation's events, the first update's after the second was
        // written: nothing to do, and nothing forgotten.
        assert_eq!(p.take(seen("a", "9", false)), Some(false));
        assert_eq!(p.take(seen("a", "10", false)), Some(false));
        assert_eq!(p.take(seen("b", "11", false)), Some(false));
        assert!(p.known.is_some());
        // Each echo is taken once: the same again is someone else's (a write that left the same
        // object cannot have the same resourceVersion).
        assert_eq!(p.take(seen("a", "10", false)), Some(true));
        assert!(p.known.is_none());
        // Someone else's write after ours, and a deletion we did not make: the next sync lists.
        p.known = Some(vec![]);
        p.echoes.insert(("a".into(), Some("12".into())));
        assert_eq!(p.take(seen("a", "13", false)), Some(true));
        assert!(p.known.is_none());
        p.known = Some(vec![]);
        assert_eq!(p.take(seen("b", "14", true)), Some(true));
        assert!(p.known.is_none());
        // Our own deletion's event; then a list asked for; then a device change, which keeps
        // what we know; then stop.
        p.known = Some(vec![]);
        p.echoes.insert(("c".into(), None));
        assert_eq!(p.take(seen("c", "15", true)), Some(false));
        assert!(p.known.is_some());
        assert_eq!(p.take(SlicesCommand::Check), Some(true));
        assert!(p.known.is_some());
        assert_eq!(p.take(SlicesCommand::Verify), Some(true));
        assert!(p.known.is_none());
        assert_eq!(p.take(SlicesCommand::Stop), None);
        // Echoes a watch missed do not pile up.
        for n in 0..3 * MAX_ECHOES {
            p.written(&mut BTreeMap::new(), slice(&format!("s{n}"), "1"));
        }
        assert!(p.echoes.len() <= MAX_ECHOES);
    }

    /// An API server of one request a connection on a real socket: each connection gets the next
    /// script's lines, and a script whose flag is false holds the connection open after them.
    /// The request lines it got come back on the channel.
    fn api_server(scripts: Vec<(Vec<String>, bool)>) -> (String, Receiver<String>) {
        use std::io::{BufRead, BufReader, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = crossbeam_channel::unbounded();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for (events, end) in scripts {
                let Ok((stream, _)) = listener.accept() else {
                    return;
                };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut request_line = String::new();
                reader.read_line(&mut request_line).unwrap();
                loop {
                    let mut header = String::new();
                    reader.read_line(&mut header).unwrap();
                    if header == "\r\n" || header.is_empty() {
                        break;
                    }
                }
                let _ = tx.send(request_line.trim().to_owned());
                let mut out = stream;
                // One request a connection, as the scripts go.
                write!(out, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n").unwrap();
                for e in events {
                    let line = format!("{e}\n");
                    write!(out, "{:x}\r\n{line}\r\n", line.len()).unwrap();
                }
                out.flush().unwrap();
                if end {
                    write!(out, "0\r\n\r\n").unwrap();
                } else {
                    held.push(out);
                }
            }
            // Keep the held connections open until the test is over.
            let _ = listener.accept();
        });
        (base, rx)
    }

    #[test]
    fn a_deleted_slice_is_checked_at_once_and_a_waiting_watch_stops_at_once() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token"), "t0k3n\n").unwrap();
        let list = r#"{"apiVersion":"resource.k8s.io/v1","kind":"ResourceSliceList","metadata":{"resourceVersion":"5"},"items":[]}"#;
        let (base, requests) = api_server(vec![
            // Nowhere to resume from: a list first.
            (vec![list.to_owned()], true),
            // The watch from there: the kubelet's wipe, then the server's timeout.
            (vec![line("DELETED", "6")], true),
            // Resumed where it ended: held open, nothing happens.
            (vec![], false),
        ]);
        let client = Client::with_tls(
            &base,
            ureq::tls::TlsConfig::default(),
            dir.path().join("token"),
        );
        let (check_tx, checks) = crossbeam_channel::unbounded();
        let (events_tx, _events) = crossbeam_channel::unbounded();
        let handle = SliceWatch {
            client: client.for_watching(),
            selector: pool().selector(),
            check: check_tx,
        }
        .spawn(events_tx)
        .unwrap();

        let first = requests.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(
            first.starts_with("GET /apis/resource.k8s.io/v1/resourceslices?fieldSelector="),
            "{first}"
        );
        assert!(!first.contains("watch"), "{first}");
        let second = requests.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(
            second.contains("?watch=true") && second.contains("&resourceVersion=5 "),
            "{second}"
        );
        // A check against a list for what happened before the list, then the deletion.
        let c = checks.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(matches!(c, SlicesCommand::Verify), "{c:?}");
        let c = checks.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(
            matches!(&c, SlicesCommand::Seen(SliceChange { deleted: true, .. })),
            "{c:?}"
        );
        let third = requests.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(third.contains("&resourceVersion=6 "), "{third}");
        assert!(
            checks.try_recv().is_err(),
            "a resumed watch asked for a check"
        );

        // The watch waits on the API server (for minutes, left alone); stopping interrupts it.
        let (done_tx, done) = crossbeam_channel::bounded(1);
        std::thread::spawn(move || {
            handle.stop();
            let _ = done_tx.send(());
        });
        assert!(
            done.recv_timeout(Duration::from_secs(5)).is_ok(),
            "the slice-watch thread did not stop while its watch waited"
        );
    }

    #[test]
    fn an_empty_pool_still_has_a_slice() {
        let want = desired(&pool(), &[], true);
        assert_eq!(want, vec![Vec::<Device>::new()]);
    }

    /// What an API server with DRADeviceTaints off stores of a slice: no taints.
    fn without_taints(mut slices: Vec<ResourceSlice>) -> Vec<ResourceSlice> {
        for s in &mut slices {
            for d in s.spec.devices.iter_mut().flatten() {
                d.taints = None;
            }
        }
        slices
    }

    fn devices_of(slices: &[ResourceSlice]) -> Vec<Vec<Device>> {
        slices
            .iter()
            .map(|s| comparable(s.spec.devices.as_deref().unwrap_or_default()))
            .collect()
    }

    #[test]
    fn taints_the_server_drops_are_seen_and_the_unhealthy_device_left_out() {
        let devices = [device("kvm-0", true), device("kvm-1", false)];
        let want = desired(&pool(), &devices, true);
        let now = without_taints(stored(&plan(&pool(), None, vec![], &want, &want), &[]));
        assert!(taints_dropped(&want, &devices_of(&now)));
        // Left out instead: one write, then up to date.
        let untainted = desired(&pool(), &devices, false);
        let names: Vec<&str> = untainted[0].iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["kvm-0"]);
        let p = plan(&pool(), None, now.clone(), &untainted, &untainted);
        assert_eq!(p.update.len(), 1);
        let now = without_taints(stored(&p, &now));
        assert!(!taints_dropped(&untainted, &devices_of(&now)));
        assert_eq!(untainted, devices_of(&now), "nothing else dropped");
        assert!(plan(&pool(), None, now, &untainted, &untainted).is_empty());
    }

    #[test]
    fn a_shared_device_says_so_with_its_slots_and_a_server_that_drops_that_is_seen() {
        let mut kvm = device("kvm", true);
        kvm.shared_by = Some(10);
        let want = desired(&pool(), &[kvm, device("tun-0", true)], true);
        let json = serde_json::to_value(&want[0][0]).unwrap();
        assert_eq!(json["allowMultipleAllocations"], true, "{json}");
        assert_eq!(
            json["capacity"],
            serde_json::json!({"slots": {"value": "10", "requestPolicy": {"default": "1"}}})
        );
        let plain = serde_json::to_value(&want[0][1]).unwrap();
        assert!(plain.get("allowMultipleAllocations").is_none() && plain.get("capacity").is_none());
        // An API server whose DRAConsumableCapacity gate is off keeps the capacity's value
        // and drops the rest.
        let mut now = stored(&plan(&pool(), None, vec![], &want, &want), &[]);
        assert!(!sharing_dropped(&want, &devices_of(&now)));
        for d in now[0].spec.devices.iter_mut().flatten() {
            d.allow_multiple_allocations = None;
            for c in d.capacity.iter_mut().flat_map(|c| c.values_mut()) {
                c.request_policy = None;
            }
        }
        assert!(sharing_dropped(&want, &devices_of(&now)));
    }

    #[test]
    fn slices_as_the_server_stores_them_are_not_written_again() {
        let want = desired(&pool(), &[device("kvm-0", true)], true);
        let mut now = stored(&plan(&pool(), None, vec![], &want, &want), &[]);
        // A field this release does not keep: the stored device lost an attribute.
        for d in now[0].spec.devices.iter_mut().flatten() {
            d.attributes = None;
        }
        let kept = devices_of(&now);
        assert!(!taints_dropped(&want, &kept));
        assert_ne!(want, kept);
        assert!(!plan(&pool(), None, now.clone(), &want, &want).is_empty());
        assert!(plan(&pool(), None, now, &want, &kept).is_empty());
    }

    #[test]
    fn the_publisher_learns_what_is_dropped_once_and_writes_are_budgeted() {
        let dir = tempfile::tempdir().unwrap();
        let client = Client::with_tls(
            "https://127.0.0.1:1",
            ureq::tls::TlsConfig::default(),
            dir.path().join("token"),
        );
        let mut p = Publisher::new(client, pool(), Arc::new(Metrics::new()));
        let devices = [device("kvm-0", false)];
        let sent = desired(&pool(), &devices, true);
        let now = without_taints(stored(&plan(&pool(), None, vec![], &sent, &sent), &[]));
        assert_eq!(p.learn(sent, devices_of(&now)), Synced::Again);
        assert!(!p.taints);
        let sent = desired(&pool(), &devices, p.taints);
        assert_eq!(p.learn(sent.clone(), sent), Synced::Done);
        assert!(p.stored_form.is_none());

        let start = Instant::now();
        for i in 0..MAX_WRITING_SYNCS_PER_MINUTE {
            let at = start + Duration::from_secs(i as u64);
            assert_eq!(p.budget.wait_until(at), None, "write {i}");
            p.budget.spend(at);
        }
        let late = start + Duration::from_secs(30);
        assert_eq!(p.budget.wait_until(late), Some(start + WriteBudget::WINDOW));
        assert_eq!(p.budget.wait_until(start + WriteBudget::WINDOW), None);
    }
}
