//! The command line: `leakmon watch | run | dump | top | doctor | kinds`.

use std::path::PathBuf;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

use crate::config::{Options, Settings};

#[derive(Debug, Parser)]
#[command(
    name = "leakmon",
    version,
    about = "Finds leaked, stuck and spinning tasks (Go goroutines, tokio tasks) in running \
             programs, and deadlocked, stuck and leaking threads in any program, through eBPF"
)]
struct Cli {
    /// Config file (TOML) [default: /etc/leakmon/leakmon.toml if present]
    #[arg(long, global = true, env = "LEAKMON_CONFIG")]
    config: Option<PathBuf>,
    /// Log level on stderr: error, warn, info, debug, trace
    #[arg(long, global = true, env = "LEAKMON_LOG", default_value = "info")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Watch the given processes and report alerts until interrupted (or until they exit)
    Watch {
        /// Process to watch (repeat for several)
        #[arg(long = "pid", required = true, value_name = "PID")]
        pids: Vec<u32>,
        #[command(flatten)]
        options: Options,
    },
    /// The daemon: watch every process on the host (the tasks of every program that runs a
    /// runtime leakmon knows, found at start and on exec; the threads of all)
    Run {
        #[command(flatten)]
        options: Options,
    },
    /// Every goroutine or tokio task of a running process, now, read from outside with no
    /// pause: stacks, wait reasons and times, creators, what each waits on, leakmon's verdicts
    Dump {
        /// Process to dump
        #[arg(long, value_name = "PID")]
        pid: u32,
        /// text: like Go's debug=2 goroutine dump; grouped: identical stacks counted, like
        /// debug=1; json; pprof: a goroutine profile for `go tool pprof`
        #[arg(long, value_enum, default_value = "text")]
        format: crate::dump::DumpFormat,
        /// Only the tasks proven leaked (for Go, what Go 1.27's goroutineleak profile lists,
        /// on any Go version from 1.21)
        #[arg(long)]
        leaked: bool,
        /// Write to this file instead of standard output
        #[arg(long, short, value_name = "FILE")]
        output: Option<PathBuf>,
        /// Ask the daemon serving on this socket [default: /run/leakmon/leakmon.sock when a
        /// daemon serves there, else the dump is taken here]
        #[arg(
            long,
            env = "LEAKMON_SOCKET",
            value_name = "PATH",
            conflicts_with = "local"
        )]
        socket: Option<PathBuf>,
        /// Take the dump here even beside a running daemon
        #[arg(long)]
        local: bool,
    },
    /// A live view of what the daemon sees: processes with their task counts and trends,
    /// firing alerts, and each process's tasks, grouped; or of one process watched here
    Top {
        /// The daemon's socket
        #[arg(long, env = "LEAKMON_SOCKET", value_name = "PATH", default_value = crate::output::socket::protocol::DEFAULT_SOCKET)]
        socket: PathBuf,
        /// Watch this process here instead of asking the daemon (a dump every 2 s)
        #[arg(long, value_name = "PID")]
        pid: Option<u32>,
    },
    /// Check the kernel and privileges leakmon needs, and say how to fix what is missing
    Doctor,
    /// List the alert kinds: what each counts, whether its members are blocked or spinning,
    /// its severity, and the remedy it points to
    Kinds,
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
    let settings = |options: &Options| -> anyhow::Result<Settings> {
        let file = Options::load(cli.config.as_deref())?;
        Ok(Settings::try_from(options.over(&file)?)?)
    };
    let runtime = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the async runtime")
    };
    match &cli.command {
        Command::Watch { pids, options } => {
            let settings = settings(options)?;
            for pid in pids {
                if !crate::proc::is_alive(*pid) {
                    bail!("no process with PID {pid}");
                }
            }
            runtime()?.block_on(crate::watch::watch(pids, settings, std::io::stdout()))?;
        }
        Command::Run { options } => {
            let settings = settings(options)?;
            runtime()?.block_on(crate::watch::run(settings, std::io::stdout()))?;
        }
        Command::Dump {
            pid,
            format,
            leaked,
            output,
            socket,
            local,
        } => {
            use std::io::{IsTerminal as _, Write as _};
            if *format == crate::dump::DumpFormat::Pprof
                && output.is_none()
                && std::io::stdout().is_terminal()
            {
                bail!("a pprof profile is binary: write it to a file with --output FILE");
            }
            let mut out: Box<dyn std::io::Write> = match output {
                Some(path) => Box::new(std::io::BufWriter::new(
                    std::fs::File::create(path)
                        .with_context(|| format!("creating {}", path.display()))?,
                )),
                None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
            };
            // Beside a daemon, it is asked; with none there, the dump is taken here.
            let path = socket
                .clone()
                .unwrap_or_else(|| crate::output::socket::protocol::DEFAULT_SOCKET.into());
            let asked = if *local {
                false
            } else {
                match crate::output::socket::client::dump(&path, *pid, *format, *leaked, &mut out) {
                    Ok(()) => true,
                    Err(e) if e.no_daemon() && socket.is_none() => false,
                    Err(e) => return Err(e.into()),
                }
            };
            if !asked {
                let file = Options::load(cli.config.as_deref())?;
                let settings = Settings::try_from(Options::default().over(&file)?)?;
                let mut dump = crate::dump::take(*pid, &settings.sinks.dump)?;
                if *leaked {
                    dump.leaked_only();
                }
                dump.write(*format, &mut out).context("writing the dump")?;
            }
            out.flush().context("writing the dump")?;
        }
        Command::Top { socket, pid } => {
            let source = match pid {
                Some(pid) => {
                    if !crate::proc::is_alive(*pid) {
                        bail!("no process with PID {pid}");
                    }
                    let file = Options::load(cli.config.as_deref())?;
                    let settings = Settings::try_from(Options::default().over(&file)?)?;
                    crate::top::Source::Process {
                        pid: *pid,
                        options: settings.sinks.dump,
                    }
                }
                None => {
                    // Said before the screen takes over, not in its footer.
                    crate::output::socket::client::view(socket)?;
                    crate::top::Source::Daemon(socket.clone())
                }
            };
            crate::top::run(source)?;
        }
        Command::Kinds => {
            let runtimes = crate::runtime::registry::RUNTIMES
                .iter()
                .map(|r| (r.title, r.kinds));
            for (owner, kinds) in runtimes.chain([("threads", crate::detect::THREAD_KINDS)]) {
                for k in kinds {
                    println!(
                        "{:<20} {owner} {}, {}, {:?}\n  {}\n",
                        k.name,
                        k.members,
                        k.activity.as_str(),
                        k.severity,
                        k.hint
                    );
                }
            }
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
