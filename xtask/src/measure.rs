//! Measuring a program with and without leakmon: medians of runs, wrk's figures, a process's
//! CPU and memory from /proc, and waiting for leakmon's log to say it is ready.

use std::{
    io::{BufRead as _, BufReader},
    process::{Child, Command},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

use crate::setup::output;

/// Runs of each variant; the median is reported.
pub(crate) const RUNS: usize = 5;

/// Reads `child`'s stderr until a line contains `needle`, then keeps draining it.
pub(crate) fn wait_for(child: &mut Child, needle: &str) -> Result<()> {
    wait_for_counting(child, needle, None).map(drop)
}

/// As [`wait_for`], and counts the later lines of stderr that contain `count`.
pub(crate) fn wait_for_counting(
    child: &mut Child,
    needle: &str,
    count: Option<&'static str>,
) -> Result<Arc<AtomicUsize>> {
    let stderr = child.stderr.take().context("leakmon stderr")?;
    let mut lines = BufReader::new(stderr).lines();
    loop {
        match lines.next() {
            Some(Ok(line)) if line.contains(needle) => break,
            Some(Ok(_)) => {}
            _ => bail!("leakmon exited before logging {needle:?}"),
        }
    }
    let counted = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&counted);
    // Keep draining stderr so leakmon never blocks on a full pipe.
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            if count.is_some_and(|c| line.contains(c)) {
                counter.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    Ok(counted)
}

fn parse_wrk_duration_us(s: &str) -> Option<f64> {
    let (num, unit) = s.split_at(s.find(|c: char| c.is_ascii_alphabetic())?);
    let v: f64 = num.parse().ok()?;
    Some(match unit {
        "us" => v,
        "ms" => v * 1e3,
        "s" => v * 1e6,
        _ => return None,
    })
}

pub(crate) fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub(crate) fn report(what: &str, bare: &[f64], watched: &[f64], higher_is_better: bool) {
    let (b, w) = (median(bare), median(watched));
    let change = (w - b) / b * 100.0;
    let cost = if higher_is_better { -change } else { change };
    println!("| {what} | without leakmon {b:.1} | with leakmon {w:.1} | cost {cost:+.1}% |");
    println!("|  runs | {bare:.1?} | {watched:.1?} | |");
}

/// Prints leakmon's CPU since `started` and its memory, now and at its peak.
pub(crate) fn report_usage(pid: u32, started: Instant) -> Result<()> {
    let (cpu, rss, hwm) = proc_usage(pid)?;
    let wall = started.elapsed().as_secs_f64();
    println!(
        "| leakmon CPU over {wall:.0}s | {:.1}% of one core ({cpu:.2}s) |",
        cpu / wall * 100.0
    );
    println!("| leakmon RSS | {rss} KiB now, {hwm} KiB peak |");
    Ok(())
}

/// (CPU seconds, VmRSS KiB, VmHWM KiB) of `pid`.
pub(crate) fn proc_usage(pid: u32) -> Result<(f64, u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    let ticks: f64 = fields
        .get(11)
        .zip(fields.get(12))
        .and_then(|(u, s)| Some(u.parse::<f64>().ok()? + s.parse::<f64>().ok()?))
        .context("parsing /proc/PID/stat")?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    // USER_HZ is 100 on Linux.
    Ok((ticks / 100.0, kib("VmRSS:"), kib("VmHWM:")))
}

/// (requests/s, mean latency in microseconds) of wrk against `addr` for `seconds`.
/// What wrk measured: requests per second, and latency in microseconds (mean, 99th
/// percentile, worst).
pub(crate) struct Wrk {
    pub rps: f64,
    pub mean_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
}

/// wrk with 2 threads and 32 connections on `addr` for `seconds`.
pub(crate) fn wrk_latency(addr: &str, seconds: u64) -> Result<Wrk> {
    let out = output(
        Command::new("wrk")
            .args(["-t2", "-c32", "--latency"])
            .arg(format!("-d{seconds}s"))
            .arg(format!("http://{addr}/")),
    )?;
    let field = |prefix: &str, column: usize| {
        out.lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .and_then(|v| v.split_whitespace().nth(column))
            .and_then(parse_wrk_duration_us)
    };
    Ok(Wrk {
        rps: out
            .lines()
            .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
            .and_then(|v| v.trim().parse().ok())
            .context("wrk printed no Requests/sec")?,
        mean_us: field("Latency", 0).context("wrk printed no latency")?,
        max_us: field("Latency", 2).context("wrk printed no worst latency")?,
        p99_us: field("99%", 0).context("wrk printed no 99th percentile")?,
    })
}

/// wrk's requests per second and mean latency (microseconds).
pub(crate) fn wrk(addr: &str, seconds: u64) -> Result<(f64, f64)> {
    wrk_latency(addr, seconds).map(|w| (w.rps, w.mean_us))
}
