//! Command-line interface (main thread): clap definitions, each flag mirrored by a `KDP_*`
//! environment variable, and their translation into the device model.
//!
//! clap turns doc comments into `--help` text, so these types are documented by their help
//! rather than by rustdoc: a doc comment on a flattened group or on `Cli` would change what
//! `--help` says.
#![allow(missing_docs)]

use std::net::IpAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use log::LevelFilter;

use crate::config::{ServeMode, Sources};
use crate::device::{self, DeviceError, Permissions, Resource, DEFAULT_COUNT, MAX_COUNT, PRESETS};
use crate::layout::Mode;

#[derive(Debug, Parser)]
#[command(name = "kubelet-device-plugins", version, about, long_about = None)]
pub struct Cli {
    /// Log level: off, error, warn, info, debug or trace. RUST_LOG, when set, takes precedence.
    #[arg(long, env = "KDP_LOG_LEVEL", default_value = "info", global = true)]
    pub log_level: LevelFilter,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve device nodes to the kubelet (the daemon).
    Serve(Box<ServeArgs>),
    /// Print which resources this node can offer and whether their device nodes exist.
    Discover(DiscoverArgs),
    /// Act as the kubelet against a device plugin socket: print its options and first device list.
    /// Exits non-zero if it does not answer.
    Probe(ProbeArgs),
    /// Ask a running plugin's health socket whether its control loop answers: the liveness probe.
    /// Exits non-zero, saying why, if it does not.
    Alive(AliveArgs),
}

#[derive(Debug, Args)]
pub struct AliveArgs {
    /// The plugin's health socket (serve --health-socket).
    #[arg(long, env = "KDP_HEALTH_SOCKET")]
    pub socket: PathBuf,

    /// Seconds to wait for the answer.
    #[arg(long, default_value = "4", value_parser = parse_seconds)]
    pub timeout: Duration,

    /// Ask for readiness instead (as /readyz): whether the kubelet holds every endpoint.
    #[arg(long)]
    pub ready: bool,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The kubelet's device plugin directory, holding kubelet.sock.
    #[arg(
        long,
        env = "KDP_PLUGIN_DIR",
        default_value = "/var/lib/kubelet/device-plugins"
    )]
    pub plugin_dir: PathBuf,

    /// How the kubelet learns of our resources: through its plugin watcher (plugins_registry/,
    /// nothing to redo when the kubelet restarts), through kubelet.sock (Register again after each
    /// kubelet restart), or auto: the plugin watcher when plugins_registry/ exists beside the
    /// plugin directory.
    #[arg(long, env = "KDP_REGISTRATION", value_enum, default_value_t = Mode::Auto)]
    pub registration: Mode,

    /// Serve /metrics, /healthz and /readyz over HTTP on this port (off by default).
    #[arg(long, env = "KDP_METRICS_PORT")]
    pub metrics_port: Option<u16>,

    /// Address for the metrics endpoint.
    #[arg(long, env = "KDP_METRICS_BIND", default_value = "127.0.0.1")]
    pub metrics_bind: IpAddr,

    /// Answer liveness probes (the `alive` subcommand) on a Unix socket at this path, inside the
    /// plugin's own container where no pod can reach it (off by default).
    #[arg(long, env = "KDP_HEALTH_SOCKET", value_name = "PATH")]
    pub health_socket: Option<PathBuf>,

    /// Where the container runtime reads CDI specs: resources with `cdi: true` get theirs here.
    #[arg(long, env = "KDP_CDI_DIR", default_value = crate::cdi::DEFAULT_DIR)]
    pub cdi_dir: PathBuf,

    /// Label the node through Node Feature Discovery: write a feature file per served resource,
    /// with its healthy device IDs, into this directory (NFD's `features.d/`, usually
    /// /etc/kubernetes/node-feature-discovery/features.d). Off by default.
    #[arg(long, env = "KDP_NFD_FEATURES_DIR", value_name = "DIR")]
    pub nfd_features_dir: Option<PathBuf>,

    /// What to serve the devices as: device-plugin (the default), or dra, a Dynamic Resource
    /// Allocation driver (Kubernetes 1.34 and later; docs/src/dra.md). Also `mode:` in the
    /// configuration file; this flag wins.
    #[arg(long, env = "KDP_MODE", value_enum)]
    pub mode: Option<ServeMode>,

    /// DRA mode: the driver name, in ResourceSlices and DeviceClass selectors.
    #[arg(long, env = "KDP_DRA_DRIVER", default_value = device::DOMAIN)]
    pub driver: String,

    /// DRA mode: this node's name, as the Node object has it (the downward API's spec.nodeName).
    #[arg(long, env = "KDP_NODE_NAME", default_value = "")]
    pub node_name: String,

    /// DRA mode: the directory of the ServiceAccount token and the cluster's CA.
    #[arg(long, env = "KDP_CREDENTIALS_DIR", default_value = crate::dra::kube::SERVICE_ACCOUNT_DIR)]
    pub credentials: PathBuf,

    /// DRA mode: our pod's UID (the downward API's metadata.uid). With it, a rolling update's
    /// new pod serves beside the old one on kubelets from 1.33; without it, it stands by.
    #[arg(long, env = "KDP_POD_UID")]
    pub pod_uid: Option<String>,

    #[command(flatten)]
    pub resources: ResourceArgs,
}

#[derive(Debug, Args)]
pub struct ResourceArgs {
    /// YAML file describing resources (docs/src/configuration.md). Re-read when it changes or on SIGHUP.
    #[arg(long, env = "KDP_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Built-in resource to serve (repeatable, or comma-separated): kvm, tun, vhost-net,
    /// vhost-vsock, fuse. Default without --config: every built-in whose device node exists.
    #[arg(
        long = "resource",
        env = "KDP_RESOURCES",
        value_delimiter = ',',
        value_name = "NAME"
    )]
    pub resources: Vec<String>,

    /// How many containers may share each device: N for every resource, or NAME=N for one
    /// (repeatable, or comma-separated).
    #[arg(
        long = "count",
        env = "KDP_COUNT",
        value_delimiter = ',',
        value_name = "[NAME=]N"
    )]
    pub counts: Vec<Scoped<Count>>,

    /// Device cgroup permissions given to containers: one or more of r, w, m, for every resource
    /// or as NAME=PERMS for one (repeatable, or comma-separated).
    #[arg(
        long = "permissions",
        env = "KDP_PERMISSIONS",
        value_delimiter = ',',
        value_name = "[NAME=]PERMS"
    )]
    pub permissions: Vec<Scoped<Permissions>>,

    /// Directory holding the host's device nodes; containers still see them under /dev.
    #[arg(long, env = "KDP_DEV_ROOT", default_value = "/dev")]
    pub dev_root: PathBuf,

    /// Where the kernel's sysfs is mounted, for devices' NUMA nodes.
    #[arg(long, env = "KDP_SYS_ROOT", default_value = "/sys")]
    pub sys_root: PathBuf,
}

#[derive(Debug, Args)]
pub struct DiscoverArgs {
    #[command(flatten)]
    pub resources: ResourceArgs,

    #[arg(long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(Debug, Args)]
pub struct ProbeArgs {
    /// The device plugin socket to query.
    #[arg(long, env = "KDP_PROBE_SOCKET")]
    pub socket: PathBuf,

    /// Seconds to wait for each answer (and, with --wait, for the socket to appear).
    #[arg(long, default_value = "5", value_parser = parse_seconds)]
    pub timeout: Duration,

    /// Wait up to --timeout for the socket to appear, instead of failing at once.
    #[arg(long)]
    pub wait: bool,

    /// Also call Allocate, as the kubelet does for a container, with these device IDs
    /// (repeatable, or comma-separated), and print what the container would get.
    #[arg(long = "allocate", value_name = "ID", value_delimiter = ',')]
    pub allocate: Vec<String>,

    #[arg(long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

/// A value for every resource (`V`) or for one (`NAME=V`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scoped<T> {
    pub resource: Option<String>,
    pub value: T,
}

impl<T: FromStr> FromStr for Scoped<T>
where
    T::Err: std::fmt::Display,
{
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (resource, value) = match s.split_once('=') {
            Some((name, value)) => (Some(name.trim().to_owned()), value),
            None => (None, s),
        };
        let value = value.trim().parse::<T>().map_err(|e| e.to_string())?;
        Ok(Scoped { resource, value })
    }
}

/// How many containers share one device: at least 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Count(pub u32);

impl FromStr for Count {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.parse::<u32>() {
            Ok(n) if (1..=MAX_COUNT).contains(&n) => Ok(Count(n)),
            _ => Err(format!(
                "invalid count {s:?}: a whole number from 1 to {MAX_COUNT}"
            )),
        }
    }
}

fn parse_seconds(s: &str) -> Result<Duration, String> {
    match s.parse::<f64>() {
        Ok(secs) if secs > 0.0 && secs <= 3600.0 => Ok(Duration::from_secs_f64(secs)),
        _ => Err(format!(
            "invalid timeout {s:?}: seconds, more than 0 and at most 3600"
        )),
    }
}

/// What can fail here. Each variant's `#[error]` message is its documentation.
#[allow(missing_docs)]
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CliError {
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error("--{flag} names {name:?}, which is not being served (serving: {served})")]
    NotServed {
        flag: &'static str,
        name: String,
        served: String,
    },
}

impl ResourceArgs {
    /// Where the resources come from: the configuration file and the built-ins chosen by flags.
    pub fn sources(&self, all_by_default: bool) -> Result<Sources, CliError> {
        let (from_flags, late) = self.choose(all_by_default)?;
        Ok(Sources {
            file: self.config.clone(),
            dev_root: self.dev_root.clone(),
            from_flags,
            late,
        })
    }

    /// The built-ins chosen by flags, with counts and permissions applied. With no `--resource`:
    /// none if there is a configuration file, else every built-in whose node exists, or all of
    /// them if `all_by_default`.
    pub fn resolve(&self, all_by_default: bool) -> Result<Vec<Resource>, CliError> {
        Ok(self.choose(all_by_default)?.0)
    }

    /// `resolve`'s built-ins, and the built-ins whose nodes do not exist yet but are to be served
    /// once they do (with neither `--resource` nor a configuration file: a module loaded later).
    fn choose(&self, all_by_default: bool) -> Result<(Vec<Resource>, Vec<Resource>), CliError> {
        let mut names: Vec<&str> = Vec::new();
        for name in &self.resources {
            let name = name.trim();
            if device::preset(name).is_none() {
                return Err(DeviceError::UnknownResource {
                    name: name.to_owned(),
                }
                .into());
            }
            if !names.contains(&name) {
                names.push(name);
            }
        }
        let explicit = !names.is_empty();
        if !explicit && self.config.is_none() {
            names = PRESETS.iter().map(|p| p.name).collect();
        }
        let served = names.join(", ");
        check_scopes("count", &self.counts, &names, &served)?;
        check_scopes("permissions", &self.permissions, &names, &served)?;

        let (mut resources, mut late) = (Vec::new(), Vec::new());
        for name in &names {
            let count = pick(&self.counts, name).map_or(DEFAULT_COUNT, |c| c.0);
            let permissions = pick(&self.permissions, name).cloned().unwrap_or_default();
            let resource = Resource::builtin(name, &self.dev_root, count, permissions)?;
            if explicit || all_by_default || resource.nodes_present() {
                resources.push(resource);
            } else {
                late.push(resource);
            }
        }
        Ok((resources, late))
    }
}

fn check_scopes<T>(
    flag: &'static str,
    values: &[Scoped<T>],
    names: &[&str],
    served: &str,
) -> Result<(), CliError> {
    for v in values {
        if let Some(name) = &v.resource {
            if !names.contains(&name.as_str()) {
                return Err(CliError::NotServed {
                    flag,
                    name: name.clone(),
                    served: served.to_owned(),
                });
            }
        }
    }
    Ok(())
}

/// The value for `name`: its own if given, else the last one given for every resource.
fn pick<'a, T>(values: &'a [Scoped<T>], name: &str) -> Option<&'a T> {
    values
        .iter()
        .rev()
        .find(|v| v.resource.as_deref() == Some(name))
        .or_else(|| values.iter().rev().find(|v| v.resource.is_none()))
        .map(|v| &v.value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("kubelet-device-plugins").chain(args.iter().copied()))
    }

    fn serve_args(args: &[&str]) -> ResourceArgs {
        let mut all = vec!["serve"];
        all.extend_from_slice(args);
        match parse(&all).unwrap().command {
            Command::Serve(serve) => serve.resources,
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn defaults_follow_the_kubelet() {
        let Command::Serve(serve) = parse(&["serve"]).unwrap().command else {
            panic!()
        };
        assert_eq!(
            serve.plugin_dir,
            Path::new("/var/lib/kubelet/device-plugins")
        );
        assert_eq!(serve.resources.dev_root, Path::new("/dev"));
    }

    #[test]
    fn counts_and_permissions_apply_globally_and_per_resource() {
        let args = serve_args(&[
            "--resource",
            "kvm,tun",
            "--resource",
            "fuse",
            "--count",
            "5",
            "--count",
            "kvm=20",
            "--permissions",
            "tun=rwm",
        ]);
        let resources = args.resolve(false).unwrap();
        let got: Vec<(&str, u32, String)> = resources
            .iter()
            .map(|r| (r.name.as_str(), r.count, r.permissions.to_string()))
            .collect();
        assert_eq!(
            got,
            [
                ("kvm", 20, "rw".into()),
                ("tun", 5, "rwm".into()),
                ("fuse", 5, "rw".into())
            ]
        );
    }

    #[test]
    fn without_resources_only_present_nodes_are_served() {
        let dev = tempfile::tempdir().unwrap();
        crate::device::testing::make_node(&dev.path().join("kvm"));
        crate::device::testing::make_node(&dev.path().join("fuse"));
        let args = serve_args(&["--dev-root", dev.path().to_str().unwrap()]);
        let names: Vec<String> = args
            .resolve(false)
            .unwrap()
            .into_iter()
            .map(|r| r.name)
            .collect();
        assert_eq!(names, ["kvm", "fuse"]);
        assert_eq!(args.resolve(true).unwrap().len(), 5);

        // The others are kept, to serve once their nodes appear.
        let late: Vec<String> = args
            .sources(false)
            .unwrap()
            .late
            .into_iter()
            .map(|r| r.name)
            .collect();
        assert_eq!(late, ["tun", "vhost-net", "vhost-vsock"]);
        let empty = tempfile::tempdir().unwrap();
        let args = serve_args(&["--dev-root", empty.path().to_str().unwrap()]);
        assert!(args.resolve(false).unwrap().is_empty());
        assert_eq!(args.sources(false).unwrap().late.len(), 5);
    }

    #[test]
    fn bad_values_are_refused_with_what_is_allowed() {
        let err = parse(&["serve", "--count", "0"]).unwrap_err().to_string();
        assert!(err.contains("a whole number from 1 to 100000"), "{err}");
        let err = parse(&["serve", "--count", "kvm=ten"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("invalid count \"ten\""), "{err}");
        let err = parse(&["serve", "--permissions", "rx"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("r (read), w (write), m (mknod)"), "{err}");
        let err = parse(&["probe", "--socket", "/x", "--timeout=-1"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("invalid timeout"), "{err}");
        assert!(parse(&["serve", "--log-level", "loud"]).is_err());
        assert!(parse(&["probe"]).is_err(), "probe needs --socket");
    }

    #[test]
    fn unknown_or_unserved_names_are_refused() {
        let err = serve_args(&["--resource", "gpu"])
            .resolve(false)
            .unwrap_err();
        assert_eq!(
            err,
            CliError::Device(DeviceError::UnknownResource { name: "gpu".into() })
        );
        let err = serve_args(&["--resource", "kvm", "--count", "tun=3"])
            .resolve(false)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "--count names \"tun\", which is not being served (serving: kvm)"
        );
    }

    #[test]
    fn duplicate_resources_are_served_once() {
        let resources = serve_args(&["--resource", "kvm,kvm", "--resource", "kvm"])
            .resolve(false)
            .unwrap();
        assert_eq!(resources.len(), 1);
    }

    /// The flags table of docs/src/cli.md lists every flag of `serve` with its variable, and
    /// nothing else.
    #[test]
    fn the_flags_reference_lists_every_flag_of_serve_with_its_variable() {
        use clap::CommandFactory;
        let command = Cli::command();
        let serve = command.find_subcommand("serve").unwrap();
        let flags: std::collections::BTreeSet<(String, String)> = serve
            .get_arguments()
            .chain(command.get_arguments().filter(|a| a.is_global_set()))
            .filter_map(|a| {
                let env = a.get_env()?.to_string_lossy().into_owned();
                Some((format!("--{}", a.get_long()?), env))
            })
            .collect();
        let documented: std::collections::BTreeSet<(String, String)> =
            crate::doc_blocks::table("docs/src/cli.md", "flags: serve")
                .into_iter()
                .map(|row| {
                    (
                        row[0].trim_matches('`').to_owned(),
                        row[1].trim_matches('`').to_owned(),
                    )
                })
                .collect();
        assert_eq!(documented, flags);
    }

    /// The systemd units the docs show start `serve` with arguments the CLI accepts.
    #[test]
    fn every_systemd_unit_the_docs_show_starts_serve_with_valid_arguments() {
        let units = crate::doc_blocks::checked("systemd");
        assert!(!units.is_empty());
        for unit in units {
            let exec = unit
                .text
                .lines()
                .find_map(|l| l.strip_prefix("ExecStart="))
                .unwrap_or_else(|| panic!("{}: no ExecStart", unit.place));
            let mut words = exec.split_whitespace();
            let program = words.next().unwrap_or_default();
            assert!(
                program.ends_with("/kubelet-device-plugins"),
                "{}: {exec}",
                unit.place
            );
            let args: Vec<&str> = words.collect();
            assert_eq!(args.first(), Some(&"serve"), "{}: {exec}", unit.place);
            if let Err(e) = parse(&args) {
                panic!("{}: {exec}: {e}", unit.place);
            }
        }
    }
}
