//! Every name the kubelet accepts serves under every kubelet root we document, at the root's real
//! length, in both registration modes: socket names stay short and binding needs no longer path.

use std::fs;
use std::path::Path;

use crate::support::watcher::register;
use crate::support::{
    next_list, wait_for_entries, wait_for_file, watch, FakeKubelet, PluginProcess, TestNode,
};

/// The kubelet roots the README documents, by their length.
const ROOTS: [(&str, usize); 3] = [
    ("/var/lib/kubelet", 16),
    ("/var/lib/k0s/kubelet", 20),
    ("/var/snap/microk8s/common/var/lib/kubelet", 41),
];

/// `zigbee-coordinator` (refused under /var/lib/kubelet before), and the longest name a resource
/// with one slot may have, in a domain of its own.
fn config(node: &TestNode) -> (std::path::PathBuf, [String; 2]) {
    let longest = "n".repeat(61);
    let text = format!(
        "domain: example.com\nresources:\n  - name: zigbee-coordinator\n    count: 1\n    devices:\n      - path: {dev}/kvm\n  - name: {longest}\n    count: 1\n    devices:\n      - path: {dev}/kvm\n",
        dev = node.dev.display()
    );
    let path = node.root.path().join("config.yaml");
    fs::write(&path, text).unwrap();
    (
        path,
        [
            "example.com/zigbee-coordinator".to_owned(),
            format!("example.com/{longest}"),
        ],
    )
}

#[test]
fn long_names_serve_through_the_plugin_watcher_under_every_documented_root() {
    for (root, len) in ROOTS {
        let node = TestNode::with_root_length(len);
        let registry = node.root.path().join("plugins_registry");
        fs::create_dir(&registry).unwrap();
        let (config, names) = config(&node);
        let _plugin = PluginProcess::serve(&node, &["--config", config.to_str().unwrap()]);
        let sockets = wait_for_entries(&registry, "kdp-", names.len());
        let mut registered: Vec<String> = Vec::new();
        for socket in &sockets {
            assert!(
                socket.as_os_str().len() <= 107,
                "{root}: {}",
                socket.display()
            );
            let info = register(socket, true, "");
            assert!(info.endpoint.len() <= 107, "{root}: {}", info.endpoint);
            wait_for_file(Path::new(&info.endpoint));
            registered.push(info.name);
        }
        registered.sort();
        let mut wanted = names.to_vec();
        wanted.sort();
        assert_eq!(registered, wanted, "{root}");
    }
}

#[test]
fn long_names_serve_through_kubelet_sock_under_every_documented_root() {
    for (root, len) in ROOTS {
        let node = TestNode::with_root_length(len);
        let kubelet = FakeKubelet::start(&node.plugins);
        let (config, names) = config(&node);
        let _plugin = PluginProcess::serve(&node, &["--config", config.to_str().unwrap()]);
        let wanted: Vec<&str> = names.iter().map(String::as_str).collect();
        for registration in kubelet.registrations_of(&wanted) {
            let endpoint = registration.request.endpoint.clone();
            let client = kubelet.dial(&endpoint);
            let mut stream = watch(&client);
            assert_eq!(
                next_list(&mut stream).devices.len(),
                1,
                "{root}: {endpoint}"
            );
        }
    }
}
