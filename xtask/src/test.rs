//! `./x test`: lint, unit tests, and the integration tests that load eBPF into the kernel and
//! watch real Go programs. Those need root: without it this fails (it never skips).

use anyhow::{Result, bail};

use crate::{Workspace, run, setup};

pub fn run_all(ws: &Workspace, args: &[String]) -> Result<()> {
    let tools = setup::all(ws)?;
    require_root("the integration tests load eBPF programs")?;
    ws.lint(&tools)?;
    let mut cmd = ws.cargo(&tools);
    cmd.args(["test", "--workspace"])
        .env("LEAKMON_TOOLS", &tools.dir)
        // Every listed toolchain must be there: a missing one is a failure, not a skip.
        .env("LEAKMON_GO_VERSIONS", setup::GO_VERSIONS.join(","))
        .env(
            "LEAKMON_GO_FIXTURE_VERSIONS",
            setup::GO_FIXTURE_VERSIONS.join(","),
        )
        .args(args);
    run(&mut cmd)
}

pub fn require_root(why: &str) -> Result<()> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().nth(1))
        .unwrap_or("?");
    if uid != "0" {
        bail!("{why}: run as root (e.g. `sudo ./x test`); effective uid is {uid}");
    }
    Ok(())
}
