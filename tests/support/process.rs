//! The plugin binary as a child process, and waits on the files it makes (through inotify).

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Instant;

use super::node::TestNode;
use super::WAIT;

/// The plugin binary running as a child process, its log captured in a file.
pub struct PluginProcess {
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

impl PluginProcess {
    pub fn serve(node: &TestNode, args: &[&str]) -> PluginProcess {
        PluginProcess::serve_with_env(node, args, &[])
    }

    /// `serve` with more variables in its environment (the API server's address, say).
    pub fn serve_with_env(node: &TestNode, args: &[&str], env: &[(&str, String)]) -> PluginProcess {
        let mut command = Command::new(binary());
        command.envs(env.iter().map(|(k, v)| (k, v)));
        command
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
            );
        PluginProcess::start(node, command)
    }

    /// Runs `command` (another plugin, such as the benchmark's Go peer) with its stderr logged
    /// like ours.
    pub fn start(node: &TestNode, mut command: Command) -> PluginProcess {
        let log = unique(&node.root.path().join("plugin"));
        let stderr = fs::File::create(&log).expect("create the log file");
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("start the plugin");
        PluginProcess {
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

    /// Each thread's name (`comm`, cut at 15 bytes), sorted.
    pub fn thread_names(&self) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(format!("/proc/{}/task", self.pid()))
            .unwrap()
            .filter_map(|task| fs::read_to_string(task.ok()?.path().join("comm")).ok())
            .map(|name| name.trim_end().to_owned())
            .collect();
        names.sort();
        names
    }

    /// Our own threads' names (one per service, named by us): all but gRPC core's executor,
    /// timer and event-engine pools, whose sizes follow its load.
    pub fn our_thread_names(&self) -> Vec<String> {
        const GRPC_POOLS: [&str; 5] = [
            "default-executo",
            "event_engine",
            "grpc_global_tim",
            "resolver-execut",
            "timer_manager",
        ];
        self.thread_names()
            .into_iter()
            .filter(|name| !GRPC_POOLS.contains(&name.as_str()))
            .collect()
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
        self.status_kib("VmRSS")
    }

    /// The anonymous part of the resident set (heap, stacks), in KiB: the rest is the binary's
    /// pages, which are page cache.
    pub fn rss_anon_kib(&self) -> u64 {
        self.status_kib("RssAnon")
    }

    fn status_kib(&self, field: &str) -> u64 {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("{field} in /proc/PID/status"))
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

impl Drop for PluginProcess {
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
    let dir = path.parent().expect("a path with a directory");
    wait_in(
        dir,
        ARRIVALS,
        || format!("{} did not appear", path.display()),
        || path.exists().then_some(()),
    );
}

/// Waits, through inotify, until `dir` holds at least `n` entries whose names start with
/// `prefix`; returns them, sorted.
pub fn wait_for_entries(dir: &Path, prefix: &str, n: usize) -> Vec<PathBuf> {
    let list = || {
        let mut found: Vec<PathBuf> = fs::read_dir(dir)
            .expect("list the directory")
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
            .map(|e| e.path())
            .collect();
        found.sort();
        found
    };
    wait_in(
        dir,
        ARRIVALS,
        || {
            format!(
                "{} held {:?}, not {n} entries named {prefix}*",
                dir.display(),
                list()
            )
        },
        || Some(list()).filter(|found| found.len() >= n),
    )
}

/// Files created in a directory or renamed into it.
pub const ARRIVALS: inotify::WatchMask =
    inotify::WatchMask::CREATE.union(inotify::WatchMask::MOVED_TO);

/// Waits until `ready` gives a value, looking again after each inotify event of `mask` in `dir`
/// (and at least every second), up to `WAIT`; `failure` says what did not happen.
pub fn wait_in<T>(
    dir: &Path,
    mask: inotify::WatchMask,
    failure: impl Fn() -> String,
    mut ready: impl FnMut() -> Option<T>,
) -> T {
    let mut inotify = inotify::Inotify::init().expect("init inotify");
    inotify
        .watches()
        .add(dir, mask)
        .expect("watch the directory");
    let deadline = Instant::now() + WAIT;
    let mut buffer = [0u8; 4096];
    // Checked after the watch is in place, so a change in between is not missed.
    loop {
        if let Some(value) = ready() {
            return value;
        }
        assert!(Instant::now() < deadline, "{} within {WAIT:?}", failure());
        wait_readable(&inotify, 1000);
        let _ = inotify.read_events(&mut buffer);
    }
}

/// Blocks until the inotify fd has events or `timeout_ms` passes (the callers re-check a deadline).
pub fn wait_readable(inotify: &inotify::Inotify, timeout_ms: i32) {
    let mut pfd = libc::pollfd {
        fd: std::os::fd::AsRawFd::as_raw_fd(inotify),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
}

/// How many threads gRPC core's pools may add under concurrent calls, and keep: its executor
/// grows to two threads per core, with a timer and an event-engine thread besides. A leak adds
/// threads per connection or per fault, far more.
pub fn grpc_pool_growth() -> usize {
    2 + 2 * std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
}
