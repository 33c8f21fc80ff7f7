//! Builds the kernel programs (`monitor-ebpf`'s binary) for the BPF target with the pinned
//! nightly named in `monitor-ebpf/NIGHTLY`; `bpf-linker` must be on PATH (`./x setup` builds
//! one against that nightly's LLVM).
use anyhow::{Context as _, anyhow};
use aya_build::Toolchain;

fn main() -> anyhow::Result<()> {
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let package = metadata
        .packages
        .into_iter()
        .find(|p| p.name.as_str() == "monitor-ebpf")
        .ok_or_else(|| anyhow!("monitor-ebpf package not found"))?;
    let root_dir = package
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent for {}", package.manifest_path))?;
    let nightly_file = root_dir.join("NIGHTLY");
    println!("cargo:rerun-if-changed={nightly_file}");
    let nightly = std::fs::read_to_string(&nightly_file).context("reading monitor-ebpf/NIGHTLY")?;
    let nightly = nightly.trim();
    aya_build::build_ebpf(
        [aya_build::Package {
            name: package.name.as_str(),
            root_dir: root_dir.as_str(),
            ..Default::default()
        }],
        Toolchain::Custom(nightly),
    )
    .context("building the eBPF programs (is bpf-linker on PATH? run ./x setup)")
}
