//! Test support shared by the integration tests, the soak test and the benchmark, by concern: the
//! fake kubelet ([`kubelet`]), the fake API server of DRA mode ([`apiserver`]), the plugin watcher ([`watcher`]), the node's directories ([`node`]), the plugin process
//! ([`process`]) and request builders ([`requests`]).

// Each of the three consumers uses a different part.
#![allow(dead_code, unused_imports)]

pub mod apiserver;
pub mod kubelet;
pub mod node;
pub mod process;
pub mod requests;
pub mod watcher;

use std::path::PathBuf;
use std::time::Duration;

pub use kubelet::{
    health, next_list, watch, FakeKubelet, Registration, Seen, KUBELET_USER_AGENT, STREAM_DEADLINE,
};
pub use node::{make_node, TestNode};
pub use process::{
    binary, grpc_pool_growth, wait_for_entries, wait_for_file, wait_in, PluginProcess,
};
pub use requests::{allocate, allocate_owned, allocate_request, code, KVM, TUN};

/// The checkout under test. Cargo names it at run time as well as at build time; the run time's
/// answer is the one to trust, since cargo does not rebuild a crate moved beside a warm target
/// directory, and the built-in path can name a checkout that is gone.
pub fn repository() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

/// Generous upper bound for anything the tests wait on; they wait on events, not for time.
pub const WAIT: Duration = Duration::from_secs(20);

/// How long a check that something does not happen (a duplicate registration, say) waits for it:
/// far longer than the plugin takes to do what it does at once.
pub const QUIET: Duration = Duration::from_secs(3);
