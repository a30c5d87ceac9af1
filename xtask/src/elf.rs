//! The shared libraries an executable needs, for copying it into a filesystem of its own (the
//! VM tests' initramfs, the image's debug variant).
use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

/// A library to copy: from `src` (the real file) to `dest` (the path the loader looks for).
pub struct Lib {
    pub src: PathBuf,
    pub dest: String,
}

/// The shared libraries (and the ELF interpreter) of the given executables, via ldd. Each is
/// placed under its directory's real path with the name ldd printed (the soname), holding the
/// real file's contents.
pub fn libraries(elves: &[PathBuf]) -> Result<Vec<Lib>> {
    let mut paths = BTreeSet::new();
    for e in elves {
        let out = Command::new("ldd")
            .arg(e)
            .output()
            .with_context(|| format!("running ldd {}", e.display()))?;
        let text = String::from_utf8_lossy(&out.stdout);
        if text.contains("not a dynamic executable") || !out.status.success() {
            continue;
        }
        for line in text.lines() {
            if line.contains("not found") {
                bail!(
                    "{}: a library is missing on the host: {}",
                    e.display(),
                    line.trim()
                );
            }
            let path = match line.split_once("=>") {
                Some((_, rhs)) => rhs.split_whitespace().next(),
                None => line.split_whitespace().next(),
            };
            if let Some(p) = path.filter(|p| p.starts_with('/')) {
                paths.insert(PathBuf::from(p));
            }
        }
    }
    let mut libs = Vec::new();
    for p in paths {
        let dir = p.parent().context("library without a directory")?;
        let name = p.file_name().context("library without a name")?;
        let dest = canonical(dir)? + "/" + &name.to_string_lossy();
        libs.push(Lib {
            src: fs::canonicalize(&p)?,
            dest,
        });
    }
    Ok(libs)
}

/// The real path of a host file, as a string for the archive.
pub fn canonical(p: &Path) -> Result<String> {
    let c = fs::canonicalize(p).with_context(|| format!("resolving {}", p.display()))?;
    c.to_str().map(str::to_string).context("non-UTF-8 path")
}
