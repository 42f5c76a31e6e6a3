//! The "inotify" thread: turns changes in the plugin directory (the kubelet restarting, our sockets
//! being removed) and in the directories of device nodes into events for the control loop. It
//! blocks in `read` between changes: nothing polls.

use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};

use crossbeam_channel::Sender;
use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask, Watches};
use log::{debug, error, warn};

use crate::daemon::Event;
use crate::device::SOCKET_PREFIX;

/// The kubelet's registration socket, in the plugin directory.
pub const KUBELET_SOCKET: &str = "kubelet.sock";

/// One mask for every watch: inotify keeps one watch per inode, so a directory that is both the
/// plugin directory and a device directory must not get two different masks.
const MASK: WatchMask = WatchMask::CREATE
    .union(WatchMask::DELETE)
    .union(WatchMask::MOVED_FROM)
    .union(WatchMask::MOVED_TO)
    .union(WatchMask::DELETE_SELF)
    .union(WatchMask::MOVE_SELF)
    .union(WatchMask::ONLYDIR);

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("cannot start inotify")]
    Init(#[source] io::Error),
    #[error("cannot watch the plugin directory {path}")]
    WatchPluginDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot start the inotify thread")]
    Spawn(#[source] io::Error),
}

/// Handle to the running inotify thread.
pub struct Watcher {
    handle: JoinHandle<()>,
    watches: Watches,
    plugin_wd: WatchDescriptor,
    stopping: Arc<AtomicBool>,
}

impl Watcher {
    /// Watches `plugin_dir` and the device nodes at `device_paths`, sending events to `events`.
    pub fn spawn(
        plugin_dir: &Path,
        device_paths: Vec<PathBuf>,
        events: Sender<Event>,
    ) -> Result<Watcher, WatchError> {
        let inotify = Inotify::init().map_err(WatchError::Init)?;
        let mut watches = inotify.watches();
        let plugin_wd =
            watches
                .add(plugin_dir, MASK)
                .map_err(|source| WatchError::WatchPluginDir {
                    path: plugin_dir.to_owned(),
                    source,
                })?;
        let stopping = Arc::new(AtomicBool::new(false));
        let mut thread = WatchThread {
            inotify,
            plugin_wd: plugin_wd.clone(),
            devices: DeviceWatches::new(watches.clone(), device_paths),
            events,
            stopping: Arc::clone(&stopping),
        };
        thread.devices.refresh();
        let handle = thread::Builder::new()
            .name("inotify".into())
            .spawn(move || thread.run())
            .map_err(WatchError::Spawn)?;
        Ok(Watcher {
            handle,
            watches,
            plugin_wd,
            stopping,
        })
    }

    /// Stops the thread and waits for it.
    pub fn stop(mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        // Removing a watch queues an IN_IGNORED event, which wakes the blocked read. If the
        // watch is already gone, the thread has seen its IN_IGNORED and is ending by itself.
        if let Err(e) = self.watches.remove(self.plugin_wd) {
            debug!("plugin directory watch already gone: {e}");
        }
        if self.handle.join().is_err() {
            error!("the inotify thread panicked");
        }
    }
}

struct WatchThread {
    inotify: Inotify,
    plugin_wd: WatchDescriptor,
    devices: DeviceWatches,
    events: Sender<Event>,
    stopping: Arc<AtomicBool>,
}

impl WatchThread {
    fn run(mut self) {
        let mut buffer = [0u8; 4096];
        loop {
            let events = match self.inotify.read_events_blocking(&mut buffer) {
                Ok(events) => events,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    error!("cannot read inotify events: {e}");
                    let _ = self.events.send(Event::WatcherFailed);
                    return;
                }
            };
            if self.stopping.load(Ordering::SeqCst) {
                return;
            }
            let mut out = Vec::new();
            let mut devices_changed = false;
            let mut plugin_dir_gone = false;
            for event in events {
                if event.mask.contains(EventMask::Q_OVERFLOW) {
                    warn!("inotify queue overflowed; checking everything again");
                    out.push(Event::Resync);
                    devices_changed = true;
                    continue;
                }
                if event.wd == self.plugin_wd {
                    if event.mask.intersects(
                        EventMask::IGNORED | EventMask::DELETE_SELF | EventMask::MOVE_SELF,
                    ) {
                        plugin_dir_gone = true;
                    } else if let Some(e) = event
                        .name
                        .and_then(|name| plugin_dir_event(event.mask, name))
                    {
                        out.push(e);
                    }
                }
                devices_changed |= self.devices.concerns(&event.wd, event.mask, event.name);
            }
            if devices_changed {
                // Directories on the way to a node may have appeared or gone.
                self.devices.refresh();
                out.push(Event::DevicesChanged);
            }
            if plugin_dir_gone {
                out.push(Event::PluginDirGone);
            }
            for e in out {
                debug!("{e:?}");
                if self.events.send(e).is_err() {
                    return;
                }
            }
            if plugin_dir_gone {
                return;
            }
        }
    }
}

/// The event a change of `name` in the plugin directory means, if any.
fn plugin_dir_event(mask: EventMask, name: &OsStr) -> Option<Event> {
    let appeared = mask.intersects(EventMask::CREATE | EventMask::MOVED_TO);
    let vanished = mask.intersects(EventMask::DELETE | EventMask::MOVED_FROM);
    if name == KUBELET_SOCKET {
        if appeared {
            return Some(Event::KubeletSocketCreated);
        }
        if vanished {
            return Some(Event::KubeletSocketRemoved);
        }
    } else if vanished
        && name
            .as_encoded_bytes()
            .starts_with(SOCKET_PREFIX.as_bytes())
    {
        return Some(Event::SocketRemoved(name.to_owned()));
    }
    None
}

/// Watches, for each device node, the deepest directory on its path that exists, and remembers
/// which entry in it leads to the node.
struct DeviceWatches {
    watches: Watches,
    paths: Vec<PathBuf>,
    interest: HashMap<WatchDescriptor, HashSet<OsString>>,
}

impl DeviceWatches {
    fn new(watches: Watches, paths: Vec<PathBuf>) -> DeviceWatches {
        DeviceWatches {
            watches,
            paths,
            interest: HashMap::new(),
        }
    }

    fn refresh(&mut self) {
        let mut interest: HashMap<WatchDescriptor, HashSet<OsString>> = HashMap::new();
        for path in &self.paths {
            let mut entry = path.as_path();
            while let (Some(dir), Some(name)) = (entry.parent(), entry.file_name()) {
                match self.watches.add(dir, MASK) {
                    Ok(wd) => {
                        interest.entry(wd).or_default().insert(name.to_owned());
                        break;
                    }
                    // The directory does not exist (yet): watch the one above for it to appear.
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
                        ) =>
                    {
                        entry = dir;
                    }
                    Err(e) => {
                        warn!("cannot watch {} for {}: {e}", dir.display(), path.display());
                        break;
                    }
                }
            }
        }
        self.interest = interest;
    }

    /// Whether an event may have changed the presence of a device node.
    fn concerns(&self, wd: &WatchDescriptor, mask: EventMask, name: Option<&OsStr>) -> bool {
        let Some(names) = self.interest.get(wd) else {
            return false;
        };
        if mask.intersects(EventMask::IGNORED | EventMask::DELETE_SELF | EventMask::MOVE_SELF) {
            return true;
        }
        name.is_some_and(|n| names.contains(n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crossbeam_channel::{Receiver, RecvTimeoutError};
    use std::fs;
    use std::os::unix::net::UnixListener;
    use std::time::Duration;

    const WAIT: Duration = Duration::from_secs(10);

    fn next(rx: &Receiver<Event>) -> Event {
        rx.recv_timeout(WAIT).expect("an event within 10 s")
    }

    /// Waits for an event matching `want`, skipping others.
    fn wait_for(rx: &Receiver<Event>, want: impl Fn(&Event) -> bool) -> Event {
        loop {
            let e = next(rx);
            if want(&e) {
                return e;
            }
        }
    }

    #[test]
    fn reports_the_kubelet_socket_and_our_sockets() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, rx) = crossbeam_channel::unbounded();
        let watcher = Watcher::spawn(dir.path(), vec![], tx).unwrap();

        let kubelet = UnixListener::bind(dir.path().join(KUBELET_SOCKET)).unwrap();
        assert!(matches!(next(&rx), Event::KubeletSocketCreated));
        let ours = UnixListener::bind(dir.path().join("kdp-kvm.sock")).unwrap();
        // Someone else's socket, created and removed: no event.
        let theirs = UnixListener::bind(dir.path().join("other.sock")).unwrap();
        fs::remove_file(dir.path().join("other.sock")).unwrap();
        fs::remove_file(dir.path().join("kdp-kvm.sock")).unwrap();
        assert!(matches!(next(&rx), Event::SocketRemoved(n) if n == "kdp-kvm.sock"));
        fs::remove_file(dir.path().join(KUBELET_SOCKET)).unwrap();
        assert!(matches!(next(&rx), Event::KubeletSocketRemoved));
        drop((kubelet, ours, theirs));

        watcher.stop();
        assert!(matches!(
            rx.recv_timeout(Duration::ZERO),
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected)
        ));
    }

    #[test]
    fn reports_device_nodes_coming_and_going_even_in_missing_directories() {
        let plugin_dir = tempfile::tempdir().unwrap();
        let dev = tempfile::tempdir().unwrap();
        let tun = dev.path().join("net/tun");
        let kvm = dev.path().join("kvm");
        let (tx, rx) = crossbeam_channel::unbounded();
        let watcher =
            Watcher::spawn(plugin_dir.path(), vec![tun.clone(), kvm.clone()], tx).unwrap();

        fs::write(&kvm, b"").unwrap();
        assert!(matches!(next(&rx), Event::DevicesChanged));
        // An unrelated file in a watched directory is not news.
        fs::write(dev.path().join("unrelated"), b"").unwrap();
        fs::create_dir(dev.path().join("net")).unwrap();
        assert!(matches!(next(&rx), Event::DevicesChanged));
        fs::write(&tun, b"").unwrap();
        wait_for(&rx, |e| matches!(e, Event::DevicesChanged));
        assert!(rx.try_recv().is_err(), "unexpected extra events");
        fs::remove_file(&tun).unwrap();
        assert!(matches!(next(&rx), Event::DevicesChanged));
        fs::rename(&kvm, dev.path().join("kvm.moved")).unwrap();
        assert!(matches!(next(&rx), Event::DevicesChanged));
        watcher.stop();
    }

    #[test]
    fn reports_the_plugin_directory_vanishing() {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("device-plugins");
        fs::create_dir(&dir).unwrap();
        let (tx, rx) = crossbeam_channel::unbounded();
        let watcher = Watcher::spawn(&dir, vec![], tx).unwrap();
        fs::remove_dir(&dir).unwrap();
        wait_for(&rx, |e| matches!(e, Event::PluginDirGone));
        watcher.stop();
    }

    #[test]
    fn a_missing_plugin_directory_is_a_clear_error() {
        let (tx, _rx) = crossbeam_channel::unbounded();
        let err = Watcher::spawn(Path::new("/nonexistent/device-plugins"), vec![], tx)
            .err()
            .unwrap();
        assert!(
            err.to_string().contains("/nonexistent/device-plugins"),
            "{err}"
        );
    }
}
