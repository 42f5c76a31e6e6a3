//! DRA mode as a black box: the binary against a fake API server over real TLS and a fake kubelet
//! on the real sockets (the plugin watcher's registration, the DRAPlugin service). The control
//! loop is the device plugin's, so what holds there must hold here: refused registrations are
//! tried again on fresh sockets, a standby takes over from a killed holder and applies the
//! configuration it was given meanwhile, drivers of two names live side by side, names the
//! operator must fix exit 2, and the device gauges and prepare counters are there.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use grpcio::{ChannelBuilder, EnvBuilder};
use kubelet_device_plugins::proto::{dra, pluginregistration as reg};

use crate::metrics::{get, metrics_address, readyz_until, sample, scrape_until};
use crate::nfd::wait_for_label;
use crate::support::apiserver::{FakeApiServer, State};
use crate::support::process::wait_readable;
use crate::support::watcher::register;
use crate::support::{binary, make_node, wait_for_file, PluginProcess, TestNode, WAIT};

pub(crate) const DRIVER: &str = "devices.anza-labs.dev";
pub(crate) const NODE: &str = "n1";

/// A node with the plugin watcher's directory, as every kubelet since 1.20 has it.
pub(crate) fn dra_node() -> TestNode {
    let node = TestNode::new();
    fs::create_dir(node.root.path().join("plugins_registry")).unwrap();
    node
}

pub(crate) fn registration_socket(node: &TestNode, driver: &str) -> PathBuf {
    node.root
        .path()
        .join(format!("plugins_registry/kdp-dra-{driver}.sock"))
}

/// The plugin in DRA mode against `api`, with `args` after the common ones.
pub(crate) fn dra_plugin(node: &TestNode, api: &FakeApiServer, args: &[&str]) -> PluginProcess {
    let cdi = node.root.path().join("cdi");
    let credentials = api.credentials.to_str().unwrap().to_owned();
    let cdi = cdi.to_str().unwrap().to_owned();
    let mut all = vec![
        "--mode",
        "dra",
        "--node-name",
        NODE,
        "--credentials",
        &credentials,
        "--cdi-dir",
        &cdi,
        "--metrics-port",
        "0",
    ];
    all.extend_from_slice(args);
    PluginProcess::serve_with_env(node, &all, &api.env())
}

fn client_env() -> Arc<grpcio::Environment> {
    Arc::new(EnvBuilder::new().cq_count(1).build())
}

/// Watches a directory for files that arrive in it (created, or renamed into place as our
/// sockets are), or that leave it, from before the action that should make one: a replaced
/// socket may well get its predecessor's inode number, so only the arrival tells it apart.
struct Arrivals(inotify::Inotify);

impl Arrivals {
    fn watch(dir: &Path) -> Arrivals {
        Arrivals::watch_for(
            dir,
            inotify::WatchMask::CREATE | inotify::WatchMask::MOVED_TO,
        )
    }

    /// Departures rather than arrivals: files deleted or renamed away.
    fn watch_departures(dir: &Path) -> Arrivals {
        Arrivals::watch_for(
            dir,
            inotify::WatchMask::DELETE | inotify::WatchMask::MOVED_FROM,
        )
    }

    fn watch_for(dir: &Path, mask: inotify::WatchMask) -> Arrivals {
        let inotify = inotify::Inotify::init().unwrap();
        inotify.watches().add(dir, mask).unwrap();
        Arrivals(inotify)
    }

    /// Waits until a file named like `path` arrives (or leaves).
    fn wait_for(&mut self, path: &Path) {
        let name = path.file_name().unwrap();
        let deadline = std::time::Instant::now() + WAIT;
        let mut buffer = [0u8; 4096];
        loop {
            assert!(
                std::time::Instant::now() < deadline,
                "{} did not arrive (or leave, as watched) within {WAIT:?}",
                path.display()
            );
            wait_readable(&self.0, 1000);
            if let Ok(events) = self.0.read_events(&mut buffer) {
                if events.into_iter().any(|e| e.name == Some(name)) {
                    return;
                }
            }
        }
    }
}

/// What the DRA plugin of `node` registers once its registration socket is there, accepted by
/// the fake kubelet.
fn registered(node: &TestNode) -> reg::PluginInfo {
    let socket = registration_socket(node, DRIVER);
    wait_for_file(&socket);
    register(&socket, true, "")
}

/// Waits until the API server holds exactly these devices of `driver`.
pub(crate) fn wait_for_devices(api: &FakeApiServer, driver: &str, want: &[impl AsRef<str>]) {
    let want: Vec<&str> = want.iter().map(AsRef::as_ref).collect();
    api.wait_for(&format!("{driver}'s devices {want:?}"), |state| {
        (state.devices(driver) == want).then_some(())
    });
}

#[test]
fn dra_mode_publishes_prepares_and_shows_it_in_its_metrics() {
    let node = dra_node();
    let api = FakeApiServer::start();
    let plugin = dra_plugin(&node, &api, &["--resource", "kvm", "--count", "2"]);
    let address = metrics_address(&plugin);
    let info = registered(&node);
    assert_eq!(info.type_, reg::DRA_PLUGIN);
    wait_for_devices(&api, DRIVER, &["kvm-0", "kvm-1"]);

    api.add_claim("default", "vm", "uid-vm", DRIVER, NODE, &[("kvm-1", "kvm")]);
    let plugin_client = dra::v1::DraPluginClient::new(
        ChannelBuilder::new(client_env()).connect(&format!("unix:{}", info.endpoint)),
    );
    let mut request = dra::v1::NodePrepareResourcesRequest::new();
    let mut claim = dra::v1::Claim::new();
    claim.namespace = "default".into();
    claim.name = "vm".into();
    claim.uid = "uid-vm".into();
    request.claims.push(claim);
    let answer = plugin_client
        .node_prepare_resources(&request)
        .expect("NodePrepareResources");
    let prepared = &answer.claims["uid-vm"];
    assert_eq!(prepared.error, "");
    assert_eq!(prepared.devices[0].device_name, "kvm-1");
    assert!(!prepared.devices[0].cdi_device_ids.is_empty());

    // The call is timed once its answer is written, after the client may have read it.
    let metrics = scrape_until(&address, "the prepare, counted and timed", |m| {
        sample(m, r#"kdp_dra_prepares_total{result="ok"}"#) == Some(1.0)
            && sample(m, "kdp_dra_prepare_duration_seconds_count") == Some(1.0)
    });
    for (line, want) in [
        (
            r#"kdp_devices{resource="devices.anza-labs.dev/kvm",health="Healthy"}"#,
            2.0,
        ),
        ("kdp_dra_prepared_claims", 1.0),
        (r#"kdp_dra_prepare_duration_seconds_bucket{le="+Inf"}"#, 1.0),
        (
            r#"kdp_registrations_total{resource="devices.anza-labs.dev"}"#,
            1.0,
        ),
    ] {
        assert_eq!(sample(&metrics, line), Some(want), "{line} in\n{metrics}");
    }
    assert_eq!(get(&address, "/readyz").0, 200);
}

/// Whether the API server's copy of `device` carries a taint; `None` while it has none.
pub(crate) fn tainted(state: &State, device: &str) -> Option<bool> {
    state
        .slices
        .values()
        .flat_map(|s| s["spec"]["devices"].as_array().cloned().unwrap_or_default())
        .find(|d| d["name"] == device)
        .map(|d| d["taints"].as_array().is_some_and(|t| !t.is_empty()))
}

/// NodePrepareResources for one claim, as the kubelet calls it.
/// A batch of one claim, `default/<name>` with `uid`, as the kubelet sends it.
fn one_claim(uid: &str, name: &str) -> dra::v1::Claim {
    let mut claim = dra::v1::Claim::new();
    claim.namespace = "default".into();
    claim.name = name.into();
    claim.uid = uid.into();
    claim
}

fn plugin_client(endpoint: &str) -> dra::v1::DraPluginClient {
    dra::v1::DraPluginClient::new(
        ChannelBuilder::new(client_env()).connect(&format!("unix:{endpoint}")),
    )
}

pub(crate) fn prepare(
    endpoint: &str,
    uid: &str,
    name: &str,
) -> dra::v1::NodePrepareResourceResponse {
    let mut request = dra::v1::NodePrepareResourcesRequest::new();
    request.claims.push(one_claim(uid, name));
    let mut answer = plugin_client(endpoint)
        .node_prepare_resources(&request)
        .expect("NodePrepareResources");
    answer.claims.remove(uid).expect("an answer for the claim")
}

/// NodeUnprepareResources of one claim; the claim's error (empty when it went well).
pub(crate) fn unprepare(endpoint: &str, uid: &str, name: &str) -> String {
    let mut request = dra::v1::NodeUnprepareResourcesRequest::new();
    request.claims.push(one_claim(uid, name));
    let mut answer = plugin_client(endpoint)
        .node_unprepare_resources(&request)
        .expect("NodeUnprepareResources");
    answer
        .claims
        .remove(uid)
        .expect("an answer for the claim")
        .error
}

/// A pod deleted at once (grace period 0) leaves the API server before the kubelet has stopped
/// its containers and unprepared its claim; the claim controller deletes the claim meanwhile, and
/// the scheduler gives its device to the next pod's claim. That prepare is served at once, not
/// refused until the late unprepare (the kubelet backs off ~10 s after a refusal: seen on 1.36 as
/// 13 s to Running). A holder the API server still allocates the device to keeps it.
#[test]
fn a_device_whose_claim_the_api_server_deleted_is_prepared_for_the_next_claim_at_once() {
    let node = dra_node();
    let api = FakeApiServer::start();
    let plugin = dra_plugin(&node, &api, &["--resource", "kvm", "--count", "2"]);
    let address = metrics_address(&plugin);
    let info = registered(&node);
    wait_for_devices(&api, DRIVER, &["kvm-0", "kvm-1"]);
    let endpoint = info.endpoint.as_str();

    api.add_claim(
        "default",
        "pod-1-dev",
        "uid-1",
        DRIVER,
        NODE,
        &[("kvm-0", "kvm")],
    );
    assert_eq!(prepare(endpoint, "uid-1", "pod-1-dev").error, "");
    // pod-1 is force-deleted: its claim goes; the next pod's claim is allocated kvm-0.
    api.remove_claim("default", "pod-1-dev");
    api.add_claim(
        "default",
        "pod-2-dev",
        "uid-2",
        DRIVER,
        NODE,
        &[("kvm-0", "kvm")],
    );
    let second = prepare(endpoint, "uid-2", "pod-2-dev");
    assert_eq!(second.error, "");
    assert_eq!(second.devices[0].device_name, "kvm-0");
    // pod-2's claim is still allocated kvm-0: a third claim naming it is refused.
    api.add_claim(
        "default",
        "pod-3-dev",
        "uid-3",
        DRIVER,
        NODE,
        &[("kvm-0", "kvm")],
    );
    let third = prepare(endpoint, "uid-3", "pod-3-dev");
    assert!(
        third
            .error
            .contains("already prepared for the claim default/pod-2-dev"),
        "{}",
        third.error
    );
    // The kubelet's late unprepare of pod-1's claim releases that claim only.
    assert_eq!(unprepare(endpoint, "uid-1", "pod-1-dev"), "");
    scrape_until(&address, "pod-2's claim alone prepared", |m| {
        sample(m, "kdp_dra_prepared_claims") == Some(1.0)
    });
    assert!(prepare(endpoint, "uid-3", "pod-3-dev")
        .error
        .contains("already prepared for the claim default/pod-2-dev"));
}

/// `allow_multiple_allocations`: one device for many claims, published with its slots; the
/// claims the scheduler gives shares of it are all prepared, each answered with its share.
#[test]
fn a_device_many_claims_share_is_published_once_and_prepared_for_each() {
    let node = dra_node();
    let api = FakeApiServer::start();
    let config = node.root.path().join("config.yaml");
    fs::write(
        &config,
        "resources:\n  - {name: kvm, count: 3, allow_multiple_allocations: true}\n  - {name: tun, count: 1}\n",
    )
    .unwrap();
    let _plugin = dra_plugin(&node, &api, &["--config", config.to_str().unwrap()]);
    let endpoint = registered(&node).endpoint;
    wait_for_devices(&api, DRIVER, &["kvm", "tun-0"]);
    let kvm = api
        .state()
        .slices
        .values()
        .flat_map(|s| s["spec"]["devices"].as_array().cloned().unwrap_or_default())
        .find(|d| d["name"] == "kvm")
        .unwrap();
    assert_eq!(kvm["allowMultipleAllocations"], true, "{kvm}");
    assert_eq!(kvm["capacity"]["slots"]["value"], "3", "{kvm}");

    let share = |request: &str, id: &str| {
        serde_json::json!({"driver": DRIVER, "pool": NODE, "device": "kvm", "request": request,
                           "shareID": id, "consumedCapacity": {"slots": "1"}})
    };
    api.add_claim_with(
        "default",
        "vm-a",
        "uid-a",
        &[share("container-0-request-0", "share-a")],
    );
    api.add_claim_with(
        "default",
        "vm-b",
        "uid-b",
        &[
            share("container-0-request-0", "share-b1"),
            share("container-1-request-0", "share-b2"),
        ],
    );
    let a = prepare(&endpoint, "uid-a", "vm-a");
    let b = prepare(&endpoint, "uid-b", "vm-b");
    assert_eq!((a.error.as_str(), b.error.as_str()), ("", ""));
    let shares = |r: &dra::v1::NodePrepareResourceResponse| -> Vec<(String, Option<String>)> {
        r.devices
            .iter()
            .map(|d| (d.device_name.clone(), d.share_id.clone()))
            .collect()
    };
    assert_eq!(shares(&a), [("kvm".to_owned(), Some("share-a".to_owned()))]);
    assert_eq!(
        shares(&b),
        [
            ("kvm".to_owned(), Some("share-b1".to_owned())),
            ("kvm".to_owned(), Some("share-b2".to_owned()))
        ]
    );
    assert_eq!(b.devices[1].request_names, ["container-1-request-0"]);
}

#[test]
fn a_device_that_goes_and_comes_back_reaches_the_slices_and_the_prepares() {
    let node = dra_node();
    let api = FakeApiServer::start();
    let nfd = node.root.path().join("features.d");
    let _plugin = dra_plugin(
        &node,
        &api,
        &[
            "--resource",
            "kvm",
            "--count",
            "1",
            "--nfd-features-dir",
            nfd.to_str().unwrap(),
        ],
    );
    let endpoint = registered(&node).endpoint;
    wait_for_devices(&api, DRIVER, &["kvm-0"]);
    api.add_claim("default", "a", "uid-a", DRIVER, NODE, &[("kvm-0", "kvm")]);
    api.add_claim("default", "b", "uid-b", DRIVER, NODE, &[("kvm-0", "kvm")]);
    let kvm_label = |n: u32| format!("{DRIVER}/kvm={n}");
    wait_for_file(&nfd);
    wait_for_label(&nfd, "kdp-kvm", Some(&kvm_label(1)));

    fs::remove_file(node.dev.join("kvm")).unwrap();
    api.wait_for("kvm-0 tainted", |s| tainted(s, "kvm-0").filter(|t| *t));
    wait_for_label(&nfd, "kdp-kvm", Some(&kvm_label(0)));
    // The prepare thread has the same list the slices were written from.
    let refused = prepare(&endpoint, "uid-a", "a");
    assert!(refused.error.contains("missing"), "{}", refused.error);

    make_node(&node.dev.join("kvm"));
    api.wait_for("kvm-0 untainted", |s| tainted(s, "kvm-0").filter(|t| !*t));
    let prepared = prepare(&endpoint, "uid-b", "b");
    assert_eq!(prepared.error, "");
    assert_eq!(prepared.devices[0].device_name, "kvm-0");
}

/// Lists of our slices (the fake API server logs a query's parameters sorted: a watch's start
/// with `allowWatchBookmarks`).
const SLICE_LISTS: &str = "GET /apis/resource.k8s.io/v1/resourceslices?fieldSelector=";

/// A hotplug costs its two writes and nothing else: no list before a write, none at the write's
/// own watch event. A slice someone else deletes is listed for, and made again.
#[test]
fn a_hotplug_costs_its_writes_alone_and_a_slice_deleted_by_another_is_made_again() {
    let node = dra_node();
    let api = FakeApiServer::start();
    let _plugin = dra_plugin(&node, &api, &["--resource", "kvm", "--count", "1"]);
    wait_for_devices(&api, DRIVER, &["kvm-0"]);
    api.wait_for("the watch of our slices", |s| {
        s.requests
            .iter()
            .any(|r| {
                r.starts_with("GET /apis/resource.k8s.io/v1/resourceslices?")
                    && r.contains("watch=true")
            })
            .then_some(())
    });
    // The first hotplug: the check the watch asked for after its first list (if that did not
    // coincide with our first sync) is behind us once the taint is written, since the "slices"
    // thread takes commands in order.
    let counts = || {
        let s = api.state();
        (s.count(SLICE_LISTS), slice_writes(&s))
    };
    fs::remove_file(node.dev.join("kvm")).unwrap();
    api.wait_for("kvm-0 tainted", |s| tainted(s, "kvm-0").filter(|t| *t));
    let (lists, writes) = counts();

    make_node(&node.dev.join("kvm"));
    api.wait_for("kvm-0 untainted", |s| tainted(s, "kvm-0").filter(|t| !*t));
    fs::remove_file(node.dev.join("kvm")).unwrap();
    api.wait_for("kvm-0 tainted again", |s| {
        tainted(s, "kvm-0").filter(|t| *t)
    });
    make_node(&node.dev.join("kvm"));
    api.wait_for("kvm-0 untainted again", |s| {
        tainted(s, "kvm-0").filter(|t| !*t)
    });
    // Someone deletes our slice: the watch tells (after the events of our writes before), and
    // it is made again.
    api.delete_slices_of(DRIVER);
    wait_for_devices(&api, DRIVER, &["kvm-0"]);

    let (lists_after, writes_after) = counts();
    let s = api.state();
    // Three writes for three changes, and the slice made again.
    assert_eq!(writes_after - writes, 4, "{:#?}", s.requests);
    // One list, after the deletion: none before a write, none at our writes' own events.
    assert_eq!(lists_after - lists, 1, "{:#?}", s.requests);
}

#[test]
fn a_refused_dra_registration_is_tried_again_on_fresh_sockets() {
    let node = dra_node();
    let api = FakeApiServer::start();
    let _plugin = dra_plugin(&node, &api, &["--resource", "kvm"]);
    let socket = registration_socket(&node, DRIVER);
    wait_for_file(&socket);
    let mut arrivals = Arrivals::watch(socket.parent().unwrap());
    register(&socket, false, "the kubelet's DRA manager said no");
    // The plugin watcher tries again only when the socket changes: the plugin replaces it.
    arrivals.wait_for(&socket);
    let info = register(&socket, true, "");
    assert_eq!(info.name, DRIVER);
}

#[test]
fn a_dra_standby_takes_over_from_a_killed_holder_with_the_configuration_of_now() {
    let node = dra_node();
    let api = FakeApiServer::start();
    let config = node.root.path().join("config.yaml");
    fs::write(&config, "resources:\n  - {name: kvm, count: 1}\n").unwrap();
    let config_arg = config.to_str().unwrap();
    let holder = dra_plugin(&node, &api, &["--config", config_arg]);
    let socket = registration_socket(&node, DRIVER);
    wait_for_file(&socket);
    wait_for_devices(&api, DRIVER, &["kvm-0"]);

    let standby = dra_plugin(&node, &api, &["--config", config_arg]);
    let address = metrics_address(&standby);
    // Ready while it stands by: a surge rollout waits for exactly this.
    scrape_until(&address, "the standby tracking the driver", |m| {
        m.contains(r#"kdp_devices{resource="devices.anza-labs.dev/kvm",health="Healthy"} 1"#)
    });
    // The gauge is set before the first try at the lock, which ends the start: wait for it.
    readyz_until(&address, |(status, _)| *status == 200);

    // The holder is frozen, so only the standby sees the new configuration.
    holder.signal(libc::SIGSTOP);
    fs::write(
        &config,
        "resources:\n  - {name: kvm, count: 1}\n  - {name: tun, count: 1}\n",
    )
    .unwrap();
    scrape_until(&address, "the standby applying the new file", |m| {
        sample(m, r#"kdp_config_reloads_total{result="applied"}"#) == Some(1.0)
    });
    // SIGKILL lets the lock go without a trace inotify could see; the standby's retries find
    // it free.
    let mut arrivals = Arrivals::watch(socket.parent().unwrap());
    holder.signal(libc::SIGKILL);
    arrivals.wait_for(&socket);
    register(&socket, true, "");
    wait_for_devices(&api, DRIVER, &["kvm-0", "tun-0"]);
}

#[test]
fn two_drivers_on_one_node_serve_side_by_side() {
    let node = dra_node();
    let api = FakeApiServer::start();
    let _first = dra_plugin(&node, &api, &["--resource", "kvm"]);
    let other = "gpu.example.com";
    let _second = dra_plugin(&node, &api, &["--resource", "tun", "--driver", other]);
    for (driver, device) in [(DRIVER, "kvm-0"), (other, "tun-0")] {
        let socket = registration_socket(&node, driver);
        wait_for_file(&socket);
        let info = register(&socket, true, "");
        assert_eq!(info.name, driver);
        api.wait_for(&format!("{driver}'s slices"), |state| {
            state
                .devices(driver)
                .first()
                .map(|d| d == device)
                .filter(|ok| *ok)
        });
    }
    let endpoints: Vec<String> = [DRIVER, other]
        .iter()
        .map(|d| register(&registration_socket(&node, d), true, "").endpoint)
        .collect();
    assert_ne!(
        endpoints[0], endpoints[1],
        "each driver has a socket of its own"
    );
}

#[test]
fn a_dra_server_that_cannot_start_is_retried_and_never_ends_the_process() {
    let node = dra_node();
    let api = FakeApiServer::start();
    // Someone else's file where our socket belongs: left alone, and tried again until it goes.
    let sockets = node.root.path().join("plugins/kubelet-device-plugins");
    fs::create_dir_all(&sockets).unwrap();
    let stray = sockets.join("kdp-dra.sock");
    fs::write(&stray, b"not ours").unwrap();
    let plugin = dra_plugin(&node, &api, &["--resource", "kvm"]);
    let address = metrics_address(&plugin);
    crate::metrics::readyz_until(&address, |(code, reason)| {
        *code == 503 && reason.contains("not serving") && reason.contains("not a socket")
    });
    assert_eq!(fs::read(&stray).unwrap(), b"not ours");
    let socket = registration_socket(&node, DRIVER);
    fs::remove_file(&stray).unwrap();
    wait_for_file(&socket);
    assert_eq!(register(&socket, true, "").name, DRIVER);
    wait_for_devices(
        &api,
        DRIVER,
        &(0..10).map(|i| format!("kvm-{i}")).collect::<Vec<_>>(),
    );
}

#[test]
fn a_removed_resources_cdi_spec_stays_while_a_claim_names_it_and_a_deleted_spec_comes_back() {
    let node = dra_node();
    let api = FakeApiServer::start();
    let config = node.root.path().join("config.yaml");
    let all = "resources:\n  - {name: kvm, count: 1}\n  - {name: tun, count: 1}\n  - {name: fuse, count: 1}\n";
    fs::write(&config, all).unwrap();
    let plugin = dra_plugin(&node, &api, &["--config", config.to_str().unwrap()]);
    let address = metrics_address(&plugin);
    let endpoint = registered(&node).endpoint;
    wait_for_devices(&api, DRIVER, &["fuse-0", "kvm-0", "tun-0"]);
    api.add_claim(
        "default",
        "vpn",
        "uid-vpn",
        DRIVER,
        NODE,
        &[("tun-0", "tun")],
    );
    assert_eq!(prepare(&endpoint, "uid-vpn", "vpn").error, "");
    let spec = |name: &str| {
        node.root
            .path()
            .join(format!("cdi/kdp-devices.anza-labs.dev_{name}.json"))
    };

    // tun and fuse removed from the configuration; the running VPN pod's claim still names tun.
    fs::write(&config, "resources:\n  - {name: kvm, count: 1}\n").unwrap();
    wait_for_devices(&api, DRIVER, &["kvm-0"]);
    scrape_until(&address, "the reload", |m| {
        sample(m, r#"kdp_config_reloads_total{result="applied"}"#) == Some(1.0)
    });
    assert!(
        spec("tun").exists(),
        "the spec a prepared claim names was removed"
    );
    assert!(!spec("fuse").exists(), "the spec no claim names stayed");

    // A cleanup script deletes kvm's spec; the next look writes it again.
    fs::remove_file(spec("kvm")).unwrap();
    fs::remove_file(node.dev.join("kvm")).unwrap();
    api.wait_for("kvm-0 tainted", |s| tainted(s, "kvm-0").filter(|t| *t));
    assert!(spec("kvm").exists(), "a deleted spec was not written again");
}

#[test]
fn a_pool_whose_list_is_longer_than_one_answer_may_be_is_listed_in_pages() {
    // 70,000 slots in 1,094 slices: listed whole, about 9 MiB, over the 8 MiB we read of one answer.
    let node = dra_node();
    let mut api = FakeApiServer::start();
    let _plugin = dra_plugin(&node, &api, &["--resource", "kvm", "--count", "70000"]);
    let socket = registration_socket(&node, DRIVER);
    wait_for_file(&socket);
    register(&socket, true, "");
    // Checked without copying the pool: the API server waits for the lock meanwhile.
    let tainted_slices = |s: &State| {
        s.slices
            .values()
            .filter(|slice| slice["spec"]["devices"][0]["taints"].is_array())
            .count()
    };
    // A thousand writes each way: more than the usual bound on a busy machine.
    let long = std::time::Duration::from_secs(120);
    api.wait_for_within("1,094 slices", long, |s| {
        (s.slices.len() == 1094).then_some(())
    });
    let state = api.state();
    assert_eq!(state.devices(DRIVER).len(), 70_000);
    let listed: usize = state.slices.values().map(|s| s.to_string().len()).sum();
    assert!(
        listed > 8 << 20,
        "the pool is only {listed} bytes: not over the cap"
    );
    drop(state);

    // The API server restarts, and the place our watch resumes from has expired: the whole pool
    // is listed again, in pages, and checked against that list.
    api.state().expire_watches = 1;
    api.down();
    api.up();
    api.wait_for_within("a list read in pages", long, |s| {
        s.requests
            .iter()
            .any(|r| r.contains("limit=") && r.contains("continue="))
            .then_some(())
    });
    // A change after that: every slice rewritten at the next generation.
    fs::remove_file(node.dev.join("kvm")).unwrap();
    api.wait_for_within("every device tainted", long, |s| {
        (tainted_slices(s) == 1094).then_some(())
    });
    assert_eq!(api.state().slices.len(), 1094, "slices made twice or lost");
}

/// Slice writes the API server answered: creations, replacements, deletions.
fn slice_writes(state: &State) -> usize {
    [
        "POST /apis/resource.k8s.io/v1/resourceslices",
        "PUT /apis/resource.k8s.io/v1/resourceslices/",
        "DELETE /apis/resource.k8s.io/v1/resourceslices/",
    ]
    .iter()
    .map(|p| state.count(p))
    .sum()
}

#[test]
fn an_api_server_that_drops_taints_gets_few_writes_and_no_unhealthy_device() {
    // Seen on a real 1.37 control plane with DRADeviceTaints off: the taint we wrote came back
    // dropped, our watch saw the change, and we wrote it again, about 250 times a second.
    let node = dra_node();
    let api = FakeApiServer::start();
    api.state().drop_device_taints = true;
    fs::remove_file(node.dev.join("kvm")).unwrap();
    let plugin = dra_plugin(
        &node,
        &api,
        &["--resource", "kvm", "--resource", "tun", "--count", "1"],
    );
    let address = metrics_address(&plugin);
    let socket = registration_socket(&node, DRIVER);
    wait_for_file(&socket);
    register(&socket, true, "");
    // The unhealthy device is left out: no claim can be given it.
    wait_for_devices(&api, DRIVER, &["tun-0"]);
    // Back and gone again: one write each.
    make_node(&node.dev.join("kvm"));
    wait_for_devices(&api, DRIVER, &["kvm-0", "tun-0"]);
    fs::remove_file(node.dev.join("kvm")).unwrap();
    wait_for_devices(&api, DRIVER, &["tun-0"]);
    let writes = slice_writes(&api.state());
    // A loop would go on writing: a quiet stretch shows there is none.
    std::thread::sleep(std::time::Duration::from_secs(2));
    let state = api.state();
    assert_eq!(
        slice_writes(&state),
        writes,
        "requests: {:#?}",
        state.requests
    );
    drop(state);
    // Two to learn the taints are dropped, one for each change after.
    assert!(
        writes <= 5,
        "{writes} slice writes: {:#?}",
        api.state().requests
    );
    scrape_until(&address, "the writes counted", |m| {
        sample(m, r#"kdp_dra_slice_writes_total{result="ok"}"#) == Some(writes as f64)
    });
}

#[test]
fn a_throttled_write_waits_as_long_as_the_api_server_asks() {
    let node = dra_node();
    let api = FakeApiServer::start();
    {
        let mut state = api.state();
        state.throttle_writes = 1;
        state.throttle_seconds = 3;
    }
    let _plugin = dra_plugin(&node, &api, &["--resource", "kvm", "--count", "1"]);
    let socket = registration_socket(&node, DRIVER);
    wait_for_file(&socket);
    register(&socket, true, "");
    wait_for_devices(&api, DRIVER, &["kvm-0"]);
    let state = api.state();
    let writes: Vec<std::time::Instant> = state
        .requests
        .iter()
        .zip(&state.request_times)
        .filter(|(r, _)| r.starts_with("POST /apis/resource.k8s.io/v1/resourceslices"))
        .map(|(_, t)| *t)
        .collect();
    assert_eq!(writes.len(), 2, "requests: {:#?}", state.requests);
    // Our own backoff would have tried again after 1 s.
    let waited = writes[1] - writes[0];
    assert!(
        waited >= std::time::Duration::from_secs(3),
        "tried again after {waited:?}, not the 3 s asked"
    );
}

#[test]
fn slices_that_cannot_be_written_make_the_driver_unready_until_they_are() {
    let node = dra_node();
    let api = FakeApiServer::start();
    let plugin = dra_plugin(&node, &api, &["--resource", "kvm", "--count", "1"]);
    let address = metrics_address(&plugin);
    let socket = registration_socket(&node, DRIVER);
    wait_for_file(&socket);
    register(&socket, true, "");
    wait_for_devices(&api, DRIVER, &["kvm-0"]);
    crate::metrics::readyz_until(&address, |(code, _)| *code == 200);

    {
        let mut state = api.state();
        state.throttle_writes = usize::MAX;
        state.throttle_seconds = 1;
    }
    fs::remove_file(node.dev.join("kvm")).unwrap();
    // The slice still offers kvm-0 as healthy, and the scheduler may place a claim on it.
    crate::metrics::readyz_until(&address, |(code, reason)| {
        *code == 503 && reason.contains("out of date") && reason.contains("429")
    });
    api.state().throttle_writes = 0;
    api.wait_for("kvm-0 tainted", |s| tainted(s, "kvm-0").filter(|t| *t));
    crate::metrics::readyz_until(&address, |(code, _)| *code == 200);
}

/// Runs `serve --mode dra` with `args` to its end: it must refuse to start.
fn refused(node: &TestNode, args: &[&str]) -> (Option<i32>, String) {
    let mut command = Command::new(binary());
    command
        .args(["serve", "--mode", "dra", "--plugin-dir"])
        .arg(&node.plugins)
        .args(args)
        .env("KUBERNETES_SERVICE_HOST", "127.0.0.1");
    let out = command.output().expect("run the binary");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn names_the_operator_must_fix_exit_2_in_dra_mode() {
    let node = dra_node();
    let long_driver = format!("{}.example.com", "d".repeat(60));
    let cases: [(&[&str], &str); 3] = [
        (
            &["--node-name", NODE, "--driver", "Not_A_Name"],
            "not a DNS subdomain",
        ),
        (
            &["--node-name", NODE, "--driver", &long_driver],
            "at most 63 characters",
        ),
        (&["--driver", DRIVER], "node name"),
    ];
    for (args, message) in cases {
        let (code, stderr) = refused(&node, args);
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(message), "{args:?}: {stderr}");
    }
}

#[test]
fn a_kubelet_root_too_long_for_the_dra_socket_exits_2_at_start() {
    let root = tempfile::tempdir().unwrap();
    // Long enough that the socket, bound under its temporary name, would not fit in sun_path.
    let kubelet = root.path().join("k".repeat(70));
    fs::create_dir_all(kubelet.join("plugins_registry")).unwrap();
    fs::create_dir_all(kubelet.join("device-plugins")).unwrap();
    let out = Command::new(binary())
        .args([
            "serve",
            "--mode",
            "dra",
            "--node-name",
            NODE,
            "--plugin-dir",
        ])
        .arg(kubelet.join("device-plugins"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("over the kernel's 107"), "{stderr}");
}

#[test]
fn a_dra_holder_whose_lock_another_instance_took_stands_down_until_it_is_free() {
    let node = dra_node();
    let api = FakeApiServer::start();
    let holder = dra_plugin(&node, &api, &["--resource", "kvm", "--count", "1"]);
    let socket = registration_socket(&node, DRIVER);
    wait_for_file(&socket);
    register(&socket, true, "");
    wait_for_devices(&api, DRIVER, &["kvm-0"]);
    // A cleanup script deletes the lock file and another instance takes the path first (here,
    // the test, renaming a file it holds into place in one step).
    let locks = node
        .root
        .path()
        .join("plugins/kubelet-device-plugins/.kdp-locks");
    let theirs = locks.join("theirs");
    let file = fs::File::create(&theirs).unwrap();
    file.try_lock().unwrap();
    let mut gone = Arrivals::watch_departures(socket.parent().unwrap());
    fs::rename(&theirs, locks.join("dra.lock")).unwrap();
    // The holder stops serving the driver: its registration socket goes.
    gone.wait_for(&socket);
    assert!(holder
        .log_text()
        .contains("after its file was deleted under us: standing by"));
    // Once the other lets go, it takes the driver again.
    let mut back = Arrivals::watch(socket.parent().unwrap());
    drop(file);
    fs::remove_file(locks.join("dra.lock")).unwrap();
    back.wait_for(&socket);
    register(&socket, true, "");
    wait_for_devices(&api, DRIVER, &["kvm-0"]);
}
