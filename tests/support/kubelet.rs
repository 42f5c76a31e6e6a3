//! The kubelet's side, faked with the same gRPC stack over real Unix sockets: its Registration
//! service on kubelet.sock, its dial-back, and ListAndWatch helpers.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use futures_util::{FutureExt, StreamExt};
use grpcio::{
    CallOption, ChannelBuilder, ClientSStreamReceiver, EnvBuilder, Environment, RpcContext,
    ServerBuilder, ServerCredentials, UnarySink,
};
use kubelet_device_plugins::proto;

use super::WAIT;

/// What the fake kubelet saw of one `Register` call.
#[derive(Clone, Debug)]
pub struct Registration {
    pub request: proto::RegisterRequest,
    /// Whether the endpoint socket existed when Register arrived (serve before register).
    pub endpoint_existed: bool,
    /// When Register arrived.
    pub at: Instant,
}

#[derive(Clone)]
struct RegistrationService {
    dir: PathBuf,
    seen: Sender<Registration>,
}

impl proto::Registration for RegistrationService {
    fn register(
        &mut self,
        ctx: RpcContext<'_>,
        req: proto::RegisterRequest,
        sink: UnarySink<proto::Empty>,
    ) {
        let at = Instant::now();
        let endpoint_existed = self.dir.join(&req.endpoint).exists();
        let _ = self.seen.send(Registration {
            request: req,
            endpoint_existed,
            at,
        });
        ctx.spawn(sink.success(proto::Empty::new()).map(|_| ()));
    }
}

/// A kubelet's device manager, as far as plugins can tell: serves Registration on kubelet.sock
/// and dials plugins back.
pub struct FakeKubelet {
    pub dir: PathBuf,
    env: Arc<Environment>,
    server: Option<grpcio::Server>,
    seen_tx: Sender<Registration>,
    seen: Receiver<Registration>,
}

impl FakeKubelet {
    /// Starts serving kubelet.sock in `dir`.
    pub fn start(dir: &Path) -> FakeKubelet {
        let (seen_tx, seen) = crossbeam_channel::unbounded();
        let env = Arc::new(
            EnvBuilder::new()
                .cq_count(1)
                .name_prefix("fake-kubelet")
                .build(),
        );
        let mut kubelet = FakeKubelet {
            dir: dir.to_owned(),
            env,
            server: None,
            seen_tx,
            seen,
        };
        kubelet.serve();
        kubelet
    }

    fn serve(&mut self) {
        let service = RegistrationService {
            dir: self.dir.clone(),
            seen: self.seen_tx.clone(),
        };
        let mut server = ServerBuilder::new(Arc::clone(&self.env))
            .register_service(proto::create_registration(service))
            .build()
            .expect("build the fake kubelet's server");
        server
            .add_listening_port(
                format!("unix:{}", self.socket().display()),
                ServerCredentials::insecure(),
            )
            .expect("listen on kubelet.sock");
        server.start();
        self.server = Some(server);
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("kubelet.sock")
    }

    /// Stops serving and removes kubelet.sock, as a dying kubelet's socket disappears.
    pub fn stop(&mut self) {
        if let Some(mut server) = self.server.take() {
            server.cancel_all_calls();
            let _ = futures_executor::block_on(server.shutdown());
        }
        let _ = fs::remove_file(self.socket());
    }

    /// What the kubelet does when it starts again: wipe every file in the directory except its
    /// checkpoint, then create kubelet.sock.
    /// Returns when kubelet.sock was about to be created again.
    pub fn restart(&mut self) -> Instant {
        self.stop();
        for entry in fs::read_dir(&self.dir).expect("read the plugin directory") {
            let entry = entry.expect("read a directory entry");
            if entry.file_name() != "kubelet_internal_checkpoint" {
                let _ = fs::remove_file(entry.path());
            }
        }
        let at = Instant::now();
        self.serve();
        at
    }

    /// The next Register call, waiting up to `WAIT`.
    pub fn next_registration(&self) -> Registration {
        self.seen
            .recv_timeout(WAIT)
            .expect("a Register call within the time limit")
    }

    /// Waits until each of `resources` has registered (in any order); returns those calls.
    pub fn registrations_of(&self, resources: &[&str]) -> Vec<Registration> {
        let mut missing: Vec<&str> = resources.to_vec();
        let mut got = Vec::new();
        while !missing.is_empty() {
            let r = self.next_registration();
            missing.retain(|m| *m != r.request.resource_name);
            got.push(r);
        }
        got
    }

    /// The next Register call if one comes within `quiet`: for checks that none does, with a
    /// bound long enough to catch a late one.
    pub fn registration_within(&self, quiet: Duration) -> Option<Registration> {
        self.seen.recv_timeout(quiet).ok()
    }

    /// Register calls that arrived and were not yet taken.
    pub fn pending_registrations(&self) -> usize {
        self.seen.len()
    }

    /// A client for the plugin socket named `endpoint` in the directory.
    pub fn dial(&self, endpoint: &str) -> proto::DevicePluginClient {
        let channel = ChannelBuilder::new(Arc::clone(&self.env))
            .connect(&format!("unix:{}", self.dir.join(endpoint).display()));
        proto::DevicePluginClient::new(channel)
    }

    /// A client on a connection of its own, not shared with other clients of the same socket.
    pub fn dial_new_connection(&self, endpoint: &str) -> proto::DevicePluginClient {
        let channel = ChannelBuilder::new(Arc::clone(&self.env))
            .use_local_subchannel_pool(true)
            .connect(&format!("unix:{}", self.dir.join(endpoint).display()));
        proto::DevicePluginClient::new(channel)
    }
}

impl Drop for FakeKubelet {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Opens ListAndWatch with a deadline, so a plugin that never answers fails the test instead of
/// hanging it.
pub fn watch(
    client: &proto::DevicePluginClient,
) -> ClientSStreamReceiver<proto::ListAndWatchResponse> {
    client
        .list_and_watch_opt(
            &proto::Empty::new(),
            CallOption::default().timeout(STREAM_DEADLINE),
        )
        .expect("start ListAndWatch")
}

/// Longest a test keeps a ListAndWatch stream open.
pub const STREAM_DEADLINE: Duration = Duration::from_secs(120);

/// The next message of a ListAndWatch stream opened by `watch`.
pub fn next_list(
    stream: &mut ClientSStreamReceiver<proto::ListAndWatchResponse>,
) -> proto::ListAndWatchResponse {
    futures_executor::block_on(stream.next())
        .expect("ListAndWatch ended")
        .expect("ListAndWatch failed")
}

/// (ID, health) pairs of a device list.
pub fn health(list: &proto::ListAndWatchResponse) -> Vec<(String, String)> {
    list.devices
        .iter()
        .map(|d| (d.ID.clone(), d.health.clone()))
        .collect()
}
