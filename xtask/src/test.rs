//! `./x test`: lint, unit tests, and the integration tests that load eBPF into the kernel and
//! watch real Go programs. Those need root: without it this fails (it never skips).

use std::{
    io::{BufRead as _, BufReader},
    process::Stdio,
};

use anyhow::{Context as _, Result, bail};

use crate::{Workspace, require_root, setup};

pub fn run_all(ws: &Workspace, args: &[String]) -> Result<()> {
    let tools = setup::all(ws)?;
    require_root("the integration tests load eBPF programs")?;
    // `leakmon top` is driven in a real terminal.
    setup::debian_tool("tmux", "-V", "tmux")?;
    // Debug files are split off fixtures as distributions do.
    setup::debian_tool("objcopy", "--version", "binutils")?;
    ws.lint(&tools)?;
    let mut cmd = ws.cargo(&tools);
    cmd.args(["test", "--workspace", "--no-fail-fast"])
        .env("LEAKMON_TOOLS", &tools.dir)
        .env("LEAKMON_ROTEL", tools.rotel())
        // Every listed toolchain must be there: a missing one is a failure, not a skip.
        .env("LEAKMON_GO_VERSIONS", setup::GO_VERSIONS.join(","))
        .env(
            "LEAKMON_GO_FIXTURE_VERSIONS",
            setup::GO_FIXTURE_VERSIONS.join(","),
        )
        .args(args)
        .stdout(Stdio::piped());
    let mut child = cmd.spawn().context("running cargo test")?;
    let stdout = child.stdout.take().context("cargo test stdout")?;
    let (mut passed, mut failed) = (0u64, 0u64);
    for line in BufReader::new(stdout).lines().map_while(Result::ok) {
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            passed += count_before(rest, " passed");
            failed += count_before(rest, " failed");
        }
    }
    let status = child.wait()?;
    // The fuzz targets, a fixed time each; each counts as one test.
    let fuzzed = if status.success() && failed == 0 {
        crate::fuzz::run_all(ws, &tools, FUZZ_SECONDS, false)
    } else {
        Ok(())
    };
    // The deployment suites (the container as the DaemonSet runs it, the unit under
    // systemd), within a fixed time; each counts as one test.
    if status.success() && failed == 0 {
        match deploy_within(DEPLOY_BUDGET) {
            Ok(()) => passed += 2,
            Err(e) => {
                eprintln!("xtask: {e:#}");
                failed += 1;
            }
        }
    }
    match &fuzzed {
        Ok(()) if status.success() => passed += crate::fuzz::TARGETS.len() as u64,
        Ok(()) => {}
        Err(e) => {
            eprintln!("xtask: {e:#}");
            failed += 1;
        }
    }
    // One plain total for whoever reads the last line (each test binary prints its own).
    println!("tests: {passed} passed, {failed} failed");
    if !status.success() || failed > 0 {
        bail!("cargo test or fuzzing failed: {status}");
    }
    if passed == 0 {
        bail!("no test ran");
    }
    Ok(())
}

/// Seconds each fuzz target runs in `./x test` (`./x fuzz` runs longer).
const FUZZ_SECONDS: u64 = 30;

/// What `./x deploy` may take in `./x test` (about 8 minutes here, plus the first-run setup:
/// Debian packages, two debootstrap roots, helm).
const DEPLOY_BUDGET: std::time::Duration = std::time::Duration::from_secs(20 * 60);

/// Runs `xtask deploy` as a child, killed past `budget`.
fn deploy_within(budget: std::time::Duration) -> Result<()> {
    let exe = std::env::current_exe().context("xtask's own path")?;
    let mut child = std::process::Command::new(exe)
        .arg("deploy")
        .spawn()
        .context("running xtask deploy")?;
    let started = std::time::Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            if !status.success() {
                bail!("./x deploy failed: {status}");
            }
            eprintln!("xtask: deployment suites passed in {:?}", started.elapsed());
            return Ok(());
        }
        if started.elapsed() > budget {
            let _ = child.kill();
            let _ = child.wait();
            bail!("./x deploy took more than its {budget:?} budget");
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
}

/// The number just before `word` in "ok. 45 passed; 0 failed; ...".
fn count_before(s: &str, word: &str) -> u64 {
    s.split(';')
        .find_map(|part| part.trim().strip_suffix(word.trim_start()))
        .and_then(|n| n.trim().rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}
