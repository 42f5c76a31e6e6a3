//! Per-resource state of the control loop (main thread), keyed by resource name: each served
//! resource's plugin (its service and device list, kept across server restarts) and its running
//! server, if any.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::sync::Arc;

use crate::device::{Resource, WatchTarget};
use crate::layout;
use crate::plugin::Plugin;

/// One served resource.
pub struct Served<S> {
    /// The DevicePlugin service; clones share its state with the running server.
    pub plugin: Plugin,
    /// The server answering on its sockets; `None` while it could not start.
    pub server: Option<S>,
}

/// Every served resource, by resource name (`<domain>/<name>`).
pub struct Resources<S>(BTreeMap<String, Served<S>>);

impl<S> Default for Resources<S> {
    fn default() -> Self {
        Resources(BTreeMap::new())
    }
}

impl<S> Resources<S> {
    /// Starts tracking a resource (without a server yet).
    pub fn insert(&mut self, plugin: Plugin) {
        let name = plugin.resource_name().to_owned();
        self.0.insert(
            name,
            Served {
                plugin,
                server: None,
            },
        );
    }

    /// Stops tracking a resource and hands it back.
    pub fn remove(&mut self, resource_name: &str) -> Option<Served<S>> {
        self.0.remove(resource_name)
    }

    /// The resource by resource name.
    pub fn get_mut(&mut self, resource_name: &str) -> Option<&mut Served<S>> {
        self.0.get_mut(resource_name)
    }

    /// The resource whose sockets have this file name.
    pub fn by_socket_name(&self, file_name: &OsStr) -> Option<String> {
        self.0
            .iter()
            .find(|(name, _)| {
                (0..layout::SLOTS).any(|slot| *file_name == *layout::slot_socket_name(name, slot))
            })
            .map(|(name, _)| name.clone())
    }

    /// Resource names, in order.
    pub fn names(&self) -> Vec<String> {
        self.0.keys().cloned().collect()
    }

    /// Every served resource.
    pub fn iter(&self) -> impl Iterator<Item = &Served<S>> {
        self.0.values()
    }

    /// How many resources are served.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether no resource is served.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Each resource's configuration as it is now.
    pub fn configured(&self) -> Vec<(String, Arc<Resource>)> {
        self.0
            .iter()
            .map(|(name, s)| (name.clone(), s.plugin.resource()))
            .collect()
    }

    /// The device entries the inotify thread must watch for all of them.
    pub fn watch_targets(&self) -> Vec<WatchTarget> {
        self.0
            .values()
            .flat_map(|s| s.plugin.resource().watch_targets())
            .collect()
    }
}
