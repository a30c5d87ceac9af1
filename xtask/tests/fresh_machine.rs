//! A fresh machine has no rust-src and no bpf-linker until `cargo xtask setup` installs them, so
//! nothing that must build before setup runs may build the eBPF programs: xtask itself, the
//! library's pure parts (`--no-default-features`) and the fuzzers. The eBPF object is built only
//! by egress-loader's build script through aya-build, so these dependency graphs (as cargo
//! resolves them for a build of that package alone, features included) must not contain it.
use std::{path::Path, process::Command};

/// The packages of `cargo tree` for these arguments, one `name version` a line.
fn build_graph(args: &[&str]) -> Vec<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(&cargo)
        .current_dir(root)
        .args(["tree", "--locked", "-e", "normal,build", "--prefix", "none"])
        .args(["--format", "{p}"])
        .args(args)
        .output()
        .expect("running cargo tree");
    assert!(
        out.status.success(),
        "cargo tree {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

fn assert_no_bpf_toolchain(what: &str, args: &[&str]) {
    let graph = build_graph(args);
    assert!(
        graph.iter().any(|p| p.starts_with("egress-")),
        "cargo tree {args:?} printed no egress package: {graph:?}"
    );
    let bpf: Vec<&String> = graph
        .iter()
        .filter(|p| p.starts_with("aya-build ") || p.starts_with("egress-ebpf "))
        .collect();
    assert!(
        bpf.is_empty(),
        "{what} would build the eBPF programs (needing rust-src and bpf-linker, which a fresh machine \
         lacks until `cargo xtask setup`): its build graph has {bpf:?}"
    );
}

#[test]
fn xtask_builds_without_the_ebpf_toolchain() {
    assert_no_bpf_toolchain("`cargo xtask`", &["-p", "xtask"]);
}

#[test]
fn the_library_without_the_ebpf_feature_needs_no_ebpf_toolchain() {
    assert_no_bpf_toolchain(
        "egress-loader --no-default-features",
        &["-p", "egress-loader", "--no-default-features"],
    );
}

#[test]
fn the_fuzzers_build_without_the_ebpf_toolchain() {
    assert_no_bpf_toolchain("the fuzz targets", &["--manifest-path", "fuzz/Cargo.toml"]);
}

/// The check above must see the dataplane where it is: the binary's default build has it.
#[test]
fn the_router_binary_embeds_the_ebpf_programs() {
    let graph = build_graph(&["-p", "egress-loader"]);
    assert!(
        graph.iter().any(|p| p.starts_with("aya-build ")),
        "egress-loader's default build no longer builds the eBPF programs through aya-build, so \
         the fresh-machine checks prove nothing: {graph:?}"
    );
}
