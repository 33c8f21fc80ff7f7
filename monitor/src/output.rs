//! Alert transitions as users read them: one JSON object per line, or text.

use std::io::{self, Write};

use serde::Serialize;

use crate::{
    detect::{Alert, AlertKind, AlertState, Site, Transition, WaitsOn, hint},
    proc::Container,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Text,
    Json,
}

/// The process an alert is about.
#[derive(Clone, Debug, Serialize)]
pub struct ProcessInfo {
    pub pid: u32,
    pub exe: String,
    pub runtime: &'static str,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub runtime_version: String,
    #[serde(flatten)]
    pub container: Container,
}

#[derive(Serialize)]
struct Entry<'a> {
    function: &'a str,
}

/// The JSON line: field names are part of leakmon's interface.
#[derive(Serialize)]
struct AlertLine<'a> {
    /// Stable for the alert's whole life.
    id: &'a str,
    kind: &'static str,
    state: AlertState,
    /// For `changed`: the kind it was.
    #[serde(skip_serializing_if = "Option::is_none")]
    previous_kind: Option<&'static str>,
    #[serde(flatten)]
    process: &'a ProcessInfo,
    count: u64,
    oldest_seconds: f64,
    growth_per_minute: Option<f64>,
    wait_reason: Option<&'a str>,
    created_at: Option<&'a Site>,
    entry: Entry<'a>,
    blocked_at: Option<&'a Site>,
    /// `unreachable`: nothing live can reach what the goroutines wait on.
    #[serde(skip_serializing_if = "Option::is_none")]
    proof: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    proven: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    waits_on: Option<&'a WaitsOn>,
    /// One member's whole stack, innermost first.
    #[serde(skip_serializing_if = "Option::is_none")]
    stack: Option<Vec<&'a Site>>,
    hint: &'static str,
    /// Thread alerts: the threads involved.
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    threads: &'a [crate::detect::ThreadReport],
    /// Seconds since the Unix epoch.
    time: f64,
}

/// Where alert transitions go: stdout always, and the OTLP exporter when one is configured.
pub struct Output<W: Write> {
    format: Format,
    out: W,
    otlp: Option<crate::export::Otlp>,
    fired: u64,
}

impl<W: Write> Output<W> {
    pub fn new(format: Format, out: W, otlp: Option<crate::export::Otlp>) -> Self {
        Self {
            format,
            out,
            otlp,
            fired: 0,
        }
    }

    pub fn otlp(&self) -> Option<&crate::export::Otlp> {
        self.otlp.as_ref()
    }

    /// Alerts fired so far.
    pub fn fired(&self) -> u64 {
        self.fired
    }

    /// Flushes and stops the exporter.
    pub fn close(&mut self) {
        if let Some(otlp) = self.otlp.take() {
            otlp.shutdown();
        }
    }

    pub fn emit(&mut self, process: &ProcessInfo, t: &Transition) -> io::Result<()> {
        if t.state == AlertState::Firing {
            self.fired += 1;
        }
        if let Some(otlp) = &self.otlp {
            otlp.alert(process, t);
        }
        let a = &t.alert;
        match self.format {
            Format::Json => {
                let line = AlertLine {
                    id: &t.id,
                    kind: a.kind.as_str(),
                    state: t.state,
                    previous_kind: t.previous.map(|k| k.as_str()),
                    process,
                    count: a.count,
                    oldest_seconds: round3(a.oldest_seconds),
                    growth_per_minute: a.growth_per_minute.map(round3),
                    wait_reason: a.group.wait_reason.as_deref(),
                    created_at: a.group.created_at.as_deref(),
                    entry: Entry {
                        function: &a.group.entry,
                    },
                    blocked_at: a.group.blocked_at.as_deref(),
                    proof: a.proof,
                    proven: a.proof.map(|_| a.proven),
                    waits_on: a.waits_on.as_deref(),
                    stack: a
                        .stack
                        .as_ref()
                        .map(|s| s.iter().map(|f| f.as_ref()).collect()),
                    hint: hint(a.kind, a.group.wait_reason.as_deref()),
                    threads: &a.threads,
                    time: std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_secs_f64())
                        .unwrap_or(0.0),
                };
                serde_json::to_writer(&mut self.out, &line).map_err(io::Error::other)?;
                writeln!(self.out)?;
            }
            Format::Text => writeln!(self.out, "{}", text(process, t))?,
        }
        self.out.flush()
    }
}

/// "FIRING goroutine_leak PID 41 (/srv/api, go1.24.11): 1204 goroutines created at ..."
pub fn text(p: &ProcessInfo, t: &Transition) -> String {
    let a: &Alert = &t.alert;
    let state = match t.state {
        AlertState::Firing => "FIRING",
        AlertState::Updated => "UPDATE",
        AlertState::Changed => "CHANGED",
        AlertState::Resolved => "RESOLVED",
    };
    let version = if p.runtime_version.is_empty() {
        p.runtime
    } else {
        &p.runtime_version
    };
    let mut s = format!(
        "{state} {} PID {} ({}, {version}",
        a.kind.as_str(),
        p.pid,
        p.exe,
    );
    if let Some(pod) = &p.container.pod_name {
        s.push_str(&format!(", pod {pod}"));
    }
    s.push_str(&format!("): {} {}", a.count, a.kind.members()));
    if let Some(c) = &a.group.created_at {
        s.push_str(&format!(" created at {c}"));
    }
    s.push_str(&format!(" in {}", a.group.entry));
    match (&a.group.blocked_at, &a.group.wait_reason) {
        (Some(b), None) if a.kind == AlertKind::TaskBlocking => {
            s.push_str(&format!(", in one poll blocked at {b}"));
        }
        (None, None) if a.kind == AlertKind::TaskBlocking => s.push_str(", in one poll"),
        (_, None) if a.kind == AlertKind::TaskSpinning => {
            s.push_str(", polled over and over without waiting");
        }
        (Some(b), Some(r)) => s.push_str(&format!(", blocked at {b} on {r}")),
        (None, Some(r)) => s.push_str(&format!(", blocked on {r}")),
        _ => s.push_str(", running without blocking"),
    }
    s.push_str(&format!(" for {:.0}s", a.oldest_seconds));
    if let Some(g) = a.growth_per_minute.filter(|g| *g > 0.0) {
        s.push_str(&format!(", +{g:.0}/min"));
    }
    if let Some(previous) = t.previous {
        s.push_str(&format!(" (was {})", previous.as_str()));
    }
    match a.proof {
        Some("unreachable") => s.push_str(&format!(
            "\n  proven: nothing live can reach what {} of them wait on",
            a.proven
        )),
        Some("no_waker") => s.push_str(&format!(
            "\n  proven: {} of them hold no waker and are not scheduled: nothing can wake them",
            a.proven
        )),
        _ => {}
    }
    if let Some(w) = &a.waits_on {
        s.push_str(&format!("\n  waits on {} {:#x}", w.kind, w.address));
        if let Some(c) = &w.channel {
            s.push_str(&format!(
                " (capacity {}, length {}, {}, {} senders and {} receivers waiting)",
                c.capacity,
                c.length,
                if c.closed { "closed" } else { "open" },
                c.waiting_senders,
                c.waiting_receivers
            ));
        }
        if w.objects > 1 {
            s.push_str(&format!(" and {} more like it", w.objects - 1));
        }
    }
    if matches!(t.state, AlertState::Firing | AlertState::Changed) {
        for th in &a.threads {
            s.push_str(&format!("\n  thread {} ({})", th.tid, th.name));
            if let Some(lock) = &th.waits_on {
                s.push_str(&format!(" waits on {lock}"));
            }
            if let Some(owner) = th.owner_tid {
                s.push_str(&format!(" held by thread {owner}"));
            }
            s.push_str(&format!(" for {:.0}s", th.waited_seconds));
            if let Some(site) = &th.blocked_at {
                s.push_str(&format!(" at {site}"));
            }
        }
        s.push_str(&format!(
            "\n  hint: {}",
            hint(a.kind, a.group.wait_reason.as_deref())
        ));
    }
    s
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}
