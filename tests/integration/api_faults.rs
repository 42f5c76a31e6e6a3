//! DRA mode against an API server that misbehaves as real ones do: away when the plugin starts,
//! gone and back mid-run (connections cut, port closed), 500 and 409 on writes, a watch that
//! expires (410), a ServiceAccount token that rotates, a claim that cannot be read in the middle
//! of a prepare. Each case must end with our slices as they should be, one slice for our pool
//! (none written twice), readiness back, and every claim prepared. The times each took are
//! printed (`--nocapture`) for the figures in the docs.

use std::fs;
use std::time::{Duration, Instant};

use crate::dra::{
    dra_node, dra_plugin, prepare, registration_socket, tainted, wait_for_devices, DRIVER, NODE,
};
use crate::metrics::{metrics_address, readyz_until, sample, scrape_until};
use crate::support::apiserver::{FakeApiServer, Fault, State};
use crate::support::watcher::register;
use crate::support::{make_node, wait_for_file, PluginProcess, TestNode};

const SLICES: &str = "/apis/resource.k8s.io/v1/resourceslices";

/// How many slices our pool has: one, whatever failed on the way.
fn our_slices(state: &State) -> usize {
    state
        .slices
        .values()
        .filter(|s| s["spec"]["driver"] == DRIVER && s["spec"]["nodeName"] == NODE)
        .count()
}

/// The plugin serving kvm (one slot) against `api`, registered with the kubelet; the DRAPlugin
/// endpoint and the metrics address.
fn started(node: &TestNode, api: &FakeApiServer) -> (PluginProcess, String, String) {
    let plugin = dra_plugin(node, api, &["--resource", "kvm", "--count", "1"]);
    let address = metrics_address(&plugin);
    let socket = registration_socket(node, DRIVER);
    wait_for_file(&socket);
    let endpoint = register(&socket, true, "").endpoint;
    (plugin, endpoint, address)
}

fn kvm_tainted(api: &FakeApiServer) {
    api.wait_for("kvm-0 tainted", |s| tainted(s, "kvm-0").filter(|t| *t));
}

#[test]
fn an_api_server_away_at_start_is_waited_for_and_published_to_once_back() {
    let node = dra_node();
    let mut api = FakeApiServer::start();
    api.down();
    let away = Instant::now();
    let (_plugin, _, address) = started(&node, &api);
    // Registered with the kubelet, and not ready: nothing published.
    readyz_until(&address, |(code, reason)| {
        *code == 503 && reason.contains("ResourceSlices")
    });
    let back = Instant::now();
    api.up();
    wait_for_devices(&api, DRIVER, &["kvm-0"]);
    let took = back.elapsed();
    readyz_until(&address, |(code, _)| *code == 200);
    assert_eq!(our_slices(&api.state()), 1);
    // Our backoff is capped at 30 s.
    assert!(
        took < Duration::from_secs(35),
        "published {took:?} after the API server came back"
    );
    eprintln!(
        "figure: API server away at start for {:?}: published {took:?} after it came back",
        back - away
    );
}

#[test]
fn an_api_server_restarted_mid_run_gets_what_changed_meanwhile_and_no_slice_twice() {
    let node = dra_node();
    let mut api = FakeApiServer::start();
    let (_plugin, _, address) = started(&node, &api);
    wait_for_devices(&api, DRIVER, &["kvm-0"]);
    readyz_until(&address, |(code, _)| *code == 200);

    api.down();
    fs::remove_file(node.dev.join("kvm")).unwrap();
    readyz_until(&address, |(code, reason)| {
        *code == 503 && reason.contains("may be out of date")
    });
    let back = Instant::now();
    api.up();
    kvm_tainted(&api);
    let took = back.elapsed();
    readyz_until(&address, |(code, _)| *code == 200);
    assert_eq!(our_slices(&api.state()), 1);

    // The watch is back too: slices deleted behind our back are published again.
    let deleted = Instant::now();
    api.delete_slices_of(DRIVER);
    api.wait_for("our slice again", |s| (our_slices(s) == 1).then_some(()));
    eprintln!(
        "figure: API server restarted mid-run: the taint of a device lost meanwhile written \
         {took:?} after it came back; slices deleted after that published again in {:?}",
        deleted.elapsed()
    );
}

#[test]
fn server_errors_and_conflicts_on_writes_are_tried_again_to_one_slice() {
    let node = dra_node();
    let api = FakeApiServer::start();
    api.state().faults = vec![Fault {
        method: "POST",
        path: SLICES.into(),
        code: 500,
        times: 2,
    }];
    let start = Instant::now();
    let (_plugin, _, address) = started(&node, &api);
    wait_for_devices(&api, DRIVER, &["kvm-0"]);
    let first = start.elapsed();
    assert_eq!(api.state().count(&format!("POST {SLICES}")), 3);
    assert_eq!(our_slices(&api.state()), 1);

    // The update that taints the device meets a conflict (someone wrote the slice since we
    // read it), then a server error.
    api.state().faults = vec![
        Fault {
            method: "PUT",
            path: SLICES.into(),
            code: 409,
            times: 1,
        },
        Fault {
            method: "PUT",
            path: SLICES.into(),
            code: 500,
            times: 1,
        },
    ];
    let removed = Instant::now();
    fs::remove_file(node.dev.join("kvm")).unwrap();
    kvm_tainted(&api);
    let taint = removed.elapsed();
    assert!(api.state().faults.iter().all(|f| f.times == 0));
    assert_eq!(our_slices(&api.state()), 1);
    readyz_until(&address, |(code, _)| *code == 200);
    eprintln!(
        "figure: two 500s on create: published after {first:?}; a 409 then a 500 on update: \
         taint written after {taint:?}"
    );
}

#[test]
fn an_expired_watch_is_listed_again_and_followed() {
    let node = dra_node();
    let api = FakeApiServer::start();
    api.state().expire_watches = 2;
    let (_plugin, _, _) = started(&node, &api);
    wait_for_devices(&api, DRIVER, &["kvm-0"]);
    api.wait_for("a third watch, after two expired", |s| {
        (s.count(&format!("GET {SLICES}?")) >= 3 && s.expire_watches == 0 && watches(s) >= 3)
            .then_some(())
    });
    let deleted = Instant::now();
    api.delete_slices_of(DRIVER);
    api.wait_for("our slice again", |s| (our_slices(s) == 1).then_some(()));
    eprintln!(
        "figure: after two expired watches, deleted slices published again in {:?}",
        deleted.elapsed()
    );
}

fn watches(state: &State) -> usize {
    state
        .requests
        .iter()
        .filter(|r| r.starts_with(&format!("GET {SLICES}?")) && r.contains("watch=true"))
        .count()
}

#[test]
fn a_rotated_token_is_read_again_for_the_next_call() {
    let node = dra_node();
    let api = FakeApiServer::start();
    let (_plugin, endpoint, address) = started(&node, &api);
    wait_for_devices(&api, DRIVER, &["kvm-0"]);
    api.rotate_token("rotated-token-1");
    // A write and a claim read, each with the new token.
    fs::remove_file(node.dev.join("kvm")).unwrap();
    kvm_tainted(&api);
    api.add_claim("default", "vm", "uid-vm", DRIVER, NODE, &[("kvm-0", "kvm")]);
    make_node(&node.dev.join("kvm"));
    api.wait_for("kvm-0 untainted", |s| {
        tainted(s, "kvm-0").filter(|t| !*t).map(|_| ())
    });
    readyz_until(&address, |(code, _)| *code == 200);
    let answer = prepare(&endpoint, "uid-vm", "vm");
    assert_eq!(answer.error, "");
}

#[test]
fn a_claim_unreadable_mid_prepare_fails_that_prepare_alone_and_the_next_one_succeeds() {
    let node = dra_node();
    let mut api = FakeApiServer::start();
    let (_plugin, endpoint, address) = started(&node, &api);
    wait_for_devices(&api, DRIVER, &["kvm-0"]);
    api.add_claim("default", "vm", "uid-vm", DRIVER, NODE, &[("kvm-0", "kvm")]);

    api.state().faults = vec![Fault {
        method: "GET",
        path: "/apis/resource.k8s.io/v1/namespaces/default/resourceclaims/".into(),
        code: 500,
        times: 1,
    }];
    let failed = prepare(&endpoint, "uid-vm", "vm");
    assert!(failed.error.contains("500"), "{}", failed.error);
    // The kubelet tries again; the API server is away this time.
    api.down();
    let away = prepare(&endpoint, "uid-vm", "vm");
    assert!(!away.error.is_empty(), "prepared with the API server away");
    api.up();
    let answer = prepare(&endpoint, "uid-vm", "vm");
    assert_eq!(answer.error, "");
    assert_eq!(answer.devices[0].device_name, "kvm-0");
    scrape_until(&address, "one claim prepared, after two errors", |m| {
        sample(m, "kdp_dra_prepared_claims") == Some(1.0)
            && sample(m, r#"kdp_dra_prepares_total{result="error"}"#) == Some(2.0)
            && sample(m, r#"kdp_dra_prepares_total{result="ok"}"#) == Some(1.0)
    });
    eprintln!(
        "figure: claim read failed twice (500, then the API server away): {:?} / {:?}",
        failed.error, away.error
    );
}

/// Our Node unreadable when the slices are first published (the API server too busy, a Node not
/// made yet): they go out without their owner, and get it at a later look, with no change of
/// devices to prompt one, once the Node can be read.
#[test]
fn slices_published_before_the_node_could_be_read_get_it_as_their_owner() {
    let node = dra_node();
    let api = FakeApiServer::start();
    let (_plugin, _endpoint, _address) = started(&node, &api);
    wait_for_devices(&api, DRIVER, &["kvm-0"]);
    // Every check the start prompted (the first publish, its watch event, the registration) is
    // done once the plugin has asked nothing for 2 s; nothing but the plugin's own later look
    // can then give the slice its owner. (No event says that a thread has nothing left to do.)
    let deadline = Instant::now() + Duration::from_secs(20);
    while api
        .state()
        .request_times
        .last()
        .is_some_and(|last| last.elapsed() < Duration::from_secs(2))
    {
        assert!(Instant::now() < deadline, "the plugin never went quiet");
        std::thread::sleep(Duration::from_millis(100));
    }
    let owners = |state: &State| -> Vec<serde_json::Value> {
        state
            .slices
            .values()
            .map(|s| s["metadata"]["ownerReferences"].clone())
            .collect()
    };
    assert_eq!(owners(&api.state()), [serde_json::Value::Null]);
    let start = Instant::now();
    api.add_node(NODE, "v1.37.2");
    api.wait_for_within(
        "the slice owned by our Node",
        Duration::from_secs(40),
        |state| {
            owners(state)
                .iter()
                .all(|o| o[0]["uid"] == "node-uid-n1" && o[0]["kind"] == "Node")
                .then_some(())
        },
    );
    assert_eq!(our_slices(&api.state()), 1);
    println!(
        "owner added {:.1} s after the Node could be read",
        start.elapsed().as_secs_f64()
    );
}
