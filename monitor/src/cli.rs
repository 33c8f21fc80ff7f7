//! The command line: `leakmon watch | run | doctor`.

use std::path::PathBuf;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

use crate::config::{DetectArgs, FileConfig, Settings};

#[derive(Debug, Parser)]
#[command(
    name = "leakmon",
    version,
    about = "Finds leaked, stuck and spinning goroutines in Go programs, and deadlocked, stuck and \
             leaking threads in any program, through eBPF"
)]
pub struct Cli {
    /// Config file (TOML) [default: /etc/leakmon/leakmon.toml if present]
    #[arg(long, global = true, env = "LEAKMON_CONFIG")]
    pub config: Option<PathBuf>,
    /// Log level on stderr: error, warn, info, debug, trace
    #[arg(long, global = true, env = "LEAKMON_LOG", default_value = "info")]
    pub log: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Watch the given processes and report alerts until interrupted (or until they exit)
    Watch {
        /// Process to watch (repeat for several)
        #[arg(long = "pid", required = true, value_name = "PID")]
        pids: Vec<u32>,
        #[command(flatten)]
        detect: DetectArgs,
    },
    /// The daemon: watch every process on the host (goroutines of Go programs, found at start
    /// and on exec; threads of all)
    Run {
        #[command(flatten)]
        detect: DetectArgs,
    },
    /// Check the kernel and privileges leakmon needs, and say how to fix what is missing
    Doctor,
}

/// Runs the CLI; the binary's `main` is this.
pub fn main() -> anyhow::Result<std::process::ExitCode> {
    crate::sys::memory::tune_malloc();
    let cli = Cli::parse();
    env_logger::Builder::new()
        .parse_filters(&cli.log)
        .format_timestamp_millis()
        .target(env_logger::Target::Stderr)
        .init();
    let settings = |detect: &DetectArgs| -> anyhow::Result<Settings> {
        let file = FileConfig::load(cli.config.as_deref())?;
        Ok(Settings::try_from((detect, file))?)
    };
    let runtime = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the async runtime")
    };
    match &cli.command {
        Command::Watch { pids, detect } => {
            let settings = settings(detect)?;
            for pid in pids {
                if !crate::proc::is_alive(*pid) {
                    bail!("no process with PID {pid}");
                }
            }
            runtime()?.block_on(crate::watch::watch(pids, settings, std::io::stdout()))?;
        }
        Command::Run { detect } => {
            let settings = settings(detect)?;
            runtime()?.block_on(crate::watch::run(settings, std::io::stdout()))?;
        }
        Command::Doctor => {
            let mut failed = false;
            for c in crate::doctor::run_checks() {
                match &c.problem {
                    None => println!("ok    {:<14} {}", c.name, c.detail),
                    Some(fix) => {
                        failed = true;
                        println!("FAIL  {:<14} {}\n      fix: {fix}", c.name, c.detail);
                    }
                }
            }
            return Ok(if failed {
                std::process::ExitCode::FAILURE
            } else {
                std::process::ExitCode::SUCCESS
            });
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}
