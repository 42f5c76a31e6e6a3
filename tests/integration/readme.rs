//! The README's "Try it without a cluster" block, run as written (only the build line is left
//! out, since this test's own build made the binary): on a machine without a kubelet it must keep
//! showing a device list and an Allocate answer, and the output the README shows must match.

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use crate::support::{binary, repository, WAIT};

const MARKER: &str = "<!-- check: quick-start -->";

/// The first fenced block of `kind` after the marker, and the text after it.
fn block<'a>(text: &'a str, kind: &str) -> (&'a str, &'a str) {
    let fence = format!("```{kind}\n");
    let (_, rest) = text
        .split_once(&fence)
        .unwrap_or_else(|| panic!("no {fence:?} block after the marker"));
    rest.split_once("```\n").expect("the block is closed")
}

#[test]
fn the_quick_start_shows_devices_and_an_allocation_without_a_kubelet() {
    assert!(
        Path::new("/dev/net/tun").exists(),
        "the quick start serves /dev/net/tun, which this machine lacks"
    );
    let readme = fs::read_to_string(repository().join("README.md")).unwrap();
    let (_, after) = readme
        .split_once(MARKER)
        .expect("README.md has the quick start marker");
    let (commands, rest) = block(after, "sh");
    let (shown, _) = block(rest, "text");
    assert!(commands.contains("cargo build --release"), "{commands}");
    assert!(commands.contains("$PWD/target/release"), "{commands}");
    let bin_dir = binary().parent().unwrap().to_str().unwrap().to_owned();
    let script: String = commands
        .lines()
        .filter(|l| !l.starts_with("cargo build"))
        .map(|l| l.replace("$PWD/target/release", &bin_dir) + "\n")
        .collect();

    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("stdout");
    let err_path = dir.path().join("stderr");
    let mut child = Command::new("bash")
        .args(["-euo", "pipefail", "-c", &script])
        .current_dir(repository())
        .env("TMPDIR", dir.path())
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(fs::File::create(&out_path).unwrap())
        .stderr(fs::File::create(&err_path).unwrap())
        // Its own process group, so nothing it started outlives the test.
        .process_group(0)
        .spawn()
        .unwrap();
    let pgid = child.id() as i32;
    let (tx, rx) = crossbeam_channel::bounded(1);
    std::thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    let status = rx.recv_timeout(WAIT);
    // SAFETY: kill(2) has no memory effects; the group is the one the script ran in.
    unsafe { libc::kill(-pgid, libc::SIGKILL) };
    let stdout = fs::read_to_string(&out_path).unwrap();
    let stderr = fs::read_to_string(&err_path).unwrap();
    let status = status.expect("the quick start finished in time").unwrap();
    assert!(status.success(), "{status}\n{stdout}\n{stderr}");

    for want in [
        "devices: 10 (10 healthy)",
        "allocate tun-0: the container gets",
        "device /dev/net/tun -> /dev/net/tun (rw)",
        "devices.anza-labs.dev/tun",
    ] {
        assert!(stdout.contains(want), "no {want:?} in:\n{stdout}\n{stderr}");
    }
    // Every line the README shows is in what the commands print (timings and paths vary).
    let normal = |l: &str| l.split_whitespace().collect::<Vec<_>>().join(" ");
    let printed: Vec<String> = stdout.lines().map(normal).collect();
    for line in shown.lines().map(normal) {
        if line.is_empty() || line.starts_with("socket:") || line.starts_with("answered in:") {
            continue;
        }
        assert!(
            printed.contains(&line),
            "the README shows {line:?}, but the commands printed:\n{stdout}"
        );
    }
    // The plugin was stopped by the block's last command and cleaned up after itself.
    assert!(
        stderr.contains("SIGTERM received: shutting down"),
        "{stderr}"
    );
}
