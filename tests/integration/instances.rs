//! Two instances on one node, as rollouts, a `serve` run by hand and second DaemonSets make them:
//! the second never touches the first's live sockets, waits, and takes over when the first ends;
//! a killed instance's stale socket is replaced at once; other domains live side by side.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use crate::support::{FakeKubelet, PluginProcess, TestNode, KVM};

fn inode(path: &std::path::Path) -> u64 {
    fs::symlink_metadata(path).unwrap().ino()
}

/// Longer than the longest wait between a waiting instance's tries, so a try that would register
/// (or replace a socket) has happened within it.
const QUIET: Duration = Duration::from_secs(6);

#[test]
fn a_second_instance_waits_for_the_first_and_then_takes_over() {
    let node = TestNode::new();
    let kubelet = FakeKubelet::start(&node.plugins);
    let mut first = PluginProcess::serve(&node, &["--resource", "kvm"]);
    kubelet.registrations_of(&[KVM]);
    let socket = node.plugins.join("kdp-kvm.sock");
    let before = inode(&socket);

    let second = PluginProcess::serve(&node, &["--resource", "kvm"]);
    let log = second.wait_for_log("another instance");
    assert!(
        log.contains(&format!("(process {})", first.pid())),
        "the message names the holder:\n{log}"
    );
    // While the first lives, the second registers nothing and leaves its socket alone.
    assert!(
        kubelet.registration_within(QUIET).is_none(),
        "a registration while the first instance serves"
    );
    assert_eq!(inode(&socket), before, "the live socket was replaced");
    let told = second
        .log_text()
        .lines()
        .filter(|l| l.contains("another instance") && !l.contains("DEBUG"))
        .count();
    assert_eq!(told, 1, "the wait is logged once:\n{}", second.log_text());

    first.signal(libc::SIGTERM);
    assert_eq!(first.wait().code(), Some(0));
    let taken = kubelet.next_registration();
    assert_eq!(taken.request.resource_name, KVM);
    assert!(taken.endpoint_existed);
    second.wait_for_log("serving after an earlier failure");
    assert!(UnixStream::connect(&socket).is_ok());
}

#[test]
fn a_killed_instances_socket_is_replaced_at_start() {
    let node = TestNode::new();
    let kubelet = FakeKubelet::start(&node.plugins);
    let mut killed = PluginProcess::serve(&node, &["--resource", "kvm"]);
    kubelet.registrations_of(&[KVM]);
    killed.signal(libc::SIGKILL);
    killed.wait();
    let socket = node.plugins.join("kdp-kvm.sock");
    // Inode numbers are reused at once, so liveness tells stale from new: nobody listens on it.
    assert!(UnixStream::connect(&socket).is_err(), "not stale");

    let next = PluginProcess::serve(&node, &["--resource", "kvm"]);
    assert!(kubelet.next_registration().endpoint_existed);
    assert!(UnixStream::connect(&socket).is_ok());
    assert!(!next.log_text().contains("another instance"));
}

#[test]
fn instances_of_two_domains_serve_side_by_side() {
    let node = TestNode::new();
    let kubelet = FakeKubelet::start(&node.plugins);
    let mut plugins = Vec::new();
    for domain in ["a.example.com", "b.example.com"] {
        let config = node.root.path().join(format!("{domain}.yaml"));
        fs::write(
            &config,
            format!("domain: {domain}\nresources: [{{name: kvm, preset: kvm}}]\n"),
        )
        .unwrap();
        plugins.push(PluginProcess::serve(
            &node,
            &["--config", config.to_str().unwrap()],
        ));
    }
    let got = kubelet.registrations_of(&["a.example.com/kvm", "b.example.com/kvm"]);
    let mut endpoints: Vec<String> = got.iter().map(|r| r.request.endpoint.clone()).collect();
    endpoints.sort();
    assert_eq!(
        endpoints,
        ["kdp-a.example.com_kvm.sock", "kdp-b.example.com_kvm.sock"]
    );
    assert!(kubelet.registration_within(QUIET).is_none());
    for plugin in &plugins {
        assert!(!plugin.log_text().contains("another instance"));
    }
}
