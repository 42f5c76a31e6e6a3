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

use std::time::Duration;

pub use kubelet::{
    health, next_list, watch, FakeKubelet, Registration, Seen, KUBELET_USER_AGENT, STREAM_DEADLINE,
};
pub use node::{make_node, TestNode};
pub use process::{
    binary, grpc_pool_growth, wait_for_entries, wait_for_file, wait_in, PluginProcess,
};
pub use requests::{allocate, allocate_owned, allocate_request, code, KVM, TUN};

/// Generous upper bound for anything the tests wait on; they wait on events, not for time.
pub const WAIT: Duration = Duration::from_secs(20);

/// How long a check that something does not happen (a duplicate registration, say) waits for it:
/// far longer than the plugin takes to do what it does at once.
pub const QUIET: Duration = Duration::from_secs(3);
