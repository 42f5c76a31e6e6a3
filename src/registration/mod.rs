//! How the kubelet learns of our resources, in one place. Both ways announce the same thing (a
//! resource name, the endpoint that serves it, the options of `plugin::Plugin::options`) and the
//! same outcome, `Metrics::registered`, which `/readyz` waits for:
//!
//! - [`kubelet_socket`]: the "register" thread dials `kubelet.sock` and calls Register, again
//!   after every kubelet restart (the control loop asks it to);
//! - [`plugin_watcher`]: each resource serves the plugin watcher's API on a socket of its own in
//!   `plugins_registry/`, and the kubelet comes to us, also after it restarts.
//!
//! Which one applies is decided once, in `layout::Layout::resolve`.

pub mod kubelet_socket;
pub mod plugin_watcher;
