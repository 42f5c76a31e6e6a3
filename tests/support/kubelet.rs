//! The kubelet's side, faked with the same gRPC stack over real Unix sockets: its Registration
//! service on kubelet.sock and, like the kubelet's device manager, a dial-back after every
//! Register (GetDevicePluginOptions, then ListAndWatch held open, its end taken as a disconnect),
//! plus ListAndWatch helpers for tests that watch for themselves. Its device manager keeps the
//! endpoints apart, as 1.20 to 1.24 and 1.37 do, or, like 1.25 to 1.36 (before kubernetes PR
//! #135437), one client per resource name, disconnecting whichever is registered when any of
//! that name's streams ends. Like 1.37 it may also key endpoints by socket path, with that
//! release's refusal of a path whose last client it has not torn down yet.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use futures_util::future::Either;
use futures_util::task::AtomicWaker;
use futures_util::{FutureExt, StreamExt};
use grpcio::{
    CallOption, ChannelBuilder, ClientSStreamReceiver, EnvBuilder, Environment, RpcContext,
    ServerBuilder, ServerCredentials, UnarySink,
};
use kubelet_device_plugins::proto;

use super::WAIT;

/// What the fake kubelet saw of one `Register` call it accepted.
#[derive(Clone, Debug)]
pub struct Registration {
    pub request: proto::RegisterRequest,
    /// Whether the endpoint socket existed when Register arrived (serve before register).
    pub endpoint_existed: bool,
    /// When Register arrived.
    pub at: Instant,
}

/// What the fake kubelet's device manager saw on the connections it made itself.
#[derive(Debug)]
pub enum Seen {
    /// GetDevicePluginOptions answered, right after a Register.
    Options {
        resource: String,
        options: proto::DevicePluginOptions,
    },
    /// A device list on the kubelet's own ListAndWatch stream.
    List {
        resource: String,
        list: proto::ListAndWatchResponse,
    },
    /// The stream ended (for any reason, OK included): the kubelet marks every device of the
    /// resource Unhealthy until the plugin registers again.
    Disconnected { resource: String, at: Instant },
}

/// The user agent the kubelet's gRPC library sends; the plugin counts only such streams for
/// readiness, so the fake's clients send it too.
pub const KUBELET_USER_AGENT: &str = "grpc-go/1.72.0 (fake kubelet)";

#[derive(Clone)]
struct RegistrationService {
    dir: PathBuf,
    seen: Sender<Registration>,
    /// Endpoints to dial back, by resource; `None` for a kubelet that never does.
    dial_back: Option<Sender<DialBack>>,
    /// The endpoints by socket path, for a kubelet that keys them so (`Clients::PerPath`).
    paths: Option<Paths>,
}

/// One endpoint to dial back: its resource, its socket, and its entry in [`Paths`].
type DialBack = (String, PathBuf, u64);

/// What a 1.37 device manager holds by socket path: the client it registered there (a number of
/// its own), or, after it refused a second registration of the path, a client it forgot
/// without disconnecting (`None`), which keeps the path taken for good.
#[derive(Clone, Default)]
struct Paths {
    held: Arc<Mutex<HashMap<PathBuf, Option<u64>>>>,
    /// While true, clients whose stream ended are not torn down yet, their connection still
    /// open: the moment between a stream's end and the kubelet's `Disconnect`, held open for a
    /// test.
    teardowns_held: Arc<(Mutex<bool>, std::sync::Condvar)>,
}

impl Paths {
    /// Registers a client at `path`, or refuses as 1.37 does when one is there.
    fn take(&self, path: &Path, number: u64) -> Result<(), String> {
        let mut held = self.held.lock().unwrap();
        match held.get_mut(path) {
            Some(client) => {
                // `connectClient` fails in `PluginConnected`, then `deregisterClient` drops
                // every client of the path, the old one too, which is never disconnected.
                *client = None;
                Err(format!(
                    "device plugin already connected: {}",
                    path.display()
                ))
            }
            None => {
                held.insert(path.to_owned(), Some(number));
                Ok(())
            }
        }
    }

    /// Returns once the test lets teardowns happen.
    fn wait_for_teardowns(&self) {
        let (lock, released) = &*self.teardowns_held;
        let mut waiting = lock.lock().unwrap();
        while *waiting {
            waiting = released.wait(waiting).unwrap();
        }
    }

    /// Tears down client `number` at `path`: its path may be registered again.
    fn tear_down(&self, path: &Path, number: u64) {
        let mut held = self.held.lock().unwrap();
        if held.get(path) == Some(&Some(number)) {
            held.remove(path);
        }
    }

    fn hold_teardowns(&self, hold: bool) {
        let (lock, released) = &*self.teardowns_held;
        *lock.lock().unwrap() = hold;
        released.notify_all();
    }
}

/// Lets the fake kubelet tear down ended clients again when dropped.
pub struct TeardownsHeld(Paths);

impl Drop for TeardownsHeld {
    fn drop(&mut self) {
        self.0.hold_teardowns(false);
    }
}

impl proto::Registration for RegistrationService {
    fn register(
        &mut self,
        ctx: RpcContext<'_>,
        req: proto::RegisterRequest,
        sink: UnarySink<proto::Empty>,
    ) {
        let at = Instant::now();
        let path = self.dir.join(&req.endpoint);
        let endpoint_existed = path.exists();
        static NUMBERS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let number = NUMBERS.fetch_add(1, Ordering::Relaxed);
        if let Some(paths) = &self.paths {
            if let Err(refusal) = paths.take(&path, number) {
                let status =
                    grpcio::RpcStatus::with_message(grpcio::RpcStatusCode::UNKNOWN, refusal);
                ctx.spawn(sink.fail(status).map(|_| ()));
                return;
            }
        }
        if let Some(dial_back) = &self.dial_back {
            let _ = dial_back.send((req.resource_name.clone(), path, number));
        }
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
    dial_back: Option<Sender<DialBack>>,
    paths: Option<Paths>,
    manager: Receiver<Seen>,
    /// What the device manager saw that no test took yet.
    held: std::cell::RefCell<std::collections::VecDeque<Seen>>,
}

/// How the fake device manager keeps the clients it dialled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Clients {
    /// Each endpoint on its own: a stream's end touches no other (1.20 to 1.24, and 1.37).
    PerEndpoint,
    /// Each endpoint on its own, keyed by socket path as 1.37 keys them: a Register of a path
    /// whose client's stream has not been torn down yet is refused, and that path stays
    /// refused (see [`Paths`]; kubernetes PR #139338 calls the same-socket case unsupported).
    PerPath,
    /// One client per resource name, the last registered; when any stream of the name ends, the
    /// one registered then is disconnected too (`runClient` then `getClient(name)` and
    /// `disconnectClient`, 1.25 to 1.36).
    OnePerName,
}

impl FakeKubelet {
    /// Starts serving kubelet.sock in `dir`, dialing back every plugin that registers.
    pub fn start(dir: &Path) -> FakeKubelet {
        FakeKubelet::new(dir, Some(Clients::PerEndpoint))
    }

    /// A kubelet whose device manager has the bug of 1.25 to 1.36 (see [`Clients::OnePerName`]).
    pub fn start_with_one_client_per_name(dir: &Path) -> FakeKubelet {
        FakeKubelet::new(dir, Some(Clients::OnePerName))
    }

    /// A kubelet whose device manager keys endpoints by socket path, with 1.37's refusal (see
    /// [`Clients::PerPath`]).
    pub fn start_keyed_by_path(dir: &Path) -> FakeKubelet {
        FakeKubelet::new(dir, Some(Clients::PerPath))
    }

    /// Keeps clients whose stream ended registered (for `Clients::PerPath`) until the guard is
    /// dropped: the moment in which 1.37 has not torn the last client down yet, made long.
    pub fn hold_teardowns(&self) -> TeardownsHeld {
        let paths = self.paths.clone().expect("a kubelet keyed by path");
        paths.hold_teardowns(true);
        TeardownsHeld(paths)
    }

    /// A kubelet that takes Register calls and never dials back: the plugin is registered but
    /// has sent the kubelet nothing.
    pub fn start_without_dial_back(dir: &Path) -> FakeKubelet {
        FakeKubelet::new(dir, None)
    }

    fn new(dir: &Path, dials_back: Option<Clients>) -> FakeKubelet {
        let (seen_tx, seen) = crossbeam_channel::unbounded();
        let env = Arc::new(
            EnvBuilder::new()
                .cq_count(1)
                .name_prefix("fake-kubelet")
                .build(),
        );
        let (manager_tx, manager) = crossbeam_channel::unbounded();
        let paths = (dials_back == Some(Clients::PerPath)).then(Paths::default);
        let dial_back = dials_back.map(|clients| {
            let (dial_back, jobs) = crossbeam_channel::unbounded();
            let env = Arc::clone(&env);
            let paths = paths.clone();
            std::thread::Builder::new()
                .name("fake-device-manager".into())
                .spawn(move || device_manager(&env, clients, paths.as_ref(), &jobs, &manager_tx))
                .expect("start the fake device manager");
            dial_back
        });
        let mut kubelet = FakeKubelet {
            dir: dir.to_owned(),
            env,
            server: None,
            seen_tx,
            seen,
            dial_back,
            paths,
            manager,
            held: std::cell::RefCell::default(),
        };
        kubelet.serve();
        kubelet
    }

    fn serve(&mut self) {
        let service = RegistrationService {
            dir: self.dir.clone(),
            seen: self.seen_tx.clone(),
            dial_back: self.dial_back.clone(),
            paths: self.paths.clone(),
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

    /// The first thing the device manager saw on its own connections that `wanted` picks,
    /// waiting up to `WAIT`; what it passes over stays for later calls, in order.
    fn take_seen<T>(
        &self,
        what: &str,
        wanted: impl Fn(&Seen) -> bool,
        into: impl Fn(Seen) -> Option<T>,
    ) -> T {
        let mut held = self.held.borrow_mut();
        if let Some(i) = held.iter().position(&wanted) {
            if let Some(value) = held.remove(i).and_then(&into) {
                return value;
            }
        }
        let deadline = Instant::now() + WAIT;
        loop {
            let seen = self
                .manager
                .recv_deadline(deadline)
                .unwrap_or_else(|_| panic!("the fake kubelet never saw {what}; it saw {held:?}"));
            if wanted(&seen) {
                if let Some(value) = into(seen) {
                    return value;
                }
            } else {
                held.push_back(seen);
            }
        }
    }

    /// The options the kubelet got from `resource` after it registered.
    pub fn options_of(&self, resource: &str) -> proto::DevicePluginOptions {
        self.take_seen(
            "options",
            |s| matches!(s, Seen::Options { resource: r, .. } if r == resource),
            |s| match s {
                Seen::Options { options, .. } => Some(options),
                _ => None,
            },
        )
    }

    /// The next device list of `resource` on the kubelet's own stream.
    pub fn list_of(&self, resource: &str) -> proto::ListAndWatchResponse {
        self.take_seen(
            "a device list",
            |s| matches!(s, Seen::List { resource: r, .. } if r == resource),
            |s| match s {
                Seen::List { list, .. } => Some(list),
                _ => None,
            },
        )
    }

    /// Waits until the kubelet's stream of `resource` ends; when it did.
    pub fn disconnect_of(&self, resource: &str) -> Instant {
        self.take_seen(
            "a disconnect",
            |s| matches!(s, Seen::Disconnected { resource: r, .. } if r == resource),
            |s| match s {
                Seen::Disconnected { at, .. } => Some(at),
                _ => None,
            },
        )
    }

    /// Register calls that arrived and were not yet taken.
    pub fn pending_registrations(&self) -> usize {
        self.seen.len()
    }

    /// A client for the plugin socket named `endpoint` in the directory.
    pub fn dial(&self, endpoint: &str) -> proto::DevicePluginClient {
        let channel = ChannelBuilder::new(Arc::clone(&self.env))
            .primary_user_agent(KUBELET_USER_AGENT)
            .connect(&format!("unix:{}", self.dir.join(endpoint).display()));
        proto::DevicePluginClient::new(channel)
    }

    /// A client on a connection of its own, not shared with other clients of the same socket.
    pub fn dial_new_connection(&self, endpoint: &str) -> proto::DevicePluginClient {
        let channel = ChannelBuilder::new(Arc::clone(&self.env))
            .primary_user_agent(KUBELET_USER_AGENT)
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

/// A disconnect another thread can ask of an endpoint's stream.
#[derive(Default)]
struct Disconnect {
    asked: AtomicBool,
    waker: AtomicWaker,
}

impl Disconnect {
    fn ask(&self) {
        self.asked.store(true, Ordering::Release);
        self.waker.wake();
    }

    async fn asked(&self) {
        futures_util::future::poll_fn(|cx| {
            self.waker.register(cx.waker());
            if self.asked.load(Ordering::Acquire) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await;
    }
}

/// The clients the device manager registered, by resource name: a number of its own and the
/// way to disconnect it.
type Registered = Arc<Mutex<HashMap<String, (u64, Arc<Disconnect>)>>>;

/// The fake kubelet's device manager: for every registration, on a thread of its own as the
/// kubelet runs a goroutine per endpoint, dials the endpoint, asks for its options and holds its
/// ListAndWatch stream open, reporting every list and the stream's end; then, as `clients` says,
/// disconnects whichever client of the name is registered.
fn device_manager(
    env: &Arc<Environment>,
    clients: Clients,
    paths: Option<&Paths>,
    jobs: &Receiver<DialBack>,
    seen: &Sender<Seen>,
) {
    let registered: Registered = Arc::default();
    for (resource, endpoint, number) in jobs {
        let disconnect = Arc::new(Disconnect::default());
        registered
            .lock()
            .unwrap()
            .insert(resource.clone(), (number, Arc::clone(&disconnect)));
        let (env, seen, registered) = (Arc::clone(env), seen.clone(), Arc::clone(&registered));
        let paths = paths.cloned();
        let spawned = std::thread::Builder::new()
            .name("fake-endpoint".into())
            .spawn(move || {
                run_endpoint(
                    &env,
                    &resource,
                    &endpoint,
                    &disconnect,
                    &seen,
                    paths.as_ref(),
                );
                if let Some(paths) = &paths {
                    paths.tear_down(&endpoint, number);
                }
                let mut registered = registered.lock().unwrap();
                match registered.get(&resource) {
                    Some((current, other)) if clients == Clients::OnePerName => {
                        let (current, other) = (*current, Arc::clone(other));
                        registered.remove(&resource);
                        if current != number {
                            other.ask();
                        }
                    }
                    Some((current, _)) if *current == number => {
                        registered.remove(&resource);
                    }
                    _ => {}
                }
            });
        if spawned.is_err() {
            return;
        }
    }
}

/// One endpoint's client: options, then its ListAndWatch stream until it ends or is
/// disconnected.
fn run_endpoint(
    env: &Arc<Environment>,
    resource: &str,
    endpoint: &Path,
    disconnect: &Disconnect,
    seen: &Sender<Seen>,
    paths: Option<&Paths>,
) {
    let channel = ChannelBuilder::new(Arc::clone(env))
        .primary_user_agent(KUBELET_USER_AGENT)
        .use_local_subchannel_pool(true)
        .connect(&format!("unix:{}", endpoint.display()));
    let client = proto::DevicePluginClient::new(channel);
    let resource = resource.to_owned();
    let options = client
        .get_device_plugin_options_opt(&proto::Empty::new(), CallOption::default().timeout(WAIT));
    match options {
        Ok(options) => {
            let resource = resource.clone();
            let _ = seen.send(Seen::Options { resource, options });
        }
        Err(_) => {
            let at = Instant::now();
            let _ = seen.send(Seen::Disconnected { resource, at });
            return;
        }
    }
    if let Ok(mut stream) = client.list_and_watch_opt(
        &proto::Empty::new(),
        CallOption::default().timeout(STREAM_DEADLINE),
    ) {
        loop {
            let next = futures_executor::block_on(futures_util::future::select(
                stream.next(),
                Box::pin(disconnect.asked()),
            ));
            match next {
                Either::Left((Some(Ok(list)), _)) => {
                    let resource = resource.clone();
                    if seen.send(Seen::List { resource, list }).is_err() {
                        return;
                    }
                }
                // Dropping the stream cancels the call, as closing the connection does.
                Either::Left(_) | Either::Right(_) => break,
            }
        }
    }
    let at = Instant::now();
    let _ = seen.send(Seen::Disconnected { resource, at });
    if let Some(paths) = paths {
        // The connection closes when this returns, as the kubelet's `Disconnect` closes it.
        paths.wait_for_teardowns();
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
