//! The device-plugin frontend (main thread): each resource served on sockets of its own, with the
//! kubelet's `DevicePlugin` API ([`plugin`], answered on the completion-queue threads) and
//! registered through `kubelet.sock` (the "register" thread) or the plugin watcher. The control
//! loop decides when; this file does it: socket slots and their locks, servers, CDI specs.

pub mod plugin;

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::path::PathBuf;
use std::sync::Arc;

use crossbeam_channel::Sender;
use grpcio::Environment;
use log::{error, info, warn};

use crate::cdi::SpecFiles;
use crate::control::{Frontend, ServeError};
use crate::device::{Device, Inventory, Resource};
use crate::event::{Event, KubeletCalls, RegisterCommand, RegisterJob};
use crate::layout::{self, Layout};
use crate::lock::{self, LockError, SocketLock};
use crate::metrics::Metrics;
use crate::proto;
use crate::registration::kubelet_socket::{kubelet_id, KubeletId, RegisterThread};
use crate::registration::plugin_watcher;
use crate::server::ResourceServer;

use plugin::Plugin;

/// How long the last instance out waits for the kubelet to let go of a resource's socket.
/// A kubelet lets go within milliseconds when idle, but the cluster suite's 1.20.2 on two busy
/// cores did not within 0.5 s.
const KUBELET_LET_GO: std::time::Duration = std::time::Duration::from_secs(2);

/// The device plugin on the real node: servers on real sockets, the register thread, CDI specs.
pub struct DevicePlugins {
    layout: Layout,
    env: Arc<Environment>,
    metrics: Arc<Metrics>,
    /// For the plugin watcher's answers, which come on completion-queue threads.
    events: Sender<Event>,
    register: RegisterThread,
    /// Each configured resource's service, by resource name: its device list, kept across server
    /// restarts.
    plugins: BTreeMap<String, Plugin>,
    /// The resources whose sockets we own on this node, by resource name: the socket slot we
    /// hold (`layout::SLOTS`) and its lock.
    locks: HashMap<String, (usize, SocketLock)>,
    /// The kubelet's calls to each running server, by server ID.
    kubelet_calls: HashMap<u64, KubeletCalls>,
    /// By resource name: the kubelet (its kubelet.sock) there was when the resource's server
    /// last started.
    served_under: HashMap<String, Option<KubeletId>>,
    /// CDI specs of the resources we serve that use CDI; removed when this is dropped.
    cdi: SpecFiles,
}

impl DevicePlugins {
    /// The frontend on `layout`, with its register thread.
    pub fn new(
        layout: Layout,
        env: Arc<Environment>,
        metrics: Arc<Metrics>,
        events: Sender<Event>,
        cdi_dir: &std::path::Path,
    ) -> std::io::Result<DevicePlugins> {
        if layout.dials_kubelet() && !layout.kubelet_socket().exists() {
            info!(
                "waiting for the kubelet: {} does not exist yet",
                layout.kubelet_socket().display()
            );
        }
        // In plugin-watcher mode too: a kubelet that drops our stream is asked again through
        // kubelet.sock, at once, rather than through the watcher's next pass.
        let register =
            RegisterThread::spawn(Arc::clone(&env), layout.kubelet_socket(), events.clone())?;
        Ok(DevicePlugins {
            layout,
            env,
            metrics,
            events,
            register,
            plugins: BTreeMap::new(),
            locks: HashMap::new(),
            kubelet_calls: HashMap::new(),
            served_under: HashMap::new(),
            cdi: SpecFiles::new(cdi_dir),
        })
    }

    /// What registering `server` through `kubelet.sock` asks; `None` for a socket the kubelet
    /// could not reach from its device-plugin directory.
    fn job(&self, endpoint: &str, server: &ResourceServer) -> Option<RegisterJob> {
        Some(RegisterJob {
            resource_name: endpoint.to_owned(),
            endpoint: self.layout.kubelet_endpoint(server.path())?,
            options: Plugin::options(),
            server: server.id(),
            kubelet_calls: self
                .kubelet_calls
                .get(&server.id())
                .cloned()
                .unwrap_or_default(),
        })
    }

    /// A free socket slot of the resource, locked: the first after the slot the last instance
    /// on this node took, so that a restart serves on a socket path the kubelet did not hold a
    /// moment ago. Kubelet 1.37 keys its endpoints by socket path and tears the old one down
    /// only after its stream has ended; a registration of the same path that comes first is
    /// refused, and the refusal drops its record of the old one without disconnecting it, so
    /// that every later registration of that path is refused too, until the kubelet restarts
    /// (kubernetes PR #139338 calls the same-socket case unsupported). Sockets of the other
    /// slots that no one holds were left by an instance that was killed, or that ended while
    /// another served (`ResourceServer::stop_leaving_announcement`): removed, so that the
    /// plugin watcher stops dialling them.
    fn take_slot(&self, resource_name: &str) -> Result<(usize, SocketLock), ServeError> {
        let memo = layout::socket_name(resource_name);
        let first = lock::last_slot(&self.layout.socket_dir, &memo)
            .map_or(0, |last| (last + 1) % layout::SLOTS);
        self.take_first_free(
            resource_name,
            (0..layout::SLOTS).map(|i| (first + i) % layout::SLOTS),
        )
    }

    /// Another free socket slot than `held`, for a new server of a resource we serve under the
    /// same kubelet (our socket was removed): that kubelet may not have torn down its client of
    /// the old socket yet (see [`Self::take_slot`]). `None` when every other slot is taken.
    fn move_from(&self, resource_name: &str, held: usize) -> Option<(usize, SocketLock)> {
        let others = (1..layout::SLOTS).map(|i| (held + i) % layout::SLOTS);
        self.take_first_free(resource_name, others).ok()
    }

    /// The first of `slots` whose lock is free, locked and recorded as taken last.
    fn take_first_free(
        &self,
        resource_name: &str,
        slots: impl Iterator<Item = usize>,
    ) -> Result<(usize, SocketLock), ServeError> {
        let dir = &self.layout.socket_dir;
        let mut refusal = None;
        for slot in slots {
            let name = layout::slot_socket_name(resource_name, slot);
            match SocketLock::try_acquire(dir, &name) {
                Ok(lock) => {
                    for other in (0..layout::SLOTS).filter(|s| *s != slot) {
                        self.clear_if_stale(resource_name, other);
                    }
                    let memo = layout::socket_name(resource_name);
                    if let Err(e) = lock::remember_slot(dir, &memo, slot) {
                        // The next instance may then take this slot again: a restart that
                        // comes quickly may meet 1.37's refusal.
                        warn!("{resource_name}: cannot record the socket slot taken: {e}");
                    }
                    return Ok((slot, lock));
                }
                Err(e @ LockError::Held { .. }) => refusal = Some(e),
                Err(source) => {
                    return Err(ServeError::Failed {
                        endpoint: resource_name.to_owned(),
                        source: Box::new(source),
                    })
                }
            }
        }
        Err(ServeError::Held {
            endpoint: resource_name.to_owned(),
            source: refusal.unwrap_or_else(|| LockError::Held {
                path: dir.join(lock::LOCK_DIR),
                holder: "unknown".to_owned(),
            }),
        })
    }

    /// Whether another instance holds a socket slot of the resource other than `ours`.
    fn others_serve(&self, resource_name: &str, ours: usize) -> bool {
        (0..layout::SLOTS)
            .filter(|s| *s != ours)
            .any(|s| self.slot_held(resource_name, s))
    }

    /// Whether another instance holds the resource's socket slot `slot`.
    fn slot_held(&self, resource_name: &str, slot: usize) -> bool {
        let name = layout::slot_socket_name(resource_name, slot);
        SocketLock::is_held(&self.layout.socket_dir, &name)
    }

    /// Removes the sockets of a slot whose lock is free (held for the check, so that no
    /// instance can bind them meanwhile).
    fn clear_if_stale(&self, resource_name: &str, slot: usize) {
        let name = layout::slot_socket_name(resource_name, slot);
        let Ok(_lock) = SocketLock::try_acquire(&self.layout.socket_dir, &name) else {
            return;
        };
        let endpoint = self.layout.socket_path_in(resource_name, slot);
        let registration = self.layout.registration_path_for(&endpoint);
        for path in std::iter::once(endpoint).chain(registration) {
            let is_socket = std::fs::symlink_metadata(&path)
                .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()));
            if is_socket && std::fs::remove_file(&path).is_ok() {
                info!(
                    "removed {}, left by an instance that is gone",
                    path.display()
                );
            }
        }
    }

    /// Describes the devices to the runtime (a CDI spec, for resources that use CDI) before the
    /// kubelet can allocate them; only while we own the resource: another instance may be
    /// serving it still.
    fn describe(&mut self, resource: &Resource, devices: &[Device]) {
        if !self.locks.contains_key(&resource.resource_name) {
            return;
        }
        if let Err(e) = self.cdi.publish(resource, devices) {
            error!(
                "{}: allocations name CDI devices the runtime cannot find: {}",
                resource.resource_name,
                crate::error::error_chain(&e)
            );
        }
    }
}

impl Frontend for DevicePlugins {
    type Server = ResourceServer;

    fn endpoints(&self, inventory: &Inventory) -> BTreeMap<String, Vec<String>> {
        inventory
            .keys()
            .map(|name| (name.clone(), vec![name.clone()]))
            .collect()
    }

    fn check(&self, resource: &Resource) -> Result<(), String> {
        self.layout
            .check(&resource.resource_name)
            .map_err(|e| crate::error::error_chain(&e))
    }

    fn publish(&mut self, inventory: &Inventory) {
        for (name, found) in inventory {
            match self.plugins.get(name).cloned() {
                Some(plugin) => {
                    // The runtime learns of a device before the kubelet does, so that no
                    // allocation names one it cannot find.
                    let now = plugin.snapshot();
                    if now.resource == found.resource && now.devices == found.devices {
                        continue;
                    }
                    self.describe(&found.resource, &found.devices);
                    plugin.update(Arc::clone(&found.resource), found.devices.clone());
                }
                None => {
                    let plugin = Plugin::shared(
                        Arc::clone(&found.resource),
                        found.devices.clone(),
                        Arc::clone(&self.metrics),
                        Some(self.events.clone()),
                    );
                    self.plugins.insert(name.clone(), plugin);
                }
            }
        }
    }

    fn serve(&mut self, endpoint: &str) -> Result<ResourceServer, ServeError> {
        let Some(plugin) = self.plugins.get(endpoint).cloned() else {
            return Err(ServeError::Failed {
                endpoint: endpoint.to_owned(),
                source: "not configured".into(),
            });
        };
        // Ours before anything at the socket paths is touched: a socket there is then stale.
        // A new server of a resource we serve moves to the other slot if the kubelet that knew
        // the old socket is still there. A new kubelet knows none of ours, and a Register for
        // the old server may still be on its way to it: on the same path, its dial-back reaches
        // the new server, where a moved one would leave it dialling a missing socket for 10 s.
        let kubelet = kubelet_id(&self.layout.kubelet_socket());
        let (slot, lock) = match self.locks.remove(endpoint) {
            Some((held, lock)) => {
                let same_kubelet =
                    kubelet.is_some() && self.served_under.get(endpoint) == Some(&kubelet);
                // The old lock goes once the new one is ours: no other instance takes the
                // resource in between.
                match same_kubelet.then(|| self.move_from(endpoint, held)) {
                    Some(Some(moved)) => moved,
                    _ => (held, lock),
                }
            }
            None => self.take_slot(endpoint)?,
        };
        self.locks.insert(endpoint.to_owned(), (slot, lock));
        self.served_under.insert(endpoint.to_owned(), kubelet);
        let snapshot = plugin.snapshot();
        self.describe(&snapshot.resource, &snapshot.devices);
        let path = self.layout.socket_path_in(endpoint, slot);
        let calls = KubeletCalls::default();
        let mut services = vec![proto::create_device_plugin(plugin.counting(calls.clone()))];
        let mut sockets = vec![path.clone()];
        if let Some((service, registration)) =
            plugin_watcher::registration(&self.layout, endpoint, &path, &self.events)
        {
            services.push(service);
            sockets.push(registration);
        }
        let server =
            ResourceServer::start(Arc::clone(&self.env), services, &sockets).map_err(|source| {
                ServeError::Failed {
                    endpoint: endpoint.to_owned(),
                    source: Box::new(source),
                }
            })?;
        self.kubelet_calls.insert(server.id(), calls);
        Ok(server)
    }

    fn intact(&self, server: &ResourceServer) -> bool {
        server.socket_intact()
    }

    fn stop(&mut self, endpoint: &str, server: ResourceServer) {
        if let Some(plugin) = self.plugins.get(endpoint) {
            plugin.close_streams();
        }
        let path = server.path().to_owned();
        self.kubelet_calls.remove(&server.id());
        server.stop();
        log::debug!("stopped serving on {}", path.display());
    }

    fn release(&mut self, endpoint: &str) {
        if let Some(plugin) = self.plugins.remove(endpoint) {
            plugin.close_streams();
        }
        let Some((slot, lock)) = self.locks.remove(endpoint) else {
            return;
        };
        // The spec stays while another instance serves the resource (a surge rollout's other
        // pod, whose allocations name the same CDI devices); the last one out removes it.
        if self.others_serve(endpoint, slot) {
            self.cdi.forget(endpoint);
        } else {
            self.cdi.withdraw(endpoint);
            // The last one out (a shutdown, or the resource taken out of the configuration):
            // the record of its slot goes too, so that an uninstall leaves nothing.
            lock::forget_slot(&self.layout.socket_dir, &layout::socket_name(endpoint));
        }
        drop(lock);
    }

    fn keep_locks(&mut self) -> Vec<String> {
        let mut lost: Vec<String> = Vec::new();
        for (endpoint, (_, lock)) in &mut self.locks {
            match lock.keep() {
                Ok(false) => {}
                Ok(true) => warn!(
                    "{}: the lock file {} was deleted under us; took it again",
                    endpoint,
                    lock.path().display()
                ),
                Err(LockError::Held { .. }) => lost.push(endpoint.clone()),
                Err(e) => error!(
                    "{endpoint}: {}; another instance may take this socket slot",
                    crate::error::error_chain(&e)
                ),
            }
        }
        for endpoint in &lost {
            // The holder serves the same CDI devices now: its spec stays.
            self.locks.remove(endpoint);
            self.cdi.forget(endpoint);
        }
        lost
    }

    fn retire(&mut self, endpoint: &str, server: ResourceServer) {
        if let Some(plugin) = self.plugins.get(endpoint) {
            plugin.close_streams();
        }
        self.kubelet_calls.remove(&server.id());
        let slot = self.locks.get(endpoint).map(|(slot, _)| *slot);
        match slot {
            Some(slot) if self.others_serve(endpoint, slot) => {
                server.stop_leaving_announcement();
            }
            _ => {
                // The last one out. Once the kubelet has taken the streams' end as a disconnect
                // (it closes its connection then), the next instance may take any slot, and
                // `release` forgets ours. Only a killed instance leaves its record, and the next
                // one then takes another slot.
                if !server.wait_for_clients_to_leave(KUBELET_LET_GO) {
                    warn!("{endpoint}: a client still holds a connection after {KUBELET_LET_GO:?}; stopping");
                }
                server.stop();
                // What killed or earlier instances left goes too.
                for other in (0..layout::SLOTS).filter(|s| Some(*s) != slot) {
                    self.clear_if_stale(endpoint, other);
                }
            }
        }
        self.release(endpoint);
    }

    fn kubelet_present(&self) -> bool {
        self.layout.dials_kubelet() && self.layout.kubelet_socket().exists()
    }

    fn register(&mut self, endpoint: &str, server: &ResourceServer) {
        // In plugin-watcher mode the kubelet finds the registration socket by itself.
        if self.layout.dials_kubelet() {
            if let Some(job) = self.job(endpoint, server) {
                self.register.send(RegisterCommand::Register(job));
            }
        }
    }

    fn register_again(&mut self, endpoint: &str, server: &ResourceServer) -> bool {
        if !self.layout.kubelet_socket().exists() {
            return false;
        }
        match self.job(endpoint, server) {
            Some(job) => {
                self.register.send(RegisterCommand::Again(job));
                true
            }
            None => false,
        }
    }

    fn forget(&mut self, endpoint: &str) {
        self.register
            .send(RegisterCommand::Forget(endpoint.to_owned()));
    }

    fn registered(&mut self, _endpoint: &str) {}

    fn another_instance_serves(&self, endpoint: &str) -> bool {
        match self.locks.get(endpoint) {
            Some((slot, _)) => self.others_serve(endpoint, *slot),
            None => (0..layout::SLOTS).any(|slot| self.slot_held(endpoint, slot)),
        }
    }

    fn endpoint_of_socket(&self, file_name: &OsStr) -> Option<String> {
        self.plugins
            .keys()
            .find(|name| {
                (0..layout::SLOTS).any(|slot| *file_name == *layout::slot_socket_name(name, slot))
            })
            .cloned()
    }

    fn location(&self, endpoint: &str) -> PathBuf {
        let slot = self.locks.get(endpoint).map_or(0, |(slot, _)| *slot);
        self.layout.socket_path_in(endpoint, slot)
    }

    fn listing(&self) -> &'static str {
        "sent the kubelet its device list"
    }

    fn deadline(&self) -> Option<std::time::Instant> {
        None
    }

    fn tick(&mut self, _now: std::time::Instant) {}
}
