//! The kubelet's plugin watcher, as the tests play it: ask a registration socket who it is, then
//! tell it whether it was accepted.

use std::path::Path;
use std::sync::Arc;

use grpcio::{ChannelBuilder, EnvBuilder};
use kubelet_device_plugins::proto::pluginregistration as reg;

/// A client of the `Registration` service on `socket`.
pub fn registration_client(socket: &Path) -> reg::RegistrationClient {
    let env = Arc::new(EnvBuilder::new().cq_count(1).build());
    reg::RegistrationClient::new(
        ChannelBuilder::new(env).connect(&format!("unix:{}", socket.display())),
    )
}

/// `NotifyRegistrationStatus`, as the kubelet sends it once it has tried the endpoint.
pub fn notify(client: &reg::RegistrationClient, registered: bool, error: &str) {
    let mut status = reg::RegistrationStatus::new();
    status.plugin_registered = registered;
    status.error = error.to_owned();
    client
        .notify_registration_status(&status)
        .expect("NotifyRegistrationStatus");
}

/// What the plugin watcher does with a registration socket it finds: asks, then answers.
pub fn register(socket: &Path, accepted: bool, error: &str) -> reg::PluginInfo {
    let client = registration_client(socket);
    let info = client.get_info(&reg::InfoRequest::new()).expect("GetInfo");
    notify(&client, accepted, error);
    info
}
