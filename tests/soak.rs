//! Chaos soak: for a bounded time, at random, restart the kubelet, delete our sockets, remove and
//! restore device nodes, send SIGHUP, open and drop ListAndWatch streams, and fire Allocate calls
//! (valid and invalid) from several threads. Afterwards every resource must be registered, the
//! device list right, nothing panicked, and threads, fds and memory back near where they started.
//!
//! Short by default (CI); `KDP_SOAK_SECS=600 cargo test --release --test soak -- --nocapture`
//! for a long run. `KDP_SOAK_SEED` replays a run.

mod support;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use kubelet_device_plugins::proto;
use support::{
    grpc_pool_growth, health, make_node, next_list, watch, FakeKubelet, PluginProcess, TestNode,
};

const RESOURCES: [&str; 3] = ["kvm", "tun", "fuse"];
const NODES: [&str; 3] = ["kvm", "net/tun", "fuse"];

/// xorshift64*: reproducible from its seed, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn full_name(r: &str) -> String {
    format!("devices.anza-labs.dev/{r}")
}

/// The socket of `r` there is now: a new server takes the other slot's name when it is free.
fn socket_of(dir: &Path, r: &str) -> PathBuf {
    let slots = [format!("kdp-{r}.sock"), format!("kdp-{r}~1.sock")];
    let paths = slots.map(|name| dir.join(name));
    let there = paths.iter().find(|p| p.exists());
    there.unwrap_or(&paths[0]).clone()
}

#[test]
fn survives_random_faults() {
    let secs: u64 = std::env::var("KDP_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);
    let seed: u64 = std::env::var("KDP_SOAK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
                | 1
        });
    eprintln!("soak: {secs}s, seed {seed}");
    let mut rng = Rng(seed);

    let node = TestNode::new();
    let mut kubelet = FakeKubelet::start(&node.plugins);
    let plugin = PluginProcess::serve(
        &node,
        &[
            "--resource",
            "kvm,tun,fuse",
            "--count",
            "4",
            "--log-level",
            "info",
        ],
    );
    let names: Vec<String> = RESOURCES.iter().map(|r| full_name(r)).collect();
    let all: Vec<&str> = names.iter().map(String::as_str).collect();
    kubelet.registrations_of(&all);
    // Warm up once, so lazily started gRPC threads are in the baseline.
    kubelet.restart();
    kubelet.registrations_of(&all);
    let baseline = (plugin.threads(), plugin.fds(), plugin.rss_kib());
    let baseline_ours = plugin.our_thread_names();

    // Allocate from four threads the whole time, on their own connections.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok_calls, refused_calls, failed_calls) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let callers: Vec<_> = (0..4)
        .map(|t| {
            let socket = node.plugins.clone();
            let (stop, ok, refused, failed) = (
                stop.clone(),
                ok_calls.clone(),
                refused_calls.clone(),
                failed_calls.clone(),
            );
            let mut rng = Rng(seed.wrapping_add(t + 1) | 1);
            thread::spawn(move || {
                let env = Arc::new(grpcio::EnvBuilder::new().cq_count(1).build());
                while !stop.load(Ordering::Relaxed) {
                    let r = RESOURCES[rng.below(3) as usize];
                    let channel = grpcio::ChannelBuilder::new(env.clone())
                        .use_local_subchannel_pool(true)
                        .connect(&format!("unix:{}", socket_of(&socket, r).display()));
                    let client = proto::DevicePluginClient::new(channel);
                    for _ in 0..20 {
                        let mut request = proto::AllocateRequest::new();
                        let mut c = proto::ContainerAllocateRequest::new();
                        // One in four asks for an ID that does not exist.
                        let slot = rng.below(5);
                        c.devices_ids = vec![format!("{r}-{slot}")];
                        request.container_requests.push(c);
                        let options = grpcio::CallOption::default().timeout(Duration::from_secs(2));
                        match client.allocate_opt(&request, options) {
                            Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                            Err(grpcio::Error::RpcFailure(s))
                                if s.code() == grpcio::RpcStatusCode::INVALID_ARGUMENT =>
                            {
                                refused.fetch_add(1, Ordering::Relaxed)
                            }
                            // The socket being replaced under us: expected during chaos.
                            Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                        };
                    }
                }
            })
        })
        .collect();

    let mut faults: BTreeMap<&str, u64> = BTreeMap::new();
    let end = Instant::now() + Duration::from_secs(secs);
    let mut streams = Vec::new();
    let mut clients = Vec::new();
    while Instant::now() < end {
        match rng.below(6) {
            0 => {
                kubelet.restart();
                *faults.entry("kubelet restarts").or_default() += 1;
            }
            1 => {
                let r = RESOURCES[rng.below(3) as usize];
                let _ = fs::remove_file(socket_of(&node.plugins, r));
                *faults.entry("our sockets deleted").or_default() += 1;
            }
            2 => {
                let n = node.dev.join(NODES[rng.below(3) as usize]);
                let _ = fs::remove_file(&n);
                thread::sleep(Duration::from_millis(rng.below(20)));
                make_node(&n);
                *faults
                    .entry("device nodes removed and restored")
                    .or_default() += 1;
            }
            3 => {
                plugin.signal(libc::SIGHUP);
                *faults.entry("SIGHUPs").or_default() += 1;
            }
            4 => {
                let r = RESOURCES[rng.below(3) as usize];
                let socket = socket_of(&node.plugins, r);
                let client = kubelet.dial(&socket.file_name().unwrap().to_string_lossy());
                streams.push(watch(&client));
                clients.push(client);
                *faults.entry("streams opened").or_default() += 1;
            }
            _ => {
                streams.clear();
                clients.clear();
                *faults.entry("streams dropped").or_default() += 1;
            }
        }
        // Faults arrive close together and sometimes all at once.
        thread::sleep(Duration::from_millis(rng.below(30)));
    }
    stop.store(true, Ordering::Relaxed);
    for c in callers {
        c.join().unwrap();
    }
    drop(streams);
    drop(clients);

    // Settle: one last kubelet start must register everything, with every node present.
    while kubelet.pending_registrations() > 0 {
        kubelet.next_registration();
    }
    kubelet.restart();
    let registered = kubelet.registrations_of(&all);
    for r in RESOURCES {
        let full = full_name(r);
        let last = registered.iter().rfind(|g| g.request.resource_name == full);
        let client = kubelet.dial(&last.unwrap().request.endpoint);
        let mut stream = watch(&client);
        let list = next_list(&mut stream);
        assert_eq!(list.devices.len(), 4, "{r}");
        assert!(
            health(&list).iter().all(|(_, h)| h == "Healthy"),
            "{r}: {:?}",
            health(&list)
        );
    }
    let log = plugin.log_text();
    assert!(!log.contains("panicked"), "{log}");
    let after = (plugin.threads(), plugin.fds(), plugin.rss_kib());
    for (what, n) in &faults {
        eprintln!("soak: {n} {what}, survived");
    }
    eprintln!(
        "soak: Allocate {} answered, {} refused as invalid, {} failed while a socket was replaced",
        ok_calls.load(Ordering::Relaxed),
        refused_calls.load(Ordering::Relaxed),
        failed_calls.load(Ordering::Relaxed)
    );
    eprintln!(
        "soak: threads {} -> {}, fds {} -> {}, RSS {} -> {} KiB",
        baseline.0, after.0, baseline.1, after.1, baseline.2, after.2
    );
    assert!(refused_calls.load(Ordering::Relaxed) > 0 && ok_calls.load(Ordering::Relaxed) > 0);
    // Our threads (one per service, named by us) do not grow at all. gRPC core's own pools
    // grow with concurrent calls up to caps of their own (its executor: two threads per core)
    // and stay: a leak would add threads per fault, hundreds here.
    let after_ours = plugin.our_thread_names();
    assert_eq!(after_ours, baseline_ours, "our threads changed");
    assert!(
        after.0 <= baseline.0 + grpc_pool_growth(),
        "threads grew past gRPC's pools: {baseline:?} -> {after:?}: {:?}",
        plugin.thread_names()
    );
    assert!(
        after.1 <= baseline.1 + 8,
        "fds grew: {baseline:?} -> {after:?}"
    );
    assert!(
        after.2 <= baseline.2 + 4096,
        "RSS grew by more than 4 MiB: {baseline:?} -> {after:?}"
    );
}
