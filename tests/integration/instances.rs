//! Several instances on one node, as rollouts, a `serve` run by hand and second DaemonSets make
//! them: a second serves beside the first on sockets of its own (a surge rollout's handover), a
//! third never touches live sockets, stands by and takes over when one ends; a killed instance's
//! stale sockets are replaced or cleared; other domains live side by side.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use crate::support::{FakeKubelet, PluginProcess, TestNode, KVM};

fn inode(path: &std::path::Path) -> u64 {
    fs::symlink_metadata(path).unwrap().ino()
}

/// Whether the kubelet's next kvm list from us says every device is healthy.
fn lists_kvm_healthy(kubelet: &FakeKubelet) -> bool {
    kubelet
        .list_of(KVM)
        .devices
        .iter()
        .all(|d| d.health == "Healthy")
}

/// Longer than the longest wait between a waiting instance's tries, so a try that would register
/// (or replace a socket) has happened within it.
const QUIET: Duration = Duration::from_secs(6);

#[test]
fn a_second_instance_serves_beside_the_first_on_sockets_of_its_own() {
    let node = TestNode::new();
    let kubelet = FakeKubelet::start(&node.plugins);
    let mut first = PluginProcess::serve(&node, &["--resource", "kvm"]);
    assert_eq!(kubelet.next_registration().request.endpoint, "kdp-kvm.sock");
    let socket = node.plugins.join("kdp-kvm.sock");
    let before = inode(&socket);

    // A surge rollout's new pod: it registers at once, on the second slot's socket, so that the
    // kubelet holds both endpoints and loses nothing when the first one ends.
    let second = PluginProcess::serve(&node, &["--resource", "kvm"]);
    let taken = kubelet.next_registration();
    assert_eq!(taken.request.resource_name, KVM);
    assert_eq!(taken.request.endpoint, "kdp-kvm~1.sock");
    assert!(taken.endpoint_existed, "registered before serving");
    assert_eq!(
        inode(&socket),
        before,
        "the first's live socket was replaced"
    );
    assert!(UnixStream::connect(&socket).is_ok());

    first.signal(libc::SIGTERM);
    assert_eq!(first.wait().code(), Some(0));
    assert!(!socket.exists(), "the first left its socket");
    let own = node.plugins.join("kdp-kvm~1.sock");
    assert!(
        UnixStream::connect(&own).is_ok(),
        "the second stopped serving"
    );
    assert!(
        kubelet.registration_within(QUIET).is_none(),
        "the second registered again when the first ended"
    );
    assert!(!second.log_text().contains("another instance"));
}

#[test]
fn a_kubelet_that_disconnects_the_newest_instance_in_a_surge_rollout_is_registered_with_again() {
    // Kubelets 1.25 to 1.36 keep one client per resource name: when the old pod's stream ends,
    // they disconnect the new pod's client too, and would offer no healthy device until
    // something registered again.
    let node = TestNode::new();
    let kubelet = FakeKubelet::start_with_one_client_per_name(&node.plugins);
    let mut old = PluginProcess::serve(&node, &["--resource", "kvm"]);
    assert_eq!(kubelet.next_registration().request.endpoint, "kdp-kvm.sock");
    kubelet.list_of(KVM);
    let new = PluginProcess::serve(&node, &["--resource", "kvm"]);
    assert_eq!(
        kubelet.next_registration().request.endpoint,
        "kdp-kvm~1.sock"
    );
    kubelet.list_of(KVM);

    let socket = node.plugins.join("kdp-kvm~1.sock");
    let before = inode(&socket);
    old.signal(libc::SIGTERM);
    assert_eq!(old.wait().code(), Some(0));
    // The old stream's end, then the new one's: the kubelet's doing.
    kubelet.disconnect_of(KVM);
    let lost = kubelet.disconnect_of(KVM);
    let again = kubelet.next_registration();
    assert_eq!(again.request.endpoint, "kdp-kvm~1.sock");
    // Every pod bound until then is refused: at once, not after a backoff's first step (250
    // ms), and the same server, whose streams we leave to the kubelet.
    let took = again.at - lost;
    assert!(
        took < Duration::from_millis(200),
        "registered again {took:?} after the kubelet dropped us:\n{}",
        new.log_text()
    );
    assert_eq!(inode(&socket), before, "served on fresh sockets");
    assert!(lists_kvm_healthy(&kubelet));
    // Once: nothing takes turns with anything.
    assert!(
        kubelet.registration_within(QUIET).is_none(),
        "registered again and again:\n{}",
        new.log_text()
    );
}

#[test]
fn a_third_instance_stands_by_ready_and_takes_over_when_one_ends() {
    let node = TestNode::new();
    let kubelet = FakeKubelet::start(&node.plugins);
    let mut first = PluginProcess::serve(&node, &["--resource", "kvm"]);
    assert_eq!(kubelet.next_registration().request.endpoint, "kdp-kvm.sock");
    let second = PluginProcess::serve(&node, &["--resource", "kvm"]);
    assert_eq!(
        kubelet.next_registration().request.endpoint,
        "kdp-kvm~1.sock"
    );
    let socket = node.plugins.join("kdp-kvm.sock");
    let before = inode(&socket);

    let third = PluginProcess::serve(&node, &["--resource", "kvm"]);
    let log = third.wait_for_log("another instance");
    assert!(
        [first.pid(), second.pid()]
            .iter()
            .any(|pid| log.contains(&format!("(process {pid})"))),
        "the message names a holder:\n{log}"
    );
    // While both slots are held it registers nothing and leaves every socket alone.
    assert!(
        kubelet.registration_within(QUIET).is_none(),
        "a registration while two instances serve"
    );
    assert_eq!(inode(&socket), before, "a live socket was replaced");
    let told = third
        .log_text()
        .lines()
        .filter(|l| l.contains("another instance") && !l.contains("DEBUG"))
        .count();
    assert_eq!(told, 1, "the wait is logged once:\n{}", third.log_text());

    first.signal(libc::SIGTERM);
    assert_eq!(first.wait().code(), Some(0));
    let taken = kubelet.next_registration();
    assert_eq!(taken.request.endpoint, "kdp-kvm.sock");
    assert!(taken.endpoint_existed);
    assert!(UnixStream::connect(&socket).is_ok());
}

#[test]
fn a_killed_second_instances_sockets_are_cleared_by_the_next_one() {
    let node = TestNode::new();
    let kubelet = FakeKubelet::start(&node.plugins);
    let mut first = PluginProcess::serve(&node, &["--resource", "kvm"]);
    kubelet.next_registration();
    let mut second = PluginProcess::serve(&node, &["--resource", "kvm"]);
    assert_eq!(
        kubelet.next_registration().request.endpoint,
        "kdp-kvm~1.sock"
    );
    second.signal(libc::SIGKILL);
    second.wait();
    let stale = node.plugins.join("kdp-kvm~1.sock");
    assert!(UnixStream::connect(&stale).is_err(), "not stale");
    // The first one ends too; the next instance takes the first slot and clears the second.
    first.signal(libc::SIGTERM);
    first.wait();
    let _next = PluginProcess::serve(&node, &["--resource", "kvm"]);
    assert_eq!(kubelet.next_registration().request.endpoint, "kdp-kvm.sock");
    assert!(
        !stale.exists(),
        "the killed instance's socket is still there"
    );
}

#[test]
fn after_a_killed_instance_the_next_registers_the_other_socket_slot() {
    // Kubelet 1.37 refuses a registration of a socket path whose last stream it has not torn
    // down yet, and then refuses that path for good: a restart must come back elsewhere unless
    // the kubelet let go of the last instance's socket before it ended (a SIGTERM).
    let node = TestNode::new();
    let kubelet = FakeKubelet::start(&node.plugins);
    let mut endpoints = Vec::new();
    for signal in [libc::SIGTERM, libc::SIGKILL, libc::SIGTERM] {
        let mut plugin = PluginProcess::serve(&node, &["--resource", "kvm"]);
        endpoints.push(kubelet.next_registration().request.endpoint);
        kubelet.list_of(KVM);
        plugin.signal(signal);
        plugin.wait();
    }
    assert_eq!(
        endpoints,
        ["kdp-kvm.sock", "kdp-kvm.sock", "kdp-kvm~1.sock"]
    );
    // The killed one's socket was cleared by the next, which served beside it; the last one
    // out, let go of, left nothing, not even the record of its slot.
    let left: Vec<_> = fs::read_dir(&node.plugins)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, ["kubelet.sock"]);
}

#[test]
fn a_restart_is_registered_after_a_kubelet_slow_to_let_go_of_the_last_instances_socket() {
    // 1.37 refuses for good a socket path whose client it has not torn down yet: the last
    // instance out waits for the kubelet to let go before it ends.
    let node = TestNode::new();
    let kubelet = FakeKubelet::start_keyed_by_path(&node.plugins);
    let mut last = PluginProcess::serve(&node, &["--resource", "kvm"]);
    let before = kubelet.next_registration().request.endpoint;
    kubelet.list_of(KVM);
    let held = kubelet.hold_teardowns();
    last.signal(libc::SIGTERM);
    kubelet.disconnect_of(KVM);
    // The kubelet lets go 200 ms after the stream's end: the time it takes stands for a busy
    // kubelet's, it orders nothing in the test.
    let slow = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        drop(held);
    });
    assert_eq!(last.wait().code(), Some(0));

    let next = PluginProcess::serve(&node, &["--resource", "kvm"]);
    let taken = kubelet.next_registration();
    assert_eq!(
        taken.request.endpoint, before,
        "let go of: any slot will do"
    );
    assert!(lists_kvm_healthy(&kubelet));
    assert!(
        !next.log_text().contains("cannot register"),
        "{}",
        next.log_text()
    );
    slow.join().unwrap();
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
    // Without the record of the slot it took (a cleanup script), the next takes the same slot.
    fs::remove_file(node.plugins.join(".kdp-locks/kdp-kvm.sock.last")).unwrap();

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

/// Waits until the lock file at `path` names `pid` as its holder (written once the lock is
/// taken).
fn wait_for_holder(path: &std::path::Path, pid: i32) {
    let dir = path.parent().unwrap();
    fs::create_dir_all(dir).unwrap();
    let holder = || fs::read_to_string(path).ok().map(|s| s.trim().to_owned());
    crate::support::process::wait_in(
        dir,
        crate::support::process::ARRIVALS | inotify::WatchMask::MODIFY,
        || format!("{} names {:?}, not {pid}", path.display(), holder()),
        || (holder() == Some(pid.to_string())).then_some(()),
    );
}

#[test]
fn a_lock_file_deleted_under_its_holder_is_taken_again_and_the_next_instance_serves_beside() {
    let node = TestNode::new();
    let kubelet = FakeKubelet::start(&node.plugins);
    let first = PluginProcess::serve(&node, &["--resource", "kvm"]);
    assert_eq!(kubelet.next_registration().request.endpoint, "kdp-kvm.sock");
    // A cleanup script removes the lock directory. The first may take its lock again between
    // the removal of the file and of the directory, which then stays: the lock still went.
    let locks = node.plugins.join(".kdp-locks");
    match fs::remove_dir_all(&locks) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::DirectoryNotEmpty => {}
        Err(e) => panic!("cannot remove {}: {e}", locks.display()),
    }
    wait_for_holder(&locks.join("kdp-kvm.sock.lock"), first.pid());
    // So the next instance takes the other slot, rather than the first's socket.
    let socket = node.plugins.join("kdp-kvm.sock");
    let before = inode(&socket);
    let _second = PluginProcess::serve(&node, &["--resource", "kvm"]);
    assert_eq!(
        kubelet.next_registration().request.endpoint,
        "kdp-kvm~1.sock"
    );
    assert_eq!(inode(&socket), before, "the first's socket was replaced");
    assert!(first
        .log_text()
        .contains("was deleted under us; took it again"));
}

#[test]
fn a_holder_whose_lock_another_instance_took_stands_down_to_the_other_slot() {
    let node = TestNode::new();
    let kubelet = FakeKubelet::start(&node.plugins);
    let first = PluginProcess::serve(&node, &["--resource", "kvm"]);
    assert_eq!(kubelet.next_registration().request.endpoint, "kdp-kvm.sock");
    // Its lock file replaced, at once, by one another holder has locked.
    let lock = node.plugins.join(".kdp-locks/kdp-kvm.sock.lock");
    let theirs = node.plugins.join(".kdp-locks/theirs");
    let file = fs::File::create(&theirs).unwrap();
    file.try_lock().unwrap();
    fs::rename(&theirs, &lock).unwrap();
    // The first stops serving the slot the other holds and serves the free one.
    let moved = kubelet.next_registration();
    assert_eq!(moved.request.endpoint, "kdp-kvm~1.sock");
    assert!(first
        .log_text()
        .contains("after its file was deleted under us: standing by"));
    assert!(!node.plugins.join("kdp-kvm.sock").exists());
    drop(file);
}
