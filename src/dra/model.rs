//! The device model as DRA sees it (main thread builds it, the "slices" and "prepare" threads
//! read it): every device slot of every resource as one DRA device with a DNS-label name, its
//! attributes, its CDI name and its health. Pure: no I/O beyond what the caller passes in.

use std::collections::{BTreeMap, HashSet};

use crate::cdi;
use crate::device::{Device, Resource};

/// The attribute holding a device's resource short name, which DeviceClass selectors match.
pub const RESOURCE_ATTRIBUTE: &str = "resource";
/// Kubernetes' own attribute for a device's NUMA node, understood by other drivers too.
pub const NUMA_ATTRIBUTE: &str = "resource.kubernetes.io/numaNode";
/// The longest string attribute value the API accepts.
const MAX_STRING_ATTRIBUTE: usize = 64;
/// The longest DNS label, which a device name must be.
const MAX_NAME: usize = 63;

/// One attribute value, as ResourceSlices carry them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attribute {
    /// A string attribute.
    String(String),
    /// An integer attribute.
    Int(i64),
}

/// The latest DRA view of the node's devices, published whole by the control loop on every
/// change; the "prepare" and "slices" threads and the health streams all read it, each at its
/// own pace.
pub type Latest = std::sync::Arc<crate::broadcast::Broadcast<std::sync::Arc<Vec<DraDevice>>>>;

/// One device slot offered through DRA.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DraDevice {
    /// Unique in our pool, a DNS label.
    pub name: String,
    /// The resource's full name, `<domain>/<name>`.
    pub resource_name: String,
    /// The CDI name the runtime resolves to its nodes, mounts and environment.
    pub cdi_id: String,
    /// Whether all its nodes exist as device nodes.
    pub healthy: bool,
    /// What it is on the node, whatever its name: the device's key (`Device::key`) and the slot.
    pub unit: String,
    /// What DeviceClass selectors and users see, by qualified name.
    pub attributes: BTreeMap<String, Attribute>,
    /// For a device many claims may share (`allowMultipleAllocations`): how many at a time,
    /// published as its `slots` capacity, of which each claim takes one unless it asks more.
    pub shared_by: Option<u32>,
}

/// The devices of every resource (each with its devices as found), as published.
pub fn dra_devices(found: &[(Resource, Vec<Device>)]) -> Vec<DraDevice> {
    let mut out = Vec::new();
    let mut names = HashSet::new();
    for (resource, devices) in found {
        for device in devices {
            // A shared device is published once, under its IDs' prefix; otherwise every slot
            // is a device of its own.
            let (slots, shared_by) = if resource.allow_multiple_allocations {
                (vec![None], Some(resource.count))
            } else {
                ((0..resource.count).map(Some).collect(), None)
            };
            for slot in slots {
                let id = match slot {
                    Some(slot) => format!("{}-{slot}", device.id_prefix),
                    None => device.id_prefix.clone(),
                };
                let mut name = dns_label(&id, &format!("{}/{id}", resource.resource_name));
                if !names.insert(name.clone()) {
                    // Two IDs that only differ in characters a label cannot hold: the hash of
                    // the resource's full name tells them apart.
                    name = hashed(&id, &format!("{}/{id}/dup", resource.resource_name));
                    names.insert(name.clone());
                }
                let mut attributes = BTreeMap::new();
                attributes.insert(
                    RESOURCE_ATTRIBUTE.to_owned(),
                    Attribute::String(resource.name.clone()),
                );
                if let Some(node) = device.nodes.first() {
                    let path = node.container_path.to_string_lossy();
                    if path.len() <= MAX_STRING_ATTRIBUTE {
                        attributes.insert("path".to_owned(), Attribute::String(path.into_owned()));
                    }
                }
                if let Some((major, minor)) = device.numbers {
                    attributes.insert("major".to_owned(), Attribute::Int(major as i64));
                    attributes.insert("minor".to_owned(), Attribute::Int(minor as i64));
                }
                if let Some(numa) = device.numa_node {
                    attributes.insert(NUMA_ATTRIBUTE.to_owned(), Attribute::Int(numa));
                }
                if let Some(identity) = &device.identity {
                    attributes.insert(
                        "identity".to_owned(),
                        Attribute::String(fit_attribute(identity).to_owned()),
                    );
                }
                out.push(DraDevice {
                    name,
                    resource_name: resource.resource_name.clone(),
                    cdi_id: cdi::qualified_name(resource, device),
                    healthy: device.healthy,
                    unit: match slot {
                        Some(slot) => format!("{}#{slot}", device.key()),
                        None => format!("{}#shared", device.key()),
                    },
                    attributes,
                    shared_by,
                });
            }
        }
    }
    out
}

/// `s` cut to the API's limit for a string attribute, which counts bytes, at a character
/// boundary: one value over it and the API refuses the whole slice.
fn fit_attribute(s: &str) -> &str {
    let mut end = s.len().min(MAX_STRING_ATTRIBUTE);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// `id` as a DNS label: itself when it is one, else its valid characters cut to fit and a hash
/// of `whole`, so that two IDs that read alike stay apart.
fn dns_label(id: &str, whole: &str) -> String {
    if crate::device::is_dns_label(id, MAX_NAME) {
        id.to_owned()
    } else {
        hashed(id, whole)
    }
}

fn hashed(id: &str, whole: &str) -> String {
    let hash = whole.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let mut base: String = id
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_alphanumeric() {
                c
            } else {
                '-'
            }
        })
        .collect();
    base.truncate(MAX_NAME - 9);
    let base = base.trim_matches('-');
    if base.is_empty() {
        format!("d{:08x}", hash as u32)
    } else {
        format!("{base}-{:08x}", hash as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{self, DeviceNode, Permissions};
    use std::path::PathBuf;

    fn resource(name: &str, count: u32) -> Resource {
        Resource {
            name: name.to_owned(),
            resource_name: format!("devices.anza-labs.dev/{name}"),
            sources: vec![],
            count,
            permissions: Permissions::default(),
            mounts: vec![],
            env: Default::default(),
            annotations: Default::default(),
            cdi_devices: vec![],
            device_specs: true,
            cdi: true,
            allow_multiple_allocations: false,
        }
    }

    fn dev(prefix: &str, path: &str, healthy: bool) -> Device {
        Device {
            id_prefix: prefix.to_owned(),
            nodes: vec![DeviceNode {
                host_path: PathBuf::from(path),
                container_path: PathBuf::from(path),
            }],
            healthy,
            numa_node: Some(1),
            numbers: healthy.then_some((10, 232)),
            identity: None,
        }
    }

    #[test]
    fn a_device_many_claims_may_share_is_published_once_with_its_slots() {
        let mut kvm = resource("kvm", 10);
        kvm.allow_multiple_allocations = true;
        let out = dra_devices(&[
            (kvm, vec![dev("kvm", "/dev/kvm", true)]),
            (resource("tun", 2), vec![dev("tun", "/dev/net/tun", true)]),
        ]);
        let got: Vec<_> = out
            .iter()
            .map(|d| (d.name.as_str(), d.unit.as_str(), d.shared_by))
            .collect();
        assert_eq!(
            got,
            [
                ("kvm", "/dev/kvm#shared", Some(10)),
                ("tun-0", "/dev/net/tun#0", None),
                ("tun-1", "/dev/net/tun#1", None),
            ]
        );
        assert_eq!(out[0].cdi_id, "devices.anza-labs.dev/kvm=kvm");
    }

    #[test]
    fn every_slot_is_a_device_with_the_cdi_name_of_its_device() {
        let kvm = resource("kvm", 2);
        let out = dra_devices(&[(kvm, vec![dev("kvm", "/dev/kvm", true)])]);
        let names: Vec<&str> = out.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["kvm-0", "kvm-1"]);
        assert!(out
            .iter()
            .all(|d| d.cdi_id == "devices.anza-labs.dev/kvm=kvm"));
        let a = &out[0].attributes;
        assert_eq!(a["resource"], Attribute::String("kvm".into()));
        assert_eq!(a["path"], Attribute::String("/dev/kvm".into()));
        assert_eq!(a["major"], Attribute::Int(10));
        assert_eq!(a["minor"], Attribute::Int(232));
        assert_eq!(a[NUMA_ATTRIBUTE], Attribute::Int(1));
    }

    #[test]
    fn names_are_dns_labels_and_unique_for_ids_the_parser_accepts() {
        // Hashed prefixes hold `~`, upper case and long names come from globs and USB serials.
        let r = resource("serial", 1);
        let long = format!("serial-{}", "A".repeat(80));
        let devices = vec![
            dev("serial-ttyUSB0", "/dev/ttyUSB0", true),
            dev("serial-ttyusb0", "/dev/x/ttyusb0", true),
            dev("serial~1a2b3c4d", "/dev/a:b", true),
            dev("serial_x", "/dev/serial_x", true),
            dev("serial-x", "/dev/serial-x", true),
            dev(&long, "/dev/long", true),
        ];
        let count = devices.len();
        let out = dra_devices(&[(r, devices)]);
        let mut seen = HashSet::new();
        for d in &out {
            assert!(device::is_dns_label(&d.name, 63), "{:?}", d.name);
            assert!(seen.insert(d.name.clone()), "duplicate {:?}", d.name);
        }
        assert_eq!(out.len(), count);
    }

    #[test]
    fn a_long_identity_is_cut_to_the_apis_limit_in_bytes_not_characters() {
        let r = resource("serial", 1);
        let mut d = dev("serial-a", "/dev/ttyUSB0", true);
        // A USB serial of 40 two-byte characters: 80 bytes, 40 characters.
        d.identity = Some(format!("0403:6001:{}", "é".repeat(40)));
        let out = dra_devices(&[(r, vec![d])]);
        let Attribute::String(identity) = &out[0].attributes["identity"] else {
            panic!("identity is not a string");
        };
        assert!(
            identity.len() <= MAX_STRING_ATTRIBUTE,
            "{} bytes",
            identity.len()
        );
        assert_eq!(identity.len(), 10 + 2 * 27, "as much as fits: {identity}");
        assert_eq!(fit_attribute("kvm"), "kvm");
    }

    #[test]
    fn a_device_with_a_missing_node_stays_listed_as_unhealthy() {
        let r = resource("kvm", 1);
        let out = dra_devices(&[(r, vec![dev("kvm", "/dev/kvm", false)])]);
        assert_eq!(out.len(), 1);
        assert!(!out[0].healthy);
        assert!(!out[0].attributes.contains_key("major"));
    }
}
