//! Every task of a process now, read from outside with no pause and no change to the program:
//! what `leakmon dump` prints, in the formats people already read (Go's goroutine dump text and
//! its grouped `debug=1` form, JSON, a pprof goroutine profile for `go tool pprof`). Runtimes
//! fill [`Task`]s; nothing here names one.

mod pprof;
mod take;
pub(crate) mod task;
mod text;

use std::sync::Arc;

use serde::Serialize;

pub(crate) use self::take::{DumpOptions, MAX_LISTED, take};
pub(crate) use self::task::{Creator, Frame, Task, physical};
use crate::runtime::ProcessInfo;

/// One process's tasks at one instant.
#[derive(Debug, Serialize)]
pub(crate) struct Dump {
    pub process: ProcessInfo,
    /// What its tasks are called ("goroutine", "task").
    pub task_word: &'static str,
    /// When it was taken (Unix time, nanoseconds).
    pub taken_unix_ns: u64,
    pub tasks: Vec<Task>,
    /// What the dump leaves out or could not tell, and why.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

/// How a dump is written.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Deserialize, serde::Serialize,
)]
#[serde(rename_all = "lowercase")]
pub(crate) enum DumpFormat {
    /// Every task with its stack, like Go's `debug=2` goroutine dump
    Text,
    /// Identical stacks counted, like Go's `debug=1` goroutine profile text
    Grouped,
    Json,
    /// A gzipped profile.proto goroutine profile, for `go tool pprof`
    Pprof,
}

impl Dump {
    /// Writes the dump in `format`.
    pub(crate) fn write(
        &self,
        format: DumpFormat,
        out: &mut dyn std::io::Write,
    ) -> std::io::Result<()> {
        match format {
            DumpFormat::Text => text::full(self, out),
            DumpFormat::Grouped => text::grouped(self, out),
            DumpFormat::Json => {
                serde_json::to_writer_pretty(&mut *out, self)?;
                writeln!(out)
            }
            DumpFormat::Pprof => pprof::write(self, out),
        }
    }

    /// Keeps only the tasks proven leaked.
    pub(crate) fn leaked_only(&mut self) {
        self.tasks.retain(|t| t.proven);
    }
}

/// What grouped forms group tasks by beside their stack, as Go's own profiles group by stack
/// and labels.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct Labels {
    state: &'static str,
    wait_reason: Option<Arc<str>>,
    verdict: Option<&'static str>,
}

impl Labels {
    fn of(task: &Task) -> Self {
        Self {
            state: task.state,
            wait_reason: task.wait_reason.clone().filter(|r| !r.is_empty()),
            verdict: task.verdict,
        }
    }
}

/// The frames of a task as profiles and grouped text show them: its stack, or when that
/// cannot be read, its entry alone (a running goroutine, an idle tokio task).
fn frames_of(task: &Task) -> std::borrow::Cow<'_, [Frame]> {
    if task.stack.is_empty() {
        std::borrow::Cow::Owned(vec![Frame {
            function: Arc::clone(&task.entry),
            file: Arc::from("?"),
            line: 0,
            pc: 0,
            offset: None,
            inlined: false,
        }])
    } else {
        std::borrow::Cow::Borrowed(&task.stack)
    }
}
