//! The device IDs this node gave, kept between discoveries and across restarts (main thread, for
//! the control loop's host). The kubelet and DRA's scheduler know a device by its ID alone: an
//! ID that changed under a running pod looks like a new, free device, and an exclusive device
//! would go to a second pod. So a device keeps the ID it was first given for as long as it stays
//! present, whatever is configured, plugged or found beside it, and the next instance (a
//! rollout's new pod, a restart) reads the same IDs back from a file beside our sockets. The file
//! exists only while it says something a first look would not (a newcomer renamed beside a
//! device with its name): usually there is none, and an uninstall leaves nothing behind.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use log::warn;
use serde::{Deserialize, Serialize};

use crate::device::{fnv1a, given_ids, Device, GivenIds, Resource};

/// The directory of ID files, inside our socket directory (beside `.kdp-locks`): the kubelet
/// deletes files in its device-plugin directory when it starts, but leaves directories alone.
pub const IDS_DIR: &str = ".kdp-ids";

/// A file larger than this is not ours to trust: it is left aside and IDs start over.
const MAX_FILE: u64 = 8 * 1024 * 1024;

#[derive(Debug, Default, Serialize, Deserialize)]
struct IdFile {
    resource: String,
    /// ID prefix by device key (see `Device::key`).
    ids: GivenIds,
}

/// Every resource's given IDs, in memory and, with a directory, on disk.
#[derive(Debug)]
pub struct IdBook {
    dir: Option<PathBuf>,
    given: HashMap<String, GivenIds>,
}

impl IdBook {
    /// IDs kept in `dir` (none: in memory only, for one process's life).
    pub fn new(dir: Option<PathBuf>) -> IdBook {
        IdBook {
            dir,
            given: HashMap::new(),
        }
    }

    /// The devices of `resource` under `sys_root` now, every device that was given an ID keeping
    /// it; the IDs of the devices present are what the next discovery keeps. Devices that went
    /// are forgotten, so the book never holds more than the node has.
    pub fn discover(&mut self, resource: &Resource, sys_root: &Path) -> Vec<Device> {
        let name = &resource.resource_name;
        if !self.given.contains_key(name) {
            let read = self.read(name);
            self.given.insert(name.clone(), read);
        }
        let given = self.given.get_mut(name).expect("inserted above");
        let devices = resource.discover_keeping(sys_root, given);
        let now = given_ids(&devices);
        if now != *given {
            if let Some(dir) = self.dir.as_deref() {
                // What the next instance would give without the file (rare changes pay for a
                // second look).
                let first_look = given_ids(&resource.discover(sys_root));
                let path = dir.join(file_name(name));
                let kept = if first_look == now {
                    forget(&path)
                } else {
                    write(&path, name, &now)
                };
                if let Err(e) = kept {
                    warn!(
                        "{name}: cannot keep the device IDs in {}: {e}; a restart may rename devices that were found beside each other",
                        path.display()
                    );
                }
            }
            *given = now;
        }
        devices
    }

    /// The IDs kept on disk for `resource_name`; none when there is no file, and none (the file
    /// left aside as `.bad`) when it cannot be read as ours.
    fn read(&self, resource_name: &str) -> GivenIds {
        let Some(dir) = &self.dir else {
            return GivenIds::new();
        };
        let path = dir.join(file_name(resource_name));
        match read(&path) {
            Ok(Some(file)) if file.resource == resource_name => file.ids,
            Ok(None) => GivenIds::new(),
            Ok(Some(file)) => {
                warn!(
                    "{resource_name}: {} holds the IDs of {}; starting over",
                    path.display(),
                    file.resource
                );
                GivenIds::new()
            }
            Err(e) => {
                let aside = path.with_extension("json.bad");
                warn!(
                    "{resource_name}: cannot read the device IDs in {} ({e}); keeping it as {} and starting over",
                    path.display(),
                    aside.display()
                );
                let _ = fs::rename(&path, aside);
                GivenIds::new()
            }
        }
    }
}

/// The file of one resource: its short name for the reader, and a hash of the full name, which
/// may be longer than a file name can be.
fn file_name(resource_name: &str) -> String {
    let short = resource_name.rsplit('/').next().unwrap_or(resource_name);
    format!("{short}-{:016x}.json", fnv1a(resource_name.as_bytes()))
}

fn read(path: &Path) -> io::Result<Option<IdFile>> {
    let meta = match fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    if meta.len() > MAX_FILE {
        return Err(io::Error::other(format!(
            "{} bytes, over the {MAX_FILE} we read",
            meta.len()
        )));
    }
    let text = fs::read(path)?;
    serde_json::from_slice(&text)
        .map(Some)
        .map_err(io::Error::other)
}

/// Removes the file of IDs a first look gives anyway, and the directory with the last one.
fn forget(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    }
    if let Some(dir) = path.parent() {
        // Not empty while another resource's file is there.
        let _ = fs::remove_dir(dir);
    }
    Ok(())
}

fn write(path: &Path, resource_name: &str, ids: &GivenIds) -> io::Result<()> {
    let file = IdFile {
        resource: resource_name.to_owned(),
        ids: ids.clone(),
    };
    let text = serde_json::to_vec_pretty(&file).map_err(io::Error::other)?;
    crate::files::write_atomically(path, &text, 0o644)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::testing::make_node;
    use crate::device::{Permissions, Source};

    fn serial(dev: &Path, patterns: &[&str]) -> Resource {
        let sources = patterns
            .iter()
            .map(|p| Source::Glob {
                dir: dev.to_owned(),
                pattern: glob::Pattern::new(p).unwrap(),
                container_dir: None,
            })
            .collect();
        Resource::new("example.com", "serial", sources, 1, Permissions::default()).unwrap()
    }

    fn ids(devices: &[Device]) -> Vec<(String, String)> {
        devices
            .iter()
            .map(|d| (d.key(), d.id_prefix.clone()))
            .collect()
    }

    #[test]
    fn a_source_added_beside_a_device_leaves_its_id_and_a_restart_reads_it_back() {
        let dev = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        make_node(&dev.path().join("ttyUSB0"));
        make_node(&dev.path().join("ttyACM0"));
        let sys = Path::new("/nonexistent");
        let mut book = IdBook::new(Some(state.path().join(IDS_DIR)));
        let before = book.discover(&serial(dev.path(), &["ttyUSB*"]), sys);
        assert_eq!(before[0].id_prefix, "serial-ttyUSB0");
        let both = serial(dev.path(), &["ttyUSB*", "ttyACM*"]);
        let after = book.discover(&both, sys);
        assert_eq!(after[0].id_prefix, "serial-ttyUSB0", "{:?}", ids(&after));
        // A restart, with both sources from the start: the same IDs, which a first look gives,
        // so no file was needed.
        let again = IdBook::new(Some(state.path().join(IDS_DIR))).discover(&both, sys);
        assert_eq!(ids(&again), ids(&after));
        assert!(!state.path().join(IDS_DIR).exists());
    }

    #[test]
    fn a_device_found_beside_one_with_its_name_is_the_one_renamed_also_after_a_restart() {
        let dev = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        fs::create_dir(dev.path().join("a")).unwrap();
        fs::create_dir(dev.path().join("b")).unwrap();
        let sys = Path::new("/nonexistent");
        let glob = |dir: &str| Source::Glob {
            dir: dev.path().join(dir),
            pattern: glob::Pattern::new("tty*").unwrap(),
            container_dir: None,
        };
        let r = Resource::new(
            "example.com",
            "serial",
            vec![glob("a"), glob("b")],
            1,
            Permissions::default(),
        )
        .unwrap();
        // The one in the second directory comes first and takes the plain name; the newcomer
        // in the first directory, which sorts first, takes the hashed one.
        make_node(&dev.path().join("b/tty0"));
        let mut book = IdBook::new(Some(state.path().join(IDS_DIR)));
        assert_eq!(book.discover(&r, sys)[0].id_prefix, "serial-tty0");
        make_node(&dev.path().join("a/tty0"));
        let both = book.discover(&r, sys);
        let b = both.iter().find(|d| d.key().ends_with("b/tty0")).unwrap();
        let a = both.iter().find(|d| d.key().ends_with("a/tty0")).unwrap();
        assert_eq!(b.id_prefix, "serial-tty0");
        assert!(a.id_prefix.contains('~'), "{}", a.id_prefix);
        let restarted = IdBook::new(Some(state.path().join(IDS_DIR))).discover(&r, sys);
        assert_eq!(ids(&restarted), ids(&both));
        // Without the file, a first look names them by order: the file is what keeps them.
        let fresh = IdBook::new(None).discover(&r, sys);
        assert_ne!(ids(&fresh), ids(&both));
        // The device that kept its name goes: the renamed one keeps its ID all the same, so
        // the file stays; once it goes too, the file says nothing a first look would not, and
        // goes (the directory with it).
        fs::remove_file(dev.path().join("b/tty0")).unwrap();
        let mut book = IdBook::new(Some(state.path().join(IDS_DIR)));
        assert_eq!(book.discover(&r, sys)[0].id_prefix, a.id_prefix);
        assert!(state.path().join(IDS_DIR).exists());
        fs::remove_file(dev.path().join("a/tty0")).unwrap();
        assert!(book.discover(&r, sys).is_empty());
        assert!(!state.path().join(IDS_DIR).exists());
    }

    #[test]
    fn a_file_that_is_not_ours_is_kept_aside_and_ids_start_over() {
        let dev = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        make_node(&dev.path().join("ttyUSB0"));
        let r = serial(dev.path(), &["ttyUSB*"]);
        let path = state.path().join(IDS_DIR).join(file_name(&r.resource_name));
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, b"{ not json").unwrap();
        let mut book = IdBook::new(Some(state.path().join(IDS_DIR)));
        let found = book.discover(&r, Path::new("/nonexistent"));
        assert_eq!(found[0].id_prefix, "serial-ttyUSB0");
        assert!(path.with_extension("json.bad").exists());
        // Not written again: a first look gives these IDs anyway.
        assert!(!path.exists());
    }

    #[test]
    fn an_id_kept_on_disk_that_this_resource_cannot_list_is_not_used() {
        let dev = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        make_node(&dev.path().join("ttyUSB0"));
        let r = serial(dev.path(), &["ttyUSB*"]);
        let key = dev.path().join("ttyUSB0").to_string_lossy().into_owned();
        for planted in ["kvm-0", "serial-a b", &format!("serial-{}", "x".repeat(70))] {
            let ids = GivenIds::from([(key.clone(), planted.to_owned())]);
            write(
                &state.path().join(IDS_DIR).join(file_name(&r.resource_name)),
                &r.resource_name,
                &ids,
            )
            .unwrap();
            let found = IdBook::new(Some(state.path().join(IDS_DIR))).discover(&r, Path::new("/x"));
            assert_eq!(found[0].id_prefix, "serial-ttyUSB0", "{planted}");
        }
    }

    #[test]
    fn file_names_stay_short_and_apart_for_long_resource_names() {
        let long = format!("{}.example.com/{}", "d".repeat(200), "n".repeat(50));
        let name = file_name(&long);
        assert!(name.len() < 100, "{name}");
        assert_ne!(file_name("a.com/kvm"), file_name("b.com/kvm"));
    }
}
