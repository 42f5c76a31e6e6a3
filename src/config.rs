//! The configuration file (main thread, at start and on every reload): YAML describing resources,
//! checked completely before anything is applied, with errors that name the file, the field and
//! what is allowed.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;

use crate::cdi;
use crate::device::{
    self, DeviceNode, Mount, Permissions, Resource, Source, DEFAULT_COUNT, DOMAIN, MAX_COUNT,
};
use crate::usb::UsbMatch;

/// What can fail here. Each variant's `#[error]` message is its documentation.
#[allow(missing_docs)]
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the configuration file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {field}: {problem}")]
    Invalid {
        path: PathBuf,
        field: String,
        problem: String,
    },
    #[error("{path} is empty: write `resources: []` to serve nothing")]
    Empty { path: PathBuf },
    #[error("resource {name:?} is defined both in {path} and by --resource")]
    Duplicate { path: PathBuf, name: String },
    #[error("{path} is larger than {MAX_FILE} bytes, more than any configuration needs: is it the right file?")]
    TooLarge { path: PathBuf },
    #[error("{path}: its aliases expand it to more than {MAX_EXPANDED} bytes: write the repeated parts out, or fewer of them")]
    Expands { path: PathBuf },
}

/// The largest configuration file we read: thousands of resources fit in far less.
pub const MAX_FILE: u64 = 1024 * 1024;
/// The most a file may grow to once its YAML aliases are expanded (counting each scalar's bytes
/// and one for every node): a few anchors shared by many resources fit; a file built to expand
/// to gigabytes (a "billion laughs") is refused before anything is built from it.
pub const MAX_EXPANDED: usize = 4 * 1024 * 1024;

/// Host paths no device needs mounted into a container, and that would hand it the node: the
/// root, the kernel's views of every process and device, all of `/dev`, and the kubelet's own
/// directories (its pods' volumes and secrets, its sockets) under every root we document.
const FORBIDDEN_MOUNTS: &[&str] = &[
    "/proc",
    "/var/lib/kubelet",
    "/var/lib/k0s/kubelet",
    "/var/snap/microk8s/common/var/lib/kubelet",
];
/// Host paths refused themselves, though what is below them may be mounted (`/sys/class/...`).
const FORBIDDEN_MOUNT_ROOTS: &[&str] = &["/", "/sys", "/dev"];

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    domain: Option<String>,
    #[serde(default)]
    #[allow(dead_code)]
    mode: Option<ServeMode>,
    #[serde(default)]
    resources: Vec<ResourceConfig>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ResourceConfig {
    name: String,
    preset: Option<String>,
    #[serde(default)]
    devices: Vec<DeviceConfig>,
    count: Option<u64>,
    permissions: Option<String>,
    #[serde(default)]
    mounts: Vec<MountConfig>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
    #[serde(default)]
    cdi_devices: Vec<String>,
    cdi: Option<bool>,
    device_specs: Option<bool>,
    allow_multiple_allocations: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeviceConfig {
    path: Option<String>,
    container_path: Option<String>,
    nodes: Option<Vec<NodeConfig>>,
    glob: Option<String>,
    container_dir: Option<String>,
    usb: Option<UsbConfig>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UsbConfig {
    vendor: String,
    product: String,
    serial: Option<String>,
    /// Whether the device's tty and hidraw nodes come with its bus node (default true).
    interfaces: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeConfig {
    path: String,
    container_path: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MountConfig {
    host_path: String,
    container_path: Option<String>,
    /// Read-only unless the file says otherwise: a container given a device should not be able
    /// to change the host's files by accident.
    #[serde(default = "read_only_by_default")]
    read_only: bool,
}

fn read_only_by_default() -> bool {
    true
}

/// How the node's devices are offered: as a device plugin or as a DRA driver. Chosen once, at
/// start (`--mode`, or `mode:` in the configuration file).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ServeMode {
    /// The kubelet's device plugin API (every Kubernetes from 1.20).
    #[default]
    DevicePlugin,
    /// A Dynamic Resource Allocation driver (Kubernetes 1.34 and later).
    Dra,
}

/// The `mode:` of the configuration file at `path`, if it names one (the file is checked in
/// full by [`load`]).
pub fn file_mode(path: &Path) -> Result<Option<ServeMode>, ConfigError> {
    #[derive(Deserialize)]
    struct ModeOnly {
        mode: Option<ServeMode>,
    }
    let text = read(path)?;
    check_expansion(&text, path)?;
    let file: ModeOnly = yaml_serde::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    Ok(file.mode)
}

/// Where the resources come from: a file, flags, or both. Kept by the daemon to reload.
#[derive(Clone, Debug)]
pub struct Sources {
    /// The configuration file, if one was given.
    pub file: Option<PathBuf>,
    /// Where presets named in the file find their nodes.
    pub dev_root: PathBuf,
    /// Built-ins chosen with `--resource` (or all present ones without `--config`).
    pub from_flags: Vec<Resource>,
    /// Built-ins to serve once their nodes appear: the absent ones, when neither `--resource`
    /// nor `--config` chose what to serve.
    pub late: Vec<Resource>,
}

impl Sources {
    /// Every resource: the file's, then the flags'. Nothing is returned unless all of it is valid.
    pub fn load(&self) -> Result<Vec<Resource>, ConfigError> {
        let mut resources = match &self.file {
            Some(path) => load(path, &self.dev_root)?,
            None => Vec::new(),
        };
        for r in &self.from_flags {
            if let Some(path) = self
                .file
                .as_ref()
                .filter(|_| resources.iter().any(|f| f.name == r.name))
            {
                return Err(ConfigError::Duplicate {
                    path: path.clone(),
                    name: r.name.clone(),
                });
            }
            resources.push(r.clone());
        }
        Ok(resources)
    }
}

/// Reads and checks the configuration file at `path`.
pub fn load(path: &Path, dev_root: &Path) -> Result<Vec<Resource>, ConfigError> {
    parse(&read(path)?, path, dev_root)
}

/// The file's text, if it is no larger than [`MAX_FILE`]: never more is read.
fn read(path: &Path) -> Result<String, ConfigError> {
    use std::io::Read;
    let error = |source| ConfigError::Read {
        path: path.to_owned(),
        source,
    };
    let mut text = String::new();
    fs::File::open(path)
        .map_err(error)?
        .take(MAX_FILE + 1)
        .read_to_string(&mut text)
        .map_err(error)?;
    if text.len() as u64 > MAX_FILE {
        return Err(ConfigError::TooLarge {
            path: path.to_owned(),
        });
    }
    Ok(text)
}

/// Refuses text whose aliases would expand past [`MAX_EXPANDED`], by walking it once without
/// building anything (the parser's own limit bounds the number of alias jumps, not what each one
/// copies). A text that does not parse is left to the real parse, which names the problem.
fn check_expansion(text: &str, path: &Path) -> Result<(), ConfigError> {
    let budget = std::cell::Cell::new(MAX_EXPANDED);
    let over = |e: &yaml_serde::Error| e.to_string().contains(EXPANDS);
    match serde::de::DeserializeSeed::deserialize(
        Measure(&budget),
        yaml_serde::Deserializer::from_str(text),
    ) {
        Err(e) if over(&e) => Err(ConfigError::Expands {
            path: path.to_owned(),
        }),
        _ => Ok(()),
    }
}

const EXPANDS: &str = "expands past the budget";

/// Counts a YAML document's expanded size against a budget, visiting each node once per place it
/// appears and keeping nothing.
struct Measure<'a>(&'a std::cell::Cell<usize>);

impl Measure<'_> {
    fn take<E: serde::de::Error>(&self, n: usize) -> Result<(), E> {
        let left = self.0.get();
        if n > left {
            return Err(E::custom(EXPANDS));
        }
        self.0.set(left - n);
        Ok(())
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for Measure<'_> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Measure<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any YAML")
    }
    fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<(), E> {
        self.take(1)
    }
    fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<(), E> {
        self.take(1)
    }
    fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<(), E> {
        self.take(1)
    }
    fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<(), E> {
        self.take(1)
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<(), E> {
        self.take(1 + v.len())
    }
    fn visit_unit<E: serde::de::Error>(self) -> Result<(), E> {
        self.take(1)
    }
    fn visit_none<E: serde::de::Error>(self) -> Result<(), E> {
        self.take(1)
    }
    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        serde::de::DeserializeSeed::deserialize(self, d)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        self.take(1)?;
        while seq.next_element_seed(Measure(self.0))?.is_some() {}
        Ok(())
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        self.take(1)?;
        while map.next_key_seed(Measure(self.0))?.is_some() {
            map.next_value_seed(Measure(self.0))?;
        }
        Ok(())
    }
    fn visit_enum<A: serde::de::EnumAccess<'de>>(self, data: A) -> Result<(), A::Error> {
        // A tagged node (`!tag value`): its value counts like any other.
        let ((), variant) = data.variant_seed(Measure(self.0))?;
        serde::de::VariantAccess::newtype_variant_seed(variant, Measure(self.0))
    }
}

/// Parses and checks configuration text; `path` only names it in errors.
///
/// An empty file (nothing but blank lines, comments and document markers) is refused: it is what
/// a reader sees in the middle of a write, or after a mistake, far more often than a wish to stop
/// serving every device on the node; `resources: []` says that.
pub fn parse(text: &str, path: &Path, dev_root: &Path) -> Result<Vec<Resource>, ConfigError> {
    let blank = |line: &str| {
        let line = line.trim();
        line.is_empty() || line.starts_with('#') || line == "---"
    };
    if text.lines().all(blank) {
        return Err(ConfigError::Empty {
            path: path.to_owned(),
        });
    }
    check_expansion(text, path)?;
    let file: FileConfig = yaml_serde::from_str(text).map_err(|e| ConfigError::Parse {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    let check = Checker { path };
    let domain = file.domain.as_deref().unwrap_or(DOMAIN);
    if let Err(e) = device::check_domain(domain) {
        return Err(check.invalid("domain", e.to_string()));
    }
    let mut resources: Vec<Resource> = Vec::with_capacity(file.resources.len());
    for (i, r) in file.resources.iter().enumerate() {
        let at = format!("resources[{i}]");
        let resource = check.resource(&at, r, domain, dev_root)?;
        if let Some(first) = resources
            .iter()
            .position(|other| other.name == resource.name)
        {
            return Err(check.invalid(
                &format!("{at}.name"),
                format!("{:?} is already defined at resources[{first}]", r.name),
            ));
        }
        resources.push(resource);
    }
    Ok(resources)
}

struct Checker<'a> {
    path: &'a Path,
}

impl Checker<'_> {
    fn invalid(&self, field: &str, problem: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.to_owned(),
            field: field.to_owned(),
            problem: problem.into(),
        }
    }

    fn resource(
        &self,
        at: &str,
        r: &ResourceConfig,
        domain: &str,
        dev_root: &Path,
    ) -> Result<Resource, ConfigError> {
        let count = match r.count {
            None => DEFAULT_COUNT,
            Some(n) if (1..=u64::from(MAX_COUNT)).contains(&n) => n as u32,
            Some(n) => {
                return Err(self.invalid(
                    &format!("{at}.count"),
                    format!("{n} is out of range: a whole number from 1 to {MAX_COUNT}"),
                ))
            }
        };
        let permissions = match &r.permissions {
            None => Permissions::default(),
            Some(p) => p.parse().map_err(|e: device::DeviceError| {
                self.invalid(&format!("{at}.permissions"), e.to_string())
            })?,
        };
        let sources = self.sources(at, r, dev_root)?;
        let mut resource = Resource::new(domain, &r.name, sources, count, permissions)
            .map_err(|e| self.invalid(&format!("{at}.name"), e.to_string()))?;
        for (j, m) in r.mounts.iter().enumerate() {
            let field = format!("{at}.mounts[{j}].host_path");
            let host_path = self.absolute(&field, &m.host_path)?;
            self.mountable(&field, &host_path)?;
            let container_path = match &m.container_path {
                Some(p) => self.absolute(&format!("{at}.mounts[{j}].container_path"), p)?,
                None => host_path.clone(),
            };
            resource.mounts.push(Mount {
                host_path,
                container_path,
                read_only: m.read_only,
            });
        }
        // The runtime refuses to start a container whose environment holds these, so every
        // pod given the device would fail.
        for (key, value) in &r.env {
            if key.is_empty() || key.contains('=') || key.contains('\0') {
                return Err(self.invalid(
                    &format!("{at}.env"),
                    format!("{key:?} is not a variable name (non-empty, without '=' or NUL)"),
                ));
            }
            if value.contains('\0') {
                return Err(self.invalid(
                    &format!("{at}.env.{key}"),
                    "a value must not hold a NUL byte",
                ));
            }
        }
        for (key, value) in &r.annotations {
            if key.is_empty() || key.contains('\0') || value.contains('\0') {
                return Err(self.invalid(
                    &format!("{at}.annotations"),
                    "annotation keys must not be empty, and neither keys nor values may hold a NUL byte",
                ));
            }
        }
        for (j, name) in r.cdi_devices.iter().enumerate() {
            if !is_cdi_name(name) {
                return Err(self.invalid(
                    &format!("{at}.cdi_devices[{j}]"),
                    format!("{name:?} is not a CDI device name: vendor.com/class=name"),
                ));
            }
        }
        resource.env = r.env.clone();
        resource.annotations = r.annotations.clone();
        resource.cdi_devices = r.cdi_devices.clone();
        resource.cdi = r.cdi.unwrap_or(false);
        if resource.cdi {
            cdi::check_kind(&resource.resource_name)
                .map_err(|problem| self.invalid(&format!("{at}.cdi"), problem))?;
        }
        // With CDI the runtime injects the nodes: device specs too would give them twice.
        resource.device_specs = r.device_specs.unwrap_or(!resource.cdi);
        resource.allow_multiple_allocations = r.allow_multiple_allocations.unwrap_or(false);
        if !resource.device_specs && resource.cdi_devices.is_empty() && !resource.cdi {
            return Err(self.invalid(
                &format!("{at}.device_specs"),
                "false gives containers no device at all unless cdi is true or cdi_devices names some",
            ));
        }
        Ok(resource)
    }

    fn sources(
        &self,
        at: &str,
        r: &ResourceConfig,
        dev_root: &Path,
    ) -> Result<Vec<Source>, ConfigError> {
        if let Some(preset) = &r.preset {
            if !r.devices.is_empty() {
                return Err(self.invalid(
                    &format!("{at}.devices"),
                    "give either preset or devices, not both",
                ));
            }
            return device::preset_sources(preset, dev_root).ok_or_else(|| {
                self.invalid(
                    &format!("{at}.preset"),
                    format!(
                        "unknown preset {preset:?}: the presets are {}",
                        device::preset_names()
                    ),
                )
            });
        }
        if r.devices.is_empty() {
            // A resource named like a preset is that preset.
            return device::preset_sources(&r.name, dev_root).ok_or_else(|| {
                self.invalid(
                    &format!("{at}.devices"),
                    format!("at least one device is required (path, nodes or glob), or name a preset: {}", device::preset_names()),
                )
            });
        }
        let mut sources = Vec::new();
        let mut seen: Vec<PathBuf> = Vec::new();
        for (j, d) in r.devices.iter().enumerate() {
            let at = format!("{at}.devices[{j}]");
            let source = self.source(&at, d, dev_root)?;
            if let Source::Fixed(nodes) = &source {
                for node in nodes {
                    if seen.contains(&node.host_path) {
                        return Err(self.invalid(
                            &at,
                            format!(
                                "{} is already a node of this resource",
                                node.host_path.display()
                            ),
                        ));
                    }
                    seen.push(node.host_path.clone());
                }
            }
            sources.push(source);
        }
        // Several USB matchers are one source: a device two of them name is one device, and
        // IDs need no hash to tell sources apart.
        let mut merged: Vec<Source> = Vec::new();
        for source in sources {
            if let Source::Usb {
                matchers,
                interfaces,
                ..
            } = &source
            {
                let same = merged.iter_mut().find_map(|m| match m {
                    Source::Usb {
                        matchers: into,
                        interfaces: i,
                        ..
                    } if i == interfaces => Some(into),
                    _ => None,
                });
                if let Some(into) = same {
                    into.extend(matchers.iter().cloned());
                    continue;
                }
            }
            merged.push(source);
        }
        Ok(merged)
    }

    fn source(&self, at: &str, d: &DeviceConfig, dev_root: &Path) -> Result<Source, ConfigError> {
        let given = [
            d.path.is_some(),
            d.nodes.is_some(),
            d.glob.is_some(),
            d.usb.is_some(),
        ]
        .iter()
        .filter(|g| **g)
        .count();
        if given != 1 {
            return Err(self.invalid(at, "give exactly one of path (one node), nodes (several nodes as one device), glob (one device per match) or usb (one device per matching USB device)"));
        }
        if let Some(usb) = &d.usb {
            if d.container_path.is_some() || d.container_dir.is_some() {
                return Err(self.invalid(
                    at,
                    "a USB device's nodes appear at their /dev paths; container_path and container_dir do not go with usb",
                ));
            }
            let matcher = UsbMatch::new(&usb.vendor, &usb.product, usb.serial.as_deref())
                .ok_or_else(|| {
                    self.invalid(
                        &format!("{at}.usb"),
                        format!(
                            "vendor {:?} and product {:?} must be four hex digits each, as lsusb prints them (0403:6001)",
                            usb.vendor, usb.product
                        ),
                    )
                })?;
            return Ok(Source::Usb {
                matchers: vec![matcher],
                interfaces: usb.interfaces.unwrap_or(true),
                dev_root: dev_root.to_owned(),
            });
        }
        if d.container_dir.is_some() && d.glob.is_none() {
            return Err(self.invalid(
                &format!("{at}.container_dir"),
                "only goes with glob; use container_path with path",
            ));
        }
        if d.container_path.is_some() && d.path.is_none() {
            return Err(self.invalid(
                &format!("{at}.container_path"),
                "only goes with path; give each node its container_path",
            ));
        }
        if let Some(path) = &d.path {
            return Ok(Source::Fixed(vec![self.node(
                at,
                path,
                d.container_path.as_deref(),
            )?]));
        }
        if let Some(nodes) = &d.nodes {
            if nodes.is_empty() {
                return Err(self.invalid(&format!("{at}.nodes"), "must list at least one node"));
            }
            let nodes = nodes
                .iter()
                .enumerate()
                .map(|(k, n)| {
                    self.node(
                        &format!("{at}.nodes[{k}]"),
                        &n.path,
                        n.container_path.as_deref(),
                    )
                })
                .collect::<Result<Vec<DeviceNode>, ConfigError>>()?;
            return Ok(Source::Fixed(nodes));
        }
        let glob = d
            .glob
            .as_deref()
            .expect("exactly one of path, nodes and glob is set");
        let field = format!("{at}.glob");
        let full = self.absolute(&field, glob)?;
        let (Some(dir), Some(name)) = (full.parent(), full.file_name()) else {
            return Err(self.invalid(
                &field,
                "must name entries in a directory, like /dev/ttyUSB*",
            ));
        };
        if dir.to_string_lossy().contains(['*', '?', '[']) {
            return Err(self.invalid(
                &field,
                "wildcards are allowed only in the last path component, like /dev/dri/renderD*",
            ));
        }
        let pattern = glob::Pattern::new(&name.to_string_lossy())
            .map_err(|e| self.invalid(&field, format!("not a valid pattern: {e}")))?;
        let container_dir = d
            .container_dir
            .as_deref()
            .map(|c| self.absolute(&format!("{at}.container_dir"), c))
            .transpose()?;
        Ok(Source::Glob {
            dir: dir.to_owned(),
            pattern,
            container_dir,
        })
    }

    fn node(
        &self,
        at: &str,
        path: &str,
        container_path: Option<&str>,
    ) -> Result<DeviceNode, ConfigError> {
        let host_path = self.absolute(&format!("{at}.path"), path)?;
        let container_path = match container_path {
            Some(p) => self.absolute(&format!("{at}.container_path"), p)?,
            None => host_path.clone(),
        };
        Ok(DeviceNode {
            host_path,
            container_path,
        })
    }

    /// An absolute, normal path: no `..`, no `.`, not empty.
    fn absolute(&self, field: &str, path: &str) -> Result<PathBuf, ConfigError> {
        let p = Path::new(path);
        // `components()` drops a `.` in the middle of a path, so the text is read too.
        let normal = p.is_absolute()
            && p.components()
                .all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
            && !path.split('/').any(|c| c == "." || c == "..");
        if path.is_empty() || !normal || path.contains('\0') {
            return Err(self.invalid(
                field,
                format!("{path:?} must be an absolute path without '.' or '..' components"),
            ));
        }
        Ok(p.to_owned())
    }

    /// Refuses a mount of a host path no device needs and that would hand a container the node.
    fn mountable(&self, field: &str, host_path: &Path) -> Result<(), ConfigError> {
        let under = FORBIDDEN_MOUNTS.iter().find(|f| host_path.starts_with(f));
        let is_root = FORBIDDEN_MOUNT_ROOTS
            .iter()
            .find(|f| host_path == Path::new(f));
        if let Some(forbidden) = under.or(is_root) {
            return Err(self.invalid(
                field,
                format!(
                    "{} may not be mounted ({forbidden} is the node's, not a device's): mounts may not be /, /sys or /dev themselves, nor anything under /proc or the kubelet's root directory",
                    host_path.display()
                ),
            ));
        }
        Ok(())
    }
}

/// `vendor.com/class=name`, as the CDI specification names devices.
fn is_cdi_name(name: &str) -> bool {
    let Some((kind, device)) = name.split_once('=') else {
        return false;
    };
    let Some((vendor, class)) = kind.split_once('/') else {
        return false;
    };
    !vendor.is_empty()
        && !class.is_empty()
        && !device.is_empty()
        && !kind.contains(char::is_whitespace)
        && !device.contains(char::is_whitespace)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(text: &str) -> Vec<Resource> {
        parse(text, Path::new("test.yaml"), Path::new("/dev")).unwrap_or_else(|e| panic!("{e}"))
    }

    fn err(text: &str) -> String {
        parse(text, Path::new("test.yaml"), Path::new("/dev"))
            .unwrap_err()
            .to_string()
    }

    const FULL: &str = r#"
domain: example.com
resources:
  - name: kvm
    count: 20
  - name: serial
    devices:
      - glob: /dev/ttyUSB*
    count: 1
    permissions: rw
  - name: vfio
    devices:
      - nodes:
          - path: /dev/vfio/vfio
          - path: /dev/vfio/12
  - name: render
    devices:
      - glob: /dev/dri/renderD*
        container_dir: /dev/dri
    permissions: rwm
    mounts:
      - host_path: /usr/lib/dri
        container_path: /opt/dri
        read_only: true
    env:
      LIBVA_DRIVER_NAME: iHD
    annotations:
      example.com/render: "yes"
    cdi_devices: ["example.com/gpu=all"]
  - name: tap
    preset: tun
"#;

    #[test]
    fn a_full_configuration_parses() {
        let r = ok(FULL);
        let names: Vec<&str> = r.iter().map(|r| r.resource_name.as_str()).collect();
        assert_eq!(
            names,
            [
                "example.com/kvm",
                "example.com/serial",
                "example.com/vfio",
                "example.com/render",
                "example.com/tap"
            ]
        );
        assert_eq!(r[0].count, 20);
        assert_eq!(
            r[0].sources,
            device::preset_sources("kvm", Path::new("/dev")).unwrap()
        );
        assert!(matches!(&r[1].sources[0], Source::Glob { dir, .. } if dir == Path::new("/dev")));
        let Source::Fixed(nodes) = &r[2].sources[0] else {
            panic!()
        };
        assert_eq!(nodes.len(), 2);
        assert_eq!(nodes[1].container_path, Path::new("/dev/vfio/12"));
        assert_eq!(r[3].permissions.to_string(), "rwm");
        assert_eq!(
            r[3].mounts[0],
            Mount {
                host_path: "/usr/lib/dri".into(),
                container_path: "/opt/dri".into(),
                read_only: true
            }
        );
        assert_eq!(r[3].env["LIBVA_DRIVER_NAME"], "iHD");
        assert_eq!(r[3].cdi_devices, ["example.com/gpu=all"]);
        assert_eq!(
            r[4].sources,
            device::preset_sources("tun", Path::new("/dev")).unwrap()
        );
    }

    #[test]
    fn every_configuration_the_docs_show_is_accepted() {
        let examples = crate::doc_blocks::checked("config");
        for b in &examples {
            parse(&b.text, Path::new(&b.place), Path::new("/dev"))
                .unwrap_or_else(|e| panic!("{e}\n{}", b.text));
        }
        assert!(
            examples.len() >= 2,
            "found {} configuration examples",
            examples.len()
        );
    }

    #[test]
    fn usb_matchers_of_a_resource_are_one_source_and_bad_ids_are_named() {
        let r = ok(r#"
resources:
  - name: zigbee
    devices:
      - usb: {vendor: "10C4", product: "EA60"}
      - usb: {vendor: "0403", product: "6001", serial: "A12345"}
"#);
        let [Source::Usb {
            matchers,
            interfaces,
            dev_root,
        }] = r[0].sources.as_slice()
        else {
            panic!("{:?}", r[0].sources)
        };
        assert_eq!(matchers.len(), 2);
        assert_eq!(matchers[0].vendor, "10c4");
        assert_eq!(matchers[1].serial.as_deref(), Some("A12345"));
        assert!(*interfaces);
        assert_eq!(dev_root, Path::new("/dev"));
        let e = err("resources:\n  - name: x\n    devices:\n      - usb: {vendor: \"403\", product: \"6001\"}\n");
        assert!(
            e.contains("resources[0].devices[0].usb: vendor \"403\""),
            "{e}"
        );
        let e = err("resources:\n  - name: x\n    devices:\n      - usb: {vendor: \"0403\", product: \"6001\"}\n        container_path: /dev/x\n");
        assert!(e.contains("do not go with usb"), "{e}");
    }

    #[test]
    fn cdi_turns_device_specs_off_unless_asked_and_needs_names_cdi_accepts() {
        let r = ok("resources:\n  - name: kvm\n    preset: kvm\n    cdi: true\n");
        assert!(r[0].cdi && !r[0].device_specs);
        let r = ok(
            "resources:\n  - name: kvm\n    preset: kvm\n    cdi: true\n    device_specs: true\n",
        );
        assert!(r[0].cdi && r[0].device_specs);
        assert!(!ok("resources:\n  - name: kvm\n    preset: kvm\n")[0].cdi);
        let e = err("resources:\n  - name: 9p\n    preset: kvm\n    cdi: true\n");
        assert!(
            e.contains("resources[0].cdi: CDI needs the resource's name to start with a letter"),
            "{e}"
        );
    }

    #[test]
    fn an_empty_file_is_refused_and_an_empty_list_serves_nothing() {
        for empty in ["", "\n\n", "# nothing yet\n---\n"] {
            assert!(
                err(empty).contains("is empty: write `resources: []`"),
                "{empty:?}"
            );
        }
        assert!(ok("resources: []").is_empty());
    }

    #[test]
    fn mounts_are_read_only_unless_said_and_never_of_the_node_itself() {
        let mount = |host: &str, rest: &str| {
            format!("resources:\n  - name: x\n    preset: kvm\n    mounts: [{{host_path: {host}{rest}}}]\n")
        };
        let r = ok(&mount("/opt/firmware", ""));
        assert!(r[0].mounts[0].read_only);
        let r = ok(&mount("/opt/firmware", ", read_only: false"));
        assert!(!r[0].mounts[0].read_only);
        for allowed in [
            "/sys/class/net",
            "/dev/shm",
            "/var/lib/kubeletfoo",
            "/procfs",
        ] {
            ok(&mount(allowed, ""));
        }
        for refused in [
            "/",
            "/sys",
            "/dev",
            "/proc",
            "/proc/1/root",
            "/var/lib/kubelet",
            "/var/lib/kubelet/pods",
            "/var/snap/microk8s/common/var/lib/kubelet/device-plugins",
        ] {
            let e = err(&mount(refused, ""));
            assert!(
                e.contains(&format!(
                    "resources[0].mounts[0].host_path: {refused} may not be mounted"
                )),
                "{refused}: {e}"
            );
            assert!(
                e.contains("nor anything under /proc or the kubelet's root directory"),
                "{e}"
            );
        }
    }

    #[test]
    fn aliases_that_expand_past_the_bound_are_refused_before_anything_is_built() {
        // One anchored string of 100 kB and 50,000 aliases of it: 300 kB that would expand to
        // 5 GB.
        let mut bomb = format!(
            "resources:\n  - name: x\n    preset: kvm\n    annotations: {{big: &s {}}}\n    cdi_devices: [",
            "a".repeat(100_000)
        );
        bomb.push_str(&"*s, ".repeat(50_000));
        bomb.push_str("]\n");
        assert!(bomb.len() < 400_000);
        let e = err(&bomb);
        assert!(
            e.contains("its aliases expand it to more than 4194304 bytes"),
            "{e}"
        );
        // Nested anchors ("billion laughs") are refused too, by our bound or the parser's limit
        // on alias jumps, in well under a second.
        let mut laughs = String::from(
            "resources:\n  - name: x\n    preset: kvm\n    annotations:\n      a0: &a0 lol\n",
        );
        for i in 1..10 {
            let prev = format!("*a{}", i - 1);
            laughs.push_str(&format!(
                "      a{i}: &a{i} [{}]\n",
                vec![prev; 10].join(", ")
            ));
        }
        let started = std::time::Instant::now();
        let e = err(&laughs);
        assert!(started.elapsed() < std::time::Duration::from_secs(1), "{e}");
        // A few shared parts are what anchors are for.
        let shared = "resources:\n  - name: a\n    preset: kvm\n    env: &env {A: one, B: two}\n  - name: b\n    preset: tun\n    env: *env\n";
        assert_eq!(ok(shared)[1].env["B"], "two");
    }

    #[test]
    fn a_file_too_large_for_any_configuration_is_refused_unread() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.yaml");
        let mut text = String::from("resources: []\n");
        text.push_str(&"# padding\n".repeat(120_000));
        fs::write(&path, &text).unwrap();
        let e = load(&path, Path::new("/dev")).unwrap_err().to_string();
        assert!(e.contains("is larger than 1048576 bytes"), "{e}");
        assert!(file_mode(&path).is_err());
    }

    #[test]
    fn each_mistake_is_named_with_its_field() {
        let cases: &[(&str, &str)] = &[
            (
                "resources:\n  - name: kvm\n    cuont: 3\n",
                "unknown field `cuont`",
            ),
            (
                "resources:\n  - name: kvm\n    count: 0\n",
                "resources[0].count: 0 is out of range: a whole number from 1 to 100000",
            ),
            (
                "resources:\n  - name: kvm\n    count: -1\n",
                "resources[0].count: invalid type: integer `-1`",
            ),
            (
                "resources:\n  - name: kvm\n    permissions: rx\n",
                "resources[0].permissions: invalid permissions \"rx\"",
            ),
            (
                "resources:\n  - name: Bad_Name\n    preset: kvm\n",
                "resources[0].name: invalid resource name \"Bad_Name\"",
            ),
            (
                "resources:\n  - name: kvm\n  - name: kvm\n",
                "resources[1].name: \"kvm\" is already defined at resources[0]",
            ),
            (
                "resources:\n  - name: x\n",
                "resources[0].devices: at least one device is required",
            ),
            (
                "resources:\n  - name: x\n    preset: gpu\n",
                "resources[0].preset: unknown preset \"gpu\"",
            ),
            (
                "resources:\n  - name: x\n    preset: kvm\n    devices: [{path: /dev/a}]\n",
                "give either preset or devices",
            ),
            (
                "resources:\n  - name: x\n    devices: [{}]\n",
                "resources[0].devices[0]: give exactly one of path",
            ),
            (
                "resources:\n  - name: x\n    devices: [{path: /dev/a, glob: /dev/b*}]\n",
                "give exactly one of path",
            ),
            (
                "resources:\n  - name: x\n    devices: [{path: ''}]\n",
                "resources[0].devices[0].path: \"\" must be an absolute path",
            ),
            (
                "resources:\n  - name: x\n    devices: [{path: dev/a}]\n",
                "must be an absolute path",
            ),
            (
                "resources:\n  - name: x\n    devices: [{path: /dev/../etc/passwd}]\n",
                "without '.' or '..'",
            ),
            (
                "resources:\n  - name: x\n    devices: [{nodes: []}]\n",
                "resources[0].devices[0].nodes: must list at least one node",
            ),
            (
                "resources:\n  - name: x\n    devices: [{glob: '/dev/*/x'}]\n",
                "only in the last path component",
            ),
            (
                "resources:\n  - name: x\n    devices: [{glob: '/dev/[x'}]\n",
                "not a valid pattern",
            ),
            (
                "resources:\n  - name: x\n    devices: [{path: /dev/a, container_dir: /d}]\n",
                "container_dir: only goes with glob",
            ),
            (
                "resources:\n  - name: x\n    devices: [{path: /dev/a}, {path: /dev/a}]\n",
                "resources[0].devices[1]: /dev/a is already a node",
            ),
            (
                "resources:\n  - name: x\n    preset: kvm\n    mounts: [{host_path: rel}]\n",
                "resources[0].mounts[0].host_path",
            ),
            (
                "resources:\n  - name: x\n    preset: kvm\n    env: {'A=B': c}\n",
                "resources[0].env: \"A=B\" is not a variable name",
            ),
            (
                "resources:\n  - name: x\n    preset: kvm\n    env: {A: \"a\\0b\"}\n",
                "resources[0].env.A: a value must not hold a NUL byte",
            ),
            (
                "resources:\n  - name: x\n    preset: kvm\n    env: {\"A\\0\": b}\n",
                "is not a variable name (non-empty, without '=' or NUL)",
            ),
            (
                "resources:\n  - name: x\n    preset: kvm\n    annotations: {a: \"b\\0\"}\n",
                "neither keys nor values may hold a NUL byte",
            ),
            (
                "resources:\n  - name: x\n    devices: [{path: /dev/./kvm}]\n",
                "resources[0].devices[0].path: \"/dev/./kvm\" must be an absolute path without '.' or '..' components",
            ),
            (
                "resources:\n  - name: x\n    preset: kvm\n    mounts: [{host_path: /opt/./x}]\n",
                "without '.' or '..' components",
            ),
            (
                "resources:\n  - name: x\n    preset: kvm\n    cdi_devices: [nope]\n",
                "resources[0].cdi_devices[0]: \"nope\" is not a CDI device name",
            ),
            (
                "resources:\n  - name: x\n    preset: kvm\n    device_specs: false\n",
                "resources[0].device_specs: false gives containers no device",
            ),
            (
                "domain: Example.COM\n",
                "domain: invalid domain \"Example.COM\": a DNS subdomain",
            ),
            ("resources: {name: kvm}\n", "resources: invalid type"),
            ("bogus: 1\n", "unknown field `bogus`"),
            (":\n  - [", "test.yaml"),
        ];
        for (text, want) in cases {
            let got = err(text);
            assert!(
                got.contains(want),
                "for {text:?}\n  got: {got}\n want: {want}"
            );
            assert!(got.starts_with("test.yaml: "), "{got}");
        }
    }

    #[test]
    fn an_unreadable_file_is_named() {
        let e = load(Path::new("/nonexistent/kdp.yaml"), Path::new("/dev"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/kdp.yaml"), "{e}");
    }

    #[test]
    fn flags_and_file_cannot_define_the_same_resource() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.yaml");
        fs::write(&file, "resources: [{name: kvm}]").unwrap();
        let kvm = Resource::builtin("kvm", Path::new("/dev"), 1, Permissions::default()).unwrap();
        let tun = Resource::builtin("tun", Path::new("/dev"), 1, Permissions::default()).unwrap();
        let sources = Sources {
            file: Some(file.clone()),
            dev_root: "/dev".into(),
            from_flags: vec![tun],
            late: vec![],
        };
        assert_eq!(sources.load().unwrap().len(), 2);
        let sources = Sources {
            file: Some(file),
            dev_root: "/dev".into(),
            from_flags: vec![kvm],
            late: vec![],
        };
        assert!(matches!(sources.load(), Err(ConfigError::Duplicate { .. })));
    }

    #[test]
    fn presets_in_the_file_use_the_dev_root() {
        let r = parse(
            "resources: [{name: fuse}]",
            Path::new("t"),
            Path::new("/tmp/dev"),
        )
        .unwrap();
        let Source::Fixed(nodes) = &r[0].sources[0] else {
            panic!()
        };
        assert_eq!(nodes[0].host_path, Path::new("/tmp/dev/fuse"));
        assert_eq!(nodes[0].container_path, Path::new("/dev/fuse"));
    }

    #[test]
    fn the_file_may_choose_the_mode_and_nothing_else_is_a_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.yaml");
        fs::write(&path, "mode: dra\nresources:\n  - name: kvm\n").unwrap();
        assert_eq!(file_mode(&path).unwrap(), Some(ServeMode::Dra));
        assert_eq!(ok("mode: dra\nresources:\n  - name: kvm\n").len(), 1);
        fs::write(&path, "resources:\n  - name: kvm\n").unwrap();
        assert_eq!(file_mode(&path).unwrap(), None);
        fs::write(&path, "mode: both\nresources: []\n").unwrap();
        let e = file_mode(&path).unwrap_err().to_string();
        assert!(e.contains("config.yaml"), "{e}");
        assert!(parse("mode: both\n", &path, Path::new("/dev")).is_err());
    }

    /// The keys serde names when it refuses `bogus` at `yaml`'s innermost level.
    fn parser_keys(yaml: &str) -> std::collections::BTreeSet<String> {
        let e = parse(yaml, Path::new("c.yaml"), Path::new("/dev")).unwrap_err();
        let chain = crate::error::error_chain(&e);
        let (_, expected) = chain
            .split_once("expected one of ")
            .or_else(|| chain.split_once("expected "))
            .unwrap_or_else(|| panic!("no list of keys in: {chain}"));
        expected
            .split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_owned)
            .collect()
    }

    /// The Helm chart's values schema lists exactly the keys the parser takes, at every level of
    /// the file: a key added here and not there would be refused by `helm install`, and one
    /// there and not here would pass the schema and stop the plugin at start.
    #[test]
    fn the_helm_charts_schema_takes_exactly_the_keys_the_parser_takes() {
        let schema: serde_json::Value = serde_json::from_str(include_str!(
            "../charts/kubelet-device-plugins/values.schema.json"
        ))
        .unwrap();
        let config = &schema["properties"]["config"];
        let resource = &config["properties"]["resources"]["items"];
        let device = &resource["properties"]["devices"]["items"];
        let keys = |node: &serde_json::Value| -> std::collections::BTreeSet<String> {
            assert_eq!(node["additionalProperties"], false, "{node}");
            node["properties"]
                .as_object()
                .unwrap()
                .keys()
                .cloned()
                .collect()
        };
        let levels = [
            ("bogus: 1\n", config),
            ("resources:\n  - {name: a, bogus: 1}\n", resource),
            ("resources:\n  - name: a\n    devices: [{bogus: 1}]\n", device),
            (
                "resources:\n  - name: a\n    devices: [{usb: {vendor: '0001', product: '0002', bogus: 1}}]\n",
                &device["properties"]["usb"],
            ),
            (
                "resources:\n  - name: a\n    devices: [{nodes: [{path: /dev/a, bogus: 1}]}]\n",
                &device["properties"]["nodes"]["items"],
            ),
            (
                "resources:\n  - name: a\n    mounts: [{host_path: /a, bogus: 1}]\n",
                &resource["properties"]["mounts"]["items"],
            ),
        ];
        for (yaml, node) in levels {
            assert_eq!(keys(node), parser_keys(yaml), "at {yaml:?}");
        }
    }

    /// The configuration reference (docs/src/configuration.md) has a table of keys for every
    /// level of the file, and each lists exactly the keys the parser takes there.
    #[test]
    fn the_configuration_reference_documents_exactly_the_keys_the_parser_takes() {
        let levels = [
            ("file", "bogus: 1\n"),
            ("resource", "resources:\n  - {name: a, bogus: 1}\n"),
            ("device", "resources:\n  - name: a\n    devices: [{bogus: 1}]\n"),
            (
                "usb",
                "resources:\n  - name: a\n    devices: [{usb: {vendor: '0001', product: '0002', bogus: 1}}]\n",
            ),
            (
                "node",
                "resources:\n  - name: a\n    devices: [{nodes: [{path: /dev/a, bogus: 1}]}]\n",
            ),
            ("mount", "resources:\n  - name: a\n    mounts: [{host_path: /a, bogus: 1}]\n"),
        ];
        for (level, yaml) in levels {
            let documented = crate::doc_blocks::first_column(
                "docs/src/configuration.md",
                &format!("keys: {level}"),
            );
            assert_eq!(documented, parser_keys(yaml), "the {level} table");
        }
    }
}
