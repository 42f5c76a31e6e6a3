//! The `probe` subcommand (main thread): plays the kubelet against any device plugin socket and
//! reports its options and first device list, and, if asked, what Allocate gives a container; a
//! failure to answer is an error, for liveness probes.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use grpcio::{CallOption, ChannelBuilder, EnvBuilder};
use serde::Serialize;

use crate::proto;
use crate::thread::ThreadHandle;

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
    #[error("{path} did not appear within {timeout:?}")]
    NeverAppeared { path: PathBuf, timeout: Duration },
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
    #[error("Allocate on {path} failed")]
    Allocate {
        path: PathBuf,
        #[source]
        source: grpcio::Error,
    },
}

/// What to ask, and of which socket.
#[derive(Debug)]
pub struct Request {
    /// The device plugin's socket.
    pub socket: PathBuf,
    /// How long each answer (and the socket's appearance, with `wait`) may take.
    pub timeout: Duration,
    /// Wait for the socket to appear rather than fail at once.
    pub wait: bool,
    /// Device IDs to allocate to one container; none means no Allocate call.
    pub allocate: Vec<String>,
}

/// What a plugin told us.
#[derive(Debug, Serialize)]
pub struct Report {
    /// The socket asked.
    pub socket: PathBuf,
    /// From GetDevicePluginOptions.
    pub pre_start_required: bool,
    /// From GetDevicePluginOptions.
    pub get_preferred_allocation_available: bool,
    /// The first ListAndWatch message.
    pub devices: Vec<DeviceReport>,
    /// From the first call to the first device list.
    pub elapsed_ms: f64,
    /// What Allocate gave the container, when asked to allocate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allocation: Option<AllocationReport>,
}

/// One device of the list.
#[derive(Debug, Serialize)]
pub struct DeviceReport {
    /// The device ID.
    pub id: String,
    /// Healthy or Unhealthy.
    pub health: String,
    /// NUMA nodes from its topology, if any.
    pub numa_nodes: Vec<i64>,
}

/// What one container gets from Allocate, as the runtime would apply it.
#[derive(Debug, Default, Serialize)]
pub struct AllocationReport {
    /// The IDs asked for.
    pub ids: Vec<String>,
    /// Device nodes: host path, container path, cgroup permissions.
    pub devices: Vec<DeviceSpecReport>,
    /// Host directories mounted into the container.
    pub mounts: Vec<MountReport>,
    /// Environment variables set in the container.
    pub envs: Vec<(String, String)>,
    /// Annotations passed to the runtime.
    pub annotations: Vec<(String, String)>,
    /// CDI device names the runtime injects.
    pub cdi_devices: Vec<String>,
}

/// One device node given to the container.
#[derive(Debug, Serialize)]
pub struct DeviceSpecReport {
    /// Where it is on the host.
    pub host_path: String,
    /// Where the container sees it.
    pub container_path: String,
    /// Device cgroup permissions (`r`, `w`, `m`).
    pub permissions: String,
}

/// One mount given to the container.
#[derive(Debug, Serialize)]
pub struct MountReport {
    /// The host directory.
    pub host_path: String,
    /// Where the container sees it.
    pub container_path: String,
    /// Whether it is read-only.
    pub read_only: bool,
}

/// Asks the plugin for its options and its first device list, and allocates if asked, each
/// within the timeout.
pub fn probe(request: &Request) -> Result<Report, ProbeError> {
    let socket = request.socket.as_path();
    let timeout = request.timeout;
    if request.wait {
        wait_for(socket, timeout)?;
    }
    check_socket(socket)?;
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
    // The stream stays open until the report is done, as the kubelet's would.
    let allocation = if request.allocate.is_empty() {
        None
    } else {
        Some(
            allocate(&client, &request.allocate, timeout).map_err(|source| {
                ProbeError::Allocate {
                    path: socket.to_owned(),
                    source,
                }
            })?,
        )
    };
    drop(stream);
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
        allocation,
    })
}

fn check_socket(socket: &Path) -> Result<(), ProbeError> {
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
    Ok(())
}

/// Waits, through inotify on its directory, until `socket` exists or `timeout` passes.
fn wait_for(socket: &Path, timeout: Duration) -> Result<(), ProbeError> {
    use inotify::{Inotify, WatchMask};
    let error = |source| ProbeError::Socket {
        path: socket.to_owned(),
        source,
    };
    let dir = socket
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut inotify = Inotify::init().map_err(error)?;
    let mut watches = inotify.watches();
    let wd = watches
        .add(dir, WatchMask::CREATE | WatchMask::MOVED_TO)
        .map_err(error)?;
    // inotify's read blocks without a timeout: a thread blocks in it and posts each wake-up, and
    // this one waits for those with the deadline. Removing the watch wakes the read to stop it.
    let (woken_tx, woken) = crossbeam_channel::bounded(1);
    // Its panic is reported in the log; probe has no control loop to hear of it otherwise.
    let (panics, _) = crossbeam_channel::unbounded();
    let thread = ThreadHandle::spawn(
        "probe-inotify",
        panics,
        move || {
            let mut buffer = [0u8; 1024];
            while let Ok(events) = inotify.read_events_blocking(&mut buffer) {
                let ignored = events
                    .into_iter()
                    .any(|e| e.mask.contains(inotify::EventMask::IGNORED));
                if ignored || woken_tx.try_send(()).is_err_and(|e| e.is_disconnected()) {
                    return;
                }
            }
        },
        move || {
            let _ = watches.remove(wd);
        },
    )
    .map_err(error)?;
    let deadline = Instant::now() + timeout;
    // Looked at after the watch is in place, so a socket created in between is not missed.
    let mut appeared = true;
    while !socket.exists() {
        if woken.recv_deadline(deadline).is_err() {
            appeared = false;
            break;
        }
    }
    thread.stop();
    if appeared {
        Ok(())
    } else {
        Err(ProbeError::NeverAppeared {
            path: socket.to_owned(),
            timeout,
        })
    }
}

/// One Allocate call for one container with `ids`.
fn allocate(
    client: &proto::DevicePluginClient,
    ids: &[String],
    timeout: Duration,
) -> grpcio::Result<AllocationReport> {
    let mut container = proto::ContainerAllocateRequest::new();
    container.devices_ids = ids.to_vec();
    let mut request = proto::AllocateRequest::new();
    request.container_requests.push(container);
    let mut response = client.allocate_opt(&request, CallOption::default().timeout(timeout))?;
    let mut report = AllocationReport {
        ids: ids.to_vec(),
        ..AllocationReport::default()
    };
    let Some(answer) = response.container_responses.pop() else {
        return Ok(report);
    };
    report.devices = answer
        .devices
        .into_iter()
        .map(|d| DeviceSpecReport {
            host_path: d.host_path,
            container_path: d.container_path,
            permissions: d.permissions,
        })
        .collect();
    report.mounts = answer
        .mounts
        .into_iter()
        .map(|m| MountReport {
            host_path: m.host_path,
            container_path: m.container_path,
            read_only: m.read_only,
        })
        .collect();
    report.envs = answer.envs.into_iter().collect();
    report.envs.sort();
    report.annotations = answer.annotations.into_iter().collect();
    report.annotations.sort();
    report.cdi_devices = answer.cdi_devices.into_iter().map(|c| c.name).collect();
    Ok(report)
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
        if let Some(a) = &self.allocation {
            out.push_str(&a.to_table());
        }
        out
    }
}

impl AllocationReport {
    /// Human-readable form: what the container gets, one line each.
    pub fn to_table(&self) -> String {
        let mut out = format!("allocate {}: the container gets\n", self.ids.join(","));
        for d in &self.devices {
            out.push_str(&format!(
                "  device {} -> {} ({})\n",
                d.host_path, d.container_path, d.permissions
            ));
        }
        for m in &self.mounts {
            let mode = if m.read_only { "ro" } else { "rw" };
            out.push_str(&format!(
                "  mount {} -> {} ({mode})\n",
                m.host_path, m.container_path
            ));
        }
        for (k, v) in &self.envs {
            out.push_str(&format!("  env {k}={v}\n"));
        }
        for (k, v) in &self.annotations {
            out.push_str(&format!("  annotation {k}={v}\n"));
        }
        for name in &self.cdi_devices {
            out.push_str(&format!("  cdi {name}\n"));
        }
        out
    }
}
