//! Go in the registry: recognising Go executables, and inspecting the processes that run them.

use std::{fs::File, path::Path, sync::Arc};

use super::{GoBinary, GoError, budget::ReachBudget, kinds, target::Target};
use crate::runtime::{Context, Entry, Process, Program, Runtime, RuntimeError, TaskSource};

pub(crate) static RUNTIME: Entry = Entry {
    name: "go",
    title: "Go",
    task_word: "goroutine",
    kinds: kinds::KINDS,
    count: &kinds::GOROUTINES,
    start,
};

fn start(ctx: &Context) -> Arc<dyn Runtime> {
    Arc::new(Go {
        unvalidated: ctx.unvalidated,
        probe_parks: ctx.probe_parks,
        reach: Arc::new(ReachBudget::new(ctx.reach_budget)),
    })
}

struct Go {
    /// Go versions newer than the last validated one are watched.
    unvalidated: bool,
    probe_parks: bool,
    /// What proofs may spend, shared by every Go process.
    reach: Arc<ReachBudget>,
}

impl Runtime for Go {
    fn entry(&self) -> &'static Entry {
        &RUNTIME
    }

    fn absent(&self) -> &'static str {
        "not a Go executable"
    }

    fn recognise(
        &self,
        file: &File,
        path: &Path,
    ) -> Result<Option<Arc<dyn Program>>, RuntimeError> {
        match GoBinary::from_file(file.try_clone()?, path, self.unvalidated) {
            Ok(binary) => Ok(Some(Arc::new(GoProgram {
                binary: Arc::new(binary),
                probe_parks: self.probe_parks,
                reach: Arc::clone(&self.reach),
            }))),
            Err(GoError::NotGo | GoError::NotElf { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}

struct GoProgram {
    binary: Arc<GoBinary>,
    probe_parks: bool,
    reach: Arc<ReachBudget>,
}

impl Program for GoProgram {
    fn inspect(&self, p: &Process) -> Result<Option<Box<dyn TaskSource>>, RuntimeError> {
        let target = Target::inspect(
            p,
            Arc::clone(&self.binary),
            self.probe_parks,
            Arc::clone(&self.reach),
        )?;
        Ok(Some(Box::new(target)))
    }

    fn in_use(&self) -> bool {
        Arc::strong_count(&self.binary) > 1
    }
}
