//! The kubelet's DRAResourceHealth service, both versions (completion-queue threads): one stream
//! per kubelet with the health of every device we publish, the whole list each time. The lists
//! come from a broadcast the control loop (main thread) publishes on every change and again
//! every `REFRESH`, since the kubelet takes a report older than its timeout for Unknown.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use grpcio::{RpcContext, ServerStreamingSink};
use log::info;
use protobuf::MessageField;

use super::model::{DraDevice, Latest};
use crate::proto::dra_health::{v1, v1alpha1};
use crate::rpc::stream_latest;

/// How often the control loop sends the unchanged list again.
pub const REFRESH: Duration = Duration::from_secs(5 * 60);
/// How long each report holds: three refreshes, so one that comes late changes nothing.
const VALID_SECONDS: i64 = 3 * REFRESH.as_secs() as i64;
/// Shown in the pod's status for an unhealthy device, as our slices' taint says it.
const UNHEALTHY_MESSAGE: &str = "a node of this device is missing or is not a device node";

/// The DRAResourceHealth service of our pool.
#[derive(Clone)]
pub struct HealthService {
    devices: Latest,
    pool: String,
}

impl HealthService {
    /// Streams that report `devices`, all in `pool` (our node's name).
    pub fn new(devices: Latest, pool: String) -> HealthService {
        HealthService { devices, pool }
    }
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// The glue between one version's generated types and ours: both versions carry the same
/// fields under different packages (the wire path).
macro_rules! version {
    ($v:ident) => {
        impl $v::DraResourceHealth for HealthService {
            fn node_watch_resources(
                &mut self,
                ctx: RpcContext<'_>,
                _req: $v::NodeWatchResourcesRequest,
                sink: ServerStreamingSink<$v::NodeWatchResourcesResponse>,
            ) {
                info!(
                    "DRAResourceHealth stream ({}) opened for pool {}",
                    stringify!($v),
                    self.pool
                );
                let pool = self.pool.clone();
                let render = move |devices: Arc<Vec<DraDevice>>| {
                    let now = now_unix();
                    let mut response = $v::NodeWatchResourcesResponse::new();
                    response.devices = devices
                        .iter()
                        .map(|d| {
                            let mut id = $v::DeviceIdentifier::new();
                            id.pool_name = pool.clone();
                            id.device_name = d.name.clone();
                            let mut health = $v::DeviceHealth::new();
                            health.device = MessageField::some(id);
                            (health.health, health.message) = if d.healthy {
                                ($v::HealthStatus::HEALTHY.into(), String::new())
                            } else {
                                (
                                    $v::HealthStatus::UNHEALTHY.into(),
                                    UNHEALTHY_MESSAGE.to_owned(),
                                )
                            };
                            health.last_updated_time = now;
                            health.health_check_timeout_seconds = VALID_SECONDS;
                            health
                        })
                        .collect();
                    response
                };
                let stream = stream_latest(
                    sink,
                    self.devices.subscribe(),
                    format!("DRAResourceHealth stream ({})", stringify!($v)),
                    render,
                    || {},
                );
                // The kubelet opens the stream again by itself when it wants reports.
                ctx.spawn(futures_util::FutureExt::map(stream, |_| ()));
            }
        }
    };
}

version!(v1);
version!(v1alpha1);

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures_util::StreamExt;
    use grpcio::{CallOption, ChannelBuilder, EnvBuilder};

    use super::*;
    use crate::broadcast::Broadcast;
    use crate::dra::model::Attribute;

    fn device(name: &str, healthy: bool) -> DraDevice {
        DraDevice {
            name: name.into(),
            resource_name: "devices.anza-labs.dev/kvm".into(),
            cdi_id: format!("devices.anza-labs.dev/kvm={name}"),
            healthy,
            unit: format!("/dev/{name}#0"),
            attributes: [("resource".to_owned(), Attribute::String("kvm".into()))].into(),
            shared_by: None,
        }
    }

    /// What one message of a stream says, device by device.
    fn seen(response: &v1::NodeWatchResourcesResponse) -> Vec<(String, String, v1::HealthStatus)> {
        response
            .devices
            .iter()
            .map(|d| {
                (
                    d.device.pool_name.clone(),
                    d.device.device_name.clone(),
                    d.health.enum_value_or_default(),
                )
            })
            .collect()
    }

    #[test]
    fn each_kubelet_stream_gets_the_whole_list_first_and_after_every_change() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("dra.sock");
        let devices: Latest = Arc::new(Broadcast::new(Arc::new(vec![
            device("kvm-0", true),
            device("kvm-1", true),
        ])));
        let service = HealthService::new(Arc::clone(&devices), "n1".into());
        let env = Arc::new(EnvBuilder::new().cq_count(1).build());
        let mut server = crate::rpc::test_server(
            &env,
            v1::create_dra_resource_health(service.clone()),
            &socket,
        );
        let channel =
            ChannelBuilder::new(Arc::clone(&env)).connect(&format!("unix:{}", socket.display()));
        let client = v1::DraResourceHealthClient::new(channel);
        // A deadline, so a stream that never answers fails the test instead of hanging it.
        let mut stream = client
            .node_watch_resources_opt(
                &v1::NodeWatchResourcesRequest::new(),
                CallOption::default().timeout(Duration::from_secs(30)),
            )
            .unwrap();
        let next = |stream: &mut grpcio::ClientSStreamReceiver<v1::NodeWatchResourcesResponse>| {
            futures_executor::block_on(stream.next())
        };

        let first: v1::NodeWatchResourcesResponse = next(&mut stream).unwrap().unwrap();
        assert_eq!(
            seen(&first),
            [
                ("n1".into(), "kvm-0".into(), v1::HealthStatus::HEALTHY),
                ("n1".into(), "kvm-1".into(), v1::HealthStatus::HEALTHY)
            ]
        );
        let d = &first.devices[0];
        assert_eq!(d.health_check_timeout_seconds, VALID_SECONDS);
        assert!((d.last_updated_time - now_unix()).abs() < 60, "{d:?}");

        devices.publish(Arc::new(vec![
            device("kvm-0", true),
            device("kvm-1", false),
        ]));
        let second = next(&mut stream).unwrap().unwrap();
        assert_eq!(
            second.devices[1].health.enum_value_or_default(),
            v1::HealthStatus::UNHEALTHY
        );
        assert_eq!(second.devices[1].message, UNHEALTHY_MESSAGE);
        assert_eq!(second.devices[0].message, "");

        // The broadcast closed (the plugin stopping): the stream ends with OK.
        devices.close();
        assert!(
            next(&mut stream).is_none(),
            "the stream went on after the plugin closed it"
        );
        let _ = futures_executor::block_on(server.shutdown());
    }
}
