//! USB devices by identity (main thread, whenever devices are looked at): each USB device the
//! kernel lists in sysfs, with its vendor, product, serial and port, and the device nodes it owns
//! under the `/dev` root: its `bus/usb/BBB/DDD` node and, optionally, its interfaces' `tty` and
//! `hidraw` nodes. sysfs raises no inotify events; the daemon watches the nodes under `/dev`
//! instead and reads sysfs again when they change.

use std::fs;
use std::path::{Path, PathBuf};

/// What the operator names: a vendor and product ID (four hex digits each, as `lsusb` prints
/// them) and, optionally, a serial number.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsbMatch {
    /// `idVendor`, lower-case hex.
    pub vendor: String,
    /// `idProduct`, lower-case hex.
    pub product: String,
    /// `serial`, exactly; any serial when `None`.
    pub serial: Option<String>,
}

impl UsbMatch {
    /// A matcher from configured IDs; `None` unless both are four hex digits.
    pub fn new(vendor: &str, product: &str, serial: Option<&str>) -> Option<UsbMatch> {
        let hex4 = |s: &str| s.len() == 4 && s.bytes().all(|b| b.is_ascii_hexdigit());
        (hex4(vendor) && hex4(product)).then(|| UsbMatch {
            vendor: vendor.to_ascii_lowercase(),
            product: product.to_ascii_lowercase(),
            serial: serial.map(ToOwned::to_owned),
        })
    }

    /// Whether `device` is one this matcher names.
    pub fn matches(&self, device: &UsbDevice) -> bool {
        self.vendor == device.vendor
            && self.product == device.product
            && self
                .serial
                .as_ref()
                .is_none_or(|s| device.serial.as_ref() == Some(s))
    }
}

/// One USB device as sysfs shows it, with the nodes it owns that exist or should exist.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsbDevice {
    /// Its sysfs name, the port path: `1-1.2` is port 2 of the hub on port 1 of bus 1.
    pub port: String,
    /// `idVendor`, lower-case hex.
    pub vendor: String,
    /// `idProduct`, lower-case hex.
    pub product: String,
    /// `serial`, when the device has one.
    pub serial: Option<String>,
    /// Its nodes under the `/dev` root: `bus/usb/BBB/DDD` first, then its interfaces' `tty*` and
    /// `hidraw*` nodes (when asked for), sorted.
    pub nodes: Vec<PathBuf>,
}

impl UsbDevice {
    /// How an operator would name it: `0403:6001 serial A12345 port 1-1.2`.
    pub fn describe(&self) -> String {
        match &self.serial {
            Some(serial) => format!(
                "usb {}:{} serial {serial} port {}",
                self.vendor, self.product, self.port
            ),
            None => format!("usb {}:{} port {}", self.vendor, self.product, self.port),
        }
    }
}

/// Most interface nodes one USB device may own; a device claiming more is listed with these.
const MAX_INTERFACE_NODES: usize = 64;

/// Every USB device in `<sys_root>/bus/usb/devices`, sorted by port; interface entries
/// (`1-1:1.0`) and devices whose identity cannot be read are left out.
pub fn scan(sys_root: &Path, dev_root: &Path, interfaces: bool) -> Vec<UsbDevice> {
    let Ok(entries) = fs::read_dir(sys_root.join("bus/usb/devices")) else {
        return Vec::new();
    };
    let mut devices: Vec<UsbDevice> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let port = e.file_name().to_str()?.to_owned();
            if port.contains(':') {
                return None;
            }
            read_device(&e.path(), port, dev_root, interfaces)
        })
        .collect();
    devices.sort_by(|a, b| a.port.cmp(&b.port));
    devices
}

fn read_device(dir: &Path, port: String, dev_root: &Path, interfaces: bool) -> Option<UsbDevice> {
    let attr = |name: &str| {
        fs::read_to_string(dir.join(name))
            .ok()
            .map(|s| s.trim_end_matches('\n').to_owned())
    };
    let vendor = attr("idVendor")?.to_ascii_lowercase();
    let product = attr("idProduct")?.to_ascii_lowercase();
    let busnum: u32 = attr("busnum")?.trim().parse().ok()?;
    let devnum: u32 = attr("devnum")?.trim().parse().ok()?;
    let serial = attr("serial").filter(|s| !s.is_empty());
    let mut nodes = vec![dev_root.join(format!("bus/usb/{busnum:03}/{devnum:03}"))];
    if interfaces {
        let mut owned = interface_nodes(dir, &port);
        owned.sort();
        owned.dedup();
        owned.truncate(MAX_INTERFACE_NODES);
        nodes.extend(owned.into_iter().map(|name| dev_root.join(name)));
    }
    Some(UsbDevice {
        port,
        vendor,
        product,
        serial,
        nodes,
    })
}

/// Names of the `tty*` and `hidraw*` nodes the device's interfaces own. The kernel puts them at
/// `<intf>/tty/<name>` (cdc-acm), `<intf>/<name>/tty/<name>` (usb-serial) and
/// `<intf>/<hid device>/hidraw/<name>` (HID): a class directory `tty` or `hidraw` at most three
/// levels below an interface, whose entries are the nodes.
fn interface_nodes(device_dir: &Path, port: &str) -> Vec<String> {
    let mut found = Vec::new();
    let Ok(entries) = fs::read_dir(device_dir) else {
        return found;
    };
    let prefix = format!("{port}:");
    for e in entries.filter_map(Result::ok) {
        if e.file_name().to_string_lossy().starts_with(&prefix) {
            collect_class_nodes(&e.path(), 3, &mut found);
        }
    }
    found
}

fn collect_class_nodes(dir: &Path, depth: u32, found: &mut Vec<String>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.filter_map(Result::ok) {
        // Links lead out of the device (driver, subsystem, port): never follow them.
        if !e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let name = e.file_name().to_string_lossy().into_owned();
        if name == "tty" || name == "hidraw" {
            if let Ok(nodes) = fs::read_dir(e.path()) {
                found.extend(
                    nodes
                        .filter_map(Result::ok)
                        .map(|n| n.file_name().to_string_lossy().into_owned())
                        .filter(|n| is_node_name(n, &name)),
                );
            }
        } else if depth > 1 && found.len() < MAX_INTERFACE_NODES {
            collect_class_nodes(&e.path(), depth - 1, found);
        }
    }
}

/// A node name as the kernel makes them for the class: `ttyUSB0`, `ttyACM1`, `hidraw3`; never a
/// path, so nothing in sysfs can point us outside the `/dev` root.
fn is_node_name(name: &str, class: &str) -> bool {
    name.starts_with(class) && name.bytes().all(|b| b.is_ascii_alphanumeric())
}

#[cfg(test)]
pub(crate) mod testing {
    //! A sysfs tree laid out as the kernel lays out USB devices, for tests.
    use super::*;

    /// A USB device under `<sys>/bus/usb/devices/<port>`, with `tty` nodes through a
    /// usb-serial interface and `hidraw` nodes through a HID interface.
    pub fn add_usb(
        sys: &Path,
        port: &str,
        ids: (&str, &str),
        serial: Option<&str>,
        (busnum, devnum): (u32, u32),
        ttys: &[&str],
        hidraws: &[&str],
    ) {
        let dir = sys.join("bus/usb/devices").join(port);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("idVendor"), format!("{}\n", ids.0)).unwrap();
        fs::write(dir.join("idProduct"), format!("{}\n", ids.1)).unwrap();
        if let Some(s) = serial {
            fs::write(dir.join("serial"), format!("{s}\n")).unwrap();
        }
        fs::write(dir.join("busnum"), format!("{busnum}\n")).unwrap();
        fs::write(dir.join("devnum"), format!("{devnum}\n")).unwrap();
        for tty in ttys {
            fs::create_dir_all(dir.join(format!("{port}:1.0/{tty}/tty/{tty}"))).unwrap();
        }
        for hid in hidraws {
            fs::create_dir_all(dir.join(format!("{port}:1.1/0003:1234:5678.0001/hidraw/{hid}")))
                .unwrap();
        }
        // What the kernel also lists there: the interface itself, and a driver link to skip.
        fs::create_dir_all(sys.join("bus/usb/devices").join(format!("{port}:1.0"))).unwrap();
        let _ = std::os::unix::fs::symlink("/nonexistent", dir.join("driver"));
    }

    /// Unplugs it.
    pub fn remove_usb(sys: &Path, port: &str) {
        fs::remove_dir_all(sys.join("bus/usb/devices").join(port)).unwrap();
        let _ = fs::remove_dir_all(sys.join("bus/usb/devices").join(format!("{port}:1.0")));
    }
}

#[cfg(test)]
mod tests {
    use super::testing::add_usb;
    use super::*;

    #[test]
    fn devices_are_read_with_their_identity_and_the_nodes_they_own() {
        let sys = tempfile::tempdir().unwrap();
        add_usb(
            sys.path(),
            "1-1.2",
            ("0403", "6001"),
            Some("A12345"),
            (1, 4),
            &["ttyUSB0"],
            &[],
        );
        add_usb(
            sys.path(),
            "2-1",
            ("10C4", "EA60"),
            None,
            (2, 17),
            &[],
            &["hidraw1", "hidraw0"],
        );
        let found = scan(sys.path(), Path::new("/dev"), true);
        assert_eq!(found.len(), 2, "{found:?}");
        assert_eq!(found[0].port, "1-1.2");
        assert_eq!(
            (found[0].vendor.as_str(), found[0].product.as_str()),
            ("0403", "6001")
        );
        assert_eq!(found[0].serial.as_deref(), Some("A12345"));
        assert_eq!(
            found[0].nodes,
            [
                PathBuf::from("/dev/bus/usb/001/004"),
                PathBuf::from("/dev/ttyUSB0")
            ]
        );
        assert_eq!(found[1].vendor, "10c4", "IDs are compared in lower case");
        assert_eq!(
            found[1].nodes,
            [
                PathBuf::from("/dev/bus/usb/002/017"),
                PathBuf::from("/dev/hidraw0"),
                PathBuf::from("/dev/hidraw1")
            ]
        );
        assert_eq!(
            found[0].describe(),
            "usb 0403:6001 serial A12345 port 1-1.2"
        );
        let bus_only = scan(sys.path(), Path::new("/dev"), false);
        assert_eq!(bus_only[0].nodes, [PathBuf::from("/dev/bus/usb/001/004")]);
    }

    #[test]
    fn matchers_name_vendor_and_product_and_optionally_the_serial() {
        let d = UsbDevice {
            port: "1-1".into(),
            vendor: "0403".into(),
            product: "6001".into(),
            serial: Some("A12345".into()),
            nodes: vec![],
        };
        assert!(UsbMatch::new("0403", "6001", None).unwrap().matches(&d));
        assert!(UsbMatch::new("0403", "6001", Some("A12345"))
            .unwrap()
            .matches(&d));
        assert!(!UsbMatch::new("0403", "6001", Some("B1"))
            .unwrap()
            .matches(&d));
        assert!(!UsbMatch::new("0403", "6015", None).unwrap().matches(&d));
        assert!(UsbMatch::new("0403", "6001X", None).is_none());
        assert!(UsbMatch::new("04g3", "6001", None).is_none());
    }

    #[test]
    fn names_in_sysfs_that_are_not_node_names_are_ignored() {
        let sys = tempfile::tempdir().unwrap();
        add_usb(sys.path(), "1-1", ("0403", "6001"), None, (1, 2), &[], &[]);
        let class = sys.path().join("bus/usb/devices/1-1/1-1:1.0/tty");
        fs::create_dir_all(class.join("..")).unwrap();
        fs::create_dir_all(class.join("ttyUSB9")).unwrap();
        fs::create_dir_all(class.join("tty..")).unwrap();
        fs::create_dir_all(class.join("notatty")).unwrap();
        let found = scan(sys.path(), Path::new("/dev"), true);
        assert_eq!(
            found[0].nodes,
            [
                PathBuf::from("/dev/bus/usb/001/002"),
                PathBuf::from("/dev/ttyUSB9")
            ]
        );
    }
}
