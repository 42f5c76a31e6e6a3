//! The binary's subcommands and flags as an operator uses them: exit codes, messages, output.

use std::os::unix::net::UnixListener;
use std::process::{Command, Output, Stdio};

use crate::support::{binary, FakeKubelet, PluginProcess, TestNode, WAIT};

/// Runs the binary to its end; one that has not ended within `WAIT` is killed and fails the test
/// (a `serve` that should have refused to start would otherwise hang it).
fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let child = Command::new(binary())
        .args(args)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the binary");
    let pid = child.id();
    let (done, ended) = crossbeam_channel::bounded(1);
    std::thread::spawn(move || done.send(child.wait_with_output()));
    match ended.recv_timeout(WAIT) {
        Ok(out) => out.expect("wait for the binary"),
        Err(_) => {
            // SAFETY: kill(2) on the child we spawned; no memory is involved.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            panic!("{args:?} did not exit within {WAIT:?}");
        }
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn flags_come_from_the_environment_too() {
    let node = TestNode::new();
    let kubelet = FakeKubelet::start(&node.plugins);
    let mut child = Command::new(binary())
        .arg("serve")
        .env("KDP_PLUGIN_DIR", &node.plugins)
        .env("KDP_DEV_ROOT", &node.dev)
        .env("KDP_RESOURCES", "fuse,vhost-net")
        .env("KDP_COUNT", "2,fuse=4")
        .env("KDP_LOG_LEVEL", "warn")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    kubelet.registrations_of(&[
        "devices.anza-labs.dev/fuse",
        "devices.anza-labs.dev/vhost-net",
    ]);
    let fuse = kubelet.dial("kdp-fuse.sock");
    let mut stream = crate::support::watch(&fuse);
    assert_eq!(crate::support::next_list(&mut stream).devices.len(), 4);
    let vhost = kubelet.dial("kdp-vhost-net.sock");
    let mut stream = crate::support::watch(&vhost);
    assert_eq!(crate::support::next_list(&mut stream).devices.len(), 2);
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn bad_flags_exit_2_naming_the_problem() {
    let out = run(&["serve", "--resource", "gpu"], &[]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains("unknown resource \"gpu\"")
            && err.contains("kvm, tun, vhost-net, vhost-vsock, fuse"),
        "{err}"
    );

    let out = run(&["serve", "--count", "kvm=0"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("a whole number from 1 to"),
        "{}",
        text(&out.stderr)
    );

    let out = run(&["serve"], &[("KDP_PERMISSIONS", "rwx")]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("r (read), w (write), m (mknod)"),
        "{}",
        text(&out.stderr)
    );

    let out = run(&["bogus"], &[]);
    assert_eq!(out.status.code(), Some(2));
}

/// Serves a configuration file in kubelet-socket mode on `plugins`; the process's output.
fn serve_config(node: &TestNode, plugins: &std::path::Path, config: &str) -> Output {
    let file = node.root.path().join("config.yaml");
    std::fs::write(&file, config).unwrap();
    run(
        &[
            "serve",
            "--plugin-dir",
            plugins.to_str().unwrap(),
            "--dev-root",
            node.dev.to_str().unwrap(),
            "--config",
            file.to_str().unwrap(),
            "--registration",
            "kubelet-socket",
        ],
        &[],
    )
}

#[test]
fn names_the_kubelet_would_refuse_exit_2_with_the_rule() {
    let node = TestNode::new();
    for (domain, rule) in [
        ("example.kubernetes.io", "native resources"),
        ("requests.example.com", "resource quota names"),
    ] {
        let out = serve_config(
            &node,
            &node.plugins,
            &format!("domain: {domain}\nresources: [{{name: kvm, preset: kvm}}]\n"),
        );
        assert_eq!(out.status.code(), Some(2), "{domain}");
        let err = text(&out.stderr);
        assert!(err.contains(rule), "{domain}: {err}");
    }
}

#[test]
fn a_socket_path_too_long_to_bind_exits_2_before_serving() {
    let node = TestNode::new();
    // Short enough for the final name, too long for the temporary one used while binding: it
    // would bind on no start at all, so it must be refused at the first.
    let deep = node
        .root
        .path()
        .join("d".repeat(80 - node.root.path().as_os_str().len()));
    std::fs::create_dir_all(&deep).unwrap();
    let out = serve_config(&node, &deep, "resources: [{name: kvm, preset: kvm}]\n");
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        // The second slot's name is the longest a resource can bind at.
        err.contains("over the kernel's 107") && err.contains("kdp-kvm~1.sock"),
        "{err}"
    );
}

#[test]
fn a_missing_plugin_directory_is_a_clear_error() {
    let node = TestNode::new();
    let missing = node.root.path().join("no-such-dir");
    let out = run(
        &[
            "serve",
            "--plugin-dir",
            missing.to_str().unwrap(),
            "--dev-root",
            node.dev.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("no-such-dir") && err.contains("--plugin-dir") && err.contains("No such file"),
        "{err}"
    );
    // The newcomer's way on: the next line says how to try it without a kubelet.
    let hint = err
        .lines()
        .find(|l| l.starts_with("hint: "))
        .unwrap_or_else(|| panic!("no hint in {err}"));
    assert!(
        hint.contains("--registration kubelet-socket") && hint.contains("Try it without a cluster"),
        "{hint}"
    );
}

#[test]
fn version_and_help_work() {
    let out = run(&["--version"], &[]);
    assert!(out.status.success());
    assert!(text(&out.stdout).starts_with("kubelet-device-plugins "));
    let out = run(&["serve", "--help"], &[]);
    assert!(text(&out.stdout).contains("KDP_PLUGIN_DIR"));
}

#[test]
fn probe_reports_a_live_plugin() {
    let node = TestNode::new();
    let kubelet = FakeKubelet::start(&node.plugins);
    let _plugin = PluginProcess::serve(&node, &["--resource", "kvm", "--count", "3"]);
    kubelet.registrations_of(&["devices.anza-labs.dev/kvm"]);
    let socket = node.plugins.join("kdp-kvm.sock");

    let out = run(&["probe", "--socket", socket.to_str().unwrap()], &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let table = text(&out.stdout);
    assert!(
        table.contains("get_preferred_allocation_available: true"),
        "{table}"
    );
    assert!(table.contains("devices: 3 (3 healthy)"), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["kvm-2", "Healthy", "-"]),
        "{table}"
    );

    let out = run(
        &[
            "probe",
            "--socket",
            socket.to_str().unwrap(),
            "--output",
            "json",
        ],
        &[],
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("probe prints JSON");
    assert_eq!(json["devices"].as_array().map(Vec::len), Some(3));
    assert_eq!(json["devices"][0]["id"], "kvm-0");
}

#[test]
fn probe_waits_for_the_socket_and_allocates_like_the_kubelet() {
    let node = TestNode::new();
    let socket = node.plugins.join("kdp-kvm.sock");
    let socket_arg = socket.to_str().unwrap().to_owned();
    // The probe starts first and waits; the plugin comes up after it.
    let probe = std::thread::spawn(move || {
        run(
            &[
                "probe",
                "--socket",
                &socket_arg,
                "--wait",
                "--allocate",
                "kvm-1",
            ],
            &[],
        )
    });
    let _plugin = PluginProcess::serve(&node, &["--resource", "kvm", "--count", "2"]);
    let out = probe.join().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let table = text(&out.stdout);
    assert!(
        table.contains("allocate kvm-1: the container gets"),
        "{table}"
    );
    let kvm = node.dev.join("kvm");
    assert!(
        table.contains(&format!("device {} -> /dev/kvm (rw)", kvm.display())),
        "{table}"
    );

    // An ID the plugin does not have: the kubelet's error, as the kubelet would get it.
    let socket_arg = socket.to_str().unwrap();
    let out = run(
        &[
            "probe",
            "--socket",
            socket_arg,
            "--allocate",
            "kvm-7",
            "--output",
            "json",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("Allocate on") && err.contains("unknown device IDs [\"kvm-7\"]"),
        "{err}"
    );
    let out = run(
        &[
            "probe",
            "--socket",
            socket_arg,
            "--allocate",
            "kvm-0",
            "--output",
            "json",
        ],
        &[],
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("probe prints JSON");
    assert_eq!(
        json["allocation"]["devices"][0]["container_path"],
        "/dev/kvm"
    );
    assert_eq!(json["allocation"]["devices"][0]["permissions"], "rw");
}

#[test]
fn probe_fails_on_a_missing_or_silent_socket() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nothing.sock");
    let out = run(&["probe", "--socket", missing.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("nothing.sock"),
        "{}",
        text(&out.stderr)
    );
    let out = run(
        &[
            "probe",
            "--socket",
            missing.to_str().unwrap(),
            "--wait",
            "--timeout",
            "0.2",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("nothing.sock did not appear within 200ms"),
        "{}",
        text(&out.stderr)
    );

    // Accepts connections (the kernel does) but never speaks HTTP/2.
    let silent = dir.path().join("silent.sock");
    let _listener = UnixListener::bind(&silent).unwrap();
    let out = run(
        &[
            "probe",
            "--socket",
            silent.to_str().unwrap(),
            "--timeout",
            "0.5",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("GetDevicePluginOptions"),
        "{}",
        text(&out.stderr)
    );

    let file = dir.path().join("file");
    std::fs::write(&file, b"").unwrap();
    let out = run(&["probe", "--socket", file.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("is not a Unix socket"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn discover_lists_every_builtin_with_its_state() {
    let node = TestNode::new();
    std::fs::remove_file(node.dev.join("vhost-vsock")).unwrap();
    let out = run(
        &[
            "discover",
            "--dev-root",
            node.dev.to_str().unwrap(),
            "--output",
            "json",
        ],
        &[],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = json.as_array().unwrap();
    assert_eq!(rows.len(), 5);
    let vsock = rows
        .iter()
        .find(|r| r["resource"] == "devices.anza-labs.dev/vhost-vsock")
        .unwrap();
    assert_eq!(vsock["devices"][0]["healthy"], false);
    assert_eq!(vsock["devices"][0]["nodes"][0]["kind"], "missing");
    let kvm = rows
        .iter()
        .find(|r| r["resource"] == "devices.anza-labs.dev/kvm")
        .unwrap();
    assert_eq!(kvm["devices"][0]["healthy"], true);
    assert_eq!(kvm["devices"][0]["id_prefix"], "kvm");
    assert_eq!(kvm["count"], 10);
}
