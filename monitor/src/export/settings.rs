//! Where and how to export: from the config file's `[otlp]` table, then the standard
//! `OTEL_EXPORTER_OTLP_*` environment variables, then flags. No endpoint: no export.

use std::{collections::BTreeMap, time::Duration};

use serde::Deserialize;

/// The config file's `[otlp]` table.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OtlpFile {
    pub endpoint: Option<String>,
    pub protocol: Option<Protocol>,
    /// Sent with every export (e.g. an API key).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Per export request.
    pub timeout: Option<String>,
    /// How often metrics are exported.
    pub metrics_interval: Option<String>,
    /// Alert records held while the backend is unreachable; the oldest go first when full.
    pub queue_size: Option<usize>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
pub enum Protocol {
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
pub struct OtlpSettings {
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

pub const DEFAULT_METRICS_INTERVAL: Duration = Duration::from_secs(30);
pub const DEFAULT_QUEUE_SIZE: usize = 4096;

impl OtlpSettings {
    /// `endpoint` and `protocol` as flags or `OTEL_EXPORTER_OTLP_ENDPOINT` /
    /// `OTEL_EXPORTER_OTLP_PROTOCOL` gave them (clap reads both), over the file's.
    /// `signal_env` looks up the signal-specific variables (the process environment, or a
    /// test's).
    pub fn resolve(
        endpoint: Option<&str>,
        protocol: Option<Protocol>,
        file: OtlpFile,
        signal_env: impl Fn(&str) -> Option<String>,
        parse_duration: impl Fn(
            &'static str,
            Option<String>,
        ) -> Result<Option<Duration>, crate::config::ConfigError>,
    ) -> Result<Option<Self>, crate::config::ConfigError> {
        let protocol = protocol.or(file.protocol).unwrap_or_default();
        let base = endpoint
            .map(str::to_owned)
            .or(file.endpoint)
            .filter(|e| !e.is_empty());
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
                return Err(crate::config::ConfigError::OtlpEndpoint {
                    endpoint: endpoint.clone(),
                });
            }
        }
        let queue_size = file.queue_size.unwrap_or(DEFAULT_QUEUE_SIZE);
        if queue_size == 0 {
            return Err(crate::config::ConfigError::Zero {
                what: "otlp.queue_size",
            });
        }
        Ok(Some(Self {
            protocol,
            logs_endpoint,
            metrics_endpoint,
            headers: file.headers,
            timeout: parse_duration("otlp.timeout", file.timeout)?,
            metrics_interval: parse_duration("otlp.metrics_interval", file.metrics_interval)?
                .unwrap_or(DEFAULT_METRICS_INTERVAL),
            queue_size,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(
        endpoint: Option<&str>,
        protocol: Option<Protocol>,
        file: OtlpFile,
        env: &[(&str, &str)],
    ) -> Option<OtlpSettings> {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect();
        OtlpSettings::resolve(
            endpoint,
            protocol,
            file,
            |k| env.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone()),
            |_, v| Ok(v.map(|v| humantime::parse_duration(&v).unwrap())),
        )
        .unwrap()
    }

    #[test]
    fn no_endpoint_no_export() {
        assert_eq!(resolve(None, None, OtlpFile::default(), &[]), None);
    }

    #[test]
    fn http_appends_signal_paths_grpc_does_not() {
        let s = resolve(
            Some("http://c:4318/"),
            Some(Protocol::HttpProtobuf),
            OtlpFile::default(),
            &[],
        )
        .unwrap();
        assert_eq!(s.logs_endpoint, "http://c:4318/v1/logs");
        assert_eq!(s.metrics_endpoint, "http://c:4318/v1/metrics");
        let s = resolve(Some("http://c:4317"), None, OtlpFile::default(), &[]).unwrap();
        assert_eq!(
            (s.protocol, s.logs_endpoint.as_str()),
            (Protocol::Grpc, "http://c:4317")
        );
    }

    #[test]
    fn flags_over_file_and_signal_variables_as_given() {
        let file = OtlpFile {
            endpoint: Some("http://file:4317".into()),
            timeout: Some("3s".into()),
            ..OtlpFile::default()
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
        let err = OtlpSettings::resolve(
            Some("https://c:4317"),
            None,
            OtlpFile::default(),
            |_| None,
            |_, _| Ok(None),
        )
        .unwrap_err();
        assert!(err.to_string().contains("https"), "{err}");
    }
}
