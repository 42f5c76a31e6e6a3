//! Configured resources end to end against the fake kubelet: globs and hotplug, extras in Allocate,
//! live reload (add, remove, change), and bad configurations refused at start and at reload.

use std::fs;
use std::path::Path;
use std::process::Command;

use crate::support::{health, make_node, next_list, watch, FakeKubelet, PluginProcess, TestNode};
use kubelet_device_plugins::proto;

fn ids(list: &proto::ListAndWatchResponse) -> Vec<String> {
    list.devices.iter().map(|d| d.ID.clone()).collect()
}

/// Replaces the file atomically, as editors and config management do.
fn write_config(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, text).unwrap();
    fs::rename(&tmp, path).unwrap();
}

fn serve_with_config(node: &TestNode, text: &str) -> (PluginProcess, std::path::PathBuf) {
    let etc = node.root.path().join("etc");
    fs::create_dir_all(&etc).unwrap();
    let config = etc.join("config.yaml");
    fs::write(&config, text).unwrap();
    let plugin = PluginProcess::serve(node, &["--config", config.to_str().unwrap()]);
    (plugin, config)
}

#[test]
fn glob_devices_come_and_go_with_their_nodes() {
    let node = TestNode::new();
    let kubelet = FakeKubelet::start(&node.plugins);
    let text = format!(
        "resources:\n  - name: serial\n    count: 1\n    devices:\n      - glob: {}/ttyUSB*\n",
        node.dev.display()
    );
    let (_plugin, _) = serve_with_config(&node, &text);
    kubelet.registrations_of(&["devices.anza-labs.dev/serial"]);
    let client = kubelet.dial("kdp-serial.sock");
    let mut stream = watch(&client);
    assert!(next_list(&mut stream).devices.is_empty());

    make_node(&node.dev.join("ttyUSB1"));
    assert_eq!(ids(&next_list(&mut stream)), ["serial-ttyUSB1-0"]);
    make_node(&node.dev.join("ttyUSB0"));
    assert_eq!(
        ids(&next_list(&mut stream)),
        ["serial-ttyUSB0-0", "serial-ttyUSB1-0"]
    );
    fs::remove_file(node.dev.join("ttyUSB1")).unwrap();
    assert_eq!(ids(&next_list(&mut stream)), ["serial-ttyUSB0-0"]);

    let mut request = proto::AllocateRequest::new();
    let mut c = proto::ContainerAllocateRequest::new();
    c.devices_ids = vec!["serial-ttyUSB0-0".into()];
    request.container_requests.push(c.clone());
    let response = client.allocate(&request).unwrap();
    assert_eq!(
        response.container_responses[0].devices[0].host_path,
        node.dev.join("ttyUSB0").to_str().unwrap()
    );
    // The removed device's ID is unknown now.
    c.devices_ids = vec!["serial-ttyUSB1-0".into()];
    request.container_requests[0] = c;
    assert!(client.allocate(&request).is_err());
}

#[test]
fn allocate_carries_the_configured_extras() {
    let node = TestNode::new();
    let kubelet = FakeKubelet::start(&node.plugins);
    let vfio = node.dev.join("vfio");
    fs::create_dir(&vfio).unwrap();
    make_node(&vfio.join("vfio"));
    make_node(&vfio.join("12"));
    let text = format!(
        r#"resources:
  - name: vfio
    permissions: rwm
    devices:
      - nodes:
          - path: {dir}/vfio
            container_path: /dev/vfio/vfio
          - path: {dir}/12
            container_path: /dev/vfio/12
    mounts:
      - host_path: /usr/share
        container_path: /opt/share
        read_only: true
    env:
      VFIO_GROUP: "12"
    annotations:
      example.com/vfio: "12"
    cdi_devices: ["example.com/vfio=12"]
"#,
        dir = vfio.display()
    );
    let (_plugin, _) = serve_with_config(&node, &text);
    kubelet.registrations_of(&["devices.anza-labs.dev/vfio"]);
    let client = kubelet.dial("kdp-vfio.sock");
    let mut request = proto::AllocateRequest::new();
    let mut c = proto::ContainerAllocateRequest::new();
    c.devices_ids = vec!["vfio-3".into()];
    request.container_requests.push(c);
    let r = client.allocate(&request).unwrap();
    let c = &r.container_responses[0];
    let specs: Vec<(&str, &str, &str)> = c
        .devices
        .iter()
        .map(|d| {
            (
                d.host_path.as_str(),
                d.container_path.as_str(),
                d.permissions.as_str(),
            )
        })
        .collect();
    let (g, v) = (vfio.join("12"), vfio.join("vfio"));
    assert_eq!(
        specs,
        [
            (v.to_str().unwrap(), "/dev/vfio/vfio", "rwm"),
            (g.to_str().unwrap(), "/dev/vfio/12", "rwm")
        ]
    );
    assert_eq!(
        (
            c.mounts[0].host_path.as_str(),
            c.mounts[0].container_path.as_str(),
            c.mounts[0].read_only
        ),
        ("/usr/share", "/opt/share", true)
    );
    assert_eq!(c.envs["VFIO_GROUP"], "12");
    assert_eq!(c.annotations["example.com/vfio"], "12");
    assert_eq!(c.cdi_devices[0].name, "example.com/vfio=12");
    // A missing group node makes the whole device Unhealthy.
    let mut stream = watch(&client);
    next_list(&mut stream);
    fs::remove_file(vfio.join("12")).unwrap();
    assert!(health(&next_list(&mut stream))
        .iter()
        .all(|(_, h)| h == "Unhealthy"));
}

#[test]
fn reload_adds_removes_and_changes_resources() {
    let node = TestNode::new();
    let kubelet = FakeKubelet::start(&node.plugins);
    let (plugin, config) = serve_with_config(
        &node,
        "resources:\n  - name: kvm\n    count: 2\n  - name: tun\n    count: 2\n",
    );
    kubelet.registrations_of(&["devices.anza-labs.dev/kvm", "devices.anza-labs.dev/tun"]);
    let tun = kubelet.dial("kdp-tun.sock");
    let mut tun_stream = watch(&tun);
    assert_eq!(next_list(&mut tun_stream).devices.len(), 2);
    let kvm = kubelet.dial("kdp-kvm.sock");
    let mut kvm_stream = watch(&kvm);
    next_list(&mut kvm_stream);

    write_config(
        &config,
        "resources:\n  - name: tun\n    count: 5\n  - name: fuse\n",
    );
    let added = kubelet.next_registration();
    assert_eq!(added.request.resource_name, "devices.anza-labs.dev/fuse");
    assert!(added.endpoint_existed);
    // Changed in place: the same stream gets the new list, no re-registration needed.
    assert_eq!(next_list(&mut tun_stream).devices.len(), 5);
    // Removed: its stream ends and its socket goes.
    let end = futures_executor::block_on(futures_util::StreamExt::next(&mut kvm_stream));
    assert!(end.is_none(), "{end:?}");
    assert!(!node.plugins.join("kdp-kvm.sock").exists());
    assert!(plugin
        .log_text()
        .contains("stopped serving devices.anza-labs.dev/kvm: no longer configured"));
    assert!(kubelet.registration_within(crate::support::QUIET).is_none());
}

#[test]
fn a_bad_reload_keeps_the_running_configuration() {
    let node = TestNode::new();
    let kubelet = FakeKubelet::start(&node.plugins);
    let (plugin, config) = serve_with_config(&node, "resources:\n  - name: kvm\n    count: 2\n");
    kubelet.registrations_of(&["devices.anza-labs.dev/kvm"]);

    write_config(
        &config,
        "resources:\n  - name: kvm\n    count: 0\n  - name: fuse\n",
    );
    let log = plugin.wait_for_log("the new configuration is refused");
    assert!(
        log.contains("resources[0].count: 0 is out of range"),
        "{log}"
    );
    let client = kubelet.dial("kdp-kvm.sock");
    let mut stream = watch(&client);
    assert_eq!(next_list(&mut stream).devices.len(), 2);
    assert!(
        !node.plugins.join("kdp-fuse.sock").exists(),
        "half of a bad configuration was applied"
    );

    // Fixed, and applied on SIGHUP as well as on the write.
    fs::write(&config, "resources:\n  - name: kvm\n    count: 3\n").unwrap();
    assert_eq!(next_list(&mut stream).devices.len(), 3);
    plugin.signal(libc::SIGHUP);
    plugin.wait_for_log("SIGHUP received: applying the configuration (1 resources)");
    assert!(!plugin.log_text().contains("panicked"));
}

#[test]
fn a_config_file_deleted_and_written_again_changes_only_what_changed() {
    let node = TestNode::new();
    let kubelet = FakeKubelet::start(&node.plugins);
    let (plugin, config) = serve_with_config(&node, "resources:\n  - name: kvm\n    count: 2\n");
    kubelet.registrations_of(&["devices.anza-labs.dev/kvm"]);
    let client = kubelet.dial("kdp-kvm.sock");
    let mut stream = watch(&client);
    assert_eq!(next_list(&mut stream).devices.len(), 2);
    // `rm` then `cat >`: the file is created empty and written afterwards.
    fs::remove_file(&config).unwrap();
    let mut file = fs::File::create(&config).unwrap();
    std::io::Write::write_all(&mut file, b"resources:\n  - name: kvm\n    count: 3\n").unwrap();
    drop(file);
    // The same stream gets the new list: the resource was never stopped in between.
    assert_eq!(next_list(&mut stream).devices.len(), 3);
    let log = plugin.wait_for_log("applying the configuration (1 resources)");
    assert!(!log.contains("no longer configured"), "{log}");
    assert_eq!(
        log.matches("applying the configuration").count(),
        1,
        "{log}"
    );
    // An empty file, left so, is refused and the running configuration stays.
    fs::write(&config, "").unwrap();
    plugin.wait_for_log("is empty: write `resources: []` to serve nothing");
    assert!(!plugin.log_text().contains("no longer configured"));
}

/// Serves with `config`, which must be refused at start with exit code 2; what it printed.
fn refused_at_start(node: &TestNode, config: &Path) -> String {
    let out = Command::new(crate::support::binary())
        .args(["serve", "--plugin-dir", node.plugins.to_str().unwrap()])
        .arg("--config")
        .arg(config)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{err}");
    err
}

#[test]
fn a_bad_configuration_at_start_exits_2_naming_file_and_field() {
    let node = TestNode::new();
    let config = node.root.path().join("bad.yaml");
    fs::write(
        &config,
        "resources:\n  - name: serial\n    devices:\n      - glob: /dev/*/ttyUSB*\n",
    )
    .unwrap();
    let err = refused_at_start(&node, &config);
    assert!(
        err.contains("bad.yaml: resources[0].devices[0].glob: wildcards are allowed only in the last path component"),
        "{err}"
    );
    assert!(
        fs::read_dir(&node.plugins).unwrap().next().is_none(),
        "left something in the plugin directory"
    );
}

#[test]
fn sigterm_right_behind_a_reload_still_stops_cleanly() {
    let node = TestNode::new();
    let kubelet = FakeKubelet::start(&node.plugins);
    let (mut plugin, config) = serve_with_config(&node, "resources:\n  - name: kvm\n");
    kubelet.registrations_of(&["devices.anza-labs.dev/kvm"]);
    // The reload adds a resource; SIGTERM arrives while it is being applied.
    fs::write(&config, "resources:\n  - name: kvm\n  - name: tun\n").unwrap();
    plugin.signal(libc::SIGHUP);
    plugin.signal(libc::SIGTERM);
    assert_eq!(plugin.wait().code(), Some(0), "{}", plugin.log_text());
    // Nothing of ours, the record of the socket slots taken included: the kubelet let go.
    let left: Vec<_> = fs::read_dir(&node.plugins)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        left,
        ["kubelet.sock"],
        "sockets left behind: {left:?}\n{}",
        plugin.log_text()
    );
}

#[test]
fn a_resource_taken_out_of_the_configuration_leaves_nothing_behind() {
    let node = TestNode::new();
    let kubelet = FakeKubelet::start(&node.plugins);
    let (plugin, config) = serve_with_config(&node, "resources:\n  - name: kvm\n  - name: tun\n");
    kubelet.registrations_of(&["devices.anza-labs.dev/kvm", "devices.anza-labs.dev/tun"]);
    let tun = node.plugins.join("kdp-tun.sock");
    let record = node.plugins.join(".kdp-locks/kdp-tun.sock.last");
    assert!(tun.exists() && record.exists());
    write_config(&config, "resources:\n  - name: kvm\n");
    kubelet.disconnect_of("devices.anza-labs.dev/tun");
    // The lock goes last: once it is gone, everything of tun's is.
    let locks = node.plugins.join(".kdp-locks");
    let lock = locks.join("kdp-tun.sock.lock");
    crate::support::wait_in(
        &locks,
        inotify::WatchMask::DELETE,
        || format!("{} stayed:\n{}", lock.display(), plugin.log_text()),
        || (!lock.exists()).then_some(()),
    );
    assert!(!tun.exists() && !record.exists(), "{}", plugin.log_text());
}

/// A USB device as the kernel shows it: its sysfs entry under `<sys>/bus/usb/devices/<port>`
/// (identity, bus and device number, a usb-serial interface owning a tty) first, then its nodes
/// under `/dev`, as devtmpfs makes them after the uevent.
fn plug_usb(
    node: &TestNode,
    sys: &Path,
    port: &str,
    serial: &str,
    (bus, devnum): (u32, u32),
    tty: &str,
) {
    let dir = sys.join("bus/usb/devices").join(port);
    fs::create_dir_all(dir.join(format!("{port}:1.0/{tty}/tty/{tty}"))).unwrap();
    for (name, value) in [
        ("idVendor", "0403".to_owned()),
        ("idProduct", "6001".to_owned()),
        ("serial", serial.to_owned()),
        ("busnum", bus.to_string()),
        ("devnum", devnum.to_string()),
    ] {
        fs::write(dir.join(name), format!("{value}\n")).unwrap();
    }
    let bus_dir = node.dev.join(format!("bus/usb/{bus:03}"));
    fs::create_dir_all(&bus_dir).unwrap();
    make_node(&bus_dir.join(format!("{devnum:03}")));
    make_node(&node.dev.join(tty));
}

/// Unplugged: the nodes go, then the sysfs entry.
fn unplug_usb(node: &TestNode, sys: &Path, port: &str, (bus, devnum): (u32, u32), tty: &str) {
    fs::remove_file(node.dev.join(format!("bus/usb/{bus:03}/{devnum:03}"))).unwrap();
    fs::remove_file(node.dev.join(tty)).unwrap();
    fs::remove_dir_all(sys.join("bus/usb/devices").join(port)).unwrap();
}

/// The next list whose devices are all Healthy (a device whose second node is not made yet is
/// listed Unhealthy first).
fn next_healthy_list(
    stream: &mut grpcio::ClientSStreamReceiver<proto::ListAndWatchResponse>,
) -> proto::ListAndWatchResponse {
    for _ in 0..4 {
        let list = next_list(stream);
        if list.devices.iter().all(|d| d.health == "Healthy") {
            return list;
        }
    }
    panic!("no list with every device Healthy");
}

#[test]
fn usb_devices_chosen_by_identity_come_and_go_with_their_nodes_and_keep_their_ids() {
    let node = TestNode::new();
    let sys = node.root.path().join("sys");
    fs::create_dir_all(sys.join("bus/usb/devices")).unwrap();
    fs::create_dir_all(node.dev.join("bus/usb/001")).unwrap();
    fs::create_dir_all(node.dev.join("bus/usb/002")).unwrap();
    let kubelet = FakeKubelet::start(&node.plugins);
    let text = "resources:\n  - name: serial\n    count: 1\n    devices:\n      - usb: {vendor: \"0403\", product: \"6001\", serial: \"A12345\"}\n";
    let etc = node.root.path().join("etc");
    fs::create_dir_all(&etc).unwrap();
    fs::write(etc.join("config.yaml"), text).unwrap();
    let config = etc.join("config.yaml");
    let _plugin = PluginProcess::serve(
        &node,
        &[
            "--config",
            config.to_str().unwrap(),
            "--sys-root",
            sys.to_str().unwrap(),
        ],
    );
    kubelet.registrations_of(&["devices.anza-labs.dev/serial"]);
    let client = kubelet.dial("kdp-serial.sock");
    let mut stream = watch(&client);
    assert!(next_list(&mut stream).devices.is_empty());

    plug_usb(&node, &sys, "1-1.2", "A12345", (1, 4), "ttyUSB0");
    assert_eq!(
        ids(&next_healthy_list(&mut stream)),
        ["serial-0403-6001-A12345-0"]
    );
    let mut request = proto::AllocateRequest::new();
    let mut c = proto::ContainerAllocateRequest::new();
    c.devices_ids = vec!["serial-0403-6001-A12345-0".into()];
    request.container_requests.push(c);
    let response = client.allocate(&request).unwrap();
    let paths: Vec<(&str, &str)> = response.container_responses[0]
        .devices
        .iter()
        .map(|d| (d.host_path.as_str(), d.container_path.as_str()))
        .collect();
    let bus_node = node.dev.join("bus/usb/001/004");
    let tty = node.dev.join("ttyUSB0");
    assert_eq!(
        paths,
        [
            (bus_node.to_str().unwrap(), "/dev/bus/usb/001/004"),
            (tty.to_str().unwrap(), "/dev/ttyUSB0")
        ]
    );

    // Unplugged, then plugged into another port: another bus, device number and tty, same ID.
    unplug_usb(&node, &sys, "1-1.2", (1, 4), "ttyUSB0");
    let mut list = next_list(&mut stream);
    while !list.devices.is_empty() {
        list = next_list(&mut stream);
    }
    plug_usb(&node, &sys, "2-3", "A12345", (2, 9), "ttyUSB1");
    assert_eq!(
        ids(&next_healthy_list(&mut stream)),
        ["serial-0403-6001-A12345-0"]
    );
    let response = client.allocate(&request).unwrap();
    assert_eq!(
        response.container_responses[0].devices[1].container_path,
        "/dev/ttyUSB1"
    );
    // Another adapter of the same model, with another serial, is not ours to give: once ours
    // goes, the list is empty (lists are whole: were it ours, it would be in this one).
    plug_usb(&node, &sys, "1-4", "B99999", (1, 7), "ttyUSB2");
    unplug_usb(&node, &sys, "2-3", (2, 9), "ttyUSB1");
    let mut list = next_list(&mut stream);
    while ids(&list) == ["serial-0403-6001-A12345-0"] {
        list = next_list(&mut stream);
    }
    assert!(list.devices.is_empty(), "{:?}", ids(&list));
}

#[test]
fn stable_links_give_ids_from_their_names_and_follow_their_target() {
    let node = TestNode::new();
    let by_id = node.dev.join("serial/by-id");
    fs::create_dir_all(&by_id).unwrap();
    make_node(&node.dev.join("ttyUSB0"));
    make_node(&node.dev.join("ttyUSB1"));
    let link = by_id.join("usb-FTDI_FT232R_A12345-if00-port0");
    std::os::unix::fs::symlink("../../ttyUSB0", &link).unwrap();
    let kubelet = FakeKubelet::start(&node.plugins);
    let text = format!(
        "resources:\n  - name: serial\n    count: 1\n    devices:\n      - glob: {}/*\n",
        by_id.display()
    );
    let (_plugin, _) = serve_with_config(&node, &text);
    kubelet.registrations_of(&["devices.anza-labs.dev/serial"]);
    let client = kubelet.dial("kdp-serial.sock");
    let mut stream = watch(&client);
    let id = "serial-usb-FTDI_FT232R_A12345-if00-port0-0";
    assert_eq!(
        health(&next_list(&mut stream)),
        [(id.to_owned(), "Healthy".to_owned())]
    );
    // The container gets the link's own path; the runtime resolves it when the container starts.
    let mut request = proto::AllocateRequest::new();
    let mut c = proto::ContainerAllocateRequest::new();
    c.devices_ids = vec![id.into()];
    request.container_requests.push(c);
    let spec = client.allocate(&request).unwrap().container_responses[0].devices[0].clone();
    assert_eq!(spec.host_path, link.to_str().unwrap());
    assert_eq!(spec.container_path, link.to_str().unwrap());

    // Re-pointed (udev replaces links by rename) at a node that is not there: Unhealthy, same ID.
    let tmp = by_id.join(".tmp-link");
    std::os::unix::fs::symlink("../../ttyUSB7", &tmp).unwrap();
    fs::rename(&tmp, &link).unwrap();
    assert_eq!(
        health(&next_list(&mut stream)),
        [(id.to_owned(), "Unhealthy".to_owned())]
    );
    // And at one that is: Healthy again.
    std::os::unix::fs::symlink("../../ttyUSB1", &tmp).unwrap();
    fs::rename(&tmp, &link).unwrap();
    assert_eq!(
        health(&next_list(&mut stream)),
        [(id.to_owned(), "Healthy".to_owned())]
    );
    // The link removed: the device goes.
    fs::remove_file(&link).unwrap();
    assert!(next_list(&mut stream).devices.is_empty());
}

/// The host path behind each ID of `list`, by asking Allocate for each.
fn paths(
    client: &proto::DevicePluginClient,
    list: &proto::ListAndWatchResponse,
) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = ids(list)
        .into_iter()
        .map(|id| {
            let mut request = proto::AllocateRequest::new();
            let mut c = proto::ContainerAllocateRequest::new();
            c.devices_ids = vec![id.clone()];
            request.container_requests.push(c);
            let response = client.allocate(&request).unwrap();
            (
                id,
                response.container_responses[0].devices[0].host_path.clone(),
            )
        })
        .collect();
    out.sort();
    out
}

#[test]
fn a_device_keeps_its_id_through_a_source_added_beside_it_and_a_restart() {
    let node = TestNode::new();
    let kubelet = FakeKubelet::start(&node.plugins);
    for dir in ["a", "b"] {
        fs::create_dir(node.dev.join(dir)).unwrap();
        make_node(&node.dev.join(dir).join("tty0"));
    }
    let glob = |dir: &str| format!("      - glob: {}/{dir}/tty*\n", node.dev.display());
    let head = "resources:\n  - name: serial\n    count: 1\n    devices:\n";
    let (mut plugin, config) = serve_with_config(&node, &format!("{head}{}", glob("b")));
    kubelet.registrations_of(&["devices.anza-labs.dev/serial"]);
    let client = kubelet.dial("kdp-serial.sock");
    let mut stream = watch(&client);
    let b = node.dev.join("b/tty0").to_string_lossy().into_owned();
    assert_eq!(
        paths(&client, &next_list(&mut stream)),
        [("serial-tty0-0".to_owned(), b.clone())]
    );
    // A source put in front, finding a node of the same name: the device there keeps its ID
    // (the kubelet may have given it to a pod); the newcomer is the one told apart.
    write_config(&config, &format!("{head}{}{}", glob("a"), glob("b")));
    let both = paths(&client, &next_list(&mut stream));
    assert_eq!(both.len(), 2, "{both:?}");
    assert!(
        both.contains(&("serial-tty0-0".to_owned(), b.clone())),
        "{both:?}"
    );
    // The next instance (a rollout's, a restart) reads the IDs back. (The stream stays open
    // until the plugin ends it: one the kubelet ended would be registered again.)
    plugin.signal(libc::SIGTERM);
    assert!(plugin.wait().success());
    drop(stream);
    let _plugin = PluginProcess::serve(&node, &["--config", config.to_str().unwrap()]);
    let registered = kubelet.registrations_of(&["devices.anza-labs.dev/serial"]);
    let client = kubelet.dial(&registered[0].request.endpoint);
    let mut stream = watch(&client);
    assert_eq!(paths(&client, &next_list(&mut stream)), both);
}

/// 300 kB of YAML that expands to 5 GB: one anchored 100 kB string and 50,000 aliases of it.
fn alias_bomb() -> String {
    let mut text = format!(
        "resources:\n  - name: kvm\n    annotations: {{big: &s {}}}\n    cdi_devices: [",
        "a".repeat(100_000)
    );
    text.push_str(&"*s, ".repeat(50_000));
    text.push_str("]\n");
    text
}

#[test]
fn a_configuration_built_to_expand_is_refused_at_start_and_leaves_a_running_plugin_alone() {
    let node = TestNode::new();
    let etc = node.root.path().join("etc");
    fs::create_dir_all(&etc).unwrap();
    let bad = etc.join("bomb.yaml");
    fs::write(&bad, alias_bomb()).unwrap();
    let err = refused_at_start(&node, &bad);
    assert!(
        err.contains("bomb.yaml: its aliases expand it to more than 4194304 bytes"),
        "{err}"
    );

    // On reload, the running configuration stays and keeps serving.
    let kubelet = FakeKubelet::start(&node.plugins);
    let (plugin, config) = serve_with_config(&node, "resources:\n  - name: kvm\n    count: 2\n");
    kubelet.registrations_of(&["devices.anza-labs.dev/kvm"]);
    let client = kubelet.dial("kdp-kvm.sock");
    let mut stream = watch(&client);
    assert_eq!(next_list(&mut stream).devices.len(), 2);
    write_config(&config, &alias_bomb());
    let log = plugin.wait_for_log("the new configuration is refused");
    assert!(log.contains("its aliases expand it"), "{log}");
    fs::write(&config, "resources:\n  - name: kvm\n    count: 3\n").unwrap();
    assert_eq!(next_list(&mut stream).devices.len(), 3);
}
