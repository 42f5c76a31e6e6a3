//! Node labels through Node Feature Discovery's `features.d/`: the binary against a fake kubelet,
//! real device nodes and real inotify. Each served resource's feature file says its healthy
//! device IDs as they come and go, is written again when someone removes it, goes when the
//! process ends, and stays when a surge rollout's other instance still serves the resource. DRA
//! mode's control loop is the same (`dra.rs` checks its labels too).

use std::fs;
use std::path::Path;

use crate::support::{
    make_node, wait_for_file, wait_in, FakeKubelet, PluginProcess, TestNode, KVM, TUN,
};

/// Arrivals (renamed into place), departures, and anything written in place.
const CHANGES: inotify::WatchMask = inotify::WatchMask::MOVED_TO
    .union(inotify::WatchMask::CREATE)
    .union(inotify::WatchMask::DELETE)
    .union(inotify::WatchMask::CLOSE_WRITE);

/// The label a feature file asks NFD for (its one line that is not a comment), if it is there.
fn label(dir: &Path, file: &str) -> Option<String> {
    let text = fs::read_to_string(dir.join(file)).ok()?;
    let mut lines = text.lines().filter(|l| !l.starts_with('#'));
    let line = lines.next()?.to_owned();
    assert_eq!(lines.next(), None, "one label per file: {text}");
    Some(line)
}

/// Waits until `file` in `dir` asks for `want`, or is gone (`None`).
pub(crate) fn wait_for_label(dir: &Path, file: &str, want: Option<&str>) {
    wait_in(
        dir,
        CHANGES,
        || format!("{file} held {:?}, not {want:?}", label(dir, file)),
        || (label(dir, file).as_deref() == want).then_some(()),
    );
}

/// Every file in `dir`, temporary ones included.
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

#[test]
fn feature_files_follow_the_healthy_devices_and_go_with_the_process() {
    let node = TestNode::new();
    let _kubelet = FakeKubelet::start(&node.plugins);
    // Not there yet, as on a node where NFD's worker has not run.
    let nfd = node.root.path().join("nfd/features.d");
    fs::create_dir(node.root.path().join("nfd")).unwrap();
    let nfd_arg = nfd.to_str().unwrap();
    let mut plugin = PluginProcess::serve(
        &node,
        &[
            "--resource",
            "kvm,tun",
            "--count",
            "3",
            "--nfd-features-dir",
            nfd_arg,
        ],
    );
    wait_for_file(&nfd);
    wait_for_label(&nfd, "kdp-kvm", Some(&format!("{KVM}=3")));
    wait_for_label(&nfd, "kdp-tun", Some(&format!("{TUN}=3")));

    fs::remove_file(node.dev.join("kvm")).unwrap();
    wait_for_label(&nfd, "kdp-kvm", Some(&format!("{KVM}=0")));
    make_node(&node.dev.join("kvm"));
    wait_for_label(&nfd, "kdp-kvm", Some(&format!("{KVM}=3")));
    assert_eq!(label(&nfd, "kdp-tun"), Some(format!("{TUN}=3")));

    // A cleanup script removes one: it is written again.
    fs::remove_file(nfd.join("kdp-tun")).unwrap();
    wait_for_label(&nfd, "kdp-tun", Some(&format!("{TUN}=3")));

    plugin.signal(libc::SIGTERM);
    assert_eq!(plugin.wait().code(), Some(0));
    assert_eq!(listing(&nfd), Vec::<String>::new(), "nothing of ours stays");
}

#[test]
fn a_surge_rollouts_old_instance_leaves_the_label_to_the_new_one() {
    let node = TestNode::new();
    let kubelet = FakeKubelet::start(&node.plugins);
    let nfd = node.root.path().join("features.d");
    let nfd_arg = nfd.to_str().unwrap();
    let args = ["--resource", "kvm", "--nfd-features-dir", nfd_arg];
    let mut old = PluginProcess::serve(&node, &args);
    assert_eq!(kubelet.next_registration().request.endpoint, "kdp-kvm.sock");
    wait_for_file(&nfd);
    wait_for_label(&nfd, "kdp-kvm", Some(&format!("{KVM}=10")));
    let mut new = PluginProcess::serve(&node, &args);
    assert_eq!(
        kubelet.next_registration().request.endpoint,
        "kdp-kvm~1.sock"
    );

    old.signal(libc::SIGTERM);
    assert_eq!(old.wait().code(), Some(0));
    assert_eq!(label(&nfd, "kdp-kvm"), Some(format!("{KVM}=10")));
    // The new instance keeps it up to date from now on, and takes it away when it ends.
    fs::remove_file(node.dev.join("kvm")).unwrap();
    wait_for_label(&nfd, "kdp-kvm", Some(&format!("{KVM}=0")));
    new.signal(libc::SIGTERM);
    assert_eq!(new.wait().code(), Some(0));
    assert_eq!(listing(&nfd), Vec::<String>::new());
}
