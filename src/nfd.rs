//! Node labels without API access (main thread, for the control loop): one Node Feature
//! Discovery feature file per served resource in NFD's `features.d/`, naming the resource and
//! how many of its device IDs are healthy, so that NFD's worker turns it into a node label
//! (`devices.anza-labs.dev/kvm=10`) that `nodeSelector` and `nodeAffinity` (`Gt`) can use.
//!
//! One file per resource, named as its socket is (`kdp-kvm`), rather than one for the process:
//! two instances that serve different resources on one node (two DaemonSets, or a surge
//! rollout's two pods) then never write over each other's lines.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::files::write_atomically;
use crate::layout::socket_name;

/// The names of our files in the directory (see [`FeatureFiles::path`]), for inotify.
pub const FILE_PATTERN: &str = "kdp-*";

/// What can fail here. Each variant's `#[error]` message is its documentation.
#[allow(missing_docs)]
#[derive(Debug, thiserror::Error)]
pub enum NfdError {
    #[error("cannot write the NFD feature file {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot remove the NFD feature file {path}")]
    Remove {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The feature files of one instance's resources, in NFD's `features.d/` directory.
#[derive(Debug)]
pub struct FeatureFiles {
    dir: PathBuf,
}

impl FeatureFiles {
    /// Feature files in `dir`, made when the first is written if it is not there.
    pub fn new(dir: PathBuf) -> FeatureFiles {
        FeatureFiles { dir }
    }

    /// The file that labels `resource`.
    pub fn path(&self, resource: &str) -> PathBuf {
        file_path(&self.dir, resource)
    }

    /// Says that `resource` has `healthy` device IDs here, replacing what the file said.
    pub fn write(&self, resource: &str, healthy: u64) -> Result<(), NfdError> {
        let path = self.path(resource);
        write_atomically(&path, content(resource, healthy).as_bytes(), 0o644)
            .map_err(|source| NfdError::Write { path, source })
    }

    /// Takes `resource`'s label away: its file goes, and NFD drops the label at its next pass.
    pub fn remove(&self, resource: &str) -> Result<(), NfdError> {
        let path = self.path(resource);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(NfdError::Remove { path, source }),
        }
    }
}

/// Where `resource`'s feature file lives in `dir`: its socket's name without `.sock`, which no
/// other resource's has, and which never starts with the dot that would make NFD skip it.
fn file_path(dir: &Path, resource: &str) -> PathBuf {
    let socket = socket_name(resource);
    dir.join(socket.strip_suffix(".sock").unwrap_or(&socket))
}

/// The file's text. A resource name is a valid label name (a DNS-subdomain prefix and a name of
/// at most 63 characters, as the kubelet requires of both), and a count a valid label value.
fn content(resource: &str, healthy: u64) -> String {
    format!(
        "# kubelet-device-plugins: healthy device IDs of {resource} on this node\n\
         {resource}={healthy}\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_file_per_resource_says_its_healthy_count_and_goes_when_asked() {
        let dir = tempfile::tempdir().unwrap();
        let nfd = dir.path().join("features.d");
        let files = FeatureFiles::new(nfd.clone());
        files.write("devices.anza-labs.dev/kvm", 10).unwrap();
        files.write("example.com/kvm", 0).unwrap();
        let kvm = fs::read_to_string(nfd.join("kdp-kvm")).unwrap();
        assert!(kvm.ends_with("\ndevices.anza-labs.dev/kvm=10\n"), "{kvm}");
        let other = fs::read_to_string(nfd.join("kdp-example.com_kvm")).unwrap();
        assert!(other.ends_with("\nexample.com/kvm=0\n"), "{other}");

        files.write("devices.anza-labs.dev/kvm", 9).unwrap();
        let kvm = fs::read_to_string(nfd.join("kdp-kvm")).unwrap();
        assert!(kvm.ends_with("\ndevices.anza-labs.dev/kvm=9\n"), "{kvm}");
        files.remove("devices.anza-labs.dev/kvm").unwrap();
        files.remove("devices.anza-labs.dev/kvm").unwrap();
        let left: Vec<_> = fs::read_dir(&nfd)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(left, ["kdp-example.com_kvm"], "no temporary file stays");
    }

    #[test]
    fn the_longest_names_get_files_nfd_reads() {
        let long = format!("{}.example.com/{}", "d".repeat(240), "n".repeat(63));
        let path = file_path(Path::new("/x"), &long);
        let name = path.file_name().unwrap().to_str().unwrap();
        assert!(name.len() <= 32 && !name.starts_with('.'), "{name}");
        assert_ne!(
            path,
            file_path(Path::new("/x"), &long.replace("/n", "/m")),
            "names cut alike stay apart"
        );
    }

    #[test]
    fn a_directory_that_cannot_be_written_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("features.d");
        fs::write(&blocker, b"a file, not a directory").unwrap();
        let e = FeatureFiles::new(blocker)
            .write("devices.anza-labs.dev/kvm", 1)
            .unwrap_err();
        assert!(
            crate::error::error_chain(&e).contains("features.d/kdp-kvm"),
            "{}",
            crate::error::error_chain(&e)
        );
    }
}
