//! ListAndWatch streams in process: a real server on a real socket, clients that come and go, and
//! the plugin's own count of open streams.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::{health, next_list, watch, WAIT};
use grpcio::{ChannelBuilder, EnvBuilder};
use kubelet_device_plugins::device::{Permissions, Resource};
use kubelet_device_plugins::device_plugin::plugin::Plugin;
use kubelet_device_plugins::proto;
use kubelet_device_plugins::server::ResourceServer;

/// Waits for a condition the code under test does not signal, checking every millisecond.
fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn streams_end_when_clients_leave_and_when_the_plugin_closes_them() {
    let dir = tempfile::tempdir().unwrap();
    let env = Arc::new(EnvBuilder::new().cq_count(1).name_prefix("grpc").build());
    let resource = Resource::builtin("kvm", dir.path(), 2, Permissions::default()).unwrap();
    crate::support::make_node(&dir.path().join("kvm"));
    let devices = resource.discover(dir.path());
    let plugin = Plugin::new(resource, devices);
    let path = dir.path().join("kdp-kvm.sock");
    let services = vec![proto::create_device_plugin(plugin.clone())];
    let server =
        ResourceServer::start(Arc::clone(&env), services, std::slice::from_ref(&path)).unwrap();

    let client_env = Arc::new(EnvBuilder::new().cq_count(1).name_prefix("client").build());
    let client = proto::DevicePluginClient::new(
        ChannelBuilder::new(client_env).connect(&format!("unix:{}", path.display())),
    );
    let mut kept = watch(&client);
    next_list(&mut kept);
    for _ in 0..200 {
        let mut gone = watch(&client);
        next_list(&mut gone);
    }
    // Each departed client's responder ends on its own, without any publish to trip over.
    eventually("only the kept stream is open", || {
        plugin.stream_count() == 1
    });

    std::fs::remove_file(dir.path().join("kvm")).unwrap();
    let resource = plugin.resource();
    assert!(plugin.update(resource.clone(), resource.discover(dir.path())));
    assert!(health(&next_list(&mut kept))
        .iter()
        .all(|(_, h)| h == "Unhealthy"));

    // Closing ends the stream with OK, as a plugin that stops on purpose.
    plugin.close_streams();
    let end = futures_executor::block_on(futures_util::StreamExt::next(&mut kept));
    assert!(end.is_none(), "{end:?}");
    assert_eq!(plugin.stream_count(), 0);
    server.stop();
}
