//! kubelet-device-plugins: hands Linux device nodes to the pods that request them, through the
//! kubelet's device plugin API or as a DRA driver. This file wires the subcommands to their
//! modules and parses `serve`'s settings once (main thread).

// The public modules are what the tests, the benchmark and the fuzz targets drive directly; the
// rest is the daemon's inside, reachable only through `run`.
pub mod cli;
pub mod config;
pub mod device;
pub mod device_plugin;
pub mod proto;
pub mod server;

mod broadcast;
mod cdi;
mod control;
mod daemon;
mod discover;
#[cfg(test)]
mod doc_blocks;
mod dra;
mod error;
mod event;
mod files;
mod health;
mod http;
mod ids;
mod inotify;
mod layout;
mod lock;
mod metrics;
mod nfd;
mod probe;
mod registration;
mod rpc;
mod signals;
mod thread;
pub mod usb;

use std::io::Write;
use std::net::SocketAddr;

use cli::{Cli, Command, Output};
pub use error::error_chain;

/// What can fail here. Each variant's `#[error]` message is its documentation.
#[allow(missing_docs)]
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("invalid configuration")]
    Config(#[from] cli::CliError),
    #[error("invalid configuration")]
    ConfigFile(#[from] config::ConfigError),
    #[error(transparent)]
    Daemon(#[from] daemon::DaemonError),
    #[error(transparent)]
    Probe(#[from] probe::ProbeError),
    #[error(transparent)]
    Health(#[from] health::HealthError),
    #[error("cannot write the output")]
    Output(#[source] serde_json::Error),
}

impl RunError {
    /// One line that tells a newcomer what to do next, where the error alone does not.
    pub fn hint(&self) -> Option<&'static str> {
        match self {
            RunError::Daemon(daemon::DaemonError::Layout(layout::LayoutError::Dir { .. })) => Some(
                "to try the plugin without a kubelet, serve on a temporary directory: \
                 kubelet-device-plugins serve --plugin-dir \"$(mktemp -d)\" --registration kubelet-socket \
                 (README.md, \"Try it without a cluster\")",
            ),
            _ => None,
        }
    }

    /// 2 for configuration the operator must fix, 1 for everything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            RunError::Config(_) | RunError::ConfigFile(_) => 2,
            RunError::Daemon(e) if e.is_configuration() => 2,
            _ => 1,
        }
    }
}

/// Runs the chosen subcommand.
pub fn run(cli: Cli) -> Result<(), RunError> {
    match cli.command {
        Command::Serve(args) => daemon::run(&settings(*args)?)?,
        Command::Discover(args) => {
            let resources = args.resources.sources(true)?.load()?;
            let found = discover::discover(&resources, &args.resources.sys_root);
            match args.output {
                Output::Table => print!("{}", discover::to_table(&found)),
                Output::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&found).map_err(RunError::Output)?
                ),
            }
        }
        Command::Probe(args) => {
            let report = probe::probe(&probe::Request {
                socket: args.socket,
                timeout: args.timeout,
                wait: args.wait,
                allocate: args.allocate,
            })?;
            match args.output {
                Output::Table => print!("{}", report.to_table()),
                Output::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&report).map_err(RunError::Output)?
                ),
            }
        }
        Command::Alive(args) => {
            let question = if args.ready {
                health::Question::Ready
            } else {
                health::Question::Alive
            };
            health::alive(&args.socket, question, args.timeout)?;
        }
    }
    Ok(())
}

/// The daemon's settings from `serve`'s arguments and the configuration file, checked once.
fn settings(args: cli::ServeArgs) -> Result<daemon::Settings, RunError> {
    let mut sources = args.resources.sources(false)?;
    let mode = match (args.mode, &sources.file) {
        (Some(mode), _) => mode,
        (None, Some(path)) => config::file_mode(path)?.unwrap_or_default(),
        (None, None) => config::ServeMode::default(),
    };
    let frontend = match mode {
        config::ServeMode::DevicePlugin => daemon::FrontendSettings::DevicePlugin {
            plugin_dir: args.plugin_dir,
            registration: args.registration,
        },
        config::ServeMode::Dra => {
            // Built-ins whose nodes are missing are offered at once, as tainted devices, which
            // become usable when the node appears (a module loaded later).
            let late = std::mem::take(&mut sources.late);
            sources.from_flags.extend(late);
            daemon::FrontendSettings::Dra(dra::Settings {
                kubelet_dir: args
                    .plugin_dir
                    .parent()
                    .map_or_else(|| "/var/lib/kubelet".into(), ToOwned::to_owned),
                driver: args.driver,
                node_name: args.node_name,
                credentials: args.credentials,
                pod_uid: args.pod_uid,
            })
        }
    };
    Ok(daemon::Settings {
        resources: sources.load()?,
        sources,
        sys_root: args.resources.sys_root,
        cdi_dir: args.cdi_dir,
        metrics_address: args
            .metrics_port
            .map(|port| SocketAddr::new(args.metrics_bind, port)),
        health_socket: args.health_socket,
        nfd_dir: args.nfd_features_dir,
        frontend,
    })
}

/// Logs to stderr with the thread name on every line. RUST_LOG, when set, overrides `level`.
pub fn init_logging(level: log::LevelFilter) {
    let mut builder = env_logger::Builder::new();
    builder.filter_level(level);
    if let Ok(spec) = std::env::var("RUST_LOG") {
        builder.parse_filters(&spec);
    }
    builder.format(|buf, record| {
        let thread = std::thread::current();
        writeln!(
            buf,
            "{} {:5} [{}] {}",
            buf.timestamp_micros(),
            record.level(),
            thread.name().unwrap_or("?"),
            record.args()
        )
    });
    builder.init();
}
