//! The `discover` subcommand (main thread): which resources this node can offer, from the device
//! nodes that exist, without serving anything.

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};

use serde::Serialize;

use crate::device::Resource;

#[derive(Debug, Serialize)]
pub struct Discovered {
    pub resource: String,
    pub count: u32,
    pub permissions: String,
    pub healthy: bool,
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

pub fn discover(resources: &[Resource]) -> Vec<Discovered> {
    resources
        .iter()
        .map(|r| {
            let nodes: Vec<NodeState> = r
                .devices
                .iter()
                .flat_map(|d| d.nodes.iter())
                .map(|n| {
                    let meta = fs::metadata(&n.host_path).ok();
                    let kind = match &meta {
                        None => "missing",
                        Some(m) if m.file_type().is_char_device() => "char",
                        Some(m) if m.file_type().is_block_device() => "block",
                        Some(_) => "other",
                    };
                    let device = meta
                        .filter(|m| {
                            m.file_type().is_char_device() || m.file_type().is_block_device()
                        })
                        .map(|m| format!("{}:{}", major(m.rdev()), minor(m.rdev())));
                    NodeState {
                        host_path: n.host_path.display().to_string(),
                        container_path: n.container_path.display().to_string(),
                        kind,
                        device,
                    }
                })
                .collect();
            Discovered {
                resource: r.resource_name.clone(),
                count: r.count,
                permissions: r.permissions.to_string(),
                healthy: nodes.iter().all(|n| n.kind != "missing"),
                nodes,
            }
        })
        .collect()
}

/// Linux's encoding of device numbers (glibc's gnu_dev_major/minor).
fn major(rdev: u64) -> u64 {
    ((rdev >> 32) & 0xffff_f000) | ((rdev >> 8) & 0x0000_0fff)
}

fn minor(rdev: u64) -> u64 {
    ((rdev >> 12) & 0xffff_ff00) | (rdev & 0x0000_00ff)
}

/// One line per node: resource, health, node path, kind and number, sharing.
pub fn to_table(found: &[Discovered]) -> String {
    let mut rows = vec![[
        "RESOURCE".to_owned(),
        "HEALTH".into(),
        "NODE".into(),
        "TYPE".into(),
        "SHARED BY".into(),
        "PERMISSIONS".into(),
    ]];
    for d in found {
        for n in &d.nodes {
            let kind = match &n.device {
                Some(dev) => format!("{} {dev}", n.kind),
                None => n.kind.to_owned(),
            };
            let health = if d.healthy { "Healthy" } else { "Unhealthy" };
            rows.push([
                d.resource.clone(),
                health.into(),
                n.host_path.clone(),
                kind,
                d.count.to_string(),
                d.permissions.clone(),
            ]);
        }
    }
    let widths: Vec<usize> = (0..6)
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
    fn reports_real_char_devices_and_missing_nodes() {
        let dev = tempfile::tempdir().unwrap();
        // /dev/null is a character device on every Linux machine.
        std::os::unix::fs::symlink("/dev/null", dev.path().join("kvm")).unwrap();
        let kvm = Resource::builtin("kvm", dev.path(), 3, Permissions::default()).unwrap();
        let fuse = Resource::builtin("fuse", dev.path(), 1, Permissions::default()).unwrap();
        let found = discover(&[kvm, fuse]);
        assert!(found[0].healthy);
        assert_eq!(found[0].nodes[0].kind, "char");
        assert_eq!(found[0].nodes[0].device.as_deref(), Some("1:3"));
        assert!(!found[1].healthy);
        assert_eq!(found[1].nodes[0].kind, "missing");
        let table = to_table(&found);
        let row: Vec<&str> = table.lines().nth(1).unwrap().split_whitespace().collect();
        assert_eq!(
            row[..2],
            ["devices.anza-labs.dev/kvm", "Healthy"],
            "{table}"
        );
        assert_eq!(row[3..], ["char", "1:3", "3", "rw"], "{table}");
        assert!(table.contains("missing"), "{table}");
    }
}
