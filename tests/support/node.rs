//! A node's directories in a temp dir: the kubelet's root and a `/dev` stand-in.

use std::fs;
use std::path::PathBuf;

/// A temporary kubelet root (`device-plugins/` in it) and `/dev` stand-in with the built-in nodes
/// as plain files.
pub struct TestNode {
    pub root: tempfile::TempDir,
    pub plugins: PathBuf,
    pub dev: PathBuf,
}

impl TestNode {
    pub fn new() -> TestNode {
        let root = tempfile::tempdir().expect("create a temp dir");
        let plugins = root.path().join("device-plugins");
        let dev = root.path().join("dev");
        fs::create_dir_all(&plugins).unwrap();
        fs::create_dir_all(dev.join("net")).unwrap();
        for node in ["kvm", "net/tun", "vhost-net", "vhost-vsock", "fuse"] {
            fs::write(dev.join(node), b"").unwrap();
        }
        TestNode { root, plugins, dev }
    }
}
