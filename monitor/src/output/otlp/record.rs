//! An alert transition as an OTLP log record: event name, severity, a sentence for people, and
//! attributes named after the OpenTelemetry semantic conventions where one exists.

use opentelemetry::logs::{AnyValue, Severity};

use crate::{
    detect::{AlertKind, AlertState, Severity as Level, Transition},
    output::round3,
    runtime::ProcessInfo,
};

/// An attribute value: what the log record carries.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Value {
    Str(String),
    Int(i64),
    Float(f64),
    Ints(Vec<i64>),
}

impl From<Value> for AnyValue {
    fn from(v: Value) -> Self {
        match v {
            Value::Str(s) => s.into(),
            Value::Int(i) => i.into(),
            Value::Float(f) => f.into(),
            Value::Ints(v) => {
                AnyValue::ListAny(Box::new(v.into_iter().map(AnyValue::from).collect()))
            }
        }
    }
}

/// The parts of one log record.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct AlertRecord {
    /// `leakmon.<kind>`, e.g. `leakmon.goroutine_leak`.
    pub event_name: &'static str,
    pub severity: Severity,
    pub severity_text: &'static str,
    pub body: String,
    pub attributes: Vec<(&'static str, Value)>,
}

/// Firing: the kind's (ERROR for what cannot recover by itself, such as a deadlock or a hung
/// process; WARN otherwise); resolved: INFO.
fn severity(kind: &AlertKind, state: AlertState) -> (Severity, &'static str) {
    match (state, kind.severity) {
        (AlertState::Resolved, _) => (Severity::Info, "INFO"),
        (_, Level::Error) => (Severity::Error, "ERROR"),
        (_, Level::Warn) => (Severity::Warn, "WARN"),
    }
}

pub(crate) fn alert_record(p: &ProcessInfo, t: &Transition) -> AlertRecord {
    let a = &t.alert;
    let g = &a.group;
    let (severity, severity_text) = severity(a.kind, t.state);
    let mut attrs: Vec<(&'static str, Value)> = vec![
        ("leakmon.kind", Value::Str(a.kind.name.into())),
        ("leakmon.state", Value::Str(state_str(t.state).into())),
        ("leakmon.count", Value::Int(a.count as i64)),
        (
            "leakmon.oldest_seconds",
            Value::Float(round3(a.oldest_seconds)),
        ),
        ("process.pid", Value::Int(i64::from(p.pid))),
        ("process.executable.path", Value::Str(p.exe.clone())),
        ("process.runtime.name", Value::Str(p.runtime.into())),
        ("leakmon.entry", Value::Str(g.entry.to_string())),
        ("leakmon.hint", Value::Str(a.hint.into())),
    ];
    if !p.runtime_version.is_empty() {
        attrs.push((
            "process.runtime.version",
            Value::Str(p.runtime_version.clone()),
        ));
    }
    if let Some(growth) = a.growth_per_minute {
        attrs.push(("leakmon.growth_per_minute", Value::Float(round3(growth))));
    }
    if let Some(reason) = &g.wait_reason {
        attrs.push(("leakmon.wait_reason", Value::Str(reason.to_string())));
    }
    // code.*: where the tasks are blocked (or, when spinning, where they were created).
    if let Some(site) = g.blocked_at.as_deref().or(g.created_at.as_deref()) {
        attrs.push(("code.function.name", Value::Str(site.function.clone())));
        attrs.push(("code.file.path", Value::Str(site.file.clone())));
        attrs.push(("code.line.number", Value::Int(i64::from(site.line))));
    }
    if let Some(site) = g.created_at.as_deref() {
        attrs.push(("leakmon.created_at", Value::Str(site.to_string())));
    }
    attrs.push(("leakmon.alert_id", Value::Str(t.id.to_string())));
    if let Some(previous) = t.previous {
        attrs.push(("leakmon.previous_kind", Value::Str(previous.name.into())));
    }
    if let Some(proof) = a.proof {
        attrs.push(("leakmon.proof", Value::Str(proof.name.into())));
        attrs.push(("leakmon.proven", Value::Int(a.proven as i64)));
        if let Some(m) = &a.marking {
            attrs.push(("leakmon.proof.marking", Value::Str(m.to_string())));
        }
    }
    if let Some(w) = &a.waits_on {
        attrs.push((
            "leakmon.waits_on",
            Value::Str(serde_json::to_string(w.as_ref()).unwrap_or_default()),
        ));
    }
    // The whole stack, so a frame in a dependency is visible too.
    if let Some(stack) = &a.stack {
        let text: Vec<String> = stack.iter().map(|s| s.to_string()).collect();
        attrs.push(("code.stacktrace", Value::Str(text.join("\n"))));
    }
    if let Some(first) = a.threads.first() {
        attrs.push(("thread.id", Value::Int(i64::from(first.tid))));
        attrs.push(("thread.name", Value::Str(first.name.to_string())));
        attrs.push((
            "leakmon.thread_ids",
            Value::Ints(a.threads.iter().map(|t| i64::from(t.tid)).collect()),
        ));
    }
    let c = &p.container;
    for (key, value) in [
        ("container.id", &c.container_id),
        ("k8s.pod.uid", &c.pod_uid),
        ("k8s.pod.name", &c.pod_name),
    ] {
        if let Some(v) = value {
            attrs.push((key, Value::Str(v.clone())));
        }
    }
    AlertRecord {
        event_name: a.kind.event,
        severity,
        severity_text,
        body: body(p, t),
        attributes: attrs,
    }
}

fn state_str(s: AlertState) -> &'static str {
    match s {
        AlertState::Firing => "firing",
        AlertState::Updated => "updated",
        AlertState::Changed => "changed",
        AlertState::Resolved => "resolved",
    }
}

/// "1,204 goroutines created at api/handler.go:88 blocked on chan send for 12m, +40/min"
fn body(p: &ProcessInfo, t: &Transition) -> String {
    let a = &t.alert;
    let g = &a.group;
    let tasks = a.kind.members;
    let mut s = match t.state {
        AlertState::Firing | AlertState::Updated => format!("{} {tasks}", thousands(a.count)),
        AlertState::Changed => format!("now {} ({} {tasks}):", a.kind.name, thousands(a.count)),
        AlertState::Resolved => format!("resolved ({} {tasks} left):", thousands(a.count)),
    };
    match &g.created_at {
        Some(c) => s.push_str(&format!(" created at {}:{}", c.file, c.line)),
        None => s.push_str(&format!(" in {}", g.entry)),
    }
    match (&g.blocked_at, &g.wait_reason) {
        (Some(b), Some(r)) => s.push_str(&format!(" blocked at {}:{} on {r}", b.file, b.line)),
        (None, Some(r)) => s.push_str(&format!(" blocked on {r}")),
        _ => s.push_str(" running without blocking"),
    }
    s.push_str(&format!(
        " for {}",
        humantime::format_duration(std::time::Duration::from_secs(a.oldest_seconds as u64))
    ));
    if let Some(growth) = a.growth_per_minute.filter(|g| *g > 0.0) {
        s.push_str(&format!(", +{growth:.0}/min"));
    }
    if let Some(proof) = a.proof {
        s.push_str(&format!(", proven: {}", proof.summary));
    }
    s.push_str(&format!(" ({}, PID {}", a.kind.name, p.pid));
    if let Some(pod) = &p.container.pod_name {
        s.push_str(&format!(", pod {pod}"));
    }
    s.push(')');
    s
}

fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::{
        detect::{
            Alert, GroupKey, Site,
            testing::{LEAK, PROOF},
        },
        proc::Container,
    };

    fn site(file: &str, line: u32) -> Option<Arc<Site>> {
        Some(Arc::new(Site {
            function: "main.handler".into(),
            file: file.into(),
            line,
        }))
    }

    #[test]
    fn leak_record_has_semconv_attributes_and_a_sentence() {
        let p = ProcessInfo {
            pid: 41,
            exe: "/srv/api".into(),
            runtime: "go",
            runtime_version: "go1.24.11".into(),
            container: Container {
                container_id: Some("abc".into()),
                pod_uid: None,
                pod_name: Some("api-7f9".into()),
            },
        };
        let t = Transition {
            id: "00c0ffee00c0ffee".into(),
            state: AlertState::Firing,
            previous: None,
            alert: Alert {
                kind: &LEAK,
                group: GroupKey {
                    created_at: site("api/handler.go", 88),
                    entry: "main.handler.func1".into(),
                    blocked_at: site("api/handler.go", 91),
                    wait_reason: Some("chan send".into()),
                },
                count: 1204,
                oldest_seconds: 720.4,
                growth_per_minute: Some(40.0),
                proof: Some(&PROOF),
                proven: 1204,
                marking: Some("stacks by their stack maps".into()),
                waits_on: None,
                stack: Some(
                    [site("api/store.go", 12), site("api/handler.go", 91)]
                        .into_iter()
                        .flatten()
                        .collect(),
                ),
                threads: Vec::new(),
                hint: LEAK.hint,
            },
        };
        let r = alert_record(&p, &t);
        assert_eq!(r.event_name, "leakmon.goroutine_leak");
        assert_eq!((r.severity, r.severity_text), (Severity::Warn, "WARN"));
        assert_eq!(
            r.body,
            "1,204 goroutines created at api/handler.go:88 blocked at api/handler.go:91 on chan \
             send for 12m, +40/min, proven: nothing live can reach what they wait on \
             (goroutine_leak, PID 41, pod api-7f9)"
        );
        let get = |k: &str| {
            r.attributes
                .iter()
                .find(|(key, _)| *key == k)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(get("process.pid"), Some(Value::Int(41)));
        assert_eq!(
            get("code.file.path"),
            Some(Value::Str("api/handler.go".into()))
        );
        assert_eq!(get("code.line.number"), Some(Value::Int(91)));
        assert_eq!(
            get("process.runtime.version"),
            Some(Value::Str("go1.24.11".into()))
        );
        assert_eq!(get("k8s.pod.name"), Some(Value::Str("api-7f9".into())));
        assert_eq!(get("container.id"), Some(Value::Str("abc".into())));
        assert_eq!(get("leakmon.count"), Some(Value::Int(1204)));
        assert_eq!(get("thread.id"), None);
        assert_eq!(
            get("leakmon.alert_id"),
            Some(Value::Str("00c0ffee00c0ffee".into()))
        );
        assert_eq!(get("leakmon.proof"), Some(Value::Str("unreachable".into())));
        assert_eq!(
            get("leakmon.proof.marking"),
            Some(Value::Str("stacks by their stack maps".into()))
        );
        let Some(Value::Str(stack)) = get("code.stacktrace") else {
            panic!("no stack attribute")
        };
        assert_eq!(stack.lines().count(), 2, "{stack}");
        assert!(
            stack.lines().nth(1).unwrap().contains("api/handler.go:91"),
            "{stack}"
        );
        let resolved = alert_record(
            &p,
            &Transition {
                state: AlertState::Resolved,
                ..t
            },
        );
        assert_eq!(resolved.severity, Severity::Info);
        assert!(
            resolved
                .body
                .starts_with("resolved (1,204 goroutines left):"),
            "{}",
            resolved.body
        );
    }

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }
}
