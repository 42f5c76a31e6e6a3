//! The `probe` subcommand (main thread): plays the kubelet against any device plugin socket and
//! reports its options and first device list; a failure to answer is an error, for liveness probes.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use grpcio::{CallOption, ChannelBuilder, EnvBuilder};
use serde::Serialize;

use crate::proto;

/// What can fail here. Each variant's `#[error]` message is its documentation.
#[allow(missing_docs)]
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("cannot use the socket {path}")]
    Socket {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not a Unix socket")]
    NotASocket { path: PathBuf },
    #[error("GetDevicePluginOptions on {path} failed")]
    Options {
        path: PathBuf,
        #[source]
        source: grpcio::Error,
    },
    #[error("ListAndWatch on {path} failed")]
    ListAndWatch {
        path: PathBuf,
        #[source]
        source: grpcio::Error,
    },
    #[error("ListAndWatch on {path} ended before sending a device list")]
    NoList { path: PathBuf },
}

/// What a plugin told us.
#[derive(Debug, Serialize)]
pub struct Report {
    pub socket: PathBuf,
    pub pre_start_required: bool,
    pub get_preferred_allocation_available: bool,
    pub devices: Vec<DeviceReport>,
    /// From the first call to the first device list.
    pub elapsed_ms: f64,
}

#[derive(Debug, Serialize)]
pub struct DeviceReport {
    pub id: String,
    pub health: String,
    pub numa_nodes: Vec<i64>,
}

/// Asks the plugin at `socket` for its options and its first device list, each within `timeout`.
pub fn probe(socket: &Path, timeout: Duration) -> Result<Report, ProbeError> {
    use std::os::unix::fs::FileTypeExt;
    let meta = std::fs::metadata(socket).map_err(|source| ProbeError::Socket {
        path: socket.to_owned(),
        source,
    })?;
    if !meta.file_type().is_socket() {
        return Err(ProbeError::NotASocket {
            path: socket.to_owned(),
        });
    }
    let env = Arc::new(EnvBuilder::new().cq_count(1).name_prefix("probe").build());
    let channel = ChannelBuilder::new(env).connect(&format!("unix:{}", socket.display()));
    let client = proto::DevicePluginClient::new(channel);
    let started = Instant::now();
    let options = client
        .get_device_plugin_options_opt(&proto::Empty::new(), CallOption::default().timeout(timeout))
        .map_err(|source| ProbeError::Options {
            path: socket.to_owned(),
            source,
        })?;
    let list_error = |source| ProbeError::ListAndWatch {
        path: socket.to_owned(),
        source,
    };
    let mut stream = client
        .list_and_watch_opt(&proto::Empty::new(), CallOption::default().timeout(timeout))
        .map_err(list_error)?;
    let first = futures_executor::block_on(stream.next())
        .ok_or_else(|| ProbeError::NoList {
            path: socket.to_owned(),
        })?
        .map_err(list_error)?;
    let elapsed_ms = started.elapsed().as_secs_f64() * 1e3;
    Ok(Report {
        socket: socket.to_owned(),
        pre_start_required: options.pre_start_required,
        get_preferred_allocation_available: options.get_preferred_allocation_available,
        devices: first
            .devices
            .into_iter()
            .map(|d| DeviceReport {
                numa_nodes: d
                    .topology
                    .as_ref()
                    .map(|t| t.nodes.iter().map(|n| n.ID).collect())
                    .unwrap_or_default(),
                id: d.ID,
                health: d.health,
            })
            .collect(),
        elapsed_ms,
    })
}

impl Report {
    /// Human-readable form: options, then one line per device.
    pub fn to_table(&self) -> String {
        let mut out = format!(
            "socket: {}\npre_start_required: {}\nget_preferred_allocation_available: {}\nanswered in: {:.1} ms\n",
            self.socket.display(),
            self.pre_start_required,
            self.get_preferred_allocation_available,
            self.elapsed_ms
        );
        let healthy = self
            .devices
            .iter()
            .filter(|d| d.health == proto::HEALTHY)
            .count();
        out.push_str(&format!(
            "devices: {} ({healthy} healthy)\n",
            self.devices.len()
        ));
        let width = self
            .devices
            .iter()
            .map(|d| d.id.len())
            .max()
            .unwrap_or(2)
            .max(2);
        out.push_str(&format!("{:width$}  {:9}  NUMA\n", "ID", "HEALTH"));
        for d in &self.devices {
            let numa: Vec<String> = d.numa_nodes.iter().map(i64::to_string).collect();
            let numa = if numa.is_empty() {
                "-".to_owned()
            } else {
                numa.join(",")
            };
            out.push_str(&format!("{:width$}  {:9}  {numa}\n", d.id, d.health));
        }
        out
    }
}
