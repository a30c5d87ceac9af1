//! Debian packages fetched with apt into the cache, never installed: a private apt state
//! (sources, lists, cache) under `target/vm/apt/`, so the host's apt configuration is left as
//! it is. The sources are Debian 12 (bookworm, its updates and security) and bookworm-backports,
//! which has the 6.12 kernels and a current qemu.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, Result, bail};

use crate::util::{self, is_root};

const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";
const SOURCES: &[(&str, &str)] = &[
    ("http://deb.debian.org/debian", "bookworm"),
    ("http://deb.debian.org/debian", "bookworm-updates"),
    ("http://deb.debian.org/debian-security", "bookworm-security"),
    ("http://deb.debian.org/debian", "bookworm-backports"),
];
pub const BACKPORTS: &str = "bookworm-backports";

/// Package lists younger than this are not refreshed.
const LISTS_MAX_AGE: Duration = Duration::from_secs(12 * 3600);

pub struct Apt {
    dir: PathBuf,
}

impl Apt {
    pub fn new(dir: PathBuf) -> Result<Apt> {
        for d in [
            "lists/partial",
            "cache/archives/partial",
            "sources.list.d",
            "debs",
        ] {
            fs::create_dir_all(dir.join(d))?;
        }
        let keyring = if Path::new(KEYRING).exists() {
            format!(" [signed-by={KEYRING}]")
        } else {
            String::new()
        };
        let list: String = SOURCES
            .iter()
            .map(|(uri, suite)| format!("deb{keyring} {uri} {suite} main\n"))
            .collect();
        fs::write(dir.join("sources.list"), list)?;
        Ok(Apt { dir })
    }

    /// `-o` options pointing apt at the private state.
    fn options(&self) -> Vec<String> {
        let d = &self.dir;
        let mut o = vec![
            format!("Dir::Etc::SourceList={}", d.join("sources.list").display()),
            format!(
                "Dir::Etc::SourceParts={}",
                d.join("sources.list.d").display()
            ),
            format!("Dir::State::Lists={}", d.join("lists").display()),
            format!("Dir::Cache={}", d.join("cache").display()),
            "APT::Get::List-Cleanup=0".into(),
        ];
        if is_root() {
            // Downloads into our cache directory, which the _apt sandbox user cannot write.
            o.push("APT::Sandbox::User=root".into());
        }
        o.into_iter().flat_map(|o| ["-o".to_string(), o]).collect()
    }

    fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.args(self.options())
            .env("DEBIAN_FRONTEND", "noninteractive");
        c
    }

    /// Refreshes the package lists unless they are recent. If that fails (no network) and
    /// lists exist, carries on with them.
    pub fn update(&self) -> Result<()> {
        // apt gives list files the server's modification time: keep our own stamp.
        let stamp = self.dir.join("lists/.vm-test-updated");
        let age = file_age(&stamp);
        if age.is_some_and(|a| a < LISTS_MAX_AGE) {
            return Ok(());
        }
        println!(
            "vm-test: apt-get update (private lists in {})",
            self.dir.display()
        );
        let r = util::output(self.cmd("apt-get").args(["-q", "update"]));
        match (r, age) {
            (Ok(_), _) => {
                fs::write(&stamp, "")?;
                Ok(())
            }
            (Err(e), Some(_)) => {
                eprintln!("vm-test: apt-get update failed, using the lists from earlier: {e:#}");
                Ok(())
            }
            (Err(e), None) => {
                Err(e.context("apt-get update with the Debian bookworm sources failed"))
            }
        }
    }

    /// Names of the packages whose name starts with `prefix`.
    pub fn names(&self, prefix: &str) -> Result<Vec<String>> {
        let out = util::output(self.cmd("apt-cache").args([
            "search",
            "--names-only",
            &format!("^{}", regex_escape(prefix)),
        ]))?;
        Ok(out
            .lines()
            .filter_map(|l| l.split(" - ").next())
            .map(str::to_string)
            .collect())
    }

    /// The candidate version of each package (None: not installable).
    pub fn candidates(&self, pkgs: &[String]) -> Result<Vec<(String, Option<String>)>> {
        let out = util::output(self.cmd("apt-cache").arg("policy").args(pkgs))?;
        let mut res = Vec::new();
        let mut current: Option<String> = None;
        for line in out.lines() {
            if !line.starts_with(' ') && line.ends_with(':') {
                current = Some(line.trim_end_matches(':').to_string());
            } else if let Some(v) = line.trim().strip_prefix("Candidate: ")
                && let Some(p) = current.take()
            {
                res.push((p, (v != "(none)").then(|| v.to_string())));
            }
        }
        Ok(res)
    }

    /// The .deb of `pkg` at `version`, downloaded once into the cache.
    pub fn download(&self, pkg: &str, version: &str) -> Result<PathBuf> {
        let dir = self.dir.join("debs");
        let prefix = format!("{pkg}_{}_", version.replace(':', "%3a"));
        let find = || -> Result<Option<PathBuf>> {
            for e in fs::read_dir(&dir)? {
                let name = e?.file_name().to_string_lossy().into_owned();
                if name.starts_with(&prefix) && name.ends_with(".deb") {
                    return Ok(Some(dir.join(name)));
                }
            }
            Ok(None)
        };
        if let Some(p) = find()? {
            return Ok(p);
        }
        println!("vm-test: downloading {pkg} {version}");
        util::output(self.cmd("apt-get").current_dir(&dir).args([
            "-q",
            "download",
            &format!("{pkg}={version}"),
        ]))?;
        find()?.with_context(|| {
            format!(
                "apt-get download {pkg}={version} left no {prefix}*.deb in {}",
                dir.display()
            )
        })
    }

    /// Installs packages on the host from `suite` (needs root).
    pub fn install_from(&self, suite: &str, pkgs: &[&str]) -> Result<()> {
        if !is_root() {
            bail!("installing {} from {suite} needs root", pkgs.join(" "));
        }
        util::run(
            self.cmd("apt-get")
                .args([
                    "-q",
                    "-y",
                    "--no-install-recommends",
                    "-o",
                    "DPkg::Lock::Timeout=300",
                    "-t",
                    suite,
                    "install",
                ])
                .args(pkgs),
        )
    }
}

/// Unpacks a .deb once into `dir` (a marker file records completion).
pub fn extract(deb: &Path, dir: &Path) -> Result<()> {
    let marker = dir.join(".vm-test-extracted");
    if marker.exists() {
        return Ok(());
    }
    if dir.exists() {
        fs::remove_dir_all(dir)?;
    }
    fs::create_dir_all(dir)?;
    util::output(Command::new("dpkg-deb").arg("-x").arg(deb).arg(dir))
        .with_context(|| format!("unpacking {}", deb.display()))?;
    fs::write(&marker, deb.display().to_string())?;
    Ok(())
}

/// Orders Debian versions with `dpkg --compare-versions`.
pub fn version_gt(a: &str, b: &str) -> bool {
    Command::new("dpkg")
        .args(["--compare-versions", a, "gt", b])
        .status()
        .is_ok_and(|s| s.success())
}

fn file_age(path: &Path) -> Option<Duration> {
    let t = fs::metadata(path).ok()?.modified().ok()?;
    Some(SystemTime::now().duration_since(t).unwrap_or_default())
}

fn regex_escape(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            let esc = ".+*?()[]{}|^$\\".contains(c);
            esc.then_some('\\').into_iter().chain(std::iter::once(c))
        })
        .collect()
}
