//! The benchmark: the release binary against the fake kubelet, over real Unix sockets, measuring
//! what users feel (start-up, recovery, health, Allocate, scale) and what the node pays (memory,
//! threads, descriptors, wake-ups), beside the machine's own floor (a bare socket round trip, an
//! empty gRPC call). Run with `cargo bench --bench plugin`; `KDP_BENCH_QUICK=1` for a short run,
//! `KDP_BENCH_ONLY=registration` for the floors, start-up and re-registration alone.
//! Prints a Markdown report.

mod peer;
#[path = "../../tests/support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::ExitCode;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use grpcio::{ChannelBuilder, ClientSStreamReceiver, EnvBuilder};
use kubelet_device_plugins::proto;
use protobuf::Message;
use support::{health, make_node, next_list, watch, FakeKubelet, PluginProcess, TestNode};

const BUILTINS: [&str; 5] = [
    "devices.anza-labs.dev/kvm",
    "devices.anza-labs.dev/tun",
    "devices.anza-labs.dev/vhost-net",
    "devices.anza-labs.dev/vhost-vsock",
    "devices.anza-labs.dev/fuse",
];

struct Settings {
    startups: usize,
    restarts: usize,
    health_flips: usize,
    calls: usize,
    throughput_for: Duration,
    leak_restarts: usize,
    idle_for: Duration,
}

fn main() -> ExitCode {
    // `cargo bench` passes --bench; nothing else is accepted.
    let quick = std::env::var_os("KDP_BENCH_QUICK").is_some();
    // Debug logging would be measured too.
    std::env::set_var(
        "KDP_TEST_RUST_LOG",
        "warn,kubelet_device_plugins::registration=info",
    );
    let s = if quick {
        Settings {
            startups: 5,
            restarts: 10,
            health_flips: 10,
            calls: 500,
            throughput_for: Duration::from_millis(500),
            leak_restarts: 50,
            idle_for: Duration::from_secs(5),
        }
    } else {
        Settings {
            startups: 30,
            restarts: 100,
            health_flips: 100,
            calls: 10_000,
            throughput_for: Duration::from_secs(3),
            leak_restarts: 1000,
            idle_for: Duration::from_secs(60),
        }
    };
    let against_go = if quick {
        peer::Settings {
            reps: 3,
            startups: 3,
            calls: 500,
            callers: 8,
            concurrent_for: Duration::from_millis(500),
            idle_for: Duration::from_secs(5),
        }
    } else {
        peer::Settings {
            reps: 3,
            startups: 10,
            calls: 10_000,
            callers: 8,
            concurrent_for: Duration::from_secs(3),
            idle_for: Duration::from_secs(300),
        }
    };
    // KDP_BENCH_IDLE_S: the comparison's idle window in seconds, for studying wake-ups alone.
    let mut against_go = against_go;
    if let Some(secs) = std::env::var("KDP_BENCH_IDLE_S")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        against_go.idle_for = Duration::from_secs(secs);
    }
    let only = std::env::var("KDP_BENCH_ONLY").ok();
    let mut out = String::new();
    out += &machine();
    // KDP_BENCH_ONLY=go: the comparison with the Go peer alone.
    if only.as_deref() == Some("go") {
        out += &compared(&against_go, s.calls);
        print!("{out}");
        return ExitCode::SUCCESS;
    }
    // KDP_BENCH_ONLY=guard: CI's short comparison, failing when a guarded ratio crosses its bound.
    if only.as_deref() == Some("guard") {
        let short = peer::Settings {
            reps: 3,
            startups: 5,
            calls: 2000,
            callers: 8,
            concurrent_for: Duration::from_millis(500),
            idle_for: Duration::from_secs(5),
        };
        return match peer::compare(&short, || median(&socket_ping_pong(1000))) {
            Ok(c) => {
                let (verdict, held) = c.guard();
                print!("{out}{}{verdict}", c.report);
                if held {
                    ExitCode::SUCCESS
                } else {
                    println!("\nthe performance guard failed: a ratio crossed its bound");
                    ExitCode::FAILURE
                }
            }
            Err(why) => {
                println!("{why}");
                ExitCode::FAILURE
            }
        };
    }
    out += "\n| measurement | n | median | p99 | max |\n|---|---:|---:|---:|---:|\n";

    let floor_socket = socket_ping_pong(s.calls * 2);
    row(
        &mut out,
        "floor: Unix socket ping-pong, 1 byte (µs)",
        &floor_socket,
    );
    let floor_grpc = empty_grpc_call(s.calls);
    row(
        &mut out,
        "floor: empty grpcio unary call, in process (µs)",
        &floor_grpc,
    );

    row(
        &mut out,
        "start-up: process start to all 5 built-ins registered (ms)",
        &startup(s.startups),
    );
    row(
        &mut out,
        "re-registration: kubelet.sock recreated to Register, per resource (ms)",
        &reregistration(s.restarts),
    );
    // KDP_BENCH_ONLY=registration: the floors, start-up and re-registration only.
    if only.as_deref() == Some("registration") {
        print!("{out}");
        return ExitCode::SUCCESS;
    }
    let (gone, back) = health_changes(s.health_flips);
    row(
        &mut out,
        "health: node removed to Unhealthy in ListAndWatch (ms)",
        &gone,
    );
    row(
        &mut out,
        "health: node restored to Healthy in ListAndWatch (ms)",
        &back,
    );

    let node = TestNode::new();
    let kubelet = FakeKubelet::start(&node.plugins);
    let plugin = PluginProcess::serve(
        &node,
        &["--resource", "kvm", "--count", "10", "--log-level", "warn"],
    );
    kubelet.registrations_of(&[BUILTINS[0]]);
    let client = kubelet.dial("kdp-kvm.sock");
    let options = timed(s.calls, || {
        client
            .get_device_plugin_options(&proto::Empty::new())
            .expect("GetDevicePluginOptions");
    });
    row(
        &mut out,
        "floor: GetDevicePluginOptions on our socket, cross-process (µs)",
        &options,
    );
    let one = allocate_request(&["kvm-0"]);
    let ten_ids: Vec<String> = (0..10).map(|i| format!("kvm-{i}")).collect();
    let ten = allocate_request(&ten_ids.iter().map(String::as_str).collect::<Vec<_>>());
    let cpu_before = cpu_ns(plugin.pid());
    let one_lat = timed(s.calls, || {
        client.allocate(&one).expect("Allocate");
    });
    let cpu_per_call = (cpu_ns(plugin.pid()) - cpu_before) as f64 / s.calls as f64 / 1e3;
    row(
        &mut out,
        "Allocate 1 container x 1 device, sequential (µs)",
        &one_lat,
    );
    let ten_lat = timed(s.calls, || {
        client.allocate(&ten).expect("Allocate");
    });
    row(
        &mut out,
        "Allocate 1 container x 10 devices, sequential (µs)",
        &ten_lat,
    );
    let single = throughput(&kubelet, &one, 1, s.throughput_for);
    let eight = throughput(&kubelet, &one, 8, s.throughput_for);
    drop(plugin);

    let (scale_first, scale_bytes, scale_alloc, scale_rss) = scale(s.calls / 10);
    row(
        &mut out,
        "10,000 devices: first ListAndWatch message (ms)",
        &scale_first,
    );
    row(
        &mut out,
        "10,000 devices: Allocate 1 x 1 (µs)",
        &scale_alloc,
    );

    out += "\n| other | value |\n|---|---|\n";
    out += &format!("| plugin CPU per Allocate (1 x 1), all threads | {cpu_per_call:.1} µs |\n");
    out += &format!("| Allocate throughput, 1 client | {single:.0} calls/s |\n");
    out += &format!("| Allocate throughput, 8 concurrent clients | {eight:.0} calls/s |\n");
    out += &format!("| 10,000 devices: first ListAndWatch message size | {scale_bytes} bytes |\n");
    out += &format!(
        "| 10,000 devices, after 20 lists sent and the Allocate calls: RSS | {:.2} MiB |\n",
        scale_rss as f64 / 1024.0
    );
    out += &format!(
        "| Allocate p50 as a multiple of the floors | {:.1}x socket ping-pong, {:.1}x empty gRPC call in process, {:.1}x GetDevicePluginOptions |\n",
        median(&one_lat) / median(&floor_socket),
        median(&one_lat) / median(&floor_grpc),
        median(&one_lat) / median(&options)
    );
    out += &footprint(s.leak_restarts);
    out += &idle(s.idle_for);
    out += &compared(&against_go, s.calls);
    print!("{out}");
    ExitCode::SUCCESS
}

/// The comparison with the Go peer as the report prints it, or why it did not run.
fn compared(settings: &peer::Settings, calls: usize) -> String {
    match peer::compare(settings, || median(&socket_ping_pong(calls * 2))) {
        Ok(c) => c.report,
        Err(why) => format!("\n{why}\n"),
    }
}

fn machine() -> String {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|m| m.trim_start_matches([' ', '\t', ':']))
        .unwrap_or("?");
    let cores = thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let mem = fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let total = mem
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .nth(1)
        .unwrap_or("?")
        .to_owned();
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "Machine: {model}, {cores} cores, {} MiB memory, Linux {}\n",
        total.parse::<u64>().map_or(0, |k| k / 1024),
        kernel.trim()
    )
}

fn row(out: &mut String, name: &str, samples: &[f64]) {
    let mut v = samples.to_vec();
    v.sort_by(f64::total_cmp);
    out.push_str(&format!(
        "| {name} | {} | {:.3} | {:.3} | {:.3} |\n",
        v.len(),
        percentile(&v, 0.5),
        percentile(&v, 0.99),
        v.last().copied().unwrap_or(f64::NAN)
    ));
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// The `p` quantile of unsorted samples.
fn quantile(samples: &[f64], p: f64) -> f64 {
    let mut v = samples.to_vec();
    v.sort_by(f64::total_cmp);
    percentile(&v, p)
}

fn median(samples: &[f64]) -> f64 {
    quantile(samples, 0.5)
}

/// Runs `f` `n` times after a warm-up, returning each run's time in µs.
fn timed(n: usize, mut f: impl FnMut()) -> Vec<f64> {
    for _ in 0..n / 10 {
        f();
    }
    (0..n)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect()
}

fn allocate_request(ids: &[&str]) -> proto::AllocateRequest {
    let mut request = proto::AllocateRequest::new();
    let mut c = proto::ContainerAllocateRequest::new();
    c.devices_ids = ids.iter().map(std::string::ToString::to_string).collect();
    request.container_requests.push(c);
    request
}

fn socket_ping_pong(n: usize) -> Vec<f64> {
    let (mut a, mut b) = UnixStream::pair().expect("socketpair");
    let echo = thread::spawn(move || {
        let mut byte = [0u8; 1];
        while b.read_exact(&mut byte).is_ok() {
            if b.write_all(&byte).is_err() {
                break;
            }
        }
    });
    let mut byte = [7u8; 1];
    let samples = timed(n, || {
        a.write_all(&byte).expect("write");
        a.read_exact(&mut byte).expect("read");
    });
    drop(a);
    let _ = echo.join();
    samples
}

/// An empty unary call to the fake kubelet's Register in this process: gRPC's own floor.
fn empty_grpc_call(n: usize) -> Vec<f64> {
    let node = TestNode::new();
    let kubelet = FakeKubelet::start(&node.plugins);
    let env = Arc::new(EnvBuilder::new().cq_count(1).build());
    let channel = ChannelBuilder::new(env).connect(&format!("unix:{}", kubelet.socket().display()));
    let client = proto::RegistrationClient::new(channel);
    let request = proto::RegisterRequest::new();
    let samples = timed(n, || {
        client.register(&request).expect("Register");
    });
    drop(client);
    samples
}

fn startup(reps: usize) -> Vec<f64> {
    (0..reps)
        .map(|_| {
            let node = TestNode::new();
            let kubelet = FakeKubelet::start(&node.plugins);
            let started = Instant::now();
            let mut plugin = PluginProcess::serve(
                &node,
                &[
                    "--resource",
                    "kvm,tun,vhost-net,vhost-vsock,fuse",
                    "--log-level",
                    "warn",
                ],
            );
            let last = kubelet
                .registrations_of(&BUILTINS)
                .iter()
                .map(|r| r.at)
                .max()
                .expect("five registrations");
            plugin.signal(libc::SIGTERM);
            plugin.wait();
            (last - started).as_secs_f64() * 1e3
        })
        .collect()
}

/// Timed from the moment `kubelet.sock` appears, as inotify tells a watcher (the plugin sees the
/// same event), not from before the fake kubelet's gRPC server starts: that start-up is the
/// kubelet's time, not ours.
fn reregistration(restarts: usize) -> Vec<f64> {
    let node = TestNode::new();
    let mut kubelet = FakeKubelet::start(&node.plugins);
    let _plugin = PluginProcess::serve(&node, &["--log-level", "warn"]);
    kubelet.registrations_of(&BUILTINS);
    let created = socket_creations(&node.plugins);
    let mut samples = Vec::new();
    for _ in 0..restarts {
        kubelet.restart();
        let at = created
            .recv_timeout(Duration::from_secs(10))
            .expect("inotify reports kubelet.sock");
        for r in kubelet.registrations_of(&BUILTINS) {
            samples.push((r.at - at).as_secs_f64() * 1e3);
        }
    }
    // The watcher thread ends on this file's creation.
    fs::write(node.plugins.join(STOP_WATCHING), b"").expect("stop the watcher");
    samples
}

const STOP_WATCHING: &str = "bench-stop";

/// The instants at which `kubelet.sock` is created in `dir`, read by a thread blocked on inotify.
fn socket_creations(dir: &std::path::Path) -> std::sync::mpsc::Receiver<Instant> {
    use inotify::{Inotify, WatchMask};
    let mut inotify = Inotify::init().expect("inotify");
    inotify
        .watches()
        .add(dir, WatchMask::CREATE)
        .expect("watch the plugin directory");
    let (tx, rx) = std::sync::mpsc::channel();
    thread::Builder::new()
        .name("bench-inotify".into())
        .spawn(move || {
            let mut buffer = [0u8; 4096];
            loop {
                let events = inotify.read_events_blocking(&mut buffer).expect("read");
                let now = Instant::now();
                for e in events {
                    match e.name.and_then(|n| n.to_str()) {
                        Some("kubelet.sock") => {
                            let _ = tx.send(now);
                        }
                        Some(STOP_WATCHING) => return,
                        _ => {}
                    }
                }
            }
        })
        .expect("spawn the inotify thread");
    rx
}

fn health_changes(flips: usize) -> (Vec<f64>, Vec<f64>) {
    let node = TestNode::new();
    let kubelet = FakeKubelet::start(&node.plugins);
    let _plugin = PluginProcess::serve(&node, &["--resource", "kvm", "--log-level", "warn"]);
    kubelet.registrations_of(&[BUILTINS[0]]);
    let client = kubelet.dial("kdp-kvm.sock");
    let mut stream = watch(&client);
    next_list(&mut stream);
    let kvm = node.dev.join("kvm");
    let (mut gone, mut back) = (Vec::new(), Vec::new());
    for _ in 0..flips {
        let t = Instant::now();
        fs::remove_file(&kvm).expect("remove the node");
        let list = next_list(&mut stream);
        gone.push(t.elapsed().as_secs_f64() * 1e3);
        assert!(health(&list).iter().all(|(_, h)| h == "Unhealthy"));
        let t = Instant::now();
        make_node(&kvm);
        let list = next_list(&mut stream);
        back.push(t.elapsed().as_secs_f64() * 1e3);
        assert!(health(&list).iter().all(|(_, h)| h == "Healthy"));
    }
    (gone, back)
}

/// Calls per second with `clients` threads, each on its own connection.
fn throughput(
    kubelet: &FakeKubelet,
    request: &proto::AllocateRequest,
    clients: usize,
    duration: Duration,
) -> f64 {
    let end = Instant::now() + duration;
    let handles: Vec<_> = (0..clients)
        .map(|_| {
            let client = kubelet.dial_new_connection("kdp-kvm.sock");
            let request = request.clone();
            thread::spawn(move || {
                let mut calls = 0u64;
                while Instant::now() < end {
                    client.allocate(&request).expect("Allocate");
                    calls += 1;
                }
                calls
            })
        })
        .collect();
    let total: u64 = handles
        .into_iter()
        .map(|h| h.join().expect("client thread"))
        .sum();
    total as f64 / duration.as_secs_f64()
}

/// First-list times, the list's size, Allocate times, and the plugin's RSS (KiB) at the end.
fn scale(calls: usize) -> (Vec<f64>, usize, Vec<f64>, u64) {
    let node = TestNode::new();
    let kubelet = FakeKubelet::start(&node.plugins);
    let plugin = PluginProcess::serve(
        &node,
        &[
            "--resource",
            "kvm",
            "--count",
            "10000",
            "--log-level",
            "warn",
        ],
    );
    kubelet.registrations_of(&[BUILTINS[0]]);
    let client = kubelet.dial("kdp-kvm.sock");
    let mut bytes = 0;
    let first: Vec<f64> = (0..20)
        .map(|_| {
            let t = Instant::now();
            let mut stream = watch(&client);
            let list = next_list(&mut stream);
            let ms = t.elapsed().as_secs_f64() * 1e3;
            assert_eq!(list.devices.len(), 10_000);
            bytes = list.compute_size() as usize;
            ms
        })
        .collect();
    let request = allocate_request(&["kvm-9999"]);
    let alloc = timed(calls, || {
        client.allocate(&request).expect("Allocate");
    });
    (first, bytes, alloc, plugin.rss_kib())
}

/// Sum of on-CPU time of every thread of `pid`, in ns.
fn cpu_ns(pid: i32) -> u64 {
    fs::read_dir(format!("/proc/{pid}/task"))
        .expect("list threads")
        .filter_map(Result::ok)
        .filter_map(|t| fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| {
            s.split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
        })
        .sum()
}

/// The plugin serving all five built-ins, registered, with the kvm ListAndWatch stream open
/// and its first list read: the idle state the footprint measurements start from.
type Stream = (
    proto::DevicePluginClient,
    ClientSStreamReceiver<proto::ListAndWatchResponse>,
);

fn serving_all_five() -> (TestNode, FakeKubelet, PluginProcess, Stream) {
    let node = TestNode::new();
    let kubelet = FakeKubelet::start(&node.plugins);
    let plugin = PluginProcess::serve(&node, &["--resource", "kvm,tun,vhost-net,vhost-vsock,fuse"]);
    kubelet.registrations_of(&BUILTINS);
    let client = kubelet.dial("kdp-kvm.sock");
    let mut stream = watch(&client);
    next_list(&mut stream);
    // The plugin has settled once it has heard every Register answer (the kubelet logs receiving
    // the call a moment before the plugin gets the answer).
    for name in BUILTINS {
        plugin.wait_for_log(&format!("registered {name} (endpoint"));
    }
    // The client goes with the stream: dropping it would end the stream.
    (node, kubelet, plugin, (client, stream))
}

fn footprint(restarts: usize) -> String {
    let (_node, mut kubelet, plugin, stream) = serving_all_five();
    let before = (plugin.rss_kib(), plugin.threads(), plugin.fds());
    drop(stream);
    for _ in 0..restarts {
        kubelet.restart();
        kubelet.registrations_of(&BUILTINS);
    }
    let client = kubelet.dial("kdp-kvm.sock");
    let mut stream = watch(&client);
    next_list(&mut stream);
    let after = (plugin.rss_kib(), plugin.threads(), plugin.fds());
    // Memory under a flood of streams, for sizing the DaemonSet's limit.
    let clients: Vec<_> = (0..4)
        .map(|_| kubelet.dial_new_connection("kdp-kvm.sock"))
        .collect();
    let streams: Vec<_> = (0..1000)
        .map(|i| {
            let mut stream = watch(&clients[i % clients.len()]);
            next_list(&mut stream);
            stream
        })
        .collect();
    let flood = (plugin.rss_kib(), plugin.threads());
    drop(streams);
    let mut out = String::new();
    out += &format!("| idle, all five built-ins, one ListAndWatch open: RSS / threads / fds | {:.2} MiB / {} / {} |\n", before.0 as f64 / 1024.0, before.1, before.2);
    out += &format!(
        "| after {restarts} kubelet restarts: RSS / threads / fds | {:.2} MiB / {} / {} |\n",
        after.0 as f64 / 1024.0,
        after.1,
        after.2
    );
    out += &format!(
        "| then 1,000 ListAndWatch streams open on one resource: RSS / threads | {:.2} MiB / {} |\n",
        flood.0 as f64 / 1024.0,
        flood.1
    );
    out
}

/// Context switches per thread (summed by thread name) over `duration` of idleness.
fn idle(duration: Duration) -> String {
    let (_node, _kubelet, plugin, _stream) = serving_all_five();
    let (_, before) = context_switches(plugin.pid());
    thread::sleep(duration);
    let (_, after) = context_switches(plugin.pid());
    let mut parts = Vec::new();
    let mut total = 0;
    for (name, n) in &after {
        let woke = n - before.get(name).copied().unwrap_or(0);
        total += woke;
        parts.push(format!("{name}: {woke}"));
    }
    format!(
        "| idle {}s, context switches by thread | total {total} ({:.2}/s): {} |\n",
        duration.as_secs(),
        total as f64 / duration.as_secs_f64(),
        parts.join(", ")
    )
}

/// Every thread's context switches, voluntary and not (each is the process waking or being
/// woken): the total, and by thread name.
fn context_switches(pid: i32) -> (u64, BTreeMap<String, u64>) {
    let mut by_name = BTreeMap::new();
    let mut total = 0;
    for task in fs::read_dir(format!("/proc/{pid}/task"))
        .expect("list threads")
        .filter_map(Result::ok)
    {
        let name = fs::read_to_string(task.path().join("comm"))
            .unwrap_or_default()
            .trim()
            .to_owned();
        let status = fs::read_to_string(task.path().join("status")).unwrap_or_default();
        let n: u64 = status
            .lines()
            .filter_map(|l| {
                l.strip_prefix("voluntary_ctxt_switches:")
                    .or_else(|| l.strip_prefix("nonvoluntary_ctxt_switches:"))
            })
            .filter_map(|v| v.trim().parse::<u64>().ok())
            .sum();
        total += n;
        *by_name.entry(name).or_default() += n;
    }
    (total, by_name)
}
