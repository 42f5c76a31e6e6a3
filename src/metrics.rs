//! What operators watch: Prometheus metrics and readiness, for either frontend. Updated by the
//! control loop (main thread), the gRPC handlers (completion-queue thread) and DRA's "prepare"
//! and "slices" threads with atomic counters; read by the "http" thread when scraped. Readiness
//! is kept per endpoint (a resource's device plugin, or the DRA driver).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

use crate::device::Device;
use crate::proto;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResourceLabels {
    resource: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeviceLabels {
    resource: String,
    health: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: String,
}

/// Readiness of one endpoint (a resource's device plugin, or the DRA driver).
#[derive(Clone, Debug, Default)]
struct Readiness {
    /// What the endpoint sends once registered (the frontend's words), for the reason.
    listing: &'static str,
    registered: bool,
    listed: bool,
    /// Why the resource is not served or registered, while that lasts.
    problem: Option<String>,
    /// Another instance serves it and we wait to take over: ready, since the node is served.
    standby: bool,
    /// Why what the endpoint sent once is not current any more (the DRA driver's slices that
    /// could not be written), until it is sent again.
    stale: Option<String>,
}

pub struct Metrics {
    registry: Registry,
    devices: Family<DeviceLabels, Gauge>,
    allocations: Family<ResourceLabels, Counter>,
    allocation_errors: Family<ResourceLabels, Counter>,
    registrations: Family<ResourceLabels, Counter>,
    reregistrations: Family<ResourceLabels, Counter>,
    kubelet_restarts: Counter,
    reloads: Family<ResultLabels, Counter>,
    prepares: Family<ResultLabels, Counter>,
    unprepares: Family<ResultLabels, Counter>,
    prepared_claims: Gauge,
    prepare_seconds: Histogram,
    unprepare_seconds: Histogram,
    slice_writes: Family<ResultLabels, Counter>,
    /// Scrapes served, so tests can tell a stale page from a fresh one.
    scrapes: AtomicU64,
    /// Whether the configured resources are all tracked: until then an empty readiness map
    /// means "not set up yet", not "nothing to serve".
    started: AtomicBool,
    readiness: Mutex<BTreeMap<String, Readiness>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("kdp");
        let devices = Family::<DeviceLabels, Gauge>::default();
        let allocations = Family::<ResourceLabels, Counter>::default();
        let allocation_errors = Family::<ResourceLabels, Counter>::default();
        let registrations = Family::<ResourceLabels, Counter>::default();
        let reregistrations = Family::<ResourceLabels, Counter>::default();
        let kubelet_restarts = Counter::default();
        let reloads = Family::<ResultLabels, Counter>::default();
        let prepares = Family::<ResultLabels, Counter>::default();
        let unprepares = Family::<ResultLabels, Counter>::default();
        let prepared_claims = Gauge::default();
        let prepare_seconds = latency_histogram();
        let unprepare_seconds = latency_histogram();
        let slice_writes = Family::<ResultLabels, Counter>::default();
        registry.register(
            "dra_slice_writes",
            "ResourceSlices the DRA driver created, replaced or deleted, by result",
            slice_writes.clone(),
        );
        registry.register(
            "dra_prepares",
            "Claims the kubelet asked the DRA driver to prepare, by result",
            prepares.clone(),
        );
        registry.register(
            "dra_unprepares",
            "Claims the kubelet asked the DRA driver to unprepare, by result",
            unprepares.clone(),
        );
        registry.register(
            "dra_prepare_duration_seconds",
            "Time from a NodePrepareResources call's arrival to its answer, per call",
            prepare_seconds.clone(),
        );
        registry.register(
            "dra_unprepare_duration_seconds",
            "Time from a NodeUnprepareResources call's arrival to its answer, per call",
            unprepare_seconds.clone(),
        );
        registry.register(
            "dra_prepared_claims",
            "Claims prepared on this node now (the DRA checkpoint)",
            prepared_claims.clone(),
        );
        registry.register(
            "devices",
            "Device IDs advertised to the kubelet, by resource and health",
            devices.clone(),
        );
        registry.register(
            "allocations",
            "Allocate calls answered with devices",
            allocations.clone(),
        );
        registry.register(
            "allocation_errors",
            "Allocate calls refused (unknown or unhealthy IDs)",
            allocation_errors.clone(),
        );
        registry.register(
            "registrations",
            "Successful registrations with the kubelet",
            registrations.clone(),
        );
        registry.register(
            "reregistrations",
            "Registrations after the first, per resource",
            reregistrations.clone(),
        );
        registry.register(
            "kubelet_restarts",
            "Kubelet starts seen (kubelet.sock created)",
            kubelet_restarts.clone(),
        );
        registry.register(
            "config_reloads",
            "Configuration reloads, by result",
            reloads.clone(),
        );
        let build = Info::new(BuildLabels {
            version: env!("CARGO_PKG_VERSION").to_owned(),
        });
        registry.register("build", "Build information", build);
        Metrics {
            registry,
            devices,
            allocations,
            allocation_errors,
            registrations,
            reregistrations,
            kubelet_restarts,
            reloads,
            prepares,
            unprepares,
            prepared_claims,
            prepare_seconds,
            unprepare_seconds,
            slice_writes,
            scrapes: AtomicU64::new(0),
            started: AtomicBool::new(false),
            readiness: Mutex::new(BTreeMap::new()),
        }
    }

    fn readiness(&self) -> MutexGuard<'_, BTreeMap<String, Readiness>> {
        // Plain flags; a panic elsewhere cannot leave them inconsistent.
        self.readiness
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// An endpoint is now served: not ready until registered and it has sent `listing`.
    pub fn track(&self, endpoint: &str, listing: &'static str) {
        self.readiness().insert(
            endpoint.to_owned(),
            Readiness {
                listing,
                ..Readiness::default()
            },
        );
    }

    /// An endpoint is no longer served: it leaves readiness.
    pub fn untrack(&self, endpoint: &str) {
        self.readiness().remove(endpoint);
    }

    /// A resource is no longer configured: its device gauges go.
    pub fn forget_devices(&self, resource: &str) {
        for health in [proto::HEALTHY, proto::UNHEALTHY] {
            self.devices.remove(&DeviceLabels {
                resource: resource.to_owned(),
                health: health.to_owned(),
            });
        }
    }

    pub fn set_devices(&self, resource: &str, devices: &[Device], count: u32) {
        let healthy = i64::try_from(crate::device::healthy_ids(devices, count)).unwrap_or(i64::MAX);
        let total = devices.len() as i64 * i64::from(count);
        let labels = |health: &str| DeviceLabels {
            resource: resource.to_owned(),
            health: health.to_owned(),
        };
        self.devices
            .get_or_create(&labels(proto::HEALTHY))
            .set(healthy);
        self.devices
            .get_or_create(&labels(proto::UNHEALTHY))
            .set(total - healthy);
    }

    pub fn allocated(&self, resource: &str, ok: bool) {
        let family = if ok {
            &self.allocations
        } else {
            &self.allocation_errors
        };
        family
            .get_or_create(&ResourceLabels {
                resource: resource.to_owned(),
            })
            .inc();
    }

    pub fn registered(&self, resource: &str) {
        let labels = ResourceLabels {
            resource: resource.to_owned(),
        };
        if self.registrations.get_or_create(&labels).inc() > 0 {
            self.reregistrations.get_or_create(&labels).inc();
        }
        if let Some(r) = self.readiness().get_mut(resource) {
            r.registered = true;
            r.problem = None;
        }
    }

    /// The kubelet refused the resource: not ready until it registers it.
    pub fn refused(&self, resource: &str, error: &str) {
        self.unready(
            resource,
            format!("the kubelet refused to register it: {error}"),
        );
    }

    /// Another instance on the node serves the resource; we take over when it lets go. Ready:
    /// a surge rollout's new pod must become ready while the old one still serves, or the old
    /// one is never stopped.
    pub fn standby(&self, resource: &str, holder: &str) {
        if let Some(r) = self.readiness().get_mut(resource) {
            *r = Readiness {
                listing: r.listing,
                problem: Some(format!("standing by: {holder}")),
                standby: true,
                ..Readiness::default()
            };
        }
    }

    /// We serve the resource now: a standby ends, and it is ready once registered and listed.
    pub fn serving(&self, resource: &str) {
        if let Some(r) = self.readiness().get_mut(resource) {
            if r.standby {
                *r = Readiness {
                    listing: r.listing,
                    ..Readiness::default()
                };
            }
        }
    }

    /// The kubelet ended its stream of the resource: not ready until it is registered again.
    pub fn lost(&self, resource: &str) {
        self.unready(
            resource,
            "the kubelet ended its ListAndWatch stream; registering again".to_owned(),
        );
    }

    /// The resource cannot serve now (and is being retried).
    pub fn not_serving(&self, resource: &str, failure: &str) {
        self.unready(resource, format!("not serving: {failure}"));
    }

    fn unready(&self, resource: &str, problem: String) {
        if let Some(r) = self.readiness().get_mut(resource) {
            *r = Readiness {
                listing: r.listing,
                problem: Some(problem),
                ..Readiness::default()
            };
        }
    }

    /// The kubelet restarted: every resource must register (and list) again before we are ready.
    pub fn kubelet_restarted(&self) {
        self.kubelet_restarts.inc();
        for r in self.readiness().values_mut() {
            *r = Readiness {
                listing: r.listing,
                ..Readiness::default()
            };
        }
    }

    /// A ListAndWatch stream delivered a device list, or the DRA driver's slices are up to date.
    pub fn listed(&self, resource: &str) {
        if let Some(r) = self.readiness().get_mut(resource) {
            r.listed = true;
            r.stale = None;
        }
    }

    /// What the endpoint published is no longer what it serves, for `why` (slices that could
    /// not be written): not ready until it is published again.
    pub fn stale(&self, resource: &str, why: String) {
        if let Some(r) = self.readiness().get_mut(resource) {
            r.stale = Some(why);
        }
    }

    /// One claim of a NodePrepareResources (`prepare`) or NodeUnprepareResources call answered.
    pub fn claim_call(&self, prepare: bool, result: ClaimResult) {
        let family = if prepare {
            &self.prepares
        } else {
            &self.unprepares
        };
        family
            .get_or_create(&ResultLabels {
                result: result.label().to_owned(),
            })
            .inc();
    }

    /// How long a NodePrepareResources (`prepare`) or NodeUnprepareResources call took, from its
    /// arrival to its answer.
    pub fn claim_call_took(&self, prepare: bool, took: Duration) {
        let histogram = if prepare {
            &self.prepare_seconds
        } else {
            &self.unprepare_seconds
        };
        histogram.observe(took.as_secs_f64());
    }

    /// One ResourceSlice written (created, replaced or deleted), or a write the API server refused.
    pub fn slice_written(&self, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.slice_writes
            .get_or_create(&ResultLabels {
                result: result.to_owned(),
            })
            .inc();
    }

    /// How many claims the DRA checkpoint holds.
    pub fn set_prepared_claims(&self, claims: usize) {
        self.prepared_claims
            .set(i64::try_from(claims).unwrap_or(i64::MAX));
    }

    pub fn reloaded(&self, ok: bool) {
        let result = if ok { "applied" } else { "refused" };
        self.reloads
            .get_or_create(&ResultLabels {
                result: result.to_owned(),
            })
            .inc();
    }

    /// Every configured resource is tracked now. Before this, /readyz refuses: the HTTP server
    /// answers a few milliseconds before the control loop has tracked anything, and a probe
    /// landing then would call a pod that serves nothing ready (an in-place rollout then reports
    /// done while the kubelet still has no device to give).
    pub fn started(&self) {
        self.started.store(true, Ordering::Release);
    }

    /// Ready once every served resource is registered and has sent the kubelet a device list,
    /// or stands by while another instance serves it. The reason names the first that is not.
    pub fn ready(&self) -> Result<(), String> {
        if !self.started.load(Ordering::Acquire) {
            return Err("starting: the resources are not set up yet".to_owned());
        }
        for (resource, r) in self.readiness().iter() {
            if r.standby {
                continue;
            }
            if let Some(problem) = &r.problem {
                return Err(format!("{resource}: {problem}"));
            }
            if !r.registered {
                return Err(format!("{resource} is not registered with the kubelet"));
            }
            if !r.listed {
                return Err(format!("{resource} has not {}", r.listing));
            }
            if let Some(why) = &r.stale {
                return Err(format!("{resource}: {why}"));
            }
        }
        Ok(())
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        self.scrapes.fetch_add(1, Ordering::Relaxed);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// How one claim of a prepare or unprepare call ended, as `kdp_dra_(un)prepares_total` counts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClaimResult {
    Ok,
    /// Answered with the claim's error.
    Error,
    /// The whole call was refused, to be tried again (too many calls queued, or stopping).
    Unavailable,
}

impl ClaimResult {
    fn label(self) -> &'static str {
        match self {
            ClaimResult::Ok => "ok",
            ClaimResult::Error => "error",
            ClaimResult::Unavailable => "unavailable",
        }
    }
}

/// Call latencies from half a millisecond (a prepare answered from the checkpoint) up to about
/// 16 s, a third of the 45 s after which the kubelet gives up on a call.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::DeviceNode;

    fn device(healthy: bool) -> Device {
        Device {
            id_prefix: "d".into(),
            nodes: vec![DeviceNode {
                host_path: "/x".into(),
                container_path: "/x".into(),
            }],
            healthy,
            numa_node: None,
            numbers: None,
            identity: None,
        }
    }

    #[test]
    fn counters_and_gauges_appear_in_the_exposition() {
        let m = Metrics::new();
        m.set_devices("example.com/kvm", &[device(true), device(false)], 3);
        m.allocated("example.com/kvm", true);
        m.allocated("example.com/kvm", false);
        m.registered("example.com/kvm");
        m.registered("example.com/kvm");
        m.kubelet_restarted();
        m.reloaded(false);
        let text = m.encode();
        for line in [
            r#"kdp_devices{resource="example.com/kvm",health="Healthy"} 3"#,
            r#"kdp_devices{resource="example.com/kvm",health="Unhealthy"} 3"#,
            r#"kdp_allocations_total{resource="example.com/kvm"} 1"#,
            r#"kdp_allocation_errors_total{resource="example.com/kvm"} 1"#,
            r#"kdp_registrations_total{resource="example.com/kvm"} 2"#,
            r#"kdp_reregistrations_total{resource="example.com/kvm"} 1"#,
            "kdp_kubelet_restarts_total 1",
            r#"kdp_config_reloads_total{result="refused"} 1"#,
            r#"kdp_build_info{version=""#,
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        m.forget_devices("example.com/kvm");
        assert!(!m.encode().contains("kdp_devices{"));
    }

    #[test]
    fn ready_needs_every_resource_registered_and_listed() {
        let m = Metrics::new();
        assert_eq!(
            m.ready().unwrap_err(),
            "starting: the resources are not set up yet"
        );
        m.started();
        assert!(
            m.ready().is_ok(),
            "nothing configured is nothing to wait for"
        );
        m.track("a", "sent the kubelet its device list");
        m.track("b", "sent the kubelet its device list");
        m.registered("a");
        m.listed("a");
        assert_eq!(
            m.ready().unwrap_err(),
            "b is not registered with the kubelet"
        );
        m.registered("b");
        assert_eq!(
            m.ready().unwrap_err(),
            "b has not sent the kubelet its device list"
        );
        m.listed("b");
        assert!(m.ready().is_ok());
        m.kubelet_restarted();
        assert!(m.ready().is_err());
        m.untrack("a");
        m.untrack("b");
        assert!(m.ready().is_ok());
    }

    #[test]
    fn published_slices_that_could_not_be_written_again_are_not_ready_until_they_are() {
        let m = Metrics::new();
        m.started();
        m.track("driver", "published its ResourceSlices");
        m.registered("driver");
        m.listed("driver");
        assert!(m.ready().is_ok());
        m.stale(
            "driver",
            "its ResourceSlices are out of date: 429".to_owned(),
        );
        assert_eq!(
            m.ready().unwrap_err(),
            "driver: its ResourceSlices are out of date: 429"
        );
        // Registered again (the kubelet restarted the plugin watcher, say): still out of date.
        m.registered("driver");
        assert!(m.ready().is_err());
        m.listed("driver");
        assert!(m.ready().is_ok());
    }

    #[test]
    fn claim_calls_are_counted_by_result_and_timed_by_call() {
        let m = Metrics::new();
        m.claim_call(true, ClaimResult::Ok);
        m.claim_call(true, ClaimResult::Unavailable);
        m.claim_call(false, ClaimResult::Error);
        m.claim_call_took(true, Duration::from_micros(700));
        m.claim_call_took(true, Duration::from_millis(3));
        m.claim_call_took(false, Duration::from_secs(60));
        let text = m.encode();
        for line in [
            r#"kdp_dra_prepares_total{result="ok"} 1"#,
            r#"kdp_dra_prepares_total{result="unavailable"} 1"#,
            r#"kdp_dra_unprepares_total{result="error"} 1"#,
            "kdp_dra_prepare_duration_seconds_count 2",
            r#"kdp_dra_prepare_duration_seconds_bucket{le="0.0005"} 0"#,
            r#"kdp_dra_prepare_duration_seconds_bucket{le="0.001"} 1"#,
            r#"kdp_dra_prepare_duration_seconds_bucket{le="0.004"} 2"#,
            // Beyond the last bucket, only +Inf counts it.
            r#"kdp_dra_unprepare_duration_seconds_bucket{le="16.384"} 0"#,
            r#"kdp_dra_unprepare_duration_seconds_bucket{le="+Inf"} 1"#,
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
    }

    /// The metric families the exposition holds, by the name a `# TYPE` line gives them.
    fn families(m: &Metrics) -> std::collections::BTreeSet<String> {
        m.encode()
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_whitespace().next())
            .map(str::to_owned)
            .collect()
    }

    /// Every metric the docs name exists, and the metrics page names every one we export.
    #[test]
    fn the_docs_name_exactly_the_metrics_we_export() {
        // A family shows in the exposition once it has a sample: give every one of them one.
        let m = Metrics::new();
        m.set_devices("example.com/kvm", &[device(true)], 1);
        m.allocated("example.com/kvm", true);
        m.allocated("example.com/kvm", false);
        m.registered("example.com/kvm");
        m.registered("example.com/kvm");
        m.kubelet_restarted();
        m.reloaded(true);
        m.claim_call(true, ClaimResult::Ok);
        m.claim_call(false, ClaimResult::Ok);
        m.slice_written(true);
        let exported = families(&m);
        let source = include_str!("metrics.rs");
        let (code, _) = source.split_once("#[cfg(test)]").unwrap();
        assert_eq!(
            exported.len(),
            code.matches("registry.register(").count(),
            "a family registered but not exercised here: {exported:?}"
        );
        let family = |name: &str| -> String {
            ["_total", "_bucket", "_sum", "_count", "_info"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|f| exported.contains(*f)))
                .unwrap_or(name)
                .to_owned()
        };
        let named_in = |text: &str| -> std::collections::BTreeSet<String> {
            text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| w.starts_with("kdp_"))
                .map(family)
                .collect()
        };
        for file in crate::doc_blocks::files() {
            let unknown: Vec<String> = named_in(&crate::doc_blocks::read(&file))
                .into_iter()
                .filter(|n| !exported.contains(n))
                .collect();
            assert!(
                unknown.is_empty(),
                "{} names {unknown:?}, which we do not export",
                file.display()
            );
        }
        let page = named_in(&crate::doc_blocks::read(std::path::Path::new(
            "docs/src/metrics.md",
        )));
        let missing: Vec<&String> = exported.difference(&page).collect();
        assert!(
            missing.is_empty(),
            "docs/src/metrics.md does not name {missing:?}"
        );
    }
}
