//! Alert transitions as machines read them: one JSON object per line and per transition
//! (`leakmon run`'s default). Field names are part of leakmon's interface.

use std::io::{self, Write};

use serde::Serialize;

use super::sink::Sink;
use crate::{
    detect::{AlertState, Site, ThreadReport, Transition, WaitsOn},
    runtime::ProcessInfo,
};

pub(crate) struct Json<W: Write> {
    out: W,
}

impl<W: Write> Json<W> {
    pub(crate) fn new(out: W) -> Self {
        Self { out }
    }
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
    /// How the members are known to be leaked (`unreachable`, `no_waker`).
    #[serde(skip_serializing_if = "Option::is_none")]
    proof: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    proven: Option<u64>,
    /// How the proof read the program's memory.
    #[serde(skip_serializing_if = "Option::is_none")]
    marking: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    waits_on: Option<&'a WaitsOn>,
    /// One member's whole stack, innermost first.
    #[serde(skip_serializing_if = "Option::is_none")]
    stack: Option<Vec<&'a Site>>,
    hint: &'static str,
    /// Thread alerts: the threads involved.
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    threads: &'a [ThreadReport],
    /// Seconds since the Unix epoch.
    time: f64,
}

impl<W: Write> Sink for Json<W> {
    fn alert(&mut self, process: &ProcessInfo, t: &Transition) -> io::Result<()> {
        let a = &t.alert;
        let line = AlertLine {
            id: &t.id,
            kind: a.kind.name,
            state: t.state,
            previous_kind: t.previous.map(|k| k.name),
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
            proof: a.proof.map(|p| p.name),
            proven: a.proof.map(|_| a.proven),
            marking: a.marking.as_deref(),
            waits_on: a.waits_on.as_deref(),
            stack: a
                .stack
                .as_ref()
                .map(|s| s.iter().map(|f| f.as_ref()).collect()),
            hint: a.hint,
            threads: &a.threads,
            time: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0),
        };
        serde_json::to_writer(&mut self.out, &line).map_err(io::Error::other)?;
        writeln!(self.out)?;
        self.out.flush()
    }
}

/// Rounded to the millisecond (ages, rates).
pub(crate) fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}
