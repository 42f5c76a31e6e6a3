//! Every message that crosses a thread boundary, below every thread that sends or receives one.
//!
//! Two channels carry them, both crossbeam:
//!
//! 1. `Event`s flow to the control loop (main thread), from:
//!    - the "inotify" thread: `KubeletSocketCreated`, `KubeletSocketRemoved`, `SocketRemoved`,
//!      `DevicesChanged`, `LocksChanged`, `LabelsChanged`, `ConfigChanged`, `Resync`,
//!      `SocketDirGone`, `InotifyFailed`;
//!    - the "signals" thread: `Reload` (SIGHUP) and `Shutdown` (SIGTERM, SIGINT);
//!    - the "register" thread (device plugin, kubelet-socket mode): `Registered`, once the
//!      kubelet accepted a `Register` call;
//!    - the completion-queue threads, from the plugin watcher's `NotifyRegistrationStatus`
//!      (device plugin and DRA driver alike): `Registered` and `RegistrationRefused`, and from
//!      the end of the kubelet's own ListAndWatch stream: `StreamLost` (a send on an unbounded
//!      channel never blocks);
//!    - the "health" thread: `Ping`, for each liveness probe;
//!    - DRA's "kubelet-release" thread: `LocksChanged`, once it knows whether a standby may
//!      serve beside the instance that holds the driver;
//!    - any thread started through [`crate::thread::ThreadHandle`] ("register", "http",
//!      "health", DRA's "prepare", "slices" and "slice-watch"): `ThreadPanicked`.
//! 2. `RegisterCommand`s flow from the control loop to the "register" thread, which dials
//!    `kubelet.sock`; the control loop never waits for the answer. DRA's threads have commands
//!    of their own, in `dra/` (they are DRA's alone).
//!
//! Events describe what happened, never what to do about it: the control loop decides.

use std::ffi::OsString;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::proto;

/// Everything the control loop reacts to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// `kubelet.sock` appeared: the kubelet started (or restarted) and wiped our sockets.
    KubeletSocketCreated,
    /// `kubelet.sock` went away: the kubelet stopped.
    KubeletSocketRemoved,
    /// One of our sockets (by file name) was removed.
    SocketRemoved(OsString),
    /// A device node may have appeared or disappeared.
    DevicesChanged,
    /// A lock file of our sockets (`lock.rs`) came or went: another instance may have let go.
    /// Also sent when what a standby waits on besides a lock is known (DRA's kubelet release).
    LocksChanged,
    /// A node label file of ours (NFD's `features.d/`) came or went: a cleanup may have
    /// removed one.
    LabelsChanged,
    /// The configuration file was written or replaced.
    ConfigChanged,
    /// Events were lost: check everything.
    Resync,
    /// The directory holding our sockets went away.
    SocketDirGone(std::path::PathBuf),
    /// The inotify thread cannot go on.
    InotifyFailed,
    /// The kubelet accepted the registration of this resource.
    Registered(String),
    /// The kubelet ended its ListAndWatch stream of this resource: it no longer holds our
    /// endpoint (it stopped, or, from 1.25 to 1.36, an older instance's stream ended and the
    /// kubelet disconnected the newest one with it).
    StreamLost(String),
    /// The kubelet's plugin watcher refused the registration of this resource.
    RegistrationRefused {
        /// The resource name.
        resource: String,
        /// The kubelet's reason.
        error: String,
    },
    /// SIGHUP: read the configuration again.
    Reload,
    /// SIGTERM or SIGINT, by name.
    Shutdown(&'static str),
    /// A thread of ours panicked (by name); the process cannot be trusted to go on.
    ThreadPanicked(String),
    /// The "health" thread asks whether the control loop is alive: answer it.
    Ping(Pong),
}

/// Where the control loop answers a [`Event::Ping`]. Events compare by what happened, and every
/// ping is the same question, so all are equal.
#[derive(Clone, Debug)]
pub struct Pong(crossbeam_channel::Sender<()>);

impl Pong {
    /// A pong that answers on `tx`.
    pub fn new(tx: crossbeam_channel::Sender<()>) -> Pong {
        Pong(tx)
    }

    /// Says the control loop is alive; a prober that stopped waiting is no one's concern.
    pub fn answer(&self) {
        let _ = self.0.try_send(());
    }
}

impl PartialEq for Pong {
    fn eq(&self, _: &Pong) -> bool {
        true
    }
}

impl Eq for Pong {}

/// One resource to register through `kubelet.sock`: everything the `RegisterRequest` carries.
#[derive(Clone, Debug, PartialEq)]
pub struct RegisterJob {
    /// The extended resource name, `<domain>/<name>`.
    pub resource_name: String,
    /// Socket file name, relative to the kubelet's device-plugin directory.
    pub endpoint: String,
    /// What the DevicePlugin service implements (kubelet 1.20 reads them only from here).
    pub options: proto::DevicePluginOptions,
    /// Which server instance serves the endpoint: registering the same one with the same
    /// kubelet twice only makes the kubelet hold two streams.
    pub server: u64,
    /// The kubelet's calls to that server so far.
    pub kubelet_calls: KubeletCalls,
}

/// How many times the kubelet has called one server of ours (`GetDevicePluginOptions`, which
/// kubelets from 1.25 make before answering Register, or a ListAndWatch stream): a count that
/// moved shows the kubelet holds that server, whichever registration made it dial. The kubelet
/// dials a socket path, not a server, so a Register sent for the server that served there before
/// can leave the kubelet holding the one serving there now.
#[derive(Clone, Debug, Default)]
pub struct KubeletCalls(Arc<AtomicU64>);

impl KubeletCalls {
    /// Counts one call.
    pub fn add(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    /// The calls so far.
    pub fn count(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Equal when they count the same server's calls.
impl PartialEq for KubeletCalls {
    fn eq(&self, other: &KubeletCalls) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl RegisterJob {
    /// The `RegisterRequest` the kubelet expects for this job.
    pub fn request(&self) -> proto::RegisterRequest {
        let mut request = proto::RegisterRequest::new();
        request.version = proto::VERSION.to_owned();
        request.endpoint.clone_from(&self.endpoint);
        request.resource_name.clone_from(&self.resource_name);
        request.options = Some(self.options.clone()).into();
        request
    }
}

/// What the control loop asks of the "register" thread.
#[derive(Debug, Clone, PartialEq)]
pub enum RegisterCommand {
    /// Register now, replacing any pending attempt for the same resource.
    Register(RegisterJob),
    /// Register the same server again with the kubelet that dropped it (it ended our stream),
    /// at once, replacing any pending attempt for the resource. Given up if `kubelet.sock` is
    /// replaced meanwhile: a kubelet that restarted finds us by itself, or through the control
    /// loop's own Register.
    Again(RegisterJob),
    /// Give up pending attempts for this resource (it stopped).
    Forget(String),
    /// End the thread, cancelling a call in flight.
    Stop,
}
