//! `./x bench`: leakmon's cost to the programs it watches and its own footprint, measured with
//! and without it side by side in one run. Figures go to docs/performance.md by hand, with the
//! command that produced them.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{
    Workspace,
    demo::{build_fixture, start_fixture, stop},
    measure::{RUNS, median, proc_usage, report, report_usage, wait_for, wrk},
    require_root,
    setup::{self, output},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Suite {
    /// Go channel ping-pong
    Go,
    /// Go HTTP server under wrk
    Http,
    /// Daemon CPU and memory with many goroutines
    Footprint,
    /// C futex ping-pong and futex system calls (the thread probes)
    Threads,
    /// `leakmon run` at rest, watching 700 processes, and after they are gone
    Host,
    /// The reachability analysis on 100 MB and 1 GB heaps, against Go's goroutineleak profile
    Reach,
    /// tokio: a hyper server under wrk, spawn/yield churn, 100,000 tasks walked, time to a
    /// blocking-poll alert
    Tokio,
    /// A Go HTTP server's latency while `leakmon dump` reads it in a loop, beside its own
    /// goroutine profile endpoint
    Dump,
}

pub fn run(
    ws: &Workspace,
    only: Option<Suite>,
    roundtrips: u64,
    http_seconds: u64,
    goroutines: u64,
) -> Result<()> {
    let wanted = |suite| only.is_none_or(|o| o == suite);
    let tools = setup::all(ws)?;
    require_root("leakmon loads eBPF programs")?;
    if wanted(Suite::Http) || wanted(Suite::Reach) || wanted(Suite::Tokio) || wanted(Suite::Dump) {
        setup::debian_tool("wrk", "--version", "wrk")?;
    }
    ws.build(&tools, true)?;
    let go = setup::GO_FIXTURE_VERSIONS[setup::GO_FIXTURE_VERSIONS.len() - 1];
    let pingpong = build_fixture(ws, &tools, go, "pingpong", false)?;
    let http = build_fixture(ws, &tools, go, "httpserver", false)?;
    let leaky = build_fixture(ws, &tools, go, "leaky", false)?;
    let leakmon = ws.binary(true);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!(
        "# leakmon bench: Go {go}, Linux {}, {} CPUs",
        kernel.trim(),
        cpus()
    );

    if wanted(Suite::Threads) {
        threads(ws, &leakmon)?;
    }
    if wanted(Suite::Host) {
        host(ws, &leakmon, &leaky)?;
    }
    for (extra, what) in [
        (&[][..], "parks found by scanning (default)"),
        (&["--probe-parks"][..], "--probe-parks (gopark probe)"),
    ] {
        if !wanted(Suite::Go) {
            break;
        }
        println!(
            "\n## Go channel ping-pong, {what}, {roundtrips} round trips \
             (ns per round trip, median of {RUNS})"
        );
        let (mut bare, mut watched) = (Vec::new(), Vec::new());
        for _ in 0..RUNS {
            bare.push(pingpong_run(&pingpong, roundtrips, None, extra)?);
            watched.push(pingpong_run(&pingpong, roundtrips, Some(&leakmon), extra)?);
        }
        report("ns/round trip", &bare, &watched, false);
    }

    if wanted(Suite::Http) {
        http_suite(&http, &leakmon, http_seconds)?;
    }
    if wanted(Suite::Reach) {
        reach(&http, &leakmon, http_seconds)?;
    }
    if wanted(Suite::Tokio) {
        crate::bench_tokio::run(ws, &leakmon, http_seconds)?;
    }
    if wanted(Suite::Dump) {
        crate::bench_dump::run(&http, &leakmon, http_seconds)?;
    }
    if wanted(Suite::Footprint) {
        println!(
            "\n## Daemon footprint with {goroutines} live goroutines blocked on channel sends"
        );
        footprint(&leaky, &leakmon, goroutines)?;
    }
    Ok(())
}

/// The thread probes see every futex call and context switch on the host: a C program
/// that does little else, watched by `leakmon run` (all processes).
fn threads(ws: &Workspace, leakmon: &Path) -> Result<()> {
    let dir = ws.root.join("target/fixtures/native");
    std::fs::create_dir_all(&dir)?;
    let bin = dir.join("pingpong");
    output(
        Command::new("gcc")
            .args(["-O2", "-pthread", "-o"])
            .arg(&bin)
            .arg(ws.root.join("fixtures/native/pingpong.c")),
    )
    .context("building fixtures/native/pingpong.c (is gcc installed?)")?;
    // Both threads on one CPU: each round trip is two plain context switches, not two
    // cross-CPU wake-ups (tens of microseconds on a VM, which would drown the probe's cost).
    for (mode, n, what) in [
        (
            "switch",
            "200000",
            "two threads on one CPU handing a futex back and forth (ns per round trip)",
        ),
        (
            "syscall",
            "3000000",
            "futex(FUTEX_WAKE) with no waiter (ns per call)",
        ),
    ] {
        println!("\n## C {what}, `leakmon run` watching every process; median of {RUNS}");
        let (mut bare, mut watched) = (Vec::new(), Vec::new());
        for _ in 0..RUNS {
            bare.push(native_run(&bin, mode, n, None)?);
            watched.push(native_run(&bin, mode, n, Some(leakmon))?);
        }
        report("ns/op", &bare, &watched, false);
    }
    Ok(())
}

fn native_run(bin: &Path, mode: &str, n: &str, leakmon: Option<&Path>) -> Result<f64> {
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", "0"]).arg(bin).args([mode, n]);
    timed_workload(&mut cmd, "pingpong_ns_per_op ", |_| {
        leakmon
            .map(|l| -> Result<Child> {
                let mut child = Command::new(l)
                    .args(["run", "--format", "json"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .spawn()
                    .context("starting leakmon run")?;
                wait_for(&mut child, "tracing the threads of every process")?;
                Ok(child)
            })
            .transpose()
    })
}

/// Runs a benchmark workload that prints "ready", waits for a line on stdin, runs, and prints
/// `<prefix><value>`: `watch` starts leakmon on it (given its PID) once it is ready, and is
/// stopped after it.
fn timed_workload(
    cmd: &mut Command,
    prefix: &str,
    watch: impl FnOnce(u32) -> Result<Option<Child>>,
) -> Result<f64> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    let mut stdout = BufReader::new(child.stdout.take().context("workload stdout")?);
    let mut line = String::new();
    stdout.read_line(&mut line)?;
    if line.trim() != "ready" {
        bail!("{cmd:?} said {line:?}");
    }
    let mut watcher = watch(child.id())?;
    if watcher.is_some() {
        // Let leakmon finish starting up (seeding, first scan) before the clock starts.
        std::thread::sleep(Duration::from_secs(1));
    }
    writeln!(child.stdin.take().context("workload stdin")?)?;
    line.clear();
    stdout.read_line(&mut line)?;
    let _ = child.wait();
    if let Some(w) = watcher.as_mut() {
        stop(w);
    }
    line.trim()
        .strip_prefix(prefix)
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("{cmd:?} printed {line:?}"))
}

fn http_suite(http: &Path, leakmon: &Path, http_seconds: u64) -> Result<()> {
    println!(
        "\n## Go HTTP server under wrk (2 threads, 32 connections, {http_seconds}s; median of {RUNS})"
    );
    let (mut bare, mut watched) = (Vec::new(), Vec::new());
    for i in 0..RUNS {
        bare.push(http_run(http, 18_100 + 2 * i as u16, http_seconds, None)?);
        watched.push(http_run(
            http,
            18_101 + 2 * i as u16,
            http_seconds,
            Some(leakmon),
        )?);
    }
    let rps = |v: &[(f64, f64)]| v.iter().map(|x| x.0).collect::<Vec<_>>();
    let lat = |v: &[(f64, f64)]| v.iter().map(|x| x.1).collect::<Vec<_>>();
    report("requests/s", &rps(&bare), &rps(&watched), true);
    report("mean latency (us)", &lat(&bare), &lat(&watched), false);
    Ok(())
}

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// Starts `leakmon watch` on `pid` and waits until it has attached (goroutine probes, then
/// thread probes).
fn attach(leakmon: &Path, pid: u32, extra: &[&str]) -> Result<Child> {
    let mut child = Command::new(leakmon)
        .args(["watch", "--pid", &pid.to_string(), "--format", "json"])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting leakmon")?;
    wait_for(&mut child, "tracing the threads of")?;
    Ok(child)
}

fn pingpong_run(bin: &Path, n: u64, leakmon: Option<&Path>, extra: &[&str]) -> Result<f64> {
    let mut cmd = Command::new(bin);
    cmd.args(["-n", &n.to_string(), "-wait"]);
    timed_workload(&mut cmd, "pingpong_ns_per_roundtrip ", |pid| {
        leakmon.map(|l| attach(l, pid, extra)).transpose()
    })
}

/// (requests/s, mean latency in microseconds)
fn http_run(bin: &Path, port: u16, seconds: u64, leakmon: Option<&Path>) -> Result<(f64, f64)> {
    let addr = format!("127.0.0.1:{port}");
    let mut server = start_fixture(bin, &["-addr", &addr])?;
    let mut watcher = leakmon.map(|l| attach(l, server.id(), &[])).transpose()?;
    let out = wrk(&addr, seconds);
    if let Some(w) = watcher.as_mut() {
        stop(w);
    }
    stop(&mut server);
    out
}

/// leakmon's CPU and memory while watching a process with `n` blocked goroutines: the first
/// scan resolves every goroutine's sites, later scans only revalidate them.
fn footprint(leaky: &Path, leakmon: &Path, n: u64) -> Result<()> {
    let n_s = n.to_string();
    let mut fx = start_fixture(leaky, &["-mode", "send", "-batch", &n_s, "-interval", "1h"])?;
    let scan = Duration::from_secs(5);
    let mut lm = Command::new(leakmon)
        .args(["--log", "debug", "watch", "--pid", &fx.id().to_string()])
        .args([
            "--block-threshold",
            "2s",
            "--scan-interval",
            "5s",
            "--format",
            "json",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let stderr = lm.stderr.take().context("leakmon stderr")?;
    let scans = std::thread::spawn(move || {
        BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .filter(|l| l.contains("scan:"))
            .collect::<Vec<_>>()
    });
    let started = Instant::now();
    let run_for = scan * 9;
    std::thread::sleep(run_for);
    report_usage(lm.id(), started)?;
    stop(&mut lm);
    stop(&mut fx);
    let scans = scans.join().unwrap_or_default();
    for line in scans.iter().take(4) {
        if let Some(s) = line.split("scan:").nth(1) {
            println!("| scan |{s} |");
        }
    }
    Ok(())
}

/// `leakmon run` with production settings (15 s scans, 5 min thresholds) on this host: at
/// rest, then while 700 more processes run (600 sleepers, 80 C thread pools, 20 Go services
/// with goroutines stuck on a mutex), then after they are gone.
fn host(ws: &Workspace, leakmon: &Path, leaky: &Path) -> Result<()> {
    let dir = ws.root.join("target/fixtures/native");
    std::fs::create_dir_all(&dir)?;
    let threads = dir.join("threads");
    output(
        Command::new("gcc")
            .args(["-g", "-O1", "-pthread", "-o"])
            .arg(&threads)
            .arg(ws.root.join("fixtures/native/threads.c")),
    )
    .context("building fixtures/native/threads.c (is gcc installed?)")?;
    let mut lm = Command::new(leakmon)
        .arg("run")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    println!("\n## `leakmon run` on this host, production settings (15 s scans)");
    println!("| phase | CPU | RSS (allocated) |");
    let phase = |what: &str, secs: u64, lm: &Child| -> Result<()> {
        let (cpu0, _, _) = proc_usage(lm.id())?;
        std::thread::sleep(Duration::from_secs(secs));
        let (cpu1, rss, hwm) = proc_usage(lm.id())?;
        let anon = anon_kib(lm.id());
        println!(
            "| {what}, {secs} s | {:.2} s ({:.2}% of one core) | {rss} KiB ({anon} KiB), peak {hwm} KiB |",
            cpu1 - cpu0,
            (cpu1 - cpu0) / secs as f64 * 100.0
        );
        Ok(())
    };
    phase("at rest", 60, &lm)?;
    let mut procs = Vec::new();
    for _ in 0..600 {
        procs.push(Command::new("sleep").arg("3600").spawn()?);
    }
    for _ in 0..80 {
        procs.push(
            Command::new(&threads)
                .arg("pool")
                .stdout(Stdio::null())
                .spawn()?,
        );
    }
    for _ in 0..20 {
        procs.push(
            Command::new(leaky)
                .args(["-mode", "mutex"])
                .stdout(Stdio::null())
                .spawn()?,
        );
    }
    phase("700 more processes", 120, &lm)?;
    for p in &mut procs {
        let _ = p.kill();
        let _ = p.wait();
    }
    phase("after they are gone", 90, &lm)?;
    stop(&mut lm);
    Ok(())
}

fn anon_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("RssAnon:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// The reachability analysis on a Go HTTP server with a pointer-rich heap of 100 MB and 1 GB and
/// three goroutines leaked once (so analyses keep running): the cost of one analysis (time,
/// bytes read, from leakmon's log), the daemon's CPU, and the server's throughput under wrk
/// bare, watched, and while Go 1.27's own `goroutineleak` profile is fetched every second.
fn reach(http: &Path, leakmon: &Path, seconds: u64) -> Result<()> {
    for heap_mb in [100u32, 1000] {
        // Long enough for analyses of the larger heap to complete under load.
        let seconds = seconds * u64::from(heap_mb / 300 + 1);
        println!(
            "\n## Reachability analysis, {heap_mb} MB heap (httpserver -heap {heap_mb} -leak 3 \
             -workers 8; wrk 2 threads, 32 connections, {seconds}s each)"
        );
        let port = 18_400 + (heap_mb / 100) as u16;
        let addr = format!("127.0.0.1:{port}");
        let heap = heap_mb.to_string();
        let mut server = start_fixture(
            http,
            &[
                "-addr", &addr, "-heap", &heap, "-leak", "3", "-workers", "8", "-pprof",
            ],
        )?;
        let pid = server.id();
        let result = (|| -> Result<()> {
            let bare = wrk(&addr, seconds)?;
            // Watched, with the defaults but a 2 s block threshold (so the leaked goroutines
            // are candidates at once); the first analysis is awaited before measuring.
            let mut watcher = Command::new(leakmon)
                .args([
                    "watch",
                    "--pid",
                    &pid.to_string(),
                    "--block-threshold",
                    "2s",
                ])
                .args(["--format", "json", "--threads", "false"])
                .env("LEAKMON_LOG", "debug")
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .context("starting leakmon")?;
            let stderr = BufReader::new(watcher.stderr.take().context("leakmon stderr")?);
            let (tx, rx) = std::sync::mpsc::channel::<String>();
            std::thread::spawn(move || {
                for line in stderr.lines().map_while(Result::ok) {
                    if line.contains("reachability analysis") && tx.send(line).is_err() {
                        break;
                    }
                }
            });
            let first = rx
                .recv_timeout(Duration::from_secs(300))
                .context("leakmon ran no reachability analysis within 5 minutes")?;
            if let Some((ms, mib)) = parse_analysis(&first) {
                println!("first analysis, before the load: {ms:.0} ms, {mib:.0} MiB read");
            }
            let (cpu0, _, _) = proc_usage(watcher.id())?;
            let watched = wrk(&addr, seconds)?;
            let (cpu1, rss, hwm) = proc_usage(watcher.id())?;
            stop(&mut watcher);
            let analyses: Vec<(f64, f64)> =
                rx.try_iter().filter_map(|l| parse_analysis(&l)).collect();
            // Go's own profile, fetched every second while under load.
            let stop_fetch = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let fetcher = {
                let (stop_fetch, addr) = (std::sync::Arc::clone(&stop_fetch), addr.clone());
                std::thread::spawn(move || {
                    let mut times = Vec::new();
                    while !stop_fetch.load(std::sync::atomic::Ordering::Relaxed) {
                        let started = Instant::now();
                        if get(&addr, "/debug/pprof/goroutineleak?debug=1")
                            .is_ok_and(|b| b.contains("goroutineleak profile: total 3"))
                        {
                            times.push(started.elapsed().as_secs_f64() * 1e3);
                        }
                        std::thread::sleep(Duration::from_secs(1));
                    }
                    times
                })
            };
            let profiled = wrk(&addr, seconds)?;
            stop_fetch.store(true, std::sync::atomic::Ordering::Relaxed);
            let profile_ms = fetcher.join().unwrap_or_default();
            println!("| | requests/s | mean latency (us) |");
            println!("|---|---|---|");
            println!("| bare | {:.0} | {:.0} |", bare.0, bare.1);
            println!(
                "| leakmon analysing | {:.0} | {:.0} |",
                watched.0, watched.1
            );
            println!(
                "| goroutineleak profile every 1 s | {:.0} | {:.0} |",
                profiled.0, profiled.1
            );
            let times: Vec<f64> = analyses.iter().map(|a| a.0).collect();
            let mib: Vec<f64> = analyses.iter().map(|a| a.1).collect();
            println!(
                "\nleakmon: {} analyses during the {seconds}s run, median {:.0} ms and {:.0} MiB \
                 read each; daemon CPU {:.2} s over the run ({:.0}% of one core); RSS {} MiB, \
                 peak {} MiB",
                analyses.len(),
                median(&times),
                median(&mib),
                cpu1 - cpu0,
                (cpu1 - cpu0) * 100.0 / seconds as f64,
                rss >> 10,
                hwm >> 10
            );
            println!(
                "goroutineleak profile (Go 1.27, in the program, with a GC cycle): {} fetches, \
                 median {:.0} ms each",
                profile_ms.len(),
                median(&profile_ms)
            );
            Ok(())
        })();
        stop(&mut server);
        result?;
    }
    Ok(())
}

/// (milliseconds, MiB read) from leakmon's "reachability analysis: ... N KiB read in D" line.
fn parse_analysis(line: &str) -> Option<(f64, f64)> {
    let (head, took) = line.rsplit_once(" read in ")?;
    let kib: f64 = head
        .rsplit_once(", ")?
        .1
        .strip_suffix(" KiB")?
        .parse()
        .ok()?;
    let took = took.trim();
    let ms = if let Some(v) = took.strip_suffix("ms") {
        v.parse::<f64>().ok()?
    } else if let Some(v) = took.strip_suffix("µs") {
        v.parse::<f64>().ok()? / 1e3
    } else {
        took.strip_suffix('s')?.parse::<f64>().ok()? * 1e3
    };
    Some((ms, kib / 1024.0))
}

/// The body of an HTTP/1.1 GET (one connection per request).
fn get(addr: &str, path: &str) -> Result<String> {
    use std::io::Read as _;
    let mut s = std::net::TcpStream::connect(addr)?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    Ok(body)
}
