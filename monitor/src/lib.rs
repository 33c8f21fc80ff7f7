#![warn(unreachable_pub)]
//! leakmon: finds leaked, stuck and spinning tasks (Go goroutines, tokio tasks) in running
//! programs, and deadlocked, stuck and leaking OS threads in any program, through eBPF.
//!
//! The binary is a thin CLI over this library; detection (`detect`) runs on plain observations
//! so it is tested without a kernel. Each runtime is a folder behind `runtime`'s registry.
//! Only the CLI and the fuzz entry points are public: the compiler reports what nothing uses.

mod bpf;
pub mod cli;
mod config;
mod detect;
mod doctor;
mod dump;
pub mod fuzzing;
mod go;
mod output;
mod proc;
mod runtime;
mod status;
mod sys;
mod threads;
mod tokio;
mod top;
mod watch;
