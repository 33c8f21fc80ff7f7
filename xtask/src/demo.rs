//! `./x demo`: the bundled leaky demo service (an "order service" that abandons a goroutine per
//! slow request) watched by `leakmon watch`, alerts printed as they fire.

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, ChildStdout, Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

use crate::{Workspace, require_root, setup};

pub fn run(ws: &Workspace, seconds: u64) -> Result<()> {
    let tools = setup::all(ws)?;
    require_root("leakmon loads eBPF programs")?;
    ws.build(&tools, true)?;
    let newest = setup::GO_FIXTURE_VERSIONS[setup::GO_FIXTURE_VERSIONS.len() - 1];
    let leaky = build_fixture(ws, &tools, newest, "leaky", false)?;
    let mut service = start_fixture(&leaky, &["-mode", "demo"])?;
    let pid = service.id().to_string();
    eprintln!(
        "xtask: demo service PID {pid} leaks one goroutine per slow request; leakmon watches it \
         for {seconds}s with demo thresholds (production defaults are minutes)"
    );
    let mut leakmon = Command::new(ws.binary(true))
        .args(["watch", "--pid", &pid])
        .args([
            "--block-threshold",
            "2s",
            "--leak-window",
            "6s",
            "--scan-interval",
            "1s",
        ])
        .spawn()
        .context("starting leakmon")?;
    std::thread::sleep(Duration::from_secs(seconds));
    stop(&mut leakmon);
    stop(&mut service);
    Ok(())
}

/// Builds `fixtures/go/<name>` with Go `version` into target/fixtures.
pub fn build_fixture(
    ws: &Workspace,
    tools: &setup::Tools,
    version: &str,
    name: &str,
    stripped: bool,
) -> Result<PathBuf> {
    let suffix = if stripped { "-stripped" } else { "" };
    let out = ws
        .root
        .join("target/fixtures")
        .join(format!("go{version}{suffix}"))
        .join(name);
    let mut cmd = Command::new(tools.go(version));
    cmd.current_dir(ws.root.join("fixtures/go"))
        .args(["build", "-o"])
        .arg(&out)
        .env("GOTOOLCHAIN", "local")
        .env("GOFLAGS", "-mod=mod")
        .env("GOCACHE", tools.dir.join(format!("gocache/{version}")));
    if stripped {
        cmd.arg("-ldflags=-s -w");
    }
    cmd.arg(format!("./{name}"));
    crate::run(&mut cmd)?;
    Ok(out)
}

/// Starts a fixture with stdin and stdout piped; returns its stdout and its first line.
pub fn start_reading(bin: &Path, args: &[&str]) -> Result<(Child, BufReader<ChildStdout>, String)> {
    let mut child = Command::new(bin)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let mut stdout = BufReader::new(child.stdout.take().context("fixture stdout")?);
    let mut line = String::new();
    stdout.read_line(&mut line)?;
    Ok((child, stdout, line.trim().to_owned()))
}

/// Starts a fixture and waits for its `ready` line.
pub fn start_fixture(bin: &Path, args: &[&str]) -> Result<Child> {
    let (mut child, stdout, line) = start_reading(bin, args)?;
    if line != "ready" {
        stop(&mut child);
        bail!("{} did not say ready (said {line:?})", bin.display());
    }
    // Keep reading: a Go program writing to a closed pipe dies of SIGPIPE.
    std::thread::spawn(move || stdout.lines().for_each(drop));
    Ok(child)
}

/// SIGINT, then reap (the fixtures and leakmon exit cleanly on it).
pub fn stop(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    let _ = child.wait();
}
