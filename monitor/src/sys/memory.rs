//! The daemon's own memory: what it uses, and handing freed memory back to the system.

/// Resident set size of this process, in bytes.
pub fn rss_bytes() -> u64 {
    let Ok(statm) = std::fs::read_to_string("/proc/self/statm") else {
        return 0;
    };
    // SAFETY: sysconf has no preconditions.
    let page = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
    statm
        .split_whitespace()
        .nth(1)
        .and_then(|f| f.parse::<u64>().ok())
        .map_or(0, |pages| pages * page)
}

/// Returns freed heap memory to the system: after caches are evicted, glibc would otherwise
/// keep it, and the daemon's footprint would never come down.
pub fn release_free() {
    // SAFETY: malloc_trim has no preconditions.
    unsafe { libc::malloc_trim(0) };
}
