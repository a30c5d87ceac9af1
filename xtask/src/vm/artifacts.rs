//! The executables the VM runs, built on the host by cargo and found in its JSON messages.
use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

/// A test executable and the name its results are reported under.
pub struct TestBinary {
    /// The cargo target name, e.g. "ebpf_packets" or "egress_tests" (a library's unit tests).
    pub name: String,
    pub path: PathBuf,
}

pub struct Artifacts {
    pub tests: Vec<TestBinary>,
    pub router: PathBuf,
}

/// The cargo test targets the VM runs: the BPF_PROG_TEST_RUN packet tests, and every test
/// target of the namespace integration-test package but those in [`HOST_ONLY`].
const TEST_BUILDS: &[&[&str]] = &[
    &["-p", "egress-loader", "--test", "ebpf_packets"],
    &["-p", "egress-tests"],
];

/// Test targets that need what only the host has, not another kernel: podman and the image
/// (pods runs each pod in podman too), the manifest validators (Python), and the proxies under
/// load (user space only; slowhttptest, wrk, Python and tens of thousands of descriptors).
const HOST_ONLY: &[&str] = &["pods", "manifests", "proxy_faults", "cni_podman"];

pub fn build(root: &Path) -> Result<Artifacts> {
    let mut tests = Vec::new();
    let mut router = None;
    for args in TEST_BUILDS {
        for msg in cargo_json(root, &["test", "--no-run"], args)? {
            if let Some(t) = test_executable(&msg) {
                if !HOST_ONLY.contains(&t.name.as_str()) {
                    tests.push(t);
                }
            } else if let Some(p) = bin_executable(&msg, "egress-router") {
                router = Some(p);
            }
        }
    }
    let router = match router {
        Some(r) => r,
        None => cargo_json(
            root,
            &["build"],
            &["-p", "egress-loader", "--bin", "egress-router"],
        )?
        .iter()
        .find_map(|m| bin_executable(m, "egress-router"))
        .context("cargo built no egress-router executable")?,
    };
    if tests.is_empty() {
        bail!("cargo built no test executables");
    }
    tests.sort_by(|a, b| a.name.cmp(&b.name));
    tests.dedup_by(|a, b| a.path == b.path);
    Ok(Artifacts { tests, router })
}

fn cargo_json(root: &Path, cmd: &[&str], args: &[&str]) -> Result<Vec<Value>> {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root)
        .args(cmd)
        .args(["--message-format=json-render-diagnostics"])
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit());
    println!("vm-test: cargo {} {}", cmd.join(" "), args.join(" "));
    let out = c.output().with_context(|| format!("cannot run {c:?}"))?;
    if !out.status.success() {
        bail!("{c:?} failed: {}", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["reason"] == "compiler-artifact")
        .collect())
}

fn test_executable(msg: &Value) -> Option<TestBinary> {
    if msg["profile"]["test"] != true {
        return None;
    }
    let path = msg["executable"].as_str()?;
    Some(TestBinary {
        name: msg["target"]["name"].as_str()?.replace('-', "_"),
        path: path.into(),
    })
}

fn bin_executable(msg: &Value, name: &str) -> Option<PathBuf> {
    let kinds = msg["target"]["kind"].as_array()?;
    if msg["target"]["name"] != name
        || !kinds.iter().any(|k| k == "bin")
        || msg["profile"]["test"] == true
    {
        return None;
    }
    msg["executable"].as_str().map(PathBuf::from)
}
