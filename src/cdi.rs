//! Container Device Interface specs (main thread): for each resource with `cdi: true`, a spec file
//! in the runtime's CDI directory that names every device of the resource, kept in step with the
//! devices found, so that Allocate can answer with CDI names and the runtime (containerd 2,
//! CRI-O) injects the nodes itself.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use log::{debug, warn};
use serde::Serialize;

use crate::device::{Device, Resource};

/// Where runtimes read generated (as opposed to hand-written, `/etc/cdi`) specs.
pub const DEFAULT_DIR: &str = "/var/run/cdi";
/// The oldest spec version with a device node's `hostPath`, which we need: the container sees a
/// node at another path than the host's. Older is more widely read.
pub const SPEC_VERSION: &str = "0.5.0";

/// What can fail here. Each variant's `#[error]` message is its documentation.
#[allow(missing_docs)]
#[derive(Debug, thiserror::Error)]
pub enum CdiError {
    #[error("cannot write the CDI spec {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot encode the CDI spec of {resource}")]
    Encode {
        resource: String,
        #[source]
        source: serde_json::Error,
    },
}

/// Why a resource cannot be described in CDI: CDI's own rules for its kind, `vendor/class`.
pub fn check_kind(resource_name: &str) -> Result<(), String> {
    let (vendor, class) = resource_name
        .split_once('/')
        .ok_or_else(|| format!("{resource_name:?} has no domain"))?;
    for (what, part) in [("domain", vendor), ("name", class)] {
        if !part.starts_with(|c: char| c.is_ascii_alphabetic()) {
            return Err(format!(
                "CDI needs the resource's {what} to start with a letter, and {part:?} does not"
            ));
        }
    }
    Ok(())
}

/// The CDI name of a device, unique within its resource: its ID prefix, which CDI allows except
/// for `~` (hashed prefixes), which becomes `:`, a character no plain prefix holds. CDI wants a
/// name to end with a letter or digit: one ending otherwise gets `:0`, which cannot meet a hashed
/// name (those end in `:` and eight hex digits) nor a plain one (no `:`).
pub fn device_name(device: &Device) -> String {
    let mut name = device.id_prefix.replace('~', ":");
    if !name.ends_with(|c: char| c.is_ascii_alphanumeric()) {
        name.push_str(":0");
    }
    name
}

/// The fully qualified name Allocate gives the runtime: `vendor/class=device`.
pub fn qualified_name(resource: &Resource, device: &Device) -> String {
    format!("{}={}", resource.resource_name, device_name(device))
}

/// The spec file's name for a resource. Runtimes read `*.json` and `*.yaml`; the name starts
/// with ours so that an operator sees whose file it is.
pub fn file_name(resource_name: &str) -> String {
    format!("kdp-{}.json", resource_name.replace('/', "_"))
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Spec<'a> {
    cdi_version: &'static str,
    kind: &'a str,
    devices: Vec<SpecDevice>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SpecDevice {
    name: String,
    container_edits: Edits,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Edits {
    device_nodes: Vec<SpecNode>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    env: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    mounts: Vec<SpecMount>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SpecMount {
    host_path: String,
    container_path: String,
    options: Vec<&'static str>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SpecNode {
    path: String,
    host_path: String,
    permissions: String,
}

/// The spec for a resource's devices, every one of them: the kubelet only allocates healthy ones,
/// and a device that comes back keeps its name. With `full`, each device also carries the
/// resource's mounts and environment (DRA mode: CDI is all the runtime gets); without, they stay
/// in the Allocate answer, as for runtimes without CDI.
pub fn render(resource: &Resource, devices: &[Device], full: bool) -> Result<Vec<u8>, CdiError> {
    let env: Vec<String> = if full {
        resource
            .env
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect()
    } else {
        Vec::new()
    };
    let mounts = || -> Vec<SpecMount> {
        if !full {
            return Vec::new();
        }
        resource
            .mounts
            .iter()
            .map(|m| SpecMount {
                host_path: m.host_path.to_string_lossy().into_owned(),
                container_path: m.container_path.to_string_lossy().into_owned(),
                options: vec!["rbind", if m.read_only { "ro" } else { "rw" }],
            })
            .collect()
    };
    let spec = Spec {
        cdi_version: SPEC_VERSION,
        kind: &resource.resource_name,
        devices: devices
            .iter()
            .map(|d| SpecDevice {
                name: device_name(d),
                container_edits: Edits {
                    device_nodes: d
                        .nodes
                        .iter()
                        .map(|n| SpecNode {
                            path: n.container_path.to_string_lossy().into_owned(),
                            host_path: n.host_path.to_string_lossy().into_owned(),
                            permissions: resource.permissions.to_string(),
                        })
                        .collect(),
                    env: env.clone(),
                    mounts: mounts(),
                },
            })
            .collect(),
    };
    let mut text = serde_json::to_vec_pretty(&spec).map_err(|source| CdiError::Encode {
        resource: resource.resource_name.clone(),
        source,
    })?;
    text.push(b'\n');
    Ok(text)
}

/// The spec files this process wrote, by resource name: rewritten when their content changes,
/// removed when the resource goes and when this is dropped (at shutdown), so that no runtime
/// injects devices we no longer serve.
#[derive(Debug)]
pub struct SpecFiles {
    dir: PathBuf,
    written: HashMap<String, (PathBuf, Vec<u8>)>,
    /// Whether specs carry mounts and environment too (see [`render`]).
    full: bool,
}

impl SpecFiles {
    /// Spec files under `dir`, created when the first is written.
    pub fn new(dir: &Path) -> SpecFiles {
        SpecFiles {
            dir: dir.to_owned(),
            written: HashMap::new(),
            full: false,
        }
    }

    /// Spec files under `dir` that describe everything a container gets with a device: DRA
    /// mode, where the spec is the only thing the runtime is told.
    pub fn complete(dir: &Path) -> SpecFiles {
        let mut files = SpecFiles::new(dir);
        files.full = true;
        files
    }

    /// Writes the resource's spec if it uses CDI and the content changed; a resource that no
    /// longer uses CDI loses its file.
    pub fn publish(&mut self, resource: &Resource, devices: &[Device]) -> Result<(), CdiError> {
        if !resource.cdi {
            self.withdraw(&resource.resource_name);
            return Ok(());
        }
        let text = render(resource, devices, self.full)?;
        if self
            .written
            .get(&resource.resource_name)
            .is_some_and(|(_, old)| *old == text)
        {
            return Ok(());
        }
        let path = self.dir.join(file_name(&resource.resource_name));
        // Runtimes read the specs of every user's containers: world-readable, as theirs are.
        crate::files::write_atomically(&path, &text, 0o644).map_err(|source| CdiError::Write {
            path: path.clone(),
            source,
        })?;
        debug!("wrote the CDI spec {}", path.display());
        self.written
            .insert(resource.resource_name.clone(), (path, text));
        Ok(())
    }

    /// Writes again, as it was, every spec file of ours that is gone (a cleanup script, an
    /// operator): the runtime needs it for every container start of a device holder. The
    /// failures, if any.
    pub fn restore_missing(&mut self) -> Vec<CdiError> {
        let mut failed = Vec::new();
        for (path, text) in self.written.values() {
            if fs::symlink_metadata(path).is_ok() {
                continue;
            }
            match crate::files::write_atomically(path, text, 0o644) {
                Ok(()) => warn!(
                    "the CDI spec {} was deleted; wrote it again",
                    path.display()
                ),
                Err(source) => failed.push(CdiError::Write {
                    path: path.clone(),
                    source,
                }),
            }
        }
        failed
    }

    /// The resources whose spec files this process wrote.
    pub fn names(&self) -> Vec<String> {
        self.written.keys().cloned().collect()
    }

    /// Leaves the resource's spec file to another instance that serves the same devices.
    pub fn forget(&mut self, resource_name: &str) {
        self.written.remove(resource_name);
    }

    /// Removes the resource's spec file, if this process wrote one.
    pub fn withdraw(&mut self, resource_name: &str) {
        if let Some((path, _)) = self.written.remove(resource_name) {
            remove(&path);
        }
    }
}

impl Drop for SpecFiles {
    fn drop(&mut self) {
        for (path, _) in self.written.values() {
            remove(path);
        }
    }
}

fn remove(path: &Path) {
    match fs::remove_file(path) {
        Ok(()) => debug!("removed the CDI spec {}", path.display()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => warn!("cannot remove the CDI spec {}: {e}", path.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{testing::make_node, DeviceNode, Permissions, Source, DOMAIN};

    fn resource(name: &str, cdi: bool) -> Resource {
        let mut r = Resource::new(DOMAIN, name, Vec::new(), 1, Permissions::default()).unwrap();
        r.cdi = cdi;
        r
    }

    fn device(prefix: &str, host: &str, container: &str) -> Device {
        Device {
            id_prefix: prefix.to_owned(),
            nodes: vec![DeviceNode {
                host_path: host.into(),
                container_path: container.into(),
            }],
            healthy: true,
            numa_node: None,
            numbers: None,
            identity: None,
        }
    }

    #[test]
    fn device_names_keep_plain_prefixes_and_stay_distinct_and_valid_for_cdi() {
        // Prefixes as `Resource::id_prefix` makes them: plain, hashed, ending in a non-alphanumeric.
        let prefixes = [
            "kvm",
            "serial-ttyUSB0",
            "usb-001~3f2a9c1d",
            "serial-a-",
            "serial-a_",
        ];
        let names: Vec<String> = prefixes
            .iter()
            .map(|p| device_name(&device(p, "/dev/x", "/dev/x")))
            .collect();
        assert_eq!(
            names,
            [
                "kvm",
                "serial-ttyUSB0",
                "usb-001:3f2a9c1d",
                "serial-a-:0",
                "serial-a_:0"
            ]
        );
        for n in &names {
            let valid = n.starts_with(|c: char| c.is_ascii_alphanumeric())
                && n.ends_with(|c: char| c.is_ascii_alphanumeric())
                && n.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_-.:".contains(c));
            assert!(valid, "{n} is not a CDI device name");
        }
        let distinct: std::collections::HashSet<&String> = names.iter().collect();
        assert_eq!(distinct.len(), names.len());
    }

    #[test]
    fn a_complete_spec_carries_the_resources_mounts_and_environment() {
        let mut r = resource("fuse", true);
        r.env.insert("FUSE".into(), "1".into());
        r.mounts.push(crate::device::Mount {
            host_path: "/var/lib/fuse".into(),
            container_path: "/fuse".into(),
            read_only: true,
        });
        let text = render(&r, &[device("fuse", "/dev/fuse", "/dev/fuse")], true).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&text).unwrap();
        let edits = &v["devices"][0]["containerEdits"];
        assert_eq!(edits["env"], serde_json::json!(["FUSE=1"]));
        assert_eq!(edits["mounts"][0]["hostPath"], "/var/lib/fuse");
        assert_eq!(edits["mounts"][0]["containerPath"], "/fuse");
        assert_eq!(
            edits["mounts"][0]["options"],
            serde_json::json!(["rbind", "ro"])
        );
    }

    #[test]
    fn kinds_follow_cdis_rules_for_vendor_and_class() {
        assert!(check_kind("devices.anza-labs.dev/kvm").is_ok());
        let err = check_kind("devices.anza-labs.dev/9p").unwrap_err();
        assert!(err.contains("\"9p\""), "{err}");
        assert!(check_kind("0x.example/kvm").is_err());
    }

    #[test]
    fn the_spec_names_every_device_with_its_nodes_at_the_containers_path() {
        let r = resource("serial", true);
        let text = render(
            &r,
            &[
                device("serial-a", "/dev/serial/by-id/a", "/dev/ttyUSB0"),
                device("serial-b~12345678", "/dev/ttyUSB1", "/dev/ttyUSB1"),
            ],
            false,
        )
        .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&text).unwrap();
        assert_eq!(v["cdiVersion"], SPEC_VERSION);
        assert_eq!(v["kind"], "devices.anza-labs.dev/serial");
        assert_eq!(v["devices"][0]["name"], "serial-a");
        let node = &v["devices"][0]["containerEdits"]["deviceNodes"][0];
        assert_eq!(node["path"], "/dev/ttyUSB0");
        assert_eq!(node["hostPath"], "/dev/serial/by-id/a");
        assert_eq!(node["permissions"], "rw");
        assert_eq!(v["devices"][1]["name"], "serial-b:12345678");
        assert!(v["devices"][0]["containerEdits"].get("env").is_none());
        assert_eq!(
            qualified_name(&r, &device("serial-a", "/x", "/x")),
            "devices.anza-labs.dev/serial=serial-a"
        );
    }

    #[test]
    fn spec_files_follow_the_devices_and_go_with_the_resource_and_at_drop() {
        let dir = tempfile::tempdir().unwrap();
        let cdi_dir = dir.path().join("cdi");
        let node = dir.path().join("kvm");
        make_node(&node);
        let mut r = resource("kvm", true);
        r.sources = vec![Source::Fixed(vec![DeviceNode {
            host_path: node.clone(),
            container_path: "/dev/kvm".into(),
        }])];
        let devices = r.discover(Path::new("/nonexistent-sys"));
        let path = cdi_dir.join("kdp-devices.anza-labs.dev_kvm.json");
        let mut files = SpecFiles::new(&cdi_dir);
        files.publish(&r, &devices).unwrap();
        let first = fs::read(&path).unwrap();
        assert_eq!(first, render(&r, &devices, false).unwrap());
        // Unchanged content is not rewritten: the file keeps its inode.
        let inode = std::os::unix::fs::MetadataExt::ino(&fs::metadata(&path).unwrap());
        files.publish(&r, &devices).unwrap();
        assert_eq!(
            std::os::unix::fs::MetadataExt::ino(&fs::metadata(&path).unwrap()),
            inode
        );
        // No temporary file is left beside it.
        assert_eq!(fs::read_dir(&cdi_dir).unwrap().count(), 1);
        // A resource that stops using CDI loses its file.
        r.cdi = false;
        files.publish(&r, &devices).unwrap();
        assert!(!path.exists());
        r.cdi = true;
        files.publish(&r, &devices).unwrap();
        assert!(path.exists());
        // Deleted by someone else: written again, as it was.
        fs::remove_file(&path).unwrap();
        assert!(files.restore_missing().is_empty());
        assert_eq!(fs::read(&path).unwrap(), first);
        drop(files);
        assert!(!path.exists(), "the spec outlived the process's SpecFiles");
    }

    #[test]
    fn a_directory_that_cannot_be_made_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("file");
        fs::write(&blocker, "").unwrap();
        let mut files = SpecFiles::new(&blocker.join("cdi"));
        let r = resource("kvm", true);
        let err = files.publish(&r, &[]).unwrap_err();
        assert!(
            crate::error::error_chain(&err).starts_with("cannot write the CDI spec "),
            "{}",
            crate::error::error_chain(&err)
        );
    }
}
