//! Settings: built-in defaults, then the config file, then LEAKMON_* environment variables,
//! then command-line flags (clap reads the environment and the flags; this merges the file
//! beneath them).

use std::{path::Path, time::Duration};

use serde::Deserialize;

use crate::{detect::Thresholds, output::Format};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config file {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path}: {source}")]
    Parse {
        path: String,
        #[source]
        source: toml::de::Error,
    },
    #[error("{what}: invalid duration {value:?} (examples: 90s, 5m, 1h30m)")]
    Duration {
        what: &'static str,
        value: String,
        #[source]
        source: humantime::DurationError,
    },
    #[error("{what} must be greater than zero")]
    Zero { what: &'static str },
    #[error(
        "OTLP endpoint {endpoint:?}: only plain http:// endpoints are supported (run a local \
         collector or sidecar for TLS)"
    )]
    OtlpEndpoint { endpoint: String },
    #[error("{what}: invalid size {value:?} (examples: 64MiB, 512KiB, 100000000)")]
    Size { what: &'static str, value: String },
}

/// The config file (`/etc/leakmon/leakmon.toml` or `--config`). Unknown keys are errors, so a
/// typo does not silently keep a default.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub block_threshold: Option<String>,
    pub spin_threshold: Option<String>,
    pub poll_block_threshold: Option<String>,
    pub leak_window: Option<String>,
    pub leak_min_growth: Option<u64>,
    pub scan_interval: Option<String>,
    pub max_goroutines: Option<u32>,
    pub max_goroutines_per_process: Option<u32>,
    pub max_threads: Option<u32>,
    pub format: Option<Format>,
    pub probe_parks: Option<bool>,
    pub threads: Option<bool>,
    pub target_timeout: Option<String>,
    pub memory_budget: Option<String>,
    pub go_unvalidated: Option<bool>,
    pub update_interval: Option<String>,
    pub reach_budget: Option<String>,
    pub otlp: Option<crate::export::OtlpFile>,
}

pub const DEFAULT_PATH: &str = "/etc/leakmon/leakmon.toml";

impl FileConfig {
    /// Reads `path`; the default path may be absent, an explicit one may not.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
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
}

/// Detection settings as given on the command line or in the environment (strings, so one
/// parser serves flags, environment and file alike).
#[derive(Clone, Debug, Default, clap::Args)]
pub struct DetectArgs {
    /// A goroutine parked this long is blocked [default: 5m]
    #[arg(long, env = "LEAKMON_BLOCK_THRESHOLD", value_name = "DURATION")]
    pub block_threshold: Option<String>,
    /// A goroutine running this long without parking is spinning [default: 2m]
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
    /// How often goroutine state is scanned [default: a quarter of the smallest threshold,
    /// at most 15s]
    #[arg(long, env = "LEAKMON_SCAN_INTERVAL", value_name = "DURATION")]
    pub scan_interval: Option<String>,
    /// Least time between two updates of a firing alert's count, age and growth
    /// [default: 1m]
    #[arg(long, env = "LEAKMON_UPDATE_INTERVAL", value_name = "DURATION")]
    pub update_interval: Option<String>,
    /// Memory the reachability analysis (which proves leaks) may read per minute, all
    /// processes together; 0 turns it off [default: 512MiB]
    #[arg(long, env = "LEAKMON_REACH_BUDGET", value_name = "SIZE")]
    pub reach_budget: Option<String>,
    /// Capacity of the kernel's goroutine table, all processes together [default: 262144]
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
    /// Trace every park with a uprobe on runtime.gopark (exact park times) instead of
    /// scanning the goroutine table; costs about 1 us per park in the watched program
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
    /// Export alerts and metrics over OTLP to this collector (e.g. http://collector:4317);
    /// alerts stay on stdout too
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT", value_name = "URL")]
    pub otlp_endpoint: Option<String>,
    /// OTLP transport [default: grpc]
    #[arg(long, env = "OTEL_EXPORTER_OTLP_PROTOCOL", value_enum)]
    pub otlp_protocol: Option<crate::export::Protocol>,
}

/// Effective settings.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    pub thresholds: Thresholds,
    /// Kernel map sizes.
    pub capacity: crate::bpf::Capacity,
    /// None: the command's own default (people read `watch`, machines read `run`).
    pub format: Option<Format>,
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
    /// None: no export.
    pub otlp: Option<crate::export::OtlpSettings>,
}

pub const DEFAULT_TARGET_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_REACH_BUDGET: u64 = 512 << 20;
pub const DEFAULT_MEMORY_BUDGET: u64 = 64 << 20;
/// Below this the daemon cannot hold its own tables, whatever it evicts.
const MIN_MEMORY_BUDGET: u64 = 16 << 20;

/// A size such as `64MiB`, `512KiB`, `1GiB` or plain bytes.
fn parse_size(what: &'static str, value: &str) -> Result<u64, ConfigError> {
    let v = value.trim();
    let digits = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (number, unit) = v.split_at(digits);
    let shift = match unit.trim() {
        "" | "B" => 0,
        "K" | "KiB" | "k" => 10,
        "M" | "MiB" => 20,
        "G" | "GiB" => 30,
        _ => {
            return Err(ConfigError::Size {
                what,
                value: value.to_owned(),
            });
        }
    };
    number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .ok_or(ConfigError::Size {
            what,
            value: value.to_owned(),
        })
}

impl TryFrom<(&DetectArgs, FileConfig)> for Settings {
    type Error = ConfigError;

    fn try_from((args, file): (&DetectArgs, FileConfig)) -> Result<Self, ConfigError> {
        let d = Thresholds::default();
        let duration = |what, arg: &Option<String>, file: Option<String>, default| match arg
            .clone()
            .or(file)
        {
            None => Ok(default),
            Some(value) => match humantime::parse_duration(value.trim()) {
                Ok(v) if v.is_zero() => Err(ConfigError::Zero { what }),
                Ok(v) => Ok(v),
                Err(source) => Err(ConfigError::Duration {
                    what,
                    value,
                    source,
                }),
            },
        };
        let thresholds = Thresholds {
            block: duration(
                "block_threshold",
                &args.block_threshold,
                file.block_threshold,
                d.block,
            )?,
            spin: duration(
                "spin_threshold",
                &args.spin_threshold,
                file.spin_threshold,
                d.spin,
            )?,
            poll_block: duration(
                "poll_block_threshold",
                &args.poll_block_threshold,
                file.poll_block_threshold,
                d.poll_block,
            )?,
            leak_window: duration(
                "leak_window",
                &args.leak_window,
                file.leak_window,
                d.leak_window,
            )?,
            leak_min_growth: args
                .leak_min_growth
                .or(file.leak_min_growth)
                .unwrap_or(d.leak_min_growth),
            scan_interval: d.scan_interval,
            update_interval: duration(
                "update_interval",
                &args.update_interval,
                file.update_interval,
                d.update_interval,
            )?,
        };
        // Unless set, scans come about four times per smallest threshold (so a short
        // threshold is usable), never less often than the production default.
        let follows = (thresholds.block.min(thresholds.spin) / 4)
            .clamp(Duration::from_millis(250), d.scan_interval);
        let thresholds = Thresholds {
            scan_interval: duration(
                "scan_interval",
                &args.scan_interval,
                file.scan_interval,
                follows,
            )?,
            ..thresholds
        };
        if thresholds.leak_min_growth == 0 {
            return Err(ConfigError::Zero {
                what: "leak_min_growth",
            });
        }
        let defaults = crate::bpf::Capacity::default();
        let count = |what, arg: Option<u32>, file: Option<u32>, default| match arg.or(file) {
            Some(0) => Err(ConfigError::Zero { what }),
            v => Ok(v.unwrap_or(default)),
        };
        let capacity = crate::bpf::Capacity {
            goroutines: count(
                "max_goroutines",
                args.max_goroutines,
                file.max_goroutines,
                defaults.goroutines,
            )?,
            threads: count(
                "max_threads",
                args.max_threads,
                file.max_threads,
                defaults.threads,
            )?,
            go_quota: count(
                "max_goroutines_per_process",
                args.max_goroutines_per_process,
                file.max_goroutines_per_process,
                defaults.go_quota,
            )?,
        };
        let target_timeout = duration(
            "target_timeout",
            &args.target_timeout,
            file.target_timeout,
            DEFAULT_TARGET_TIMEOUT,
        )?;
        let memory_budget = match args.memory_budget.clone().or(file.memory_budget) {
            None => DEFAULT_MEMORY_BUDGET,
            Some(v) => parse_size("memory_budget", &v)?.max(MIN_MEMORY_BUDGET),
        };
        let otlp = crate::export::OtlpSettings::resolve(
            args.otlp_endpoint.as_deref(),
            args.otlp_protocol,
            file.otlp.unwrap_or_default(),
            |name| std::env::var(name).ok(),
            |what, value| {
                duration(what, &None, value, Duration::ZERO).map(|d| (!d.is_zero()).then_some(d))
            },
        )?;
        let reach_budget = match args.reach_budget.clone().or(file.reach_budget) {
            None => DEFAULT_REACH_BUDGET,
            Some(v) if v.trim() == "0" => 0,
            Some(v) => parse_size("reach_budget", &v)?,
        };
        Ok(Self {
            otlp,
            reach_budget,
            thresholds,
            capacity,
            target_timeout,
            memory_budget,
            go_unvalidated: args.go_unvalidated.or(file.go_unvalidated).unwrap_or(false),
            format: args.format.or(file.format),
            probe_parks: args.probe_parks.or(file.probe_parks).unwrap_or(false),
            threads: args.threads.or(file.threads).unwrap_or(true),
        })
    }
}

/// A short scan interval relative to the thresholds costs CPU for nothing; a long one delays
/// alerts. Used as a sanity note in logs.
pub fn scan_note(t: &Thresholds) -> Option<String> {
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

    #[test]
    fn flags_override_file_which_overrides_defaults() {
        let file: FileConfig =
            toml::from_str("block_threshold = \"10m\"\nspin_threshold = \"3m\"\nformat = \"json\"")
                .unwrap_or_default();
        let args = DetectArgs {
            block_threshold: Some("30s".into()),
            ..Default::default()
        };
        let s = Settings::try_from((&args, file)).ok();
        let s = s
            .as_ref()
            .map(|s| (s.thresholds.block, s.thresholds.spin, s.format));
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
    fn unknown_keys_and_bad_durations_are_errors() {
        assert!(toml::from_str::<FileConfig>("block_treshold = \"1m\"").is_err());
        let args = DetectArgs {
            spin_threshold: Some("soon".into()),
            ..Default::default()
        };
        let err = Settings::try_from((&args, FileConfig::default())).err();
        assert!(err.is_some_and(|e| e.to_string().contains("spin_threshold: invalid duration")),);
    }

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_size("m", "64MiB").ok(), Some(64 << 20));
        assert_eq!(parse_size("m", "512 KiB").ok(), Some(512 << 10));
        assert_eq!(parse_size("m", "1000").ok(), Some(1000));
        assert!(parse_size("m", "lots").is_err());
        assert!(parse_size("m", "99999999999999G").is_err());
    }

    #[test]
    fn defaults_are_minutes() {
        let s = Settings::try_from((&DetectArgs::default(), FileConfig::default())).ok();
        assert!(s.is_some_and(|s| s.thresholds.block >= Duration::from_secs(60)));
    }
}
