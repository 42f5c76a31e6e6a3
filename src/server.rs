//! One resource's gRPC server on its Unix socket in the plugin directory. Started and stopped by the
//! control loop (main thread); its calls run on the shared completion-queue thread.

use std::fs;
use std::future::Future;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use grpcio::{Environment, ServerBuilder, ServerCredentials};
use log::{debug, warn};

use crate::plugin::Plugin;
use crate::proto;
use crate::registration::WatcherService;
use crate::wake::channel_waker;

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

/// A socket we bound and put in place, with the inode that tells it from one made later by
/// someone else at the same path.
struct Placed {
    path: PathBuf,
    inode: u64,
}

impl Placed {
    fn intact(&self) -> bool {
        fs::symlink_metadata(&self.path)
            .is_ok_and(|m| m.file_type().is_socket() && m.ino() == self.inode)
    }

    fn remove_if_ours(&self) {
        if self.intact() {
            if let Err(e) = fs::remove_file(&self.path) {
                warn!("cannot remove {}: {e}", self.path.display());
            }
        }
    }
}

/// A running server. Dropping it without `stop` leaves its sockets behind; always call `stop`.
pub struct ResourceServer {
    /// Distinct for every server this process starts.
    id: u64,
    server: grpcio::Server,
    /// The DevicePlugin socket.
    socket: Placed,
    /// The plugin watcher's registration socket, in plugin-watcher mode.
    registration: Option<Placed>,
}

/// Calls each server can take at once before the completion-queue thread posts the next slot
/// (it does so as each call arrives). The kubelet makes at most three at a time per resource
/// (ListAndWatch, Allocate, GetPreferredAllocation; GetInfo in plugin-watcher mode); grpcio's
/// default of 1,024 allocated and posted 1,024 slots per server at every start. Calls beyond the
/// slots wait inside gRPC, they are not refused (tests/hostile.rs sends 500 calls at once).
const REQUEST_SLOTS: usize = 16;

impl ResourceServer {
    /// Serves `plugin` on `path` and, given a registration socket path and service, the plugin
    /// watcher's API there too, replacing stale sockets left by an earlier run.
    ///
    /// Each socket is bound under a temporary name and renamed into place: the kubelet never sees
    /// it before its permissions are set, and gRPC, which unlinks the paths it bound when the
    /// server shuts down, can never remove a socket someone else made later at our path. The
    /// registration socket appears last, once the DevicePlugin socket answers, because the plugin
    /// watcher dials the endpoint as soon as it finds the registration socket.
    pub fn start(
        env: Arc<Environment>,
        plugin: Plugin,
        path: &Path,
        registration: Option<(PathBuf, WatcherService)>,
    ) -> Result<ResourceServer, ServerError> {
        remove_stale_socket(path)?;
        let mut builder = ServerBuilder::new(env)
            .requests_slot_per_cq(REQUEST_SLOTS)
            .register_service(proto::create_device_plugin(plugin));
        if let Some((reg_path, service)) = &registration {
            remove_stale_socket(reg_path)?;
            builder = builder.register_service(proto::pluginregistration::create_registration(
                service.clone(),
            ));
        }
        let mut server = builder.build().map_err(|source| ServerError::Build {
            path: path.to_owned(),
            source,
        })?;
        // gRPC listens only on addresses added before it starts: bind both now, show them later.
        let socket_bound = bind(&mut server, path)?;
        let registration_bound = match &registration {
            Some((reg_path, _)) => match bind(&mut server, reg_path) {
                Ok(bound) => Some((bound, reg_path.clone())),
                Err(e) => {
                    let _ = fs::remove_file(&socket_bound);
                    return Err(e);
                }
            },
            None => None,
        };
        let socket = match place(&socket_bound, path) {
            Ok(placed) => placed,
            Err(e) => {
                if let Some((bound, _)) = &registration_bound {
                    let _ = fs::remove_file(bound);
                }
                return Err(e);
            }
        };
        server.start();
        debug!("serving on {}", path.display());
        let registration = match registration_bound {
            None => None,
            Some((bound, reg_path)) => match place(&bound, &reg_path) {
                Ok(placed) => {
                    debug!("plugin watcher registration on {}", reg_path.display());
                    Some(placed)
                }
                Err(e) => {
                    ResourceServer {
                        id: 0,
                        server,
                        socket,
                        registration: None,
                    }
                    .stop();
                    return Err(e);
                }
            },
        };
        static STARTED: AtomicU64 = AtomicU64::new(1);
        let id = STARTED.fetch_add(1, Ordering::Relaxed);
        Ok(ResourceServer {
            id,
            server,
            socket,
            registration,
        })
    }

    pub fn path(&self) -> &Path {
        &self.socket.path
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    /// Whether our sockets are still in place: false once anyone removed or replaced one.
    pub fn socket_intact(&self) -> bool {
        self.socket.intact() && self.registration.as_ref().is_none_or(Placed::intact)
    }

    /// Stops the server and removes our sockets if they are still ours (the registration socket
    /// first, so the plugin watcher lets go before the endpoint goes). Calls in flight get
    /// `DRAIN_TIMEOUT` to finish (callers end ListAndWatch streams first); then the rest are
    /// cancelled, since a shutdown that waits on an open stream never ends.
    pub fn stop(mut self) {
        if let Some(registration) = &self.registration {
            registration.remove_if_ours();
        }
        let mut shutdown = self.server.shutdown();
        let done = match wait_until(&mut shutdown, Instant::now() + DRAIN_TIMEOUT) {
            Some(done) => done,
            None => {
                warn!(
                    "calls on {} did not finish within {DRAIN_TIMEOUT:?}; cancelling them",
                    self.socket.path.display()
                );
                self.server.cancel_all_calls();
                futures_executor::block_on(shutdown)
            }
        };
        if let Err(e) = done {
            warn!(
                "gRPC server on {} did not shut down cleanly: {e}",
                self.socket.path.display()
            );
        }
        self.socket.remove_if_ours();
    }
}

/// Listens on a temporary name beside `path`; returns that name.
fn bind(server: &mut grpcio::Server, path: &Path) -> Result<PathBuf, ServerError> {
    let bound = temporary_path(path);
    server
        .add_listening_port(
            format!("unix:{}", bound.display()),
            ServerCredentials::insecure(),
        )
        .map_err(|source| ServerError::Listen {
            path: path.to_owned(),
            source,
        })?;
    Ok(bound)
}

/// Restricts a bound socket to its owner and renames it into place at `path`.
fn place(bound: &Path, path: &Path) -> Result<Placed, ServerError> {
    // The inode is read before the rename (which keeps it), not after: once in place, the socket
    // is anyone's to remove at once, and the watcher reports that like any other removal.
    let placed = fs::symlink_metadata(bound).and_then(|meta| {
        fs::set_permissions(bound, fs::Permissions::from_mode(0o600))?;
        fs::rename(bound, path)?;
        Ok(meta)
    });
    match placed {
        Ok(meta) => Ok(Placed {
            path: path.to_owned(),
            inode: meta.ino(),
        }),
        Err(source) => {
            let _ = fs::remove_file(bound);
            Err(ServerError::Place {
                path: path.to_owned(),
                source,
            })
        }
    }
}

/// How long a stopping server lets calls in flight finish.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// Drives `future` on this thread until it completes or `deadline` passes. The future keeps
/// running (on gRPC's side) if the deadline passes first.
fn wait_until<F: Future + Unpin>(future: &mut F, deadline: Instant) -> Option<F::Output> {
    let (waker, woken) = channel_waker();
    let mut cx = Context::from_waker(&waker);
    loop {
        if let Poll::Ready(output) = Pin::new(&mut *future).poll(&mut cx) {
            return Some(output);
        }
        if woken.recv_deadline(deadline).is_err() {
            return None;
        }
    }
}

/// `.kdp-kvm.sock.1234.7.tmp` beside `kdp-kvm.sock`: hidden and not named like our sockets, so
/// the watcher (and the kubelet's plugin watcher) ignore it; unique per bind, because gRPC unlinks
/// the path a stopped server had bound some time after the server stops, and must not hit the
/// next server's.
fn temporary_path(path: &Path) -> PathBuf {
    static BINDS: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let bind = BINDS.fetch_add(1, Ordering::Relaxed);
    path.with_file_name(format!(".{name}.{}.{bind}.tmp", std::process::id()))
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
    use crate::device::{Permissions, Resource};
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

    fn plugin(dev: &Path) -> Plugin {
        let resource = Resource::builtin("kvm", dev, 2, Permissions::default()).unwrap();
        let devices = resource.discover(dev);
        Plugin::new(resource, devices)
    }

    #[test]
    fn serves_on_an_owner_only_socket_and_removes_it_on_stop() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kdp-kvm.sock");
        let env = env();
        let server =
            ResourceServer::start(Arc::clone(&env), plugin(dir.path()), &path, None).unwrap();
        let meta = fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.mode() & 0o777, 0o600);

        let channel =
            ChannelBuilder::new(Arc::clone(&env)).connect(&format!("unix:{}", path.display()));
        let client = proto::DevicePluginClient::new(channel);
        let options = client
            .get_device_plugin_options(&proto::Empty::new())
            .unwrap();
        assert!(options.get_preferred_allocation_available);

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
        let server = ResourceServer::start(env(), plugin(dir.path()), &path, None).unwrap();
        server.stop();

        fs::write(&path, b"not a socket").unwrap();
        let err = ResourceServer::start(env(), plugin(dir.path()), &path, None)
            .err()
            .unwrap();
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
        let err = ResourceServer::start(env(), plugin(dir.path()), &path, None)
            .err()
            .unwrap();
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
        let server = ResourceServer::start(env(), plugin(dir.path()), &path, None).unwrap();
        fs::remove_file(&path).unwrap();
        assert!(!server.socket_intact());
        let other = UnixListener::bind(&path).unwrap();
        assert!(!server.socket_intact());
        server.stop();
        assert!(path.exists(), "stop removed a socket it did not create");
        drop(other);
    }
}
