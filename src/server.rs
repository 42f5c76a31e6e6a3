//! One endpoint's gRPC server (a resource's device plugin, or the DRA driver) and the sockets it
//! listens on. Started and stopped by a frontend for the control loop (main thread); its calls
//! run on the completion-queue threads. It serves whatever services
//! it is given on whatever sockets it is given, and knows nothing of registration.

use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use grpcio::{Environment, ServerBuilder, ServerCredentials, Service};
use log::{debug, warn};

use crate::rpc::Driven;

/// What can fail here. Each variant's `#[error]` message is its documentation.
#[allow(missing_docs)]
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot remove the stale socket {path}")]
    RemoveStale {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} exists and is not a socket; refusing to replace it")]
    NotASocket { path: PathBuf },
    #[error("cannot build the gRPC server for {path}")]
    Build {
        path: PathBuf,
        #[source]
        source: grpcio::Error,
    },
    #[error("cannot listen on {path}")]
    Listen {
        path: PathBuf,
        #[source]
        source: grpcio::Error,
    },
    #[error("cannot put the socket in place at {path}")]
    Place {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A socket we bound and put in place. Dropping it removes the socket, but only if the inode at
/// the path is still the one we placed: a socket someone else made later at our path is theirs.
pub struct SocketGuard {
    path: PathBuf,
    inode: u64,
    /// Left in place when dropped (see `ResourceServer::stop_leaving_announcement`).
    kept: bool,
}

impl SocketGuard {
    /// Where the socket is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether our socket is still in place: false once anyone removed or replaced it.
    pub fn intact(&self) -> bool {
        fs::symlink_metadata(&self.path)
            .is_ok_and(|m| m.file_type().is_socket() && m.ino() == self.inode)
    }
}

impl Drop for SocketGuard {
    fn drop(&mut self) {
        if !self.kept && self.intact() {
            if let Err(e) = fs::remove_file(&self.path) {
                warn!("cannot remove {}: {e}", self.path.display());
            }
        }
    }
}

/// A socket bound under its temporary name and not yet in place; dropping it removes the
/// temporary name (after a successful rename there is nothing left to remove).
struct Bound {
    temporary: PathBuf,
    path: PathBuf,
}

impl Drop for Bound {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.temporary);
    }
}

/// A running server. Dropping it stops it, as `stop` does.
pub struct ResourceServer {
    /// Distinct for every server this process starts.
    id: u64,
    server: Option<grpcio::Server>,
    /// In the order they were put in place; the first is the one clients are told of.
    sockets: Vec<SocketGuard>,
    /// The name the first socket was bound under: the kernel names the connections it accepts
    /// by it (`/proc/net/unix`), whatever the socket is called since.
    bound_as: PathBuf,
}

/// Calls each server can take at once before the completion-queue thread posts the next slot
/// (it does so as each call arrives). The kubelet makes at most three at a time per resource
/// (ListAndWatch, Allocate, GetPreferredAllocation; GetInfo in plugin-watcher mode); grpcio's
/// default of 1,024 allocated and posted 1,024 slots per server at every start. Calls beyond the
/// slots wait inside gRPC, they are not refused (the integration tests send 500 calls at once).
const REQUEST_SLOTS: usize = 16;

/// How long a stopping server lets calls in flight finish.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

impl ResourceServer {
    /// Serves `services` on every path of `sockets`, replacing stale sockets left by an earlier
    /// run; at least one socket is needed.
    ///
    /// Each socket is bound under a temporary name and renamed into place once the server runs:
    /// no client sees it before its permissions are set or before it answers, and gRPC, which
    /// unlinks the paths it bound when the server shuts down, can never remove a socket someone
    /// else made later at our path. Sockets appear in the order given, so a socket that tells the
    /// kubelet where to dial (the plugin watcher's) comes after the one it names.
    pub fn start(
        env: Arc<Environment>,
        services: Vec<Service>,
        sockets: &[PathBuf],
    ) -> Result<ResourceServer, ServerError> {
        let first = sockets.first().cloned().unwrap_or_default();
        for path in sockets {
            remove_stale_socket(path)?;
        }
        let mut builder = ServerBuilder::new(env).requests_slot_per_cq(REQUEST_SLOTS);
        for service in services {
            builder = builder.register_service(service);
        }
        let mut server = builder.build().map_err(|source| ServerError::Build {
            path: first.clone(),
            source,
        })?;
        // gRPC listens only on addresses added before it starts: bind them all now.
        let bound = sockets
            .iter()
            .map(|path| bind(&mut server, path))
            .collect::<Result<Vec<_>, _>>()?;
        server.start();
        static STARTED: AtomicU64 = AtomicU64::new(1);
        let mut running = ResourceServer {
            id: STARTED.fetch_add(1, Ordering::Relaxed),
            server: Some(server),
            sockets: Vec::with_capacity(bound.len()),
            bound_as: bound
                .first()
                .map(|b| b.temporary.clone())
                .unwrap_or_default(),
        };
        for bound in bound {
            // On failure `running` drops: the server stops and the sockets placed so far go.
            running.sockets.push(place(&bound)?);
        }
        debug!("serving on {}", first.display());
        Ok(running)
    }

    /// The socket clients are told of.
    pub fn path(&self) -> &Path {
        self.sockets
            .first()
            .map_or(Path::new(""), SocketGuard::path)
    }

    /// Distinct for every server this process starts.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Waits, up to `within`, until no client holds a connection to the socket clients are told
    /// of. True when none does; false when one still did at the end, or the kernel's table of
    /// Unix sockets could not be read. For a stop whose streams were ended first: the kubelet
    /// closes its connection only once it has taken the stream's end as a disconnect.
    pub fn wait_for_clients_to_leave(&self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        loop {
            match connections_to(&self.bound_as) {
                Some(0) => return true,
                None => return false,
                Some(_) if Instant::now() >= deadline => return false,
                // Nothing reports a peer's close to us: the table is looked at again.
                Some(_) => std::thread::sleep(Duration::from_millis(2)),
            }
        }
    }

    /// Whether all our sockets are still in place: false once anyone removed or replaced one.
    pub fn socket_intact(&self) -> bool {
        self.sockets.iter().all(SocketGuard::intact)
    }

    /// Stops the server and removes our sockets if they are still ours (the later ones first, so
    /// the plugin watcher lets go before the endpoint goes). Calls in flight get `DRAIN_TIMEOUT`
    /// to finish (callers end ListAndWatch streams first); then the rest are cancelled, since a
    /// shutdown that waits on an open stream never ends.
    pub fn stop(mut self) {
        self.shut_down();
    }

    /// Stops the server as `stop` does, but leaves the sockets that announce it (all but the
    /// first: the plugin watcher's registration socket) in place, dead. While another instance
    /// serves the resource, kubelets before 1.37 would take that socket's removal as the
    /// resource's deregistration and stop the other instance's endpoint; a dead socket is only
    /// dialled again when it changes. The next instance in this slot replaces it, and the last
    /// instance of the resource to stop clears it.
    pub fn stop_leaving_announcement(mut self) {
        for guard in self.sockets.iter_mut().skip(1) {
            guard.kept = true;
        }
        self.shut_down();
    }

    fn shut_down(&mut self) {
        let Some(mut server) = self.server.take() else {
            return;
        };
        while self.sockets.len() > 1 {
            self.sockets.pop();
        }
        let path = self.path().display().to_string();
        let mut shutdown = Driven::new(server.shutdown());
        let done = match shutdown.wait_until(Instant::now() + DRAIN_TIMEOUT) {
            Some(done) => done,
            None => {
                warn!("calls on {path} did not finish within {DRAIN_TIMEOUT:?}; cancelling them");
                server.cancel_all_calls();
                futures_executor::block_on(shutdown.inner())
            }
        };
        if let Err(e) = done {
            warn!("gRPC server on {path} did not shut down cleanly: {e}");
        }
        self.sockets.clear();
    }
}

impl Drop for ResourceServer {
    fn drop(&mut self) {
        self.shut_down();
    }
}

/// Connections accepted on the Unix socket bound as `bound_as`, from `/proc/net/unix`: each
/// carries the listener's name, in state connected ("03"). `None` when the table cannot be read.
fn connections_to(bound_as: &Path) -> Option<usize> {
    let table = fs::read_to_string("/proc/net/unix").ok()?;
    let name = bound_as.to_str()?;
    let connected = table.lines().skip(1).filter(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.get(5) == Some(&"03") && fields.get(7) == Some(&name)
    });
    Some(connected.count())
}

/// Listens on a temporary name beside `path`.
fn bind(server: &mut grpcio::Server, path: &Path) -> Result<Bound, ServerError> {
    let temporary = temporary_path(path);
    server
        .add_listening_port(
            format!("unix:{}", temporary.display()),
            ServerCredentials::insecure(),
        )
        .map_err(|source| ServerError::Listen {
            path: path.to_owned(),
            source,
        })?;
    Ok(Bound {
        temporary,
        path: path.to_owned(),
    })
}

/// Restricts a bound socket to its owner and renames it into place.
fn place(bound: &Bound) -> Result<SocketGuard, ServerError> {
    // The inode is read before the rename (which keeps it), not after: once in place, the socket
    // is anyone's to remove at once, and the inotify thread reports that like any other removal.
    let placed = fs::symlink_metadata(&bound.temporary).and_then(|meta| {
        fs::set_permissions(&bound.temporary, fs::Permissions::from_mode(0o600))?;
        fs::rename(&bound.temporary, &bound.path)?;
        Ok(meta)
    });
    match placed {
        Ok(meta) => Ok(SocketGuard {
            path: bound.path.clone(),
            inode: meta.ino(),
            kept: false,
        }),
        Err(source) => Err(ServerError::Place {
            path: bound.path.clone(),
            source,
        }),
    }
}

/// The longest temporary file name a socket is bound under: `.kdp.`, the process ID (u32) and the
/// bind number (u64) in hex, with a dot between. Short, and the same for every socket, so that
/// binding never needs a longer path than the socket's own directory allows.
pub const TEMPORARY_NAME_MAX: usize = 5 + 8 + 1 + 16;

/// `.kdp.4d2.7` beside `kdp-kvm.sock`: hidden and not named like our sockets, so the inotify
/// thread (and the kubelet's plugin watcher) ignore it; unique per bind, because gRPC unlinks the
/// path a stopped server had bound some time after the server stops, and must not hit the next
/// server's.
fn temporary_path(path: &Path) -> PathBuf {
    static BINDS: AtomicU64 = AtomicU64::new(0);
    temporary_name(
        path,
        std::process::id(),
        BINDS.fetch_add(1, Ordering::Relaxed),
    )
}

fn temporary_name(path: &Path, pid: u32, bind: u64) -> PathBuf {
    path.with_file_name(format!(".kdp.{pid:x}.{bind:x}"))
}

/// Removes a socket left at `path` by an earlier run. Anything else there (a symlink, a regular
/// file, a directory) is not ours to remove.
fn remove_stale_socket(path: &Path) -> Result<(), ServerError> {
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(ServerError::RemoveStale {
            path: path.to_owned(),
            source,
        }),
        Ok(m) if m.file_type().is_socket() => {
            fs::remove_file(path).map_err(|source| ServerError::RemoveStale {
                path: path.to_owned(),
                source,
            })
        }
        Ok(_) => Err(ServerError::NotASocket {
            path: path.to_owned(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stop_waits_for_clients_to_close_their_connections_and_no_longer() {
        let dir = tempfile::tempdir().unwrap();
        let env = Arc::new(grpcio::EnvBuilder::new().cq_count(1).build());
        let path = dir.path().join("kdp-kvm.sock");
        let server = start(Arc::clone(&env), &path).unwrap();
        assert!(server.wait_for_clients_to_leave(Duration::ZERO));
        // A client that holds its connection open: the wait ends at its limit, and says so.
        let client = std::os::unix::net::UnixStream::connect(&path).unwrap();
        let (held, started) = (Duration::from_millis(100), Instant::now());
        while connections_to(&server.bound_as) != Some(1) {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "never accepted"
            );
            std::thread::yield_now();
        }
        assert!(!server.wait_for_clients_to_leave(held));
        assert!(started.elapsed() >= held);
        // It closes: the wait ends as soon as the server has seen it go.
        drop(client);
        assert!(server.wait_for_clients_to_leave(Duration::from_secs(10)));
    }

    #[test]
    fn the_temporary_name_is_at_most_its_declared_length_whatever_the_socket_name() {
        let path = Path::new("/var/lib/kubelet/device-plugins/kdp-a-very-long-name.sock");
        let longest = temporary_name(path, u32::MAX, u64::MAX);
        assert_eq!(
            longest.file_name().unwrap().len(),
            TEMPORARY_NAME_MAX,
            "{longest:?}"
        );
        assert_eq!(longest.parent(), path.parent());
    }
    use crate::proto::pluginregistration as reg;
    use crate::registration::plugin_watcher::WatcherService;
    use grpcio::{ChannelBuilder, EnvBuilder};
    use std::os::unix::net::UnixListener;

    fn env() -> Arc<Environment> {
        Arc::new(
            EnvBuilder::new()
                .cq_count(1)
                .name_prefix("test-grpc")
                .build(),
        )
    }

    /// Any service will do: the plugin watcher's, which answers who it is.
    fn services(path: &Path) -> Vec<Service> {
        let (events, _) = crossbeam_channel::unbounded();
        let watcher = WatcherService::new("devices.anza-labs.dev/kvm", path, events);
        vec![reg::create_registration(watcher)]
    }

    fn start(env: Arc<Environment>, path: &Path) -> Result<ResourceServer, ServerError> {
        ResourceServer::start(env, services(path), &[path.to_owned()])
    }

    #[test]
    fn serves_on_an_owner_only_socket_and_removes_it_on_stop() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kdp-kvm.sock");
        let env = env();
        let server = start(Arc::clone(&env), &path).unwrap();
        let meta = fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.mode() & 0o777, 0o600);

        let channel =
            ChannelBuilder::new(Arc::clone(&env)).connect(&format!("unix:{}", path.display()));
        let client = reg::RegistrationClient::new(channel);
        let info = client.get_info(&reg::InfoRequest::new()).unwrap();
        assert_eq!(info.name, "devices.anza-labs.dev/kvm");

        assert!(server.socket_intact());
        server.stop();
        assert!(!path.exists());
    }

    #[test]
    fn replaces_a_stale_socket_but_not_other_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kdp-kvm.sock");
        let stale = UnixListener::bind(&path).unwrap();
        drop(stale);
        let server = start(env(), &path).unwrap();
        server.stop();

        fs::write(&path, b"not a socket").unwrap();
        let err = start(env(), &path).err().unwrap();
        assert!(matches!(err, ServerError::NotASocket { .. }), "{err}");
        assert_eq!(fs::read(&path).unwrap(), b"not a socket");
    }

    #[test]
    fn a_symlink_at_our_path_is_never_followed_or_removed() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let target = outside.path().join("precious.sock");
        let precious = UnixListener::bind(&target).unwrap();
        let path = dir.path().join("kdp-kvm.sock");
        std::os::unix::fs::symlink(&target, &path).unwrap();
        let err = start(env(), &path).err().unwrap();
        assert!(matches!(err, ServerError::NotASocket { .. }), "{err}");
        assert!(fs::symlink_metadata(&path)
            .unwrap()
            .file_type()
            .is_symlink());
        assert!(target.exists(), "followed the symlink out of the directory");
        drop(precious);
    }

    #[test]
    fn a_replaced_socket_is_noticed_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kdp-kvm.sock");
        let server = start(env(), &path).unwrap();
        fs::remove_file(&path).unwrap();
        assert!(!server.socket_intact());
        let other = UnixListener::bind(&path).unwrap();
        assert!(!server.socket_intact());
        server.stop();
        assert!(path.exists(), "stop removed a socket it did not create");
        drop(other);
    }
}
