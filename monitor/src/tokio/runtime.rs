//! tokio in the registry: recognising executables and shared libraries that link tokio, and
//! inspecting the processes that run them.

use std::{fs::File, path::Path, sync::Arc};

use super::{TokioBinary, TokioError, TokioTarget, kinds};
use crate::{
    runtime::{Context, Entry, Process, Program, Runtime, RuntimeError, TaskSource},
    threads::symbols::Symbolizer,
};

pub(crate) static RUNTIME: Entry = Entry {
    name: "tokio",
    title: "tokio",
    task_word: "task",
    kinds: kinds::KINDS,
    count: &kinds::TASKS,
    start,
};

fn start(ctx: &Context) -> Arc<dyn Runtime> {
    Arc::new(Tokio {
        symbolizer: ctx.symbolizer.clone(),
    })
}

struct Tokio {
    /// Names future types from the code of their tasks.
    symbolizer: Symbolizer,
}

impl Runtime for Tokio {
    fn entry(&self) -> &'static Entry {
        &RUNTIME
    }

    fn absent(&self) -> &'static str {
        "not a tokio program (nor maps a library with tokio)"
    }

    /// A Rust library loaded by Python, C or another runtime (a cdylib) may run tokio.
    fn in_libraries(&self) -> bool {
        true
    }

    fn recognise(
        &self,
        file: &File,
        _path: &Path,
    ) -> Result<Option<Arc<dyn Program>>, RuntimeError> {
        match TokioBinary::read(file.try_clone()?) {
            Ok(binary) => Ok(Some(Arc::new(TokioProgram {
                binary: Arc::new(binary),
                symbolizer: self.symbolizer.clone(),
            }))),
            Err(TokioError::NotTokio) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}

struct TokioProgram {
    binary: Arc<TokioBinary>,
    symbolizer: Symbolizer,
}

impl Program for TokioProgram {
    fn inspect(&self, p: &Process) -> Result<Option<Box<dyn TaskSource>>, RuntimeError> {
        match TokioTarget::inspect(p, Arc::clone(&self.binary), self.symbolizer.clone()) {
            Ok(target) => Ok(Some(Box::new(target))),
            // Links tokio but runs none of it (yet): looked at again later.
            Err(TokioError::NoRuntime) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    fn in_use(&self) -> bool {
        Arc::strong_count(&self.binary) > 1
    }
}
