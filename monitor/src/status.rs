//! What the running daemon says of itself, for `leakmon doctor`: written after every scan of
//! `leakmon run` to /run/leakmon/status.json (the unit's RuntimeDirectory, an emptyDir in the
//! pod), read by `doctor` from another process.

use std::path::Path;

use serde::{Deserialize, Serialize};

pub(crate) const STATUS_FILE: &str = "/run/leakmon/status.json";

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct Status {
    pub pid: u32,
    /// Resident and allocated (anonymous) memory, and the budget, in bytes.
    pub rss_bytes: u64,
    pub anon_bytes: u64,
    pub budget_bytes: u64,
    /// The symbol and unwind cache: bytes and modules held, modules evicted so far.
    pub cache_bytes: u64,
    pub cache_modules: usize,
    pub cache_evicted: u64,
    /// Processes whose tasks are watched (they run a runtime leakmon knows).
    #[serde(alias = "go_processes")]
    pub task_processes: usize,
    /// Processes skipped because work on them overran the target timeout.
    pub unresponsive: usize,
    /// Unix time of the scan that wrote it.
    pub time: f64,
}

impl Status {
    /// Writes it next to `path` and renames it over (readers never see half a file). Errors
    /// are the caller's to log: a read-only file system costs only the doctor's view.
    pub(crate) fn write(&self, path: &Path) -> std::io::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension("json.tmp");
        std::fs::write(
            &tmp,
            serde_json::to_vec(self).map_err(std::io::Error::other)?,
        )?;
        std::fs::rename(&tmp, path)
    }

    /// The status the daemon last wrote, if it is running (its PID alive).
    pub(crate) fn read(path: &Path) -> Option<Self> {
        let bytes = crate::proc::files::read_proc_capped(&path.to_string_lossy(), 64 << 10).ok()?;
        let status: Self = serde_json::from_slice(&bytes).ok()?;
        crate::proc::is_alive(status.pid).then_some(status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_only_for_a_live_daemon() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("status.json");
        let mut status = Status {
            pid: std::process::id(),
            rss_bytes: 20 << 20,
            cache_evicted: 3,
            ..Status::default()
        };
        status.write(&path).unwrap();
        assert_eq!(Status::read(&path), Some(status.clone()));
        status.pid = 999_999_999;
        status.write(&path).unwrap();
        assert_eq!(Status::read(&path), None);
    }
}
