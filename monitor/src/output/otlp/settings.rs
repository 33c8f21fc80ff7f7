//! Where and how to export: from the config file's `[otlp]` table, then the standard
//! `OTEL_EXPORTER_OTLP_*` environment variables, then flags. No endpoint: no export.

use std::{collections::BTreeMap, time::Duration};

use serde::{Deserialize, Serialize};

use crate::config::values::{ConfigError, duration};

/// The OTLP sink's settings: the config file's `[otlp]` table, and the flags that set the same
/// (part of `config::Options`).
#[derive(Clone, Debug, Default, clap::Args, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct OtlpOptions {
    /// Export alerts and metrics over OTLP to this collector (e.g. http://collector:4317);
    /// alerts stay on stdout too
    #[arg(
        id = "otlp_endpoint",
        long = "otlp-endpoint",
        env = "OTEL_EXPORTER_OTLP_ENDPOINT",
        value_name = "URL"
    )]
    pub endpoint: Option<String>,
    /// OTLP transport [default: grpc]
    #[arg(
        id = "otlp_protocol",
        long = "otlp-protocol",
        env = "OTEL_EXPORTER_OTLP_PROTOCOL",
        value_enum
    )]
    pub protocol: Option<Protocol>,
    /// Sent with every export (e.g. an API key).
    #[arg(skip)]
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Per export request.
    #[arg(skip)]
    pub timeout: Option<String>,
    /// How often metrics are exported.
    #[arg(skip)]
    pub metrics_interval: Option<String>,
    /// Alert records held while the backend is unreachable; the oldest go first when full.
    #[arg(skip)]
    pub queue_size: Option<usize>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
pub(crate) enum Protocol {
    #[default]
    #[serde(rename = "grpc")]
    #[value(name = "grpc")]
    Grpc,
    #[serde(rename = "http/protobuf")]
    #[value(name = "http/protobuf")]
    HttpProtobuf,
}

/// Effective export settings.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct OtlpSettings {
    pub protocol: Protocol,
    /// Full URLs per signal: for HTTP the base endpoint gets `/v1/logs` and `/v1/metrics`;
    /// `OTEL_EXPORTER_OTLP_{LOGS,METRICS}_ENDPOINT` are used as given.
    pub logs_endpoint: String,
    pub metrics_endpoint: String,
    pub headers: BTreeMap<String, String>,
    /// None: the exporter's (`OTEL_EXPORTER_OTLP_TIMEOUT`, else 10 s).
    pub timeout: Option<Duration>,
    pub metrics_interval: Duration,
    pub queue_size: usize,
}

pub(crate) const DEFAULT_METRICS_INTERVAL: Duration = Duration::from_secs(30);
pub(crate) const DEFAULT_QUEUE_SIZE: usize = 4096;

impl OtlpSettings {
    /// What `options` set (flags, `OTEL_EXPORTER_OTLP_ENDPOINT` / `_PROTOCOL`, over the file);
    /// `signal_env` looks up the signal-specific variables (the process environment, or a
    /// test's).
    pub(crate) fn resolve(
        options: OtlpOptions,
        signal_env: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<Self>, ConfigError> {
        let protocol = options.protocol.unwrap_or_default();
        let base = options.endpoint.filter(|e| !e.is_empty());
        let logs = signal_env("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT").filter(|e| !e.is_empty());
        let metrics = signal_env("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT").filter(|e| !e.is_empty());
        let for_signal = |path: &str| {
            base.as_deref().map(|b| match protocol {
                Protocol::Grpc => b.to_owned(),
                Protocol::HttpProtobuf => format!("{}/{path}", b.trim_end_matches('/')),
            })
        };
        let (Some(logs_endpoint), Some(metrics_endpoint)) = (
            logs.or_else(|| for_signal("v1/logs")),
            metrics.or_else(|| for_signal("v1/metrics")),
        ) else {
            return Ok(None);
        };
        for endpoint in [&logs_endpoint, &metrics_endpoint] {
            if !endpoint.starts_with("http://") {
                return Err(ConfigError::OtlpEndpoint {
                    endpoint: endpoint.clone(),
                });
            }
        }
        let queue_size = options.queue_size.unwrap_or(DEFAULT_QUEUE_SIZE);
        if queue_size == 0 {
            return Err(ConfigError::Zero {
                what: "otlp.queue_size",
            });
        }
        let timeout = match options.timeout.as_deref() {
            None => None,
            Some(t) => Some(duration("otlp.timeout", Some(t), Duration::ZERO)?),
        };
        Ok(Some(Self {
            protocol,
            logs_endpoint,
            metrics_endpoint,
            headers: options.headers,
            timeout,
            metrics_interval: duration(
                "otlp.metrics_interval",
                options.metrics_interval.as_deref(),
                DEFAULT_METRICS_INTERVAL,
            )?,
            queue_size,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Flags (`endpoint`, `protocol`) over the file's table, as `config::Options::over` lays
    /// them.
    fn resolve(
        endpoint: Option<&str>,
        protocol: Option<Protocol>,
        file: OtlpOptions,
        env: &[(&str, &str)],
    ) -> Option<OtlpSettings> {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect();
        let options = OtlpOptions {
            endpoint: endpoint.map(str::to_owned).or(file.endpoint),
            protocol: protocol.or(file.protocol),
            ..file
        };
        OtlpSettings::resolve(options, |k| {
            env.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone())
        })
        .unwrap()
    }

    #[test]
    fn no_endpoint_no_export() {
        assert_eq!(resolve(None, None, OtlpOptions::default(), &[]), None);
    }

    #[test]
    fn http_appends_signal_paths_grpc_does_not() {
        let s = resolve(
            Some("http://c:4318/"),
            Some(Protocol::HttpProtobuf),
            OtlpOptions::default(),
            &[],
        )
        .unwrap();
        assert_eq!(s.logs_endpoint, "http://c:4318/v1/logs");
        assert_eq!(s.metrics_endpoint, "http://c:4318/v1/metrics");
        let s = resolve(Some("http://c:4317"), None, OtlpOptions::default(), &[]).unwrap();
        assert_eq!(
            (s.protocol, s.logs_endpoint.as_str()),
            (Protocol::Grpc, "http://c:4317")
        );
    }

    #[test]
    fn flags_over_file_and_signal_variables_as_given() {
        let file = OtlpOptions {
            endpoint: Some("http://file:4317".into()),
            timeout: Some("3s".into()),
            ..OtlpOptions::default()
        };
        let s = resolve(Some("http://flag:4317"), None, file.clone(), &[]).unwrap();
        assert_eq!(s.logs_endpoint, "http://flag:4317");
        assert_eq!(s.timeout, Some(Duration::from_secs(3)));
        let s = resolve(
            None,
            None,
            file,
            &[("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT", "http://l:1/x")],
        )
        .unwrap();
        assert_eq!(
            (s.logs_endpoint.as_str(), s.metrics_endpoint.as_str()),
            ("http://l:1/x", "http://file:4317")
        );
    }

    #[test]
    fn https_is_refused_clearly() {
        let options = OtlpOptions {
            endpoint: Some("https://c:4317".into()),
            ..OtlpOptions::default()
        };
        let err = OtlpSettings::resolve(options, |_| None).unwrap_err();
        assert!(err.to_string().contains("https"), "{err}");
    }
}
