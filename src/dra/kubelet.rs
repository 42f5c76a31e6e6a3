//! Which release our node's kubelet is, looked up once from our Node on the "kubelet-release"
//! thread, so that no API call blocks the control loop: it decides whether a rolling update's
//! new instance may serve beside the old one. Kubelets from 1.33 keep every registered instance
//! of a driver and call the newest; 1.32 and earlier keep one, and when the old instance goes
//! they drop the new one and wipe the node's slices at once.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crossbeam_channel::{RecvTimeoutError, Sender};
use k8s_openapi::api::core::v1::Node;
use log::{info, warn};

use super::kube::{escape, Client};
use crate::event::Event;
use crate::thread::ThreadHandle;

/// The first kubelet release that keeps two instances of a driver side by side.
pub const SIDE_BY_SIDE_FROM: (u32, u32) = (1, 33);

/// The wait before the first retry; it doubles up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// `major.minor` of a kubelet's `v1.33.2`, `v1.34.0-gke.1200` or `v1.33.1+k3s1`.
pub fn release_of(version: &str) -> Option<(u32, u32)> {
    let mut parts = version.trim().strip_prefix('v')?.split('.');
    let major = parts.next()?.parse().ok()?;
    let minor: String = parts
        .next()?
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    Some((major, minor.parse().ok()?))
}

/// The answer, once the API server gave it: whether instances may serve side by side.
pub struct KubeletRelease {
    side_by_side: Arc<OnceLock<bool>>,
    _thread: ThreadHandle,
}

impl KubeletRelease {
    /// Starts the lookup of `node_name`'s kubelet, tried again until the API server answers.
    pub fn look_up(
        client: Client,
        node_name: String,
        events: Sender<Event>,
    ) -> std::io::Result<KubeletRelease> {
        let side_by_side = Arc::new(OnceLock::new());
        let answer = Arc::clone(&side_by_side);
        let (stop, stopped) = crossbeam_channel::bounded::<()>(0);
        let thread = ThreadHandle::spawn(
            "kubelet-release",
            events.clone(),
            move || {
                let path = format!("/api/v1/nodes/{}", escape(&node_name));
                let mut wait = RETRY_FIRST;
                loop {
                    match client.get::<Node>(&path, "read our Node's kubelet version") {
                        Ok(node) => {
                            let version = kubelet_version(&node);
                            let side_by_side = decide(version);
                            let _ = answer.set(side_by_side);
                            // A standby waits on this answer as on a lock: look again at once.
                            let _ = events.send(Event::LocksChanged);
                            tell(version, side_by_side);
                            return;
                        }
                        Err(e) => warn!(
                            "{}; a new instance of the driver stands by until the old one \
                             exits, as on kubelets before 1.33, until this is known",
                            crate::error::error_chain(&e)
                        ),
                    }
                    // Told to stop: the sender is dropped.
                    if stopped.recv_timeout(wait) != Err(RecvTimeoutError::Timeout) {
                        return;
                    }
                    wait = (wait * 2).min(RETRY_MAX);
                }
            },
            move || drop(stop),
        )?;
        Ok(KubeletRelease {
            side_by_side,
            _thread: thread,
        })
    }

    /// Whether two instances may serve side by side; `None` while unknown.
    pub fn side_by_side(&self) -> Option<bool> {
        self.side_by_side.get().copied()
    }
}

fn kubelet_version(node: &Node) -> &str {
    node.status
        .as_ref()
        .and_then(|s| s.node_info.as_ref())
        .map(|i| i.kubelet_version.as_str())
        .unwrap_or_default()
}

/// Whether a kubelet of `version` keeps two instances of a driver.
fn decide(version: &str) -> bool {
    release_of(version).is_some_and(|release| release >= SIDE_BY_SIDE_FROM)
}

fn tell(version: &str, side_by_side: bool) {
    if side_by_side {
        info!(
            "the kubelet is {version}: during a rolling update the new instance serves beside \
             the old one"
        );
    } else {
        warn!(
            "the kubelet is {version:?}, not 1.33 or later: during a rolling update the new \
             instance stands by until the old one exits"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_release_is_read_from_every_form_of_version_and_1_33_is_the_first_side_by_side() {
        assert_eq!(release_of("v1.33.0"), Some((1, 33)));
        assert_eq!(release_of("v1.34.0-gke.1200"), Some((1, 34)));
        assert_eq!(release_of("v1.33.1+k3s1"), Some((1, 33)));
        assert_eq!(release_of("v1.37"), Some((1, 37)));
        assert_eq!(release_of(""), None);
        assert_eq!(release_of("1.33.0"), None);
        assert_eq!(release_of("vX.Y"), None);
        assert!(decide("v1.33.0"));
        assert!(decide("v1.37.2"));
        assert!(!decide("v1.32.13"));
        assert!(!decide(""));
        let node = Node {
            status: Some(k8s_openapi::api::core::v1::NodeStatus {
                node_info: Some(k8s_openapi::api::core::v1::NodeSystemInfo {
                    kubelet_version: "v1.34.1".to_owned(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(kubelet_version(&node), "v1.34.1");
        assert_eq!(kubelet_version(&Node::default()), "");
    }
}
