//! Where alerts and metrics go: each output (text or JSON on stdout, OTLP) is a [`Sink`] the
//! watch loop hands every alert transition and, after each scan, the metrics.

use std::io;

use crate::{
    detect::{Alert, Transition},
    runtime::{Census, ProcessInfo},
};

pub(crate) trait Sink {
    /// One alert transition, as it happens. An error ends the watch (stdout closed); a sink
    /// that can wait (a backend that is down) queues instead.
    fn alert(&mut self, process: &ProcessInfo, transition: &Transition) -> io::Result<()>;
    /// Whether it takes [`Sink::metrics`] (else the loop does not gather them).
    fn wants_metrics(&self) -> bool {
        false
    }
    /// What the daemon sees after a scan.
    fn metrics(&mut self, _metrics: &Metrics<'_>) {}
    /// Flushes and stops (at exit).
    fn close(&mut self) {}
}

/// What a scan leaves for the metrics.
#[derive(Clone, Debug, Default)]
pub(crate) struct Metrics<'a> {
    /// Every alert firing now, with its process.
    pub firing: Vec<(u32, &'a Alert)>,
    /// The tasks of every watched process, counted at its last scan.
    pub counts: Vec<(&'a ProcessInfo, &'a Census)>,
    pub health: Health,
}

/// The daemon's own health.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct Health {
    /// Probe hits so far (task parks, preemptions, exits seen by uprobes).
    pub probe_hits: u64,
    /// Records the kernel side could not keep or deliver (full maps, lost exec events).
    pub events_dropped: u64,
    pub last_scan_seconds: f64,
    /// Processes whose tasks are watched.
    pub processes_attached: u64,
    /// Alerts fired so far, all kinds.
    pub alerts_fired: u64,
    /// The daemon's resident memory.
    pub memory_bytes: u64,
    /// Bytes held by the symbol and unwind cache, and modules evicted from it so far.
    pub cache_bytes: u64,
    pub cache_evicted: u64,
    /// Processes skipped because work on them overran its deadline.
    pub targets_unresponsive: u64,
    /// Worker threads alive, and results that came after their deadline so far.
    pub workers: u64,
    pub late_results: u64,
}
