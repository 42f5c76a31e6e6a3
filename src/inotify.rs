//! The "inotify" thread: turns changes in our socket directories (the kubelet restarting, our
//! sockets or lock files being removed), in the directories of device nodes (hotplug, removal) and
//! in the configuration file's directory into events for the control loop, in either mode. It blocks in `read` between changes: nothing
//! polls.

use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crossbeam_channel::Sender;
use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask, Watches};
use log::{debug, error, warn};

use crate::device::WatchTarget;
use crate::event::Event;
use crate::layout::{is_our_socket, KUBELET_SOCKET};
use crate::thread::ThreadHandle;

/// Entries appearing and disappearing: all we need from the plugin and device directories. Never
/// close-after-write there: every write to /dev/null would wake us.
const ENTRY_MASK: WatchMask = WatchMask::CREATE
    .union(WatchMask::DELETE)
    .union(WatchMask::MOVED_FROM)
    .union(WatchMask::MOVED_TO)
    .union(WatchMask::DELETE_SELF)
    .union(WatchMask::MOVE_SELF)
    .union(WatchMask::ONLYDIR)
    // One watch per inode: add to whatever another purpose asked of the same directory.
    .union(WatchMask::MASK_ADD);
/// The configuration file's directory also reports files written in place.
const CONFIG_MASK: WatchMask = ENTRY_MASK.union(WatchMask::CLOSE_WRITE);
/// The name a Kubernetes ConfigMap volume swaps atomically when its content changes.
const CONFIGMAP_DATA: &str = "..data";

/// What can fail here. Each variant's `#[error]` message is its documentation.
#[allow(missing_docs)]
#[derive(Debug, thiserror::Error)]
pub enum InotifyError {
    #[error("cannot start inotify")]
    Init(#[source] io::Error),
    #[error("cannot watch the plugin directory {path}")]
    WatchSocketDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot watch the directory of the configuration file {path}")]
    WatchConfig {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot start the inotify thread")]
    Spawn(#[source] io::Error),
}

/// Handle to the running inotify thread.
pub struct InotifyThread {
    thread: ThreadHandle,
    devices: Arc<Mutex<DeviceWatches>>,
}

impl InotifyThread {
    /// Watches `socket_dir` (our sockets, and kubelet.sock where that is their directory), `other_socket_dirs` (more of our
    /// sockets), the device entries named by `targets`, the lock files named by `lock_targets`,
    /// the node label files named by `label_targets`, and `config_file` if given, sending
    /// events to `events`.
    pub fn spawn(
        socket_dir: &Path,
        other_socket_dirs: &[&Path],
        targets: Vec<WatchTarget>,
        lock_targets: Vec<WatchTarget>,
        label_targets: Vec<WatchTarget>,
        config_file: Option<&Path>,
        events: Sender<Event>,
    ) -> Result<InotifyThread, InotifyError> {
        let inotify = Inotify::init().map_err(InotifyError::Init)?;
        let mut watches = inotify.watches();
        let socket_wd =
            watches
                .add(socket_dir, ENTRY_MASK)
                .map_err(|source| InotifyError::WatchSocketDir {
                    path: socket_dir.to_owned(),
                    source,
                })?;
        let mut socket_wds = vec![(socket_wd.clone(), socket_dir.to_owned())];
        for dir in other_socket_dirs {
            let wd =
                watches
                    .add(dir, ENTRY_MASK)
                    .map_err(|source| InotifyError::WatchSocketDir {
                        path: dir.to_path_buf(),
                        source,
                    })?;
            socket_wds.push((wd, dir.to_path_buf()));
        }
        let config = match config_file {
            None => None,
            Some(file) => {
                let dir = file
                    .parent()
                    .filter(|d| !d.as_os_str().is_empty())
                    .unwrap_or(Path::new("."));
                let wd =
                    watches
                        .add(dir, CONFIG_MASK)
                        .map_err(|source| InotifyError::WatchConfig {
                            path: file.to_owned(),
                            source,
                        })?;
                let name = file.file_name().map(OsStr::to_owned).unwrap_or_default();
                Some((wd, name))
            }
        };
        let stopping = Arc::new(AtomicBool::new(false));
        let devices = Arc::new(Mutex::new(DeviceWatches::new(watches.clone(), targets)));
        lock(&devices).refresh();
        // Lock files go where device nodes go: their directory may not exist yet, or vanish
        // with the last holder; the same bookkeeping follows them.
        let mut locks = DeviceWatches::new(watches.clone(), lock_targets);
        locks.refresh();
        // So do label files: NFD's directory may be made after we start.
        let mut labels = DeviceWatches::new(watches.clone(), label_targets);
        labels.refresh();
        let body = WatchThread {
            inotify,
            socket_wds,
            config,
            locks,
            labels,
            devices: Arc::clone(&devices),
            events: events.clone(),
            stopping: Arc::clone(&stopping),
        };
        let stop = move || {
            stopping.store(true, Ordering::SeqCst);
            // Removing a watch queues an IN_IGNORED event, which wakes the blocked read. If the
            // watch is already gone, the thread has seen its IN_IGNORED and is ending by itself.
            if let Err(e) = watches.remove(socket_wd) {
                debug!("plugin directory watch already gone: {e}");
            }
        };
        let thread = ThreadHandle::spawn("inotify", events, move || body.run(), stop)
            .map_err(InotifyError::Spawn)?;
        Ok(InotifyThread { thread, devices })
    }

    /// Watches these device entries from now on, instead of the earlier ones.
    pub fn set_targets(&self, targets: Vec<WatchTarget>) {
        let mut devices = lock(&self.devices);
        devices.targets = targets;
        devices.refresh();
    }

    /// Stops the thread and waits for it.
    pub fn stop(self) {
        self.thread.stop();
    }
}

fn lock(devices: &Mutex<DeviceWatches>) -> MutexGuard<'_, DeviceWatches> {
    // The watch table is rebuilt whole by every refresh; a panic mid-way cannot corrupt it.
    devices
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

struct WatchThread {
    inotify: Inotify,
    /// The plugin directory, then any other directories holding our sockets.
    socket_wds: Vec<(WatchDescriptor, PathBuf)>,
    /// The configuration file's directory and the file's name in it.
    config: Option<(WatchDescriptor, OsString)>,
    /// Other instances' lock files: one removed means its resource is free to take.
    locks: DeviceWatches,
    /// Our node label files, which a cleanup may remove.
    labels: DeviceWatches,
    devices: Arc<Mutex<DeviceWatches>>,
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
                    let _ = self.events.send(Event::InotifyFailed);
                    return;
                }
            };
            if self.stopping.load(Ordering::SeqCst) {
                return;
            }
            let mut out = Vec::new();
            let mut devices_changed = false;
            let mut locks_changed = false;
            let mut labels_changed = false;
            let mut config_changed = false;
            let mut socket_dir_gone = None;
            let devices = lock(&self.devices);
            for event in events {
                if event.mask.contains(EventMask::Q_OVERFLOW) {
                    warn!("inotify queue overflowed; checking everything again");
                    out.push(Event::Resync);
                    devices_changed = true;
                    locks_changed = true;
                    labels_changed = true;
                    continue;
                }
                if let Some((_, dir)) = self.socket_wds.iter().find(|(wd, _)| *wd == event.wd) {
                    if event.mask.intersects(
                        EventMask::IGNORED | EventMask::DELETE_SELF | EventMask::MOVE_SELF,
                    ) {
                        socket_dir_gone = Some(dir.clone());
                    } else if let Some(e) = event
                        .name
                        .and_then(|name| socket_dir_event(event.mask, name))
                    {
                        out.push(e);
                    }
                }
                if let Some((wd, file)) = &self.config {
                    // A completed write or a rename into place; never a creation, which comes
                    // before the content (`rm` then `cat >`, editors, `install`) and would have
                    // the daemon read an empty file.
                    let written = EventMask::CLOSE_WRITE | EventMask::MOVED_TO;
                    config_changed |= event.wd == *wd
                        && event.mask.intersects(written)
                        && event
                            .name
                            .is_some_and(|n| n == file.as_os_str() || n == CONFIGMAP_DATA);
                }
                devices_changed |= devices.concerns(&event.wd, event.mask, event.name);
                locks_changed |= self.locks.concerns(&event.wd, event.mask, event.name);
                labels_changed |= self.labels.concerns(&event.wd, event.mask, event.name);
            }
            drop(devices);
            if locks_changed {
                self.locks.refresh();
                out.push(Event::LocksChanged);
            }
            if labels_changed {
                self.labels.refresh();
                out.push(Event::LabelsChanged);
            }
            if devices_changed {
                // Directories on the way to a node may have appeared or gone.
                lock(&self.devices).refresh();
                out.push(Event::DevicesChanged);
            }
            if config_changed {
                out.push(Event::ConfigChanged);
            }
            let gone = socket_dir_gone.is_some();
            if let Some(dir) = socket_dir_gone {
                out.push(Event::SocketDirGone(dir));
            }
            for e in out {
                debug!("{e:?}");
                if self.events.send(e).is_err() {
                    return;
                }
            }
            if gone {
                return;
            }
        }
    }
}

/// The event a change of `name` in the plugin directory means, if any.
fn socket_dir_event(mask: EventMask, name: &OsStr) -> Option<Event> {
    let appeared = mask.intersects(EventMask::CREATE | EventMask::MOVED_TO);
    let vanished = mask.intersects(EventMask::DELETE | EventMask::MOVED_FROM);
    if name == KUBELET_SOCKET {
        if appeared {
            return Some(Event::KubeletSocketCreated);
        }
        if vanished {
            return Some(Event::KubeletSocketRemoved);
        }
    } else if vanished && is_our_socket(name) {
        return Some(Event::SocketRemoved(name.to_owned()));
    }
    None
}

/// For each target, watches the deepest directory on its way that exists, and remembers which
/// entries there matter: the target's pattern in its own directory, or the name of the next
/// missing directory on the way to it.
struct DeviceWatches {
    watches: Watches,
    targets: Vec<WatchTarget>,
    interest: HashMap<WatchDescriptor, Vec<glob::Pattern>>,
}

impl DeviceWatches {
    fn new(watches: Watches, targets: Vec<WatchTarget>) -> DeviceWatches {
        DeviceWatches {
            watches,
            targets,
            interest: HashMap::new(),
        }
    }

    fn refresh(&mut self) {
        let mut interest: HashMap<WatchDescriptor, Vec<glob::Pattern>> = HashMap::new();
        let mut seen: HashSet<(PathBuf, String)> = HashSet::new();
        for target in &self.targets {
            let mut dir = target.dir.as_path();
            let mut name = target.name.clone();
            loop {
                match self.watches.add(dir, ENTRY_MASK) {
                    Ok(wd) => {
                        if seen.insert((dir.to_owned(), name.as_str().to_owned())) {
                            interest.entry(wd).or_default().push(name);
                        }
                        break;
                    }
                    // Not there (yet): watch the directory above for it to appear.
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
                        ) =>
                    {
                        let (Some(parent), Some(missing)) = (dir.parent(), dir.file_name()) else {
                            break;
                        };
                        name =
                            glob::Pattern::new(&glob::Pattern::escape(&missing.to_string_lossy()))
                                .expect("an escaped name is a valid pattern");
                        dir = parent;
                    }
                    Err(e) => {
                        warn!(
                            "cannot watch {} for {}: {e}",
                            dir.display(),
                            target.dir.join(target.name.as_str()).display()
                        );
                        break;
                    }
                }
            }
        }
        self.interest = interest;
    }

    /// Whether an event may have changed which device nodes exist.
    fn concerns(&self, wd: &WatchDescriptor, mask: EventMask, name: Option<&OsStr>) -> bool {
        let Some(patterns) = self.interest.get(wd) else {
            return false;
        };
        if mask.intersects(EventMask::IGNORED | EventMask::DELETE_SELF | EventMask::MOVE_SELF) {
            return true;
        }
        if !mask.intersects(
            EventMask::CREATE | EventMask::DELETE | EventMask::MOVED_FROM | EventMask::MOVED_TO,
        ) {
            return false;
        }
        name.is_some_and(|n| {
            let n = n.to_string_lossy();
            patterns.iter().any(|p| p.matches(&n))
        })
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

    fn target(dir: &Path, pattern: &str) -> WatchTarget {
        WatchTarget {
            dir: dir.to_owned(),
            name: glob::Pattern::new(pattern).unwrap(),
        }
    }

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
    fn reports_another_instances_lock_going_even_with_its_directory() {
        let dir = tempfile::tempdir().unwrap();
        let locks = dir.path().join(crate::lock::LOCK_DIR);
        let (tx, rx) = crossbeam_channel::unbounded();
        let watcher = InotifyThread::spawn(
            dir.path(),
            &[],
            vec![],
            vec![target(&locks, "*.lock")],
            vec![],
            None,
            tx,
        )
        .unwrap();
        // Another instance takes a lock (the directory is new) and lets go, twice over: the
        // last holder removes the directory, and the next one makes it again.
        for _ in 0..2 {
            let other = crate::lock::SocketLock::try_acquire(dir.path(), "kdp-kvm.sock").unwrap();
            wait_for(&rx, |e| matches!(e, Event::LocksChanged));
            drop(other);
            wait_for(&rx, |e| matches!(e, Event::LocksChanged));
            assert!(!locks.exists());
        }
        watcher.stop();
    }

    #[test]
    fn reports_our_label_files_going_even_when_their_directory_comes_later() {
        let dir = tempfile::tempdir().unwrap();
        let nfd = dir.path().join("features.d");
        let (tx, rx) = crossbeam_channel::unbounded();
        let watcher = InotifyThread::spawn(
            dir.path(),
            &[],
            vec![],
            vec![],
            vec![target(&nfd, "kdp-*")],
            None,
            tx,
        )
        .unwrap();
        fs::create_dir(&nfd).unwrap();
        fs::write(nfd.join("someone-else"), b"x=1").unwrap();
        fs::write(nfd.join("kdp-kvm"), b"devices.anza-labs.dev/kvm=1").unwrap();
        wait_for(&rx, |e| matches!(e, Event::LabelsChanged));
        fs::remove_file(nfd.join("kdp-kvm")).unwrap();
        wait_for(&rx, |e| matches!(e, Event::LabelsChanged));
        watcher.stop();
    }

    #[test]
    fn reports_the_kubelet_socket_and_our_sockets() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, rx) = crossbeam_channel::unbounded();
        let watcher =
            InotifyThread::spawn(dir.path(), &[], vec![], vec![], vec![], None, tx).unwrap();

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
        let socket_dir = tempfile::tempdir().unwrap();
        let dev = tempfile::tempdir().unwrap();
        let tun = dev.path().join("net/tun");
        let kvm = dev.path().join("kvm");
        let (tx, rx) = crossbeam_channel::unbounded();
        let targets = [&tun, &kvm]
            .iter()
            .map(|p| {
                target(
                    p.parent().unwrap(),
                    p.file_name().unwrap().to_str().unwrap(),
                )
            })
            .collect();
        let watcher =
            InotifyThread::spawn(socket_dir.path(), &[], targets, vec![], vec![], None, tx)
                .unwrap();

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
        let watcher = InotifyThread::spawn(&dir, &[], vec![], vec![], vec![], None, tx).unwrap();
        fs::remove_dir(&dir).unwrap();
        wait_for(&rx, |e| matches!(e, Event::SocketDirGone(_)));
        watcher.stop();
    }

    #[test]
    fn a_missing_plugin_directory_is_a_clear_error() {
        let (tx, _rx) = crossbeam_channel::unbounded();
        let err = InotifyThread::spawn(
            Path::new("/nonexistent/device-plugins"),
            &[],
            vec![],
            vec![],
            vec![],
            None,
            tx,
        )
        .err()
        .unwrap();
        assert!(
            err.to_string().contains("/nonexistent/device-plugins"),
            "{err}"
        );
    }

    #[test]
    fn reports_glob_matches_coming_and_going() {
        let socket_dir = tempfile::tempdir().unwrap();
        let dev = tempfile::tempdir().unwrap();
        let (tx, rx) = crossbeam_channel::unbounded();
        let watcher = InotifyThread::spawn(
            socket_dir.path(),
            &[],
            vec![target(dev.path(), "ttyUSB*")],
            vec![],
            vec![],
            None,
            tx,
        )
        .unwrap();
        fs::write(dev.path().join("ttyS0"), b"").unwrap();
        fs::write(dev.path().join("ttyUSB0"), b"").unwrap();
        assert!(matches!(next(&rx), Event::DevicesChanged));
        assert!(rx.try_recv().is_err(), "ttyS0 is not a match");
        fs::remove_file(dev.path().join("ttyUSB0")).unwrap();
        assert!(matches!(next(&rx), Event::DevicesChanged));
        watcher.stop();
    }

    #[test]
    fn new_targets_replace_the_old_ones() {
        let socket_dir = tempfile::tempdir().unwrap();
        let dev = tempfile::tempdir().unwrap();
        let (tx, rx) = crossbeam_channel::unbounded();
        let watcher = InotifyThread::spawn(
            socket_dir.path(),
            &[],
            vec![target(dev.path(), "a")],
            vec![],
            vec![],
            None,
            tx,
        )
        .unwrap();
        watcher.set_targets(vec![target(dev.path(), "b")]);
        fs::write(dev.path().join("a"), b"").unwrap();
        fs::write(dev.path().join("b"), b"").unwrap();
        assert!(matches!(next(&rx), Event::DevicesChanged));
        assert!(rx.try_recv().is_err(), "a is no longer watched");
        watcher.stop();
    }

    /// The inotify thread watching a configuration file, in temporary directories.
    struct ConfigWatch {
        socket_dir: tempfile::TempDir,
        etc: tempfile::TempDir,
        config: PathBuf,
        rx: Receiver<Event>,
        watcher: InotifyThread,
    }

    impl ConfigWatch {
        fn new() -> ConfigWatch {
            let socket_dir = tempfile::tempdir().unwrap();
            let etc = tempfile::tempdir().unwrap();
            let config = etc.path().join("config.yaml");
            fs::write(&config, "resources: []").unwrap();
            let (tx, rx) = crossbeam_channel::unbounded();
            let watcher = InotifyThread::spawn(
                socket_dir.path(),
                &[],
                vec![],
                vec![],
                vec![],
                Some(&config),
                tx,
            )
            .unwrap();
            ConfigWatch {
                socket_dir,
                etc,
                config,
                rx,
                watcher,
            }
        }
    }

    #[test]
    fn a_config_file_deleted_and_created_again_is_reported_once_written_not_when_created() {
        let ConfigWatch {
            socket_dir,
            etc: _etc,
            config,
            rx,
            watcher,
        } = ConfigWatch::new();
        // `rm config.yaml; cat > config.yaml`: created empty, written, then closed.
        fs::remove_file(&config).unwrap();
        let mut file = fs::File::create(&config).unwrap();
        // A marker event: everything queued before it has been reported by the time it comes.
        fs::write(socket_dir.path().join(KUBELET_SOCKET), b"").unwrap();
        assert!(
            matches!(next(&rx), Event::KubeletSocketCreated),
            "the creation of the empty file was reported"
        );
        std::io::Write::write_all(&mut file, b"resources: [{name: kvm}]").unwrap();
        drop(file);
        assert!(matches!(next(&rx), Event::ConfigChanged));
        assert!(rx.try_recv().is_err(), "unexpected extra events");
        watcher.stop();
    }

    #[test]
    fn reports_config_edits_in_place_by_rename_and_by_configmap_swap() {
        let ConfigWatch {
            socket_dir: _plugin_dir,
            etc,
            config,
            rx,
            watcher,
        } = ConfigWatch::new();

        fs::write(&config, "resources: [{name: kvm}]").unwrap();
        assert!(matches!(next(&rx), Event::ConfigChanged));
        fs::write(etc.path().join("other.yaml"), "x").unwrap();
        fs::write(etc.path().join("config.yaml.new"), "resources: []").unwrap();
        fs::rename(etc.path().join("config.yaml.new"), &config).unwrap();
        assert!(matches!(next(&rx), Event::ConfigChanged));
        // What the kubelet does to a ConfigMap volume: a new timestamped directory, then an
        // atomic swap of the ..data symlink.
        fs::create_dir(etc.path().join("..2026_v2")).unwrap();
        std::os::unix::fs::symlink("..2026_v2", etc.path().join("..data_tmp")).unwrap();
        fs::rename(etc.path().join("..data_tmp"), etc.path().join("..data")).unwrap();
        assert!(matches!(next(&rx), Event::ConfigChanged));
        assert!(rx.try_recv().is_err(), "unexpected extra events");
        watcher.stop();
    }
}
