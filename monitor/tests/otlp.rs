//! OpenTelemetry export end to end: `leakmon watch` on a leaking Go program exports its alert
//! as an OTLP log record and its metrics, over gRPC and HTTP/protobuf, to an in-process
//! receiver (exact records and attributes) and to a real collector (rotel); a collector that
//! starts late still gets every alert; a backend that is down never holds up detection or exit.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod support;

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{TcpListener, TcpStream},
    path::PathBuf,
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use opentelemetry_proto::tonic::{
    collector::{
        logs::v1::{
            ExportLogsServiceRequest, ExportLogsServiceResponse,
            logs_service_server::{LogsService, LogsServiceServer},
        },
        metrics::v1::{
            ExportMetricsServiceRequest, ExportMetricsServiceResponse,
            metrics_service_server::{MetricsService, MetricsServiceServer},
        },
    },
    common::v1::{AnyValue, KeyValue, any_value::Value},
    logs::v1::LogRecord,
};
use prost::Message as _;
use support::{
    Leakmon, fixture, fixture_versions, free_port, markers, require_root, start_fixture,
};

/// What a receiver got.
#[derive(Clone, Default)]
struct Sink {
    logs: Arc<Mutex<Vec<ExportLogsServiceRequest>>>,
    metrics: Arc<Mutex<Vec<ExportMetricsServiceRequest>>>,
}

#[tonic::async_trait]
impl LogsService for Sink {
    async fn export(
        &self,
        req: tonic::Request<ExportLogsServiceRequest>,
    ) -> Result<tonic::Response<ExportLogsServiceResponse>, tonic::Status> {
        self.logs.lock().unwrap().push(req.into_inner());
        Ok(tonic::Response::new(ExportLogsServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl MetricsService for Sink {
    async fn export(
        &self,
        req: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        self.metrics.lock().unwrap().push(req.into_inner());
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

impl Sink {
    /// Serves OTLP/gRPC logs on `logs_port` and metrics on `metrics_port` (tonic serves one
    /// service per listener here), on a thread of its own.
    fn serve_grpc(&self, logs_port: u16, metrics_port: u16) {
        let bind = |port| {
            let l = TcpListener::bind(("127.0.0.1", port)).unwrap();
            l.set_nonblocking(true).unwrap();
            l
        };
        let (logs, metrics) = (bind(logs_port), bind(metrics_port));
        let sink = self.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let incoming = |l| {
                    tonic::transport::server::TcpIncoming::from(
                        tokio::net::TcpListener::from_std(l).unwrap(),
                    )
                };
                let logs = tonic::transport::Server::builder()
                    .serve_with_incoming(LogsServiceServer::new(sink.clone()), incoming(logs));
                let metrics = tonic::transport::Server::builder()
                    .serve_with_incoming(MetricsServiceServer::new(sink), incoming(metrics));
                let (a, b) = tokio::join!(logs, metrics);
                a.unwrap();
                b.unwrap();
            });
        });
    }

    /// Serves OTLP/HTTP protobuf (`/v1/logs`, `/v1/metrics`) on `port`: plain HTTP/1.1 with
    /// keep-alive, one thread per connection.
    fn serve_http(&self, port: u16) {
        let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
        let sink = self.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().map_while(Result::ok) {
                let sink = sink.clone();
                std::thread::spawn(move || sink.http_connection(conn));
            }
        });
    }

    fn http_connection(&self, conn: TcpStream) {
        let mut reader = BufReader::new(conn.try_clone().unwrap());
        let mut conn = conn;
        loop {
            let mut request_line = String::new();
            if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
                return;
            }
            let path = request_line
                .split_whitespace()
                .nth(1)
                .unwrap_or_default()
                .to_owned();
            let mut length = 0;
            loop {
                let mut header = String::new();
                reader.read_line(&mut header).unwrap();
                let header = header.trim_end().to_ascii_lowercase();
                if header.is_empty() {
                    break;
                }
                if let Some(v) = header.strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap();
                }
            }
            let mut body = vec![0u8; length];
            reader.read_exact(&mut body).unwrap();
            let status = match path.as_str() {
                "/v1/logs" => {
                    self.logs
                        .lock()
                        .unwrap()
                        .push(ExportLogsServiceRequest::decode(&body[..]).unwrap());
                    "200 OK"
                }
                "/v1/metrics" => {
                    self.metrics
                        .lock()
                        .unwrap()
                        .push(ExportMetricsServiceRequest::decode(&body[..]).unwrap());
                    "200 OK"
                }
                _ => "404 Not Found",
            };
            let response = format!(
                "HTTP/1.1 {status}\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n"
            );
            if conn.write_all(response.as_bytes()).is_err() {
                return;
            }
        }
    }

    /// The first log record satisfying `pred`, with its resource attributes.
    fn wait_log(
        &self,
        what: &str,
        pred: impl Fn(&LogRecord) -> bool,
    ) -> (LogRecord, Vec<KeyValue>) {
        let deadline = Instant::now() + Duration::from_secs(45);
        while Instant::now() < deadline {
            for req in self.logs.lock().unwrap().iter() {
                for rl in &req.resource_logs {
                    for sl in &rl.scope_logs {
                        if let Some(r) = sl.log_records.iter().find(|r| pred(r)) {
                            let resource = rl
                                .resource
                                .clone()
                                .map(|r| r.attributes)
                                .unwrap_or_default();
                            return (r.clone(), resource);
                        }
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "no log record {what} arrived; got {} requests",
            self.logs.lock().unwrap().len()
        );
    }

    /// The totals of up-down counter `name` for process `pid`, one per export (its data points
    /// summed over their other attributes), in the order they arrived.
    fn totals(&self, name: &str, pid: u32) -> Vec<i64> {
        use opentelemetry_proto::tonic::metrics::v1::{metric::Data, number_data_point};
        let mut out = Vec::new();
        for req in self.metrics.lock().unwrap().iter() {
            let points = req
                .resource_metrics
                .iter()
                .flat_map(|r| &r.scope_metrics)
                .flat_map(|s| &s.metrics)
                .filter(|m| m.name == name)
                .filter_map(|m| match &m.data {
                    Some(Data::Sum(sum)) => Some(&sum.data_points),
                    _ => None,
                })
                .flatten()
                .filter(|p| {
                    attr(&p.attributes, "process.pid") == Some(Value::IntValue(i64::from(pid)))
                });
            let mut total = None;
            for p in points {
                if let Some(number_data_point::Value::AsInt(v)) = p.value {
                    *total.get_or_insert(0) += v;
                }
            }
            out.extend(total);
        }
        out
    }

    /// Waits for a data point of metric `name` with attribute process.pid = `pid`.
    fn wait_metric(&self, name: &str, pid: u32) {
        let deadline = Instant::now() + Duration::from_secs(45);
        while Instant::now() < deadline {
            let found = self.metrics.lock().unwrap().iter().any(|req| {
                req.resource_metrics
                    .iter()
                    .flat_map(|r| &r.scope_metrics)
                    .flat_map(|s| &s.metrics)
                    .any(|m| {
                        use opentelemetry_proto::tonic::metrics::v1::metric::Data;
                        m.name == name
                            && match &m.data {
                                Some(Data::Gauge(g)) => g.data_points.iter().any(|p| {
                                    attr(&p.attributes, "process.pid")
                                        == Some(Value::IntValue(i64::from(pid)))
                                }),
                                _ => false,
                            }
                    })
            });
            if found {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("no metric {name} for PID {pid} arrived");
    }
}

fn attr(attrs: &[KeyValue], key: &str) -> Option<Value> {
    attrs
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.clone())
        .and_then(|v: AnyValue| v.value)
}

fn str_attr(attrs: &[KeyValue], key: &str) -> String {
    match attr(attrs, key) {
        Some(Value::StringValue(s)) => s,
        other => panic!("attribute {key}: {other:?}"),
    }
}

fn body(r: &LogRecord) -> String {
    match r.body.clone().and_then(|b| b.value) {
        Some(Value::StringValue(s)) => s,
        other => panic!("body: {other:?}"),
    }
}

/// A config file exporting metrics every second.
fn fast_metrics_config() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("leakmon.toml");
    std::fs::write(&path, "[otlp]\nmetrics_interval = \"1s\"\n").unwrap();
    (dir, path)
}

/// Checks the leak alert's record against what the fixture's markers say.
fn check_leak_record(r: &LogRecord, resource: &[KeyValue], pid: u32, bin: &std::path::Path) {
    let (_, block_line) = markers()["send"];
    assert_eq!(r.event_name, "leakmon.goroutine_leak");
    assert_eq!(r.severity_text, "WARN");
    assert_eq!(r.severity_number, 13);
    assert!(body(r).contains("goroutines created at"), "{}", body(r));
    let a = &r.attributes;
    assert_eq!(
        attr(a, "process.pid"),
        Some(Value::IntValue(i64::from(pid)))
    );
    assert_eq!(
        str_attr(a, "process.executable.path"),
        bin.to_str().unwrap()
    );
    assert_eq!(str_attr(a, "process.runtime.name"), "go");
    assert!(str_attr(a, "process.runtime.version").starts_with("go1."));
    assert!(str_attr(a, "code.file.path").ends_with("fixtures/go/leaky/main.go"));
    assert_eq!(
        attr(a, "code.line.number"),
        Some(Value::IntValue(block_line as i64))
    );
    assert!(!str_attr(a, "code.function.name").is_empty());
    assert_eq!(str_attr(a, "leakmon.kind"), "goroutine_leak");
    assert_eq!(str_attr(a, "leakmon.state"), "firing");
    assert_eq!(str_attr(a, "leakmon.wait_reason"), "chan send");
    assert!(matches!(attr(a, "leakmon.count"), Some(Value::IntValue(n)) if n >= 3));
    assert!(str_attr(a, "leakmon.hint").contains("buffer"));
    assert_eq!(str_attr(resource, "service.name"), "leakmon");
    assert!(!str_attr(resource, "host.name").is_empty());
    assert!(!str_attr(resource, "service.version").is_empty());
}

fn leak_fixture() -> (support::Proc, PathBuf) {
    let bin = fixture(&fixture_versions()[0], "leaky", false);
    (start_fixture(&bin, &["-mode", "send"]), bin)
}

#[test]
fn grpc_exports_the_alert_record_and_metrics() {
    require_root();
    let sink = Sink::default();
    let (port, metrics_port) = (free_port(), free_port());
    sink.serve_grpc(port, metrics_port);
    let (fx, bin) = leak_fixture();
    let (_dir, config) = fast_metrics_config();
    let endpoint = format!("http://127.0.0.1:{port}");
    // The standard variables work, signal-specific ones included.
    let metrics_endpoint = format!("http://127.0.0.1:{metrics_port}");
    let _lm = Leakmon::watch_with_env(
        &[fx.pid()],
        &["--config", config.to_str().unwrap()],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", &metrics_endpoint),
            ("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment.name=ci"),
        ],
    );
    let (record, resource) = sink.wait_log("goroutine_leak", |r| {
        r.event_name == "leakmon.goroutine_leak"
    });
    check_leak_record(&record, &resource, fx.pid(), &bin);
    assert_eq!(str_attr(&resource, "deployment.environment.name"), "ci");
    sink.wait_metric("leakmon.group.tasks", fx.pid());
    sink.wait_metric("leakmon.group.oldest_wait", fx.pid());
}

#[test]
fn http_exports_firing_and_resolved() {
    require_root();
    let sink = Sink::default();
    let port = free_port();
    sink.serve_http(port);
    let (mut fx, bin) = leak_fixture();
    let (_dir, config) = fast_metrics_config();
    let endpoint = format!("http://127.0.0.1:{port}");
    let mut lm = Leakmon::watch(
        &[fx.pid()],
        &[
            "--config",
            config.to_str().unwrap(),
            "--otlp-endpoint",
            &endpoint,
            "--otlp-protocol",
            "http/protobuf",
        ],
    );
    let (record, resource) = sink.wait_log("goroutine_leak", |r| {
        r.event_name == "leakmon.goroutine_leak"
    });
    check_leak_record(&record, &resource, fx.pid(), &bin);
    sink.wait_metric("leakmon.group.tasks", fx.pid());
    // Release the goroutines: the resolution is exported too.
    lm.expect("leak firing on stdout", |a| a["kind"] == "goroutine_leak");
    fx.signal(libc::SIGUSR1);
    fx.expect_line("released");
    let (resolved, _) = sink.wait_log("resolved", |r| {
        r.event_name == "leakmon.goroutine_leak"
            && attr(&r.attributes, "leakmon.state") == Some(Value::StringValue("resolved".into()))
    });
    assert_eq!(resolved.severity_text, "INFO");
}

/// Alerts raised while the collector is not there yet are delivered once it is.
#[test]
fn collector_starting_late_loses_nothing() {
    require_root();
    let port = free_port();
    let (fx, bin) = leak_fixture();
    let endpoint = format!("http://127.0.0.1:{port}");
    let mut lm = Leakmon::watch(&[fx.pid()], &["--otlp-endpoint", &endpoint]);
    // Detection goes on while the backend is down.
    lm.expect("leak firing on stdout", |a| a["kind"] == "goroutine_leak");
    lm.wait_stderr("OTLP export failed");
    std::thread::sleep(Duration::from_secs(2));
    let sink = Sink::default();
    sink.serve_grpc(port, free_port());
    let (record, resource) = sink.wait_log("goroutine_leak", |r| {
        r.event_name == "leakmon.goroutine_leak"
    });
    check_leak_record(&record, &resource, fx.pid(), &bin);
    lm.wait_stderr("OTLP export works again");
}

/// A backend that never answers: alerts still reach stdout, and leakmon still exits promptly,
/// saying what it could not send.
#[test]
fn backend_down_never_blocks() {
    require_root();
    let (fx, _) = leak_fixture();
    let endpoint = format!("http://127.0.0.1:{}", free_port());
    let mut lm = Leakmon::watch(&[fx.pid()], &["--otlp-endpoint", &endpoint]);
    lm.expect("leak firing on stdout", |a| a["kind"] == "goroutine_leak");
    lm.proc.signal(libc::SIGTERM);
    let started = Instant::now();
    let status = lm.proc.child.wait().unwrap();
    assert!(status.success(), "{}", lm.stderr());
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "exit took {:?}",
        started.elapsed()
    );
    let stderr = lm.stderr();
    assert!(stderr.contains("not sent"), "{stderr}");
}

/// A collector that accepts connections and never answers (a hung backend, a black-holing
/// proxy): SIGTERM still ends leakmon within its shutdown limit (it took 24 s before, over the
/// unit's 20 s stop timeout), over gRPC and over HTTP.
#[test]
fn a_collector_that_never_answers_does_not_hold_up_exit() {
    require_root();
    let (fx, _) = leak_fixture();
    for protocol in ["grpc", "http/protobuf"] {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        // Accepted connections are kept open and never read from or written to.
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for conn in listener.incoming().flatten() {
                held.push(conn);
            }
        });
        let mut lm = Leakmon::watch(
            &[fx.pid()],
            &["--otlp-endpoint", &endpoint, "--otlp-protocol", protocol],
        );
        lm.expect("leak firing on stdout", |a| a["kind"] == "goroutine_leak");
        // Let an export be under way, hanging.
        std::thread::sleep(Duration::from_secs(2));
        let took = lm.stop();
        assert!(
            took < Duration::from_secs(12),
            "{protocol}: exit took {took:?}; stderr:\n{}",
            lm.stderr()
        );
    }
}

/// The goroutine count of every watched Go process is exported as `go.goroutine.count` (by
/// state and wait reason), and follows the program: up while it spawns goroutines that block,
/// down when they are released, at production thresholds (nothing needs to be judged); its
/// thread count as `process.thread.count`.
#[test]
fn goroutine_counts_follow_the_program() {
    require_root();
    let sink = Sink::default();
    let (port, metrics_port) = (free_port(), free_port());
    sink.serve_grpc(port, metrics_port);
    let bin = fixture(&fixture_versions()[0], "leaky", false);
    // 20 goroutines blocked every 200 ms for 3 s (about 300), released at 8 s.
    let fx = start_fixture(
        &bin,
        &[
            "-mode",
            "send",
            "-batch",
            "20",
            "-grow-for",
            "3s",
            "-release-after",
            "8s",
        ],
    );
    let (_dir, config) = fast_metrics_config();
    let pid = fx.pid().to_string();
    let endpoint = format!("http://127.0.0.1:{port}");
    let metrics_endpoint = format!("http://127.0.0.1:{metrics_port}");
    let _lm = Leakmon::start_with_env(
        &[
            "watch",
            "--pid",
            &pid,
            "--format",
            "json",
            "--config",
            config.to_str().unwrap(),
            "--scan-interval",
            "500ms",
            "--otlp-endpoint",
            &endpoint,
        ],
        &[("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", &metrics_endpoint)],
    );
    let deadline = Instant::now() + Duration::from_secs(40);
    let (mut peak, mut after_peak_low) = (0, i64::MAX);
    loop {
        let totals = sink.totals("go.goroutine.count", fx.pid());
        for t in &totals {
            if *t > peak {
                peak = *t;
                after_peak_low = i64::MAX;
            } else {
                after_peak_low = after_peak_low.min(*t);
            }
        }
        if peak >= 250 && after_peak_low <= 20 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "go.goroutine.count never rose past 250 then fell to 20: {totals:?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    // Its threads too (the Go runtime runs several: sysmon, the GC's, the Ms of its Ps).
    let threads = sink.totals("process.thread.count", fx.pid());
    assert!(
        threads.iter().any(|n| *n >= 2),
        "process.thread.count of the fixture: {threads:?}"
    );
}

/// A real collector: rotel, printing what it receives.
fn rotel(protocol: &str) {
    let bin = PathBuf::from(std::env::var("LEAKMON_ROTEL").expect(
        "LEAKMON_ROTEL is not set: run the tests through `./x test`, which installs rotel",
    ));
    assert!(
        bin.exists(),
        "rotel is not installed at {} (run ./x setup)",
        bin.display()
    );
    let (grpc, http) = (free_port(), free_port());
    let mut collector = Command::new(&bin)
        .args([
            "start",
            "--exporter",
            "blackhole",
            "--debug-log",
            "metrics",
            "--debug-log",
            "logs",
            "--debug-log-verbosity",
            "detailed",
            "--otlp-grpc-endpoint",
            &format!("127.0.0.1:{grpc}"),
            "--otlp-http-endpoint",
            &format!("127.0.0.1:{http}"),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = Arc::new(Mutex::new(String::new()));
    {
        let out = out.clone();
        let mut stdout = collector.stdout.take().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 8192];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                out.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
    }
    let (fx, _) = leak_fixture();
    let (_dir, config) = fast_metrics_config();
    let endpoint = match protocol {
        "grpc" => format!("http://127.0.0.1:{grpc}"),
        _ => format!("http://127.0.0.1:{http}"),
    };
    let mut lm = Leakmon::watch(
        &[fx.pid()],
        &[
            "--config",
            config.to_str().unwrap(),
            "--otlp-endpoint",
            &endpoint,
            "--otlp-protocol",
            protocol,
        ],
    );
    lm.expect("leak firing on stdout", |a| a["kind"] == "goroutine_leak");
    let wanted = [
        "EventName: leakmon.goroutine_leak".to_owned(),
        format!("process.pid: Int({})", fx.pid()),
        "code.file.path: Str(".to_owned(),
        "service.name: Str(leakmon)".to_owned(),
        "Name: leakmon.group.tasks".to_owned(),
        "Name: leakmon.alerts.fired".to_owned(),
        "Name: go.goroutine.count".to_owned(),
    ];
    let deadline = Instant::now() + Duration::from_secs(45);
    loop {
        let seen = out.lock().unwrap().clone();
        let missing: Vec<&String> = wanted
            .iter()
            .filter(|w| !seen.contains(w.as_str()))
            .collect();
        if missing.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            let _ = collector.kill();
            panic!("rotel ({protocol}) never showed {missing:?}; it printed:\n{seen}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = collector.kill();
    let _ = collector.wait();
}

#[test]
fn rotel_receives_over_grpc() {
    require_root();
    rotel("grpc");
}

#[test]
fn rotel_receives_over_http() {
    require_root();
    rotel("http/protobuf");
}
