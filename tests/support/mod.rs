//! Test support shared by the integration tests: a fake kubelet speaking the real gRPC API over
//! real Unix sockets, and a handle on the plugin binary running as a child process.

#![allow(dead_code)]

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use futures_util::{FutureExt, StreamExt};
use grpcio::{
    CallOption, ChannelBuilder, ClientSStreamReceiver, EnvBuilder, Environment, RpcContext,
    ServerBuilder, ServerCredentials, UnarySink,
};
use kubelet_device_plugins::proto;

/// Generous upper bound for anything the tests wait on; they wait on events, not for time.
pub const WAIT: Duration = Duration::from_secs(20);

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

/// A temporary plugin directory and `/dev` stand-in with the built-in nodes as plain files.
pub struct Node {
    pub root: tempfile::TempDir,
    pub plugins: PathBuf,
    pub dev: PathBuf,
}

impl Node {
    pub fn new() -> Node {
        let root = tempfile::tempdir().expect("create a temp dir");
        let plugins = root.path().join("device-plugins");
        let dev = root.path().join("dev");
        fs::create_dir_all(&plugins).unwrap();
        fs::create_dir_all(dev.join("net")).unwrap();
        for node in ["kvm", "net/tun", "vhost-net", "vhost-vsock", "fuse"] {
            fs::write(dev.join(node), b"").unwrap();
        }
        Node { root, plugins, dev }
    }
}

/// The plugin binary running as a child process, its log captured in a file.
pub struct Plugin {
    child: Option<Child>,
    pid: i32,
    pub log: PathBuf,
}

/// The plugin binary cargo built for this test or benchmark, unless `KDP_TEST_BINARY` names
/// another build of it (the static release build, say, to benchmark what the image runs).
pub fn binary() -> PathBuf {
    std::env::var_os("KDP_TEST_BINARY")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_kubelet-device-plugins")))
}

impl Plugin {
    pub fn serve(node: &Node, args: &[&str]) -> Plugin {
        let log = unique(&node.root.path().join("plugin"));
        let stderr = fs::File::create(&log).expect("create the log file");
        let child = Command::new(binary())
            .arg("serve")
            .arg("--plugin-dir")
            .arg(&node.plugins)
            .arg("--dev-root")
            .arg(&node.dev)
            .args(args)
            // Tests read debug lines; the benchmark turns them down.
            .env(
                "RUST_LOG",
                std::env::var("KDP_TEST_RUST_LOG").unwrap_or_else(|_| "debug".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("start the plugin");
        Plugin {
            pid: child.id() as i32,
            child: Some(child),
            log,
        }
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) has no memory effects; the pid is our own child, not yet reaped.
        assert_eq!(unsafe { libc::kill(self.pid, signal) }, 0, "kill failed");
    }

    /// Waits for the process to exit, up to `WAIT`.
    pub fn wait(&mut self) -> ExitStatus {
        let mut child = self
            .child
            .take()
            .expect("the plugin was already waited for");
        let (tx, rx) = crossbeam_channel::bounded(1);
        std::thread::spawn(move || {
            let _ = tx.send(child.wait());
        });
        match rx.recv_timeout(WAIT) {
            Ok(status) => status.expect("wait for the plugin"),
            Err(_) => {
                self.signal(libc::SIGKILL);
                panic!(
                    "the plugin did not exit within {WAIT:?}\n{}",
                    self.log_text()
                );
            }
        }
    }

    /// Waits, through inotify on the log file, until the log contains `needle`.
    pub fn wait_for_log(&self, needle: &str) -> String {
        let mut inotify = inotify::Inotify::init().expect("init inotify");
        inotify
            .watches()
            .add(&self.log, inotify::WatchMask::MODIFY)
            .expect("watch the log");
        let deadline = Instant::now() + WAIT;
        let mut buffer = [0u8; 4096];
        loop {
            // Read after the watch is in place, so a line written in between is not missed.
            let text = self.log_text();
            if text.contains(needle) {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "the log never said {needle:?}:\n{text}"
            );
            wait_readable(&inotify, 1000);
            let _ = inotify.read_events(&mut buffer);
        }
    }

    pub fn log_text(&self) -> String {
        let mut text = String::new();
        let _ = fs::File::open(&self.log).and_then(|mut f| f.read_to_string(&mut text));
        text
    }

    pub fn threads(&self) -> usize {
        fs::read_dir(format!("/proc/{}/task", self.pid()))
            .unwrap()
            .count()
    }

    pub fn fds(&self) -> usize {
        fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .unwrap()
            .count()
    }

    /// Resident memory in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/PID/status")
    }
}

fn unique(path: &Path) -> PathBuf {
    let mut n = 0;
    loop {
        let candidate = path.with_extension(format!("{n}.log"));
        if !candidate.exists() {
            return candidate;
        }
        n += 1;
    }
}

impl Drop for Plugin {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- plugin log ---\n{}", self.log_text());
        }
    }
}

/// Waits, through inotify, until `path` exists.
pub fn wait_for_file(path: &Path) {
    let mut inotify = inotify::Inotify::init().expect("init inotify");
    let dir = path.parent().expect("a path with a directory");
    inotify
        .watches()
        .add(
            dir,
            inotify::WatchMask::CREATE | inotify::WatchMask::MOVED_TO,
        )
        .expect("watch the directory");
    let deadline = Instant::now() + WAIT;
    let mut buffer = [0u8; 4096];
    // Checked after the watch is in place, so a creation in between is not missed.
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} did not appear within {WAIT:?}",
            path.display()
        );
        wait_readable(&inotify, 1000);
        let _ = inotify.read_events(&mut buffer);
    }
}

/// Blocks until the inotify fd has events or `timeout_ms` passes (the callers re-check a deadline).
fn wait_readable(inotify: &inotify::Inotify, timeout_ms: i32) {
    let mut pfd = libc::pollfd {
        fd: std::os::fd::AsRawFd::as_raw_fd(inotify),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
}
