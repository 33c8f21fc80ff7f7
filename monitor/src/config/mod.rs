//! Settings: built-in defaults, then the config file, then LEAKMON_* environment variables,
//! then command-line flags. Each setting is declared once, in [`Options`], which is both the
//! config file's shape and the flags (clap reads the environment and the flags; [`Options::over`]
//! lays them over the file); [`Settings`] is what they resolve to.

pub(crate) mod values;

use std::{path::Path, time::Duration};

use serde::{Deserialize, Serialize};

pub(crate) use self::values::ConfigError;
use crate::{
    bpf::Capacity,
    detect::Thresholds,
    dump::DumpOptions,
    output::{Format, OtlpOptions, OtlpSettings, SinkSettings},
};

/// Every setting, as the config file (`/etc/leakmon/leakmon.toml` or `--config`; unknown keys
/// are errors, so a typo does not silently keep a default), the environment and the flags give
/// it. Strings, so one parser serves all three.
#[derive(Clone, Debug, Default, clap::Args, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Options {
    /// A task (goroutine, tokio task) waiting this long is blocked [default: 5m]
    #[arg(long, env = "LEAKMON_BLOCK_THRESHOLD", value_name = "DURATION")]
    pub block_threshold: Option<String>,
    /// A task running (or polled over and over) this long without waiting is spinning
    /// [default: 2m]
    #[arg(long, env = "LEAKMON_SPIN_THRESHOLD", value_name = "DURATION")]
    pub spin_threshold: Option<String>,
    /// A tokio poll blocked this long in one call blocks its worker thread [default: 500ms]
    #[arg(long, env = "LEAKMON_POLL_BLOCK_THRESHOLD", value_name = "DURATION")]
    pub poll_block_threshold: Option<String>,
    /// Window over which a blocked group must keep growing to be a leak [default: 10m]
    #[arg(long, env = "LEAKMON_LEAK_WINDOW", value_name = "DURATION")]
    pub leak_window: Option<String>,
    /// Net growth over the window that makes a leak [default: 3]
    #[arg(long, env = "LEAKMON_LEAK_MIN_GROWTH", value_name = "N")]
    pub leak_min_growth: Option<u64>,
    /// How often tasks and threads are scanned [default: a quarter of the smallest threshold,
    /// at most 15s]
    #[arg(long, env = "LEAKMON_SCAN_INTERVAL", value_name = "DURATION")]
    pub scan_interval: Option<String>,
    /// Least time between two updates of a firing alert's count, age and growth
    /// [default: 1m]
    #[arg(long, env = "LEAKMON_UPDATE_INTERVAL", value_name = "DURATION")]
    pub update_interval: Option<String>,
    /// Memory the reachability analysis (which proves goroutine leaks) may read per minute,
    /// all processes together; 0 turns it off [default: 512MiB]
    #[arg(long, env = "LEAKMON_REACH_BUDGET", value_name = "SIZE")]
    pub reach_budget: Option<String>,
    /// Capacity of the kernel's task table (goroutines the probes record), all processes
    /// together [default: 262144]
    #[arg(long, env = "LEAKMON_MAX_GOROUTINES", value_name = "N")]
    pub max_goroutines: Option<u32>,
    /// Share of that table one process may fill, so one cannot end spinning detection for the
    /// rest [default: 65536]
    #[arg(long, env = "LEAKMON_MAX_GOROUTINES_PER_PROCESS", value_name = "N")]
    pub max_goroutines_per_process: Option<u32>,
    /// Capacity of the kernel's thread table, preallocated at about 72 bytes each
    /// [default: 65536]
    #[arg(long, env = "LEAKMON_MAX_THREADS", value_name = "N")]
    pub max_threads: Option<u32>,
    /// Output format of alerts on stdout [default: text for watch, json for run]
    #[arg(long, env = "LEAKMON_FORMAT", value_enum)]
    pub format: Option<Format>,
    /// The daemon's local socket, which serves `leakmon dump` and `leakmon top` to root; ""
    /// for none [default: /run/leakmon/leakmon.sock for `run`, none for `watch`]
    #[arg(long, env = "LEAKMON_SOCKET", value_name = "PATH")]
    pub socket: Option<String>,
    /// Trace every goroutine park with a uprobe on runtime.gopark (exact park times) instead
    /// of scanning the goroutine table; costs about 1 us per park in the watched program
    #[arg(long, env = "LEAKMON_PROBE_PARKS", num_args = 0..=1, default_missing_value = "true")]
    pub probe_parks: Option<bool>,
    /// Trace OS threads (futex waits, context switches) of every process: deadlocks, stuck
    /// locks, thread leaks, hung processes [default: true]
    #[arg(long, env = "LEAKMON_THREADS", num_args = 0..=1, default_missing_value = "true")]
    pub threads: Option<bool>,
    /// How long work on one process (reading its memory, /proc files, executable) may take
    /// before it is skipped for that scan, while every other process is watched [default: 5s]
    #[arg(long, env = "LEAKMON_TARGET_TIMEOUT", value_name = "DURATION")]
    pub target_timeout: Option<String>,
    /// Memory the daemon aims to stay within; symbol and unwind caches get half of it and are
    /// evicted to fit [default: 64MiB]
    #[arg(long, env = "LEAKMON_MEMORY_BUDGET", value_name = "SIZE")]
    pub memory_budget: Option<String>,
    /// Watch Go programs built with a Go version newer than the last one leakmon was
    /// validated against, trusting their DWARF for the layout [default: false]
    #[arg(long, env = "LEAKMON_GO_UNVALIDATED", num_args = 0..=1, default_missing_value = "true")]
    pub go_unvalidated: Option<bool>,
    /// The OTLP sink (`[otlp]` in the file).
    #[command(flatten)]
    #[serde(default)]
    pub otlp: OtlpOptions,
}

pub(crate) const DEFAULT_PATH: &str = "/etc/leakmon/leakmon.toml";

impl Options {
    /// The config file at `path`; the default path may be absent, an explicit one may not.
    pub(crate) fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let (path, explicit) = match path {
            Some(p) => (p, true),
            None => (Path::new(DEFAULT_PATH), false),
        };
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if !explicit && e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Self::default());
            }
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.display().to_string(),
                    source,
                });
            }
        };
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.display().to_string(),
            source,
        })
    }

    /// What is set here (flags, environment) over what `file` sets: the one place precedence
    /// is decided, for every setting at once.
    pub(crate) fn over(&self, file: &Options) -> Result<Options, ConfigError> {
        let mut merged = serde_json::to_value(file).map_err(ConfigError::Merge)?;
        let this = serde_json::to_value(self).map_err(ConfigError::Merge)?;
        lay_over(&mut merged, this);
        serde_json::from_value(merged).map_err(ConfigError::Merge)
    }
}

/// Sets in `base` whatever `top` sets (not null), table by table.
fn lay_over(base: &mut serde_json::Value, top: serde_json::Value) {
    use serde_json::Value;
    match (base, top) {
        (Value::Object(base), Value::Object(top)) => {
            for (key, value) in top {
                match base.get_mut(&key) {
                    Some(b) => lay_over(b, value),
                    None => {
                        base.insert(key, value);
                    }
                }
            }
        }
        (_, Value::Null) => {}
        (base, top) => *base = top,
    }
}

/// Effective settings.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Settings {
    pub thresholds: Thresholds,
    /// Kernel map sizes.
    pub capacity: Capacity,
    pub sinks: SinkSettings,
    pub probe_parks: bool,
    pub threads: bool,
    /// How long work on one process may take per scan.
    pub target_timeout: Duration,
    /// Bytes the daemon aims to stay within.
    pub memory_budget: u64,
    /// Go versions newer than the last validated one are watched.
    pub go_unvalidated: bool,
    /// Bytes of target memory the reachability analysis may read per minute (0: off).
    pub reach_budget: u64,
}

pub(crate) const DEFAULT_TARGET_TIMEOUT: Duration = Duration::from_secs(5);
pub(crate) const DEFAULT_REACH_BUDGET: u64 = 512 << 20;
pub(crate) const DEFAULT_MEMORY_BUDGET: u64 = 64 << 20;
/// Below this the daemon cannot hold its own tables, whatever it evicts.
const MIN_MEMORY_BUDGET: u64 = 16 << 20;

impl TryFrom<Options> for Settings {
    type Error = ConfigError;

    fn try_from(o: Options) -> Result<Self, ConfigError> {
        use values::{duration, size};
        let d = Thresholds::default();
        let thresholds = Thresholds {
            block: duration("block_threshold", o.block_threshold.as_deref(), d.block)?,
            spin: duration("spin_threshold", o.spin_threshold.as_deref(), d.spin)?,
            poll_block: duration(
                "poll_block_threshold",
                o.poll_block_threshold.as_deref(),
                d.poll_block,
            )?,
            leak_window: duration("leak_window", o.leak_window.as_deref(), d.leak_window)?,
            leak_min_growth: o.leak_min_growth.unwrap_or(d.leak_min_growth),
            scan_interval: d.scan_interval,
            update_interval: duration(
                "update_interval",
                o.update_interval.as_deref(),
                d.update_interval,
            )?,
        };
        // Unless set, scans come about four times per smallest threshold (so a short
        // threshold is usable), never less often than the production default.
        let follows = (thresholds.block.min(thresholds.spin) / 4)
            .clamp(Duration::from_millis(250), d.scan_interval);
        let thresholds = Thresholds {
            scan_interval: duration("scan_interval", o.scan_interval.as_deref(), follows)?,
            ..thresholds
        };
        if thresholds.leak_min_growth == 0 {
            return Err(ConfigError::Zero {
                what: "leak_min_growth",
            });
        }
        let defaults = Capacity::default();
        let count = |what, v: Option<u32>, default| match v {
            Some(0) => Err(ConfigError::Zero { what }),
            v => Ok(v.unwrap_or(default)),
        };
        let capacity = Capacity {
            tasks: count("max_goroutines", o.max_goroutines, defaults.tasks)?,
            threads: count("max_threads", o.max_threads, defaults.threads)?,
            task_quota: count(
                "max_goroutines_per_process",
                o.max_goroutines_per_process,
                defaults.task_quota,
            )?,
        };
        let memory_budget = match &o.memory_budget {
            None => DEFAULT_MEMORY_BUDGET,
            Some(v) => size("memory_budget", v)?.max(MIN_MEMORY_BUDGET),
        };
        let reach_budget = match &o.reach_budget {
            None => DEFAULT_REACH_BUDGET,
            Some(v) if v.trim() == "0" => 0,
            Some(v) => size("reach_budget", v)?,
        };
        Ok(Self {
            sinks: SinkSettings {
                format: o.format,
                otlp: OtlpSettings::resolve(o.otlp, |name| std::env::var(name).ok())?,
                socket: o.socket.map(Into::into),
                dump: DumpOptions {
                    unvalidated: o.go_unvalidated.unwrap_or(false),
                    reach_budget,
                    memory_budget,
                    max_listed: crate::dump::MAX_LISTED,
                },
            },
            reach_budget,
            thresholds,
            capacity,
            target_timeout: duration(
                "target_timeout",
                o.target_timeout.as_deref(),
                DEFAULT_TARGET_TIMEOUT,
            )?,
            memory_budget,
            go_unvalidated: o.go_unvalidated.unwrap_or(false),
            probe_parks: o.probe_parks.unwrap_or(false),
            threads: o.threads.unwrap_or(true),
        })
    }
}

/// A short scan interval relative to the thresholds costs CPU for nothing; a long one delays
/// alerts. Used as a sanity note in logs.
pub(crate) fn scan_note(t: &Thresholds) -> Option<String> {
    let smallest = t.block.min(t.spin);
    (t.scan_interval > smallest / 2).then(|| {
        format!(
            "scan interval {} is long for a threshold of {}: alerts will lag by up to a scan \
             (leave scan_interval unset and it follows the thresholds)",
            humantime::format_duration(t.scan_interval),
            humantime::format_duration(smallest)
        )
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn settings(flags: &Options, file: &str) -> Result<Settings, ConfigError> {
        let file: Options = toml::from_str(file).map_err(|source| ConfigError::Parse {
            path: "test".into(),
            source,
        })?;
        Settings::try_from(flags.over(&file)?)
    }

    #[test]
    fn flags_override_file_which_overrides_defaults() {
        let flags = Options {
            block_threshold: Some("30s".into()),
            ..Default::default()
        };
        let s = settings(
            &flags,
            "block_threshold = \"10m\"\nspin_threshold = \"3m\"\nformat = \"json\"",
        )
        .ok();
        let s = s
            .as_ref()
            .map(|s| (s.thresholds.block, s.thresholds.spin, s.sinks.format));
        assert_eq!(
            s,
            Some((
                Duration::from_secs(30),
                Duration::from_secs(180),
                Some(Format::Json)
            ))
        );
    }

    #[test]
    fn otlp_table_and_flags_merge() {
        let flags = Options {
            otlp: OtlpOptions {
                endpoint: Some("http://flag:4317".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        let s = settings(
            &flags,
            "[otlp]\nendpoint = \"http://file:4317\"\nqueue_size = 7\nheaders = { k = \"v\" }",
        )
        .ok()
        .and_then(|s| s.sinks.otlp);
        let s = s.map(|o| (o.logs_endpoint, o.queue_size, o.headers.len()));
        assert_eq!(s, Some(("http://flag:4317".into(), 7, 1)));
    }

    #[test]
    fn unknown_keys_and_bad_durations_are_errors() {
        assert!(toml::from_str::<Options>("block_treshold = \"1m\"").is_err());
        assert!(toml::from_str::<Options>("[otlp]\nendpont = \"x\"").is_err());
        let flags = Options {
            spin_threshold: Some("soon".into()),
            ..Default::default()
        };
        let err = settings(&flags, "").err();
        assert!(err.is_some_and(|e| e.to_string().contains("spin_threshold: invalid duration")),);
    }

    #[test]
    fn defaults_are_minutes() {
        let s = Settings::try_from(Options::default()).ok();
        assert!(s.is_some_and(|s| s.thresholds.block >= Duration::from_secs(60)));
    }
}
