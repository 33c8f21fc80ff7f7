//! leakmon's developer driver: `cargo xtask <setup|build|lint|test|demo|bench>`, reached
//! through `./x`, which first installs the Rust toolchains (rustup does not auto-install here).

#![allow(
    clippy::print_stderr,
    clippy::print_stdout,
    reason = "a developer tool: progress on stderr is its interface"
)]

mod bench;
mod bench_dump;
mod bench_tokio;
mod demo;
mod deploy;
mod fuzz;
mod measure;
mod setup;
mod test;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what building and testing need (idempotent): bpf-linker, Go toolchains
    Setup,
    /// Build leakmon (kernel programs included)
    Build {
        #[arg(long)]
        release: bool,
    },
    /// cargo fmt --check and cargo clippy -D warnings
    Lint,
    /// Lint, unit tests and the integration tests that load eBPF against real Go programs
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter)
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Fuzz the parsers of untrusted input (fuzz/) with libFuzzer, each target for a while
    Fuzz {
        /// Seconds per target
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
    /// Run the bundled leaky demo service under `leakmon watch` and print its alerts
    Demo {
        /// How long to watch, in seconds
        #[arg(long, default_value_t = 25)]
        seconds: u64,
    },
    /// Run the container image (as the DaemonSet runs it) and the systemd unit (under
    /// systemd) for real, with least-privilege trials (docs/deploy.md)
    Deploy {
        /// Run one part only
        #[arg(long, value_enum)]
        only: Option<deploy::Part>,
    },
    /// Measure leakmon's overhead on Go and native workloads (see docs/performance.md)
    Bench {
        /// Run one suite only
        #[arg(long, value_enum)]
        only: Option<bench::Suite>,
        /// Ping-pong round trips per run
        #[arg(long, default_value_t = 1_000_000)]
        roundtrips: u64,
        /// Seconds of HTTP load per run
        #[arg(long, default_value_t = 10)]
        http_seconds: u64,
        /// Live goroutines for the daemon-footprint measurement
        #[arg(long, default_value_t = 100_000)]
        goroutines: u64,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let ws = Workspace::locate()?;
    match cli.command {
        Cmd::Setup => setup::all(&ws).map(drop),
        Cmd::Build { release } => {
            let tools = setup::all(&ws)?;
            ws.build(&tools, release)
        }
        Cmd::Lint => {
            let tools = setup::all(&ws)?;
            ws.lint(&tools)
        }
        Cmd::Test { args } => test::run_all(&ws, &args),
        Cmd::Fuzz { seconds } => {
            let tools = setup::all(&ws)?;
            fuzz::run_all(&ws, &tools, seconds, true)
        }
        Cmd::Demo { seconds } => demo::run(&ws, seconds),
        Cmd::Deploy { only } => deploy::run(&ws, only),
        Cmd::Bench {
            only,
            roundtrips,
            http_seconds,
            goroutines,
        } => bench::run(&ws, only, roundtrips, http_seconds, goroutines),
    }
}

/// Paths of the repository and what setup installed.
pub struct Workspace {
    pub root: PathBuf,
}

impl Workspace {
    fn locate() -> Result<Self> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .context("xtask has no parent directory")?
            .to_path_buf();
        Ok(Self { root })
    }

    /// `cargo` with bpf-linker on PATH (build.rs compiles the kernel programs with it).
    pub fn cargo(&self, tools: &setup::Tools) -> Command {
        let mut cmd = Command::new("cargo");
        cmd.current_dir(&self.root).env("PATH", tools.path_env());
        cmd
    }

    pub fn build(&self, tools: &setup::Tools, release: bool) -> Result<()> {
        let mut cmd = self.cargo(tools);
        cmd.args(["build", "--package", "leakmon"]);
        if release {
            cmd.arg("--release");
        }
        run(&mut cmd)
    }

    pub fn lint(&self, tools: &setup::Tools) -> Result<()> {
        run(self.cargo(tools).args(["fmt", "--all", "--check"]))?;
        run(self.cargo(tools).args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))?;
        // The kernel programs are compiled out on the host: lint them for the BPF target.
        run(self
            .cargo(tools)
            .arg(format!("+{}", tools.nightly))
            .args(["clippy", "--package", "monitor-ebpf", "--bins"])
            .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
            .args(["--target-dir", "target/bpf-lint", "--", "-D", "warnings"]))
    }

    pub fn binary(&self, release: bool) -> PathBuf {
        self.root
            .join("target")
            .join(if release { "release" } else { "debug" })
            .join("leakmon")
    }
}

/// Runs `cmd`, failing with its command line when it fails.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
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
