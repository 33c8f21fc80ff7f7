//! OpenTelemetry export: alert transitions as OTLP log records and leakmon's metrics, over gRPC
//! or HTTP/protobuf, to the user's collector.
//!
//! Nothing here may hold up detection: alerts go into a bounded queue (the oldest are dropped,
//! and counted, when it is full) drained by a thread of leakmon's own, with its own runtime,
//! which retries with backoff until the backend takes them, so alerts raised while the
//! collector is down arrive once it is up. Metrics are gauges read by the SDK's periodic
//! reader from a snapshot the monitor refreshes each scan.

mod metrics;
mod record;
mod settings;

use std::{
    collections::VecDeque,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use opentelemetry::{
    InstrumentationScope, KeyValue,
    logs::{LogRecord as _, Logger as _, LoggerProvider as _},
};
use opentelemetry_otlp::{
    LogExporter, MetricExporter, Protocol as OtlpProtocol, RetryPolicy, WithExportConfig,
    WithHttpConfig, WithTonicConfig,
};
use opentelemetry_sdk::{
    Resource,
    error::OTelSdkResult,
    logs::{LogBatch, LogExporter as _, LogProcessor, SdkLogRecord, SdkLogger, SdkLoggerProvider},
    resource::{EnvResourceDetector, TelemetryResourceDetector},
};
use tokio::sync::mpsc;

pub(crate) use self::settings::{OtlpOptions, OtlpSettings, Protocol};
use self::{
    metrics::{CountPoint, GroupGauge, MetricsSnapshot},
    record::alert_record,
};
use crate::{
    detect::Transition,
    output::{Metrics, Sink},
    runtime::ProcessInfo,
};

#[derive(Debug, thiserror::Error)]
pub(crate) enum ExportError {
    #[error("setting up the OTLP exporter for {endpoint}")]
    Exporter {
        endpoint: String,
        #[source]
        source: opentelemetry_otlp::ExporterBuildError,
    },
    #[error("OTLP header {name:?} is not a valid gRPC metadata entry")]
    Header { name: String },
    #[error("starting the OTLP export thread")]
    Thread(#[source] std::io::Error),
}

type Item = (SdkLogRecord, InstrumentationScope);

/// Export counters, shared with the metrics.
#[derive(Debug, Default)]
pub(crate) struct ExportStats {
    /// Alert records the backend accepted.
    pub sent: AtomicU64,
    /// Alert records given up: the queue was full (the oldest go), or still undelivered at
    /// shutdown.
    pub dropped: AtomicU64,
    /// Export attempts that failed (each is retried).
    pub failures: AtomicU64,
}

/// The log processor: hands each record to the export thread without ever blocking.
#[derive(Debug)]
struct QueueProcessor {
    tx: Mutex<Option<mpsc::Sender<Item>>>,
    stats: Arc<ExportStats>,
}

impl LogProcessor for QueueProcessor {
    fn emit(&self, record: &mut SdkLogRecord, scope: &InstrumentationScope) {
        let sent = self.tx.lock().ok().is_some_and(|tx| {
            tx.as_ref()
                .is_some_and(|tx| tx.try_send((record.clone(), scope.clone())).is_ok())
        });
        if !sent {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    /// Closes the queue: the export thread sends what it holds, then ends.
    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        if let Ok(mut tx) = self.tx.lock() {
            tx.take();
        }
        Ok(())
    }
}

/// A running exporter: the OTLP sink.
pub(crate) struct Otlp {
    logs: SdkLoggerProvider,
    logger: SdkLogger,
    stats: Arc<ExportStats>,
    snapshot: Arc<Mutex<MetricsSnapshot>>,
    thread: Option<JoinHandle<()>>,
}

/// Alerts held in the channel between the monitor and the export thread (the thread's own
/// queue, `queue_size`, is where they wait out an outage).
const CHANNEL: usize = 1024;
const BATCH: usize = 512;
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// How long shutdown keeps trying to deliver what is queued.
const DRAIN_AT_EXIT: Duration = Duration::from_secs(5);

impl Otlp {
    /// Builds the exporters (on the export thread, which owns their runtime) and starts it.
    pub(crate) fn start(settings: OtlpSettings) -> Result<Self, ExportError> {
        let resource = resource();
        let stats = Arc::new(ExportStats::default());
        let snapshot = Arc::new(Mutex::new(MetricsSnapshot::default()));
        let (tx, rx) = mpsc::channel(CHANNEL);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = {
            let (stats, snapshot, resource) = (stats.clone(), snapshot.clone(), resource.clone());
            std::thread::Builder::new()
                .name("leakmon-otlp".into())
                .spawn(move || export_thread(settings, resource, rx, stats, snapshot, ready_tx))
                .map_err(ExportError::Thread)?
        };
        // The thread reports whether the exporters could be built.
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(e);
            }
            Err(_) => {
                let _ = thread.join();
                return Err(ExportError::Thread(std::io::Error::other(
                    "export thread died",
                )));
            }
        }
        let logs = SdkLoggerProvider::builder()
            .with_resource(resource)
            .with_log_processor(QueueProcessor {
                tx: Mutex::new(Some(tx)),
                stats: stats.clone(),
            })
            .build();
        let logger = logs.logger("leakmon");
        Ok(Self {
            logs,
            logger,
            stats,
            snapshot,
            thread: Some(thread),
        })
    }

    /// Queues one alert transition as a log record (never blocks).
    fn queue(&self, process: &ProcessInfo, transition: &Transition) {
        let r = alert_record(process, transition);
        let mut record = self.logger.create_log_record();
        record.set_event_name(r.event_name);
        record.set_severity_number(r.severity);
        record.set_severity_text(r.severity_text);
        record.set_timestamp(std::time::SystemTime::now());
        record.set_body(r.body.into());
        for (key, value) in r.attributes {
            record.add_attribute(key, opentelemetry::logs::AnyValue::from(value));
        }
        self.logger.emit(record);
    }

    /// Sends what is queued (trying for a few seconds), exports the metrics one last time,
    /// and stops the thread.
    fn shutdown(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        let _ = self.logs.shutdown();
        let _ = thread.join();
        let (sent, dropped) = (
            self.stats.sent.load(Ordering::Relaxed),
            self.stats.dropped.load(Ordering::Relaxed),
        );
        log::info!("OTLP export: {sent} alert records sent, {dropped} dropped");
    }
}

impl Sink for Otlp {
    fn alert(&mut self, process: &ProcessInfo, transition: &Transition) -> std::io::Result<()> {
        self.queue(process, transition);
        Ok(())
    }

    fn wants_metrics(&self) -> bool {
        true
    }

    /// Replaces what the metrics report (read at the next export).
    fn metrics(&mut self, metrics: &Metrics<'_>) {
        let snapshot = MetricsSnapshot {
            groups: metrics
                .firing
                .iter()
                .map(|(pid, alert)| GroupGauge::of(*pid, alert))
                .collect(),
            counts: CountPoint::all(&metrics.counts),
            health: metrics.health,
        };
        if let Ok(mut s) = self.snapshot.lock() {
            *s = snapshot;
        }
    }

    fn close(&mut self) {
        self.shutdown();
    }
}

/// service.name = leakmon, its version, host.name, k8s.node.name (from `K8S_NODE_NAME` or
/// `NODE_NAME`, as the DaemonSet sets it); `OTEL_RESOURCE_ATTRIBUTES` and `OTEL_SERVICE_NAME`
/// override.
fn resource() -> Resource {
    let mut attrs = vec![
        KeyValue::new("service.name", "leakmon"),
        KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
        KeyValue::new("host.name", host_name()),
    ];
    if let Some(node) = ["K8S_NODE_NAME", "NODE_NAME"]
        .iter()
        .find_map(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
    {
        attrs.push(KeyValue::new("k8s.node.name", node));
    }
    let mut builder = Resource::builder_empty()
        .with_attributes(attrs)
        .with_detectors(&[
            Box::new(TelemetryResourceDetector),
            Box::new(EnvResourceDetector::new()),
        ]);
    if let Ok(name) = std::env::var("OTEL_SERVICE_NAME")
        && !name.is_empty()
    {
        builder = builder.with_service_name(name);
    }
    builder.build()
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default()
}

fn export_thread(
    settings: OtlpSettings,
    resource: Resource,
    rx: mpsc::Receiver<Item>,
    stats: Arc<ExportStats>,
    snapshot: Arc<Mutex<MetricsSnapshot>>,
    ready: std::sync::mpsc::Sender<Result<(), ExportError>>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(ExportError::Thread(e)));
            return;
        }
    };
    // The metrics reader's own thread needs the blocking HTTP client, made outside the runtime.
    let blocking_client =
        (settings.protocol == Protocol::HttpProtobuf).then(reqwest::blocking::Client::new);
    let built = {
        // tonic's channels spawn onto the runtime they are made in.
        let _guard = runtime.enter();
        build_exporters(&settings, blocking_client)
    };
    let (mut logs, meters) = match built {
        Ok(built) => built,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    logs.set_resource(&resource);
    let meters = metrics::provider(
        meters,
        settings.metrics_interval,
        resource,
        snapshot,
        stats.clone(),
    );
    let _ = ready.send(Ok(()));
    runtime.block_on(async {
        deliver(rx, &logs, &stats, settings.queue_size).await;
        let _ = tokio::task::spawn_blocking(move || meters.shutdown()).await;
    });
}

fn build_exporters(
    s: &OtlpSettings,
    blocking_client: Option<reqwest::blocking::Client>,
) -> Result<(LogExporter, MetricExporter), ExportError> {
    let err = |endpoint: &str| {
        let endpoint = endpoint.to_owned();
        move |source| ExportError::Exporter { endpoint, source }
    };
    match s.protocol {
        Protocol::Grpc => {
            let mut metadata = tonic::metadata::MetadataMap::new();
            for (name, value) in &s.headers {
                let key = tonic::metadata::MetadataKey::from_bytes(name.as_bytes())
                    .map_err(|_| ExportError::Header { name: name.clone() })?;
                let value = value
                    .parse()
                    .map_err(|_| ExportError::Header { name: name.clone() })?;
                metadata.insert(key, value);
            }
            let mut logs = LogExporter::builder()
                .with_tonic()
                .with_endpoint(&s.logs_endpoint)
                .with_metadata(metadata.clone())
                // leakmon retries itself, without a limit.
                .with_retry_policy(RetryPolicy::disabled());
            let mut metrics = MetricExporter::builder()
                .with_tonic()
                .with_endpoint(&s.metrics_endpoint)
                .with_metadata(metadata);
            if let Some(t) = s.timeout {
                logs = logs.with_timeout(t);
                metrics = metrics.with_timeout(t);
            }
            Ok((
                logs.build().map_err(err(&s.logs_endpoint))?,
                metrics.build().map_err(err(&s.metrics_endpoint))?,
            ))
        }
        Protocol::HttpProtobuf => {
            let headers: std::collections::HashMap<String, String> =
                s.headers.clone().into_iter().collect();
            let mut logs = LogExporter::builder()
                .with_http()
                .with_protocol(OtlpProtocol::HttpBinary)
                .with_endpoint(&s.logs_endpoint)
                .with_http_client(reqwest::Client::new())
                .with_headers(headers.clone())
                .with_retry_policy(RetryPolicy::disabled());
            let mut metrics = MetricExporter::builder()
                .with_http()
                .with_protocol(OtlpProtocol::HttpBinary)
                .with_endpoint(&s.metrics_endpoint)
                .with_headers(headers);
            if let Some(client) = blocking_client {
                metrics = metrics.with_http_client(client);
            }
            if let Some(t) = s.timeout {
                logs = logs.with_timeout(t);
                metrics = metrics.with_timeout(t);
            }
            Ok((
                logs.build().map_err(err(&s.logs_endpoint))?,
                metrics.build().map_err(err(&s.metrics_endpoint))?,
            ))
        }
    }
}

/// Delivers queued alert records in order, retrying with backoff until the backend takes
/// them; ends when the queue is closed and empty (or after [`DRAIN_AT_EXIT`] of failures).
async fn deliver(
    mut rx: mpsc::Receiver<Item>,
    exporter: &LogExporter,
    stats: &ExportStats,
    capacity: usize,
) {
    let mut pending: VecDeque<Item> = VecDeque::new();
    let mut closed = false;
    let mut closed_at: Option<Instant> = None;
    let mut backoff = BACKOFF_MIN;
    let mut failing = false;
    let take = |item: Item, pending: &mut VecDeque<Item>| {
        if pending.len() >= capacity {
            pending.pop_front();
            stats.dropped.fetch_add(1, Ordering::Relaxed);
        }
        pending.push_back(item);
    };
    loop {
        if pending.is_empty() && !closed {
            match rx.recv().await {
                Some(item) => take(item, &mut pending),
                None => closed = true,
            }
        }
        loop {
            match rx.try_recv() {
                Ok(item) => take(item, &mut pending),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    closed = true;
                    break;
                }
            }
        }
        if pending.is_empty() {
            if closed {
                return;
            }
            continue;
        }
        if closed && closed_at.is_none() {
            closed_at = Some(Instant::now());
        }
        let n = pending.len().min(BATCH);
        let batch: Vec<(&SdkLogRecord, &InstrumentationScope)> =
            pending.iter().take(n).map(|(r, s)| (r, s)).collect();
        match exporter.export(LogBatch::new(&batch)).await {
            Ok(()) => {
                drop(batch);
                pending.drain(..n);
                stats.sent.fetch_add(n as u64, Ordering::Relaxed);
                if failing {
                    log::info!("OTLP export works again");
                }
                failing = false;
                backoff = BACKOFF_MIN;
            }
            Err(e) => {
                drop(batch);
                stats.failures.fetch_add(1, Ordering::Relaxed);
                if !failing {
                    log::warn!(
                        "OTLP export failed ({e}); keeping {} alert records and retrying",
                        pending.len()
                    );
                }
                failing = true;
                if closed_at.is_some_and(|t| t.elapsed() >= DRAIN_AT_EXIT) {
                    stats
                        .dropped
                        .fetch_add(pending.len() as u64, Ordering::Relaxed);
                    log::warn!(
                        "OTLP backend unreachable at exit: {} alert records not sent",
                        pending.len()
                    );
                    return;
                }
                let wait = if closed { BACKOFF_MIN } else { backoff };
                tokio::time::sleep(wait).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}
