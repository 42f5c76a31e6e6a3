//! Preparing claims (the "prepare" thread, fed by "claim-reader-N"): for each claim the kubelet
//! names, the devices the scheduler allocated to it on our node and their CDI names, read from the
//! claim itself (its UID checked), recorded in a checkpoint file before the answer goes out, so
//! that a restarted plugin answers the same again and prepares nothing twice. The readers fetch
//! claims, several at once; the one "prepare" thread decides and records, every batch waiting
//! in one turn and one write. What a claim maps to is decided in pure functions below.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::{select, Receiver, Sender, TrySendError};
use k8s_openapi::api::resource::v1::{DeviceRequestAllocationResult, ResourceClaim};
use log::{debug, info, warn};
use serde::{Deserialize, Serialize};

use super::kube::{escape, Client, KubeError};
use super::model::{DraDevice, Latest};
use super::slices::Pool;
use crate::event::Event;
use crate::lock::TurnLock;
use crate::metrics::{ClaimResult, Metrics};
use crate::thread::ThreadHandle;

/// Batches waiting to be read, and read batches waiting for the "prepare" thread; beyond that the
/// kubelet is told to try again. The kubelet sends one batch per pod being started or stopped.
const QUEUE: usize = 16;

/// "claim-reader" threads: how many claims are read from the API server at once. Pods start
/// together (a Deployment scaled up, a node's pods after a reboot); more readers than this
/// would mostly wait on the API server's own limits.
const READERS: usize = 4;

/// A claim as the kubelet names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClaimRef {
    /// The claim's UID: the key of every answer.
    pub uid: String,
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
}

/// One device prepared for a claim, as both API versions answer it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Prepared {
    /// The claim's requests this device satisfies (base names: `req`, not `req/sub`).
    pub requests: Vec<String>,
    /// Our pool.
    pub pool: String,
    /// The device's name in the pool.
    pub device: String,
    /// What the runtime injects.
    pub cdi_ids: Vec<String>,
    /// The device slot behind the name (see `DraDevice::unit`), so that no other claim is
    /// prepared with the same slot under another name; empty in checkpoints written before.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub unit: String,
    /// Which share of a device many claims may hold this is (the allocation's `shareID`); none
    /// for a device given to one claim at a time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub share_id: Option<String>,
}

/// Each claim's answer: its devices, or why it cannot have them.
pub type Outcome = BTreeMap<String, Result<Vec<Prepared>, String>>;

/// A batch from the kubelet and where its answer goes.
pub struct Job {
    /// Prepare, or unprepare.
    pub prepare: bool,
    /// When the call arrived, for its latency.
    pub received: Instant,
    /// The claims of the batch.
    pub claims: Vec<ClaimRef>,
    /// Starts writing the answer (or a refusal) to the gRPC sink; the future says how it went.
    pub answer: Box<dyn FnOnce(Result<Outcome, grpcio::RpcStatus>) -> Answered + Send>,
}

/// The write of an answer, under way.
pub type Answered = futures_util::future::BoxFuture<'static, grpcio::Result<()>>;

/// Why a batch was not taken.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// Too many batches wait already.
    Busy,
    /// The thread is stopping.
    Stopping,
}

/// The devices `claim` was allocated on our pool, by the claim's own status; an error names what
/// is wrong with it. `expected_uid` is the UID the kubelet asked for: a claim deleted and made
/// again under the same name has another one, and is not the claim the kubelet means.
pub fn allocated(
    pool: &Pool,
    claim: &ResourceClaim,
    expected_uid: &str,
    devices: &HashMap<String, DraDevice>,
) -> Result<Vec<Prepared>, String> {
    let name = claim.metadata.name.as_deref().unwrap_or_default();
    let uid = claim.metadata.uid.as_deref().unwrap_or_default();
    if uid != expected_uid {
        return Err(format!(
            "the claim {name} has UID {uid}, not {expected_uid}: it was deleted and made again"
        ));
    }
    let results =
        allocation_results(claim).ok_or_else(|| format!("the claim {name} is not allocated"))?;
    let mut out: Vec<Prepared> = Vec::new();
    for result in results {
        if result.driver != pool.driver {
            continue;
        }
        if result.pool != pool.node_name {
            return Err(format!(
                "the claim {name} was allocated {} from pool {}, which is not this node's ({})",
                result.device, result.pool, pool.node_name
            ));
        }
        let device = devices.get(&result.device).ok_or_else(|| {
            format!(
                "the claim {name} was allocated {}, which this node no longer has",
                result.device
            )
        })?;
        if !device.healthy {
            return Err(format!(
                "the claim {name} was allocated {}, whose device node is missing",
                result.device
            ));
        }
        let request = result
            .request
            .split_once('/')
            .map_or(result.request.as_str(), |(base, _)| base)
            .to_owned();
        // One device satisfying two requests is one entry with both names; shares of a device
        // are entries of their own, as the kubelet records them.
        if let Some(same) = out
            .iter_mut()
            .find(|p| p.device == result.device && p.share_id == result.share_id)
        {
            if !same.requests.contains(&request) {
                same.requests.push(request);
            }
            continue;
        }
        out.push(Prepared {
            requests: vec![request],
            pool: pool.node_name.clone(),
            device: result.device.clone(),
            cdi_ids: vec![device.cdi_id.clone()],
            unit: device.unit.clone(),
            share_id: result.share_id.clone(),
        });
    }
    Ok(out)
}

/// What one prepared claim was given, as the checkpoint keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The claim's namespace.
    pub namespace: String,
    /// The claim's name.
    pub name: String,
    /// What its prepare answered.
    pub devices: Vec<Prepared>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct CheckpointFile {
    version: u32,
    claims: BTreeMap<String, Entry>,
}

/// The prepared claims, by UID, kept in a file that is replaced whole on every change (written
/// beside it, synced, renamed), so a crash leaves the old state or the new, never half of one.
#[derive(Debug)]
pub struct Checkpoint {
    path: PathBuf,
    claims: BTreeMap<String, Entry>,
    /// The claims as the file has them, while changes since are not yet committed.
    saved: Option<BTreeMap<String, Entry>>,
}

impl Checkpoint {
    /// The checkpoint at `path`; none yet is an empty one. A file we cannot read is kept aside
    /// (`.bad`) rather than overwritten, and we start empty: the kubelet prepares again what it
    /// still needs.
    pub fn load(path: &Path) -> Checkpoint {
        let claims = match fs::read(path) {
            Ok(bytes) => match serde_json::from_slice::<CheckpointFile>(&bytes) {
                Ok(file) => file.claims,
                Err(e) => {
                    let aside = path.with_extension("bad");
                    warn!(
                        "the checkpoint {} is unreadable ({e}); kept as {} and starting empty",
                        path.display(),
                        aside.display()
                    );
                    let _ = fs::rename(path, &aside);
                    BTreeMap::new()
                }
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => {
                warn!(
                    "cannot read the checkpoint {}: {e}; starting empty",
                    path.display()
                );
                BTreeMap::new()
            }
        };
        Checkpoint {
            path: path.to_owned(),
            claims,
            saved: None,
        }
    }

    /// Reads the file again, which another instance of the driver (a rolling update's other
    /// pod, taking turns with us) may have written since: call it at the start of each turn, so
    /// that every turn decides on what the node has prepared, not on what we remember. Always
    /// read: the file's inode cannot tell, since a replaced file's number is soon given to the
    /// next one (seen in this file's tests), and the file is small beside the API call a prepare
    /// makes.
    pub fn refresh(&mut self) {
        *self = Checkpoint::load(&self.path);
    }

    /// What the claim with this UID was given, if it is prepared.
    pub fn get(&self, uid: &str) -> Option<&Entry> {
        self.claims.get(uid)
    }

    /// How many claims are prepared.
    pub fn len(&self) -> usize {
        self.claims.len()
    }

    /// The CDI kinds (resource names) the prepared claims' devices belong to.
    pub fn kinds_in_use(&self) -> std::collections::BTreeSet<String> {
        self.claims
            .values()
            .flat_map(|e| &e.devices)
            .flat_map(|d| &d.cdi_ids)
            .filter_map(|id| id.split_once('=').map(|(kind, _)| kind.to_owned()))
            .collect()
    }

    /// Removes the file when no claim is prepared: nothing of ours stays behind after an
    /// uninstall.
    pub fn remove_if_empty(&self) {
        if self.claims.is_empty() {
            if let Err(e) = fs::remove_file(&self.path) {
                if e.kind() != io::ErrorKind::NotFound {
                    warn!("cannot remove {}: {e}", self.path.display());
                }
            }
        }
    }

    /// Records a prepared claim, on disk before it returns.
    #[cfg(test)]
    pub fn insert(&mut self, uid: &str, entry: Entry) -> io::Result<()> {
        self.record(uid, entry);
        self.commit()
    }

    /// Records a prepared claim in memory, for the next `commit` to write.
    pub fn record(&mut self, uid: &str, entry: Entry) {
        self.keep_saved();
        self.claims.insert(uid.to_owned(), entry);
    }

    /// Forgets a claim in memory, for the next `commit` to write; one not there is already
    /// forgotten, and nothing changes.
    pub fn forget(&mut self, uid: &str) -> Option<Entry> {
        if !self.claims.contains_key(uid) {
            return None;
        }
        self.keep_saved();
        self.claims.remove(uid)
    }

    /// Writes what was recorded and forgotten since the last commit, if anything was; when the
    /// write fails, every such change is undone, so memory keeps saying what the file says.
    pub fn commit(&mut self) -> io::Result<()> {
        let Some(saved) = self.saved.take() else {
            return Ok(());
        };
        self.save().inspect_err(|_| self.claims = saved)
    }

    /// The prepared claims, other than `uid`, that hold the device slot `unit`: for themselves,
    /// or also through a share of it unless `whole_only`; each with its UID.
    fn holders_of<'a>(
        &'a self,
        unit: &'a str,
        uid: &'a str,
        whole_only: bool,
    ) -> impl Iterator<Item = (&'a str, &'a Entry)> + 'a {
        self.claims
            .iter()
            .filter(move |(other, _)| *other != uid)
            .filter(move |(_, entry)| {
                entry
                    .devices
                    .iter()
                    .any(|d| d.unit == unit && !(whole_only && d.share_id.is_some()))
            })
            .map(|(other, entry)| (other.as_str(), entry))
    }

    /// Refuses `devices` for claim `uid` when another prepared claim still holds one of their
    /// slots: the scheduler allocates by name, and a name that changed under a prepared claim
    /// would otherwise give one slot to two claims. Whether a holder still holds its slot is
    /// for `still_holds` (its UID, its entry, its device of that slot) to say: a holder the API
    /// server has deleted or deallocated freed the slot there, and the scheduler gave it on; the
    /// kubelet unprepares such a holder only once its pod's containers are gone, seconds later,
    /// and a refusal meanwhile would cost the new pod the kubelet's back-off, not protect it.
    pub fn check_free(
        &self,
        uid: &str,
        devices: &[Prepared],
        mut still_holds: impl FnMut(&str, &Entry, &Prepared) -> Result<bool, String>,
    ) -> Result<(), String> {
        // Shares of a device many claims may hold are counted against its capacity by the
        // scheduler: a share meets only a claim that holds the device whole.
        for device in devices.iter().filter(|d| !d.unit.is_empty()) {
            let share = device.share_id.is_some();
            for (other_uid, other) in self.holders_of(&device.unit, uid, share) {
                let Some(held) = other.devices.iter().find(|d| d.unit == device.unit) else {
                    continue;
                };
                if still_holds(other_uid, other, held)? {
                    return Err(format!(
                        "{} ({}) is already prepared for the claim {}/{}: one device slot is never given to two claims",
                        device.device, device.unit, other.namespace, other.name
                    ));
                }
            }
        }
        Ok(())
    }

    /// Forgets a claim, on disk before it returns; one not there is already forgotten.
    #[cfg(test)]
    pub fn remove(&mut self, uid: &str) -> io::Result<Option<Entry>> {
        let old = self.forget(uid);
        self.commit().map(|()| old)
    }

    /// Keeps the claims as last saved, before the first change since.
    fn keep_saved(&mut self) {
        if self.saved.is_none() {
            self.saved = Some(self.claims.clone());
        }
    }

    fn save(&self) -> io::Result<()> {
        let file = CheckpointFile {
            version: 1,
            claims: self.claims.clone(),
        };
        let mut text = serde_json::to_vec_pretty(&file).map_err(io::Error::other)?;
        text.push(b'\n');
        crate::files::replace(&self.path, &text, 0o600)
    }
}

/// The lock file beside `checkpoint` that instances take turns on (see [`TurnLock`]).
pub fn turns_path(checkpoint: &Path) -> PathBuf {
    checkpoint.with_extension("lock")
}

/// The running "prepare" thread and the "claim-reader" threads that read its claims.
pub struct PrepareThread {
    jobs: Jobs,
    /// The readers first: stopped before the thread they hand claims to.
    handles: Vec<ThreadHandle>,
}

/// A handle for the gRPC handlers: hands them batches without ever blocking.
#[derive(Clone)]
pub struct Jobs {
    /// Prepares, to be read first.
    to_read: Sender<Job>,
    /// Unprepares, which need nothing from the API server.
    to_decide: Sender<Read>,
}

impl Jobs {
    /// Queues a batch, or hands it back with why not (the handler answers with a status then).
    pub fn submit(&self, job: Job) -> Result<(), (Refused, Job)> {
        if job.prepare {
            return self.to_read.try_send(job).map_err(|e| match e {
                TrySendError::Full(job) => (Refused::Busy, job),
                TrySendError::Disconnected(job) => (Refused::Stopping, job),
            });
        }
        let read = Read {
            job,
            claims: Vec::new(),
        };
        self.to_decide.try_send(read).map_err(|e| match e {
            TrySendError::Full(read) => (Refused::Busy, read.job),
            TrySendError::Disconnected(read) => (Refused::Stopping, read.job),
        })
    }
}

/// A batch whose claims were read from the API server (one result per claim of a prepare, in
/// order; none for an unprepare).
pub struct Read {
    job: Job,
    claims: Vec<Result<ResourceClaim, String>>,
}

impl PrepareThread {
    /// Starts the threads with the checkpoint at `checkpoint`.
    pub fn spawn(
        client: Client,
        pool: Pool,
        checkpoint: &Path,
        devices: Latest,
        metrics: Arc<Metrics>,
        events: Sender<Event>,
    ) -> io::Result<PrepareThread> {
        let (to_read, unread) = crossbeam_channel::bounded(QUEUE);
        let (to_decide, ready) = crossbeam_channel::bounded(QUEUE);
        let turns = turns_path(checkpoint);
        let checkpoint = Checkpoint::load(checkpoint);
        info!("{} prepared claims in the checkpoint", checkpoint.len());
        metrics.set_prepared_claims(checkpoint.len());
        let mut handles = Vec::with_capacity(READERS + 1);
        for n in 0..READERS {
            let (stop, stopped) = crossbeam_channel::bounded::<()>(0);
            let (client, unread, ready) = (client.clone(), unread.clone(), to_decide.clone());
            handles.push(ThreadHandle::spawn(
                &format!("claim-reader-{n}"),
                events.clone(),
                move || read_claims(&client, &unread, &ready, &stopped),
                move || drop(stop),
            )?);
        }
        let (stop, stopped) = crossbeam_channel::bounded::<()>(0);
        let mut preparer = Preparer {
            client,
            pool,
            checkpoint,
            turns,
            metrics,
            devices,
            by_name: (Arc::new(Vec::new()), HashMap::new()),
        };
        handles.push(ThreadHandle::spawn(
            "prepare",
            events,
            move || preparer.run(&ready, &stopped),
            move || drop(stop),
        )?);
        Ok(PrepareThread {
            jobs: Jobs { to_read, to_decide },
            handles,
        })
    }

    /// What the gRPC handlers submit to.
    pub fn jobs(&self) -> Jobs {
        self.jobs.clone()
    }

    /// Stops the threads once their batches in hand are answered, and waits for them.
    pub fn stop(self) {
        for handle in self.handles {
            handle.stop();
        }
    }
}

/// A "claim-reader" thread: reads the claims of each prepare from the API server, so that the
/// claims of batches that arrive together are read together, and hands the batch on. The reads
/// carry no decision: what a claim is given is for the "prepare" thread alone.
fn read_claims(
    client: &Client,
    unread: &Receiver<Job>,
    ready: &Sender<Read>,
    stopped: &Receiver<()>,
) {
    while let Some(job) = next_or_stop(unread, stopped) {
        let claims = job.claims.iter().map(|c| read_claim(client, c)).collect();
        select! {
            send(ready, Read { job, claims }) -> sent => if sent.is_err() { return },
            recv(stopped) -> _ => return,
        }
    }
}

/// The next of `items`, or none once the thread is told to stop or `items` is closed.
fn next_or_stop<T>(items: &Receiver<T>, stopped: &Receiver<()>) -> Option<T> {
    select! {
        recv(stopped) -> _ => None,
        recv(items) -> item => item.ok(),
    }
}

/// The claim the kubelet names, as the API server has it now.
fn read_claim(client: &Client, claim: &ClaimRef) -> Result<ResourceClaim, String> {
    client
        .get(
            &claim_path(&claim.namespace, &claim.name),
            &format!("read the ResourceClaim {}/{}", claim.namespace, claim.name),
        )
        .map_err(|e| crate::error::error_chain(&e))
}

/// Where the API server keeps the ResourceClaim `namespace/name`.
fn claim_path(namespace: &str, name: &str) -> String {
    format!(
        "/apis/resource.k8s.io/v1/namespaces/{}/resourceclaims/{}",
        escape(namespace),
        escape(name)
    )
}

struct Preparer {
    client: Client,
    pool: Pool,
    checkpoint: Checkpoint,
    /// The lock file whose turns every instance of the driver takes at the checkpoint.
    turns: PathBuf,
    metrics: Arc<Metrics>,
    /// The devices as the control loop last published them.
    devices: Latest,
    /// Those devices by name, and the list they were made from.
    by_name: (Arc<Vec<DraDevice>>, HashMap<String, DraDevice>),
}

impl Preparer {
    fn run(&mut self, ready: &Receiver<Read>, stopped: &Receiver<()>) {
        while let Some(first) = next_or_stop(ready, stopped) {
            // Every batch waiting now shares one turn and one write of the checkpoint: callers
            // that arrive together wait for one write, not for each other's.
            let mut batches = vec![first];
            batches.extend(ready.try_iter().take(2 * QUEUE));
            let outcomes = self.take_turn(&batches);
            self.metrics.set_prepared_claims(self.checkpoint.len());
            let mut answers = Vec::with_capacity(batches.len());
            for (read, outcome) in batches.into_iter().zip(outcomes) {
                let job = read.job;
                for result in outcome.values() {
                    let result = if result.is_ok() {
                        ClaimResult::Ok
                    } else {
                        ClaimResult::Error
                    };
                    self.metrics.claim_call(job.prepare, result);
                }
                answers.push((job.prepare, job.received, (job.answer)(Ok(outcome))));
            }
            // Our own thread: waiting for the writes, all under way, costs nobody else.
            for (prepare, received, answer) in answers {
                if let Err(e) = futures_executor::block_on(answer) {
                    debug!("could not send an answer to the kubelet: {e}");
                }
                self.metrics.claim_call_took(prepare, received.elapsed());
            }
        }
    }

    /// Answers batches in our turn at the checkpoint: other instances of the driver on this node
    /// (a rolling update's two pods) answer the kubelet too, and each batch must see the claims
    /// the last one prepared, whoever prepared them. A turn we cannot take, or a checkpoint we
    /// cannot write, fails the claims it would have changed; the kubelet asks again.
    fn take_turn(&mut self, batches: &[Read]) -> Vec<Outcome> {
        let turn = match TurnLock::wait(&self.turns) {
            Ok(turn) => turn,
            Err(e) => {
                let why = format!(
                    "cannot take our turn at the prepared claims: {}",
                    crate::error::error_chain(&e)
                );
                warn!("{why}");
                return batches
                    .iter()
                    .map(|read| {
                        let claims = &read.job.claims;
                        claims
                            .iter()
                            .map(|c| (c.uid.clone(), Err(why.clone())))
                            .collect()
                    })
                    .collect();
            }
        };
        self.checkpoint.refresh();
        // Which answers recorded a change, to be failed if the write of the changes fails.
        let mut changed: Vec<(usize, String)> = Vec::new();
        let mut outcomes: Vec<Outcome> = Vec::with_capacity(batches.len());
        for (n, read) in batches.iter().enumerate() {
            let job = &read.job;
            let mut outcome = Outcome::new();
            for (i, claim) in job.claims.iter().enumerate() {
                let (result, change) = if job.prepare {
                    self.prepare(claim, read.claims.get(i))
                } else {
                    self.unprepare(claim)
                };
                if change {
                    changed.push((n, claim.uid.clone()));
                }
                outcome.insert(claim.uid.clone(), result);
            }
            outcomes.push(outcome);
        }
        if let Err(e) = self.checkpoint.commit() {
            let why = format!("cannot record the change in the checkpoint: {e}");
            warn!("{why}");
            for (n, uid) in changed {
                outcomes[n].insert(uid, Err(why.clone()));
            }
        }
        drop(turn);
        outcomes
    }

    /// Decides what `claim` (`read`: as the API server had it) is given, recorded in memory
    /// (the turn writes it); and whether that changed the checkpoint.
    fn prepare(
        &mut self,
        claim: &ClaimRef,
        read: Option<&Result<ResourceClaim, String>>,
    ) -> (Result<Vec<Prepared>, String>, bool) {
        if let Some(entry) = self.checkpoint.get(&claim.uid) {
            info!(
                "claim {}/{} ({}) is already prepared: answering as before",
                claim.namespace, claim.name, claim.uid
            );
            return (Ok(entry.devices.clone()), false);
        }
        let object = match read {
            Some(Ok(object)) => object,
            Some(Err(e)) => return (Err(e.clone()), false),
            None => return (Err(format!("the claim {} was not read", claim.name)), false),
        };
        let devices = match allocated(
            &self.pool,
            object,
            &claim.uid,
            newest(&self.devices, &mut self.by_name),
        ) {
            Ok(devices) => devices,
            Err(e) => return (Err(e), false),
        };
        let (client, pool) = (&self.client, &self.pool);
        if let Err(e) = self
            .checkpoint
            .check_free(&claim.uid, &devices, |uid, holder, held| {
                still_allocated(client, pool, uid, holder, held)
            })
        {
            return (Err(e), false);
        }
        self.checkpoint.record(
            &claim.uid,
            Entry {
                namespace: claim.namespace.clone(),
                name: claim.name.clone(),
                devices: devices.clone(),
            },
        );
        let names: Vec<&str> = devices.iter().map(|d| d.device.as_str()).collect();
        info!(
            "prepared claim {}/{} ({}): {}",
            claim.namespace,
            claim.name,
            claim.uid,
            names.join(", ")
        );
        (Ok(devices), true)
    }

    /// Forgets `claim`, in memory (the turn writes it); and whether that changed the checkpoint.
    fn unprepare(&mut self, claim: &ClaimRef) -> (Result<Vec<Prepared>, String>, bool) {
        let change = self.checkpoint.forget(&claim.uid).is_some();
        if change {
            info!(
                "unprepared claim {}/{} ({})",
                claim.namespace, claim.name, claim.uid
            );
        }
        (Ok(Vec::new()), change)
    }
}

/// Whether the prepared claim `uid` (`holder`) is still allocated `held` in the API server: not
/// when the claim is gone, was made again under its name, or was deallocated or allocated
/// otherwise since. By the device's name as the holder was prepared with it, so that a holder
/// whose device was renamed since still holds its slot. A claim we cannot read holds it.
fn still_allocated(
    client: &Client,
    pool: &Pool,
    uid: &str,
    holder: &Entry,
    held: &Prepared,
) -> Result<bool, String> {
    let path = claim_path(&holder.namespace, &holder.name);
    let action = format!(
        "read the ResourceClaim {}/{}, prepared with {}",
        holder.namespace, holder.name, held.unit
    );
    let claim: ResourceClaim = match client.get(&path, &action) {
        Ok(claim) => claim,
        Err(KubeError::Status { code: 404, .. }) => {
            info!(
                "claim {}/{} ({uid}) holds {} but is gone from the API server: the kubelet has yet to unprepare it, and its slot is free",
                holder.namespace, holder.name, held.unit
            );
            return Ok(false);
        }
        Err(e) => return Err(crate::error::error_chain(&e)),
    };
    let holds = claim.metadata.uid.as_deref() == Some(uid)
        && allocated_names(pool, &claim).any(|name| name == held.device);
    if !holds {
        info!(
            "claim {}/{} ({uid}) holds {} but the API server no longer allocates it {}: its slot is free",
            holder.namespace, holder.name, held.unit, held.device
        );
    }
    Ok(holds)
}

/// What the scheduler allocated `claim`, if it did.
fn allocation_results(claim: &ResourceClaim) -> Option<&Vec<DeviceRequestAllocationResult>> {
    claim
        .status
        .as_ref()
        .and_then(|s| s.allocation.as_ref())
        .and_then(|a| a.devices.as_ref())
        .and_then(|d| d.results.as_ref())
}

/// The names of the devices `claim` is allocated from our pool.
fn allocated_names<'a>(pool: &'a Pool, claim: &'a ResourceClaim) -> impl Iterator<Item = &'a str> {
    allocation_results(claim)
        .into_iter()
        .flatten()
        .filter(|r| r.driver == pool.driver && r.pool == pool.node_name)
        .map(|r| r.device.as_str())
}

/// The newest devices by name (a batch may name a device just found), made again from `latest`
/// only when the control loop has published a new list since.
fn newest<'a>(
    latest: &Latest,
    by_name: &'a mut (Arc<Vec<DraDevice>>, HashMap<String, DraDevice>),
) -> &'a HashMap<String, DraDevice> {
    let list = latest.latest();
    if !Arc::ptr_eq(&list, &by_name.0) {
        let names = list.iter().map(|d| (d.name.clone(), d.clone())).collect();
        *by_name = (list, names);
    }
    &by_name.1
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dra::model::Attribute;
    use k8s_openapi::api::resource::v1::{
        AllocationResult, DeviceAllocationResult, DeviceRequestAllocationResult,
        ResourceClaimStatus,
    };

    fn pool() -> Pool {
        Pool {
            driver: "devices.anza-labs.dev".into(),
            node_name: "n1".into(),
        }
    }

    fn table(healthy: bool) -> HashMap<String, DraDevice> {
        ["kvm-0", "kvm-1"]
            .iter()
            .map(|n| {
                (
                    (*n).to_owned(),
                    DraDevice {
                        name: (*n).to_owned(),
                        resource_name: "devices.anza-labs.dev/kvm".into(),
                        cdi_id: "devices.anza-labs.dev/kvm=kvm".into(),
                        unit: format!("/dev/kvm#{}", &n[4..]),
                        healthy,
                        attributes: [("resource".to_owned(), Attribute::String("kvm".into()))]
                            .into(),
                        shared_by: None,
                    },
                )
            })
            .collect()
    }

    fn result(
        request: &str,
        driver: &str,
        pool: &str,
        device: &str,
    ) -> DeviceRequestAllocationResult {
        DeviceRequestAllocationResult {
            request: request.into(),
            driver: driver.into(),
            pool: pool.into(),
            device: device.into(),
            ..Default::default()
        }
    }

    /// Every holder still holds its slot, as the API server would say of claims it still has.
    fn live(_: &str, _: &Entry, _: &Prepared) -> Result<bool, String> {
        Ok(true)
    }

    /// Records `devices` as prepared for the claim `uid`, named `ns/name`.
    fn hold(c: &mut Checkpoint, uid: &str, name: &str, devices: Vec<Prepared>) {
        let entry = Entry {
            namespace: "ns".into(),
            name: name.into(),
            devices,
        };
        c.insert(uid, entry).unwrap();
    }

    fn claim(uid: &str, results: Vec<DeviceRequestAllocationResult>) -> ResourceClaim {
        let mut c = ResourceClaim::default();
        c.metadata.name = Some("c".into());
        c.metadata.uid = Some(uid.into());
        c.status = Some(ResourceClaimStatus {
            allocation: Some(AllocationResult {
                devices: Some(DeviceAllocationResult {
                    results: Some(results),
                    config: None,
                }),
                ..Default::default()
            }),
            ..Default::default()
        });
        c
    }

    #[test]
    fn a_claim_gets_its_devices_on_our_pool_with_base_request_names() {
        let c = claim(
            "u1",
            vec![
                result(
                    "container-0-request-0",
                    "devices.anza-labs.dev",
                    "n1",
                    "kvm-0",
                ),
                result("gpu", "gpu.example.com", "n1", "gpu-0"),
                result("vm/fast", "devices.anza-labs.dev", "n1", "kvm-1"),
            ],
        );
        let got = allocated(&pool(), &c, "u1", &table(true)).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].requests, ["container-0-request-0"]);
        assert_eq!(got[0].cdi_ids, ["devices.anza-labs.dev/kvm=kvm"]);
        assert_eq!(got[1].requests, ["vm"]);
        assert_eq!(got[1].device, "kvm-1");
    }

    #[test]
    fn a_claim_is_refused_when_it_is_not_the_one_asked_for_or_cannot_be_served() {
        let ours = vec![result("r", "devices.anza-labs.dev", "n1", "kvm-0")];
        let e = allocated(&pool(), &claim("u2", ours.clone()), "u1", &table(true)).unwrap_err();
        assert!(e.contains("deleted and made again"), "{e}");
        let e = allocated(&pool(), &claim("u1", ours.clone()), "u1", &table(false)).unwrap_err();
        assert!(e.contains("missing"), "{e}");
        let e = allocated(&pool(), &claim("u1", ours), "u1", &HashMap::new()).unwrap_err();
        assert!(e.contains("no longer has"), "{e}");
        let other_node = vec![result("r", "devices.anza-labs.dev", "n2", "kvm-0")];
        let e = allocated(&pool(), &claim("u1", other_node), "u1", &table(true)).unwrap_err();
        assert!(e.contains("not this node's"), "{e}");
        let mut unallocated = claim("u1", vec![]);
        unallocated.status = None;
        let e = allocated(&pool(), &unallocated, "u1", &table(true)).unwrap_err();
        assert!(e.contains("not allocated"), "{e}");
    }

    #[test]
    fn a_full_queue_hands_the_batch_back_to_be_refused() {
        let (to_read, unread) = crossbeam_channel::bounded(1);
        let (to_decide, ready) = crossbeam_channel::bounded(1);
        let jobs = Jobs { to_read, to_decide };
        let job = |prepare| Job {
            prepare,
            received: Instant::now(),
            claims: vec![],
            answer: Box::new(|_| -> Answered { Box::pin(async { Ok(()) }) }),
        };
        // Prepares queue to be read, unprepares straight for the decision; each queue is bounded.
        for prepare in [true, false] {
            assert!(jobs.submit(job(prepare)).is_ok());
            let Err((refused, back)) = jobs.submit(job(prepare)) else {
                panic!("a full queue took the batch");
            };
            assert_eq!(refused, Refused::Busy);
            assert_eq!(back.prepare, prepare);
        }
        assert!(unread.try_recv().unwrap().prepare);
        assert!(!ready.try_recv().unwrap().job.prepare);
        drop((unread, ready));
        for prepare in [true, false] {
            assert!(matches!(
                jobs.submit(job(prepare)),
                Err((Refused::Stopping, _))
            ));
        }
    }

    #[test]
    fn the_checkpoint_survives_a_restart_and_a_bad_file_is_kept_aside() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("checkpoint.json");
        let entry = Entry {
            namespace: "ns".into(),
            name: "c".into(),
            devices: vec![Prepared {
                requests: vec!["r".into()],
                pool: "n1".into(),
                device: "kvm-0".into(),
                cdi_ids: vec!["devices.anza-labs.dev/kvm=kvm".into()],
                unit: "/dev/kvm#0".into(),
                share_id: Some("5d0c4f1e-0000-4000-8000-000000000001".into()),
            }],
        };
        let mut c = Checkpoint::load(&path);
        assert_eq!(c.len(), 0);
        c.insert("u1", entry.clone()).unwrap();
        c.insert("u2", entry.clone()).unwrap();
        assert_eq!(c.remove("u2").unwrap(), Some(entry.clone()));
        assert_eq!(c.remove("u2").unwrap(), None);
        let again = Checkpoint::load(&path);
        assert_eq!(again.len(), 1);
        assert_eq!(again.get("u1"), Some(&entry));
        assert_eq!(
            again.kinds_in_use().into_iter().collect::<Vec<_>>(),
            ["devices.anza-labs.dev/kvm"]
        );
        again.remove_if_empty();
        assert!(path.exists(), "a checkpoint with a claim was removed");

        fs::write(&path, "{ half a fi").unwrap();
        let bad = Checkpoint::load(&path);
        assert_eq!(bad.len(), 0);
        assert_eq!(
            fs::read_to_string(path.with_extension("bad")).unwrap(),
            "{ half a fi"
        );
    }

    #[test]
    fn two_instances_on_one_checkpoint_each_see_what_the_other_wrote_at_their_next_turn() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("checkpoint.json");
        let mut old = Checkpoint::load(&path);
        let mut new = Checkpoint::load(&path);
        let kvm = |n: u32| Prepared {
            requests: vec!["kvm".into()],
            pool: "n1".into(),
            device: format!("kvm-{n}"),
            cdi_ids: vec![format!("devices.anza-labs.dev/kvm=kvm-{n}")],
            unit: "/dev/kvm#0".into(),
            share_id: None,
        };
        hold(&mut new, "u1", "vm-1", vec![kvm(0)]);
        // The old instance, at its turn, knows the slot is taken under whatever name.
        old.refresh();
        assert!(old.check_free("u2", &[kvm(1)], live).is_err());
        // It unprepares the claim the new one prepared; the new one sees the slot free.
        assert!(old.remove("u1").unwrap().is_some());
        new.refresh();
        assert_eq!(new.len(), 0);
        assert!(new.check_free("u2", &[kvm(1)], live).is_ok());
        // Removed by the last instance to go: both start empty.
        old.remove_if_empty();
        new.refresh();
        assert_eq!(new.len(), 0);
        hold(&mut new, "u3", "vm-3", vec![kvm(0)]);
        old.refresh();
        assert_eq!(old.get("u3").map(|e| e.name.as_str()), Some("vm-3"));
    }

    #[test]
    fn a_holder_the_api_server_let_go_of_frees_its_slot_and_one_it_cannot_read_keeps_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Checkpoint::load(&dir.path().join("checkpoint.json"));
        let prepared = |uid: &str, device: &str| {
            allocated(
                &pool(),
                &claim(
                    uid,
                    vec![result("r", "devices.anza-labs.dev", "n1", device)],
                ),
                uid,
                &table(true),
            )
            .unwrap()
        };
        hold(&mut c, "u1", "old-pod-claim", prepared("u1", "kvm-0"));
        hold(&mut c, "u2", "other", prepared("u2", "kvm-1"));
        // Asked about exactly the holder of the slot, with the device it was prepared with.
        let mut asked = Vec::new();
        c.check_free("u3", &prepared("u3", "kvm-0"), |uid, entry, held| {
            asked.push((uid.to_owned(), entry.name.clone(), held.device.clone()));
            Ok(false)
        })
        .unwrap();
        assert_eq!(
            asked,
            [(
                "u1".to_owned(),
                "old-pod-claim".to_owned(),
                "kvm-0".to_owned()
            )]
        );
        // Not let go of, or not known: refused, the reason given.
        let e = c
            .check_free("u3", &prepared("u3", "kvm-0"), |_, _, _| {
                Err("read the ResourceClaim ns/old-pod-claim: timed out".into())
            })
            .unwrap_err();
        assert!(e.contains("timed out"), "{e}");
        // The stale holder stays recorded: the kubelet still unprepares it.
        assert!(c.get("u1").is_some());
    }

    #[test]
    fn a_slot_prepared_for_one_claim_is_refused_to_another_under_any_name() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Checkpoint::load(&dir.path().join("checkpoint.json"));
        let first = allocated(
            &pool(),
            &claim(
                "u1",
                vec![result("r", "devices.anza-labs.dev", "n1", "kvm-0")],
            ),
            "u1",
            &table(true),
        )
        .unwrap();
        c.check_free("u1", &first, live).unwrap();
        hold(&mut c, "u1", "first", first.clone());
        // The same slot published under another name (an ID that changed): refused.
        let mut renamed = table(true);
        let mut slot = renamed.remove("kvm-0").unwrap();
        slot.name = "kvm-renamed-0".into();
        renamed.insert(slot.name.clone(), slot);
        let second = allocated(
            &pool(),
            &claim(
                "u2",
                vec![result("r", "devices.anza-labs.dev", "n1", "kvm-renamed-0")],
            ),
            "u2",
            &renamed,
        )
        .unwrap();
        let e = c.check_free("u2", &second, live).unwrap_err();
        assert!(e.contains("already prepared for the claim ns/first"), "{e}");
        // Its own slot again (a repeated prepare), another slot, and a checkpoint entry from
        // before slots were recorded are all fine.
        c.check_free("u1", &first, live).unwrap();
        let other = allocated(
            &pool(),
            &claim(
                "u3",
                vec![result("r", "devices.anza-labs.dev", "n1", "kvm-1")],
            ),
            "u3",
            &table(true),
        )
        .unwrap();
        c.check_free("u3", &other, live).unwrap();
        let old: Prepared =
            serde_json::from_str(r#"{"requests":["r"],"pool":"n1","device":"kvm-0","cdi_ids":[]}"#)
                .unwrap();
        assert!(old.unit.is_empty());
    }

    /// A device published for many claims (`allowMultipleAllocations`): the scheduler gives
    /// each claim a share of it, and each is prepared, beside the others, with its share's ID.
    #[test]
    fn shares_of_a_device_many_claims_may_hold_are_prepared_for_each_claim() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Checkpoint::load(&dir.path().join("checkpoint.json"));
        let mut devices = table(true);
        let mut kvm = devices.remove("kvm-0").unwrap();
        kvm.name = "kvm".into();
        kvm.unit = "/dev/kvm#shared".into();
        kvm.shared_by = Some(10);
        devices.insert(kvm.name.clone(), kvm);
        let share = |request: &str, id: &str| DeviceRequestAllocationResult {
            share_id: Some(id.into()),
            ..result(request, "devices.anza-labs.dev", "n1", "kvm")
        };
        // Two requests of one pod's claim, each with a share of the one device.
        let first = allocated(
            &pool(),
            &claim(
                "u1",
                vec![
                    share("container-0-request-0", "s1"),
                    share("container-1-request-0", "s2"),
                ],
            ),
            "u1",
            &devices,
        )
        .unwrap();
        let shares: Vec<_> = first
            .iter()
            .map(|p| (p.device.as_str(), p.requests.clone(), p.share_id.as_deref()))
            .collect();
        assert_eq!(
            shares,
            [
                ("kvm", vec!["container-0-request-0".to_owned()], Some("s1")),
                ("kvm", vec!["container-1-request-0".to_owned()], Some("s2")),
            ]
        );
        c.check_free("u1", &first, live).unwrap();
        hold(&mut c, "u1", "first", first);
        // Another claim's share of the same device is no conflict.
        let second = allocated(
            &pool(),
            &claim("u2", vec![share("r", "s3")]),
            "u2",
            &devices,
        )
        .unwrap();
        c.check_free("u2", &second, live).unwrap();
        // The same device allocated without a share (by a scheduler that does not share it) is
        // one claim's alone: refused while shares are held, and once it holds the device, a
        // share is refused too.
        let whole = allocated(
            &pool(),
            &claim(
                "u3",
                vec![result("r", "devices.anza-labs.dev", "n1", "kvm")],
            ),
            "u3",
            &devices,
        )
        .unwrap();
        let e = c.check_free("u3", &whole, live).unwrap_err();
        assert!(e.contains("already prepared for the claim ns/first"), "{e}");
        c.remove("u1").unwrap();
        c.check_free("u3", &whole, live).unwrap();
        hold(&mut c, "u3", "whole", whole);
        let e = c.check_free("u2", &second, live).unwrap_err();
        assert!(e.contains("already prepared for the claim ns/whole"), "{e}");
    }

    #[test]
    fn a_failed_write_leaves_the_checkpoint_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        // Its directory cannot be made: a regular file stands where it would go.
        fs::write(dir.path().join("file"), b"").unwrap();
        let path = dir.path().join("file").join("checkpoint.json");
        let mut c = Checkpoint::load(&path);
        let entry = Entry {
            namespace: "ns".into(),
            name: "c".into(),
            devices: vec![],
        };
        assert!(c.insert("u1", entry.clone()).is_err());
        assert_eq!(c.len(), 0);
    }

    #[test]
    fn one_commit_writes_a_turns_changes_and_a_failed_one_undoes_them_all() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("checkpoint.json");
        let entry = |name: &str| Entry {
            namespace: "ns".into(),
            name: name.into(),
            devices: vec![],
        };
        let mut c = Checkpoint::load(&path);
        c.insert("u1", entry("a")).unwrap();
        // A turn: two prepares and an unprepare, written once.
        c.record("u2", entry("b"));
        c.record("u3", entry("c"));
        assert_eq!(c.forget("u1").map(|e| e.name), Some("a".to_owned()));
        assert_eq!(c.forget("u9"), None);
        c.commit().unwrap();
        let on_disk = Checkpoint::load(&path);
        assert!(
            on_disk.get("u1").is_none()
                && on_disk.get("u2").is_some()
                && on_disk.get("u3").is_some()
        );
        // The next turn's write fails (a directory stands where the file's new copy goes):
        // memory goes back to what the file says.
        c.record("u4", entry("d"));
        c.forget("u2");
        let blocker = dir
            .path()
            .join(format!(".checkpoint.json.{}.tmp", std::process::id()));
        fs::create_dir(&blocker).unwrap();
        fs::write(blocker.join("x"), b"").unwrap();
        assert!(c.commit().is_err());
        assert!(c.get("u4").is_none() && c.get("u2").is_some() && c.len() == 2);
        // Nothing pending: a commit writes nothing, and cannot fail.
        c.commit().unwrap();
    }
}
