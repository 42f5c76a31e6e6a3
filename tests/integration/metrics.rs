//! The metrics endpoint of the running binary: scraped over real HTTP while real events happen.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::support::{
    allocate, grpc_pool_growth, next_list, watch, FakeKubelet, PluginProcess, TestNode, KVM, WAIT,
};
use kubelet_device_plugins::proto;

pub(crate) fn get(address: &str, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(address).expect("connect to the metrics endpoint");
    write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    let status = text.split_whitespace().nth(1).unwrap().parse().unwrap();
    (
        status,
        text.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned(),
    )
}

/// Where the plugin serves its metrics, from its log.
pub(crate) fn metrics_address(plugin: &PluginProcess) -> String {
    let log = plugin.wait_for_log("on http://");
    log.split("on http://")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .expect("the address follows")
        .to_owned()
}

/// The value of one sample line, e.g. `kdp_allocations_total{resource="..."}`.
pub(crate) fn sample(metrics: &str, name: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
}

/// Scrapes until `want` holds: the endpoint has no event to wait on from outside.
pub(crate) fn scrape_until(address: &str, what: &str, want: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, body) = get(address, "/metrics");
        if want(&body) {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "metrics never showed {what}:\n{body}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Asks /readyz until `want` holds, like a kubelet's readiness probe would.
pub(crate) fn readyz_until(address: &str, want: impl Fn(&(u16, String)) -> bool) {
    let deadline = Instant::now() + WAIT;
    loop {
        let answer = get(address, "/readyz");
        if want(&answer) {
            return;
        }
        assert!(Instant::now() < deadline, "/readyz stayed at {answer:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn counters_follow_real_events_and_readiness_waits_for_the_kubelet() {
    let node = TestNode::new();
    let plugin = PluginProcess::serve(
        &node,
        &[
            "--resource",
            "kvm,tun",
            "--count",
            "2",
            "--metrics-port",
            "0",
        ],
    );
    let address = metrics_address(&plugin);

    assert_eq!(get(&address, "/healthz").0, 200);
    // Not ready from the first answer on: first while the resources are set up, then while
    // the kubelet has not registered them.
    let (status, body) = get(&address, "/readyz");
    assert_eq!(status, 503, "{body}");
    readyz_until(&address, |(status, body)| {
        assert_eq!(*status, 503, "{body}");
        body.contains("is not registered")
    });

    // A kubelet that does not dial back on its own: the test opens the streams when it wants.
    let mut kubelet = FakeKubelet::start_without_dial_back(&node.plugins);
    kubelet.registrations_of(&["devices.anza-labs.dev/kvm", "devices.anza-labs.dev/tun"]);
    // Registered (the plugin learns it just after the kubelet), but nothing listed yet.
    readyz_until(&address, |(_, body)| {
        body.contains("has not sent the kubelet its device list")
    });
    let kvm = kubelet.dial("kdp-kvm.sock");
    let tun = kubelet.dial("kdp-tun.sock");
    let (mut kvm_stream, mut tun_stream) = (watch(&kvm), watch(&tun));
    next_list(&mut kvm_stream);
    next_list(&mut tun_stream);
    readyz_until(&address, |(status, _)| *status == 200);

    let mut request = proto::AllocateRequest::new();
    let mut c = proto::ContainerAllocateRequest::new();
    c.devices_ids = vec!["kvm-1".into()];
    request.container_requests.push(c.clone());
    kvm.allocate(&request).unwrap();
    c.devices_ids = vec!["kvm-7".into()];
    request.container_requests[0] = c;
    assert!(kvm.allocate(&request).is_err());
    let m = get(&address, "/metrics").1;
    assert_eq!(
        sample(
            &m,
            r#"kdp_allocations_total{resource="devices.anza-labs.dev/kvm"}"#
        ),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        sample(
            &m,
            r#"kdp_allocation_errors_total{resource="devices.anza-labs.dev/kvm"}"#
        ),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        sample(
            &m,
            r#"kdp_devices{resource="devices.anza-labs.dev/kvm",health="Healthy"}"#
        ),
        Some(2.0),
        "{m}"
    );
    assert_eq!(
        sample(
            &m,
            r#"kdp_registrations_total{resource="devices.anza-labs.dev/tun"}"#
        ),
        Some(1.0),
        "{m}"
    );
    assert!(m.contains("kdp_build_info{version="), "{m}");

    std::fs::remove_file(node.dev.join("kvm")).unwrap();
    next_list(&mut kvm_stream);
    let m = get(&address, "/metrics").1;
    assert_eq!(
        sample(
            &m,
            r#"kdp_devices{resource="devices.anza-labs.dev/kvm",health="Unhealthy"}"#
        ),
        Some(2.0),
        "{m}"
    );

    kubelet.restart();
    kubelet.registrations_of(&["devices.anza-labs.dev/kvm", "devices.anza-labs.dev/tun"]);
    let m = scrape_until(&address, "a re-registration of each resource", |m| {
        ["kvm", "tun"].iter().all(|r| {
            sample(
                m,
                &format!(r#"kdp_reregistrations_total{{resource="devices.anza-labs.dev/{r}"}}"#),
            ) >= Some(1.0)
        })
    });
    // The kubelet's first start (after ours) and its restart.
    assert_eq!(sample(&m, "kdp_kubelet_restarts_total"), Some(2.0), "{m}");
    for r in ["kvm", "tun"] {
        let total = sample(
            &m,
            &format!(r#"kdp_registrations_total{{resource="devices.anza-labs.dev/{r}"}}"#),
        );
        let again = sample(
            &m,
            &format!(r#"kdp_reregistrations_total{{resource="devices.anza-labs.dev/{r}"}}"#),
        );
        assert_eq!(total, again.map(|n| n + 1.0), "{m}");
    }
}

#[test]
fn a_flood_of_idle_connections_leaves_threads_bounded_and_devices_served() {
    let node = TestNode::new();
    let kubelet = FakeKubelet::start(&node.plugins);
    let plugin = PluginProcess::serve(&node, &["--resource", "kvm", "--metrics-port", "0"]);
    let address = metrics_address(&plugin);
    kubelet.registrations_of(&[KVM]);
    let client = kubelet.dial("kdp-kvm.sock");
    assert!(allocate(&client, &[&["kvm-0"]]).is_ok());
    let ours = plugin.our_thread_names();
    let threads = plugin.threads();

    // A hostile pod opens 500 connections and sends nothing.
    let flood: Vec<TcpStream> = (0..500)
        .filter_map(|_| TcpStream::connect(&address).ok())
        .collect();
    assert!(flood.len() > 400, "only {} connections", flood.len());
    // Allocate answers throughout, and the process gains no thread per connection.
    for _ in 0..100 {
        assert!(allocate(&client, &[&["kvm-1"]]).is_ok());
    }
    // gRPC core's pools may grow with the calls; our threads stay as they are.
    assert_eq!(
        plugin.our_thread_names(),
        ours,
        "threads grew with connections"
    );
    assert!(plugin.threads() <= threads + grpc_pool_growth());
    // The idle connections are closed within the per-connection deadline, and scrapes work.
    for mut stream in flood {
        stream.set_read_timeout(Some(WAIT)).unwrap();
        let mut rest = Vec::new();
        let _ = stream.read_to_end(&mut rest);
    }
    assert_eq!(get(&address, "/healthz").0, 200);
    assert_eq!(plugin.our_thread_names(), ours);
    assert!(plugin.threads() <= threads + grpc_pool_growth());
}

#[test]
fn readiness_counts_only_the_kubelets_stream() {
    let node = TestNode::new();
    // Registered, but the kubelet never dials back.
    let kubelet = FakeKubelet::start_without_dial_back(&node.plugins);
    let plugin = PluginProcess::serve(&node, &["--resource", "kvm", "--metrics-port", "0"]);
    let address = metrics_address(&plugin);
    kubelet.registrations_of(&[KVM]);
    // probe reads our list; that tells the kubelet nothing.
    let out = std::process::Command::new(crate::support::binary())
        .args(["probe", "--socket"])
        .arg(node.plugins.join("kdp-kvm.sock"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The probe's stream is over (its list was sent) before we ask.
    plugin.wait_for_log("ListAndWatch stream for devices.anza-labs.dev/kvm ended");
    let (status, body) = get(&address, "/readyz");
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("has not sent the kubelet its device list"),
        "{body}"
    );
    // The kubelet's own stream does.
    let client = kubelet.dial("kdp-kvm.sock");
    let mut stream = watch(&client);
    next_list(&mut stream);
    readyz_until(&address, |(status, _)| *status == 200);
}

/// Runs `kubelet-device-plugins alive` against `socket`, as the kubelet's exec probe does.
pub(crate) fn alive(socket: &std::path::Path, ready: bool) -> std::process::Output {
    let mut command = std::process::Command::new(crate::support::binary());
    command.arg("alive").arg("--socket").arg(socket);
    if ready {
        command.arg("--ready");
    }
    command.output().expect("run the alive subcommand")
}

#[test]
fn liveness_and_readiness_answer_on_the_health_socket_through_a_metrics_flood() {
    let node = TestNode::new();
    let kubelet = FakeKubelet::start(&node.plugins);
    let socket = node.root.path().join("run/health.sock");
    let plugin = PluginProcess::serve(
        &node,
        &[
            "--resource",
            "kvm",
            "--metrics-port",
            "0",
            "--health-socket",
            socket.to_str().unwrap(),
        ],
    );
    let address = metrics_address(&plugin);
    kubelet.registrations_of(&[KVM]);
    readyz_until(&address, |(status, _)| *status == 200);
    let client = kubelet.dial("kdp-kvm.sock");

    // A hostile pod keeps 500 idle connections to the metrics port open, opening new ones as
    // the plugin closes them, while the kubelet probes.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flooding = {
        let (stop, address) = (std::sync::Arc::clone(&stop), address.clone());
        std::thread::spawn(move || {
            let mut open: Vec<TcpStream> = Vec::new();
            let mut opened = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                open.retain(|s| {
                    let _ = s.set_nonblocking(true);
                    // Still open and idle: a read would block. Closed by the plugin: it reads 0.
                    matches!(s.peek(&mut [0u8; 1]), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
                });
                while open.len() < 500 {
                    match TcpStream::connect(&address) {
                        Ok(s) => {
                            open.push(s);
                            opened += 1;
                        }
                        Err(_) => break,
                    }
                }
                // Pacing the attacker, not waiting for the plugin.
                std::thread::sleep(Duration::from_millis(20));
            }
            opened
        })
    };
    let mut http_failures = 0;
    for _ in 0..5 {
        let live = alive(&socket, false);
        assert!(
            live.status.success(),
            "{}",
            String::from_utf8_lossy(&live.stderr)
        );
        let ready = alive(&socket, true);
        assert!(
            ready.status.success(),
            "{}",
            String::from_utf8_lossy(&ready.stderr)
        );
        assert!(allocate(&client, &[&["kvm-0"]]).is_ok());
        // What an HTTP probe would have seen meanwhile, for the record.
        let healthz = TcpStream::connect(&address).and_then(|mut s| {
            s.set_read_timeout(Some(Duration::from_secs(1)))?;
            write!(s, "GET /healthz HTTP/1.0\r\n\r\n")?;
            let mut text = String::new();
            s.read_to_string(&mut text)?;
            Ok(text)
        });
        if !healthz.is_ok_and(|t| t.contains(" 200 ")) {
            http_failures += 1;
        }
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let opened = flooding.join().unwrap();
    eprintln!("flood: {opened} connections opened; HTTP /healthz failed {http_failures} of 5 times meanwhile");
    assert!(opened >= 500);
    // Not alive once it has stopped.
    plugin.signal(libc::SIGTERM);
    let mut plugin = plugin;
    assert!(plugin.wait().success());
    assert!(!alive(&socket, false).status.success());
}
