//! The daemon binary against a fake kubelet: real gRPC over real Unix sockets, real inotify on
//! real files in temp directories, real signals.

use std::fs;

use crate::support::{
    allocate, health, make_node, next_list, wait_for_file, watch, FakeKubelet, PluginProcess,
    TestNode, KVM, TUN,
};
use grpcio::RpcStatusCode;
use kubelet_device_plugins::proto;

#[test]
fn registers_every_resource_after_serving_it() {
    let node = TestNode::new();
    let kubelet = FakeKubelet::start(&node.plugins);
    let _plugin = PluginProcess::serve(&node, &["--resource", "kvm,tun", "--count", "3"]);

    let mut got = kubelet.registrations_of(&[KVM, TUN]);
    got.sort_by(|a, b| a.request.resource_name.cmp(&b.request.resource_name));
    let kvm = &got[0];
    assert_eq!(kvm.request.version, "v1beta1");
    assert_eq!(kvm.request.resource_name, KVM);
    assert_eq!(kvm.request.endpoint, "kdp-kvm.sock");
    assert!(kvm.endpoint_existed, "registered before serving");
    let options = kvm
        .request
        .options
        .as_ref()
        .expect("options in the RegisterRequest");
    assert!(options.get_preferred_allocation_available);
    assert!(!options.pre_start_required);
    assert_eq!(got[1].request.endpoint, "kdp-tun.sock");

    // The options the service reports agree with the ones registered.
    let client = kubelet.dial("kdp-kvm.sock");
    let served = client
        .get_device_plugin_options(&proto::Empty::new())
        .unwrap();
    assert_eq!(&served, options);
}

#[test]
fn lists_and_allocates_over_the_socket() {
    let node = TestNode::new();
    let kubelet = FakeKubelet::start(&node.plugins);
    let _plugin = PluginProcess::serve(
        &node,
        &["--resource", "tun", "--count", "2", "--permissions", "rwm"],
    );
    kubelet.registrations_of(&[TUN]);
    let client = kubelet.dial("kdp-tun.sock");

    let mut stream = watch(&client);
    let first = next_list(&mut stream);
    assert_eq!(
        health(&first),
        [
            ("tun-0".into(), "Healthy".into()),
            ("tun-1".into(), "Healthy".into())
        ]
    );

    let one = allocate(&client, &[&["tun-1"]]).unwrap();
    assert_eq!(one.container_responses.len(), 1);
    let spec = &one.container_responses[0].devices[0];
    assert_eq!(spec.host_path, node.dev.join("net/tun").to_str().unwrap());
    assert_eq!(spec.container_path, "/dev/net/tun");
    assert_eq!(spec.permissions, "rwm");

    let several = allocate(&client, &[&["tun-0"], &["tun-1"]]).unwrap();
    assert_eq!(several.container_responses.len(), 2);
    assert!(several
        .container_responses
        .iter()
        .all(|c| c.devices.len() == 1));

    let err = allocate(&client, &[&["tun-0"], &["tun-7", "kvm-0"]]).unwrap_err();
    let grpcio::Error::RpcFailure(status) = err else {
        panic!("{err:?}")
    };
    assert_eq!(status.code(), RpcStatusCode::INVALID_ARGUMENT);
    assert!(
        status
            .message()
            .contains(r#"unknown device IDs ["tun-7", "kvm-0"]"#),
        "{}",
        status.message()
    );

    // The server keeps answering after a refusal.
    assert!(allocate(&client, &[&["tun-0"]]).is_ok());
    let mut request = proto::PreStartContainerRequest::new();
    request.devices_ids = vec!["tun-0".into()];
    assert!(client.pre_start_container(&request).is_ok());
}

#[test]
fn device_node_health_follows_the_file() {
    let node = TestNode::new();
    let kubelet = FakeKubelet::start(&node.plugins);
    let _plugin = PluginProcess::serve(&node, &["--resource", "kvm", "--count", "2"]);
    kubelet.registrations_of(&[KVM]);
    let client = kubelet.dial("kdp-kvm.sock");
    let mut stream = watch(&client);
    assert!(health(&next_list(&mut stream))
        .iter()
        .all(|(_, h)| h == "Healthy"));

    fs::remove_file(node.dev.join("kvm")).unwrap();
    let list = next_list(&mut stream);
    assert_eq!(
        health(&list),
        [
            ("kvm-0".into(), "Unhealthy".into()),
            ("kvm-1".into(), "Unhealthy".into())
        ]
    );
    let err = allocate(&client, &[&["kvm-0"]]).unwrap_err();
    assert!(
        matches!(err, grpcio::Error::RpcFailure(ref s) if s.code() == RpcStatusCode::INVALID_ARGUMENT),
        "{err:?}"
    );

    make_node(&node.dev.join("kvm"));
    assert!(health(&next_list(&mut stream))
        .iter()
        .all(|(_, h)| h == "Healthy"));
    assert!(allocate(&client, &[&["kvm-0"]]).is_ok());
}

#[test]
fn a_missing_directory_on_the_way_to_a_node_is_watched_too() {
    let node = TestNode::new();
    fs::remove_dir_all(node.dev.join("net")).unwrap();
    let kubelet = FakeKubelet::start(&node.plugins);
    let _plugin = PluginProcess::serve(&node, &["--resource", "tun", "--count", "1"]);
    kubelet.registrations_of(&[TUN]);
    let client = kubelet.dial("kdp-tun.sock");
    let mut stream = watch(&client);
    assert_eq!(
        health(&next_list(&mut stream)),
        [("tun-0".into(), "Unhealthy".into())]
    );
    fs::create_dir(node.dev.join("net")).unwrap();
    make_node(&node.dev.join("net/tun"));
    assert_eq!(
        health(&next_list(&mut stream)),
        [("tun-0".into(), "Healthy".into())]
    );
}

#[test]
fn re_registers_when_the_kubelet_restarts() {
    let node = TestNode::new();
    let mut kubelet = FakeKubelet::start(&node.plugins);
    let plugin = PluginProcess::serve(&node, &["--resource", "kvm,tun"]);
    kubelet.registrations_of(&[KVM, TUN]);

    kubelet.restart();
    let again = kubelet.registrations_of(&[KVM, TUN]);
    assert!(again.iter().all(|r| r.endpoint_existed), "{again:?}");
    // On the same sockets: a new kubelet knows none of ours, and one Register may have been
    // on its way for the server it wiped (its dial-back then reaches the new one).
    assert!(
        again.iter().all(|r| !r.request.endpoint.contains('~')),
        "{again:?}"
    );
    let client = kubelet.dial("kdp-kvm.sock");
    let mut stream = watch(&client);
    assert_eq!(next_list(&mut stream).devices.len(), 10);
    assert!(!plugin.log_text().contains("panicked"));
}

#[test]
fn serves_and_registers_again_when_our_socket_is_removed() {
    // A kubelet that keys endpoints by path (1.37) and has not torn down its client of the
    // removed socket yet: registering that path again would be refused for good.
    let node = TestNode::new();
    let kubelet = FakeKubelet::start_keyed_by_path(&node.plugins);
    let _plugin = PluginProcess::serve(&node, &["--resource", "kvm,tun"]);
    kubelet.registrations_of(&[KVM, TUN]);
    kubelet.list_of(TUN);
    let held = kubelet.hold_teardowns();

    fs::remove_file(node.plugins.join("kdp-tun.sock")).unwrap();
    let r = kubelet.next_registration();
    assert_eq!(r.request.resource_name, TUN);
    assert_eq!(r.request.endpoint, "kdp-tun~1.sock");
    assert!(r.endpoint_existed);
    drop(held);
    assert!(allocate(&kubelet.dial(&r.request.endpoint), &[&["tun-0"]]).is_ok());
    // kvm was left alone.
    assert!(kubelet.registration_within(crate::support::QUIET).is_none());
}

#[test]
fn waits_for_the_kubelet_when_it_is_not_there_yet() {
    let node = TestNode::new();
    let plugin = PluginProcess::serve(&node, &["--resource", "fuse"]);
    // Serving does not need the kubelet.
    wait_for_file(&node.plugins.join("kdp-fuse.sock"));
    assert!(plugin.log_text().contains("waiting for the kubelet"));
    let kubelet = FakeKubelet::start(&node.plugins);
    kubelet.registrations_of(&["devices.anza-labs.dev/fuse"]);
}

#[test]
fn sigterm_stops_cleanly_with_a_stream_open() {
    let node = TestNode::new();
    let kubelet = FakeKubelet::start(&node.plugins);
    let mut plugin = PluginProcess::serve(&node, &["--resource", "kvm,tun,fuse"]);
    kubelet.registrations_of(&[KVM, TUN, "devices.anza-labs.dev/fuse"]);
    let client = kubelet.dial("kdp-kvm.sock");
    let mut stream = watch(&client);
    next_list(&mut stream);

    plugin.signal(libc::SIGTERM);
    let status = plugin.wait();
    assert_eq!(status.code(), Some(0), "{}", plugin.log_text());
    for socket in ["kdp-kvm.sock", "kdp-tun.sock", "kdp-fuse.sock"] {
        assert!(!node.plugins.join(socket).exists(), "{socket} left behind");
    }
    assert!(
        node.plugins.join("kubelet.sock").exists(),
        "removed the kubelet's socket"
    );
    // The stream ended rather than hanging.
    assert!(
        futures_executor::block_on(futures_util::StreamExt::next(&mut stream))
            .is_none_or(|r| r.is_err())
    );
    let log = plugin.log_text();
    assert!(
        log.contains("SIGTERM received") && log.contains("stopped"),
        "{log}"
    );
}

#[test]
fn survives_a_hundred_kubelet_restarts_without_growing() {
    let node = TestNode::new();
    let mut kubelet = FakeKubelet::start(&node.plugins);
    let plugin = PluginProcess::serve(&node, &["--resource", "kvm,tun"]);
    kubelet.registrations_of(&[KVM, TUN]);
    // Warm up once so lazily created state (gRPC's internal threads) is in the baseline; each
    // round ends when the kubelet has dialed back and holds both streams again.
    let round = |kubelet: &mut FakeKubelet| {
        kubelet.restart();
        let registered = kubelet.registrations_of(&[KVM, TUN]);
        kubelet.list_of(KVM);
        kubelet.list_of(TUN);
        let tun = registered
            .into_iter()
            .find(|r| r.request.resource_name == TUN);
        tun.unwrap().request.endpoint
    };
    round(&mut kubelet);
    let (threads, fds) = (plugin.threads(), plugin.fds());

    let mut tun = String::new();
    for _ in 0..100 {
        tun = round(&mut kubelet);
    }
    let client = kubelet.dial(&tun);
    let mut stream = watch(&client);
    assert_eq!(next_list(&mut stream).devices.len(), 10);
    drop(stream);
    assert!(
        plugin.threads() <= threads,
        "threads grew from {threads} to {}",
        plugin.threads()
    );
    assert!(
        plugin.fds() <= fds + 2,
        "fds grew from {fds} to {}",
        plugin.fds()
    );
    assert!(!plugin.log_text().contains("panicked"));
}

#[test]
fn streams_closed_by_the_client_are_released() {
    let node = TestNode::new();
    let kubelet = FakeKubelet::start(&node.plugins);
    let plugin = PluginProcess::serve(&node, &["--resource", "kvm"]);
    kubelet.registrations_of(&[KVM]);
    let client = kubelet.dial("kdp-kvm.sock");
    let mut kept = watch(&client);
    next_list(&mut kept);
    let threads = plugin.threads();
    for _ in 0..50 {
        let mut stream = watch(&client);
        next_list(&mut stream);
    }
    // The long-lived stream still gets updates, and no thread was added per stream.
    fs::remove_file(node.dev.join("kvm")).unwrap();
    assert!(health(&next_list(&mut kept))
        .iter()
        .all(|(_, h)| h == "Unhealthy"));
    assert!(
        plugin.threads() <= threads,
        "threads grew from {threads} to {}",
        plugin.threads()
    );
}

#[test]
fn accepts_the_socket_path_or_localhost_as_authority() {
    let node = TestNode::new();
    let kubelet = FakeKubelet::start(&node.plugins);
    let _plugin = PluginProcess::serve(&node, &["--resource", "kvm"]);
    kubelet.registrations_of(&[KVM]);
    let socket = node.plugins.join("kdp-kvm.sock");
    let env = std::sync::Arc::new(grpcio::EnvBuilder::new().cq_count(1).build());
    // Kubelets up to 1.25 send the socket path as :authority; later ones send "localhost".
    for authority in [socket.to_str().unwrap(), "localhost"] {
        let channel = grpcio::ChannelBuilder::new(env.clone())
            .default_authority(authority)
            .connect(&format!("unix:{}", socket.display()));
        let client = proto::DevicePluginClient::new(channel);
        let options = client.get_device_plugin_options(&proto::Empty::new());
        assert!(options.is_ok(), "authority {authority:?}: {options:?}");
    }
}

#[test]
fn sigterm_is_prompt_while_a_registration_hangs() {
    let node = TestNode::new();
    // Accepts connections (the kernel does) but never answers: a hung kubelet.
    let hung = std::os::unix::net::UnixListener::bind(node.plugins.join("kubelet.sock")).unwrap();
    let mut plugin = PluginProcess::serve(&node, &["--resource", "kvm"]);
    // The register thread has dialled: its Register call is in flight.
    let _call = hung.accept().expect("the plugin dials kubelet.sock");
    let started = std::time::Instant::now();
    plugin.signal(libc::SIGTERM);
    assert_eq!(plugin.wait().code(), Some(0), "{}", plugin.log_text());
    // The Register call in flight (15 s timeout) is cancelled, not waited for.
    assert!(
        started.elapsed() < std::time::Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
    assert!(!node.plugins.join("kdp-kvm.sock").exists());
}

#[test]
fn a_second_sigterm_cuts_a_stuck_shutdown_short() {
    let node = TestNode::new();
    let kubelet = FakeKubelet::start(&node.plugins);
    let mut plugin = PluginProcess::serve(&node, &["--resource", "kvm", "--count", "100000"]);
    kubelet.registrations_of(&[KVM]);
    // A client that opens ListAndWatch for 100,000 devices and never reads: the plugin's final
    // write cannot complete, so its graceful shutdown waits for the drain timeout.
    let client = kubelet.dial("kdp-kvm.sock");
    let _stuck = watch(&client);
    for _ in 0..20 {
        fs::remove_file(node.dev.join("kvm")).unwrap();
        make_node(&node.dev.join("kvm"));
    }
    plugin.signal(libc::SIGTERM);
    plugin.wait_for_log("SIGTERM received");
    let started = std::time::Instant::now();
    plugin.signal(libc::SIGTERM);
    let status = plugin.wait();
    assert!(
        started.elapsed() < std::time::Duration::from_millis(1500),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(status.code(), Some(130), "{}", plugin.log_text());
}

#[test]
fn a_builtin_whose_node_appears_after_start_is_served_then() {
    let node = TestNode::new();
    // No kvm module yet, and no --resource: the present built-ins are served at once.
    fs::remove_file(node.dev.join("kvm")).unwrap();
    let kubelet = FakeKubelet::start(&node.plugins);
    let plugin = PluginProcess::serve(&node, &[]);
    kubelet.registrations_of(&[
        "devices.anza-labs.dev/tun",
        "devices.anza-labs.dev/vhost-net",
        "devices.anza-labs.dev/vhost-vsock",
        "devices.anza-labs.dev/fuse",
    ]);
    // kvm_intel is loaded: /dev/kvm appears, and kvm registers without a restart.
    make_node(&node.dev.join("kvm"));
    let late = kubelet.next_registration();
    assert_eq!(late.request.resource_name, KVM);
    assert!(late.endpoint_existed);
    assert!(plugin
        .log_text()
        .contains("its device node appeared; serving it"));
    let client = kubelet.dial("kdp-kvm.sock");
    assert!(allocate(&client, &[&["kvm-0"]]).is_ok());
}

#[test]
fn the_kubelets_dial_back_gets_options_and_a_list_and_sees_the_end_as_a_disconnect() {
    let node = TestNode::new();
    let kubelet = FakeKubelet::start(&node.plugins);
    let mut plugin = PluginProcess::serve(&node, &["--resource", "kvm", "--count", "2"]);
    kubelet.registrations_of(&[KVM]);
    // What the kubelet does after Register: options first, then its stream.
    assert!(kubelet.options_of(KVM).get_preferred_allocation_available);
    assert_eq!(kubelet.list_of(KVM).devices.len(), 2);
    // A health change reaches the kubelet's own stream.
    fs::remove_file(node.dev.join("kvm")).unwrap();
    assert!(health(&kubelet.list_of(KVM))
        .iter()
        .all(|(_, h)| h == "Unhealthy"));
    // At shutdown the stream ends: to the kubelet, a disconnect.
    plugin.signal(libc::SIGTERM);
    kubelet.disconnect_of(KVM);
    assert_eq!(plugin.wait().code(), Some(0));
}
