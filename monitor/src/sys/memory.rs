//! The daemon's own memory: what it uses, and handing freed memory back to the system.

/// Resident set size of this process, in bytes.
pub(crate) fn rss_bytes() -> u64 {
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

/// Anonymous resident memory of this process (what it allocated), in bytes.
pub(crate) fn anon_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("RssAnon:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib << 10)
}

/// Returns freed heap memory to the system: after caches are evicted, glibc would otherwise
/// keep it, and the daemon's footprint would never come down.
pub(crate) fn release_free() {
    // SAFETY: malloc_trim has no preconditions.
    unsafe { libc::malloc_trim(0) };
}

/// Tunes glibc's malloc for a daemon whose big allocations are short-lived (a file's tables,
/// read, parsed and dropped). Two arenas: by default each worker thread gets one, and memory
/// freed there stays with it (malloc_trim does not hand it back): measured here, 100 MiB kept
/// after twenty short-lived Go programs came and went, 10 MiB with this. A fixed mmap
/// threshold: buffers over 256 KiB are mapped and unmapped on free, instead of the threshold
/// rising after the first such free and later ones fragmenting the heap (48 MiB peaks while
/// five Go programs were inspected, against 30 MiB). Call before starting threads.
pub(crate) fn tune_malloc() {
    // SAFETY: mallopt has no preconditions; both take a plain value.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 10);
    }
}
