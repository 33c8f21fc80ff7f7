//! Inspection of Go executables (x86_64 ELF, go1.21 to go1.27): toolchain
//! version, `runtime.g` field offsets, wait reason names, uprobe sites and
//! PC symbolization via `.gopclntab`.
//!
//! Everything works on stripped binaries (`-ldflags="-s -w"`): struct
//! offsets and wait reasons then come from a built-in table generated from
//! real toolchains (see `table.rs`).

mod budget;
mod buildinfo;
mod elf;
mod heap;
mod kinds;
mod layouts;
mod offsets;
mod pclntab;
mod policy;
mod prologue;
mod reach;
mod runtime;
mod stackmaps;
mod symbols;
mod table;
mod target;
mod task;
mod waitreasons;
mod waits;

#[cfg(test)]
mod policy_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod testutil;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use thiserror::Error;

pub(crate) use buildinfo::GoVersion;
pub(crate) use policy::GO;
pub(crate) use runtime::RUNTIME;

use elf::{Elf, Segment};
use layouts::{HeapOffsets, ModuleDataOffsets};
use pclntab::{GoFunc, Pclntab};
use prologue::Prologue;

/// Oldest supported minor version of Go 1.
pub(crate) const MIN_MINOR: u32 = 21;

/// The runtime functions leakmon's uprobes attach to (see monitor-ebpf/src/main.rs for what
/// each one records): a park, a reschedule without parking, an exit.
pub(crate) const GOPARK: &str = "runtime.gopark";
pub(crate) const GOSCHED_IMPL: &str = "runtime.goschedImpl";
pub(crate) const GOEXIT1: &str = "runtime.goexit1";
pub(crate) const PROBED: [&str; 3] = [GOPARK, GOSCHED_IMPL, GOEXIT1];
/// Newest minor version with a built-in table. Newer versions still work
/// when the binary has DWARF and a symbol table.
pub(crate) const MAX_TABLE_MINOR: u32 = 27;
/// Largest section read or inflated from a binary, in MiB.
pub(crate) const MAX_SECTION_MIB: u64 = 256;

/// Errors from inspecting a Go binary.
#[derive(Debug, Error)]
#[non_exhaustive]
pub(crate) enum GoError {
    #[error("cannot read {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("not an ELF file; point leakmon at a Go executable")]
    NotElf {
        #[source]
        source: Option<object::Error>,
    },
    #[error("unsupported architecture: {arch}; only x86_64 (amd64) Go binaries are supported")]
    UnsupportedArch { arch: String },
    #[error("malformed ELF: cannot read {what}")]
    Elf {
        what: String,
        #[source]
        source: object::Error,
    },
    #[error("not a Go executable: no .go.buildinfo section")]
    NotGo,
    #[error("malformed .go.buildinfo: {0}")]
    BadBuildInfo(&'static str),
    #[error("unrecognised go version {0:?} in .go.buildinfo")]
    BadVersion(String),
    #[error("{version} is not supported (supported: go1.{MIN_MINOR} to go1.{MAX_TABLE_MINOR})")]
    UnsupportedVersion { version: GoVersion },
    #[error(
        "{version} is newer than go1.{MAX_TABLE_MINOR}, the last version leakmon was validated \
         against (goroutine status codes and field meanings may have changed); set \
         go_unvalidated = true (--go-unvalidated) to watch it anyway"
    )]
    NotValidated { version: GoVersion },
    #[error(
        "section {name} declares {size} bytes, over the {MAX_SECTION_MIB} MiB read from one section"
    )]
    SectionTooLarge { name: String, size: u64 },
    #[error("no .gopclntab section: cannot map addresses to functions; rebuild with the Go linker")]
    NoPclntab,
    #[error(
        "unsupported .gopclntab magic {magic:#x} (expected 0xfffffff1, the go1.20+ layout); \
         rebuild with go1.{MIN_MINOR} or newer"
    )]
    UnsupportedPclntab { magic: u32 },
    #[error("malformed .gopclntab: {0}")]
    BadPclntab(&'static str),
    #[error("cannot parse DWARF debug info")]
    Dwarf {
        #[source]
        source: gimli::Error,
    },
    #[error("DWARF has no {what}; the runtime layout changed, leakmon needs updating")]
    DwarfMissing { what: String },
    #[error(
        "stripped binary: no DWARF and no built-in table for {version}; \
         rebuild without -ldflags=-s -w"
    )]
    NoOffsets { version: GoVersion },
    #[error(
        "stripped binary: no symbol table and no built-in wait reason table for {version}; \
         rebuild without -ldflags=-s"
    )]
    NoWaitReasons { version: GoVersion },
    #[error("runtime.waitReasonStrings has an unexpected size of {size} bytes")]
    BadWaitReasons { size: u64 },
    #[error("function {name} not found in .gopclntab")]
    FunctionNotFound { name: String },
    #[error("address {vaddr:#x} is not in a file-backed PT_LOAD segment")]
    UnmappedAddress { vaddr: u64 },
}

/// Byte offsets inside `runtime.g`. `sched_*` are the offset of `g.sched`
/// plus the offset of the `gobuf` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct GOffsets {
    pub goid: u32,
    pub gopc: u32,
    pub startpc: u32,
    pub atomicstatus: u32,
    pub waitreason: u32,
    pub sched_sp: u32,
    pub sched_pc: u32,
    pub sched_bp: u32,
    /// `g.trackingSeq` (uint8): incremented on every transition out of `_Grunning` (park,
    /// preemption, system call), so an unchanged value means no such transition happened.
    pub tracking_seq: u32,
    /// `g.waiting`: the sudogs of its channel waits (since go1.26 also of semaphore and
    /// sync.Cond waits), linked by `waitlink`.
    pub waiting: u32,
    /// `g.parentGoid`: the goroutine that created it (go1.21+).
    pub parent_goid: u32,
    /// `g.waitsince`: roughly when it started waiting (nanotime), set by the GC's first
    /// stack scan after it parked; 0 until then.
    pub waitsince: u32,
    /// `g._panic` and `g._defer`: records the GC scans beside the stack's frames (a deferred
    /// call's function may be referenced from nowhere else).
    pub panic: u32,
    pub defer: u32,
}

/// Where [`GOffsets`] came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum OffsetSource {
    /// The binary's own DWARF.
    Dwarf,
    /// The built-in per-version table (stripped binary).
    Table,
}

/// Where to attach a uprobe for a function.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ProbeSite {
    pub function: &'static str,
    /// Function entry (virtual address).
    pub entry: u64,
    /// Where to probe: the `push rbp` after the stack check if the prologue
    /// was recognised, else `entry`.
    pub probe_vaddr: u64,
    /// File offset of `probe_vaddr`, what uprobe attach takes.
    pub file_offset: u64,
    /// True when `probe_vaddr` is the `push rbp` (after the stack check, or
    /// at the entry of a function without one). Arguments are still in
    /// their ABIInternal registers there.
    pub after_prologue: bool,
}

/// A symbolized PC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Frame {
    /// Innermost function, which is the inlined callee for inlined code.
    pub function: String,
    /// Source file ("?" if the table has none).
    pub file: String,
    /// Source line (0 if the table has none).
    pub line: u32,
}

/// An opened Go executable.
#[derive(Debug)]
pub(crate) struct GoBinary {
    pub path: PathBuf,
    pub version: GoVersion,
    pub has_dwarf: bool,
    pub offsets: GOffsets,
    pub offset_source: OffsetSource,
    /// Indexed by `runtime.waitReason` value.
    pub wait_reasons: Vec<String>,
    /// ET_DYN (`-buildmode=pie`): runtime addresses are biased by the load
    /// address; all addresses here are unbiased link-time addresses.
    pub pie: bool,
    /// Address of `runtime.allgs` (the slice of every g): from the symbol table, or for
    /// stripped binaries from the code of `runtime.allgadd`.
    pub allgs: Option<u64>,
    /// The main module's path (build info): frames under it are the program's own.
    pub main_module: Option<String>,
    /// What the reachability analysis needs (see `reach.rs`): layouts, `runtime.mheap_`
    /// (from the symbol table, or the code of `runtime.mallocinit`), and the sections holding
    /// globals with pointers (`.data`, `.bss`; the `noptr` ones cannot point anywhere).
    pub(crate) heap: HeapOffsets,
    pub(crate) mheap: Option<u64>,
    pub(crate) globals: Vec<(u64, u64)>,
    /// `runtime.firstmoduledata` (unbiased) and its layout, when found.
    pub(crate) moduledata: Option<(u64, ModuleDataOffsets)>,
    pclntab: Pclntab,
    segments: Vec<Segment>,
    /// Kept open so probe sites read the same inode that was inspected.
    file: File,
    /// `waitReason(N)` for every code, so `wait_reason` can hand out `&str`.
    unknown_reasons: Vec<String>,
}

impl GoBinary {
    /// Opens and inspects a Go executable of a validated Go version.
    #[cfg(test)]
    pub(crate) fn open(path: &Path) -> Result<GoBinary, GoError> {
        Self::open_with(path, false)
    }

    /// Opens and inspects a Go executable; `unvalidated` accepts Go versions newer than the
    /// last one validated when the binary's DWARF gives the layout.
    pub(crate) fn open_with(path: &Path, unvalidated: bool) -> Result<GoBinary, GoError> {
        let file = crate::proc::files::open_checked(path, None).map_err(|e| GoError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::other(e),
        })?;
        Self::from_file(file, path, unvalidated)
    }

    /// Inspects an opened Go executable (`path` names it in errors).
    pub(crate) fn from_file(
        file: File,
        path: &Path,
        unvalidated: bool,
    ) -> Result<GoBinary, GoError> {
        let cache = object::ReadCache::new(file);
        let inspected = inspect(&cache, unvalidated)?;
        let file = cache.into_inner();
        let mut binary = GoBinary {
            path: path.to_path_buf(),
            version: inspected.version,
            has_dwarf: inspected.has_dwarf,
            offsets: inspected.offsets,
            offset_source: inspected.offset_source,
            wait_reasons: inspected.wait_reasons,
            pie: inspected.pie,
            allgs: inspected.allgs,
            main_module: inspected.main_module,
            heap: inspected.heap,
            mheap: inspected.mheap,
            moduledata: inspected.moduledata,
            globals: inspected.globals,
            pclntab: inspected.pclntab,
            segments: inspected.segments,
            file,
            unknown_reasons: (0..=u8::MAX).map(waitreasons::unknown_name).collect(),
        };
        if binary.allgs.is_none() {
            binary.allgs = binary.allgs_from_code();
        }
        if binary.mheap.is_none() {
            binary.mheap = binary.mheap_from_code();
        }
        Ok(binary)
    }

    /// Uprobe site for `function` (e.g. `runtime.gopark`): after the
    /// prologue's stack check if recognised (see `prologue.rs`), else the
    /// entry.
    pub(crate) fn probe_site(&self, function: &'static str) -> Result<ProbeSite, GoError> {
        self.probe_site_with_prologue(function)
            .map(|(site, _)| site)
    }

    pub(crate) fn probe_site_with_prologue(
        &self,
        function: &'static str,
    ) -> Result<(ProbeSite, Prologue), GoError> {
        let f = self
            .pclntab
            .func_by_name(function)
            .ok_or_else(|| GoError::FunctionNotFound {
                name: function.to_owned(),
            })?;
        let entry_offset = Segment::file_offset(&self.segments, f.entry)
            .ok_or(GoError::UnmappedAddress { vaddr: f.entry })?;
        // The longest recognised prologue is 19 bytes.
        let mut code = [0u8; 32];
        let len = usize::try_from(f.end.saturating_sub(f.entry))
            .unwrap_or(usize::MAX)
            .min(code.len());
        let code = code.get_mut(..len).unwrap_or_default();
        self.file
            .read_exact_at(code, entry_offset)
            .map_err(|source| GoError::Io {
                path: self.path.clone(),
                source,
            })?;
        let prologue = prologue::analyze(code);
        let skip = prologue.push_offset();
        let delta = skip.unwrap_or(0) as u64;
        Ok((
            ProbeSite {
                function,
                entry: f.entry,
                probe_vaddr: f.entry + delta,
                file_offset: entry_offset + delta,
                after_prologue: skip.is_some(),
            },
            prologue,
        ))
    }

    /// Source position of `pc` (an unbiased virtual address). For inlined
    /// code, `function` is the innermost inlined callee; file and line are
    /// always the innermost.
    ///
    /// Pass a return address as `pc - 1`: it points after the CALL and may
    /// belong to the next line or even the next function.
    pub(crate) fn symbolize(&self, pc: u64) -> Option<Frame> {
        self.pclntab.symbolize(pc)
    }

    /// Name of `runtime.waitReason` value `code`, or `waitReason(N)` if this
    /// toolchain does not define it. Value 0 (`waitReasonZero`) is "".
    pub(crate) fn wait_reason(&self, code: u8) -> &str {
        self.wait_reasons
            .get(usize::from(code))
            .or_else(|| self.unknown_reasons.get(usize::from(code)))
            .map_or("", String::as_str)
    }

    /// Name of the function whose machine code contains `pc` (not the
    /// inlined callee; use [`GoBinary::symbolize`] for that). Same `pc - 1`
    /// rule for return addresses.
    pub(crate) fn func_name(&self, pc: u64) -> Option<&str> {
        let f = self.pclntab.find_func(pc)?;
        self.pclntab.func_name(&f)
    }

    /// Every reader of this module, fed the executable in `file` (the fuzz targets' entry):
    /// build info, pclntab, DWARF offsets, then the whole inspection and lookups at
    /// addresses spread over the code.
    pub(crate) fn exercise(path: &Path) {
        if let Ok(file) = File::open(path) {
            let cache = object::ReadCache::new(file);
            if let Ok(elf) = Elf::parse(&cache) {
                let _ = offsets::from_dwarf(&elf);
                if let Ok(Some(info)) = elf.section(".go.buildinfo") {
                    let _ = buildinfo::version_string(&info.data);
                }
                if let Ok(Some(pcln)) = elf.section(".gopclntab") {
                    let _ = Pclntab::parse(pcln.data.into_owned(), pcln.addr);
                }
            }
        }
        let Ok(binary) = Self::open_with(path, true) else {
            return;
        };
        let start = binary.pclntab.text_start();
        for i in 0..64u64 {
            let pc = start.wrapping_add(i.wrapping_mul(4099));
            let _ = binary.symbolize(pc);
            let _ = binary.frames(pc);
            let _ = binary.func_name(pc);
        }
        for f in PROBED {
            let _ = binary.probe_site(f);
        }
        let _ = binary.wait_reason(7);
    }

    /// Whether inline trees are available (moduledata was located).
    #[cfg(test)]
    pub(crate) fn has_inline_info(&self) -> bool {
        self.pclntab.gofunc_base().is_some()
    }

    pub(crate) fn pclntab(&self) -> &Pclntab {
        &self.pclntab
    }
}

struct Inspected {
    version: GoVersion,
    has_dwarf: bool,
    offsets: GOffsets,
    offset_source: OffsetSource,
    wait_reasons: Vec<String>,
    pie: bool,
    allgs: Option<u64>,
    main_module: Option<String>,
    heap: HeapOffsets,
    mheap: Option<u64>,
    moduledata: Option<(u64, ModuleDataOffsets)>,
    globals: Vec<(u64, u64)>,
    pclntab: Pclntab,
    segments: Vec<Segment>,
}

fn inspect(cache: &elf::Cache, unvalidated: bool) -> Result<Inspected, GoError> {
    if elf::lacks_section(cache, b".go.buildinfo") {
        return Err(GoError::NotGo);
    }
    let elf = Elf::parse(cache)?;

    let buildinfo = elf.section(".go.buildinfo")?.ok_or(GoError::NotGo)?;
    let raw_version = buildinfo::version_string(&buildinfo.data)?;
    let version =
        GoVersion::parse(&raw_version).ok_or_else(|| GoError::BadVersion(raw_version.clone()))?;
    if version.major != 1 || version.minor < MIN_MINOR {
        return Err(GoError::UnsupportedVersion { version });
    }
    let validated = version.minor <= MAX_TABLE_MINOR;

    // External linking of PIE puts it in RELRO under this name.
    let pcln = match elf.section(".gopclntab")? {
        Some(s) => s,
        None => elf
            .section(".data.rel.ro.gopclntab")?
            .ok_or(GoError::NoPclntab)?,
    };
    let mut pclntab = Pclntab::parse(pcln.data.into_owned(), pcln.addr)?;

    // A validated version's built-in table (generated from its toolchain and checked against
    // its DWARF) is used as is: parsing the binary's DWARF costs tens of MiB and a fraction of
    // a second per executable. DWARF is for versions without a table.
    let table = offsets::table_entry(version);
    let dwarf = match table {
        Some(_) => None,
        None => offsets::from_dwarf(&elf)?,
    };
    let (goffsets, offset_source, md_offsets, heap) = match (dwarf, table) {
        (Some(d), _) => (d.offsets, OffsetSource::Dwarf, d.moduledata, d.heap),
        (None, Some(t)) => (t.offsets, OffsetSource::Table, t.moduledata, t.heap),
        (None, None) => return Err(GoError::NoOffsets { version }),
    };
    if !validated && !unvalidated {
        return Err(GoError::NotValidated { version });
    }

    let wait_reasons = match (waitreasons::from_symtab(&elf)?, table) {
        (Some(w), _) => w,
        (None, Some(t)) => t.wait_reasons.iter().map(|s| (*s).to_owned()).collect(),
        (None, None) => return Err(GoError::NoWaitReasons { version }),
    };

    let moduledata = locate_moduledata(&elf, &mut pclntab, md_offsets);

    Ok(Inspected {
        version,
        has_dwarf: elf.has_section(".debug_info") || elf.has_section(".zdebug_info"),
        offsets: goffsets,
        offset_source,
        wait_reasons,
        pie: elf.pie,
        allgs: elf.symbol("runtime.allgs").map(|(addr, _)| addr),
        main_module: buildinfo::main_module(&buildinfo.data),
        heap,
        mheap: elf.symbol("runtime.mheap_").map(|(addr, _)| addr),
        moduledata: moduledata.map(|at| (at, md_offsets)),
        globals: [".data", ".bss"]
            .iter()
            .filter_map(|name| elf.section_range(name))
            .collect(),
        pclntab,
        segments: elf.load_segments(),
    })
}

/// Where the linker puts `runtime.firstmoduledata`: its own section since
/// go1.26, `.noptrdata` before.
const MODULEDATA_SECTIONS: [&str; 2] = [".go.module", ".noptrdata"];

/// Finds `runtime.firstmoduledata` (it starts with a pointer to the pclntab
/// header) to learn the text start and the `gofunc` base that inline trees
/// are relative to. This works without a
/// symbol table. If it is not found, symbolization still works but reports
/// the physical function instead of inlined callees.
fn locate_moduledata(elf: &Elf<'_>, pclntab: &mut Pclntab, md: ModuleDataOffsets) -> Option<u64> {
    let text_section = elf.section_range(".text").map(|(a, _)| a);
    let mut text_start = match pclntab.header_text_start() {
        0 => text_section.unwrap_or(0),
        t => t,
    };
    let funcnametab = pclntab.vaddr + pclntab.funcnametab_offset();
    let found = MODULEDATA_SECTIONS
        .iter()
        .filter_map(|name| elf.section_range(name))
        .flat_map(|(start, size)| elf.pointers_to(start, size, pclntab.vaddr))
        .find(|&at| elf.read_ptr(at + u64::from(md.funcnametab)).ok() == Some(funcnametab));
    if let Some(at) = found {
        if let Ok(text) = elf.read_ptr(at + u64::from(md.text)) {
            text_start = text;
        }
        if let Some(gofunc) = elf
            .read_ptr(at + u64::from(md.gofunc))
            .ok()
            .and_then(|base| gofunc_bytes(elf, base))
        {
            pclntab.set_gofunc(gofunc);
        }
    }
    pclntab.set_text_start(text_start);
    found
}

/// Copies from `gofunc` to the end of its section (`go:func.*` is in
/// `.rodata` before go1.26 and inside `.gopclntab` since); inline trees are
/// addressed as offsets from it.
fn gofunc_bytes(elf: &Elf<'_>, base: u64) -> Option<GoFunc> {
    let (start, size) = elf.section_range_containing(base)?;
    let len = start.checked_add(size)?.checked_sub(base)?;
    let bytes = elf.read_vaddr(base, len).ok()?.to_vec();
    Some(GoFunc { base, bytes })
}
