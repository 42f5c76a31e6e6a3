//! Registration through the kubelet's plugin watcher: the pluginregistration API on a socket in
//! plugins_registry/, device plugin sockets outside device-plugins/, nothing to redo when the
//! kubelet restarts. The test plays the plugin watcher, as the kubelet's does.

use std::fs;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;

use crate::metrics::{metrics_address, readyz_until};
use crate::support::watcher::{notify, register, registration_client};
use crate::support::{
    health, next_list, wait_for_file, watch, FakeKubelet, PluginProcess, TestNode,
};
use grpcio::{ChannelBuilder, EnvBuilder};
use kubelet_device_plugins::proto::{self, pluginregistration as reg};

const KVM: &str = "devices.anza-labs.dev/kvm";

struct Watcher {
    registry: PathBuf,
    sockets: PathBuf,
}

fn watcher_node() -> (TestNode, Watcher) {
    let node = TestNode::new();
    let registry = node.root.path().join("plugins_registry");
    fs::create_dir(&registry).unwrap();
    let sockets = node.root.path().join("plugins/kubelet-device-plugins");
    (node, Watcher { registry, sockets })
}

fn device_plugin_client(socket: &str) -> proto::DevicePluginClient {
    let env = Arc::new(EnvBuilder::new().cq_count(1).build());
    proto::DevicePluginClient::new(ChannelBuilder::new(env).connect(&format!("unix:{socket}")))
}

#[test]
fn the_plugin_watcher_finds_and_registers_each_resource() {
    let (node, w) = watcher_node();
    let plugin = PluginProcess::serve(&node, &["--resource", "kvm,tun", "--count", "3"]);
    let reg_socket = w.registry.join("kdp-kvm.sock");
    wait_for_file(&reg_socket);
    let client = registration_client(&reg_socket);
    let info = client.get_info(&reg::InfoRequest::new()).expect("GetInfo");
    assert_eq!(info.type_, "DevicePlugin");
    assert_eq!(info.name, KVM);
    assert_eq!(info.supported_versions, ["v1beta1"]);
    let endpoint = w.sockets.join("kdp-kvm.sock");
    assert_eq!(
        info.endpoint,
        endpoint.to_str().unwrap(),
        "the endpoint is absolute and outside device-plugins/"
    );
    assert!(endpoint.exists());
    // Nothing of ours in device-plugins/, which the kubelet wipes when it starts.
    assert!(fs::read_dir(&node.plugins).unwrap().next().is_none());

    // What the kubelet's device manager does with the endpoint.
    let device_plugin = device_plugin_client(&info.endpoint);
    assert!(
        device_plugin
            .get_device_plugin_options(&proto::Empty::new())
            .unwrap()
            .get_preferred_allocation_available
    );
    let mut stream = watch(&device_plugin);
    assert_eq!(next_list(&mut stream).devices.len(), 3);

    // Logged before the answer: nothing to wait for once the call returned.
    notify(&client, true, "");
    assert!(plugin
        .log_text()
        .contains("the kubelet's plugin watcher registered devices.anza-labs.dev/kvm"));
    notify(
        &client,
        false,
        "resource name already registered by another plugin",
    );
    let log = plugin.wait_for_log("the kubelet refused to register devices.anza-labs.dev/kvm");
    assert!(
        log.contains("resource name already registered by another plugin"),
        "{log}"
    );
    // tun has its own registration socket.
    let tun = registration_client(&w.registry.join("kdp-tun.sock"))
        .get_info(&reg::InfoRequest::new())
        .unwrap();
    assert_eq!(tun.name, "devices.anza-labs.dev/tun");
}

#[test]
fn a_kubelet_restart_needs_nothing_from_us() {
    let (node, w) = watcher_node();
    let mut kubelet = FakeKubelet::start(&node.plugins);
    let plugin = PluginProcess::serve(&node, &["--resource", "kvm"]);
    wait_for_file(&w.registry.join("kdp-kvm.sock"));
    let endpoint = w.sockets.join("kdp-kvm.sock");
    let device_plugin = device_plugin_client(endpoint.to_str().unwrap());
    let mut stream = watch(&device_plugin);
    next_list(&mut stream);

    kubelet.restart();
    kubelet.restart();
    // A change after the restarts: once its update arrives, the plugin has seen the restarts too.
    fs::remove_file(node.dev.join("kvm")).unwrap();
    assert!(health(&next_list(&mut stream))
        .iter()
        .all(|(_, h)| h == "Unhealthy"));
    assert!(
        kubelet.registration_within(crate::support::QUIET).is_none(),
        "registered through kubelet.sock as well"
    );
    let log = plugin.log_text();
    assert!(
        log.contains("registering through the kubelet's plugin watcher"),
        "{log}"
    );
    // The restarts seen, and no Register call made.
    assert!(
        log.contains("its plugin watcher registers us again")
            && !log.contains("with the kubelet in"),
        "{log}"
    );
    assert!(endpoint.exists() && w.registry.join("kdp-kvm.sock").exists());
}

#[test]
fn an_instance_that_ends_while_another_serves_leaves_its_registration_socket() {
    let (node, w) = watcher_node();
    let mut first = PluginProcess::serve(&node, &["--resource", "kvm"]);
    let first_reg = w.registry.join("kdp-kvm.sock");
    wait_for_file(&first_reg);
    let mut second = PluginProcess::serve(&node, &["--resource", "kvm"]);
    let second_reg = w.registry.join("kdp-kvm~1.sock");
    wait_for_file(&second_reg);
    let info = registration_client(&second_reg)
        .get_info(&reg::InfoRequest::new())
        .expect("GetInfo");
    assert_eq!(info.name, KVM);
    assert_eq!(
        info.endpoint,
        w.sockets.join("kdp-kvm~1.sock").to_str().unwrap()
    );

    // Kubelets before 1.37 take a registration socket's removal as the resource's
    // deregistration and stop whichever endpoint is current, here the second's: the first
    // leaves its socket, dead, while the second serves.
    first.signal(libc::SIGTERM);
    assert_eq!(first.wait().code(), Some(0));
    assert!(
        first_reg.exists(),
        "the first removed its registration socket"
    );
    assert!(
        !w.sockets.join("kdp-kvm.sock").exists(),
        "its endpoint socket was left"
    );
    assert!(std::os::unix::net::UnixStream::connect(&first_reg).is_err());
    // The last one out clears both.
    second.signal(libc::SIGTERM);
    assert_eq!(second.wait().code(), Some(0));
    assert!(!first_reg.exists() && !second_reg.exists());
}

#[test]
fn a_removed_registration_socket_comes_back() {
    let (node, w) = watcher_node();
    let _plugin = PluginProcess::serve(&node, &["--resource", "fuse"]);
    let reg_socket = w.registry.join("kdp-fuse.sock");
    wait_for_file(&reg_socket);
    fs::remove_file(&reg_socket).unwrap();
    wait_for_file(&reg_socket);
    let info = registration_client(&reg_socket)
        .get_info(&reg::InfoRequest::new())
        .unwrap();
    assert_eq!(info.name, "devices.anza-labs.dev/fuse");
}

#[test]
fn the_mode_can_be_forced_either_way() {
    // kubelet.sock even though plugins_registry/ exists.
    let (node, w) = watcher_node();
    let kubelet = FakeKubelet::start(&node.plugins);
    let _plugin = PluginProcess::serve(
        &node,
        &["--resource", "kvm", "--registration", "kubelet-socket"],
    );
    let r = kubelet.next_registration();
    assert_eq!(
        (
            r.request.resource_name.as_str(),
            r.request.endpoint.as_str()
        ),
        (KVM, "kdp-kvm.sock")
    );
    assert!(
        fs::read_dir(&w.registry).unwrap().next().is_none(),
        "registered both ways"
    );

    // The plugin watcher where there is none: a clear error.
    let plain = TestNode::new();
    let out = Command::new(crate::support::binary())
        .args([
            "serve",
            "--resource",
            "kvm",
            "--registration",
            "plugin-watcher",
            "--plugin-dir",
        ])
        .arg(&plain.plugins)
        .arg("--dev-root")
        .arg(&plain.dev)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("plugins_registry") && err.contains("not usable"),
        "{err}"
    );
}

#[test]
fn readiness_starts_over_when_the_kubelet_restarts() {
    let (node, w) = watcher_node();
    let mut kubelet = FakeKubelet::start(&node.plugins);
    let plugin = PluginProcess::serve(&node, &["--resource", "kvm", "--metrics-port", "0"]);
    let address = metrics_address(&plugin);
    let reg_socket = w.registry.join("kdp-kvm.sock");
    wait_for_file(&reg_socket);
    // The kubelet's plugin watcher, then its device manager's stream.
    let endpoint = register(&reg_socket, true, "").endpoint;
    let client = kubelet.dial(&endpoint);
    let mut stream = watch(&client);
    next_list(&mut stream);
    readyz_until(&address, |(code, _)| *code == 200);

    // A new kubelet holds nothing of ours until its plugin watcher registers us again.
    kubelet.restart();
    readyz_until(&address, |(code, reason)| {
        *code == 503 && reason.contains("is not registered")
    });
    register(&reg_socket, true, "");
    let client = kubelet.dial(&endpoint);
    let mut stream = watch(&client);
    next_list(&mut stream);
    readyz_until(&address, |(code, _)| *code == 200);
}
