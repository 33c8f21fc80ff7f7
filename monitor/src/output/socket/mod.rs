//! The daemon's local socket: a sink that keeps what the last scan saw (every watched
//! process's task count, with a short history, and the firing alerts) for `leakmon top`, and
//! serves `leakmon dump` so a dump beside the daemon asks it rather than reading the process a
//! second time. Root only: the socket is created 0600.

pub(crate) mod client;
pub(crate) mod protocol;
mod server;

use std::{
    collections::{HashMap, VecDeque},
    io,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use self::protocol::{AlertView, ProcessView, View};
use super::sink::{Metrics, Sink};
use crate::{
    detect::{Alert, Transition},
    dump::DumpOptions,
    runtime::ProcessInfo,
};

/// Scans of task counts kept per process for trends.
const HISTORY: usize = 60;
/// Tasks a dump from the daemon lists, at most (its text or JSON is held whole while sent).
const DAEMON_LISTED: usize = 20_000;

#[derive(Debug, thiserror::Error)]
pub(crate) enum SocketError {
    #[error("another leakmon daemon serves {path}")]
    InUse { path: PathBuf },
    #[error("{path} is not a socket: not replaced")]
    NotSocket { path: PathBuf },
    #[error("cannot serve on {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// What the socket serves from, shared with its threads.
pub(super) struct Shared {
    view: Mutex<View>,
    /// The alerts firing now, by process: what a dump's tasks are judged part of.
    firing: Mutex<Vec<(u32, Alert)>>,
    dump: DumpOptions,
}

pub(crate) struct Board {
    shared: Arc<Shared>,
    path: PathBuf,
    /// Totals per process, with when they were taken (Unix seconds).
    history: HashMap<u32, VecDeque<(f64, u64)>>,
}

impl Board {
    /// Serves on `path`.
    pub(crate) fn start(path: &Path, dump: DumpOptions) -> Result<Self, SocketError> {
        let listener = server::bind(path)?;
        // Dumps share the daemon's memory: fewer tasks listed (`--local` lists them all) and
        // a smaller symbol cache than a dump taken on its own.
        let dump = DumpOptions {
            max_listed: dump.max_listed.min(DAEMON_LISTED),
            memory_budget: dump.memory_budget / 4,
            ..dump
        };
        let shared = Arc::new(Shared {
            view: Mutex::new(View::default()),
            firing: Mutex::new(Vec::new()),
            dump,
        });
        server::serve(listener, Arc::clone(&shared));
        log::info!("serving dumps and the live view on {}", path.display());
        Ok(Self {
            shared,
            path: path.to_path_buf(),
            history: HashMap::new(),
        })
    }
}

impl Shared {
    fn view(&self) -> View {
        self.view
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Names, for each task of `dump` that has no verdict yet, the firing alert whose group
    /// it is in (a growing group, a stuck wait), and notes each firing alert of its process.
    fn judge(&self, dump: &mut crate::dump::Dump) {
        let pid = dump.process.pid;
        // Copied out: the scan loop waits on this lock to hand over the next alerts.
        let alerts: Vec<Alert> = self
            .firing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .filter(|(p, _)| *p == pid)
            .map(|(_, a)| a.clone())
            .collect();
        for t in &mut dump.tasks {
            if t.verdict.is_some() {
                continue;
            }
            if let Some(key) = &t.group
                && let Some(a) = alerts.iter().find(|a| a.group == *key)
            {
                t.verdict = Some(a.kind.name);
            }
        }
        for a in &alerts {
            let v = alert_view(pid, a);
            dump.notes.push(format!(
                "firing: {} ({} {}s{}{})",
                v.kind,
                v.count,
                dump.task_word,
                v.blocked_at
                    .map(|s| format!(", blocked at {s}"))
                    .unwrap_or_default(),
                v.created_at
                    .map(|s| format!(", created at {s}"))
                    .unwrap_or_default(),
            ));
        }
    }
}

impl Sink for Board {
    fn alert(&mut self, _: &ProcessInfo, _: &Transition) -> io::Result<()> {
        Ok(())
    }

    fn wants_metrics(&self) -> bool {
        true
    }

    fn metrics(&mut self, m: &Metrics<'_>) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        // One row per process: its tasks (its runtime's count), its threads.
        let mut processes: Vec<ProcessView> = Vec::new();
        let mut row: HashMap<u32, usize> = HashMap::new();
        for (info, census) in &m.counts {
            let i = *row.entry(info.pid).or_insert_with(|| {
                processes.push(ProcessView {
                    pid: info.pid,
                    exe: info.exe.clone(),
                    runtime: info.runtime.to_owned(),
                    pod: info.container.pod_name.clone(),
                    ..ProcessView::default()
                });
                processes.len() - 1
            });
            let Some(p) = processes.get_mut(i) else {
                continue;
            };
            if std::ptr::eq(census.metric, &crate::threads::THREAD_COUNT) {
                p.threads = Some(census.total());
                continue;
            }
            p.runtime = info.runtime.to_owned();
            p.tasks = census.total();
            p.by_state = census
                .counts
                .iter()
                .map(|((state, reason), n)| ((*state).to_owned(), reason.to_string(), *n))
                .collect();
        }
        for p in &mut processes {
            let history = self.history.entry(p.pid).or_default();
            history.push_back((now, p.tasks));
            if history.len() > HISTORY {
                history.pop_front();
            }
            p.growth_per_minute = match (history.front(), history.back()) {
                (Some((t0, n0)), Some((t1, n1))) if t1 - t0 >= 10.0 => {
                    Some((*n1 as f64 - *n0 as f64) * 60.0 / (t1 - t0))
                }
                _ => None,
            };
            p.history = history.iter().map(|(_, n)| *n).collect();
        }
        let watched: std::collections::HashSet<u32> = processes.iter().map(|p| p.pid).collect();
        self.history.retain(|pid, _| watched.contains(pid));
        let alerts = m
            .firing
            .iter()
            .map(|(pid, a)| alert_view(*pid, a))
            .collect();
        let view = View {
            time: now,
            processes,
            alerts,
            memory_bytes: m.health.memory_bytes,
            last_scan_seconds: m.health.last_scan_seconds,
        };
        *self
            .shared
            .view
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = view;
        *self
            .shared
            .firing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = m
            .firing
            .iter()
            .map(|(pid, a)| (*pid, (*a).clone()))
            .collect();
    }

    fn close(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn alert_view(pid: u32, a: &Alert) -> AlertView {
    let site = |s: &crate::detect::Site| format!("{} {}:{}", s.function, s.file, s.line);
    AlertView {
        pid,
        kind: a.kind.name.to_owned(),
        count: a.count,
        oldest_seconds: a.oldest_seconds,
        growth_per_minute: a.growth_per_minute,
        wait_reason: a.group.wait_reason.as_deref().map(str::to_owned),
        entry: a.group.entry.to_string(),
        blocked_at: a.group.blocked_at.as_deref().map(site),
        created_at: a.group.created_at.as_deref().map(site),
        proof: a.proof.map(|p| p.name.to_owned()),
        proven: a.proven,
        hint: a.hint.to_owned(),
    }
}
