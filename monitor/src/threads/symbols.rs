//! Naming native code addresses: a process's mappings, and for each mapped file its ELF
//! symbols and, when it has DWARF, inlined functions with file:line. Files are loaded once per
//! (device, inode) and shared by every process that maps them.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use gimli::{EndianArcSlice, LittleEndian};

pub(crate) use crate::proc::maps::Mapping;
use crate::{
    proc::{debuginfo, elf::Elf, files, maps},
    sys::workers::Gate,
};

/// Caps on what one module may keep: its unwind tables, its DWARF (over it: symbol names
/// only), its symbols.
const MAX_UNWIND_BYTES: u64 = 16 << 20;
const MAX_DWARF_BYTES: u64 = 24 << 20;
const MAX_SYMBOLS: usize = 1 << 20;

/// A named code location. `file` and `line` are known where the module has line tables.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Frame {
    pub function: Arc<str>,
    pub file: Option<Arc<str>>,
    pub line: u32,
    /// The file the code is in (the executable or a library).
    pub module: Arc<str>,
}

impl Frame {
    /// As a site of an alert: the file where line tables give it, else the module.
    pub(crate) fn site(&self) -> Arc<crate::detect::Site> {
        Arc::new(crate::detect::Site {
            function: self.function.to_string(),
            file: self.file.as_deref().unwrap_or(&self.module).to_owned(),
            line: self.line,
        })
    }
}

impl std::fmt::Display for Frame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.file {
            Some(file) => write!(f, "{} ({}:{})", self.function, file, self.line),
            None => write!(f, "{} ({})", self.function, self.module),
        }
    }
}

struct Module {
    path: Arc<str>,
    /// (start, end, name), sorted by start.
    /// Function symbols sorted by address; names stay in the file until asked for (a large
    /// program's names run to megabytes, its stack needs a handful).
    symbols: Vec<Sym>,
    /// The file, for names, and where its two string tables (.strtab, .dynstr) are.
    names: Option<(std::fs::File, [(u64, u64); 2])>,
    /// (file offset, vaddr, size) of each loadable segment.
    segments: Vec<(u64, u64, u64)>,
    /// Behind a lock: the context fills its caches as it is asked, and workers share modules.
    lines: Option<Mutex<addr2line::Context<EndianArcSlice<LittleEndian>>>>,
    unwind: Option<Unwind>,
    is_go: bool,
}

/// A function symbol: where it is, and where its name is (offset into string table `table`:
/// 0 = the symbol table's, 1 = the dynamic symbol table's).
#[derive(Clone, Copy, Debug)]
struct Sym {
    start: u64,
    len: u32,
    name: u32,
    table: u8,
}

/// Longest symbol name read (longer ones are cut).
const MAX_NAME: usize = 1024;

/// The function symbols of an ELF file (its symbol table and its dynamic one), sorted by
/// address, and the file ranges of their string tables. Only the symbol tables are read, a
/// block of entries at a time.
fn function_symbols(elf: &Elf) -> (Vec<Sym>, [(u64, u64); 2]) {
    use std::os::unix::fs::FileExt as _;
    const ENTRY: usize = SYM_ENTRY;
    let mut symbols = Vec::new();
    let mut tables = [(0, 0); 2];
    let mut block = vec![0u8; ENTRY * 4096];
    for (k, kind) in [object::elf::SHT_SYMTAB, object::elf::SHT_DYNSYM]
        .into_iter()
        .enumerate()
    {
        let Some(table) = elf.sections.iter().find(|s| s.kind == kind) else {
            continue;
        };
        let Some((mut at, len)) = table.stored() else {
            continue;
        };
        if let Some(strings) = elf.sections.get(table.link as usize) {
            tables[k] = strings.stored().unwrap_or((0, 0));
        }
        let end = at.saturating_add(len - len % ENTRY as u64);
        while at < end && symbols.len() < MAX_SYMBOLS {
            let want = usize::try_from(end - at).map_or(block.len(), |n| n.min(block.len()));
            let Ok(n) = elf.file.read_at(&mut block[..want], at) else {
                break;
            };
            let n = n - n % ENTRY;
            if n == 0 {
                break;
            }
            at += n as u64;
            for e in block[..n].as_chunks::<ENTRY>().0 {
                if symbols.len() >= MAX_SYMBOLS {
                    break;
                }
                let u32_at = |i: usize| u32::from_le_bytes([e[i], e[i + 1], e[i + 2], e[i + 3]]);
                let u64_at = |i: usize| u64::from(u32_at(i)) | u64::from(u32_at(i + 4)) << 32;
                let kind = e[4] & 0xf;
                let shndx = u16::from_le_bytes([e[6], e[7]]);
                let start = u64_at(8);
                let is_function =
                    kind == object::elf::STT_FUNC.0 || kind == object::elf::STT_GNU_IFUNC.0;
                if !is_function || start == 0 || shndx == object::elf::SHN_UNDEF.0 {
                    continue;
                }
                symbols.push(Sym {
                    start,
                    len: u32::try_from(u64_at(16)).unwrap_or(u32::MAX),
                    name: u32_at(0),
                    table: k as u8,
                });
            }
        }
    }
    symbols.sort_by_key(|s| (s.start, std::cmp::Reverse(s.len)));
    symbols.dedup_by_key(|s| s.start);
    (symbols, tables)
}

/// Bytes of one ELF64 symbol table entry (`Elf64_Sym`).
const SYM_ENTRY: usize = 24;

/// Function symbols a module's symbol tables can give, at most.
fn symbol_count(elf: &Elf) -> usize {
    let entries: u64 = elf
        .sections
        .iter()
        .filter(|s| s.kind == object::elf::SHT_SYMTAB || s.kind == object::elf::SHT_DYNSYM)
        .map(|s| s.size / SYM_ENTRY as u64)
        .sum();
    usize::try_from(entries).map_or(MAX_SYMBOLS, |n| n.min(MAX_SYMBOLS))
}

/// Whether the search table of the `.eh_frame_hdr` in `data` fits in it: its entry count
/// times its row size, with fixed-size encodings only.
fn hdr_table_fits(data: &[u8]) -> bool {
    // DW_EH_PE_absptr and the fixed-size data formats (low nibble).
    let size = |enc: u8| match enc & 0x0f {
        0x00 | 0x04 | 0x0c => Some(8usize),
        0x02 | 0x0a => Some(2),
        0x03 | 0x0b => Some(4),
        _ => None,
    };
    let (Some(&ptr_enc), Some(&count_enc), Some(&table_enc)) =
        (data.get(1), data.get(2), data.get(3))
    else {
        return false;
    };
    let (Some(ptr), Some(count_size), Some(row)) =
        (size(ptr_enc), size(count_enc), size(table_enc))
    else {
        return false;
    };
    let at = 4 + ptr;
    let Some(raw) = data.get(at..at + count_size) else {
        return false;
    };
    let mut buf = [0u8; 8];
    buf[..count_size].copy_from_slice(raw);
    let count = u64::from_le_bytes(buf);
    let table = data.len().saturating_sub(at + count_size) as u64;
    count
        .checked_mul(2 * row as u64)
        .is_some_and(|bytes| bytes <= table)
}

/// Call frame information (`.eh_frame`, indexed by `.eh_frame_hdr` when present).
struct Unwind {
    eh_frame: gimli::EhFrame<EndianArcSlice<LittleEndian>>,
    hdr: Option<gimli::ParsedEhFrameHdr<EndianArcSlice<LittleEndian>>>,
    bases: gimli::BaseAddresses,
}

/// How to find the caller's frame at one address: the canonical frame address is
/// `cfa_register + cfa_offset` (register 7 = rsp, 6 = rbp), the return address is stored at
/// `cfa + ra_offset` (None: the outermost frame, which returns nowhere), and the caller's rbp
/// at `cfa + rbp_offset` when this frame saved it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct UnwindRow {
    pub cfa_register: u16,
    pub cfa_offset: i64,
    pub ra_offset: Option<i64>,
    pub rbp_offset: Option<i64>,
}

impl Unwind {
    fn load(elf: &Elf) -> Option<(Self, u64)> {
        let section = |name: &[u8]| {
            let s = elf.section(name)?;
            let data = elf.read(s, MAX_UNWIND_BYTES)?;
            Some((s.addr, EndianArcSlice::new(data, LittleEndian)))
        };
        let (eh_addr, eh_data) = section(b".eh_frame")?;
        let mut bytes = eh_data.len() as u64;
        let mut bases = gimli::BaseAddresses::default().set_eh_frame(eh_addr);
        if let Some(text) = elf.section(b".text") {
            bases = bases.set_text(text.addr);
        }
        let hdr = section(b".eh_frame_hdr").and_then(|(addr, data)| {
            bytes += data.len() as u64;
            bases = bases.clone().set_eh_frame_hdr(addr);
            // A table that claims more rows than the section holds is not used (gimli's
            // binary search would overflow on it): the FDEs are then searched in order.
            hdr_table_fits(&data)
                .then(|| gimli::EhFrameHdr::from(data).parse(&bases, 8).ok())
                .flatten()
        });
        let mut eh_frame = gimli::EhFrame::from(eh_data);
        eh_frame.set_address_size(8);
        Some((
            Self {
                eh_frame,
                hdr,
                bases,
            },
            bytes,
        ))
    }

    fn row(&self, vaddr: u64) -> Option<UnwindRow> {
        use gimli::{CfaRule, RegisterRule, UnwindSection, X86_64};
        let mut ctx = gimli::UnwindContext::new();
        let fde = match self.hdr.as_ref().and_then(|h| h.table()) {
            Some(table) => table
                .fde_for_address(
                    &self.eh_frame,
                    &self.bases,
                    vaddr,
                    gimli::EhFrame::cie_from_offset,
                )
                .ok()?,
            None => self
                .eh_frame
                .fde_for_address(&self.bases, vaddr, gimli::EhFrame::cie_from_offset)
                .ok()?,
        };
        let row = fde
            .unwind_info_for_address(&self.eh_frame, &self.bases, &mut ctx, vaddr)
            .ok()?;
        let CfaRule::RegisterAndOffset { register, offset } = *row.cfa() else {
            return None;
        };
        let ra_offset = match row.register(X86_64::RA)? {
            RegisterRule::Offset(o) => Some(o),
            // Thread and process entry points (clone3, _start) mark it so.
            RegisterRule::Undefined => None,
            _ => return None,
        };
        let rbp_offset = match row.register(X86_64::RBP) {
            Some(RegisterRule::Offset(o)) => Some(o),
            _ => None,
        };
        Some(UnwindRow {
            cfa_register: register.0,
            cfa_offset: offset,
            ra_offset,
            rbp_offset,
        })
    }
}

/// A module's file with its headers read, and what loading it will keep: the symbols, the
/// unwind tables where they fit, the DWARF where it fits beside them. Known before anything
/// large is read, so the cache makes room first.
struct Plan {
    path: Arc<str>,
    elf: Option<Elf>,
    /// A stripped file's separate debug file: its symbol table names the functions.
    debug: Option<Elf>,
    unwind: bool,
    /// Bytes the DWARF is counted at, when it is to be read.
    dwarf: Option<u64>,
    /// Bytes of DWARF the file has but that are not read (over a cap).
    dwarf_left_out: Option<u64>,
    is_go: bool,
    /// What the module will keep, at most.
    bytes: u64,
}

impl Plan {
    /// Plans the load of `file` (mapped at `path`); `debug_file` finds the separate debug
    /// file, one with a symbol table, of a file that has none.
    fn new(
        file: std::fs::File,
        path: Arc<str>,
        max_bytes: u64,
        debug_file: impl FnOnce(&Elf) -> Option<Elf>,
    ) -> Self {
        let Ok(elf) = Elf::parse(file) else {
            return Self {
                path,
                elf: None,
                debug: None,
                unwind: false,
                dwarf: None,
                dwarf_left_out: None,
                is_go: false,
                bytes: 0,
            };
        };
        let debug = if elf.section(b".symtab").is_none() {
            debug_file(&elf)
        } else {
            None
        };
        // Names come from the debug file; its DWARF is not read (a distribution's libc debug
        // file alone is 20 MB once parsed, and every process maps libc: the cache would
        // churn).
        let symbols = (symbol_count(debug.as_ref().unwrap_or(&elf)) * size_of::<Sym>()) as u64;
        let unwind_bytes = [&b".eh_frame"[..], b".eh_frame_hdr"]
            .iter()
            .filter_map(|n| elf.section(n))
            .map(|s| elf.size_of(s).unwrap_or(u64::MAX))
            .fold(0, u64::saturating_add);
        let unwind =
            unwind_bytes <= MAX_UNWIND_BYTES && symbols.saturating_add(unwind_bytes) <= max_bytes;
        let mut bytes = symbols + if unwind { unwind_bytes } else { 0 };
        let is_go = elf.section(b".gopclntab").is_some() || elf.section(b".go.buildinfo").is_some();
        let debug_bytes = elf
            .sections
            .iter()
            .filter(|s| s.name.starts_with(b".debug_"))
            .map(|s| elf.size_of(s).unwrap_or(u64::MAX))
            .fold(0, u64::saturating_add);
        // addr2line parses units as they are asked for: count it at twice the sections.
        let dwarf_bytes = debug_bytes.saturating_mul(2);
        let dwarf = elf.section(b".debug_info").is_some()
            && !is_go
            && debug_bytes <= MAX_DWARF_BYTES
            && bytes.saturating_add(dwarf_bytes) <= max_bytes;
        if dwarf {
            bytes += dwarf_bytes;
        }
        let dwarf_left_out = (!dwarf && debug_bytes > 0 && !is_go).then_some(debug_bytes);
        Self {
            path,
            elf: Some(elf),
            debug,
            unwind,
            dwarf: dwarf.then_some(dwarf_bytes),
            dwarf_left_out,
            is_go,
            bytes,
        }
    }

    /// Reads what was planned, and says how many bytes it keeps.
    fn load(self) -> (Module, u64) {
        let Some(elf) = self.elf else {
            return (Module::opaque(self.path), 0);
        };
        let (symbols, string_tables) = function_symbols(self.debug.as_ref().unwrap_or(&elf));
        let mut bytes = (symbols.len() * size_of::<Sym>()) as u64;
        let segments = elf.loads().map(|p| (p.offset, p.vaddr, p.filesz)).collect();
        let lines = if let Some(dwarf_bytes) = self.dwarf {
            let load =
                |id: gimli::SectionId| -> Result<EndianArcSlice<LittleEndian>, gimli::Error> {
                    let data = elf
                        .section(id.name().as_bytes())
                        .and_then(|s| elf.read(s, MAX_DWARF_BYTES))
                        .unwrap_or_else(|| Arc::from(&[][..]));
                    Ok(EndianArcSlice::new(data, LittleEndian))
                };
            let context = gimli::Dwarf::load(load)
                .ok()
                .and_then(|dwarf| addr2line::Context::from_dwarf(dwarf).ok())
                .map(Mutex::new);
            if context.is_some() {
                bytes += dwarf_bytes;
            }
            context
        } else {
            None
        };
        let unwind = self
            .unwind
            .then(|| Unwind::load(&elf))
            .flatten()
            .map(|(u, b)| {
                bytes += b;
                u
            });
        let names_file = self.debug.map_or(elf.file, |d| d.file);
        (
            Module {
                path: self.path,
                symbols,
                names: Some((names_file, string_tables)),
                segments,
                lines,
                unwind,
                is_go: self.is_go,
            },
            bytes,
        )
    }
}

impl Module {
    /// Loads a module from an open file (whatever it holds), keeping at most about
    /// `max_bytes` (the fuzz targets' entry; the symbolizer plans first, to make room).
    fn from_file(file: std::fs::File, path: Arc<str>, max_bytes: u64) -> (Self, u64) {
        Plan::new(file, path, max_bytes, |_| None).load()
    }

    /// A mapped file that is not ELF: named by its path only.
    fn opaque(path: Arc<str>) -> Self {
        Self {
            path,
            symbols: Vec::new(),
            names: None,
            segments: Vec::new(),
            lines: None,
            unwind: None,
            is_go: false,
        }
    }

    fn vaddr(&self, file_offset: u64) -> Option<u64> {
        self.segments.iter().find_map(|&(offset, vaddr, size)| {
            let delta = file_offset.checked_sub(offset)?;
            (delta < size).then_some(vaddr + delta)
        })
    }

    /// The name of the function at `vaddr`, read from the file's string table now.
    fn symbol(&self, vaddr: u64) -> Option<Arc<str>> {
        use std::os::unix::fs::FileExt as _;
        let i = self
            .symbols
            .partition_point(|s| s.start <= vaddr)
            .checked_sub(1)?;
        let sym = self.symbols[i];
        if vaddr >= sym.start.saturating_add(u64::from(sym.len.max(1))) {
            return None;
        }
        let (file, tables) = self.names.as_ref()?;
        let (offset, size) = tables[usize::from(sym.table)];
        let at = u64::from(sym.name);
        let mut buf = [0u8; MAX_NAME];
        let want = usize::try_from(size.checked_sub(at)?).map_or(MAX_NAME, |n| n.min(MAX_NAME));
        let n = file.read_at(&mut buf[..want], offset + at).ok()?;
        let raw = &buf[..n];
        let raw = &raw[..raw.iter().position(|b| *b == 0).unwrap_or(raw.len())];
        let name = std::str::from_utf8(raw).ok()?;
        Some(format!("{:#}", rustc_demangle::demangle(name)).into())
    }

    /// The symbol at `vaddr`, else `?+0x…` (the address in the file, for `addr2line -e`
    /// with the module's debug package).
    fn name(&self, vaddr: u64) -> Arc<str> {
        self.symbol(vaddr)
            .unwrap_or_else(|| format!("?+{vaddr:#x}").into())
    }

    /// The frames at `vaddr`, innermost (inlined) first.
    fn frames(&self, vaddr: u64, out: &mut Vec<Frame>) {
        let before = out.len();
        let lines = self
            .lines
            .as_ref()
            .map(|l| l.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        if let Some(lines) = &lines
            && let Ok(mut frames) = lines.find_frames(vaddr).skip_all_loads()
        {
            while let Ok(Some(frame)) = frames.next() {
                let function: Arc<str> = match &frame.function {
                    Some(f) => f
                        .demangle()
                        .map(|n| Arc::from(&*n))
                        .unwrap_or_else(|_| "?".into()),
                    None => self.name(vaddr),
                };
                let location = frame.location.as_ref();
                out.push(Frame {
                    function,
                    file: location.and_then(|l| l.file).map(Arc::from),
                    line: location.and_then(|l| l.line).unwrap_or(0),
                    module: self.path.clone(),
                });
            }
        }
        if out.len() == before {
            out.push(Frame {
                function: self.name(vaddr),
                file: None,
                line: 0,
                module: self.path.clone(),
            });
        }
    }
}

/// Every reader of a module (ELF symbols, DWARF lines, `.eh_frame` unwinding) on the file at
/// `file`, at addresses spread over its segments and symbols (the fuzz targets' entry).
pub(crate) fn exercise_module(file: std::fs::File) {
    let (module, _) = Module::from_file(file, "fuzz".into(), 32 << 20);
    let mut frames = Vec::new();
    let mut addrs: Vec<u64> = module.symbols.iter().take(64).map(|s| s.start).collect();
    for &(_, vaddr, size) in module.segments.iter().take(8) {
        addrs.extend((0..16u64).map(|i| vaddr.wrapping_add(size / 16 * i)));
    }
    for vaddr in addrs {
        module.frames(vaddr, &mut frames);
        if let Some(unwind) = &module.unwind {
            let _ = unwind.row(vaddr);
        }
        frames.clear();
    }
}

/// Symbolises addresses of any process. Modules are shared by every process and scan, within
/// a byte budget: a module no process used for [`IDLE_TICKS`] scans is dropped, and the least
/// recently used go first when the budget is reached. Loading happens outside the lock, one
/// module at a time (a load reads a file's symbol table, unwind tables and DWARF whole:
/// several at once would add up), in whichever worker asked; others wait for it a little, then go on without
/// that module. A load that outlasts [`STUCK_LOAD`] (a hung mount) no longer holds the rest
/// up, up to [`MAX_LOADS`] loads.
#[derive(Clone)]
pub(crate) struct Symbolizer {
    cache: Arc<Mutex<ModuleCache>>,
    gate: Arc<Gate>,
}

/// How long a worker waits for another's load before going on without the module.
const LOAD_WAIT: Duration = Duration::from_secs(1);
/// A load running this long is taken to be stuck.
const STUCK_LOAD: Duration = Duration::from_secs(2);
/// Loads under way at most, stuck ones included.
const MAX_LOADS: usize = 4;

/// A module lookup's result: the module (None: not loadable), or nothing now (another load
/// held it up; symbolise without it, and do not keep the result).
enum Lookup {
    Found(Option<Arc<Module>>),
    Busy,
}

struct ModuleCache {
    modules: HashMap<(String, u64), Cached>,
    budget: u64,
    /// Bytes set aside by loads under way.
    loading: u64,
    tick: u64,
    evicted: u64,
    /// Modules said to be too large for the cache, or for their DWARF (said once each;
    /// forgotten past 1,024).
    oversized: std::collections::HashSet<(String, u64)>,
}

struct Cached {
    /// None: not loadable (not ELF, not a regular file, gone), remembered to not retry.
    module: Option<Arc<Module>>,
    bytes: u64,
    last_used: u64,
}

/// Scans a module may go unused before it is dropped.
pub(crate) const IDLE_TICKS: u64 = 4;

/// What the module cache holds and has dropped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct CacheStats {
    pub modules: usize,
    pub bytes: u64,
    pub evicted: u64,
}

impl Symbolizer {
    pub(crate) fn new(budget: u64) -> Self {
        Self {
            cache: Arc::new(Mutex::new(ModuleCache {
                modules: HashMap::new(),
                budget,
                loading: 0,
                tick: 0,
                evicted: 0,
                oversized: Default::default(),
            })),
            gate: Arc::new(Gate::new(STUCK_LOAD, MAX_LOADS)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ModuleCache> {
        // A worker that panicked mid-update leaves counts, not broken invariants.
        self.cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Reads `pid`'s mappings (None when the process is gone).
    pub(crate) fn process(&self, pid: u32) -> Option<ProcessSymbols> {
        let mut maps = maps::read(pid).ok()?;
        // Files on FUSE are neither read nor taken for code (reading code checks the bytes
        // before a return address): see `files::fuse_devices`.
        let fuse = files::fuse_devices(pid);
        if !fuse.is_empty() {
            maps.retain(|m| !fuse.contains(&m.file.0));
        }
        Some(ProcessSymbols {
            pid,
            maps,
            symbolizer: self.clone(),
            local: HashMap::new(),
            incomplete: false,
        })
    }

    /// Called once per scan: drops modules unused for [`IDLE_TICKS`] scans, then the least
    /// recently used while over budget. Returns how many were dropped.
    pub(crate) fn tick(&self) -> u64 {
        let mut cache = self.lock();
        cache.tick += 1;
        let (tick, before) = (cache.tick, cache.modules.len());
        cache
            .modules
            .retain(|_, c| c.last_used + IDLE_TICKS >= tick);
        let idle = (before - cache.modules.len()) as u64;
        cache.evicted += idle;
        idle + cache.make_room(0)
    }

    pub(crate) fn stats(&self) -> CacheStats {
        let cache = self.lock();
        CacheStats {
            modules: cache.modules.len(),
            bytes: cache.bytes_held(),
            evicted: cache.evicted,
        }
    }

    /// Sets `bytes` aside for a load under way, dropping the least recently used modules
    /// to make room; given back when the reservation is dropped.
    fn reserve(&self, bytes: u64) -> Reservation<'_> {
        let mut cache = self.lock();
        cache.loading += bytes;
        cache.make_room(0);
        Reservation {
            symbolizer: self,
            bytes,
        }
    }

    /// The module for mapping `m`, loading it if needed, waiting at most `wait` for another
    /// load.
    fn get(&self, pid: u32, m: &Mapping, wait: Duration) -> Lookup {
        let started = Instant::now();
        let cached = |cache: &mut ModuleCache| {
            let tick = cache.tick;
            cache.modules.get_mut(&m.file).map(|c| {
                c.last_used = tick;
                c.module.clone()
            })
        };
        if let Some(module) = cached(&mut self.lock()) {
            return Lookup::Found(module);
        }
        let Some(entered) = self.gate.enter(wait) else {
            return Lookup::Busy;
        };
        // Another worker may have loaded it meanwhile.
        if let Some(module) = cached(&mut self.lock()) {
            return Lookup::Found(module);
        }
        let (module, bytes) = match files::open_mapped(pid, m.start, m.end, m.file.1) {
            Ok(opened) => {
                let budget = self.lock().budget;
                let plan = Plan::new(opened, m.path.clone(), budget, |elf| {
                    let (debug, at) = debuginfo::find(pid, &m.path, elf)?;
                    log::debug!("{}: symbols from its debug file {}", m.path, at.display());
                    Some(debug)
                });
                if let Some(debug_bytes) = plan.dwarf_left_out
                    && self.lock().first_time(&m.file)
                {
                    log::info!(
                        "{}: {debug_bytes} bytes of DWARF, more than the symbol cache keeps for \
                         one file (`memory_budget`): symbol names only, no file:line",
                        m.path
                    );
                }
                // Room first: what the cache holds and the load together stay in the budget.
                let reserved = self.reserve(plan.bytes);
                let (module, bytes) = plan.load();
                log::debug!(
                    "PID {pid}: loaded {} ({bytes} bytes kept) in {:?}",
                    m.path,
                    started.elapsed()
                );
                drop(reserved);
                (Some(Arc::new(module)), bytes)
            }
            Err(e) => {
                log::debug!(
                    "PID {pid}: not symbolising {}: {}",
                    m.path,
                    crate::sys::chain(&e)
                );
                (None, 0)
            }
        };
        drop(entered);
        let mut cache = self.lock();
        if bytes > cache.budget {
            if cache.first_time(&m.file) {
                log::info!(
                    "{}: {bytes} bytes of symbols and unwind tables, over the whole cache \
                     budget: loaded for each use, not kept",
                    m.path
                );
            }
            return Lookup::Found(module);
        }
        cache.make_room(bytes);
        let tick = cache.tick;
        cache.modules.insert(
            m.file.clone(),
            Cached {
                module: module.clone(),
                bytes,
                last_used: tick,
            },
        );
        Lookup::Found(module)
    }
}

impl ModuleCache {
    /// Whether what is said of the module `file` is said for the first time.
    fn first_time(&mut self, file: &(String, u64)) -> bool {
        if self.oversized.len() >= 1024 {
            self.oversized.clear();
        }
        self.oversized.insert(file.clone())
    }

    fn bytes_held(&self) -> u64 {
        self.modules.values().map(|c| c.bytes).sum()
    }

    /// Drops the least recently used modules until what is held, what loads have set aside
    /// and `more` fit the budget (or nothing is left to drop). Returns how many went.
    fn make_room(&mut self, more: u64) -> u64 {
        let mut dropped = 0;
        while self.bytes_held() + self.loading + more > self.budget {
            let Some(oldest) = self
                .modules
                .iter()
                .filter(|(_, c)| c.bytes > 0)
                .min_by_key(|(_, c)| c.last_used)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            self.modules.remove(&oldest);
            dropped += 1;
        }
        self.evicted += dropped;
        dropped
    }
}

/// Bytes set aside for a load under way ([`Symbolizer::reserve`]).
struct Reservation<'a> {
    symbolizer: &'a Symbolizer,
    bytes: u64,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        let mut cache = self.symbolizer.lock();
        cache.loading = cache.loading.saturating_sub(self.bytes);
    }
}

/// One process's view: its mappings, with the modules they resolve to.
pub(crate) struct ProcessSymbols {
    pid: u32,
    maps: Vec<Mapping>,
    symbolizer: Symbolizer,
    /// Modules this view has used, so a stack takes the shared lock once per module.
    local: HashMap<(String, u64), Option<Arc<Module>>>,
    /// Set when a module could not be had in time: what was symbolised is incomplete, and
    /// not worth keeping.
    pub incomplete: bool,
}

impl ProcessSymbols {
    /// Whether `addr` is in an executable file mapping (a plausible return address).
    pub(crate) fn is_code(&self, addr: u64) -> bool {
        self.mapping(addr).is_some_and(|m| m.exec)
    }

    fn mapping(&self, addr: u64) -> Option<&Mapping> {
        let i = self
            .maps
            .partition_point(|m| m.start <= addr)
            .checked_sub(1)?;
        let m = &self.maps[i];
        (addr < m.end).then_some(m)
    }

    fn module(&mut self, addr: u64) -> Option<(Arc<Module>, u64)> {
        let m = self.mapping(addr)?.clone();
        let module = match self.local.get(&m.file) {
            Some(module) => module.clone(),
            // Waited once in vain for this view: the next modules are not waited for.
            None => match self.symbolizer.get(
                self.pid,
                &m,
                if self.incomplete {
                    Duration::ZERO
                } else {
                    LOAD_WAIT
                },
            ) {
                Lookup::Found(module) => {
                    self.local.insert(m.file.clone(), module.clone());
                    module
                }
                Lookup::Busy => {
                    self.incomplete = true;
                    self.local.insert(m.file.clone(), None);
                    None
                }
            },
        }?;
        let vaddr = module.vaddr(addr - m.start + m.offset)?;
        Some((module, vaddr))
    }

    /// How to unwind from code address `addr` (the instruction itself: callers pass a return
    /// address minus one). None without call frame information.
    pub(crate) fn unwind_row(&mut self, addr: u64) -> Option<UnwindRow> {
        let (module, vaddr) = self.module(addr)?;
        module.unwind.as_ref()?.row(vaddr)
    }

    /// Whether `addr` is in a Go binary's code.
    pub(crate) fn is_go_code(&mut self, addr: u64) -> bool {
        self.module(addr).is_some_and(|(m, _)| m.is_go)
    }

    /// Frames for a return address (looked up one byte back, inside the call) or, when
    /// `exact`, for an instruction address; inlined frames first.
    pub(crate) fn frames(&mut self, addr: u64, exact: bool, out: &mut Vec<Frame>) {
        let probe = if exact { addr } else { addr.saturating_sub(1) };
        match self.module(probe) {
            Some((module, vaddr)) => module.frames(vaddr, out),
            None => out.push(Frame {
                function: format!("{addr:#x}").into(),
                file: None,
                line: 0,
                module: self
                    .mapping(probe)
                    .map(|m| m.path.clone())
                    .unwrap_or_else(|| "?".into()),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the native_module fuzz target: an `.eh_frame_hdr` whose entry count overflows
    /// gimli's binary search. Its table is not used now.
    #[test]
    fn eh_frame_hdr_claiming_too_many_rows_is_not_used() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("src/threads/testdata/eh-frame-hdr-overflow.elf");
        exercise_module(std::fs::File::open(path).unwrap());
        // version 1, eh_frame_ptr sdata4, fde_count udata4, table sdata4 (8-byte rows).
        let mut hdr = vec![1, 0x1b, 0x03, 0x3b, 0, 0, 0, 0];
        hdr.extend_from_slice(&2u32.to_le_bytes());
        hdr.extend_from_slice(&[0; 16]);
        assert!(hdr_table_fits(&hdr));
        hdr[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(!hdr_table_fits(&hdr));
        assert!(!hdr_table_fits(&[1, 0x1b]));
    }

    #[test]
    fn symbolises_this_test_binary() {
        let symbolizer = Symbolizer::new(64 << 20);
        let pid = std::process::id();
        let mut process = symbolizer.process(pid).unwrap();
        let addr = symbolises_this_test_binary as *const () as u64;
        assert!(process.is_code(addr));
        let mut frames = Vec::new();
        process.frames(addr, true, &mut frames);
        assert!(
            frames
                .iter()
                .any(|f| f.function.contains("symbolises_this_test_binary")),
            "{frames:?}"
        );
    }

    /// A module is planned within what it may keep: DWARF, then unwind tables, are left out
    /// when they do not fit, and what a load keeps never exceeds its plan.
    #[test]
    fn loads_keep_within_their_plan() {
        let exe = || std::fs::File::open("/proc/self/exe").unwrap();
        let all = Plan::new(exe(), "self".into(), u64::MAX, |_| None);
        let symbols = all.bytes - all.dwarf.unwrap_or(0) - 1;
        for max in [0, symbols, all.bytes, u64::MAX] {
            let plan = Plan::new(exe(), "self".into(), max, |_| None);
            if max < all.bytes {
                assert!(plan.dwarf.is_none() || plan.bytes <= max, "{max}");
            }
            let planned = plan.bytes;
            let (module, kept) = plan.load();
            assert!(kept <= planned, "{kept} kept, {planned} planned at {max}");
            assert!(!module.symbols.is_empty());
        }
        // With room for the symbols only, no DWARF nor unwind tables are read.
        let (module, _) = Plan::new(exe(), "self".into(), symbols, |_| None).load();
        assert!(module.lines.is_none() && module.unwind.is_none());
    }

    /// A load sets its bytes aside first: least recently used modules go to make room, and
    /// what the cache holds plus what is being loaded stays within the budget.
    #[test]
    fn loads_make_room_first() {
        let symbolizer = Symbolizer::new(100);
        {
            let mut cache = symbolizer.lock();
            for (i, bytes) in [40, 30, 20].into_iter().enumerate() {
                cache.tick = i as u64;
                cache.modules.insert(
                    (format!("m{i}"), 0),
                    Cached {
                        module: Some(Arc::new(Module::opaque("m".into()))),
                        bytes,
                        last_used: i as u64,
                    },
                );
            }
        }
        let reserved = symbolizer.reserve(45);
        {
            let cache = symbolizer.lock();
            // m0 (40 bytes, the oldest) went; 30 + 20 + 45 fit.
            assert!(!cache.modules.contains_key(&("m0".to_owned(), 0)));
            assert_eq!(cache.bytes_held() + cache.loading, 95);
        }
        drop(reserved);
        assert_eq!(symbolizer.lock().loading, 0);
        assert_eq!(symbolizer.stats().evicted, 1);
    }
}
