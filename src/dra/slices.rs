//! Our node's ResourceSlices: what they should hold (pure, unit-tested below) and the "slices"
//! thread that makes the API server hold it. The thread is told the latest device list (state,
//! never a diff) and asked to check again whenever the kubelet may have wiped our slices (it
//! does at its start and 30 s after losing us, and we hear of both through the plugin watcher
//! registering us again); between those it checks every few minutes, one GET.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use k8s_openapi::api::resource::v1::{
    Device, DeviceAttribute, DeviceTaint, ResourcePool, ResourceSlice, ResourceSliceSpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::List;
use log::{debug, info, warn};

use super::kube::{escape, Client, KubeError};
use super::model::{Attribute, DraDevice};
use crate::event::Event;
use crate::metrics::Metrics;
use crate::thread::ThreadHandle;

/// The most devices one slice may hold once any device has a taint (the API's limit).
pub const MAX_DEVICES_PER_SLICE: usize = 64;
/// The taint an unhealthy device carries: its node is missing or is not a device node.
pub const UNHEALTHY_TAINT: &str = "unhealthy";
/// How often the thread checks our slices with nothing to prompt it.
const RESYNC_PERIOD: Duration = Duration::from_secs(300);
/// The first wait after a failed update; it doubles up to `MAX_RETRY`.
const FIRST_RETRY: Duration = Duration::from_secs(1);
const MAX_RETRY: Duration = Duration::from_secs(30);

/// Where our slices are and whose they are.
#[derive(Clone, Debug)]
pub struct Pool {
    /// The driver name, also the domain of our attributes.
    pub driver: String,
    /// Our node; also the pool's name, since our devices are this node's alone.
    pub node_name: String,
}

/// The devices of our pool, split into slices of at most `MAX_DEVICES_PER_SLICE`, in the API's
/// types. A pool with no devices still has one (empty) slice, so that schedulers see it.
pub fn desired(pool: &Pool, devices: &[DraDevice]) -> Vec<Vec<Device>> {
    let converted: Vec<Device> = devices.iter().map(|d| api_device(pool, d)).collect();
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
    Device {
        name: d.name.clone(),
        attributes: Some(attributes),
        taints,
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
/// (consumers use only the newest generation, so every slice of the pool carries it).
pub fn plan(
    pool: &Pool,
    owner: Option<&OwnerReference>,
    mut existing: Vec<ResourceSlice>,
    want: &[Vec<Device>],
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
        && same_generation
        && existing.iter().zip(want).all(|(s, devices)| {
            s.spec.pool.resource_slice_count == count
                && s.spec.pool.name == pool.node_name
                && s.spec.node_name.as_deref() == Some(pool.node_name.as_str())
                && comparable(s.spec.devices.as_deref().unwrap_or_default()) == *devices
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
            Some(old) => plan.update.push(ResourceSlice {
                metadata: old.metadata.clone(),
                spec: spec(devices),
            }),
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

/// What the control loop tells the "slices" thread.
#[derive(Debug)]
pub enum SlicesCommand {
    /// The latest devices of our pool.
    Publish(Arc<Vec<DraDevice>>),
    /// Check the slices against the latest devices now: the kubelet may have wiped them.
    Check,
    /// Stop.
    Stop,
}

/// The running "slices" thread.
pub struct SlicesThread {
    tx: Sender<SlicesCommand>,
    handle: ThreadHandle,
}

impl SlicesThread {
    /// Starts the thread; it publishes nothing until it is told the devices.
    pub fn spawn(
        client: Client,
        pool: Pool,
        metrics: Arc<Metrics>,
        events: Sender<Event>,
    ) -> std::io::Result<SlicesThread> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let stop_tx = tx.clone();
        let handle = ThreadHandle::spawn(
            "slices",
            events,
            move || Publisher::new(client, pool, metrics).run(&rx),
            move || {
                let _ = stop_tx.send(SlicesCommand::Stop);
            },
        )?;
        Ok(SlicesThread { tx, handle })
    }

    /// Hands the thread a command; never blocks.
    pub fn send(&self, command: SlicesCommand) {
        // Gone only if the thread panicked, which the control loop hears of.
        let _ = self.tx.send(command);
    }

    /// Stops the thread and waits for it. Our slices stay: a restarted plugin takes them over,
    /// and the kubelet deletes them itself 30 s after it lost us.
    pub fn stop(self) {
        self.handle.stop();
    }
}

struct Publisher {
    client: Client,
    pool: Pool,
    metrics: Arc<Metrics>,
    owner: Option<OwnerReference>,
}

impl Publisher {
    fn new(client: Client, pool: Pool, metrics: Arc<Metrics>) -> Publisher {
        Publisher {
            client,
            pool,
            metrics,
            owner: None,
        }
    }

    fn run(mut self, rx: &Receiver<SlicesCommand>) {
        let mut devices: Option<Arc<Vec<DraDevice>>> = None;
        let mut due = None::<Instant>;
        let mut retry = FIRST_RETRY;
        loop {
            let command = match due {
                Some(at) => rx.recv_deadline(at),
                None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
            };
            match command {
                Ok(SlicesCommand::Publish(latest)) => devices = Some(latest),
                Ok(SlicesCommand::Check) | Err(RecvTimeoutError::Timeout) => {}
                Ok(SlicesCommand::Stop) | Err(RecvTimeoutError::Disconnected) => return,
            }
            // Only the newest list counts: take every command already waiting first.
            let mut stop = false;
            for command in rx.try_iter() {
                match command {
                    SlicesCommand::Publish(latest) => devices = Some(latest),
                    SlicesCommand::Check => {}
                    SlicesCommand::Stop => stop = true,
                }
            }
            if stop {
                return;
            }
            let Some(list) = &devices else { continue };
            match self.sync(list) {
                Ok(()) => {
                    // Readiness: the scheduler can see our devices.
                    self.metrics.listed(&self.pool.driver);
                    retry = FIRST_RETRY;
                    due = Some(Instant::now() + RESYNC_PERIOD);
                }
                Err(e) => {
                    warn!("{}; trying again in {retry:?}", crate::error_chain(&e));
                    due = Some(Instant::now() + retry);
                    retry = (retry * 2).min(MAX_RETRY);
                }
            }
        }
    }

    fn sync(&mut self, devices: &[DraDevice]) -> Result<(), KubeError> {
        if self.owner.is_none() {
            self.owner = self.node_owner();
        }
        let selector = format!(
            "spec.nodeName={},spec.driver={}",
            self.pool.node_name, self.pool.driver
        );
        let existing: List<ResourceSlice> = self.client.get(
            &format!("{SLICES}?fieldSelector={}", escape(&selector)),
            "list our ResourceSlices",
        )?;
        let want = desired(&self.pool, devices);
        let plan = plan(&self.pool, self.owner.as_ref(), existing.items, &want);
        if plan.is_empty() {
            debug!("our ResourceSlices are up to date");
            return Ok(());
        }
        let generation = plan
            .update
            .iter()
            .chain(&plan.create)
            .map(|s| s.spec.pool.generation)
            .next()
            .unwrap_or_default();
        for slice in &plan.update {
            let name = slice.metadata.name.as_deref().unwrap_or_default();
            let _: ResourceSlice = self.client.replace(
                &format!("{SLICES}/{}", escape(name)),
                slice,
                &format!("update the ResourceSlice {name}"),
            )?;
        }
        for slice in &plan.create {
            let _: ResourceSlice =
                self.client
                    .create(SLICES, slice, "create a ResourceSlice for our devices")?;
        }
        for name in &plan.delete {
            self.client.delete(
                &format!("{SLICES}/{}", escape(name)),
                &format!("delete the ResourceSlice {name}"),
            )?;
        }
        info!(
            "published {} devices in {} ResourceSlice(s) of pool {}, generation {generation}",
            devices.len(),
            want.len(),
            self.pool.node_name
        );
        Ok(())
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
                    crate::error_chain(&e)
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
            attributes: [("resource".to_owned(), Attribute::String("kvm".into()))].into(),
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
        let want = desired(&pool(), &devices);
        let first = plan(&pool(), None, vec![], &want);
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
        assert!(plan(&pool(), None, now, &want).is_empty());
    }

    #[test]
    fn a_change_bumps_the_generation_of_every_slice() {
        let many: Vec<DraDevice> = (0..100)
            .map(|i| device(&format!("kvm-{i}"), true))
            .collect();
        let want = desired(&pool(), &many);
        assert_eq!(want.len(), 2);
        let now = stored(&plan(&pool(), None, vec![], &want), &[]);
        let mut fewer = many.clone();
        fewer.truncate(10);
        fewer[3].healthy = false;
        let p = plan(&pool(), None, now.clone(), &desired(&pool(), &fewer));
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
        let want = desired(&pool(), &[device("kvm-0", true)]);
        let mut now = stored(&plan(&pool(), None, vec![], &want), &[]);
        let mut other = now[0].clone();
        other.metadata.name = Some("zz".into());
        other.spec.pool.generation = 7;
        now.push(other);
        let p = plan(&pool(), None, now, &want);
        assert_eq!(p.update.len(), 1);
        assert_eq!(p.delete, ["zz"]);
        assert_eq!(p.update[0].spec.pool.generation, 8);
    }

    #[test]
    fn an_empty_pool_still_has_a_slice() {
        let want = desired(&pool(), &[]);
        assert_eq!(want, vec![Vec::<Device>::new()]);
    }
}
