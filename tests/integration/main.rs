//! The plugin against real peers, as one test binary of case modules: the binary as a child
//! process against a fake kubelet speaking the real gRPC API over real Unix sockets, real inotify
//! on real files in temp directories, real signals. The soak test is its own binary.

#[path = "../support/mod.rs"]
mod support;

mod api_faults;
mod cli;
mod config;
mod daemon;
mod dra;
mod dra_rolling;
mod hostile;
mod instances;
mod metrics;
mod nfd;
mod plugin_watcher;
mod readme;
mod roots;
mod streams;
