//! Running the egress-router binary in a topology's router namespace.
use std::{
    path::PathBuf,
    process::{Command, Stdio},
};

use crate::{EGRESS_PREFIX, EGRESS_SOURCE, GATEWAY_IP};

/// The egress-router binary: `EGRESS_ROUTER_BIN`, else the one in the target directory this
/// test executable was built into (`cargo xtask test` builds it before the tests).
pub fn router_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("EGRESS_ROUTER_BIN") {
        return p.into();
    }
    let exe = std::env::current_exe().expect("current_exe");
    // target/debug/deps/<test> -> target/debug/egress-router
    let bin = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target dir")
        .join("egress-router");
    assert!(
        bin.exists(),
        "{} missing: build it first (cargo build -p egress-loader; cargo xtask test does)",
        bin.display()
    );
    bin
}

/// An egress-router command with a clean environment holding the reference EGRESS_SOURCE and
/// EGRESS_GATEWAY and `mode`; output piped. Its pins go to the default directory of its network
/// namespace unless the caller sets EGRESS_BPFFS_DIR.
pub fn router_command(mode: &str) -> Command {
    let mut cmd = router_command_of(router_bin(), mode);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd
}

/// `bin` with the reference router environment (as [`router_command`]), output not redirected:
/// the one router environment of the tests, the bench and the soak.
pub fn router_command_of(bin: impl AsRef<std::ffi::OsStr>, mode: &str) -> Command {
    let mut cmd = Command::new(bin);
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("EGRESS_SOURCE", format!("{EGRESS_SOURCE}/{EGRESS_PREFIX}"))
        .env("EGRESS_GATEWAY", GATEWAY_IP.to_string())
        .env("EGRESS_ROUTER_MODE", mode);
    cmd
}

/// A command for `program` as an unprivileged container runs it: user and group `uid`, no
/// supplementary groups, no capabilities (bounding, inheritable and ambient sets cleared) and
/// no privilege escalation (no_new_privs, so file capabilities do not apply either), through
/// util-linux's setpriv.
pub fn unprivileged_command(program: impl AsRef<std::ffi::OsStr>, uid: u32) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.arg(format!("--reuid={uid}"))
        .arg(format!("--regid={uid}"))
        .args([
            "--clear-groups",
            "--inh-caps=-all",
            "--ambient-caps=-all",
            "--bounding-set=-all",
            "--no-new-privs",
            "--",
        ])
        .arg(program);
    cmd
}
