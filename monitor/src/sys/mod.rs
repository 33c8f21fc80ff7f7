//! Host facts and process plumbing: capabilities, tracefs, kernel features, signals, memory,
//! and workers for work on targets.

pub mod caps;
pub mod memory;
pub mod signals;
pub mod tracefs;
pub mod workers;
