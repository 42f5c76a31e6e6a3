//! Build script: generates the kubelet APIs' messages and gRPC services from `proto/` without
//! protoc: the device plugin API, plugin registration, DRA's v1 and v1beta1 and its health API.
//!
//! Messages come from protobuf-codegen's pure-Rust parser. Services come from
//! grpcio-compiler, which only understands protobuf 2 descriptors, so the
//! parsed descriptors are re-encoded and decoded as protobuf 2 types: the wire
//! format of `FileDescriptorProto` is the same in both versions.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};

const PROTO_DIR: &str = "proto";
const PROTO_FILES: [&str; 6] = [
    "proto/deviceplugin.proto",
    "proto/pluginregistration.proto",
    "proto/dra_v1.proto",
    "proto/dra_v1beta1.proto",
    "proto/dra_health_v1.proto",
    "proto/dra_health_v1alpha1.proto",
];

fn main() {
    println!("cargo:rerun-if-changed={PROTO_DIR}");
    let out_dir =
        PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR for build scripts"));

    protobuf_codegen::Codegen::new()
        .pure()
        .include(PROTO_DIR)
        .inputs(PROTO_FILES)
        .out_dir(&out_dir)
        .run_from_script();

    let parsed = protobuf_parse::Parser::new()
        .pure()
        .include(PROTO_DIR)
        .inputs(PROTO_FILES)
        .parse_and_typecheck()
        .unwrap_or_else(|e| panic!("cannot parse {PROTO_FILES:?}: {e:#}"));
    let descriptors: Vec<protobuf2::descriptor::FileDescriptorProto> = parsed
        .file_descriptors
        .iter()
        .map(|fd| {
            let bytes = protobuf::Message::write_to_bytes(fd)
                .expect("a descriptor that was just parsed encodes");
            protobuf2::Message::parse_from_bytes(&bytes)
                .expect("protobuf 2 decodes the same descriptor wire format")
        })
        .collect();
    let to_generate: Vec<String> = parsed
        .relative_paths
        .iter()
        .map(|p| p.to_str().to_owned())
        .collect();
    for generated in grpcio_compiler::codegen::gen(&descriptors, &to_generate) {
        write(&out_dir.join(&generated.name), &generated.content);
    }

    // A module file of our own, so the generated files (which carry inner
    // attributes) are real modules rather than `include!`d fragments.
    // Every file defines a service, so each has its messages' module and its service's.
    let modules: String = PROTO_FILES
        .iter()
        .map(|f| {
            let name = Path::new(f)
                .file_stem()
                .and_then(|s| s.to_str())
                .expect("our proto files have plain names");
            format!("pub mod {name};\npub mod {name}_grpc;\n")
        })
        .collect();
    write(&out_dir.join("api.rs"), modules.as_bytes());

    order_symbols();
}

/// The functions classic mode runs, listed in `SYMBOL_ORDER` by build/order-symbols.sh.
const SYMBOL_ORDER: &str = "build/symbol-order.txt";

/// Asks the linker to place the functions classic mode runs together at the front of .text, so
/// that a classic-mode process does not fault DRA mode's code in around its own (BENCHMARKS.md,
/// "Classic mode's footprint"). Only lld takes an ordering file: rustc links x86_64 Linux
/// targets with it from 1.90 on, unless the build names another linker; other targets and
/// linkers get the default layout. Debug builds are not measured, so they are left alone.
fn order_symbols() {
    println!("cargo:rerun-if-changed={SYMBOL_ORDER}");
    println!("cargo:rerun-if-env-changed=CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_LINKER");
    let var = |name: &str| env::var(name).unwrap_or_default();
    if var("TARGET") != "x86_64-unknown-linux-gnu"
        || var("PROFILE") != "release"
        || !var("CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_LINKER").is_empty()
        || var("CARGO_ENCODED_RUSTFLAGS").contains("link")
        || !rustc_links_with_lld()
    {
        return;
    }
    if Path::new(&var("CARGO_MANIFEST_DIR"))
        .join(SYMBOL_ORDER)
        .exists()
    {
        // Relative: cargo runs rustc, and so the linker, in the package's root. An absolute
        // path would outlive the checkout it names: cargo keeps this script's output when the
        // tree moves (a fresh clone beside a warm target directory), and the link then fails.
        println!("cargo:rustc-link-arg-bins=-Wl,--symbol-ordering-file={SYMBOL_ORDER}");
        // The file names both release builds' symbols; each finds only its own.
        println!("cargo:rustc-link-arg-bins=-Wl,--no-warn-symbol-ordering");
    }
}

/// Whether this rustc links with its own lld by default (1.90 and later).
fn rustc_links_with_lld() -> bool {
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let Ok(out) = std::process::Command::new(rustc).arg("-vV").output() else {
        return false;
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let Some(release) = text.lines().find_map(|l| l.strip_prefix("release: ")) else {
        return false;
    };
    let mut parts = release
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) >= (1, 90)
}

fn write(path: &Path, content: &[u8]) {
    fs::write(path, content).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}
