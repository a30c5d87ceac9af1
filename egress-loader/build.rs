//! Builds the eBPF programs (egress-ebpf, for bpfel-unknown-none with the nightly toolchain and
//! bpf-linker) and leaves the object in OUT_DIR, where src/dataplane embeds it. Only with the
//! `ebpf` feature: without it nothing here needs the BPF toolchain.
fn main() -> anyhow::Result<()> {
    #[cfg(feature = "ebpf")]
    build_ebpf()?;
    Ok(())
}

#[cfg(feature = "ebpf")]
fn build_ebpf() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR")?;
    let root = std::path::Path::new(&manifest_dir)
        .parent()
        .expect("workspace root");
    // The eBPF object also depends on the shared types.
    println!(
        "cargo:rerun-if-changed={}",
        root.join("egress-common/src").display()
    );
    let ebpf_dir = root.join("egress-ebpf");
    let ebpf_dir = ebpf_dir.to_str().expect("utf-8 path");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "egress-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
