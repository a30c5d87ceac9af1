//! What ADD made, recorded per attachment (network name, container ID, interface name) under
//! /var/lib/cni/egress-router, where CNI plugins keep their state: DEL and GC need the pin
//! directory after the pod's network namespace (whose cookie names it) is gone.
use std::{
    fs, io,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

/// Where the records live. `EGRESS_CNI_STATE_DIR` overrides it (a node whose /var/lib is
/// read-only).
pub fn state_root() -> PathBuf {
    std::env::var_os("EGRESS_CNI_STATE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/cni/egress-router"))
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub network: String,
    pub container_id: String,
    pub ifname: String,
    /// CNI_NETNS at ADD.
    pub netns: PathBuf,
    /// The pin directory on the host's bpffs.
    pub pin_dir: PathBuf,
    /// The pod's default route before ADD replaced it (gateway, interface), put back by DEL.
    #[serde(default)]
    pub previous_default: Option<(std::net::Ipv4Addr, String)>,
}

/// The file of one attachment.
pub fn path(network: &str, container_id: &str, ifname: &str) -> PathBuf {
    // Network names and container IDs are letters, digits, '_', '.', '-' (the spec's and the
    // runtime's checks); an interface name has no '/'.
    state_root()
        .join(network.replace('/', "_"))
        .join(format!("{container_id}.{ifname}.json"))
}

impl Record {
    pub fn load(network: &str, container_id: &str, ifname: &str) -> Result<Option<Record>> {
        read(&path(network, container_id, ifname))
    }

    pub fn save(&self) -> Result<()> {
        let p = path(&self.network, &self.container_id, &self.ifname);
        let dir = p.parent().expect("a file in a directory");
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let tmp = p.with_extension("json.tmp");
        fs::write(&tmp, serde_json::to_vec_pretty(self)?)
            .with_context(|| format!("writing {}", tmp.display()))?;
        fs::rename(&tmp, &p).with_context(|| format!("writing {}", p.display()))
    }

    pub fn remove(&self) -> Result<()> {
        let p = path(&self.network, &self.container_id, &self.ifname);
        match fs::remove_file(&p) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("removing {}", p.display()));
            }
            _ => {}
        }
        // The network's directory goes with its last attachment (fails while others remain).
        if let Some(dir) = p.parent() {
            let _ = fs::remove_dir(dir);
        }
        Ok(())
    }
}

fn read(p: &Path) -> Result<Option<Record>> {
    match fs::read(p) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .with_context(|| format!("reading {}", p.display())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
    }
}

/// Every record of `network` (for GC).
pub fn all(network: &str) -> Result<Vec<Record>> {
    let dir = state_root().join(network.replace('/', "_"));
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
    };
    let mut out = Vec::new();
    for e in entries {
        let p = e?.path();
        if p.extension().is_some_and(|x| x == "json")
            && let Some(r) = read(&p)?
        {
            out.push(r);
        }
    }
    Ok(out)
}
