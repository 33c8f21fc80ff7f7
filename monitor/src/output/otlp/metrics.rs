//! leakmon's metrics: per alerting group, the tasks and the oldest wait; alerts fired; and the
//! daemon's own health. Gauges read a snapshot the monitor replaces after each scan.

use std::{
    sync::{Arc, Mutex, atomic::Ordering},
    time::Duration,
};

use opentelemetry::{KeyValue, metrics::MeterProvider as _};
use opentelemetry_otlp::MetricExporter;
use opentelemetry_sdk::{
    Resource,
    metrics::{PeriodicReader, SdkMeterProvider},
};

use super::ExportStats;
use crate::{
    detect::Alert,
    output::Health,
    runtime::{Census, CountMetric, ProcessInfo, registry::RUNTIMES},
};

/// One firing alert's group, as metric attributes and values.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct GroupGauge {
    /// process.pid, leakmon.kind, code.* of the site, leakmon.wait_reason,
    /// leakmon.task_state (`blocked` or `spinning`).
    pub attributes: Vec<KeyValue>,
    pub tasks: u64,
    pub oldest_wait_seconds: f64,
}

impl GroupGauge {
    pub(crate) fn of(pid: u32, alert: &Alert) -> Self {
        let g = &alert.group;
        let mut attributes = vec![
            KeyValue::new("process.pid", i64::from(pid)),
            KeyValue::new("leakmon.kind", alert.kind.name),
        ];
        if let Some(site) = g.blocked_at.as_deref().or(g.created_at.as_deref()) {
            attributes.push(KeyValue::new("code.function.name", site.function.clone()));
            attributes.push(KeyValue::new("code.file.path", site.file.clone()));
            attributes.push(KeyValue::new("code.line.number", i64::from(site.line)));
        }
        if let Some(reason) = &g.wait_reason {
            attributes.push(KeyValue::new("leakmon.wait_reason", reason.to_string()));
        }
        attributes.push(KeyValue::new(
            "leakmon.task_state",
            alert.kind.activity.as_str(),
        ));
        Self {
            attributes,
            tasks: alert.count,
            oldest_wait_seconds: alert.oldest_seconds,
        }
    }
}

#[derive(Clone, Debug, Default)]
pub(crate) struct MetricsSnapshot {
    pub groups: Vec<GroupGauge>,
    pub counts: Vec<CountPoint>,
    pub health: Health,
}

/// One process's tasks in one state (and wait reason), as a data point of its runtime's count
/// metric.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct CountPoint {
    pub metric: &'static str,
    pub attributes: Vec<KeyValue>,
    pub value: i64,
}

/// Processes whose counts are exported per metric, at most: the ones with the most tasks. With
/// [`MAX_SERIES_PER_PROCESS`], what bounds the metric's cardinality.
pub(crate) const MAX_COUNTED_PROCESSES: usize = 512;
/// Data points of one process, at most: its (state, wait reason) pairs with the most tasks;
/// the rest are summed into one point of wait reason `other`.
pub(crate) const MAX_SERIES_PER_PROCESS: usize = 24;

impl CountPoint {
    /// The data points of the processes with the most tasks, per metric (a host's many
    /// threads do not crowd out its goroutines).
    pub(crate) fn all(counts: &[(&ProcessInfo, &Census)]) -> Vec<CountPoint> {
        let mut by_size: Vec<&(&ProcessInfo, &Census)> = counts.iter().collect();
        by_size.sort_by_key(|(_, c)| (c.metric.name, std::cmp::Reverse(c.total())));
        by_size
            .chunk_by(|(_, a), (_, b)| a.metric.name == b.metric.name)
            .flat_map(|same| same.iter().take(MAX_COUNTED_PROCESSES))
            .flat_map(|(p, c)| Self::of(p, c))
            .collect()
    }

    fn of(process: &ProcessInfo, census: &Census) -> Vec<CountPoint> {
        let mut series: Vec<(&(&'static str, Arc<str>), &u64)> = census.counts.iter().collect();
        series.sort_by_key(|(_, n)| std::cmp::Reverse(**n));
        let rest: u64 = series
            .iter()
            .skip(MAX_SERIES_PER_PROCESS - 1)
            .map(|(_, n)| **n)
            .sum();
        if series.len() > MAX_SERIES_PER_PROCESS {
            series.truncate(MAX_SERIES_PER_PROCESS - 1);
        }
        let point = |state: &str, reason: &str, value: u64| {
            let mut attributes = vec![
                KeyValue::new("process.pid", i64::from(process.pid)),
                KeyValue::new("process.executable.path", process.exe.clone()),
                KeyValue::new("leakmon.task_state", state.to_owned()),
            ];
            if !reason.is_empty() {
                attributes.push(KeyValue::new("leakmon.wait_reason", reason.to_owned()));
            }
            if let Some(pod) = &process.container.pod_name {
                attributes.push(KeyValue::new("k8s.pod.name", pod.clone()));
            }
            CountPoint {
                metric: census.metric.name,
                attributes,
                value: i64::try_from(value).unwrap_or(i64::MAX),
            }
        };
        let mut points: Vec<CountPoint> = series
            .iter()
            .map(|((state, reason), n)| point(state, reason, **n))
            .collect();
        if census.counts.len() > MAX_SERIES_PER_PROCESS {
            points.push(point("waiting", "other", rest));
        }
        points
    }
}

/// The meter provider, exporting every `interval` on the SDK's reader thread.
pub(super) fn provider(
    exporter: MetricExporter,
    interval: Duration,
    resource: Resource,
    snapshot: Arc<Mutex<MetricsSnapshot>>,
    stats: Arc<ExportStats>,
) -> SdkMeterProvider {
    let reader = PeriodicReader::builder(exporter)
        .with_interval(interval)
        .build();
    let provider = SdkMeterProvider::builder()
        .with_resource(resource)
        .with_reader(reader)
        .build();
    let meter = provider.meter("leakmon");
    let read = move |f: &dyn Fn(&MetricsSnapshot)| {
        if let Ok(s) = snapshot.lock() {
            f(&s);
        }
    };
    let read = Arc::new(read);
    {
        let read = read.clone();
        meter
            .u64_observable_gauge("leakmon.group.tasks")
            .with_description("Tasks (goroutines or threads) in a group with a firing alert")
            .with_unit("{task}")
            .with_callback(move |o| {
                read(&|s| {
                    for g in &s.groups {
                        o.observe(g.tasks, &g.attributes);
                    }
                });
            })
            .build();
    }
    {
        let read = read.clone();
        meter
            .f64_observable_gauge("leakmon.group.oldest_wait")
            .with_description("Longest wait (or run, when spinning) in a group with a firing alert")
            .with_unit("s")
            .with_callback(move |o| {
                read(&|s| {
                    for g in &s.groups {
                        o.observe(g.oldest_wait_seconds, &g.attributes);
                    }
                });
            })
            .build();
    }
    let health = |name: &'static str,
                  description: &'static str,
                  unit: &'static str,
                  f: fn(&Health) -> u64| {
        let read = read.clone();
        meter
            .u64_observable_counter(name)
            .with_description(description)
            .with_unit(unit)
            .with_callback(move |o| read(&|s| o.observe(f(&s.health), &[])))
            .build()
    };
    // Each runtime's task count, once per metric name.
    let mut metrics: Vec<&'static CountMetric> = Vec::new();
    for m in RUNTIMES
        .iter()
        .map(|r| r.count)
        .chain([&crate::threads::THREAD_COUNT])
    {
        if !metrics.iter().any(|known| known.name == m.name) {
            metrics.push(m);
        }
    }
    for m in metrics {
        let read = read.clone();
        meter
            .i64_observable_up_down_counter(m.name)
            .with_description(m.description)
            .with_unit(m.unit)
            .with_callback(move |o| {
                read(&|s| {
                    for p in s.counts.iter().filter(|p| p.metric == m.name) {
                        o.observe(p.value, &p.attributes);
                    }
                });
            })
            .build();
    }
    let _ = health("leakmon.alerts.fired", "Alerts fired", "{alert}", |h| {
        h.alerts_fired
    });
    let _ = health("leakmon.probe.hits", "Task probe hits", "{hit}", |h| {
        h.probe_hits
    });
    let _ = health(
        "leakmon.events.dropped",
        "Kernel records not kept (full maps) or events lost",
        "{event}",
        |h| h.events_dropped,
    );
    let _ = health(
        "leakmon.cache.evicted",
        "Modules (symbols, unwind tables) evicted from the cache",
        "{module}",
        |h| h.cache_evicted,
    );
    let _ = health(
        "leakmon.targets.late",
        "Scans of a process that overran their deadline and came back later",
        "{scan}",
        |h| h.late_results,
    );
    let gauge = |name: &'static str,
                 description: &'static str,
                 unit: &'static str,
                 f: fn(&Health) -> u64| {
        let read = read.clone();
        meter
            .u64_observable_gauge(name)
            .with_description(description)
            .with_unit(unit)
            .with_callback(move |o| read(&|s| o.observe(f(&s.health), &[])))
            .build()
    };
    let _ = gauge(
        "leakmon.memory.usage",
        "The daemon's resident memory",
        "By",
        |h| h.memory_bytes,
    );
    let _ = gauge(
        "leakmon.cache.usage",
        "Bytes held by the symbol and unwind cache",
        "By",
        |h| h.cache_bytes,
    );
    let _ = gauge(
        "leakmon.targets.unresponsive",
        "Processes skipped because reading them overran the target timeout",
        "{process}",
        |h| h.targets_unresponsive,
    );
    let _ = gauge(
        "leakmon.workers",
        "Worker threads alive (stuck ones included)",
        "{thread}",
        |h| h.workers,
    );
    {
        let read = read.clone();
        meter
            .u64_observable_gauge("leakmon.processes.attached")
            .with_description("Processes whose tasks (goroutines, tokio tasks) are watched")
            .with_unit("{process}")
            .with_callback(move |o| read(&|s| o.observe(s.health.processes_attached, &[])))
            .build();
    }
    {
        let read = read.clone();
        meter
            .f64_observable_gauge("leakmon.scan.duration")
            .with_description("Duration of the last scan")
            .with_unit("s")
            .with_callback(move |o| read(&|s| o.observe(s.health.last_scan_seconds, &[])))
            .build();
    }
    for (name, description, counter) in [
        (
            "leakmon.export.failures",
            "Failed OTLP export attempts (retried)",
            0,
        ),
        (
            "leakmon.export.dropped",
            "Alert records dropped: queue full, or undeliverable at exit",
            1,
        ),
        (
            "leakmon.export.sent",
            "Alert records the backend accepted",
            2,
        ),
    ] {
        let stats = stats.clone();
        meter
            .u64_observable_counter(name)
            .with_description(description)
            .with_unit("{record}")
            .with_callback(move |o| {
                let c = match counter {
                    0 => &stats.failures,
                    1 => &stats.dropped,
                    _ => &stats.sent,
                };
                o.observe(c.load(Ordering::Relaxed), &[]);
            })
            .build();
    }
    provider
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{detect::THREAD_KINDS, proc::Container};

    /// A process's count points are bounded: the largest (state, reason) pairs, then the rest
    /// summed as `other`; the total is kept.
    #[test]
    fn counts_are_bounded_and_keep_the_total() {
        static METRIC: CountMetric = CountMetric {
            name: "go.goroutine.count",
            unit: "{goroutine}",
            description: "",
        };
        let process = ProcessInfo {
            pid: 9,
            exe: "/srv/api".into(),
            runtime: "go",
            runtime_version: String::new(),
            container: Container::default(),
        };
        let mut census = Census::new(&METRIC);
        let reasons: Vec<Arc<str>> = (0..40).map(|i| format!("reason {i}").into()).collect();
        for (i, r) in reasons.iter().enumerate() {
            for _ in 0..=i {
                census.add_n("waiting", r, 1);
            }
        }
        let points = CountPoint::all(&[(&process, &census)]);
        assert_eq!(points.len(), MAX_SERIES_PER_PROCESS);
        let total: i64 = points.iter().map(|p| p.value).sum();
        assert_eq!(total as u64, census.total());
        assert_eq!(points[0].value, 40, "largest first");
        let other = points.last().unwrap();
        assert!(
            other
                .attributes
                .contains(&KeyValue::new("leakmon.wait_reason", "other"))
        );
        assert!(points.iter().all(|p| p.metric == "go.goroutine.count"));
    }

    /// Every kind, of every runtime and of threads, is exported with the state its name says
    /// (a spinning kind exported as blocked was a bug), its event named after it, and no two
    /// kinds share a name (kinds are compared by name).
    #[test]
    fn every_kind_exports_its_state() {
        let kinds: Vec<_> = RUNTIMES
            .iter()
            .flat_map(|r| r.kinds.iter())
            .chain(THREAD_KINDS.iter())
            .collect();
        for kind in &kinds {
            let gauge = GroupGauge::of(7, &Alert::example(kind));
            let state = gauge
                .attributes
                .iter()
                .find(|kv| kv.key.as_str() == "leakmon.task_state")
                .map(|kv| kv.value.as_str().into_owned());
            let expected = if kind.name.ends_with("_spinning") {
                "spinning"
            } else {
                "blocked"
            };
            assert_eq!(state.as_deref(), Some(expected), "{}", kind.name);
            assert_eq!(kind.event, format!("leakmon.{}", kind.name));
            assert!(!kind.hint.is_empty(), "{}", kind.name);
        }
        let mut names: Vec<&str> = kinds.iter().map(|k| k.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), kinds.len(), "{names:?}");
        assert_eq!(kinds.len(), 11);
    }
}
