//! leakmon: finds leaked, stuck and spinning goroutines in running Go programs, and deadlocked,
//! stuck and leaking OS threads in any program, through eBPF.
//!
//! The binary is a thin CLI over this library; detection (`detect`) runs on plain observations
//! so it is tested without a kernel.

pub mod bpf;
pub mod cli;
pub mod config;
pub mod detect;
pub mod doctor;
pub mod export;
pub mod fuzzing;
pub mod go;
pub mod output;
pub mod proc;
pub mod runtime;
pub mod status;
pub mod sys;
pub mod threads;
pub mod tokio;
pub mod watch;
