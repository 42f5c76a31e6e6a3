//! Hostile and broken peers: malformed and oversized requests, a flood of streams, a client
//! speaking garbage, stray files where sockets belong, unusable plugin directories. Each gets a
//! clear status or log line, and the daemon keeps serving.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::Duration;

use crate::support::{
    allocate_owned, allocate_request, code, next_list, watch, FakeKubelet, PluginProcess, TestNode,
    KVM,
};
use grpcio::{CallOption, RpcStatusCode};
use kubelet_device_plugins::proto;

/// The plugin exited with status 1 and its error output contains `what`.
fn fails_saying(out: &std::process::Output, what: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(what), "{stderr}");
}

fn serving(
    node: &TestNode,
    args: &[&str],
) -> (FakeKubelet, PluginProcess, proto::DevicePluginClient) {
    let kubelet = FakeKubelet::start(&node.plugins);
    let plugin = PluginProcess::serve(node, args);
    kubelet.registrations_of(&[KVM]);
    let client = kubelet.dial("kdp-kvm.sock");
    (kubelet, plugin, client)
}

#[test]
fn malformed_and_oversized_requests_get_statuses() {
    let node = TestNode::new();
    let (_kubelet, plugin, client) = serving(&node, &["--resource", "kvm", "--count", "4"]);

    // Empty: nothing asked, nothing given.
    assert_eq!(
        allocate_owned(&client, vec![])
            .unwrap()
            .container_responses
            .len(),
        0
    );
    assert!(allocate_owned(&client, vec![vec![]])
        .unwrap()
        .container_responses[0]
        .devices
        .is_empty());
    // Duplicates are one device.
    let r = allocate_owned(
        &client,
        vec![vec!["kvm-1".into(), "kvm-1".into(), "kvm-2".into()]],
    )
    .unwrap();
    assert_eq!(r.container_responses[0].devices.len(), 1);
    // Another resource's IDs, very long strings, thousands of IDs, non-UTF-8-looking text.
    assert_eq!(
        code(allocate_owned(&client, vec![vec!["tun-0".into()]])),
        RpcStatusCode::INVALID_ARGUMENT
    );
    assert_eq!(
        code(allocate_owned(&client, vec![vec!["k".repeat(1 << 20)]])),
        RpcStatusCode::INVALID_ARGUMENT
    );
    let many: Vec<String> = (0..10_000).map(|i| format!("kvm-{i}")).collect();
    let status = match allocate_owned(&client, vec![many]) {
        Err(grpcio::Error::RpcFailure(s)) => s,
        other => panic!("{other:?}"),
    };
    assert_eq!(status.code(), RpcStatusCode::INVALID_ARGUMENT);
    assert!(
        status.message().len() < 1000,
        "{} bytes",
        status.message().len()
    );
    assert_eq!(
        code(allocate_owned(
            &client,
            vec![vec!["kvm-\u{0}\u{fffd}".into()]]
        )),
        RpcStatusCode::INVALID_ARGUMENT
    );

    let mut preferred = proto::PreferredAllocationRequest::new();
    let mut c = proto::ContainerPreferredAllocationRequest::new();
    c.available_deviceIDs = vec!["kvm-0".into(), "nope".into()];
    c.allocation_size = i32::MAX;
    preferred.container_requests.push(c.clone());
    // Advice, not a check: the unknown ID is passed over (an error would fail the pod's
    // admission), and a huge size gives what is there.
    assert_eq!(
        client
            .get_preferred_allocation(&preferred)
            .unwrap()
            .container_responses[0]
            .deviceIDs,
        ["kvm-0"]
    );
    c.available_deviceIDs = vec!["kvm-0".into()];
    c.allocation_size = -5;
    preferred.container_requests[0] = c;
    assert!(client
        .get_preferred_allocation(&preferred)
        .unwrap()
        .container_responses[0]
        .deviceIDs
        .is_empty());
    let mut pre = proto::PreStartContainerRequest::new();
    pre.devices_ids = vec!["x".repeat(100_000)];
    assert_eq!(
        code(client.pre_start_container(&pre)),
        RpcStatusCode::INVALID_ARGUMENT
    );

    // Still serving, nothing panicked.
    assert!(allocate_owned(&client, vec![vec!["kvm-0".into()]]).is_ok());
    assert!(!plugin.log_text().contains("panicked"));
}

#[test]
fn a_thousand_streams_then_none() {
    let node = TestNode::new();
    let (kubelet, plugin, _client) = serving(&node, &["--resource", "kvm", "--count", "2"]);
    let threads = plugin.threads();
    let mut streams = Vec::new();
    let clients: Vec<_> = (0..4)
        .map(|_| kubelet.dial_new_connection("kdp-kvm.sock"))
        .collect();
    for i in 0..1000 {
        let mut stream = watch(&clients[i % clients.len()]);
        assert_eq!(next_list(&mut stream).devices.len(), 2);
        streams.push(stream);
    }
    // gRPC may start a helper thread under load; a thread per stream would be a thousand.
    assert!(
        plugin.threads() <= threads + 4,
        "a thread per stream? {threads} -> {}",
        plugin.threads()
    );
    // Every open stream hears about a change.
    fs::remove_file(node.dev.join("kvm")).unwrap();
    for stream in streams.iter_mut().step_by(97) {
        assert!(next_list(stream)
            .devices
            .iter()
            .all(|d| d.health == "Unhealthy"));
    }
    drop(streams);
    drop(clients);
    let fresh = kubelet.dial("kdp-kvm.sock");
    assert!(allocate_owned(&fresh, vec![vec![]]).is_ok());
}

#[test]
fn a_burst_of_simultaneous_calls_is_answered_in_full() {
    let node = TestNode::new();
    let (_kubelet, plugin, client) = serving(&node, &["--resource", "kvm"]);
    let request = allocate_request(vec![vec!["kvm-0".into()]]);
    // Far more calls in flight at once than the server keeps request slots for: the rest must
    // wait their turn, not fail or hang (the deadline turns a hang into a failure).
    let option = CallOption::default().timeout(Duration::from_secs(20));
    let pending: Vec<_> = (0..500)
        .map(|_| client.allocate_async_opt(&request, option.clone()).unwrap())
        .collect();
    for call in pending {
        let response = futures_executor::block_on(call).expect("every call is answered");
        assert_eq!(response.container_responses.len(), 1);
    }
    assert!(!plugin.log_text().contains("panicked"));
}

#[test]
fn garbage_on_the_socket_does_not_hurt() {
    let node = TestNode::new();
    let (_kubelet, plugin, client) = serving(&node, &["--resource", "kvm"]);
    for garbage in [
        &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        &[0u8; 4096][..],
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\xff\xff\xff\xff",
    ] {
        let mut raw = UnixStream::connect(node.plugins.join("kdp-kvm.sock")).unwrap();
        let _ = raw.write_all(garbage);
        drop(raw);
    }
    // A connection opened and left idle.
    let _idle = UnixStream::connect(node.plugins.join("kdp-kvm.sock")).unwrap();
    assert!(allocate_owned(&client, vec![vec!["kvm-0".into()]]).is_ok());
    assert!(!plugin.log_text().contains("panicked"));
}

#[test]
fn a_stray_file_where_a_socket_belongs_is_left_alone_and_reported() {
    let node = TestNode::new();
    fs::write(node.plugins.join("kdp-tun.sock"), b"not ours").unwrap();
    fs::create_dir(node.plugins.join("kdp-fuse.sock")).unwrap();
    let kubelet = FakeKubelet::start(&node.plugins);
    let plugin = PluginProcess::serve(&node, &["--resource", "kvm,tun,fuse"]);
    // kvm serves and registers; the other two are reported and left untouched.
    kubelet.registrations_of(&[KVM]);
    // Each is reported as it is tried (fuse, kvm, then tun): wait for both, in either order.
    plugin.wait_for_log("kdp-fuse.sock exists and is not a socket");
    plugin.wait_for_log("kdp-tun.sock exists and is not a socket; refusing to replace it");
    assert_eq!(
        fs::read(node.plugins.join("kdp-tun.sock")).unwrap(),
        b"not ours"
    );
    assert!(node.plugins.join("kdp-fuse.sock").is_dir());
    assert!(allocate_owned(&kubelet.dial("kdp-kvm.sock"), vec![vec!["kvm-0".into()]]).is_ok());
}

#[test]
fn unusable_plugin_directories_are_clear_errors() {
    let node = TestNode::new();
    let run = |dir: &std::path::Path| {
        Command::new(crate::support::binary())
            .args(["serve", "--resource", "kvm", "--dev-root"])
            .arg(&node.dev)
            .arg("--plugin-dir")
            .arg(dir)
            .output()
            .unwrap()
    };
    let file = node.root.path().join("a-file");
    fs::write(&file, b"").unwrap();
    fails_saying(&run(&file), "not a directory");

    // Read-only: nothing can be served, and the message says where and why, at start. Root
    // ignores mode bits, so the plugin runs as nobody (65534) here when the test runs as root,
    // as CI does: the test is never skipped.
    let read_only = node.root.path().join("read-only");
    fs::create_dir(&read_only).unwrap();
    fs::set_permissions(&read_only, fs::Permissions::from_mode(0o555)).unwrap();
    for dir in [node.root.path(), &node.dev] {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).unwrap();
    }
    // A copy of the binary where nobody can run it: the build's own directory may be private.
    let binary = node.root.path().join("kubelet-device-plugins");
    fs::copy(crate::support::binary(), &binary).unwrap();
    fs::set_permissions(&binary, fs::Permissions::from_mode(0o755)).unwrap();
    let mut unprivileged = Command::new(&binary);
    unprivileged
        .args(["serve", "--resource", "kvm", "--dev-root"])
        .arg(&node.dev)
        .arg("--plugin-dir")
        .arg(&read_only);
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        std::os::unix::process::CommandExt::uid(&mut unprivileged, 65534);
        std::os::unix::process::CommandExt::gid(&mut unprivileged, 65534);
    }
    let out = unprivileged.output().unwrap();
    fails_saying(&out, "is not usable");
    fails_saying(&out, "Permission denied");

    // A symlink to the real directory works like the directory.
    let link = node.root.path().join("link");
    std::os::unix::fs::symlink(&node.plugins, &link).unwrap();
    let kubelet = FakeKubelet::start(&node.plugins);
    let mut child = Command::new(crate::support::binary())
        .args(["serve", "--resource", "kvm", "--dev-root"])
        .arg(&node.dev)
        .arg("--plugin-dir")
        .arg(&link)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    kubelet.registrations_of(&[KVM]);
    child.kill().unwrap();
    child.wait().unwrap();
}
