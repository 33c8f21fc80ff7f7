//! What the daemon's socket says: one JSON request line from the client; one JSON reply line,
//! then for a dump its bytes. Owned types, so the client reads what the daemon wrote.

use serde::{Deserialize, Serialize};

use crate::dump::DumpFormat;

/// Where `leakmon run` serves, unless set otherwise.
pub(crate) const DEFAULT_SOCKET: &str = "/run/leakmon/leakmon.sock";

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub(crate) enum Request {
    /// What the daemon sees: processes, their task counts, firing alerts.
    View,
    /// Every task of one process, now.
    Dump {
        pid: u32,
        format: DumpFormat,
        leaked: bool,
    },
}

/// The first line of every reply.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Reply {
    /// A view follows on this line.
    View(View),
    /// The dump's `len` bytes follow.
    Dump {
        len: u64,
    },
    Error(String),
}

/// What the daemon saw at its last scan.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct View {
    /// When (Unix time, seconds).
    pub time: f64,
    pub processes: Vec<ProcessView>,
    pub alerts: Vec<AlertView>,
    pub memory_bytes: u64,
    pub last_scan_seconds: f64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct ProcessView {
    pub pid: u32,
    pub exe: String,
    pub runtime: String,
    #[serde(default)]
    pub pod: Option<String>,
    /// Tasks now (0 for a process whose runtime leakmon does not read).
    pub tasks: u64,
    /// Threads now, when the thread probes run.
    #[serde(default)]
    pub threads: Option<u64>,
    /// (state, wait reason or "", tasks).
    pub by_state: Vec<(String, String, u64)>,
    /// Tasks at the last scans, oldest first.
    pub history: Vec<u64>,
    /// Net change per minute over that history, once it covers 10 s.
    #[serde(default)]
    pub growth_per_minute: Option<f64>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct AlertView {
    pub pid: u32,
    pub kind: String,
    pub count: u64,
    pub oldest_seconds: f64,
    #[serde(default)]
    pub growth_per_minute: Option<f64>,
    #[serde(default)]
    pub wait_reason: Option<String>,
    pub entry: String,
    /// "function file:line".
    #[serde(default)]
    pub blocked_at: Option<String>,
    #[serde(default)]
    pub created_at: Option<String>,
    /// How the members are known to be leaked.
    #[serde(default)]
    pub proof: Option<String>,
    pub proven: u64,
    pub hint: String,
}
