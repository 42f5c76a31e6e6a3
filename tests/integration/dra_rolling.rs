//! A DRA rolling update on one node, with the binary twice against a fake API server and the
//! plugin watcher's handshake on real sockets: the new pod serves the kubelet beside the old one
//! (on a kubelet from 1.33), both prepare from one checkpoint in turns, the new one takes the
//! slices over without a write when the old one exits and reports every device's health again at
//! once, a kubelet before 1.33 gets one instance at a time, and what a killed instance left is
//! cleared by the next.

use std::fs;
use std::path::PathBuf;
use std::sync::Arc;

use futures_util::StreamExt;
use grpcio::{CallOption, ChannelBuilder, EnvBuilder};
use kubelet_device_plugins::proto::dra_health;

use crate::dra::{dra_node, dra_plugin, prepare, unprepare, wait_for_devices, DRIVER, NODE};
use crate::metrics::{alive, get, metrics_address, scrape_until};
use crate::support::apiserver::{FakeApiServer, State};
use crate::support::process::wait_in;
use crate::support::watcher::register;
use crate::support::{wait_for_file, PluginProcess, TestNode, WAIT};
use inotify::WatchMask;

const OLD_UID: &str = "0a0a0a0a-1111-4111-8111-000000000001";
const NEW_UID: &str = "0b0b0b0b-2222-4222-8222-000000000002";

/// One instance's two sockets: the plugin watcher's and the DRA service's.
struct Sockets {
    registration: PathBuf,
    endpoint: PathBuf,
}

fn sockets(node: &TestNode, uid: &str) -> Sockets {
    let tag = &uid[..8];
    Sockets {
        registration: node
            .root
            .path()
            .join(format!("plugins_registry/kdp-dra-{DRIVER}~{tag}.sock")),
        endpoint: node
            .root
            .path()
            .join(format!("plugins/kubelet-device-plugins/kdp-dra~{tag}.sock")),
    }
}

fn instance(node: &TestNode, api: &FakeApiServer, uid: &str) -> PluginProcess {
    dra_plugin(
        node,
        api,
        &["--resource", "kvm", "--count", "2", "--pod-uid", uid],
    )
}

/// The instance of pod `uid`, serving and registered with the plugin watcher, and its sockets.
fn registered(node: &TestNode, api: &FakeApiServer, uid: &str) -> (PluginProcess, Sockets) {
    let plugin = instance(node, api, uid);
    let sockets = sockets(node, uid);
    wait_for_file(&sockets.registration);
    let info = register(&sockets.registration, true, "");
    assert_eq!(info.endpoint, sockets.endpoint.to_str().unwrap());
    (plugin, sockets)
}

fn slice_writes(state: &State) -> usize {
    ["POST /apis/", "PUT /apis/", "DELETE /apis/"]
        .iter()
        .map(|p| state.count(p))
        .sum()
}

#[test]
fn a_rolling_updates_new_instance_serves_beside_the_old_one_and_takes_its_slices_over() {
    let node = dra_node();
    let api = FakeApiServer::start();
    api.add_node(NODE, "v1.37.2");
    let (mut old, old_sockets) = registered(&node, &api, OLD_UID);
    wait_for_devices(&api, DRIVER, &["kvm-0", "kvm-1"]);
    api.add_claim(
        "default",
        "vm-1",
        "uid-1",
        DRIVER,
        NODE,
        &[("kvm-0", "kvm")],
    );
    let first = prepare(old_sockets.endpoint.to_str().unwrap(), "uid-1", "vm-1");
    assert_eq!(first.error, "");

    // The new pod serves the kubelet while the old one still does, and is ready.
    let new = instance(&node, &api, NEW_UID);
    let new_sockets = sockets(&node, NEW_UID);
    wait_for_file(&new_sockets.registration);
    assert!(old_sockets.registration.exists());
    register(&new_sockets.registration, true, "");
    let address = metrics_address(&new);
    scrape_until(&address, "the new instance ready", |_| {
        get(&address, "/readyz").0 == 200
    });

    // One checkpoint, in turns: kvm-0 under another claim is refused by the new instance while
    // the old one's claim holds it; a claim prepared by one is unprepared by the other.
    let endpoint = new_sockets.endpoint.to_str().unwrap();
    api.add_claim(
        "default",
        "vm-2",
        "uid-2",
        DRIVER,
        NODE,
        &[("kvm-0", "kvm")],
    );
    let refused = prepare(endpoint, "uid-2", "vm-2");
    assert!(
        refused
            .error
            .contains("already prepared for the claim default/vm-1"),
        "{}",
        refused.error
    );
    assert_eq!(
        prepare(endpoint, "uid-1", "vm-1"),
        first,
        "answered as before"
    );
    assert_eq!(unprepare(endpoint, "uid-1", "vm-1"), "");
    let second = prepare(old_sockets.endpoint.to_str().unwrap(), "uid-2", "vm-2");
    assert_eq!(second.error, "");
    api.add_claim(
        "default",
        "vm-3",
        "uid-3",
        DRIVER,
        NODE,
        &[("kvm-1", "kvm")],
    );
    assert_eq!(prepare(endpoint, "uid-3", "vm-3").error, "");

    // The old pod exits: its sockets go, the new one's stay, and the slices, the same from
    // either, are not written again.
    let writes = slice_writes(&api.state());
    old.signal(libc::SIGTERM);
    assert!(old.wait().success());
    assert!(!old_sockets.registration.exists());
    assert!(!old_sockets.endpoint.exists());
    assert!(new_sockets.registration.exists() && new_sockets.endpoint.exists());
    // It holds the driver's lock now.
    let locks = node
        .root
        .path()
        .join("plugins/kubelet-device-plugins/.kdp-locks");
    let driver_lock = locks.join("dra.lock");
    wait_in(
        &locks,
        WatchMask::CREATE | WatchMask::CLOSE_WRITE | WatchMask::MOVED_TO,
        || format!("{} naming the new instance", driver_lock.display()),
        || {
            let holder = fs::read_to_string(&driver_lock).ok()?;
            (holder.trim() == new.pid().to_string()).then_some(())
        },
    );
    let log = new.log_text();
    assert!(log.contains("serving the kubelet beside it"), "{log}");
    assert!(log.contains("publishing its slices now"), "{log}");
    assert_eq!(slice_writes(&api.state()), writes);
    // The new one publishes now: slices deleted behind its back come back.
    api.delete_slices_of(DRIVER);
    wait_for_devices(&api, DRIVER, &["kvm-0", "kvm-1"]);
    // And it still has both claims the old one and it prepared.
    assert_eq!(unprepare(endpoint, "uid-2", "vm-2"), "");
    assert_eq!(unprepare(endpoint, "uid-3", "vm-3"), "");
    let checkpoint = node
        .root
        .path()
        .join("plugins/kubelet-device-plugins/dra-checkpoint.json");
    let text = fs::read_to_string(&checkpoint).unwrap();
    assert!(!text.contains("uid-"), "{text}");
}

#[test]
fn on_a_kubelet_before_1_33_the_new_instance_stands_by_until_the_old_one_exits() {
    let node = dra_node();
    let api = FakeApiServer::start();
    api.add_node(NODE, "v1.32.13");
    let (mut old, _) = registered(&node, &api, OLD_UID);
    wait_for_devices(&api, DRIVER, &["kvm-0", "kvm-1"]);

    let health = node.root.path().join("health.sock");
    let new = dra_plugin(
        &node,
        &api,
        &[
            "--resource",
            "kvm",
            "--count",
            "2",
            "--pod-uid",
            NEW_UID,
            "--health-socket",
            health.to_str().unwrap(),
        ],
    );
    // Told once it knows the release, after the control loop was told to look again; a
    // question to the control loop after that is answered after the look.
    new.wait_for_log("is \"v1.32.13\", not 1.33 or later");
    wait_for_file(&health);
    let answer = alive(&health, true);
    assert!(answer.status.success(), "{answer:?}");
    let new_sockets = sockets(&node, NEW_UID);
    assert!(!new_sockets.registration.exists());
    assert!(!new_sockets.endpoint.exists());

    old.signal(libc::SIGTERM);
    assert!(old.wait().success());
    wait_for_file(&new_sockets.registration);
    register(&new_sockets.registration, true, "");
}

#[test]
fn the_sockets_of_a_killed_instance_are_removed_by_the_next_one() {
    let node = dra_node();
    let api = FakeApiServer::start();
    api.add_node(NODE, "v1.37.2");
    let mut old = instance(&node, &api, OLD_UID);
    let old_sockets = sockets(&node, OLD_UID);
    wait_for_file(&old_sockets.registration);
    // Killed: nothing of its own is cleaned up.
    old.signal(libc::SIGKILL);
    old.wait();
    assert!(old_sockets.registration.exists() && old_sockets.endpoint.exists());

    let new = instance(&node, &api, NEW_UID);
    let new_sockets = sockets(&node, NEW_UID);
    wait_for_file(&new_sockets.registration);
    assert!(!old_sockets.registration.exists());
    assert!(!old_sockets.endpoint.exists());
    let log = new.log_text();
    assert!(log.contains("left by an instance that is gone"), "{log}");
}

/// The kubelet forgets the health of every device of the driver when any instance's health stream
/// ends, so when the old pod of a rolling update exits, the new one reports every device again at
/// once, not at its next periodic report (5 minutes later).
#[test]
fn when_the_old_instance_exits_the_new_one_reports_every_devices_health_again() {
    let node = dra_node();
    let api = FakeApiServer::start();
    api.add_node(NODE, "v1.37.2");
    let (mut old, _) = registered(&node, &api, OLD_UID);
    wait_for_devices(&api, DRIVER, &["kvm-0", "kvm-1"]);
    let (_new, new_sockets) = registered(&node, &api, NEW_UID);

    let env = Arc::new(EnvBuilder::new().cq_count(1).build());
    let client = dra_health::v1::DraResourceHealthClient::new(
        ChannelBuilder::new(env).connect(&format!("unix:{}", new_sockets.endpoint.display())),
    );
    let mut stream = client
        .node_watch_resources_opt(
            &dra_health::v1::NodeWatchResourcesRequest::new(),
            CallOption::default().timeout(WAIT),
        )
        .expect("open the health stream");
    let mut next = || {
        futures_executor::block_on(stream.next())
            .expect("the health stream ended")
            .expect("a report before the stream's deadline")
    };
    assert_eq!(next().devices.len(), 2);
    old.signal(libc::SIGTERM);
    assert!(old.wait().success());
    let again = next();
    assert_eq!(again.devices.len(), 2);
}
