//! One task as a dump shows it: what a runtime fills, and every format reads.

use std::sync::Arc;

use serde::Serialize;

use crate::detect::{GroupKey, WaitsOn};

/// One task as a dump shows it.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Task {
    /// Its id in its runtime (goroutine id, tokio task id).
    pub id: u64,
    /// Go: "waiting", "runnable", "running", "syscall"; tokio: "idle", "scheduled", "running".
    pub state: &'static str,
    /// Why it waits, in its runtime's words ("chan send", "no waker").
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wait_reason: Option<Arc<str>>,
    /// How long it has waited, at least.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waiting_ns: Option<u64>,
    /// The function it started in (a tokio task's future type).
    pub entry: Arc<str>,
    /// Innermost first; empty when it cannot be read without stopping the task (running).
    pub stack: Arc<[Frame]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created_by: Option<Creator>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waits_on: Option<Arc<WaitsOn>>,
    /// The alert kind leakmon judges it part of, where it has one ("goroutine_leak").
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verdict: Option<&'static str>,
    /// Proven leaked: nothing can ever wake it.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub proven: bool,
    /// tokio: whether a waker is registered ("registered", "none").
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waker: Option<&'static str>,
    /// The group the detector puts it in while it waits (to name the alerts it is part of).
    #[serde(skip)]
    pub group: Option<GroupKey>,
    /// The OS thread it runs on, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub thread: Option<u32>,
}

/// One frame of a stack. Frames inlined into one call share its `pc`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub(crate) struct Frame {
    pub function: Arc<str>,
    pub file: Arc<str>,
    pub line: u32,
    /// The return address (or, innermost, where it stopped) in the process; 0 when unknown.
    #[serde(serialize_with = "hex")]
    pub pc: u64,
    /// `pc` minus its function's entry, for the outermost frame at `pc` (inlined frames have
    /// none, as in Go's tracebacks).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    /// Inlined into the next frame (the same call): a physical frame is the run of frames up
    /// to the first that is not (a function recursing from one call site repeats its pc).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub inlined: bool,
}

/// A stack's physical frames: each the inlined calls it holds, then itself.
pub(crate) fn physical(frames: &[Frame]) -> impl Iterator<Item = &[Frame]> {
    frames.split_inclusive(|f| !f.inlined)
}

/// Who created a task.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Creator {
    /// The creating task's id, when its runtime records it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task: Option<u64>,
    /// The statement that created it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub frame: Option<Frame>,
}

pub(super) fn hex<S: serde::Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{v:#x}"))
}
