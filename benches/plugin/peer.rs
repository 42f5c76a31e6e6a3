//! Ours against a Go peer in one run: our release binary and a minimal grpc-go device plugin
//! (`benches/go/peer`), each serving one resource to the fake kubelet, both driven by a grpc-go
//! client that dials like the kubelet (`benches/go/load`). Repetitions alternate which goes
//! first; every figure is a median over repetitions with min and max, and a ratio ours/Go taken
//! within each repetition.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::support::{repository, FakeKubelet, PluginProcess, TestNode};
use crate::{context_switches, median, quantile, BUILTINS};

const RESOURCE: &str = "devices.anza-labs.dev/kvm";
/// Both plugins serve the socket name ours uses, so the client's command line is the same.
const SOCKET: &str = "kdp-kvm.sock";

/// How much of each measurement one repetition takes.
pub struct Settings {
    pub reps: usize,
    pub startups: usize,
    pub calls: usize,
    pub callers: usize,
    pub concurrent_for: Duration,
    pub idle_for: Duration,
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Who {
    Go,
    Ours,
    /// Ours serving all five built-ins, for the footprint alone.
    OursFive,
}

/// The Go programs, built from `benches/go` (its go.mod pins grpc-go and the kubelet's API).
pub struct GoPrograms {
    peer: PathBuf,
    load: PathBuf,
}

impl GoPrograms {
    /// Builds both with the `go` on PATH; `None`, with the reason printed, when that fails.
    pub fn build() -> Option<GoPrograms> {
        let source = repository().join("benches/go");
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("go-peers");
        // `go build -o` writes several programs only into a directory that exists.
        if let Err(e) = std::fs::create_dir_all(&out) {
            eprintln!("cannot create {}: {e}", out.display());
            return None;
        }
        let built = Command::new("go")
            .current_dir(&source)
            .args(["build", "-trimpath", "-o"])
            .arg(&out)
            .args(["./peer", "./load"])
            .status();
        match built {
            Ok(status) if status.success() => Some(GoPrograms {
                peer: out.join("peer"),
                load: out.join("load"),
            }),
            Ok(status) => {
                eprintln!("go build in {} failed ({status})", source.display());
                None
            }
            Err(e) => {
                eprintln!("cannot run go (Go 1.26 or later is needed for the Go peer): {e}");
                None
            }
        }
    }
}

/// What the load client reports (benches/go/load).
#[derive(Deserialize)]
struct Load {
    seq_us: Vec<f64>,
    seq_cpu_ns: u64,
    conc_calls: u64,
    conc_secs: f64,
    conc_us: Vec<f64>,
    conc_cpu_ns: u64,
    conc_client_cpu_ns: u64,
}

/// One repetition's figures for one plugin, by measure.
type Figures = BTreeMap<&'static str, f64>;

/// A plugin serving, registered, with the fake kubelet's ListAndWatch stream open.
struct Serving {
    process: PluginProcess,
    _kubelet: FakeKubelet,
    node: TestNode,
}

fn spawn(who: Who, node: &TestNode, go: &GoPrograms) -> PluginProcess {
    match who {
        Who::Ours => PluginProcess::serve(
            node,
            &["--resource", "kvm", "--count", "10", "--log-level", "warn"],
        ),
        Who::OursFive => PluginProcess::serve(
            node,
            &[
                "--resource",
                "kvm,tun,vhost-net,vhost-vsock,fuse",
                "--log-level",
                "warn",
            ],
        ),
        Who::Go => {
            let mut command = Command::new(&go.peer);
            command
                .arg("-kubelet")
                .arg(node.plugins.join("kubelet.sock"))
                .arg("-socket")
                .arg(node.plugins.join(SOCKET))
                .args(["-resource", RESOURCE, "-count", "10", "-device"])
                .arg(node.dev.join("kvm"));
            PluginProcess::start(node, command)
        }
    }
}

fn resources(who: Who) -> &'static [&'static str] {
    if who == Who::OursFive {
        &BUILTINS
    } else {
        &BUILTINS[..1]
    }
}

/// Start-up: from just before the spawn to the Register call arriving.
fn startup_ms(who: Who, go: &GoPrograms) -> f64 {
    let node = TestNode::new();
    let kubelet = FakeKubelet::start(&node.plugins);
    let started = Instant::now();
    let mut process = spawn(who, &node, go);
    let at = kubelet.registrations_of(&[RESOURCE])[0].at;
    process.signal(libc::SIGTERM);
    process.wait();
    (at - started).as_secs_f64() * 1e3
}

fn serving(who: Who, go: &GoPrograms) -> Serving {
    let node = TestNode::new();
    let kubelet = FakeKubelet::start(&node.plugins);
    let process = spawn(who, &node, go);
    kubelet.registrations_of(resources(who));
    for resource in resources(who) {
        kubelet.list_of(resource);
    }
    if who != Who::Go {
        // Ours has settled once it has heard every Register answer.
        for resource in resources(who) {
            process.wait_for_log(&format!("registered {resource} (endpoint"));
        }
    }
    Serving {
        process,
        _kubelet: kubelet,
        node,
    }
}

fn load(serving: &Serving, go: &GoPrograms, settings: &Settings) -> Load {
    let output = Command::new(&go.load)
        .arg("-socket")
        .arg(serving.node.plugins.join(SOCKET))
        .args(["-ids", "kvm-0", "-seq", &settings.calls.to_string()])
        .args(["-pid", &serving.process.pid().to_string()])
        .args(["-callers", &settings.callers.to_string()])
        .arg("-for")
        .arg(format!("{}ms", settings.concurrent_for.as_millis()))
        .output()
        .expect("run the Go load client");
    assert!(
        output.status.success(),
        "the load client failed: {}\n{}",
        String::from_utf8_lossy(&output.stderr),
        serving.process.log_text()
    );
    serde_json::from_slice(&output.stdout).expect("the load client's JSON")
}

fn busy(who: Who, go: &GoPrograms, settings: &Settings) -> Figures {
    let startups: Vec<f64> = (0..settings.startups)
        .map(|_| startup_ms(who, go))
        .collect();
    let serving = serving(who, go);
    let l = load(&serving, go, settings);
    let mut f = Figures::new();
    f.insert("startup_ms", quantile(&startups, 0.5));
    f.insert("seq_p50_us", quantile(&l.seq_us, 0.5));
    f.insert("seq_p99_us", quantile(&l.seq_us, 0.99));
    f.insert(
        "cpu_per_call_us",
        l.seq_cpu_ns as f64 / l.seq_us.len() as f64 / 1e3,
    );
    f.insert("conc_calls_per_s", l.conc_calls as f64 / l.conc_secs);
    f.insert("conc_p50_us", quantile(&l.conc_us, 0.5));
    f.insert("conc_p99_us", quantile(&l.conc_us, 0.99));
    let calls = l.conc_calls.max(1) as f64;
    f.insert("conc_cpu_per_call_us", l.conc_cpu_ns as f64 / calls / 1e3);
    f.insert(
        "conc_client_cpu_per_call_us",
        l.conc_client_cpu_ns as f64 / calls / 1e3,
    );
    f
}

/// Every plugin of every repetition idles at once, in one window: idleness does not compete.
fn idle(go: &GoPrograms, settings: &Settings) -> (Vec<BTreeMap<Who, Figures>>, String) {
    let order = [Who::Go, Who::Ours, Who::OursFive];
    let all: Vec<Vec<(Who, Serving)>> = (0..settings.reps)
        .map(|_| order.iter().map(|&w| (w, serving(w, go))).collect())
        .collect();
    let before: Vec<Vec<(u64, BTreeMap<String, u64>)>> = all
        .iter()
        .map(|rep| {
            rep.iter()
                .map(|(_, s)| context_switches(s.process.pid()))
                .collect()
        })
        .collect();
    // The window is the measurement, not a wait for something.
    thread::sleep(settings.idle_for);
    let mut by_thread = String::new();
    let figures = all
        .iter()
        .zip(&before)
        .map(|(rep, before)| {
            rep.iter()
                .zip(before)
                .map(|((who, s), (was, was_by_name))| {
                    let pid = s.process.pid();
                    let (now, now_by_name) = context_switches(pid);
                    if *who != Who::Go && by_thread.is_empty() {
                        let woke: Vec<String> = now_by_name
                            .iter()
                            .map(|(n, c)| (n, c - was_by_name.get(n).copied().unwrap_or(0)))
                            .filter(|&(_, c)| c > 0)
                            .map(|(n, c)| format!("{n} {c}"))
                            .collect();
                        by_thread = if woke.is_empty() {
                            "none".into()
                        } else {
                            woke.join(", ")
                        };
                    }
                    let mut f = Figures::new();
                    f.insert("idle_switches", (now - was) as f64);
                    f.insert("threads", s.process.threads() as f64);
                    f.insert("rss_mib", s.process.rss_kib() as f64 / 1024.0);
                    f.insert("anon_mib", s.process.rss_anon_kib() as f64 / 1024.0);
                    (*who, f)
                })
                .collect()
        })
        .collect();
    (figures, by_thread)
}

/// A row of the report: Go's and our medians with min and max, then the ratio within each
/// repetition (median, and the one furthest from the target's side).
fn row(
    out: &mut String,
    name: &str,
    unit: &str,
    go: &[f64],
    ours: &[f64],
    target: &str,
    higher_is_better: bool,
) {
    let ratios: Vec<f64> = ours
        .iter()
        .zip(go)
        .map(|(o, g)| if *g == 0.0 { f64::NAN } else { o / g })
        .collect();
    let worst =
        ratios
            .iter()
            .copied()
            .fold(f64::NAN, |w, r| match (higher_is_better, w.is_nan()) {
                (_, true) => r,
                (true, false) => w.min(r),
                (false, false) => w.max(r),
            });
    *out += &format!(
        "| {name} | {} | {} | {} (worst {}) | {target} |\n",
        spread(go, unit),
        spread(ours, unit),
        ratio(median(&ratios)),
        ratio(worst)
    );
}

fn ratio(r: f64) -> String {
    if r.is_nan() {
        "-".into()
    } else {
        format!("{r:.2}x")
    }
}

fn spread(values: &[f64], unit: &str) -> String {
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!(
        "{}{unit} ({}-{})",
        short(median(values)),
        short(min),
        short(max)
    )
}

fn short(v: f64) -> String {
    if v >= 10_000.0 {
        format!("{:.1}k", v / 1e3)
    } else if v >= 100.0 || v == v.trunc() {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// A comparison's report and the runs it came from.
pub struct Compared {
    pub report: String,
    busy: Vec<BTreeMap<Who, Figures>>,
    idle: Vec<BTreeMap<Who, Figures>>,
}

/// The CI guard's bounds on ours/Go (the median over repetitions), with how each is read: what
/// classic mode must keep, measured where the noise lets a bound hold on an unchanged tree
/// (BENCHMARKS.md, "The CI guard").
const GUARD: [(&str, &str, f64); 3] = [
    ("start-up, spawn to Register", "startup_ms", 0.85),
    ("idle RSS, one resource", "rss_mib", 0.60),
    (
        "plugin CPU per sequential Allocate",
        "cpu_per_call_us",
        0.80,
    ),
];

impl Compared {
    /// Ours/Go within each repetition, for one measure of our one-resource plugin.
    fn ratios(&self, key: &str) -> Vec<f64> {
        let runs = if self
            .busy
            .first()
            .is_some_and(|r| r[&Who::Ours].contains_key(key))
        {
            &self.busy
        } else {
            &self.idle
        };
        runs.iter()
            .map(|r| r[&Who::Ours][key] / r[&Who::Go][key])
            .collect()
    }

    /// The guard's verdict: one line per bound, and whether every median stayed within.
    pub fn guard(&self) -> (String, bool) {
        let mut out = String::from(
            "\n| guarded | ours/Go, median | per repetition | bound |\n|---|---:|---|---:|\n",
        );
        let mut held = true;
        for (name, key, bound) in GUARD {
            let ratios = self.ratios(key);
            let m = median(&ratios);
            held &= m <= bound;
            let each: Vec<String> = ratios.iter().map(|r| format!("{r:.2}x")).collect();
            out += &format!(
                "| {name} | {m:.2}x{} | {} | ≤ {bound:.2}x |\n",
                if m <= bound { "" } else { " **over**" },
                each.join(", ")
            );
        }
        (out, held)
    }
}

/// The comparison: its report (Markdown) and runs, or why it could not run.
pub fn compare(settings: &Settings, floor: impl Fn() -> f64) -> Result<Compared, String> {
    let Some(go) = GoPrograms::build() else {
        return Err("The comparison with the Go peer did not run: see the message above.".into());
    };
    let floor_before = floor();
    let mut busy_runs: Vec<BTreeMap<Who, Figures>> = Vec::new();
    for rep in 0..settings.reps {
        let order = if rep % 2 == 0 {
            [Who::Go, Who::Ours]
        } else {
            [Who::Ours, Who::Go]
        };
        busy_runs.push(order.iter().map(|&w| (w, busy(w, &go, settings))).collect());
    }
    let (idle_runs, by_thread) = idle(&go, settings);
    let floor_after = floor();

    let take = |runs: &[BTreeMap<Who, Figures>], who: Who, key: &str| -> Vec<f64> {
        runs.iter().map(|r| r[&who][key]).collect()
    };
    let mut out = format!(
        "\n## Ours against the Go peer\n\n{} repetitions, interleaved; medians over repetitions \
         (min-max). Ratio: ours/Go within each repetition, median (worst).\n\n\
         | measure | Go peer | ours | ours/Go | target |\n|---|---:|---:|---:|---|\n",
        settings.reps
    );
    let callers = settings.callers;
    let idle_s = settings.idle_for.as_secs();
    let (busy, idle) = (&busy_runs[..], &idle_runs[..]);
    // (measure, unit, the runs it comes from, which of ours, key, target, higher is better)
    let rows = [
        (
            "Allocate, sequential: p50".to_string(),
            " µs",
            busy,
            Who::Ours,
            "seq_p50_us",
            "",
            false,
        ),
        (
            "Allocate, sequential: p99".into(),
            " µs",
            busy,
            Who::Ours,
            "seq_p99_us",
            "≤ 0.80x",
            false,
        ),
        (
            "plugin CPU per sequential Allocate, all threads".into(),
            " µs",
            busy,
            Who::Ours,
            "cpu_per_call_us",
            "≤ 0.50x",
            false,
        ),
        (
            format!("Allocate, {callers} concurrent callers on one connection: calls/s"),
            "",
            busy,
            Who::Ours,
            "conc_calls_per_s",
            "≥ 1.50x",
            true,
        ),
        (
            "same: p50".into(),
            " µs",
            busy,
            Who::Ours,
            "conc_p50_us",
            "",
            false,
        ),
        (
            "same: p99".into(),
            " µs",
            busy,
            Who::Ours,
            "conc_p99_us",
            "≤ 0.75x in every repetition",
            false,
        ),
        (
            "same: plugin CPU per Allocate".into(),
            " µs",
            busy,
            Who::Ours,
            "conc_cpu_per_call_us",
            "",
            false,
        ),
        (
            "same: the load client's CPU per call".into(),
            " µs",
            busy,
            Who::Ours,
            "conc_client_cpu_per_call_us",
            "",
            false,
        ),
        (
            "start-up: spawn to Register (ms)".into(),
            "",
            busy,
            Who::Ours,
            "startup_ms",
            "",
            false,
        ),
        (
            format!("idle {idle_s} s, stream open: context switches, whole process"),
            "",
            idle,
            Who::Ours,
            "idle_switches",
            "0",
            false,
        ),
        (
            "idle: threads".into(),
            "",
            idle,
            Who::Ours,
            "threads",
            "",
            false,
        ),
        (
            "idle: RSS, one resource".into(),
            " MiB",
            idle,
            Who::Ours,
            "rss_mib",
            "",
            false,
        ),
        (
            "idle: RSS, ours serving all five built-ins".into(),
            " MiB",
            idle,
            Who::OursFive,
            "rss_mib",
            "< 6 MiB",
            false,
        ),
        (
            "idle: of that RSS, anonymous (the rest is the binary's page cache)".into(),
            " MiB",
            idle,
            Who::OursFive,
            "anon_mib",
            "",
            false,
        ),
    ];
    for (name, unit, runs, ours, key, target, higher) in rows {
        row(
            &mut out,
            &name,
            unit,
            &take(runs, Who::Go, key),
            &take(runs, ours, key),
            target,
            higher,
        );
    }
    out += &format!(
        "\nOur idle wake-ups by thread (first repetition, one resource): {by_thread}.\n\
         Machine drift: the Unix socket ping-pong floor's median was {floor_before:.1} µs before \
         the comparison and {floor_after:.1} µs after.\n"
    );
    Ok(Compared {
        report: out,
        busy: busy_runs,
        idle: idle_runs,
    })
}
