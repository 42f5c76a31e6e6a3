//! Where every socket lives: the kubelet's directories, our socket names, the registration mode
//! and its detection, and the kernel's limit on socket paths. Resolved once at start (main
//! thread) for the device-plugin frontend; DRA mode uses its directory names and path limit.
//!
//! Two directories are easy to confuse, so they have distinct names here:
//! - the *kubelet's device-plugin directory* (`--plugin-dir`, `<root>/device-plugins`), holding
//!   `kubelet.sock` and, in kubelet-socket mode, our sockets;
//! - our *socket directory*: where our DevicePlugin sockets are, which is the kubelet's
//!   device-plugin directory in kubelet-socket mode and `<root>/plugins/kubelet-device-plugins`
//!   in plugin-watcher mode.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use log::info;

use crate::device::DOMAIN;
use crate::server::TEMPORARY_NAME_MAX;

/// The kubelet's registration socket, in its device-plugin directory.
pub const KUBELET_SOCKET: &str = "kubelet.sock";
/// Our socket files all start with this, so we can tell them from other plugins' sockets.
pub const SOCKET_PREFIX: &str = "kdp-";
/// The kubelet's plugin watcher directory, beside `device-plugins/` under the kubelet's root.
pub const REGISTRY_DIR: &str = "plugins_registry";
/// Our own directory for DevicePlugin sockets in plugin-watcher mode, under the kubelet's root:
/// outside `device-plugins/`, which the kubelet wipes when it starts.
pub const WATCHER_SOCKET_DIR: &str = "plugins/kubelet-device-plugins";

/// How the kubelet learns of our resources.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// The plugin watcher when `plugins_registry/` exists, else `kubelet.sock`.
    Auto,
    /// Dial `kubelet.sock` and call Register, again after every kubelet restart.
    KubeletSocket,
    /// Serve the plugin watcher's API in `plugins_registry/`; the kubelet finds us, also after
    /// it restarts.
    PluginWatcher,
}

/// The longest path a Unix socket can be bound at: `sun_path` holds 108 bytes, the NUL included.
pub const MAX_SOCKET_PATH: usize = 107;

/// The longest file name we give a socket, a slot's suffix (`~1`) aside. Kept short so that every
/// name the kubelet accepts serves under every kubelet root we document: under MicroK8s's
/// (`/var/snap/microk8s/common/var/lib/kubelet`, 41 bytes) our plugin-watcher socket directory
/// is 73 bytes, leaving 34 of the kernel's 107.
pub const MAX_SOCKET_NAME: usize = 32;

/// File name of a resource's sockets (DevicePlugin and plugin-watcher registration alike), from
/// its full name `<domain>/<name>`: `kdp-<name>.sock` in our own domain, so names stay short and
/// the same across upgrades, and `kdp-<domain>_<name>.sock` in any other, so two instances
/// serving `kvm` in two domains on one node never share a socket. No domain or name holds `_`,
/// so the two forms never meet. A name longer than [`MAX_SOCKET_NAME`] is cut and told apart by
/// a hash of the full name (see [`short_socket_name`]).
pub fn socket_name(resource_name: &str) -> String {
    let (readable, whole) = match resource_name.split_once('/') {
        Some((domain, name)) if domain != DOMAIN => (name, format!("{domain}_{name}")),
        Some((_, name)) => (name, name.to_owned()),
        None => (resource_name, resource_name.to_owned()),
    };
    short_socket_name(&whole, readable, resource_name, MAX_SOCKET_NAME)
}

/// The longest file name of a socket we put in the plugin watcher's directory alone (a DRA
/// driver's registration): that directory is shallower than ours by as much as this allows more.
pub const MAX_REGISTRATION_NAME: usize =
    MAX_SOCKET_NAME + 2 + WATCHER_SOCKET_DIR.len() - REGISTRY_DIR.len();

/// `kdp-<whole>.sock` while that fits in `max` bytes; else `kdp-` and as much of
/// `readable` as fits, a dot, 8 hex digits of a hash of `identity`, and `.sock`: the same on every
/// start, and never another name's, since a plain name holds no dot after its `_` (or none at
/// all) where the hashed one does.
pub fn short_socket_name(whole: &str, readable: &str, identity: &str, max: usize) -> String {
    let plain = format!("{SOCKET_PREFIX}{whole}.sock");
    if plain.len() <= max {
        return plain;
    }
    let hash = format!(
        ".{:08x}.sock",
        crate::device::fnv1a(identity.as_bytes()) as u32
    );
    let room = max - SOCKET_PREFIX.len() - hash.len();
    let cut: String = readable.chars().take(room).collect();
    format!("{SOCKET_PREFIX}{cut}{hash}")
}

/// How many instances may serve one resource at once, each on sockets of its own: a surge
/// rollout's old and new pod. The kubelet (1.37 counts endpoints per socket path) keeps the
/// resource healthy while either serves, so a handover leaves no moment without devices.
pub const SLOTS: usize = 2;

/// File name of a resource's sockets in `slot`: [`socket_name`] for slot 0, `kdp-kvm~1.sock`
/// for slot 1. No domain or name holds `~`, so no slot's name is another resource's.
pub fn slot_socket_name(resource_name: &str, slot: usize) -> String {
    let name = socket_name(resource_name);
    match slot {
        0 => name,
        n => format!("{}~{n}.sock", name.trim_end_matches(".sock")),
    }
}

/// Whether a file name in one of our directories names one of our sockets.
pub fn is_our_socket(name: &std::ffi::OsStr) -> bool {
    name.as_encoded_bytes()
        .starts_with(SOCKET_PREFIX.as_bytes())
}

/// What can fail here. Each variant's `#[error]` message is its documentation.
#[allow(missing_docs)]
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    /// A socket of a resource would not fit in a Unix socket address.
    #[error("{resource}: the socket path {path} would be {len} bytes long while it is bound, over the kernel's {MAX_SOCKET_PATH}: use a shorter resource name or domain, or a kubelet root directory with a shorter path")]
    SocketPath {
        /// The resource.
        resource: String,
        /// The socket's final path.
        path: PathBuf,
        /// Its length under the temporary name used while binding.
        len: usize,
    },
    /// A directory the chosen mode needs is missing or unusable.
    #[error("the directory {path} is not usable (is the kubelet's root directory elsewhere? see --plugin-dir)")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// Why it is not usable.
        #[source]
        source: io::Error,
    },
}

/// Where our sockets live, with the registration mode resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// The kubelet's device-plugin directory, holding `kubelet.sock`.
    pub kubelet_dir: PathBuf,
    /// Our DevicePlugin sockets.
    pub socket_dir: PathBuf,
    /// The plugin watcher's directory, in plugin-watcher mode; `None` in kubelet-socket mode.
    pub registry_dir: Option<PathBuf>,
}

impl Layout {
    /// Resolves `auto` and checks that the directories the mode needs are there, creating our own
    /// socket directory in plugin-watcher mode.
    pub fn resolve(kubelet_dir: &Path, mode: Mode) -> Result<Layout, LayoutError> {
        let root = kubelet_dir.parent().unwrap_or(Path::new("/"));
        let registry_dir = root.join(REGISTRY_DIR);
        let mode = match mode {
            Mode::Auto if registry_dir.is_dir() => Mode::PluginWatcher,
            Mode::Auto => Mode::KubeletSocket,
            explicit => explicit,
        };
        if mode == Mode::KubeletSocket {
            check_dir(kubelet_dir)?;
            check_writable(kubelet_dir)?;
            info!(
                "registering through {}",
                kubelet_dir.join(KUBELET_SOCKET).display()
            );
            return Ok(Layout {
                kubelet_dir: kubelet_dir.to_owned(),
                socket_dir: kubelet_dir.to_owned(),
                registry_dir: None,
            });
        }
        check_dir(&registry_dir)?;
        check_writable(&registry_dir)?;
        let socket_dir = root.join(WATCHER_SOCKET_DIR);
        fs::create_dir_all(&socket_dir).map_err(|source| LayoutError::Dir {
            path: socket_dir.clone(),
            source,
        })?;
        check_writable(&socket_dir)?;
        info!(
            "registering through the kubelet's plugin watcher: registration sockets in {}, device plugin sockets in {}",
            registry_dir.display(),
            socket_dir.display()
        );
        Ok(Layout {
            kubelet_dir: kubelet_dir.to_owned(),
            socket_dir,
            registry_dir: Some(registry_dir),
        })
    }

    /// `kubelet.sock`.
    pub fn kubelet_socket(&self) -> PathBuf {
        self.kubelet_dir.join(KUBELET_SOCKET)
    }

    /// Whether we register by dialing `kubelet.sock` (rather than being found by the plugin
    /// watcher).
    pub fn dials_kubelet(&self) -> bool {
        self.registry_dir.is_none()
    }

    /// How a `RegisterRequest` through `kubelet.sock` names our socket `socket`: relative to the
    /// kubelet's device-plugin directory, which the kubelet joins it to. In plugin-watcher mode
    /// our sockets sit beside that directory, under the same kubelet root. `None` for a socket
    /// outside that root.
    pub fn kubelet_endpoint(&self, socket: &Path) -> Option<String> {
        if let Ok(inside) = socket.strip_prefix(&self.kubelet_dir) {
            return Some(inside.to_str()?.to_owned());
        }
        let beside = socket.strip_prefix(self.kubelet_dir.parent()?).ok()?;
        Some(format!("../{}", beside.to_str()?))
    }

    /// The DevicePlugin socket of the resource in socket slot `slot`.
    pub fn socket_path_in(&self, resource_name: &str, slot: usize) -> PathBuf {
        self.socket_dir.join(slot_socket_name(resource_name, slot))
    }

    /// The plugin-watcher registration socket that announces the DevicePlugin socket `endpoint`,
    /// in plugin-watcher mode: the same file name, in the plugin watcher's directory.
    pub fn registration_path_for(&self, endpoint: &Path) -> Option<PathBuf> {
        let name = endpoint.file_name()?;
        self.registry_dir.as_ref().map(|dir| dir.join(name))
    }

    /// Checks that every socket of the resource can be bound: under its temporary name, which
    /// is longer than the final one, a path over the kernel's limit would fail only when the
    /// server starts, perhaps first on a later restart.
    pub fn check(&self, resource_name: &str) -> Result<(), LayoutError> {
        // The last slot's names are the longest.
        let longest = self.socket_path_in(resource_name, SLOTS - 1);
        let paths = std::iter::once(longest.clone()).chain(self.registration_path_for(&longest));
        for path in paths {
            check_bindable(resource_name, &path)?;
        }
        Ok(())
    }
}

/// Checks that a socket of `owner` (a resource, or a DRA driver) can be bound at `path` and
/// dialled there: a path over the kernel's limit, under its final name or the temporary one it is
/// bound under, would fail only when the server starts, perhaps first on a later restart.
pub fn check_bindable(owner: &str, path: &Path) -> Result<(), LayoutError> {
    let dir = path.parent().map_or(0, |d| d.as_os_str().len());
    let len = path.as_os_str().len().max(dir + 1 + TEMPORARY_NAME_MAX);
    if len > MAX_SOCKET_PATH {
        return Err(LayoutError::SocketPath {
            resource: owner.to_owned(),
            path: path.to_owned(),
            len,
        });
    }
    Ok(())
}

fn check_dir(path: &Path) -> Result<(), LayoutError> {
    let error = |source| LayoutError::Dir {
        path: path.to_owned(),
        source,
    };
    if !fs::metadata(path).map_err(error)?.is_dir() {
        return Err(error(io::Error::new(
            io::ErrorKind::NotADirectory,
            "not a directory",
        )));
    }
    Ok(())
}

/// Whether we can make files in `path`: a read-only mount or a directory we may not write to
/// would otherwise fail every bind and lock, retried forever, instead of one clear error at start.
fn check_writable(path: &Path) -> Result<(), LayoutError> {
    // Hidden, so neither our inotify thread nor the plugin watcher takes it for a socket.
    let probe = path.join(format!(".kdp-write-check.{}", std::process::id()));
    fs::File::create(&probe)
        .and_then(|_| fs::remove_file(&probe))
        .map_err(|source| LayoutError::Dir {
            path: path.to_owned(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_picks_the_plugin_watcher_when_its_directory_exists() {
        let root = tempfile::tempdir().unwrap();
        let kubelet_dir = root.path().join("device-plugins");
        fs::create_dir(&kubelet_dir).unwrap();
        let layout = Layout::resolve(&kubelet_dir, Mode::Auto).unwrap();
        assert!(layout.dials_kubelet());
        assert_eq!(layout.socket_dir, kubelet_dir);
        assert_eq!(
            layout.socket_path_in(KVM, 0),
            kubelet_dir.join("kdp-kvm.sock")
        );
        assert_eq!(
            layout.registration_path_for(&layout.socket_path_in(KVM, 0)),
            None
        );

        fs::create_dir(root.path().join(REGISTRY_DIR)).unwrap();
        let layout = Layout::resolve(&kubelet_dir, Mode::Auto).unwrap();
        assert!(!layout.dials_kubelet());
        assert_eq!(layout.socket_dir, root.path().join(WATCHER_SOCKET_DIR));
        assert!(
            layout.socket_dir.is_dir(),
            "our socket directory is created"
        );
        assert_eq!(
            layout.registration_path_for(&layout.socket_path_in(KVM, 0)),
            Some(root.path().join(REGISTRY_DIR).join("kdp-kvm.sock"))
        );
        assert_eq!(layout.kubelet_socket(), kubelet_dir.join(KUBELET_SOCKET));
    }

    #[test]
    fn kubelet_sock_registrations_name_our_sockets_from_the_device_plugin_directory() {
        let root = tempfile::tempdir().unwrap();
        let kubelet_dir = root.path().join("device-plugins");
        fs::create_dir(&kubelet_dir).unwrap();
        let layout = Layout::resolve(&kubelet_dir, Mode::KubeletSocket).unwrap();
        let socket = layout.socket_path_in(KVM, 1);
        assert_eq!(
            layout.kubelet_endpoint(&socket).as_deref(),
            Some("kdp-kvm~1.sock")
        );

        fs::create_dir(root.path().join(REGISTRY_DIR)).unwrap();
        let layout = Layout::resolve(&kubelet_dir, Mode::PluginWatcher).unwrap();
        let socket = layout.socket_path_in(KVM, 0);
        let endpoint = layout.kubelet_endpoint(&socket).unwrap();
        assert_eq!(endpoint, format!("../{WATCHER_SOCKET_DIR}/kdp-kvm.sock"));
        // Joined as the kubelet joins it, it is our socket.
        fs::write(&socket, "").unwrap();
        assert_eq!(
            kubelet_dir.join(&endpoint).canonicalize().unwrap(),
            socket.canonicalize().unwrap()
        );
        assert_eq!(
            layout.kubelet_endpoint(Path::new("/elsewhere/x.sock")),
            None
        );
    }

    #[test]
    fn an_explicit_mode_needs_its_directory() {
        let root = tempfile::tempdir().unwrap();
        let kubelet_dir = root.path().join("device-plugins");
        let err = Layout::resolve(&kubelet_dir, Mode::KubeletSocket).unwrap_err();
        assert!(err.to_string().contains("device-plugins"), "{err}");
        fs::create_dir(&kubelet_dir).unwrap();
        let err = Layout::resolve(&kubelet_dir, Mode::PluginWatcher).unwrap_err();
        assert!(err.to_string().contains(REGISTRY_DIR), "{err}");
        fs::write(root.path().join(REGISTRY_DIR), b"").unwrap();
        let err = Layout::resolve(&kubelet_dir, Mode::PluginWatcher).unwrap_err();
        assert!(err.to_string().contains("not usable"), "{err}");
    }

    const KVM: &str = "devices.anza-labs.dev/kvm";

    #[test]
    fn socket_names_are_short_in_our_domain_and_carry_any_other() {
        assert_eq!(socket_name(KVM), "kdp-kvm.sock");
        assert_eq!(socket_name("example.com/kvm"), "kdp-example.com_kvm.sock");
        assert_ne!(socket_name("a.b/c"), socket_name("a/b.c"));
    }

    #[test]
    fn each_slot_has_names_of_its_own_that_no_resource_can_spell() {
        assert_eq!(slot_socket_name(KVM, 0), "kdp-kvm.sock");
        assert_eq!(slot_socket_name(KVM, 1), "kdp-kvm~1.sock");
        assert_eq!(
            slot_socket_name("example.com/kvm", 1),
            "kdp-example.com_kvm~1.sock"
        );
        // A resource named like a slot would need a '~', which names never hold.
        assert_ne!(
            slot_socket_name(KVM, 1),
            socket_name("devices.anza-labs.dev/kvm.1")
        );
        assert!(is_our_socket(slot_socket_name(KVM, 1).as_ref()));
    }

    #[test]
    fn long_names_get_short_stable_socket_names_that_stay_apart() {
        let long = format!("{}.example.com/{}", "d".repeat(200), "zigbee-coordinator");
        let name = socket_name(&long);
        assert!(name.len() <= MAX_SOCKET_NAME, "{name}");
        assert!(name.starts_with("kdp-zigbee-coord"), "{name}");
        assert_eq!(name, socket_name(&long));
        assert!(slot_socket_name(&long, 1).len() <= MAX_SOCKET_NAME + 2);
        let other = format!("{}.example.com/{}", "e".repeat(200), "zigbee-coordinator");
        assert_ne!(socket_name(&other), name);
        // Names that fit keep the form earlier releases gave them.
        assert_eq!(
            socket_name("example.com/zigbee"),
            "kdp-example.com_zigbee.sock"
        );
        // A name of the kubelet's longest in our domain.
        let label = format!("{DOMAIN}/{}", "n".repeat(63));
        assert!(socket_name(&label).len() <= MAX_SOCKET_NAME);
    }

    #[test]
    fn sockets_that_cannot_be_bound_are_refused_before_serving() {
        let root = tempfile::tempdir().unwrap();
        let kubelet_dir = root.path().join("device-plugins");
        fs::create_dir(&kubelet_dir).unwrap();
        let layout = Layout::resolve(&kubelet_dir, Mode::KubeletSocket).unwrap();
        assert!(layout.check(KVM).is_ok());
        // Any name fits under a short root; a root too long for the temporary name does not.
        assert!(layout
            .check(&format!("{}/{}", "d".repeat(240), "n".repeat(63)))
            .is_ok());
        let deep = root.path().join("x".repeat(MAX_SOCKET_PATH - 20));
        let deep_dir = deep.join("device-plugins");
        fs::create_dir_all(&deep_dir).unwrap();
        let layout = Layout::resolve(&deep_dir, Mode::KubeletSocket).unwrap();
        let err = layout.check(KVM).unwrap_err();
        assert!(err.to_string().contains("over the kernel's 107"), "{err}");
    }

    #[test]
    fn our_sockets_are_told_apart_by_prefix() {
        assert!(is_our_socket(socket_name(KVM).as_ref()));
        assert!(!is_our_socket("kubelet.sock".as_ref()));
        assert!(!is_our_socket(".kdp.4d2.0".as_ref()));
    }
}
