//! The device model: which device nodes a resource hands out, under which IDs, and whether they are
//! present. Built on the main thread from the command line; read by every thread afterwards.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::proto;

/// Resource domain of the built-in resources, as in the original Go project.
pub const DOMAIN: &str = "devices.anza-labs.dev";
/// How many containers may share one device when the operator says nothing.
pub const DEFAULT_COUNT: u32 = 10;
/// The kubelet refuses longer device IDs.
pub const MAX_ID_LEN: usize = 63;
/// Our socket files all start with this, so we can tell them from other plugins' sockets.
pub const SOCKET_PREFIX: &str = "kdp-";

/// A built-in resource: its name and its device node, relative to the `/dev` root.
#[derive(Clone, Copy, Debug)]
pub struct Preset {
    pub name: &'static str,
    pub node: &'static str,
}

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
pub fn preset(name: &str) -> Option<&'static Preset> {
    PRESETS.iter().find(|p| p.name == name)
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DeviceError {
    #[error(
        "unknown resource {name:?}: the built-in resources are {}",
        preset_names()
    )]
    UnknownResource { name: String },
    #[error("invalid permissions {value:?}: use one or more of r (read), w (write), m (mknod), each at most once")]
    InvalidPermissions { value: String },
    #[error("invalid count {value:?} for {resource}: a whole number from 1 to {max}")]
    InvalidCount {
        resource: String,
        value: String,
        max: u32,
    },
    #[error("resource name {name:?} is not a DNS label (lower-case letters, digits and '-', starting and ending with a letter or digit, at most {max} characters)")]
    InvalidName { name: String, max: usize },
}

fn preset_names() -> String {
    PRESETS
        .iter()
        .map(|p| p.name)
        .collect::<Vec<_>>()
        .join(", ")
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
pub struct Node {
    pub host_path: PathBuf,
    pub container_path: PathBuf,
}

/// One physical device: the nodes a container gets together, shared by up to `count` containers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Device {
    /// Device IDs are `<id_prefix>-<slot>`.
    pub id_prefix: String,
    pub nodes: Vec<Node>,
}

impl Device {
    /// A device is present when every one of its nodes exists.
    pub fn is_present(&self) -> bool {
        self.nodes.iter().all(|n| n.host_path.exists())
    }
}

/// A resource the kubelet schedules, e.g. `devices.anza-labs.dev/kvm`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resource {
    /// Short name: a DNS label, used in device IDs and in our socket's file name.
    pub name: String,
    /// Full extended resource name, `<domain>/<name>`.
    pub resource_name: String,
    pub devices: Vec<Device>,
    /// How many containers may share each device.
    pub count: u32,
    pub permissions: Permissions,
}

impl Resource {
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
            preset.name,
            vec![Device {
                id_prefix: preset.name.to_owned(),
                nodes: vec![Node {
                    host_path: dev_root.join(preset.node),
                    container_path: Path::new("/dev").join(preset.node),
                }],
            }],
            count,
            permissions,
        )
    }

    pub fn new(
        name: &str,
        devices: Vec<Device>,
        count: u32,
        permissions: Permissions,
    ) -> Result<Resource, DeviceError> {
        // The longest ID is "<name>-<count-1>"; keep it within the kubelet's limit.
        let max_name = MAX_ID_LEN - 1 - (count.max(1) - 1).to_string().len();
        if !is_dns_label(name, max_name) {
            return Err(DeviceError::InvalidName {
                name: name.to_owned(),
                max: max_name,
            });
        }
        if count == 0 {
            return Err(DeviceError::InvalidCount {
                resource: name.to_owned(),
                value: count.to_string(),
                max: u32::MAX,
            });
        }
        Ok(Resource {
            name: name.to_owned(),
            resource_name: format!("{DOMAIN}/{name}"),
            devices,
            count,
            permissions,
        })
    }

    /// File name of this resource's socket in the plugin directory.
    pub fn socket_name(&self) -> String {
        format!("{SOCKET_PREFIX}{}.sock", self.name)
    }

    /// Every device ID, in a stable order: device by device, slot by slot.
    pub fn device_ids(&self) -> impl Iterator<Item = (usize, String)> + '_ {
        self.devices.iter().enumerate().flat_map(move |(i, d)| {
            (0..self.count).map(move |slot| (i, format!("{}-{slot}", d.id_prefix)))
        })
    }

    /// Host paths of every node of every device.
    pub fn node_paths(&self) -> impl Iterator<Item = PathBuf> + '_ {
        self.devices
            .iter()
            .flat_map(|d| d.nodes.iter().map(|n| n.host_path.clone()))
    }

    /// Presence of each device, in `devices` order.
    pub fn presence(&self) -> Vec<bool> {
        self.devices.iter().map(Device::is_present).collect()
    }

    /// The full device list for ListAndWatch, with each device's health.
    pub fn device_list(&self, healthy: &[bool]) -> proto::ListAndWatchResponse {
        let mut response = proto::ListAndWatchResponse::new();
        response.devices = self
            .device_ids()
            .map(|(i, id)| {
                let mut device = proto::Device::new();
                device.ID = id;
                let ok = healthy.get(i).copied().unwrap_or(false);
                device.health = if ok { proto::HEALTHY } else { proto::UNHEALTHY }.to_owned();
                device
            })
            .collect();
        response
    }
}

/// Resolves device IDs of one resource to the physical device behind each.
#[derive(Debug)]
pub struct IdTable {
    prefixes: HashMap<String, usize>,
    count: u32,
}

impl IdTable {
    pub fn new(resource: &Resource) -> IdTable {
        IdTable {
            prefixes: resource
                .devices
                .iter()
                .enumerate()
                .map(|(i, d)| (d.id_prefix.clone(), i))
                .collect(),
            count: resource.count,
        }
    }

    /// The index of the device behind `id`, and the slot; `None` if no such ID exists.
    pub fn lookup(&self, id: &str) -> Option<(usize, u32)> {
        let (prefix, slot) = id.rsplit_once('-')?;
        // Reject "kvm-01" and "kvm-+1": only the exact spelling we hand out is an ID.
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

#[cfg(test)]
mod tests {
    use super::*;

    fn kvm(count: u32) -> Resource {
        Resource::builtin("kvm", Path::new("/dev"), count, Permissions::default()).unwrap()
    }

    #[test]
    fn builtin_resources_use_the_domain_and_dev_paths() {
        let r = Resource::builtin("tun", Path::new("/tmp/fake-dev"), 3, Permissions::default())
            .unwrap();
        assert_eq!(r.resource_name, "devices.anza-labs.dev/tun");
        assert_eq!(r.socket_name(), "kdp-tun.sock");
        assert_eq!(
            r.devices[0].nodes[0].host_path,
            Path::new("/tmp/fake-dev/net/tun")
        );
        assert_eq!(
            r.devices[0].nodes[0].container_path,
            Path::new("/dev/net/tun")
        );
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
    fn device_ids_are_stable_and_numbered_from_zero() {
        let ids: Vec<String> = kvm(3).device_ids().map(|(_, id)| id).collect();
        assert_eq!(ids, ["kvm-0", "kvm-1", "kvm-2"]);
    }

    #[test]
    fn zero_count_is_refused() {
        assert!(matches!(
            Resource::builtin("kvm", Path::new("/dev"), 0, Permissions::default()),
            Err(DeviceError::InvalidCount { .. })
        ));
    }

    #[test]
    fn ids_never_exceed_the_kubelet_limit() {
        // With 1000 slots the longest ID is "<name>-999": the name may have 59 characters.
        let longest = "a".repeat(59);
        let device = Device {
            id_prefix: longest.clone(),
            nodes: vec![],
        };
        let r = Resource::new(&longest, vec![device], 1000, Permissions::default()).unwrap();
        assert_eq!(
            r.device_ids().last().map(|(_, id)| id.len()),
            Some(MAX_ID_LEN)
        );
        let err = Resource::new(&"a".repeat(60), vec![], 1000, Permissions::default()).unwrap_err();
        assert!(
            matches!(err, DeviceError::InvalidName { max: 59, .. }),
            "{err:?}"
        );
    }

    #[test]
    fn names_must_be_dns_labels() {
        for bad in ["", "KVM", "-kvm", "kvm-", "kv_m", "kvm/x"] {
            assert!(!is_dns_label(bad, 63), "{bad:?} accepted");
        }
        for good in ["kvm", "vhost-net", "a1", "9"] {
            assert!(is_dns_label(good, 63), "{good:?} refused");
        }
    }

    #[test]
    fn id_lookup_accepts_only_ids_we_hand_out() {
        let table = IdTable::new(&kvm(10));
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

    #[test]
    fn presence_follows_the_files() {
        let dir = tempfile::tempdir().unwrap();
        let r = Resource::builtin("tun", dir.path(), 2, Permissions::default()).unwrap();
        assert_eq!(r.presence(), [false]);
        std::fs::create_dir(dir.path().join("net")).unwrap();
        std::fs::write(dir.path().join("net/tun"), b"").unwrap();
        assert_eq!(r.presence(), [true]);
    }

    #[test]
    fn device_list_marks_health_per_device() {
        let r = kvm(2);
        let list = r.device_list(&[false]);
        let got: Vec<(&str, &str)> = list
            .devices
            .iter()
            .map(|d| (d.ID.as_str(), d.health.as_str()))
            .collect();
        assert_eq!(got, [("kvm-0", "Unhealthy"), ("kvm-1", "Unhealthy")]);
        assert!(r
            .device_list(&[true])
            .devices
            .iter()
            .all(|d| d.health == "Healthy"));
    }
}
