//! The effective capabilities of this process (from /proc/self/status, no libcap needed).

pub(crate) const CAP_DAC_READ_SEARCH: u32 = 2;
pub(crate) const CAP_SYS_PTRACE: u32 = 19;
pub(crate) const CAP_SYS_ADMIN: u32 = 21;
pub(crate) const CAP_PERFMON: u32 = 38;
pub(crate) const CAP_BPF: u32 = 39;
/// Opening `/proc/PID/map_files` (kernel 5.9+; CAP_SYS_ADMIN before, and as an alternative).
pub(crate) const CAP_CHECKPOINT_RESTORE: u32 = 40;

pub(crate) fn name(cap: u32) -> &'static str {
    match cap {
        CAP_DAC_READ_SEARCH => "CAP_DAC_READ_SEARCH",
        CAP_SYS_PTRACE => "CAP_SYS_PTRACE",
        CAP_SYS_ADMIN => "CAP_SYS_ADMIN",
        CAP_PERFMON => "CAP_PERFMON",
        CAP_BPF => "CAP_BPF",
        CAP_CHECKPOINT_RESTORE => "CAP_CHECKPOINT_RESTORE",
        _ => "CAP_?",
    }
}

/// The effective capability set, or 0 if it cannot be read.
pub(crate) fn effective() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0)
}

/// Whether this process may open other processes' `/proc/PID/map_files` (the libraries a
/// thread's frames are in): CAP_CHECKPOINT_RESTORE, or CAP_SYS_ADMIN.
pub(crate) fn can_open_map_files() -> bool {
    let eff = effective();
    eff & (1u64 << CAP_CHECKPOINT_RESTORE) != 0 || eff & (1u64 << CAP_SYS_ADMIN) != 0
}

/// Names of the capabilities in `wanted` that this process lacks.
pub(crate) fn missing(wanted: &[u32]) -> Vec<&'static str> {
    let eff = effective();
    wanted
        .iter()
        .filter(|c| eff & (1u64 << **c) == 0)
        .map(|c| name(*c))
        .collect()
}
