//! `./x bench`: leakmon's overhead on Go workloads, with and without it, side by side.

use anyhow::Result;

use crate::Workspace;

pub fn run(_ws: &Workspace, _roundtrips: u64, _http_seconds: u64, _goroutines: u64) -> Result<()> {
    anyhow::bail!("not yet")
}
