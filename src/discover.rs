//! The `discover` subcommand (main thread): which resources this node can offer and which devices
//! each has now, without serving anything.

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use serde::Serialize;

use crate::device::{major, minor, Resource};

#[derive(Debug, Serialize)]
pub struct Discovered {
    pub resource: String,
    pub count: u32,
    pub permissions: String,
    pub devices: Vec<DeviceState>,
}

#[derive(Debug, Serialize)]
pub struct DeviceState {
    pub id_prefix: String,
    pub healthy: bool,
    pub numa_node: Option<i64>,
    /// Who the device is, when chosen by identity: `usb 0403:6001 serial A12345 port 1-1.2`.
    pub identity: Option<String>,
    pub nodes: Vec<NodeState>,
}

#[derive(Debug, Serialize)]
pub struct NodeState {
    pub host_path: String,
    pub container_path: String,
    /// "char", "block", "missing" or "other" (a regular file standing in, for tests).
    pub kind: &'static str,
    /// "major:minor" for device nodes.
    pub device: Option<String>,
}

pub fn discover(resources: &[Resource], sys_root: &Path) -> Vec<Discovered> {
    resources
        .iter()
        .map(|r| Discovered {
            resource: r.resource_name.clone(),
            count: r.count,
            permissions: r.permissions.to_string(),
            devices: r
                .discover(sys_root)
                .into_iter()
                .map(|d| DeviceState {
                    id_prefix: d.id_prefix,
                    healthy: d.healthy,
                    numa_node: d.numa_node,
                    identity: d.identity,
                    nodes: d
                        .nodes
                        .iter()
                        .map(|n| node_state(&n.host_path, &n.container_path))
                        .collect(),
                })
                .collect(),
        })
        .collect()
}

fn node_state(host_path: &Path, container_path: &Path) -> NodeState {
    let meta = fs::metadata(host_path).ok();
    let kind = match &meta {
        None => "missing",
        Some(m) if m.file_type().is_char_device() => "char",
        Some(m) if m.file_type().is_block_device() => "block",
        Some(_) => "other",
    };
    let device = meta
        .filter(|m| m.file_type().is_char_device() || m.file_type().is_block_device())
        .map(|m| format!("{}:{}", major(m.rdev()), minor(m.rdev())));
    NodeState {
        host_path: host_path.display().to_string(),
        container_path: container_path.display().to_string(),
        kind,
        device,
    }
}

/// One line per node: resource, device health, node path, kind and number, sharing.
pub fn to_table(found: &[Discovered]) -> String {
    let mut rows = vec![[
        "RESOURCE",
        "HEALTH",
        "NODE",
        "TYPE",
        "NUMA",
        "SHARED BY",
        "PERMISSIONS",
        "IDENTITY",
    ]
    .map(String::from)];
    for r in found {
        if r.devices.is_empty() {
            rows.push([
                r.resource.clone(),
                "-".into(),
                "(no devices)".into(),
                "-".into(),
                "-".into(),
                r.count.to_string(),
                r.permissions.clone(),
                "-".into(),
            ]);
        }
        for d in &r.devices {
            for n in &d.nodes {
                let kind = match &n.device {
                    Some(dev) => format!("{} {dev}", n.kind),
                    None => n.kind.to_owned(),
                };
                let health = crate::device::health_word(d.healthy);
                let numa = d
                    .numa_node
                    .map_or_else(|| "-".to_owned(), |n| n.to_string());
                rows.push([
                    r.resource.clone(),
                    health.into(),
                    n.host_path.clone(),
                    kind,
                    numa,
                    r.count.to_string(),
                    r.permissions.clone(),
                    d.identity.clone().unwrap_or_else(|| "-".into()),
                ]);
            }
        }
    }
    let widths: Vec<usize> = (0..8)
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    rows.iter()
        .map(|r| {
            let cells: Vec<String> = r
                .iter()
                .zip(&widths)
                .map(|(cell, w)| format!("{cell:w$}"))
                .collect();
            cells.join("  ").trim_end().to_owned() + "\n"
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::Permissions;

    #[test]
    fn usb_devices_show_who_they_are_in_the_table_and_the_json() {
        use crate::device::{testing::make_node, Source, DOMAIN};
        use crate::usb::{testing::add_usb, UsbMatch};
        let (sys, dev) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        add_usb(
            sys.path(),
            "1-1.2",
            ("0403", "6001"),
            Some("A12345"),
            (1, 4),
            &["ttyUSB0"],
            &[],
        );
        fs::create_dir_all(dev.path().join("bus/usb/001")).unwrap();
        make_node(&dev.path().join("bus/usb/001/004"));
        make_node(&dev.path().join("ttyUSB0"));
        let source = Source::Usb {
            matchers: vec![UsbMatch::new("0403", "6001", None).unwrap()],
            interfaces: true,
            dev_root: dev.path().to_owned(),
        };
        let r = Resource::new(DOMAIN, "serial", vec![source], 1, Permissions::default()).unwrap();
        let found = discover(&[r], sys.path());
        let identity = "usb 0403:6001 serial A12345 port 1-1.2";
        assert_eq!(found[0].devices[0].identity.as_deref(), Some(identity));
        let table = to_table(&found);
        assert_eq!(
            table.lines().filter(|l| l.ends_with(identity)).count(),
            2,
            "{table}"
        );
        let json = serde_json::to_value(&found).unwrap();
        assert_eq!(json[0]["devices"][0]["identity"], identity);
    }

    #[test]
    fn reports_real_char_devices_and_missing_nodes() {
        let dev = tempfile::tempdir().unwrap();
        // /dev/null is a character device on every Linux machine.
        std::os::unix::fs::symlink("/dev/null", dev.path().join("kvm")).unwrap();
        let kvm = Resource::builtin("kvm", dev.path(), 3, Permissions::default()).unwrap();
        let fuse = Resource::builtin("fuse", dev.path(), 1, Permissions::default()).unwrap();
        let found = discover(&[kvm, fuse], dev.path());
        assert!(found[0].devices[0].healthy);
        assert_eq!(found[0].devices[0].nodes[0].kind, "char");
        assert_eq!(found[0].devices[0].nodes[0].device.as_deref(), Some("1:3"));
        assert!(!found[1].devices[0].healthy);
        assert_eq!(found[1].devices[0].nodes[0].kind, "missing");
        let table = to_table(&found);
        let row: Vec<&str> = table.lines().nth(1).unwrap().split_whitespace().collect();
        assert_eq!(
            row[..2],
            ["devices.anza-labs.dev/kvm", "Healthy"],
            "{table}"
        );
        assert_eq!(row[3..], ["char", "1:3", "-", "3", "rw", "-"], "{table}");
        assert!(table.contains("missing"), "{table}");
    }
}
