//! Host facts: capabilities, tracefs, kernel features.

pub mod caps;
pub mod tracefs;
