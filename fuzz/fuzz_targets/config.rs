//! Fuzzes the configuration parser: any text must give resources or an error, never a panic, and
//! every accepted resource must satisfy the invariants the daemon relies on, device IDs unique and
//! within the kubelet's 63 characters among them.

#![no_main]

use std::collections::HashSet;
use std::path::Path;

use kubelet_device_plugins::config;
use kubelet_device_plugins::device::{
    device_list, given_ids, is_dns_label, Device, GivenIds, Resource, MAX_COUNT, MAX_ID_LEN,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(resources) = config::parse(text, Path::new("fuzz.yaml"), Path::new("/nonexistent-dev"))
    else {
        return;
    };
    for (i, r) in resources.iter().enumerate() {
        assert!(is_dns_label(&r.name, MAX_ID_LEN), "{:?}", r.name);
        assert!((1..=MAX_COUNT).contains(&r.count));
        assert!(!r.sources.is_empty());
        assert!(
            resources[..i].iter().all(|other| other.name != r.name),
            "duplicate {:?}",
            r.name
        );
        // Discovering against missing directories must not panic either.
        let devices = r.discover(Path::new("/nonexistent-sys"));
        assert_unique_ids(r, &devices);
        // Nor may any set of entries the globs could find give one ID twice: names that meet
        // once sanitised, the same names in every directory, names too long to keep whole.
        let list = |dir: &Path, pattern: &glob::Pattern| {
            NAMES
                .iter()
                .map(|n| n.to_string())
                .chain(std::iter::once("x".repeat(200)))
                .filter(|n| pattern.matches(n))
                .map(|n| dir.join(n))
                .collect()
        };
        let sys = Path::new("/nonexistent-sys");
        let found = r.devices_with(sys, &GivenIds::new(), list);
        assert_unique_ids(r, &found);
        // Found again, each device keeps the ID it was given.
        let again = r.devices_with(sys, &given_ids(&found), list);
        assert_eq!(given_ids(&again), given_ids(&found));
    }
});

/// File names that stress the ID rules.
const NAMES: &[&str] = &["001", "002", "a:b", "a_b", "a b", "a-b", "a.b", "é", "ttyUSB0", "~1"];

fn assert_unique_ids(r: &Resource, devices: &[Device]) {
    let ids: Vec<String> = device_list(devices, r.count)
        .devices
        .into_iter()
        .map(|d| d.ID)
        .collect();
    let distinct: HashSet<&String> = ids.iter().collect();
    assert_eq!(distinct.len(), ids.len(), "duplicate device IDs for {r:?}");
    assert!(ids.iter().all(|id| id.len() <= MAX_ID_LEN), "{ids:?}");
}
