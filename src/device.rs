//! The device model, one for every resource: what the operator configured (a `Resource`: where its
//! device nodes are, how many containers share each, what containers get with them) and what is on
//! the node right now (the `Device`s found from it), gathered as the [`Inventory`] both frontends
//! serve. Built and refreshed by the control loop (main thread); read by the gRPC handlers through
//! each frontend's snapshot of it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use log::warn;

use crate::proto;
use crate::usb::{self, UsbDevice, UsbMatch};

/// Resource domain of the built-in resources, as in the original Go project.
pub const DOMAIN: &str = "devices.anza-labs.dev";
/// How many containers may share one device when the operator says nothing.
pub const DEFAULT_COUNT: u32 = 10;
/// Most containers that may share one device; keeps device lists within what the kubelet handles.
pub const MAX_COUNT: u32 = 100_000;
/// The kubelet refuses longer device IDs.
pub const MAX_ID_LEN: usize = 63;

/// A built-in resource: its name and its device node, relative to the `/dev` root.
#[derive(Clone, Copy, Debug)]
pub struct Preset {
    /// The resource's short name.
    pub name: &'static str,
    /// Its node's path under `/dev`.
    pub node: &'static str,
}

/// The built-in resources.
pub const PRESETS: &[Preset] = &[
    Preset {
        name: "kvm",
        node: "kvm",
    },
    Preset {
        name: "tun",
        node: "net/tun",
    },
    Preset {
        name: "vhost-net",
        node: "vhost-net",
    },
    Preset {
        name: "vhost-vsock",
        node: "vhost-vsock",
    },
    Preset {
        name: "fuse",
        node: "fuse",
    },
];

/// Looks up a built-in resource by its short name.
/// The built-in resource with this short name.
pub fn preset(name: &str) -> Option<&'static Preset> {
    PRESETS.iter().find(|p| p.name == name)
}

/// The built-ins' names, comma-separated, for messages.
pub fn preset_names() -> String {
    PRESETS
        .iter()
        .map(|p| p.name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// What can fail here. Each variant's `#[error]` message is its documentation.
#[allow(missing_docs)]
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DeviceError {
    #[error(
        "unknown resource {name:?}: the built-in resources are {}",
        preset_names()
    )]
    UnknownResource { name: String },
    #[error("invalid permissions {value:?}: use one or more of r (read), w (write), m (mknod), each at most once")]
    InvalidPermissions { value: String },
    #[error("invalid count {value}: a whole number from 1 to {MAX_COUNT}")]
    InvalidCount { value: u64 },
    #[error("invalid resource name {name:?}: a DNS label (lower-case letters, digits and '-', starting and ending with a letter or digit) of at most {max} characters")]
    InvalidName { name: String, max: usize },
    #[error("invalid domain {domain:?}: a DNS subdomain (lower-case DNS labels separated by dots) of at most 253 characters")]
    InvalidDomain { domain: String },
    #[error("domain {domain:?} is refused by the kubelet: {rule}")]
    RefusedDomain { domain: String, rule: &'static str },
    #[error("{resource} would list {ids} device IDs in {bytes} bytes, over the {limit} bytes the kubelet accepts in one ListAndWatch message: lower its count or its devices")]
    ListTooLarge {
        resource: String,
        ids: u64,
        bytes: u64,
        limit: usize,
    },
}

/// Device cgroup permissions given to a container: a non-empty set of `r`, `w`, `m`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Permissions(String);

impl Default for Permissions {
    fn default() -> Self {
        Permissions("rw".to_owned())
    }
}

impl FromStr for Permissions {
    type Err = DeviceError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let invalid = || DeviceError::InvalidPermissions {
            value: value.to_owned(),
        };
        if value.is_empty() {
            return Err(invalid());
        }
        let mut seen = String::new();
        for c in value.chars() {
            if !"rwm".contains(c) || seen.contains(c) {
                return Err(invalid());
            }
            seen.push(c);
        }
        // Canonical order, so "wr" and "rw" compare and print the same.
        Ok(Permissions(
            "rwm".chars().filter(|c| seen.contains(*c)).collect(),
        ))
    }
}

impl fmt::Display for Permissions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One device node as the host has it and as the container sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceNode {
    /// Where the node is on the host (under `--dev-root`).
    pub host_path: PathBuf,
    /// Where the container sees it.
    pub container_path: PathBuf,
}

/// Where a resource's devices come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// One device made of these nodes, always listed; Unhealthy while any node is missing.
    Fixed(Vec<DeviceNode>),
    /// One device per entry of `dir` whose name matches `pattern`; listed while it exists.
    Glob {
        /// The directory whose entries are matched.
        dir: PathBuf,
        /// The pattern entry names must match (the last path component of the glob).
        pattern: glob::Pattern,
        /// Where matches appear in the container; by default at their host path.
        container_dir: Option<PathBuf>,
    },
    /// One device per USB device that one of `matchers` names, all its nodes together; listed
    /// while it is plugged in.
    Usb {
        /// Who may be taken.
        matchers: Vec<UsbMatch>,
        /// Whether its interfaces' `tty*` and `hidraw*` nodes come with its bus node.
        interfaces: bool,
        /// The host's `/dev`; containers see the nodes under `/dev`.
        dev_root: PathBuf,
    },
}

/// A host directory mounted into containers that get a device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    /// The host directory.
    pub host_path: PathBuf,
    /// Where the container sees it.
    pub container_path: PathBuf,
    /// Whether the container may only read it.
    pub read_only: bool,
}

/// A resource the kubelet schedules, e.g. `devices.anza-labs.dev/kvm`, as configured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resource {
    /// Short name: a DNS label, used in device IDs and in our socket's file name.
    pub name: String,
    /// Full extended resource name, `<domain>/<name>`.
    pub resource_name: String,
    /// Where its devices come from.
    pub sources: Vec<Source>,
    /// How many containers may share each device.
    pub count: u32,
    /// Device cgroup permissions for every node given.
    pub permissions: Permissions,
    /// Host directories mounted into every container that gets a device.
    pub mounts: Vec<Mount>,
    /// Environment variables set in every container that gets a device.
    pub env: BTreeMap<String, String>,
    /// Annotations passed to the runtime with every allocation.
    pub annotations: BTreeMap<String, String>,
    /// Container Device Interface names returned with every allocation.
    pub cdi_devices: Vec<String>,
    /// Whether allocations carry `DeviceSpec`s; off when the runtime injects devices through CDI.
    pub device_specs: bool,
    /// Whether we describe the devices in a CDI spec and allocations name them by CDI name.
    pub cdi: bool,
    /// DRA mode: each device is published once, for up to `count` claims at a time
    /// (`allowMultipleAllocations` and a `slots` capacity, KEP-5075), instead of once per slot.
    pub allow_multiple_allocations: bool,
}

/// A device found on the node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Device {
    /// Device IDs are `<id_prefix>-<slot>`.
    pub id_prefix: String,
    /// Its nodes, all given to a container together.
    pub nodes: Vec<DeviceNode>,
    /// Whether every node is a character or block device node (see [`is_device_node`]).
    pub healthy: bool,
    /// The NUMA node the kernel reports for it, if any.
    pub numa_node: Option<i64>,
    /// The major and minor number of its first node, while that is a device node.
    pub numbers: Option<(u64, u64)>,
    /// Who it is, when it was chosen by identity (`usb 0403:6001 serial A12345 port 1-1.2`).
    pub identity: Option<String>,
}

impl Device {
    /// The device of `nodes` as they are now. Each node is looked at once; the first's look
    /// also gives the device's numbers and NUMA node.
    fn inspect(
        id_prefix: String,
        nodes: Vec<DeviceNode>,
        identity: Option<String>,
        sys_root: &Path,
    ) -> Device {
        let first = nodes.first().and_then(|n| NodeNumbers::of(&n.host_path));
        Device {
            id_prefix,
            healthy: first.is_some() && nodes.iter().skip(1).all(|n| is_device_node(&n.host_path)),
            numa_node: first.and_then(|f| f.numa_node(sys_root)),
            numbers: first.map(|f| (f.major, f.minor)),
            nodes,
            identity,
        }
    }

    /// What the device is, whatever its ID: a USB device's identity (vendor, product, serial,
    /// port), or else the host path of its first node.
    pub fn key(&self) -> String {
        match &self.identity {
            Some(identity) => identity.clone(),
            None => self
                .nodes
                .first()
                .map(|n| n.host_path.to_string_lossy().into_owned())
                .unwrap_or_default(),
        }
    }

    /// The kubelet's word for this device's health.
    pub fn health(&self) -> &'static str {
        health_word(self.healthy)
    }
}

/// The kubelet's word for a health state, as ListAndWatch sends it.
pub fn health_word(healthy: bool) -> &'static str {
    if healthy {
        proto::HEALTHY
    } else {
        proto::UNHEALTHY
    }
}

/// One configured resource with the devices found for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found {
    /// The resource as configured.
    pub resource: std::sync::Arc<Resource>,
    /// Its devices on the node now, with their health.
    pub devices: Vec<Device>,
}

/// The device IDs offered as healthy: each healthy device once per container that may share
/// it. What `kdp_devices{health="Healthy"}` and the node labels say.
pub fn healthy_ids(devices: &[Device], count: u32) -> u64 {
    devices.iter().filter(|d| d.healthy).count() as u64 * u64::from(count)
}

/// The device model both frontends serve: every configured resource with its devices, by
/// resource name. Read once per change by the control loop.
pub type Inventory = BTreeMap<String, Found>;

/// A directory entry whose appearance or disappearance can change a resource's devices.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchTarget {
    /// The directory to watch.
    pub dir: PathBuf,
    /// Which entries of it matter.
    pub name: glob::Pattern,
}

impl Resource {
    /// A resource with the given sources and default extras (no mounts, env or CDI names).
    pub fn new(
        domain: &str,
        name: &str,
        sources: Vec<Source>,
        count: u32,
        permissions: Permissions,
    ) -> Result<Resource, DeviceError> {
        check_domain(domain)?;
        if !(1..=MAX_COUNT).contains(&count) {
            return Err(DeviceError::InvalidCount {
                value: count.into(),
            });
        }
        // Device IDs are "<name>-<slot>" at their shortest; leave room for the largest slot.
        let max = MAX_ID_LEN - 1 - (count - 1).to_string().len();
        if !is_dns_label(name, max) {
            return Err(DeviceError::InvalidName {
                name: name.to_owned(),
                max,
            });
        }
        let resource = Resource {
            name: name.to_owned(),
            resource_name: format!("{domain}/{name}"),
            sources,
            count,
            permissions,
            mounts: Vec::new(),
            env: BTreeMap::new(),
            annotations: BTreeMap::new(),
            cdi_devices: Vec::new(),
            device_specs: true,
            cdi: false,
            allow_multiple_allocations: false,
        };
        // The fixed devices are always listed: they alone must fit. Globs are bounded as they
        // are found (see `devices_with`).
        // The first is named after the resource; the others by their path, perhaps hashed.
        let fixed: Vec<usize> = resource
            .sources
            .iter()
            .filter_map(|s| match s {
                Source::Fixed(nodes) => Some(nodes.first()),
                Source::Glob { .. } | Source::Usb { .. } => None,
            })
            .enumerate()
            .map(|(i, first)| match first {
                Some(node) if i > 0 => {
                    let (preferred, alternate) = resource.path_prefixes(&node.host_path);
                    preferred.len().max(alternate.len())
                }
                _ => name.len(),
            })
            .collect();
        let bytes: u64 = fixed
            .iter()
            .map(|prefix| list_bytes(*prefix, count) as u64)
            .sum();
        if bytes > MAX_LIST_BYTES as u64 {
            return Err(DeviceError::ListTooLarge {
                resource: resource.resource_name,
                ids: fixed.len() as u64 * u64::from(count),
                bytes,
                limit: MAX_LIST_BYTES,
            });
        }
        Ok(resource)
    }

    /// The built-in resource `name`, its node looked up under `dev_root` (normally `/dev`) and
    /// shown to containers at its usual `/dev` path.
    pub fn builtin(
        name: &str,
        dev_root: &Path,
        count: u32,
        permissions: Permissions,
    ) -> Result<Resource, DeviceError> {
        let preset = preset(name).ok_or_else(|| DeviceError::UnknownResource {
            name: name.to_owned(),
        })?;
        Resource::new(
            DOMAIN,
            preset.name,
            vec![preset_source(preset, dev_root)],
            count,
            permissions,
        )
    }

    /// The devices on the node now, in a stable order, with their health and NUMA node; IDs as
    /// a first look gives them (see [`Resource::discover_keeping`]).
    pub fn discover(&self, sys_root: &Path) -> Vec<Device> {
        self.devices_with(sys_root, &GivenIds::new(), glob_matches)
    }

    /// The devices on the node now, each that was `given` an ID keeping it: the ID of a device
    /// that stays present never changes, whatever is configured, plugged or found beside it
    /// (the kubelet and DRA's scheduler would take a changed ID for another, free device).
    pub fn discover_keeping(&self, sys_root: &Path, given: &GivenIds) -> Vec<Device> {
        self.devices_with(sys_root, given, glob_matches)
    }

    /// The devices, with `list` giving each glob's matching entries (sorted); `discover` lists the
    /// real directory. A node found twice is one device. Every device has an ID prefix of its
    /// own: those `given` one keep it; a newcomer gets its own name, or the hashed form when
    /// another device has that already; should both be taken, it is left out (and logged)
    /// rather than listed under an ID the kubelet would count twice.
    pub fn devices_with(
        &self,
        sys_root: &Path,
        given: &GivenIds,
        list: impl Fn(&Path, &glob::Pattern) -> Vec<PathBuf>,
    ) -> Vec<Device> {
        let mut found: Vec<Candidate> = Vec::new();
        let push = |found: &mut Vec<Candidate>, candidate: Candidate| {
            let nodes = &candidate.device.nodes;
            let seen = found.iter().any(|c| {
                c.device
                    .nodes
                    .iter()
                    .any(|n| nodes.iter().any(|m| m.host_path == n.host_path))
            });
            if !seen {
                found.push(candidate);
            }
        };
        let first_fixed = self
            .sources
            .iter()
            .position(|s| matches!(s, Source::Fixed(_)));
        for (index, source) in self.sources.iter().enumerate() {
            match source {
                Source::Fixed(nodes) => {
                    let Some(first) = nodes.first() else {
                        continue;
                    };
                    let (preferred, alternate) = if Some(index) == first_fixed {
                        (self.name.clone(), self.path_prefix(&first.host_path))
                    } else {
                        self.path_prefixes(&first.host_path)
                    };
                    let device = Device::inspect(String::new(), nodes.clone(), None, sys_root);
                    push(&mut found, Candidate::new(device, preferred, alternate));
                }
                Source::Glob {
                    dir,
                    pattern,
                    container_dir,
                } => {
                    for host_path in list(dir, pattern) {
                        let Some(file_name) = host_path.file_name().map(ToOwned::to_owned) else {
                            continue;
                        };
                        let container_path = container_dir
                            .as_ref()
                            .map_or_else(|| host_path.clone(), |d| d.join(&file_name));
                        let (preferred, alternate) = self.path_prefixes(&host_path);
                        let node = DeviceNode {
                            host_path,
                            container_path,
                        };
                        let device = Device::inspect(String::new(), vec![node], None, sys_root);
                        push(&mut found, Candidate::new(device, preferred, alternate));
                    }
                }
                Source::Usb {
                    matchers,
                    interfaces,
                    dev_root,
                } => {
                    for candidate in self.usb_devices(sys_root, matchers, *interfaces, dev_root) {
                        push(&mut found, candidate);
                    }
                }
            }
        }
        self.bound(self.name_devices(found, given))
    }

    /// Gives each candidate its ID prefix: first those that had one keep it, then newcomers
    /// take their own name or, if a device has it already, the alternate.
    fn name_devices(&self, found: Vec<Candidate>, given: &GivenIds) -> Vec<Device> {
        let mut taken: HashSet<String> = HashSet::new();
        let mut names: Vec<Option<String>> = found
            .iter()
            .map(|c| {
                given
                    .get(&c.device.key())
                    .filter(|prefix| self.can_keep(prefix))
                    .filter(|prefix| taken.insert((*prefix).clone()))
                    .cloned()
            })
            .collect();
        for (name, candidate) in names.iter_mut().zip(&found) {
            if name.is_none() {
                *name = [&candidate.preferred, &candidate.alternate]
                    .into_iter()
                    .find(|prefix| taken.insert((*prefix).clone()))
                    .cloned();
            }
        }
        found
            .into_iter()
            .zip(names)
            .filter_map(|(candidate, name)| {
                let mut device = candidate.device;
                let Some(name) = name else {
                    warn!(
                        "{}: {} has the same device ID as another device; leaving it out",
                        self.resource_name,
                        device.nodes[0].host_path.display()
                    );
                    return None;
                };
                device.id_prefix = name;
                Some(device)
            })
            .collect()
    }

    /// Whether a prefix given earlier (perhaps read back from a file) is still one this resource
    /// can list: its own, spelled as IDs are, and short enough for its slots now.
    fn can_keep(&self, prefix: &str) -> bool {
        let ours = prefix == self.name
            || prefix
                .strip_prefix(&self.name)
                .is_some_and(|rest| rest.starts_with('-'));
        let spelled = prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '~'));
        ours && spelled && prefix.len() + 1 + (self.count - 1).to_string().len() <= MAX_ID_LEN
    }

    /// The devices whose list fits in one ListAndWatch message, in order; more found by globs
    /// are left out, loudly, rather than send a list the kubelet would refuse whole (it would
    /// end the stream and mark every device of the resource Unhealthy).
    fn bound(&self, mut devices: Vec<Device>) -> Vec<Device> {
        let mut bytes = 0;
        let fits = devices
            .iter()
            .take_while(|d| {
                bytes += list_bytes(d.id_prefix.len(), self.count);
                bytes <= MAX_LIST_BYTES
            })
            .count();
        if fits < devices.len() {
            warn!(
                "{}: {} devices found, listing the first {fits}: with {} slots each, more would exceed the {MAX_LIST_BYTES} bytes the kubelet accepts in one message",
                self.resource_name,
                devices.len(),
                self.count
            );
            devices.truncate(fits);
        }
        devices
    }

    /// The USB devices that `matchers` name, each named from its identity: vendor, product and
    /// serial, so that it keeps its ID in any port; or vendor, product and port for a device
    /// without a serial, or whose serial another device found has too (clones often share one),
    /// so that it keeps its ID in the same port.
    fn usb_devices(
        &self,
        sys_root: &Path,
        matchers: &[UsbMatch],
        interfaces: bool,
        dev_root: &Path,
    ) -> Vec<Candidate> {
        let found: Vec<UsbDevice> = usb::scan(sys_root, dev_root, interfaces)
            .into_iter()
            .filter(|d| matchers.iter().any(|m| m.matches(d)))
            .collect();
        let shared = |serial: &str| {
            found
                .iter()
                .filter(|d| d.serial.as_deref() == Some(serial))
                .count()
                > 1
        };
        found
            .iter()
            // The bus node is the device: devtmpfs makes it when the device is plugged in and
            // removes it when it goes, while sysfs may show the device a moment longer. Without
            // it the device is not (or no longer) plugged in, so not listed; its interfaces'
            // nodes may come later, and the device is Unhealthy until they do.
            .filter(|d| d.nodes[0].symlink_metadata().is_ok())
            .map(|d| {
                // '.' where a serial key has '-': no serial can make a port key.
                let by_port = format!("{}-{}.port{}", d.vendor, d.product, d.port);
                let port = self.prefix_of(&by_port, format!("usb:{by_port}").as_bytes());
                let (preferred, alternate) = match &d.serial {
                    Some(serial) if !shared(serial) => {
                        let key = format!("{}-{}-{serial}", d.vendor, d.product);
                        (self.prefix_of(&key, format!("usb:{key}").as_bytes()), port)
                    }
                    _ => {
                        let again =
                            self.hashed_prefix(&by_port, format!("usb:{by_port}/2").as_bytes());
                        (port, again)
                    }
                };
                let nodes: Vec<DeviceNode> = d
                    .nodes
                    .iter()
                    .map(|host_path| DeviceNode {
                        container_path: Path::new("/dev")
                            .join(host_path.strip_prefix(dev_root).unwrap_or(host_path)),
                        host_path: host_path.clone(),
                    })
                    .collect();
                let device = Device::inspect(String::new(), nodes, Some(d.describe()), sys_root);
                Candidate::new(device, preferred, alternate)
            })
            .collect()
    }

    /// Whether every node of every fixed device is there.
    pub fn nodes_present(&self) -> bool {
        self.sources.iter().all(|s| match s {
            Source::Fixed(nodes) => nodes.iter().all(|n| is_device_node(&n.host_path)),
            Source::Glob { .. } | Source::Usb { .. } => true,
        })
    }

    /// The name a device found at `host_path` would like, `<name>-<file name>` (see
    /// [`Resource::prefix_of`]), and the hashed form it takes when another device has that.
    fn path_prefixes(&self, host_path: &Path) -> (String, String) {
        (
            self.path_prefix(host_path),
            self.hashed_path_prefix(host_path),
        )
    }

    /// `<name>-<file name>` of the device at `host_path`, by [`Resource::prefix_of`].
    fn path_prefix(&self, host_path: &Path) -> String {
        self.prefix_of(
            &file_name_of(host_path),
            host_path.as_os_str().as_encoded_bytes(),
        )
    }

    /// The hashed prefix of the device at `host_path`: unique to the path.
    fn hashed_path_prefix(&self, host_path: &Path) -> String {
        self.hashed_prefix(
            &file_name_of(host_path),
            host_path.as_os_str().as_encoded_bytes(),
        )
    }

    /// `<name>-<key>`, unique among the IDs this resource gives and short enough for the
    /// kubelet's 63-character IDs with room for any slot ([`PREFIX_ROOM`]), so that no change of
    /// `count` changes it. When a character had to be replaced (`a:b` and `a_b` would meet) or
    /// the whole is too long, it is the hashed form (see [`Resource::hashed_prefix`]). A
    /// prefix depends on the device alone, never on what else is configured or found: two
    /// devices that would meet are told apart when they meet (see `name_devices`).
    fn prefix_of(&self, key: &str, whole: &[u8]) -> String {
        let clean = clean_key(key);
        let prefix = format!("{}-{clean}", self.name);
        if key.is_empty() || clean != key || prefix.len() > PREFIX_ROOM {
            return self.hashed_prefix(key, whole);
        }
        prefix
    }

    /// `<name>-<key>` cut to fit, then `~` and a hash of `whole` (what makes the key unique: a
    /// node's whole path, a USB device's identity). A hashed prefix holds `~`, which no plain one
    /// does, so the two kinds never meet.
    fn hashed_prefix(&self, key: &str, whole: &[u8]) -> String {
        let prefix = format!("{}-{}", self.name, clean_key(key));
        let hash = format!("~{:08x}", fnv1a(whole) as u32);
        // A name near its limit leaves no room for a key: the hash goes after the name.
        let room = PREFIX_ROOM.max(self.name.len() + 1 + hash.len());
        let keep = prefix.len().min(room - hash.len());
        format!("{}{hash}", &prefix[..keep])
    }

    /// Every directory entry whose change can change this resource's devices.
    pub fn watch_targets(&self) -> Vec<WatchTarget> {
        let mut targets = Vec::new();
        for source in &self.sources {
            match source {
                Source::Fixed(nodes) => {
                    // A link's target can go while the link stays: watch both.
                    let paths = nodes.iter().flat_map(|n| {
                        let target = fs::canonicalize(&n.host_path)
                            .ok()
                            .filter(|t| *t != n.host_path);
                        std::iter::once(n.host_path.clone()).chain(target)
                    });
                    for path in paths {
                        if let (Some(dir), Some(name)) = (path.parent(), path.file_name()) {
                            let name =
                                glob::Pattern::new(&glob::Pattern::escape(&name.to_string_lossy()))
                                    .expect("an escaped name is a valid pattern");
                            targets.push(WatchTarget {
                                dir: dir.to_owned(),
                                name,
                            });
                        }
                    }
                }
                Source::Glob { dir, pattern, .. } => targets.push(WatchTarget {
                    dir: dir.clone(),
                    name: pattern.clone(),
                }),
                Source::Usb {
                    interfaces,
                    dev_root,
                    ..
                } => {
                    // sysfs raises no events: a device's nodes appearing and going are the
                    // events, after which sysfs is read again. Buses are watched as they are now;
                    // a new bus (a controller added) is seen at the next reload or SIGHUP.
                    let any = glob::Pattern::new("*").expect("a valid pattern");
                    let bus = dev_root.join("bus/usb");
                    let buses = fs::read_dir(&bus)
                        .into_iter()
                        .flatten()
                        .filter_map(Result::ok);
                    for entry in buses {
                        targets.push(WatchTarget {
                            dir: entry.path(),
                            name: any.clone(),
                        });
                    }
                    targets.push(WatchTarget {
                        dir: bus,
                        name: any,
                    });
                    if *interfaces {
                        for class in ["tty*", "hidraw*"] {
                            targets.push(WatchTarget {
                                dir: dev_root.clone(),
                                name: glob::Pattern::new(class).expect("a valid pattern"),
                            });
                        }
                    }
                }
            }
        }
        targets
    }
}

/// The longest ID prefix we make for a device (the resource's own name aside): the kubelet's
/// 63 characters less `-` and the longest slot number, so that IDs stay when `count` changes.
pub const PREFIX_ROOM: usize = MAX_ID_LEN - 1 - digits(MAX_COUNT - 1);

const fn digits(mut n: u32) -> usize {
    let mut digits = 1;
    while n >= 10 {
        n /= 10;
        digits += 1;
    }
    digits
}

/// The ID prefixes a resource's present devices were given, by what each device is
/// ([`Device::key`]). The control loop's host keeps them between discoveries (and across
/// restarts), so that a device that stays keeps its ID.
pub type GivenIds = BTreeMap<String, String>;

/// What the IDs of `devices` are, for the next discovery.
pub fn given_ids(devices: &[Device]) -> GivenIds {
    devices
        .iter()
        .map(|d| (d.key(), d.id_prefix.clone()))
        .collect()
}

/// A device found, before it is named: the name it would like and the one it takes when
/// another device has that already.
struct Candidate {
    device: Device,
    preferred: String,
    alternate: String,
}

impl Candidate {
    fn new(device: Device, preferred: String, alternate: String) -> Candidate {
        Candidate {
            device,
            preferred,
            alternate,
        }
    }
}

fn file_name_of(host_path: &Path) -> String {
    host_path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// `key` with every character an ID may not hold replaced by `_`.
fn clean_key(key: &str) -> String {
    key.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn preset_source(preset: &Preset, dev_root: &Path) -> Source {
    Source::Fixed(vec![DeviceNode {
        host_path: dev_root.join(preset.node),
        container_path: Path::new("/dev").join(preset.node),
    }])
}

/// The preset's devices as a source, for configuration files that name a preset.
pub fn preset_sources(name: &str, dev_root: &Path) -> Option<Vec<Source>> {
    preset(name).map(|p| vec![preset_source(p, dev_root)])
}

/// Whether `path` is, or is a symbolic link to, a character or block device node: the only
/// kinds of file a runtime can give a container as a device. A socket, a regular file or a
/// dangling link at a device's path is not a device the kubelet may schedule.
pub fn is_device_node(path: &Path) -> bool {
    NodeNumbers::of(path).is_some()
}

/// Entries of `dir` matching `pattern`, sorted; directories are not devices.
fn glob_matches(dir: &Path, pattern: &glob::Pattern) -> Vec<PathBuf> {
    let options = glob::MatchOptions {
        case_sensitive: true,
        require_literal_separator: true,
        require_literal_leading_dot: true,
    };
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .filter(|e| pattern.matches_with(&e.file_name().to_string_lossy(), options))
        .filter(|e| e.file_type().is_ok_and(|t| !t.is_dir()))
        .map(|e| e.path())
        .collect();
    found.sort();
    found
}

/// What one look at a device node tells: its kind and numbers.
#[derive(Clone, Copy, Debug)]
struct NodeNumbers {
    kind: &'static str,
    major: u64,
    minor: u64,
}

impl NodeNumbers {
    /// The numbers of the character or block device node at `path` (a link is followed).
    fn of(path: &Path) -> Option<NodeNumbers> {
        let meta = fs::metadata(path).ok()?;
        let kind = if meta.file_type().is_char_device() {
            "char"
        } else if meta.file_type().is_block_device() {
            "block"
        } else {
            return None;
        };
        Some(NodeNumbers {
            kind,
            major: major(meta.rdev()),
            minor: minor(meta.rdev()),
        })
    }

    /// The NUMA node the kernel reports for the device, if any.
    fn numa_node(self, sys_root: &Path) -> Option<i64> {
        let NodeNumbers { kind, major, minor } = self;
        let text = fs::read_to_string(
            sys_root.join(format!("dev/{kind}/{major}:{minor}/device/numa_node")),
        )
        .ok()?;
        // The kernel writes -1 when the device has no NUMA affinity.
        text.trim().parse::<i64>().ok().filter(|n| *n >= 0)
    }
}

/// Linux's encoding of device numbers (glibc's gnu_dev_major/minor).
pub fn major(rdev: u64) -> u64 {
    ((rdev >> 32) & 0xffff_f000) | ((rdev >> 8) & 0x0000_0fff)
}

/// The minor number of a device number, as `major` does it.
pub fn minor(rdev: u64) -> u64 {
    ((rdev >> 12) & 0xffff_ff00) | (rdev & 0x0000_00ff)
}

pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The full device list for ListAndWatch.
pub fn device_list(devices: &[Device], count: u32) -> proto::ListAndWatchResponse {
    let mut response = proto::ListAndWatchResponse::new();
    for device in devices {
        for slot in 0..count {
            let mut d = proto::Device::new();
            d.ID = format!("{}-{slot}", device.id_prefix);
            d.health = device.health().to_owned();
            if let Some(numa) = device.numa_node {
                let mut node = proto::NUMANode::new();
                node.ID = numa;
                let mut topology = proto::TopologyInfo::new();
                topology.nodes.push(node);
                d.topology = Some(topology).into();
            }
            response.devices.push(d);
        }
    }
    response
}

/// Resolves device IDs to the device behind each.
#[derive(Debug, Default)]
pub struct IdTable {
    prefixes: HashMap<String, usize>,
    count: u32,
}

impl IdTable {
    /// Indexes `devices` by ID prefix, for `count` slots each.
    pub fn new(devices: &[Device], count: u32) -> IdTable {
        IdTable {
            prefixes: devices
                .iter()
                .enumerate()
                .map(|(i, d)| (d.id_prefix.clone(), i))
                .collect(),
            count,
        }
    }

    /// The index of the device behind `id`, and the slot; `None` if no such ID exists.
    pub fn lookup(&self, id: &str) -> Option<(usize, u32)> {
        let (prefix, slot) = id.rsplit_once('-')?;
        // Only the exact spelling we hand out is an ID: not "kvm-01" nor "kvm-+1".
        if slot.is_empty()
            || !slot.bytes().all(|b| b.is_ascii_digit())
            || (slot.len() > 1 && slot.starts_with('0'))
        {
            return None;
        }
        let slot: u32 = slot.parse().ok()?;
        let device = *self.prefixes.get(prefix)?;
        (slot < self.count).then_some((device, slot))
    }
}

/// The kubelet's gRPC client keeps gRPC's default receive limit, 4 MiB: a larger first device
/// list ends the stream.
pub const MAX_LIST_BYTES: usize = 4 * 1024 * 1024;

/// The most bytes one device with this ID prefix length and `count` slots can take in a
/// ListAndWatch message: each entry at its longest, Unhealthy and with a NUMA node.
pub fn list_bytes(prefix_len: usize, count: u32) -> usize {
    use protobuf::Message;
    let entry = |id_len: usize| {
        let mut d = proto::Device::new();
        d.ID = "x".repeat(id_len);
        d.health = proto::UNHEALTHY.to_owned();
        let mut node = proto::NUMANode::new();
        node.ID = i64::MAX;
        let mut topology = proto::TopologyInfo::new();
        topology.nodes.push(node);
        d.topology = Some(topology).into();
        let size = d.compute_size() as usize;
        // The field's tag, and its length as a varint.
        1 + protobuf::rt::compute_raw_varint64_size(size as u64) as usize + size
    };
    // Slots 0-9 have one digit, 10-99 two, and so on: one measurement per digit count.
    let (mut total, mut first, mut digits) = (0, 0_u64, 1);
    while first < u64::from(count) {
        let last = (first * 10).max(10).min(u64::from(count));
        total += (last - first) as usize * entry(prefix_len + 1 + digits);
        first = last;
        digits += 1;
    }
    total
}

/// Checks a domain against the DNS rules and the kubelet's: names in `kubernetes.io` (or any
/// domain ending so: the kubelet looks for `kubernetes.io/` in the name) are native resources to
/// it, names starting `requests.` are quota names, and an extended name must stay a qualified
/// name with `requests.` in front, so the domain may have at most 253 - 9 characters.
pub fn check_domain(domain: &str) -> Result<(), DeviceError> {
    if !is_dns_subdomain(domain) {
        return Err(DeviceError::InvalidDomain {
            domain: domain.to_owned(),
        });
    }
    let rule = if domain.ends_with("kubernetes.io") {
        "names in kubernetes.io and its subdomains are native resources, not extended ones"
    } else if domain.starts_with("requests.") {
        "names starting with \"requests.\" are resource quota names"
    } else if domain.len() > 253 - "requests.".len() {
        "an extended resource name must stay a qualified name with \"requests.\" in front: at most 244 characters of domain"
    } else {
        return Ok(());
    };
    Err(DeviceError::RefusedDomain {
        domain: domain.to_owned(),
        rule,
    })
}

/// A DNS label per RFC 1123, at most `max` characters.
pub fn is_dns_label(name: &str, max: usize) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= max
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes[0] != b'-'
        && bytes[bytes.len() - 1] != b'-'
}

/// A DNS subdomain per RFC 1123: dot-separated labels, at most 253 characters.
pub fn is_dns_subdomain(name: &str) -> bool {
    name.len() <= 253 && name.split('.').all(|label| is_dns_label(label, 63))
}

/// Device nodes for the unit tests of every module.
#[cfg(test)]
pub(crate) mod testing {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    use std::path::Path;

    /// Makes a character device node at `path` with /dev/null's numbers (1:3), as root can; a
    /// symbolic link to /dev/null where mknod is not allowed, which is a device node to every
    /// check that follows links.
    pub fn make_node(path: &Path) {
        let c = CString::new(path.as_os_str().as_bytes()).unwrap();
        // SAFETY: `c` is a valid NUL-terminated path for the duration of the call.
        let made = unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(1, 3)) };
        if made != 0 {
            std::os::unix::fs::symlink("/dev/null", path).unwrap();
        }
    }

    /// Makes a block device node at `path` (7:0, a loop device's numbers) as root can; where
    /// mknod is not allowed, a symbolic link to a block device of this machine. False if neither
    /// can be had.
    pub fn make_block_node(path: &Path) -> bool {
        let c = CString::new(path.as_os_str().as_bytes()).unwrap();
        // SAFETY: `c` is a valid NUL-terminated path for the duration of the call.
        let made = unsafe { libc::mknod(c.as_ptr(), libc::S_IFBLK | 0o660, libc::makedev(7, 0)) };
        if made == 0 {
            return true;
        }
        use std::os::unix::fs::FileTypeExt;
        let block = std::fs::read_dir("/dev").ok().and_then(|entries| {
            entries
                .filter_map(Result::ok)
                .find(|e| e.file_type().is_ok_and(|t| t.is_block_device()))
        });
        block.is_some_and(|e| std::os::unix::fs::symlink(e.path(), path).is_ok())
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{make_block_node, make_node};
    use super::*;

    fn kvm(count: u32) -> Resource {
        Resource::builtin("kvm", Path::new("/dev"), count, Permissions::default()).unwrap()
    }

    fn glob_resource(dir: &Path, pattern: &str, count: u32) -> Resource {
        let source = Source::Glob {
            dir: dir.to_owned(),
            pattern: glob::Pattern::new(pattern).unwrap(),
            container_dir: None,
        };
        Resource::new(
            DOMAIN,
            "serial",
            vec![source],
            count,
            Permissions::default(),
        )
        .unwrap()
    }

    fn ids(devices: &[Device], count: u32) -> Vec<String> {
        device_list(devices, count)
            .devices
            .into_iter()
            .map(|d| d.ID)
            .collect()
    }

    #[test]
    fn builtin_resources_use_the_domain_and_dev_paths() {
        let r = Resource::builtin("tun", Path::new("/tmp/fake-dev"), 3, Permissions::default())
            .unwrap();
        assert_eq!(r.resource_name, "devices.anza-labs.dev/tun");
        let Source::Fixed(nodes) = &r.sources[0] else {
            panic!()
        };
        assert_eq!(nodes[0].host_path, Path::new("/tmp/fake-dev/net/tun"));
        assert_eq!(nodes[0].container_path, Path::new("/dev/net/tun"));
    }

    #[test]
    fn unknown_builtin_is_refused_with_the_list_of_names() {
        let err =
            Resource::builtin("gpu", Path::new("/dev"), 1, Permissions::default()).unwrap_err();
        assert_eq!(err, DeviceError::UnknownResource { name: "gpu".into() });
        assert!(
            err.to_string()
                .contains("kvm, tun, vhost-net, vhost-vsock, fuse"),
            "{err}"
        );
    }

    #[test]
    fn a_single_fixed_device_has_ids_named_after_the_resource() {
        let dir = tempfile::tempdir().unwrap();
        let r = Resource::builtin("kvm", dir.path(), 3, Permissions::default()).unwrap();
        let devices = r.discover(dir.path());
        assert_eq!(ids(&devices, 3), ["kvm-0", "kvm-1", "kvm-2"]);
        assert!(!devices[0].healthy);
        fs::write(dir.path().join("kvm"), b"").unwrap();
        assert!(
            !r.discover(dir.path())[0].healthy,
            "a regular file is not a device node"
        );
        fs::remove_file(dir.path().join("kvm")).unwrap();
        make_node(&dir.path().join("kvm"));
        assert!(r.discover(dir.path())[0].healthy);
    }

    #[test]
    fn counts_out_of_range_are_refused() {
        for count in [0, MAX_COUNT + 1] {
            let err = Resource::builtin("kvm", Path::new("/dev"), count, Permissions::default())
                .unwrap_err();
            assert!(matches!(err, DeviceError::InvalidCount { .. }), "{err}");
        }
    }

    #[test]
    fn names_leave_room_for_the_slot_within_63_characters() {
        // With 1000 slots the longest ID is "<name>-999": the name may have 59 characters.
        let fixed = || vec![Source::Fixed(vec![])];
        assert!(Resource::new(
            DOMAIN,
            &"a".repeat(59),
            fixed(),
            1000,
            Permissions::default()
        )
        .is_ok());
        let err = Resource::new(
            DOMAIN,
            &"a".repeat(60),
            fixed(),
            1000,
            Permissions::default(),
        )
        .unwrap_err();
        assert!(
            matches!(err, DeviceError::InvalidName { max: 59, .. }),
            "{err:?}"
        );
    }

    #[test]
    fn domains_the_kubelet_refuses_are_refused() {
        for bad in [
            "kubernetes.io",
            "devices.kubernetes.io",
            "mykubernetes.io",
            "requests.example.com",
            &format!("{}com", "a.".repeat(122)),
        ] {
            let err = Resource::new(bad, "kvm", vec![], 1, Permissions::default()).unwrap_err();
            assert!(
                matches!(err, DeviceError::RefusedDomain { .. }),
                "{bad:?}: {err:?}"
            );
        }
        for good in ["k8s.io", "kubernetes.io.example.com", "example.com"] {
            assert!(check_domain(good).is_ok(), "{good:?}");
        }
    }

    #[test]
    fn device_lists_are_measured_and_bounded() {
        use protobuf::Message;
        // The bound is the real encoded size at its worst: every entry Unhealthy, with a NUMA node.
        let mut devices = kvm(1000).discover(Path::new("/nonexistent"));
        devices[0].numa_node = Some(i64::MAX);
        devices[0].healthy = false;
        let real = device_list(&devices, 1000).compute_size() as usize;
        assert_eq!(list_bytes("kvm".len(), 1000), real);
        // One device with the most slots fits; a fixed source too many for one message does not.
        assert!(list_bytes("kvm".len(), MAX_COUNT) <= MAX_LIST_BYTES);
        let node = |i: usize| {
            Source::Fixed(vec![DeviceNode {
                host_path: PathBuf::from(format!("/dev/d{i}")),
                container_path: PathBuf::from(format!("/dev/d{i}")),
            }])
        };
        let err = Resource::new(
            DOMAIN,
            "many",
            (0..100).map(node).collect(),
            MAX_COUNT,
            Permissions::default(),
        )
        .unwrap_err();
        assert!(matches!(err, DeviceError::ListTooLarge { .. }), "{err:?}");
        // A glob that finds more than fits lists what fits.
        let dir = tempfile::tempdir().unwrap();
        let r = glob_resource(dir.path(), "*", 10_000);
        let found = r.devices_with(dir.path(), &GivenIds::new(), |_, _| {
            (0..200).map(|i| dir.path().join(format!("n{i}"))).collect()
        });
        assert!(found.len() < 200 && !found.is_empty(), "{}", found.len());
        let size = device_list(&found, 10_000).compute_size() as usize;
        assert!(size <= MAX_LIST_BYTES, "{size}");
    }

    #[test]
    fn names_and_domains_follow_kubernetes_rules() {
        for bad in ["", "KVM", "-kvm", "kvm-", "kv_m", "kvm/x"] {
            assert!(!is_dns_label(bad, 63), "{bad:?} accepted");
        }
        for good in ["kvm", "vhost-net", "a1", "9"] {
            assert!(is_dns_label(good, 63), "{good:?} refused");
        }
        assert!(is_dns_subdomain("devices.example.com"));
        for bad in ["", "Example.com", "a..b", ".a", "a_b.com"] {
            assert!(!is_dns_subdomain(bad), "{bad:?} accepted");
        }
    }

    #[test]
    fn globs_give_one_device_per_match_with_stable_ids() {
        let dir = tempfile::tempdir().unwrap();
        let r = glob_resource(dir.path(), "ttyUSB*", 2);
        assert!(r.discover(dir.path()).is_empty());
        make_node(&dir.path().join("ttyUSB1"));
        make_node(&dir.path().join("ttyUSB0"));
        make_node(&dir.path().join("ttyS0"));
        fs::create_dir(dir.path().join("ttyUSBdir")).unwrap();
        let devices = r.discover(dir.path());
        assert_eq!(
            ids(&devices, 2),
            [
                "serial-ttyUSB0-0",
                "serial-ttyUSB0-1",
                "serial-ttyUSB1-0",
                "serial-ttyUSB1-1"
            ]
        );
        assert_eq!(
            devices[1].nodes[0].container_path,
            dir.path().join("ttyUSB1")
        );
        // Removing one leaves the other's IDs unchanged.
        fs::remove_file(dir.path().join("ttyUSB0")).unwrap();
        assert_eq!(
            ids(&r.discover(dir.path()), 2),
            ["serial-ttyUSB1-0", "serial-ttyUSB1-1"]
        );
    }

    #[test]
    fn long_or_odd_file_names_make_safe_distinct_ids() {
        let dir = tempfile::tempdir().unwrap();
        let r = glob_resource(dir.path(), "*", 100);
        let long_a = format!("{}a", "x".repeat(80));
        let long_b = format!("{}b", "x".repeat(80));
        for name in [long_a.as_str(), long_b.as_str(), "odd name:1"] {
            make_node(&dir.path().join(name));
        }
        let all = ids(&r.discover(dir.path()), 100);
        assert!(all.iter().all(|id| id.len() <= MAX_ID_LEN), "{all:?}");
        assert!(all
            .iter()
            .any(|id| id.starts_with("serial-odd_name_1~") && id.ends_with("-99")));
        let distinct: std::collections::HashSet<&String> = all.iter().collect();
        assert_eq!(distinct.len(), all.len(), "{all:?}");
    }

    fn ids_of(r: &Resource) -> Vec<String> {
        ids(&r.discover(Path::new("/nonexistent")), r.count)
    }

    fn assert_unique(all: &[String]) {
        let distinct: HashSet<&String> = all.iter().collect();
        assert_eq!(distinct.len(), all.len(), "duplicate IDs in {all:?}");
        assert!(all.iter().all(|id| id.len() <= MAX_ID_LEN), "{all:?}");
    }

    /// The ID prefixes of the resource's devices, in order.
    fn prefixes(r: &Resource, sys: &Path) -> Vec<String> {
        r.discover(sys).into_iter().map(|d| d.id_prefix).collect()
    }

    /// A USB resource over a fake sysfs and a `/dev` root of real device nodes.
    fn usb_resource(dev: &Path, matchers: &[(&str, &str, Option<&str>)]) -> Resource {
        let matchers = matchers
            .iter()
            .map(|(v, p, s)| UsbMatch::new(v, p, *s).unwrap())
            .collect();
        let source = Source::Usb {
            matchers,
            interfaces: true,
            dev_root: dev.to_owned(),
        };
        Resource::new(DOMAIN, "serial", vec![source], 1, Permissions::default()).unwrap()
    }

    fn plug(sys: &Path, dev: &Path, port: &str, serial: Option<&str>, bus: (u32, u32), tty: &str) {
        usb::testing::add_usb(sys, port, ("0403", "6001"), serial, bus, &[tty], &[]);
        let dir = dev.join(format!("bus/usb/{:03}", bus.0));
        fs::create_dir_all(&dir).unwrap();
        make_node(&dir.join(format!("{:03}", bus.1)));
        make_node(&dev.join(tty));
    }

    /// What the kernel does on unplug: the sysfs entry and the nodes go.
    fn unplug(sys: &Path, dev: &Path, port: &str, bus: (u32, u32), tty: &str) {
        usb::testing::remove_usb(sys, port);
        fs::remove_file(dev.join(format!("bus/usb/{:03}/{:03}", bus.0, bus.1))).unwrap();
        fs::remove_file(dev.join(tty)).unwrap();
    }

    #[test]
    fn usb_devices_are_chosen_by_identity_with_all_their_nodes_and_ids_from_it() {
        let (sys, dev) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        plug(
            sys.path(),
            dev.path(),
            "1-1.2",
            Some("A12345"),
            (1, 4),
            "ttyUSB0",
        );
        plug(sys.path(), dev.path(), "1-3", None, (1, 9), "ttyUSB1");
        // Another vendor's stick, which no matcher names.
        usb::testing::add_usb(
            sys.path(),
            "2-1",
            ("1a86", "7523"),
            None,
            (2, 2),
            &["ttyUSB2"],
            &[],
        );
        let r = usb_resource(dev.path(), &[("0403", "6001", None)]);
        let found = r.discover(sys.path());
        let prefixes: Vec<&str> = found.iter().map(|d| d.id_prefix.as_str()).collect();
        assert_eq!(
            prefixes,
            ["serial-0403-6001-A12345", "serial-0403-6001.port1-3"]
        );
        let first = &found[0];
        assert!(first.healthy);
        let paths: Vec<(&Path, &Path)> = first
            .nodes
            .iter()
            .map(|n| (n.host_path.as_path(), n.container_path.as_path()))
            .collect();
        assert_eq!(
            paths,
            [
                (
                    dev.path().join("bus/usb/001/004").as_path(),
                    Path::new("/dev/bus/usb/001/004")
                ),
                (
                    dev.path().join("ttyUSB0").as_path(),
                    Path::new("/dev/ttyUSB0")
                ),
            ]
        );
        assert_eq!(
            first.identity.as_deref(),
            Some("usb 0403:6001 serial A12345 port 1-1.2")
        );
        // The serial narrows the choice to one adapter.
        let one = usb_resource(dev.path(), &[("0403", "6001", Some("A12345"))]);
        assert_eq!(one.discover(sys.path()).len(), 1);
        // Two matchers naming one device give it once.
        let both = usb_resource(
            dev.path(),
            &[("0403", "6001", Some("A12345")), ("0403", "6001", None)],
        );
        assert_eq!(both.discover(sys.path()).len(), 2);
    }

    #[test]
    fn a_replugged_usb_device_keeps_its_id_by_serial_in_any_port_or_by_port_without_one() {
        let (sys, dev) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let r = usb_resource(dev.path(), &[("0403", "6001", None)]);
        plug(
            sys.path(),
            dev.path(),
            "1-1",
            Some("A12345"),
            (1, 4),
            "ttyUSB0",
        );
        plug(sys.path(), dev.path(), "1-2", None, (1, 5), "ttyUSB1");
        let before = prefixes(&r, sys.path());
        // Unplugged: gone from the list, not Unhealthy.
        unplug(sys.path(), dev.path(), "1-1", (1, 4), "ttyUSB0");
        unplug(sys.path(), dev.path(), "1-2", (1, 5), "ttyUSB1");
        assert!(r.discover(sys.path()).is_empty());
        // The serial adapter comes back in another port with another device number and tty;
        // the one without a serial in the same port, renumbered.
        plug(
            sys.path(),
            dev.path(),
            "2-4",
            Some("A12345"),
            (2, 7),
            "ttyUSB3",
        );
        plug(sys.path(), dev.path(), "1-2", None, (1, 11), "ttyUSB0");
        let after = r.discover(sys.path());
        let after_ids: Vec<&str> = after.iter().map(|d| d.id_prefix.as_str()).collect();
        assert_eq!(after_ids, [before[1].as_str(), before[0].as_str()]);
        let serial = after.iter().find(|d| d.id_prefix == before[0]).unwrap();
        assert_eq!(serial.nodes[1].container_path, Path::new("/dev/ttyUSB3"));
    }

    /// The ID prefixes of two adapters of one model in ports 1-1 and 1-2, with these serials.
    fn two_adapters(serials: [Option<&str>; 2]) -> Vec<String> {
        let (sys, dev) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        plug(sys.path(), dev.path(), "1-1", serials[0], (1, 4), "ttyUSB0");
        plug(sys.path(), dev.path(), "1-2", serials[1], (1, 5), "ttyUSB1");
        let r = usb_resource(dev.path(), &[("0403", "6001", None)]);
        prefixes(&r, sys.path())
    }

    #[test]
    fn a_serial_spelled_like_a_port_key_never_meets_a_device_without_one() {
        assert_eq!(
            two_adapters([None, Some("port1-1")]),
            ["serial-0403-6001.port1-1", "serial-0403-6001-port1-1"]
        );
    }

    #[test]
    fn usb_clones_that_share_a_serial_get_ids_by_port_and_stay_distinct() {
        assert_eq!(
            two_adapters([Some("A50285BI"), Some("A50285BI")]),
            ["serial-0403-6001.port1-1", "serial-0403-6001.port1-2"]
        );
    }

    #[test]
    fn a_usb_device_is_listed_while_its_bus_node_exists_healthy_once_all_are() {
        let (sys, dev) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        usb::testing::add_usb(
            sys.path(),
            "1-1",
            ("0403", "6001"),
            None,
            (1, 4),
            &["ttyUSB0"],
            &[],
        );
        fs::create_dir_all(dev.path().join("bus/usb/001")).unwrap();
        let r = usb_resource(dev.path(), &[("0403", "6001", None)]);
        assert!(
            r.discover(sys.path()).is_empty(),
            "not plugged in until its bus node is there"
        );
        make_node(&dev.path().join("bus/usb/001/004"));
        assert!(
            !r.discover(sys.path())[0].healthy,
            "its tty node is not there yet"
        );
        make_node(&dev.path().join("ttyUSB0"));
        assert!(r.discover(sys.path())[0].healthy);
        // Unplugged: whether sysfs or the nodes go first, it leaves the list with its bus node.
        fs::remove_file(dev.path().join("bus/usb/001/004")).unwrap();
        assert!(r.discover(sys.path()).is_empty());
        let targets = r.watch_targets();
        let watches =
            |dir: &Path, name: &str| targets.iter().any(|t| t.dir == dir && t.name.matches(name));
        assert!(watches(&dev.path().join("bus/usb/001"), "004"));
        assert!(watches(&dev.path().join("bus/usb"), "002"));
        assert!(watches(dev.path(), "ttyUSB0"));
        assert!(watches(dev.path(), "hidraw3"));
        assert!(!watches(dev.path(), "sda"));
    }

    #[test]
    fn block_device_nodes_are_healthy_devices() {
        let dev = tempfile::tempdir().unwrap();
        let disk = dev.path().join("sdb");
        if !make_block_node(&disk) {
            eprintln!("no block device node can be made or found here; nothing to check");
            return;
        }
        assert!(is_device_node(&disk));
        let r = Resource::new(
            DOMAIN,
            "disk",
            vec![Source::Fixed(vec![DeviceNode {
                host_path: disk.clone(),
                container_path: "/dev/sdb".into(),
            }])],
            1,
            "rwm".parse().unwrap(),
        )
        .unwrap();
        let found = r.discover(Path::new("/nonexistent"));
        assert!(found[0].healthy);
    }

    #[test]
    fn globs_over_directories_with_the_same_file_names_give_distinct_stable_ids() {
        // /dev/bus/usb/001/001 and /dev/bus/usb/002/001: the same file name in two directories.
        let dev = tempfile::tempdir().unwrap();
        let mut sources = Vec::new();
        for bus in ["001", "002"] {
            let dir = dev.path().join(bus);
            fs::create_dir(&dir).unwrap();
            make_node(&dir.join("001"));
            make_node(&dir.join("002"));
            sources.push(Source::Glob {
                dir,
                pattern: glob::Pattern::new("*").unwrap(),
                container_dir: None,
            });
        }
        let make =
            || Resource::new(DOMAIN, "usb", sources.clone(), 3, Permissions::default()).unwrap();
        let all = ids_of(&make());
        assert_eq!(all.len(), 4 * 3, "{all:?}");
        assert_unique(&all);
        // A node keeps its ID whatever else comes or goes: 002/001 does not take the name
        // 001/001 leaves.
        let first = make().discover(Path::new("/nonexistent"));
        fs::remove_file(dev.path().join("001/001")).unwrap();
        let later = make().discover_keeping(Path::new("/nonexistent"), &given_ids(&first));
        assert_eq!(later.len(), 3);
        for device in &later {
            let before = first.iter().find(|d| d.key() == device.key()).unwrap();
            assert_eq!(device.id_prefix, before.id_prefix);
        }
    }

    /// Each device's key and ID prefix, as a discovery keeping `given` names them.
    fn named(r: &Resource, sys: &Path, given: &GivenIds) -> GivenIds {
        given_ids(&r.discover_keeping(sys, given))
    }

    #[test]
    fn a_device_keeps_its_id_when_sources_are_added_or_count_crosses_a_power_of_ten() {
        let dev = tempfile::tempdir().unwrap();
        let sys = Path::new("/nonexistent");
        let long = format!("ttyUSB{}", "0".repeat(48));
        make_node(&dev.path().join(&long));
        make_node(&dev.path().join("ttyACM0"));
        make_node(&dev.path().join("kvm"));
        let glob = |pattern: &str| Source::Glob {
            dir: dev.path().to_owned(),
            pattern: glob::Pattern::new(pattern).unwrap(),
            container_dir: None,
        };
        let fixed = Source::Fixed(vec![DeviceNode {
            host_path: dev.path().join("kvm"),
            container_path: "/dev/kvm".into(),
        }]);
        let make = |sources: Vec<Source>, count| {
            Resource::new(DOMAIN, "serial", sources, count, Permissions::default()).unwrap()
        };
        let one = named(
            &make(vec![fixed.clone(), glob("ttyUSB*")], 9),
            sys,
            &GivenIds::new(),
        );
        // A second glob, another fixed device in front, and count 9 to 1000: every device
        // there before keeps its ID; only the newcomer is named.
        let tty = dev.path().join("tty0");
        make_node(&tty);
        let other = Source::Fixed(vec![DeviceNode {
            host_path: tty.clone(),
            container_path: "/dev/tty0".into(),
        }]);
        let r = make(vec![other, fixed, glob("ttyUSB*"), glob("ttyACM*")], 1000);
        let more = named(&r, sys, &one);
        for (key, prefix) in &one {
            assert_eq!(more.get(key), Some(prefix), "{one:?} then {more:?}");
        }
        assert_eq!(more.len(), 4);
        let devices = r.discover_keeping(sys, &more);
        assert!(devices.iter().all(|d| d.id_prefix.len() + 4 <= MAX_ID_LEN));
        // Removed again: what stays keeps its ID.
        let fewer = named(&make(vec![glob("ttyUSB*")], 10), sys, &more);
        assert_eq!(fewer.len(), 1);
        for (key, prefix) in &fewer {
            assert_eq!(more.get(key), Some(prefix));
        }
    }

    #[test]
    fn a_usb_clone_plugged_beside_a_device_leaves_its_id_going_and_coming() {
        let (sys, dev) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let r = usb_resource(dev.path(), &[("0403", "6001", None)]);
        plug(
            sys.path(),
            dev.path(),
            "1-1",
            Some("A50285BI"),
            (1, 4),
            "ttyUSB0",
        );
        let alone = named(&r, sys.path(), &GivenIds::new());
        assert_eq!(
            alone.values().collect::<Vec<_>>(),
            ["serial-0403-6001-A50285BI"]
        );
        plug(
            sys.path(),
            dev.path(),
            "1-2",
            Some("A50285BI"),
            (1, 5),
            "ttyUSB1",
        );
        let beside = named(&r, sys.path(), &alone);
        let (key, id) = alone.iter().next().unwrap();
        assert_eq!(beside.get(key), Some(id), "{beside:?}");
        assert_eq!(beside.len(), 2);
        assert!(beside.values().any(|p| p == "serial-0403-6001.port1-2"));
        unplug(sys.path(), dev.path(), "1-2", (1, 5), "ttyUSB1");
        assert_eq!(named(&r, sys.path(), &beside), alone);
        // Clones found together at a first look are both named by port; unplugging one leaves
        // the other's.
        plug(
            sys.path(),
            dev.path(),
            "1-2",
            Some("A50285BI"),
            (1, 6),
            "ttyUSB1",
        );
        let both = named(&r, sys.path(), &GivenIds::new());
        unplug(sys.path(), dev.path(), "1-1", (1, 4), "ttyUSB0");
        let left = named(&r, sys.path(), &both);
        assert_eq!(
            left.values().collect::<Vec<_>>(),
            ["serial-0403-6001.port1-2"]
        );
    }

    #[test]
    fn fixed_paths_with_the_same_file_name_give_distinct_ids() {
        let dev = tempfile::tempdir().unwrap();
        let node = |dir: &str| {
            let host_path = dev.path().join(dir).join("ttyACM0");
            Source::Fixed(vec![DeviceNode {
                container_path: host_path.clone(),
                host_path,
            }])
        };
        let r = Resource::new(
            DOMAIN,
            "serial",
            vec![node("a"), node("b")],
            2,
            Permissions::default(),
        )
        .unwrap();
        let all = ids_of(&r);
        assert_eq!(all.len(), 4, "{all:?}");
        assert_unique(&all);
    }

    #[test]
    fn names_that_differ_only_in_replaced_characters_give_distinct_ids() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["a:b", "a_b", "a b", "a-b", "é"] {
            make_node(&dir.path().join(name));
        }
        let r = glob_resource(dir.path(), "*", 1);
        let all = ids(&r.discover(dir.path()), 1);
        assert_eq!(all.len(), 5, "{all:?}");
        assert_unique(&all);
        // Names an ID can hold as they are stay readable.
        assert!(all.contains(&"serial-a_b-0".to_owned()), "{all:?}");
        assert!(all.contains(&"serial-a-b-0".to_owned()), "{all:?}");
    }

    #[test]
    fn only_character_and_block_nodes_are_healthy() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kvm");
        let r = Resource::builtin("kvm", dir.path(), 1, Permissions::default()).unwrap();
        let healthy = || r.discover(dir.path())[0].healthy;
        fs::create_dir(&path).unwrap();
        assert!(!healthy(), "a directory");
        fs::remove_dir(&path).unwrap();
        let _listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        assert!(!healthy(), "a socket");
        fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(dir.path().join("gone"), &path).unwrap();
        assert!(!healthy(), "a dangling link");
        fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(dir.path(), &path).unwrap();
        assert!(!healthy(), "a link to a directory");
        fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink("/dev/null", &path).unwrap();
        assert!(healthy(), "a link to a character device");
        fs::remove_file(&path).unwrap();
        make_node(&path);
        assert!(healthy(), "a character device");
        fs::remove_file(&path).unwrap();
        let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
        // SAFETY: a valid path for the duration of the call.
        if unsafe { libc::mknod(c.as_ptr(), libc::S_IFBLK | 0o600, libc::makedev(7, 0)) } == 0 {
            assert!(healthy(), "a block device");
        }
    }

    #[test]
    fn numa_node_comes_from_sysfs_for_char_devices() {
        let dev = tempfile::tempdir().unwrap();
        let sys = tempfile::tempdir().unwrap();
        // /dev/null is character device 1:3 on every Linux machine.
        std::os::unix::fs::symlink("/dev/null", dev.path().join("kvm")).unwrap();
        let r = Resource::builtin("kvm", dev.path(), 1, Permissions::default()).unwrap();
        assert_eq!(r.discover(sys.path())[0].numa_node, None);
        let dir = sys.path().join("dev/char/1:3/device");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("numa_node"), "-1\n").unwrap();
        assert_eq!(r.discover(sys.path())[0].numa_node, None);
        fs::write(dir.join("numa_node"), "1\n").unwrap();
        let devices = r.discover(sys.path());
        assert_eq!(devices[0].numa_node, Some(1));
        let list = device_list(&devices, 1);
        assert_eq!(list.devices[0].topology.nodes[0].ID, 1);
    }

    #[test]
    fn the_model_keeps_the_numbers_of_a_device_node_and_forgets_them_when_it_goes() {
        let dev = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("/dev/null", dev.path().join("kvm")).unwrap();
        let r = Resource::builtin("kvm", dev.path(), 1, Permissions::default()).unwrap();
        let found = r.discover(Path::new("/nonexistent"));
        assert_eq!(found[0].numbers, Some((1, 3)), "/dev/null is 1:3");
        fs::remove_file(dev.path().join("kvm")).unwrap();
        fs::write(dev.path().join("kvm"), b"").unwrap();
        let found = r.discover(Path::new("/nonexistent"));
        assert_eq!((found[0].healthy, found[0].numbers), (false, None));
    }

    #[test]
    fn id_lookup_accepts_only_ids_we_hand_out() {
        let r = kvm(10);
        let table = IdTable::new(&r.discover(Path::new("/nonexistent")), 10);
        assert_eq!(table.lookup("kvm-0"), Some((0, 0)));
        assert_eq!(table.lookup("kvm-9"), Some((0, 9)));
        for bad in [
            "kvm-10",
            "kvm-01",
            "kvm-",
            "kvm",
            "tun-1",
            "kvm--1",
            "kvm-+1",
            "",
            "kvm-99999999999999999999",
        ] {
            assert_eq!(table.lookup(bad), None, "{bad:?} accepted");
        }
    }

    #[test]
    fn permissions_accept_rwm_sets_in_any_order() {
        assert_eq!("wr".parse::<Permissions>().unwrap().to_string(), "rw");
        assert_eq!("mwr".parse::<Permissions>().unwrap().to_string(), "rwm");
        assert_eq!("r".parse::<Permissions>().unwrap().to_string(), "r");
        for bad in ["", "rr", "x", "rwx", "R"] {
            assert!(bad.parse::<Permissions>().is_err(), "{bad:?} accepted");
        }
    }

    /// glibc's gnu_dev_makedev, to check the decoding against.
    fn makedev(major: u64, minor: u64) -> u64 {
        ((major & 0xfff) << 8) | ((major & !0xfff) << 32) | (minor & 0xff) | ((minor & !0xff) << 12)
    }

    #[test]
    fn device_numbers_decode_like_glibc() {
        // /dev/kvm is 10:232 in the old 16-bit encoding.
        assert_eq!((major(0x0ae8), minor(0x0ae8)), (10, 232));
        for (ma, mi) in [
            (0, 0),
            (10, 232),
            (259, 65536),
            (0xfff_ffff, 0xffff_ffff),
            (4095, 255),
        ] {
            let dev = makedev(ma, mi);
            assert_eq!(
                (major(dev), minor(dev)),
                (ma, mi),
                "{ma}:{mi} encoded as {dev:#x}"
            );
        }
    }

    #[test]
    fn a_linked_node_is_watched_at_the_link_and_at_its_target() {
        let dev = tempfile::tempdir().unwrap();
        fs::create_dir_all(dev.path().join("serial/by-id")).unwrap();
        make_node(&dev.path().join("ttyUSB0"));
        let link = dev.path().join("serial/by-id/usb-FTDI-if00");
        std::os::unix::fs::symlink(dev.path().join("ttyUSB0"), &link).unwrap();
        let r = Resource::new(
            DOMAIN,
            "ftdi",
            vec![Source::Fixed(vec![DeviceNode {
                host_path: link.clone(),
                container_path: "/dev/ttyUSB0".into(),
            }])],
            1,
            Permissions::default(),
        )
        .unwrap();
        let dirs: Vec<PathBuf> = r.watch_targets().into_iter().map(|t| t.dir).collect();
        let target_dir = fs::canonicalize(dev.path()).unwrap();
        assert!(dirs.contains(&dev.path().join("serial/by-id")), "{dirs:?}");
        assert!(dirs.contains(&target_dir), "{dirs:?}");
        assert!(r.discover(dev.path())[0].healthy);
        // The target goes, the link stays: Unhealthy.
        fs::remove_file(dev.path().join("ttyUSB0")).unwrap();
        assert!(!r.discover(dev.path())[0].healthy);
    }

    #[test]
    fn watch_targets_name_each_node_and_glob() {
        let dir = tempfile::tempdir().unwrap();
        let tun = Resource::builtin("tun", dir.path(), 1, Permissions::default()).unwrap();
        assert_eq!(
            tun.watch_targets(),
            [WatchTarget {
                dir: dir.path().join("net"),
                name: glob::Pattern::new("tun").unwrap()
            }]
        );
        let serial = glob_resource(dir.path(), "ttyUSB[0-9]*", 1);
        let targets = serial.watch_targets();
        assert!(targets[0].name.matches("ttyUSB3") && !targets[0].name.matches("ttyS3"));
    }
}
