//! `./x bench --only tokio`: leakmon's cost to tokio programs and its own cost walking their
//! task lists, side by side with and without it in one run.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{
    Workspace,
    demo::{start_reading as start, stop},
    measure::{RUNS, report, report_usage, wait_for, wait_for_counting, wrk},
    setup::output,
};

/// Builds a tokio fixture (tokio-tasks with the newest lock file, or tokio-http), offline.
pub(crate) fn build(ws: &Workspace, name: &str) -> Result<PathBuf> {
    let src = ws.root.join("fixtures/native").join(name);
    let lock = if name == "tokio-tasks" {
        let mut locks: Vec<PathBuf> = std::fs::read_dir(src.join("locks"))?
            .filter_map(|e| Some(e.ok()?.path()))
            .collect();
        locks.sort_by_key(|p| {
            p.file_stem()
                .and_then(|s| s.to_str())
                .and_then(|s| s.strip_prefix("tokio-1."))
                .and_then(|m| m.parse::<u32>().ok())
                .unwrap_or(0)
        });
        locks.pop().context("no tokio lock file")?
    } else {
        src.join("Cargo.lock")
    };
    let dir = ws.root.join("target/fixtures/tokio").join(name);
    std::fs::create_dir_all(dir.join("src"))?;
    std::fs::copy(src.join("Cargo.toml"), dir.join("Cargo.toml"))?;
    std::fs::copy(src.join("src/main.rs"), dir.join("src/main.rs"))?;
    if src.join("src/lib.rs").exists() {
        std::fs::copy(src.join("src/lib.rs"), dir.join("src/lib.rs"))?;
    }
    std::fs::copy(&lock, dir.join("Cargo.lock"))?;
    output(
        Command::new("cargo")
            .args([
                "build",
                "--bins",
                "--release",
                "--offline",
                "--locked",
                "--manifest-path",
            ])
            .arg(dir.join("Cargo.toml"))
            .arg("--target-dir")
            .arg(dir.join("target"))
            .env_remove("CARGO_TARGET_DIR"),
    )?;
    Ok(dir.join("target/release").join(name))
}

/// As [`watch`], counting the on-demand sampling windows leakmon opens (its debug log).
fn watch_counting_windows(
    leakmon: &Path,
    pid: u32,
    extra: &[&str],
) -> Result<(Child, std::sync::Arc<std::sync::atomic::AtomicUsize>)> {
    let mut child = Command::new(leakmon)
        .args(["watch", "--pid", &pid.to_string(), "--format", "json"])
        .args(extra)
        .env("LEAKMON_LOG", "info,leakmon::tokio::polls=debug")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting leakmon")?;
    let opened = wait_for_counting(
        &mut child,
        "tokio runtime",
        Some("sampling threads on a CPU"),
    )?;
    Ok((child, opened))
}

fn watch(leakmon: &Path, pid: u32, extra: &[&str]) -> Result<Child> {
    let mut child = Command::new(leakmon)
        .args(["watch", "--pid", &pid.to_string(), "--format", "json"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting leakmon")?;
    wait_for(&mut child, "tokio runtime")?;
    Ok(child)
}

pub fn run(ws: &Workspace, leakmon: &Path, seconds: u64) -> Result<()> {
    let http = build(ws, "tokio-http")?;
    let tasks = build(ws, "tokio-tasks")?;
    // Every scan walks every task: 1 s scans are the stressed case (production: 15 s).
    let scans = ["--scan-interval", "1s"];

    println!(
        "\n## tokio (hyper) HTTP server under wrk (2 threads, 32 connections, {seconds}s), \
         leakmon scanning every 1 s; median of {RUNS}"
    );
    let (mut bare, mut watched) = (Vec::new(), Vec::new());
    let mut windows = Vec::new();
    for _ in 0..RUNS {
        for with in [false, true] {
            let (mut server, _, line) = start(&http, &[])?;
            let port = line
                .strip_prefix("listening ")
                .context("tokio-http did not say its port")?;
            let mut lm = with
                .then(|| watch_counting_windows(leakmon, server.id(), &scans))
                .transpose()?;
            let out = wrk(&format!("127.0.0.1:{port}"), seconds);
            if let Some((lm, opened)) = lm.as_mut() {
                stop(lm);
                windows.push(opened.load(std::sync::atomic::Ordering::Relaxed));
            }
            stop(&mut server);
            if with { &mut watched } else { &mut bare }.push(out?);
        }
    }
    let rps = |v: &[(f64, f64)]| v.iter().map(|x| x.0).collect::<Vec<_>>();
    let lat = |v: &[(f64, f64)]| v.iter().map(|x| x.1).collect::<Vec<_>>();
    report("requests/s", &rps(&bare), &rps(&watched), true);
    report("mean latency (us)", &lat(&bare), &lat(&watched), false);
    println!(
        "| on-demand sampling windows opened (threads sampled for a poll that may compute), \
         per run | {windows:?} | | |"
    );

    println!(
        "\n## tokio spawn/yield churn (64 tasks at a time, 10 yields each, {seconds}s), \
         leakmon scanning every 1 s; tasks/s, median of {RUNS}"
    );
    let (mut bare, mut watched) = (Vec::new(), Vec::new());
    for _ in 0..RUNS {
        for with in [false, true] {
            let secs = seconds.to_string();
            let (mut fx, mut out, _) = start(&tasks, &["churn", "--seconds", &secs])?;
            let mut lm = with.then(|| watch(leakmon, fx.id(), &scans)).transpose()?;
            let mut line = String::new();
            out.read_line(&mut line)?;
            let rate: f64 = line
                .trim()
                .strip_prefix("churn_tasks_per_sec ")
                .and_then(|v| v.parse().ok())
                .with_context(|| format!("churn printed {line:?}"))?;
            if let Some(lm) = lm.as_mut() {
                stop(lm);
            }
            stop(&mut fx);
            if with { &mut watched } else { &mut bare }.push(rate);
        }
    }
    report("tasks/s", &bare, &watched, true);

    println!(
        "\n## A poll computing for {seconds}s (current-thread runtime), leakmon scanning every \
         1 s: a sampling window at every scan; the computation's rounds/s, median of {RUNS}"
    );
    let (mut bare, mut watched) = (Vec::new(), Vec::new());
    let mut windows = Vec::new();
    for _ in 0..RUNS {
        for with in [false, true] {
            let (mut fx, mut out, _) =
                start(&tasks, &["compute", "--flavor", "current", "--report"])?;
            let mut lm = with
                .then(|| watch_counting_windows(leakmon, fx.id(), &scans))
                .transpose()?;
            std::thread::sleep(Duration::from_secs(seconds));
            let stdin = fx.stdin.as_mut().context("fixture stdin")?;
            stdin.write_all(b"release\n")?;
            stdin.flush()?;
            let mut line = String::new();
            while !line.starts_with("crunch_rounds_per_sec ") {
                line.clear();
                if out.read_line(&mut line)? == 0 {
                    bail!("tokio-tasks compute ended without its rate");
                }
            }
            let rate: f64 = line
                .trim()
                .strip_prefix("crunch_rounds_per_sec ")
                .and_then(|v| v.parse().ok())
                .with_context(|| format!("compute printed {line:?}"))?;
            if let Some((lm, opened)) = lm.as_mut() {
                stop(lm);
                windows.push(opened.load(std::sync::atomic::Ordering::Relaxed));
            }
            stop(&mut fx);
            if with { &mut watched } else { &mut bare }.push(rate);
        }
    }
    report("rounds/s", &bare, &watched, true);
    println!("| sampling windows opened per run | {windows:?} | | |");

    let n = 100_000;
    println!("\n## Daemon footprint walking {n} live tasks (idle on a Notify), 1 s scans");
    let (mut fx, _, _) = start(&tasks, &["many", "--tasks", &n.to_string()])?;
    let mut lm = Command::new(leakmon)
        .args(["--log", "debug", "watch", "--pid", &fx.id().to_string()])
        .args(["--block-threshold", "2s", "--format", "json"])
        .args(scans)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let stderr = lm.stderr.take().context("leakmon stderr")?;
    let lines = std::thread::spawn(move || {
        BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .filter(|l| l.contains("scan:") || l.contains("runtime found"))
            .collect::<Vec<_>>()
    });
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(20));
    report_usage(lm.id(), started)?;
    stop(&mut lm);
    stop(&mut fx);
    let lines = lines.join().unwrap_or_default();
    for line in lines.iter().take(5) {
        println!("| log |{} |", line.split("] ").nth(1).unwrap_or(line));
    }

    println!(
        "\n## Time from a blocking poll to its alert (std::thread::sleep in a poll, starting at \
         a random point between scans; {RUNS} runs)"
    );
    for (what, extra) in [
        (
            "production defaults (15 s scans, 500 ms poll threshold)",
            &[][..],
        ),
        ("1 s scans", &scans[..]),
    ] {
        let mut took = Vec::new();
        for i in 0..RUNS {
            // The fixture blocks `delay` seconds after it starts, leakmon being attached by
            // then: spread over a scan interval.
            let delay = format!("{:.1}", 3.0 + 15.0 * i as f64 / RUNS as f64);
            let (mut fx, mut out, _) = start(&tasks, &["block-sleep", "--delay", &delay])?;
            // When the fixture says "blocking", timed as it says it.
            let said = std::thread::spawn(move || {
                let mut line = String::new();
                out.read_line(&mut line).ok()?;
                (line.trim() == "blocking").then(Instant::now)
            });
            let mut lm = watch(leakmon, fx.id(), extra)?;
            let stdout = lm.stdout.take().context("leakmon stdout")?;
            let found = BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
                .find(|l| l.contains("\"task_blocking\""));
            let alerted = Instant::now();
            let begun = said
                .join()
                .ok()
                .flatten()
                .context("block-sleep did not say \"blocking\"")?;
            took.push(alerted.duration_since(begun).as_secs_f64());
            stop(&mut lm);
            stop(&mut fx);
            if found.is_none() {
                bail!("no task_blocking alert ({what})");
            }
        }
        let max = took.iter().copied().fold(0.0, f64::max);
        println!(
            "| {what} | median {:.1} s, max {max:.1} s | runs {took:.1?} |",
            crate::measure::median(&took)
        );
    }
    Ok(())
}
