//! Host facts and process plumbing: capabilities, tracefs, kernel features, signals, memory,
//! and workers for work on targets.

pub(crate) mod caps;
pub(crate) mod memory;
pub(crate) mod perf;
pub(crate) mod signals;
pub(crate) mod tracefs;
pub(crate) mod workers;

/// An error and its causes on one line ("attaching go_park: permission denied"), for logs
/// (error messages do not repeat their source: `{e}` alone says only the first).
pub(crate) fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
