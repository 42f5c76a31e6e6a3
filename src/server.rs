//! One resource's gRPC server on its Unix socket in the plugin directory. Started and stopped by the
//! control loop (main thread); its calls run on the shared completion-queue thread.

use std::fs;
use std::future::Future;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use grpcio::{Environment, ServerBuilder, ServerCredentials};
use log::{debug, warn};

use crate::plugin::Plugin;
use crate::proto;
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

/// A running server. Dropping it without `stop` leaves the socket behind; always call `stop`.
pub struct ResourceServer {
    server: grpcio::Server,
    path: PathBuf,
    /// Inode of the socket we bound, to tell it from one created by someone else later.
    inode: u64,
}

impl ResourceServer {
    /// Serves `plugin` on `path`, replacing a stale socket left there by an earlier run.
    ///
    /// The socket is bound under a temporary name and renamed into place: the kubelet never sees
    /// it before its permissions are set, and gRPC, which unlinks the path it bound when the
    /// server shuts down, can never remove a socket at `path` that someone else made later.
    pub fn start(
        env: Arc<Environment>,
        plugin: Plugin,
        path: &Path,
    ) -> Result<ResourceServer, ServerError> {
        remove_stale_socket(path)?;
        let bound = temporary_path(path);
        let mut server = ServerBuilder::new(env)
            .register_service(proto::create_device_plugin(plugin))
            .build()
            .map_err(|source| ServerError::Build {
                path: path.to_owned(),
                source,
            })?;
        server
            .add_listening_port(
                format!("unix:{}", bound.display()),
                ServerCredentials::insecure(),
            )
            .map_err(|source| ServerError::Listen {
                path: path.to_owned(),
                source,
            })?;
        let placed = fs::set_permissions(&bound, fs::Permissions::from_mode(0o600))
            .and_then(|()| fs::rename(&bound, path))
            .and_then(|()| fs::symlink_metadata(path));
        let inode = match placed {
            Ok(meta) => meta.ino(),
            Err(source) => {
                let _ = fs::remove_file(&bound);
                return Err(ServerError::Place {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        server.start();
        debug!("serving on {}", path.display());
        Ok(ResourceServer {
            server,
            path: path.to_owned(),
            inode,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether our socket is still in place: false once anyone removed or replaced it.
    pub fn socket_intact(&self) -> bool {
        fs::symlink_metadata(&self.path)
            .is_ok_and(|m| m.file_type().is_socket() && m.ino() == self.inode)
    }

    /// Stops the server and removes our socket if it is still ours. Calls in flight get
    /// `DRAIN_TIMEOUT` to finish (callers end ListAndWatch streams first); then the rest are
    /// cancelled, since a shutdown that waits on an open stream never ends.
    pub fn stop(mut self) {
        let mut shutdown = self.server.shutdown();
        let done = match wait_until(&mut shutdown, Instant::now() + DRAIN_TIMEOUT) {
            Some(done) => done,
            None => {
                warn!(
                    "calls on {} did not finish within {DRAIN_TIMEOUT:?}; cancelling them",
                    self.path.display()
                );
                self.server.cancel_all_calls();
                futures_executor::block_on(shutdown)
            }
        };
        if let Err(e) = done {
            warn!(
                "gRPC server on {} did not shut down cleanly: {e}",
                self.path.display()
            );
        }
        if self.socket_intact() {
            if let Err(e) = fs::remove_file(&self.path) {
                warn!("cannot remove {}: {e}", self.path.display());
            }
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

/// `.kdp-kvm.sock.1234.tmp` beside `kdp-kvm.sock`: hidden, and not named like our sockets, so the
/// watcher ignores it.
fn temporary_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.{}.tmp", std::process::id()))
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
        let server = ResourceServer::start(Arc::clone(&env), plugin(dir.path()), &path).unwrap();
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
        let server = ResourceServer::start(env(), plugin(dir.path()), &path).unwrap();
        server.stop();

        fs::write(&path, b"not a socket").unwrap();
        let err = ResourceServer::start(env(), plugin(dir.path()), &path)
            .err()
            .unwrap();
        assert!(matches!(err, ServerError::NotASocket { .. }), "{err}");
        assert_eq!(fs::read(&path).unwrap(), b"not a socket");
    }

    #[test]
    fn a_replaced_socket_is_noticed_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kdp-kvm.sock");
        let server = ResourceServer::start(env(), plugin(dir.path()), &path).unwrap();
        fs::remove_file(&path).unwrap();
        assert!(!server.socket_intact());
        let other = UnixListener::bind(&path).unwrap();
        assert!(!server.socket_intact());
        server.stop();
        assert!(path.exists(), "stop removed a socket it did not create");
        drop(other);
    }
}
