//! Setting values as written (durations, sizes), their parsers and errors: one parser serves
//! flags, environment and file alike.

use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub(crate) enum ConfigError {
    #[error("reading config file {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path}")]
    Parse {
        path: String,
        #[source]
        source: toml::de::Error,
    },
    #[error("laying the flags and environment over the config file")]
    Merge(#[source] serde_json::Error),
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

/// A duration such as `90s`, `5m`, `1h30m`: `default` when not given; zero is refused.
pub(crate) fn duration(
    what: &'static str,
    value: Option<&str>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    match value {
        None => Ok(default),
        Some(value) => match humantime::parse_duration(value.trim()) {
            Ok(v) if v.is_zero() => Err(ConfigError::Zero { what }),
            Ok(v) => Ok(v),
            Err(source) => Err(ConfigError::Duration {
                what,
                value: value.to_owned(),
                source,
            }),
        },
    }
}

/// A size such as `64MiB`, `512KiB`, `1GiB` or plain bytes.
pub(crate) fn size(what: &'static str, value: &str) -> Result<u64, ConfigError> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(size("m", "64MiB").ok(), Some(64 << 20));
        assert_eq!(size("m", "512 KiB").ok(), Some(512 << 10));
        assert_eq!(size("m", "1000").ok(), Some(1000));
        assert!(size("m", "lots").is_err());
        assert!(size("m", "99999999999999G").is_err());
    }
}
