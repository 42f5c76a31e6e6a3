//! A node's directories in a temp dir: the kubelet's root and a `/dev` stand-in.

use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// A temporary kubelet root (`device-plugins/` in it) and `/dev` stand-in with the built-in nodes
/// as real character device nodes (see [`make_node`]).
pub struct TestNode {
    pub root: tempfile::TempDir,
    pub plugins: PathBuf,
    pub dev: PathBuf,
}

impl TestNode {
    pub fn new() -> TestNode {
        TestNode::in_root(tempfile::tempdir().expect("create a temp dir"))
    }

    /// A node whose kubelet root is a path of exactly `len` bytes, as a real distribution's
    /// (`/var/lib/kubelet` is 16, MicroK8s's 41): socket paths then have their real lengths.
    pub fn with_root_length(len: usize) -> TestNode {
        // "/tmp/", the prefix, then tempfile's 6 random characters.
        let root = tempfile::Builder::new()
            .prefix(&"k".repeat(len - 11))
            .rand_bytes(6)
            .tempdir_in("/tmp")
            .expect("create a temp dir");
        assert_eq!(root.path().as_os_str().len(), len);
        TestNode::in_root(root)
    }

    fn in_root(root: tempfile::TempDir) -> TestNode {
        let plugins = root.path().join("device-plugins");
        let dev = root.path().join("dev");
        fs::create_dir_all(&plugins).unwrap();
        fs::create_dir_all(dev.join("net")).unwrap();
        for node in ["kvm", "net/tun", "vhost-net", "vhost-vsock", "fuse"] {
            make_node(&dev.join(node));
        }
        TestNode { root, plugins, dev }
    }
}

/// Makes a character device node at `path` with /dev/null's numbers (1:3), as root can (CI runs
/// as root); a symbolic link to /dev/null where mknod is not allowed, which the plugin follows to
/// the same kind of node. Plain files are not devices to the plugin.
pub fn make_node(path: &Path) {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: `c` is a valid NUL-terminated path for the duration of the call.
    let made = unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(1, 3)) };
    if made != 0 {
        std::os::unix::fs::symlink("/dev/null", path).unwrap();
    }
}
