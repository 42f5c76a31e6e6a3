//! One instance per socket slot on a node: an exclusive `flock` on a lock file per slot of a
//! resource (`layout::SLOTS`), or one for a DRA driver, taken by the frontend for the control
//! loop (main thread) before it binds the sockets and held while it serves them. A second
//! instance (a surge rollout's new pod, a `serve` run by hand) takes the other slot; one more
//! waits for a lock instead of removing a live socket; a socket left by a killed instance is
//! stale once its lock is free, since the kernel drops a dead process's locks.
//!
//! The lock files live in a directory of their own beside the sockets (`.kdp-locks/`): the
//! kubelet, when it starts, deletes every file in its device-plugin directory but leaves
//! directories alone, and a deleted lock file would let a second instance lock a new one.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The directory of lock files, inside a socket directory.
pub const LOCK_DIR: &str = ".kdp-locks";

/// What can fail here. Each variant's `#[error]` message is its documentation.
#[allow(missing_docs)]
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("another instance (process {holder}) serves this resource, holding {path}")]
    Held { path: PathBuf, holder: String },
    #[error("cannot take the lock {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// An exclusive lock on one resource's sockets. Dropping it removes the lock file, then lets go.
#[derive(Debug)]
pub struct SocketLock {
    path: PathBuf,
    file: File,
}

impl SocketLock {
    /// Whether another holder has the lock for the sockets named `socket_name`: a look that
    /// creates and removes nothing, so that the control loop, which hears of every lock file
    /// that comes or goes, can look on each such event without making another.
    pub fn is_held(socket_dir: &Path, socket_name: &str) -> bool {
        let path = socket_dir
            .join(LOCK_DIR)
            .join(format!("{socket_name}.lock"));
        match File::open(&path) {
            // Closing the file lets go of a lock this look took.
            Ok(file) => matches!(file.try_lock(), Err(fs::TryLockError::WouldBlock)),
            Err(_) => false,
        }
    }

    /// Takes the lock for the sockets named `socket_name` in `socket_dir`, or says who holds it.
    pub fn try_acquire(socket_dir: &Path, socket_name: &str) -> Result<SocketLock, LockError> {
        let dir = socket_dir.join(LOCK_DIR);
        let path = dir.join(format!("{socket_name}.lock"));
        let io_error = |source| LockError::Io {
            path: path.clone(),
            source,
        };
        // A holder removes its file before letting go, so a lock taken on a file that is no
        // longer at the path guards nothing: open the path again. Each turn needs another
        // instance to have released and removed the file in between, so this ends.
        loop {
            fs::create_dir_all(&dir).map_err(io_error)?;
            let file = match OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
            {
                Ok(file) => file,
                // The directory went with the last holder's cleanup; make it again.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_error(e)),
            };
            match file.try_lock() {
                Ok(()) => {}
                Err(fs::TryLockError::WouldBlock) => {
                    let holder = fs::read_to_string(&path)
                        .ok()
                        .map(|pid| pid.trim().to_owned())
                        .filter(|pid| !pid.is_empty())
                        .unwrap_or_else(|| "unknown".to_owned());
                    return Err(LockError::Held { path, holder });
                }
                Err(fs::TryLockError::Error(e)) => return Err(io_error(e)),
            }
            let same = match (file.metadata(), fs::metadata(&path)) {
                (Ok(ours), Ok(there)) => ours.ino() == there.ino() && ours.dev() == there.dev(),
                _ => false,
            };
            if !same {
                continue;
            }
            let mut lock = SocketLock { path, file };
            // Who holds it, for the other instance's message; the lock does not depend on it.
            let _ = lock
                .file
                .set_len(0)
                .and_then(|()| writeln!(lock.file, "{}", std::process::id()));
            return Ok(lock);
        }
    }
}

impl SocketLock {
    /// Whether the file at our lock's path is still the one we hold.
    fn intact(&self) -> bool {
        match (self.file.metadata(), fs::metadata(&self.path)) {
            (Ok(ours), Ok(there)) => ours.ino() == there.ino() && ours.dev() == there.dev(),
            _ => false,
        }
    }

    /// Keeps the lock when its file was deleted under us (a cleanup script, an operator): a lock
    /// on a file no longer at the path guards nothing, and the next instance would take the same
    /// slot. Takes the path again and says so (`Ok(true)`); `Ok(false)` when nothing was amiss.
    /// When another instance took the path first, that one holds the slot now: `Held`, and the
    /// caller must stand down.
    pub fn keep(&mut self) -> Result<bool, LockError> {
        if self.intact() {
            return Ok(false);
        }
        let dir = self.path.parent().unwrap_or(Path::new("/"));
        let socket_name = self
            .path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".lock"))
            .unwrap_or_default()
            .to_owned();
        let socket_dir = dir.parent().unwrap_or(Path::new("/"));
        let again = SocketLock::try_acquire(socket_dir, &socket_name)?;
        // The new file is locked and at the path; the old one, dropped, lets go without touching
        // the path, which is no longer its.
        drop(std::mem::replace(self, again));
        Ok(true)
    }

    /// The lock file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SocketLock {
    fn drop(&mut self) {
        // Removed while still held, so no one can lock this file after it is gone from the path;
        // and only if it is still ours, not a file someone made after ours was deleted.
        if self.intact() {
            let _ = fs::remove_file(&self.path);
        }
        let _ = self.file.unlock();
        // The last holder leaves no directory behind; one still in use is not empty.
        if let Some(dir) = self.path.parent() {
            let _ = fs::remove_dir(dir);
        }
    }
}

/// Which socket slot of the resource whose sockets are named `socket_name` (slot 0's name) an
/// instance on this node took last, as [`remember_slot`] left it: `<socket_name>.last` beside
/// the locks. `None` when nothing was recorded, or what is there is not a slot number.
pub fn last_slot(socket_dir: &Path, socket_name: &str) -> Option<usize> {
    fs::read_to_string(slot_memo(socket_dir, socket_name))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Records that an instance took `slot`, for the next one to start with another. The file is a
/// digit and a newline, written in place: a torn write reads as nothing recorded.
pub fn remember_slot(socket_dir: &Path, socket_name: &str, slot: usize) -> io::Result<()> {
    fs::write(slot_memo(socket_dir, socket_name), format!("{slot}\n"))
}

/// Removes the record of the slot taken last: every slot is as good as another again.
pub fn forget_slot(socket_dir: &Path, socket_name: &str) {
    let _ = fs::remove_file(slot_memo(socket_dir, socket_name));
}

fn slot_memo(socket_dir: &Path, socket_name: &str) -> PathBuf {
    socket_dir
        .join(LOCK_DIR)
        .join(format!("{socket_name}.last"))
}

/// An exclusive lock for one turn at shared state (a batch of claims against the checkpoint),
/// waited for rather than tried: the instances that take turns are all ours and each holds it
/// briefly. Its file stays between turns, so taking a turn makes no inotify event; one deleted
/// under a waiter is opened again, so that turns never run on two files at once.
#[derive(Debug)]
pub struct TurnLock {
    file: File,
}

impl TurnLock {
    /// Waits for our turn on `path`, creating the file if it is missing.
    pub fn wait(path: &Path) -> Result<TurnLock, LockError> {
        let io_error = |source| LockError::Io {
            path: path.to_owned(),
            source,
        };
        loop {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)
                .map_err(io_error)?;
            file.lock().map_err(io_error)?;
            let same = match (file.metadata(), fs::metadata(path)) {
                (Ok(ours), Ok(there)) => ours.ino() == there.ino() && ours.dev() == there.dev(),
                _ => false,
            };
            if same {
                return Ok(TurnLock { file });
            }
        }
    }
}

impl Drop for TurnLock {
    fn drop(&mut self) {
        let _ = self.file.unlock();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_look_at_a_lock_sees_its_holder_and_leaves_no_trace() {
        let dir = tempfile::tempdir().unwrap();
        let files = || -> Vec<_> {
            fs::read_dir(dir.path().join(LOCK_DIR))
                .map(|d| d.map(|e| e.unwrap().file_name()).collect())
                .unwrap_or_default()
        };
        assert!(!SocketLock::is_held(dir.path(), "kdp-kvm.sock"));
        assert!(files().is_empty(), "the look made a file");
        let held = SocketLock::try_acquire(dir.path(), "kdp-kvm.sock").unwrap();
        let before = files();
        assert!(SocketLock::is_held(dir.path(), "kdp-kvm.sock"));
        assert_eq!(files(), before);
        // The look let go of nothing it did not take.
        assert!(SocketLock::try_acquire(dir.path(), "kdp-kvm.sock").is_err());
        drop(held);
        assert!(!SocketLock::is_held(dir.path(), "kdp-kvm.sock"));
    }

    #[test]
    fn a_second_holder_is_refused_until_the_first_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let first = SocketLock::try_acquire(dir.path(), "kdp-kvm.sock").unwrap();
        let err = SocketLock::try_acquire(dir.path(), "kdp-kvm.sock").unwrap_err();
        assert!(
            err.to_string()
                .contains(&format!("process {}", std::process::id())),
            "{err}"
        );
        // Another resource is another lock.
        let other = SocketLock::try_acquire(dir.path(), "kdp-tun.sock").unwrap();
        drop(first);
        let again = SocketLock::try_acquire(dir.path(), "kdp-kvm.sock").unwrap();
        drop(other);
        drop(again);
        assert!(
            !dir.path().join(LOCK_DIR).exists(),
            "left the lock directory"
        );
    }

    #[test]
    fn a_lock_file_deleted_under_its_holder_is_not_taken_twice() {
        let dir = tempfile::tempdir().unwrap();
        let first = SocketLock::try_acquire(dir.path(), "kdp-kvm.sock").unwrap();
        // Something deletes the directory's contents (the kubelet leaves directories, but an
        // operator may not): a new file is a new lock, which is taken; the old holder's drop
        // must not remove the new holder's file.
        fs::remove_file(dir.path().join(LOCK_DIR).join("kdp-kvm.sock.lock")).unwrap();
        let second = SocketLock::try_acquire(dir.path(), "kdp-kvm.sock").unwrap();
        drop(first);
        assert!(SocketLock::try_acquire(dir.path(), "kdp-kvm.sock").is_err());
        drop(second);
    }

    #[test]
    fn a_holder_whose_file_was_deleted_takes_it_again_or_learns_who_took_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(LOCK_DIR).join("kdp-kvm.sock.lock");
        let mut holder = SocketLock::try_acquire(dir.path(), "kdp-kvm.sock").unwrap();
        assert!(!holder.keep().unwrap(), "nothing was amiss");
        // Its whole directory deleted: taken again, at the same path.
        fs::remove_dir_all(dir.path().join(LOCK_DIR)).unwrap();
        assert!(holder.keep().unwrap());
        assert_eq!(holder.path(), path);
        assert!(SocketLock::try_acquire(dir.path(), "kdp-kvm.sock").is_err());
        // Deleted, and another instance took the path first: it holds the slot now.
        fs::remove_file(&path).unwrap();
        let other = SocketLock::try_acquire(dir.path(), "kdp-kvm.sock").unwrap();
        assert!(matches!(holder.keep(), Err(LockError::Held { .. })));
        drop(holder);
        assert!(
            path.exists(),
            "the old holder removed the new holder's file"
        );
        drop(other);
        assert!(!path.exists());
    }

    #[test]
    fn the_slot_taken_last_is_read_back_and_anything_else_reads_as_none() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(last_slot(dir.path(), "kdp-kvm.sock"), None);
        let _held = SocketLock::try_acquire(dir.path(), "kdp-kvm~1.sock").unwrap();
        remember_slot(dir.path(), "kdp-kvm.sock", 1).unwrap();
        assert_eq!(last_slot(dir.path(), "kdp-kvm.sock"), Some(1));
        assert_eq!(last_slot(dir.path(), "kdp-tun.sock"), None);
        let memo = dir.path().join(LOCK_DIR).join("kdp-kvm.sock.last");
        for torn in ["", "\n", "x\n", "-1\n"] {
            fs::write(&memo, torn).unwrap();
            assert_eq!(last_slot(dir.path(), "kdp-kvm.sock"), None, "{torn:?}");
        }
        remember_slot(dir.path(), "kdp-kvm.sock", 0).unwrap();
        forget_slot(dir.path(), "kdp-kvm.sock");
        assert_eq!(last_slot(dir.path(), "kdp-kvm.sock"), None);
        assert!(!memo.exists());
    }

    #[test]
    fn a_turn_waits_for_the_one_before_it_and_survives_its_file_being_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("turn.lock");
        let first = TurnLock::wait(&path).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let waiter = {
            let path = path.clone();
            std::thread::spawn(move || {
                let turn = TurnLock::wait(&path).unwrap();
                tx.send(()).unwrap();
                turn
            })
        };
        // The waiter cannot have its turn while the first holds it.
        assert!(rx
            .recv_timeout(std::time::Duration::from_millis(200))
            .is_err());
        drop(first);
        rx.recv().unwrap();
        let second = waiter.join().unwrap();
        // Deleted under its holder: the next turn takes a new file, the holder's drop is quiet.
        fs::remove_file(&path).unwrap();
        let third = TurnLock::wait(&path).unwrap();
        drop(second);
        assert!(path.exists());
        drop(third);
    }
}
