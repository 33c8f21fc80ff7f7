//! `./x bench --only dump`: what looking costs the program looked at. The Go HTTP server under
//! wrk, with goroutines leaked once at start: its latency alone, while `leakmon dump` runs in a
//! loop (which reads memory and stops nothing), and while its own `/debug/pprof/goroutine` is
//! fetched in a loop (which stops the world while it records every stack).

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    path::Path,
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

use crate::{
    demo::{start_fixture, stop},
    measure::{Wrk, wrk_latency},
};

/// Goroutines the server leaks at start: what a dump and a profile have to read.
const LEAKED: &str = "100000";

pub(crate) fn run(http: &Path, leakmon: &Path, seconds: u64) -> Result<()> {
    println!(
        "\n## A Go HTTP server with {LEAKED} leaked goroutines under wrk (2 threads, 32 \
         connections, {seconds}s), looked at in a loop"
    );
    println!("\n| looked at by | requests/s | mean | p99 | worst | looks (mean time) |");
    println!("|---|---:|---:|---:|---:|---:|");
    for who in [Look::Nobody, Look::Leakmon, Look::Pprof] {
        let port = 18_300 + who as u16;
        let addr = format!("127.0.0.1:{port}");
        let mut server = start_fixture(http, &["-addr", &addr, "-pprof", "-leak", LEAKED])?;
        // The leak is set up before "ready"; let the first GCs settle.
        std::thread::sleep(Duration::from_secs(2));
        let stop_flag = Arc::new(AtomicBool::new(false));
        let looker = {
            let (stop_flag, leakmon, addr) =
                (Arc::clone(&stop_flag), leakmon.to_path_buf(), addr.clone());
            let pid = server.id();
            std::thread::spawn(move || -> (u32, Duration) {
                let (mut n, started) = (0u32, Instant::now());
                while !stop_flag.load(Ordering::SeqCst) {
                    let ok = match who {
                        Look::Nobody => {
                            std::thread::sleep(Duration::from_millis(100));
                            continue;
                        }
                        Look::Leakmon => Command::new(&leakmon)
                            .args(["dump", "--local", "--format", "pprof", "-o", "/dev/null"])
                            .args(["--pid", &pid.to_string(), "--log", "error"])
                            .stdout(Stdio::null())
                            .status()
                            .is_ok_and(|s| s.success()),
                        Look::Pprof => own_profile(&addr).is_ok(),
                    };
                    if ok {
                        n += 1;
                    }
                }
                (n, started.elapsed())
            })
        };
        let measured = wrk_latency(&addr, seconds);
        stop_flag.store(true, Ordering::SeqCst);
        let (looks, took) = looker.join().unwrap_or_default();
        stop(&mut server);
        let Wrk {
            rps,
            mean_us,
            p99_us,
            max_us,
        } = measured?;
        let per_look = if looks > 0 {
            format!("{looks} ({:.2} s)", took.as_secs_f64() / f64::from(looks))
        } else {
            "-".to_owned()
        };
        println!(
            "| {} | {rps:.0} | {:.2} ms | {:.2} ms | {:.1} ms | {per_look} |",
            who.name(),
            mean_us / 1e3,
            p99_us / 1e3,
            max_us / 1e3
        );
    }
    Ok(())
}

#[derive(Clone, Copy)]
enum Look {
    Nobody,
    Leakmon,
    Pprof,
}

impl Look {
    fn name(self) -> &'static str {
        match self {
            Look::Nobody => "nobody",
            Look::Leakmon => "`leakmon dump --format pprof`",
            Look::Pprof => "its own `/debug/pprof/goroutine`",
        }
    }
}

/// The program's own goroutine profile, read and thrown away.
fn own_profile(addr: &str) -> Result<()> {
    let mut s = TcpStream::connect(addr).context("connecting")?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.write_all(b"GET /debug/pprof/goroutine HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut body = Vec::new();
    s.read_to_end(&mut body)?;
    Ok(())
}
