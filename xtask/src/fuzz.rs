//! Placeholder until the fuzz targets land.
pub fn run(_seconds_per_target: u64) -> anyhow::Result<()> {
    anyhow::bail!("no fuzz targets yet")
}
