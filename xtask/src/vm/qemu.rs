//! Booting a kernel and initramfs in qemu with a time limit. The console (first serial port) is
//! saved to a log and its `vm-test:` lines are shown as they come; the second serial port
//! carries the results to a file.
//!
//! KVM is tried first when /dev/kvm is there. On hosts where it cannot run a stock kernel (this
//! kind of machine offers a PVM-based KVM that stops the guest's decompressor with "KVM
//! internal error"), the first boot shows it within seconds and everything falls back to TCG.
use std::{
    fs::{self, File},
    io::{BufRead as _, BufReader, Read, Write as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

use super::results;
use crate::util;

/// The console line the init script prints first: the guest is up.
const BOOTED: &str = "booted ";
const KVM_FAILURE: &[&str] = &[
    "KVM internal error",
    "kvm run failed",
    "failed to initialize kvm",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

pub struct Vm<'a> {
    pub qemu: &'a Path,
    pub vmlinuz: &'a Path,
    pub initrd: &'a Path,
    pub console_log: &'a Path,
    pub results: &'a Path,
}

pub enum Outcome {
    /// The guest powered off (or its kernel panicked: init never returns on its own).
    Exited,
    /// Killed at the time limit.
    TimedOut,
    /// Never reached the init script (the kernel died early, or the accelerator failed).
    NoBoot(String),
}

impl Vm<'_> {
    pub fn run(&self, accel: Accel, boot_timeout: Duration, timeout: Duration) -> Result<Outcome> {
        let _ = fs::remove_file(self.results);
        let mut cmd = Command::new(self.qemu);
        match accel {
            Accel::Kvm => cmd.args(["-accel", "kvm", "-cpu", "max"]),
            Accel::Tcg => cmd.args(["-accel", "tcg,thread=multi", "-cpu", "max"]),
        };
        cmd.args([
            "-m",
            "2G",
            "-smp",
            "2",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-nic",
            "none",
        ])
        .args(["-no-reboot", "-serial", "stdio"])
        .arg("-serial")
        .arg(format!("file:{}", self.results.display()))
        .arg("-kernel")
        .arg(self.vmlinuz)
        .arg("-initrd")
        .arg(self.initrd)
        .args([
            "-append",
            "console=ttyS0 panic=-1 quiet loglevel=4 mitigations=off",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", self.qemu.display()))?;
        let (tx, rx) = mpsc::channel::<String>();
        let readers = [
            spawn_reader(child.stdout.take().expect("piped"), tx.clone()),
            spawn_reader(child.stderr.take().expect("piped"), tx),
        ];
        let mut log = File::create(self.console_log)?;
        let start = Instant::now();
        let mut booted = false;
        let mut last_lines: Vec<String> = Vec::new();
        let outcome = loop {
            let limit = if booted { timeout } else { boot_timeout };
            let left = limit.saturating_sub(start.elapsed());
            match rx.recv_timeout(left.min(Duration::from_secs(1))) {
                Ok(line) => {
                    writeln!(log, "{line}")?;
                    if let Some(rest) = line.strip_prefix("vm-test: ") {
                        println!("vm-test: {rest}");
                        booted |= rest.contains(BOOTED);
                    }
                    if KVM_FAILURE.iter().any(|k| line.contains(k)) {
                        kill(&mut child);
                        break Outcome::NoBoot(format!("qemu: {line}"));
                    }
                    last_lines.push(line);
                    if last_lines.len() > 20 {
                        last_lines.remove(0);
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    child.wait()?;
                    break if booted {
                        Outcome::Exited
                    } else {
                        Outcome::NoBoot(format!(
                            "qemu exited before init ran; last console lines:\n{}",
                            last_lines.join("\n")
                        ))
                    };
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if start.elapsed() >= limit {
                        kill(&mut child);
                        break if booted {
                            Outcome::TimedOut
                        } else {
                            Outcome::NoBoot(format!(
                                "init did not start within {}s",
                                boot_timeout.as_secs()
                            ))
                        };
                    }
                }
            }
        };
        for r in readers {
            let _ = r.join();
        }
        Ok(outcome)
    }
}

fn spawn_reader(
    src: impl Read + Send + 'static,
    tx: mpsc::Sender<String>,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut r = BufReader::new(src);
        let mut buf = Vec::new();
        while r.read_until(b'\n', &mut buf).is_ok_and(|n| n > 0) {
            let line = String::from_utf8_lossy(&buf);
            let line = results::strip_controls(line.trim_end_matches(['\n', '\r']));
            if tx.send(line).is_err() {
                return;
            }
            buf.clear();
        }
    })
}

fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Whether KVM is worth a try: /dev/kvm opens read-write.
pub fn kvm_available() -> bool {
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// The qemu to use and its major version.
pub fn find_qemu() -> Option<(PathBuf, u32)> {
    let out = util::output(Command::new("qemu-system-x86_64").arg("--version")).ok()?;
    // "QEMU emulator version 10.0.2 (Debian ...)"
    let v = out
        .split("version ")
        .nth(1)?
        .split(['.', ' '])
        .next()?
        .parse()
        .ok()?;
    Some((PathBuf::from("qemu-system-x86_64"), v))
}

/// Reads the results file of a finished VM.
pub fn read_results(path: &Path) -> Result<String> {
    match fs::read(path) {
        Ok(b) => Ok(String::from_utf8_lossy(&b).replace('\r', "")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}
