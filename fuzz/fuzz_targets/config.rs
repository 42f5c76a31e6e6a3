//! Fuzzes the configuration parser: any text must give resources or an error, never a panic, and
//! every accepted resource must satisfy the invariants the daemon relies on.

#![no_main]

use std::path::Path;

use kubelet_device_plugins::config;
use kubelet_device_plugins::device::{is_dns_label, MAX_COUNT, MAX_ID_LEN};
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
        assert!(devices.iter().all(|d| d.id_prefix.len() < MAX_ID_LEN));
    }
});
