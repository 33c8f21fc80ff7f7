//! Every runtime leakmon watches. Adding one is a folder beside `go/` and `tokio/` that exposes
//! an [`Entry`], and a line here.

use super::Entry;

/// In the order programs are tried: an executable is recognised by the first that knows it.
pub(crate) static RUNTIMES: &[&Entry] = &[&crate::go::RUNTIME, &crate::tokio::RUNTIME];
