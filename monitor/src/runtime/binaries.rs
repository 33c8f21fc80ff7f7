//! Programs recognised by a runtime, shared by the processes that run them, and the files
//! found to run none (so a host's other programs are read once, not at every exec). Shared
//! with the workers that inspect processes; the lock is held for lookups only, never while
//! reading.

use std::{
    collections::{HashMap, HashSet},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use super::{Process, Program, Runtime, RuntimeError, TaskSource};
use crate::{
    proc::{self, BinaryKey, Library, ProcError, files},
    sys::workers::Gate,
};

/// A runtime's program, in the executable or in `library`.
struct FoundProgram {
    program: Arc<dyn Program>,
    runtime: &'static str,
    library: Option<Library>,
}

/// What a process's executable (or a library it maps) was found to run.
enum Found {
    /// Programs of one runtime: the executable's, then the libraries'; never empty.
    Programs(Vec<FoundProgram>),
    /// No runtime leakmon knows: what each runtime said it is not.
    Plain,
    /// Another inspection kept it waiting: tried again at the next scan.
    Busy,
}

/// What inspecting a process found.
pub(crate) enum Inspected {
    Source(Box<dyn TaskSource>),
    /// It runs no runtime leakmon knows (or none of it yet): its executable.
    Plain(PathBuf),
    /// Another inspection kept it waiting: tried again at the next scan.
    Busy,
}

/// Why a process could not be inspected.
#[derive(Debug, thiserror::Error)]
pub(crate) enum InspectError {
    #[error(transparent)]
    Proc(#[from] ProcError),
    #[error(transparent)]
    Open(#[from] files::FileError),
    #[error("PID {pid} ({path}): not watching its {runtime} tasks")]
    Runtime {
        pid: u32,
        path: PathBuf,
        runtime: &'static str,
        #[source]
        source: RuntimeError,
    },
}

#[derive(Clone)]
pub(crate) struct Binaries {
    runtimes: Arc<[Arc<dyn Runtime>]>,
    inner: Arc<Mutex<Cache>>,
    /// One inspection at a time: each may read a binary's tables whole.
    gate: Arc<Gate>,
}

/// How long an inspection waits for another; when one is taken to be stuck.
const INSPECT_WAIT: Duration = Duration::from_secs(2);
const INSPECT_STUCK: Duration = Duration::from_secs(5);
/// Files remembered as running no runtime, at most (then the set starts again).
const MAX_PLAIN: usize = 16_384;
/// Libraries of one process looked at, at most.
const MAX_LIBRARIES: usize = 512;
/// Builds of one runtime watched in one process, at most.
const MAX_BUILDS: usize = 4;

/// A library by (device, inode) as /proc/PID/maps names it.
type LibraryKey = (String, u64);

#[derive(Default)]
struct Cache {
    programs: HashMap<BinaryKey, (Arc<dyn Program>, &'static str)>,
    plain: HashSet<BinaryKey>,
    libraries: HashMap<LibraryKey, (Arc<dyn Program>, &'static str)>,
    plain_libraries: HashSet<LibraryKey>,
}

impl Binaries {
    pub(crate) fn new(runtimes: Arc<[Arc<dyn Runtime>]>) -> Self {
        Self {
            runtimes,
            inner: Arc::default(),
            gate: Arc::new(Gate::new(INSPECT_STUCK, 4)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// What every runtime says a plain program is not, in one sentence.
    pub(crate) fn absent(&self) -> String {
        let said: Vec<&str> = self.runtimes.iter().map(|r| r.absent()).collect();
        said.join(", ")
    }

    /// Inspects `pid` with the runtime its executable (or a library it maps) runs: every
    /// build of it the process maps, as one source. Reads what the target controls: on a
    /// worker.
    pub(crate) fn inspect(&self, pid: u32) -> Result<Inspected, InspectError> {
        proc::check_exe_not_on_fuse(pid, &proc::maps::fuse_mappings(pid))?;
        let exe = proc::exe_path(pid)?;
        let key = BinaryKey::of(pid)?;
        let found = match self.open(pid, key, &exe)? {
            Found::Programs(found) => found,
            Found::Plain => return Ok(Inspected::Plain(exe)),
            Found::Busy => return Ok(Inspected::Busy),
        };
        let mut sources: Vec<(Box<dyn TaskSource>, String)> = Vec::new();
        let mut first_error = None;
        for f in found {
            let path = f
                .library
                .as_ref()
                .map_or_else(|| exe.clone(), |l| l.path.clone());
            let process = Process {
                pid,
                runtime: f.runtime,
                key,
                exe: exe.clone(),
                library: f.library,
            };
            match f.program.inspect(&process) {
                Ok(Some(source)) => {
                    let file = path.file_name().map_or_else(
                        || path.display().to_string(),
                        |n| n.to_string_lossy().into_owned(),
                    );
                    sources.push((source, file));
                }
                Ok(None) => {}
                Err(source) => {
                    let e = InspectError::Runtime {
                        pid,
                        path,
                        runtime: f.runtime,
                        source,
                    };
                    // Said here when another build of the process is watched all the same.
                    if first_error.is_some() {
                        log::warn!("{}", crate::sys::chain(&e));
                    } else {
                        first_error = Some(e);
                    }
                }
            }
        }
        match sources.len() {
            0 => match first_error {
                Some(e) => Err(e),
                None => Ok(Inspected::Plain(exe)),
            },
            n => {
                if let Some(e) = first_error {
                    log::warn!("{}", crate::sys::chain(&e));
                }
                if n == 1 {
                    let (source, _) = sources.remove(0);
                    Ok(Inspected::Source(source))
                } else {
                    Ok(Inspected::Source(Box::new(super::combined::Combined::new(
                        sources,
                    ))))
                }
            }
        }
    }

    /// What `pid`'s executable runs and every library it maps that runs the same runtime
    /// (when that runtime is looked for in libraries); else the libraries of the first
    /// runtime found in one.
    fn open(&self, pid: u32, key: BinaryKey, exe: &Path) -> Result<Found, InspectError> {
        match self.open_exe(pid, key, exe)? {
            Found::Plain => self.in_libraries(pid, key, None),
            Found::Programs(mut found) => {
                let runtime = found[0].runtime;
                let looked_for = self
                    .runtimes
                    .iter()
                    .any(|r| r.entry().name == runtime && r.in_libraries());
                if looked_for {
                    match self.in_libraries(pid, key, Some(runtime))? {
                        Found::Programs(more) => found.extend(more),
                        Found::Plain => {}
                        Found::Busy => return Ok(Found::Busy),
                    }
                }
                Ok(Found::Programs(found))
            }
            Found::Busy => Ok(Found::Busy),
        }
    }

    fn open_exe(&self, pid: u32, key: BinaryKey, exe: &Path) -> Result<Found, InspectError> {
        let cached = || {
            let cache = self.lock();
            if let Some((program, runtime)) = cache.programs.get(&key) {
                return Some(Found::Programs(vec![FoundProgram {
                    program: Arc::clone(program),
                    runtime,
                    library: None,
                }]));
            }
            cache.plain.contains(&key).then_some(Found::Plain)
        };
        if let Some(known) = cached() {
            return Ok(known);
        }
        let Some(_entered) = self.gate.enter(INSPECT_WAIT) else {
            return Ok(Found::Busy);
        };
        if let Some(known) = cached() {
            return Ok(known);
        }
        // Through /proc, so a binary in another mount namespace is found.
        let path = PathBuf::from(format!("/proc/{pid}/exe"));
        let file = files::open_checked(&path, Some(key.ino()))?;
        for runtime in self.runtimes.iter() {
            let program =
                runtime
                    .recognise(&file, &path)
                    .map_err(|source| InspectError::Runtime {
                        pid,
                        path: exe.to_path_buf(),
                        runtime: runtime.entry().name,
                        source,
                    })?;
            if let Some(program) = program {
                let name = runtime.entry().name;
                self.lock()
                    .programs
                    .insert(key, (Arc::clone(&program), name));
                return Ok(Found::Programs(vec![FoundProgram {
                    program,
                    runtime: name,
                    library: None,
                }]));
            }
        }
        remember(&mut self.lock().plain, key);
        Ok(Found::Plain)
    }

    /// The shared libraries `pid` maps that run a runtime looked for in libraries: those of
    /// `only`, or of the first runtime found in one (at most [`MAX_BUILDS`]). Libraries are
    /// read once per file (through map_files, never from FUSE), and remembered either way.
    /// Keyed by device and inode as /proc/PID/maps gives them (no stat needed): a library is
    /// replaced by a new file, not rewritten in place (which would crash the processes that
    /// map it).
    fn in_libraries(
        &self,
        pid: u32,
        exe: BinaryKey,
        mut only: Option<&'static str>,
    ) -> Result<Found, InspectError> {
        let runtimes: Vec<&Arc<dyn Runtime>> = self
            .runtimes
            .iter()
            .filter(|r| r.in_libraries() && only.is_none_or(|o| o == r.entry().name))
            .collect();
        if runtimes.is_empty() {
            return Ok(Found::Plain);
        }
        let Ok(maps) = proc::maps::read(pid) else {
            return Ok(Found::Plain);
        };
        let fuse = files::fuse_devices(pid);
        let mut seen = HashSet::new();
        let libraries = maps
            .iter()
            .filter(|m| m.exec && m.file.1 != exe.ino() && !fuse.contains(&m.file.0))
            .filter(|m| seen.insert(m.file.clone()))
            .take(MAX_LIBRARIES);
        let mut entered = None;
        let mut found: Vec<FoundProgram> = Vec::new();
        for m in libraries {
            if found.len() >= MAX_BUILDS {
                break;
            }
            let library = Library {
                path: PathBuf::from(&*m.path),
                ino: m.file.1,
            };
            let mut take = |program: Arc<dyn Program>, runtime: &'static str| {
                if only.is_none_or(|o| o == runtime) {
                    only = Some(runtime);
                    found.push(FoundProgram {
                        program,
                        runtime,
                        library: Some(library.clone()),
                    });
                }
            };
            {
                let cache = self.lock();
                if let Some((program, runtime)) = cache.libraries.get(&m.file) {
                    take(Arc::clone(program), runtime);
                    continue;
                }
                if cache.plain_libraries.contains(&m.file) {
                    continue;
                }
            }
            if entered.is_none() {
                entered = self.gate.enter(INSPECT_WAIT);
                if entered.is_none() {
                    return Ok(Found::Busy);
                }
            }
            let Ok(file) = files::open_mapped(pid, m.start, m.end, m.file.1) else {
                continue;
            };
            let mut runs = None;
            for runtime in &runtimes {
                match runtime.recognise(&file, &library.path) {
                    Ok(Some(program)) => {
                        runs = Some((program, runtime.entry().name));
                        break;
                    }
                    Ok(None) => {}
                    // Said once per file, and the other libraries are still looked at.
                    Err(source) => log::warn!(
                        "not watching PID {pid}: {}",
                        crate::sys::chain(&InspectError::Runtime {
                            pid,
                            path: library.path.clone(),
                            runtime: runtime.entry().name,
                            source,
                        })
                    ),
                }
            }
            match runs {
                Some((program, name)) => {
                    self.lock()
                        .libraries
                        .insert(m.file.clone(), (Arc::clone(&program), name));
                    take(program, name);
                }
                None => remember(&mut self.lock().plain_libraries, m.file.clone()),
            }
        }
        Ok(if found.is_empty() {
            Found::Plain
        } else {
            Found::Programs(found)
        })
    }

    /// Drops programs no watched process runs any more (their files stay open otherwise).
    pub(crate) fn evict_unused(&self) {
        let mut cache = self.lock();
        cache.programs.retain(|_, (p, _)| p.in_use());
        cache.libraries.retain(|_, (p, _)| p.in_use());
    }
}

/// Remembers a file that runs no runtime; a set at its limit starts again.
fn remember<K: Eq + std::hash::Hash>(plain: &mut HashSet<K>, key: K) {
    if plain.len() >= MAX_PLAIN {
        plain.clear();
    }
    plain.insert(key);
}
