//! A minimal writer for the cpio "newc" format, the one the kernel unpacks as an initramfs.
//! Entries are collected first and written sorted by path, so that every directory comes
//! before what it holds; missing parent directories are added.
use std::{
    collections::BTreeMap,
    fs::File,
    io::{self, BufWriter, Write},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};

enum Node {
    Dir,
    File { src: Source, mode: u32 },
    Symlink(String),
}

enum Source {
    Path(PathBuf),
    Bytes(Vec<u8>),
}

#[derive(Default)]
pub struct Archive {
    nodes: BTreeMap<String, Node>,
}

impl Archive {
    pub fn dir(&mut self, path: &str) {
        let path = clean(path);
        self.parents(&path);
        self.nodes.entry(path).or_insert(Node::Dir);
    }

    /// A file copied from the host when the archive is written.
    pub fn file(&mut self, path: &str, src: &Path, mode: u32) {
        self.insert(
            path,
            Node::File {
                src: Source::Path(src.to_path_buf()),
                mode,
            },
        );
    }

    pub fn bytes(&mut self, path: &str, data: impl Into<Vec<u8>>, mode: u32) {
        self.insert(
            path,
            Node::File {
                src: Source::Bytes(data.into()),
                mode,
            },
        );
    }

    pub fn symlink(&mut self, path: &str, target: &str) {
        self.insert(path, Node::Symlink(target.to_string()));
    }

    pub fn remove(&mut self, path: &str) {
        self.nodes.remove(&clean(path));
    }

    fn insert(&mut self, path: &str, node: Node) {
        let path = clean(path);
        self.parents(&path);
        self.nodes.insert(path, node);
    }

    fn parents(&mut self, path: &str) {
        let mut at = 0;
        while let Some(i) = path[at..].find('/') {
            let parent = &path[..at + i];
            self.nodes.entry(parent.to_string()).or_insert(Node::Dir);
            at += i + 1;
        }
    }

    /// Writes the archive (uncompressed: the kernel takes it as it is and qemu loads it fast).
    pub fn write(&self, out: &Path) -> Result<u64> {
        let mut w = Writer {
            out: BufWriter::new(File::create(out)?),
            ino: 1,
            len: 0,
        };
        for (path, node) in &self.nodes {
            match node {
                Node::Dir => w.entry(path, 0o040755, &[])?,
                Node::Symlink(target) => w.entry(path, 0o120777, target.as_bytes())?,
                Node::File {
                    src: Source::Bytes(b),
                    mode,
                } => w.entry(path, 0o100000 | mode, b)?,
                Node::File {
                    src: Source::Path(p),
                    mode,
                } => {
                    let data =
                        std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
                    w.entry(path, 0o100000 | mode, &data)?
                }
            }
        }
        w.entry("TRAILER!!!", 0, &[])?;
        w.out.flush()?;
        Ok(w.len)
    }
}

/// Archive paths are relative ("usr/bin/x"), as the kernel expects.
fn clean(path: &str) -> String {
    path.trim_start_matches('/')
        .trim_end_matches('/')
        .to_string()
}

struct Writer {
    out: BufWriter<File>,
    ino: u32,
    len: u64,
}

impl Writer {
    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) -> Result<()> {
        if data.len() > u32::MAX as usize {
            bail!("{name} is too large for cpio");
        }
        let nlink = if mode & 0o170000 == 0o040000 { 2 } else { 1 };
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime
            data.len(),
            0, // dev major
            0, // dev minor
            0, // rdev major
            0, // rdev minor
            name.len() + 1,
            0, // check
        );
        self.ino += 1;
        self.put(header.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad()?;
        self.put(data)?;
        Ok(self.pad()?)
    }

    fn put(&mut self, b: &[u8]) -> io::Result<()> {
        self.out.write_all(b)?;
        self.len += b.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let n = (4 - (self.len % 4) as usize) % 4;
        self.put(&[0u8; 3][..n])
    }
}
