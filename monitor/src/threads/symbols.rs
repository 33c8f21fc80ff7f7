//! Naming native code addresses: a process's mappings, and for each mapped file its ELF
//! symbols and, when it has DWARF, inlined functions with file:line. Files are loaded once per
//! (device, inode) and shared by every process that maps them.

use std::{
    borrow::Cow,
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use gimli::{EndianArcSlice, LittleEndian};
use object::{Object, ObjectSection, ObjectSegment};

pub use crate::proc::maps::Mapping;
use crate::{
    proc::{
        files::{self, FileError, section_bytes},
        maps,
    },
    sys::workers::Gate,
};

/// Caps on what one module may keep: its unwind tables, its DWARF (over it: symbol names
/// only), its symbols.
const MAX_UNWIND_BYTES: u64 = 16 << 20;
const MAX_DWARF_BYTES: u64 = 24 << 20;
const MAX_SYMBOLS: usize = 1 << 20;

/// A named code location. `file` and `line` are known where the module has line tables.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Frame {
    pub function: Arc<str>,
    pub file: Option<Arc<str>>,
    pub line: u32,
    /// The file the code is in (the executable or a library).
    pub module: Arc<str>,
}

impl Frame {
    /// As a site of an alert: the file where line tables give it, else the module.
    pub fn site(&self) -> Arc<crate::detect::Site> {
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
/// address, and the file ranges of their string tables. Only the symbol tables are read.
fn function_symbols(cache: &object::ReadCache<std::fs::File>) -> (Vec<Sym>, [(u64, u64); 2]) {
    use object::read::elf::{ElfFile64, SectionHeader as _, Sym as _};
    let mut symbols = Vec::new();
    let mut tables = [(0, 0); 2];
    let Ok(elf) = ElfFile64::<object::Endianness, _>::parse(cache) else {
        return (symbols, tables);
    };
    let endian = elf.endian();
    let sections = elf.elf_section_table();
    for (k, table) in [elf.elf_symbol_table(), elf.elf_dynamic_symbol_table()]
        .into_iter()
        .enumerate()
    {
        if let Ok(strings) = sections.section(table.string_section()) {
            tables[k] = strings.file_range(endian).unwrap_or((0, 0));
        }
        for sym in table.iter() {
            if symbols.len() >= MAX_SYMBOLS {
                break;
            }
            let kind = sym.st_type();
            let is_function = kind == object::elf::STT_FUNC || kind == object::elf::STT_GNU_IFUNC;
            let start = sym.st_value(endian);
            if !is_function || start == 0 || sym.st_shndx(endian) == object::elf::SHN_UNDEF {
                continue;
            }
            symbols.push(Sym {
                start,
                len: u32::try_from(sym.st_size(endian)).unwrap_or(u32::MAX),
                name: sym.st_name(endian),
                table: k as u8,
            });
        }
    }
    symbols.sort_by_key(|s| (s.start, std::cmp::Reverse(s.len)));
    symbols.dedup_by_key(|s| s.start);
    (symbols, tables)
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
pub struct UnwindRow {
    pub cfa_register: u16,
    pub cfa_offset: i64,
    pub ra_offset: Option<i64>,
    pub rbp_offset: Option<i64>,
}

impl Unwind {
    fn load<'d, R: object::ReadRef<'d>>(file: &object::File<'d, R>) -> Option<(Self, u64)> {
        let section = |name: &str| {
            let s = file.section_by_name(name)?;
            let data = section_bytes(&s, MAX_UNWIND_BYTES)?;
            Some((
                s.address(),
                EndianArcSlice::new(Arc::from(&*data), LittleEndian),
            ))
        };
        let (eh_addr, eh_data) = section(".eh_frame")?;
        let mut bytes = eh_data.len() as u64;
        let mut bases = gimli::BaseAddresses::default().set_eh_frame(eh_addr);
        if let Some(text) = file.section_by_name(".text") {
            bases = bases.set_text(text.address());
        }
        let hdr = section(".eh_frame_hdr").and_then(|(addr, data)| {
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

impl Module {
    /// Loads what symbolising and unwinding need from the file `pid` maps at `mapping`, and
    /// says how many bytes it keeps. Each part is capped: a module over a cap loses that part
    /// (DWARF lines, unwind tables), not the process its monitoring.
    fn load(pid: u32, mapping: &Mapping) -> Result<(Self, u64), FileError> {
        let opened = files::open_mapped(pid, mapping.start, mapping.end, mapping.file.1)?;
        Ok(Self::from_file(opened.file, mapping.path.clone()))
    }

    /// Loads a module from an open file (whatever it holds).
    fn from_file(file: std::fs::File, path: Arc<str>) -> (Self, u64) {
        // Read on demand: only the sections used are read, and dropped once parsed.
        let cache = object::ReadCache::new(file);
        let Ok(file) = object::File::parse(&cache) else {
            return (Self::opaque(path), 0);
        };
        let (symbols, string_tables) = function_symbols(&cache);
        let mut bytes = (symbols.len() * size_of::<Sym>()) as u64;
        let segments = file
            .segments()
            .map(|s| {
                let (offset, size) = s.file_range();
                (offset, s.address(), size)
            })
            .collect();
        let is_go = file.section_by_name(".gopclntab").is_some()
            || file.section_by_name(".go.buildinfo").is_some();
        let debug_bytes: u64 = file
            .sections()
            .filter(|s| s.name().is_ok_and(|n| n.starts_with(".debug_")))
            .map(|s| {
                s.compressed_file_range()
                    .map_or(u64::MAX, |c| c.uncompressed_size)
            })
            .fold(0, u64::saturating_add);
        let lines = if file.section_by_name(".debug_info").is_some()
            && !is_go
            && debug_bytes <= MAX_DWARF_BYTES
        {
            let load =
                |id: gimli::SectionId| -> Result<EndianArcSlice<LittleEndian>, gimli::Error> {
                    let data = file
                        .section_by_name(id.name())
                        .and_then(|s| section_bytes(&s, MAX_DWARF_BYTES))
                        .unwrap_or(Cow::Borrowed(&[]));
                    Ok(EndianArcSlice::new(Arc::from(&*data), LittleEndian))
                };
            let context = gimli::Dwarf::load(load)
                .ok()
                .and_then(|dwarf| addr2line::Context::from_dwarf(dwarf).ok())
                .map(Mutex::new);
            // addr2line parses units as they are asked for: count it at twice the sections.
            bytes += context
                .as_ref()
                .map_or(0, |_| debug_bytes.saturating_mul(2));
            context
        } else {
            if debug_bytes > MAX_DWARF_BYTES && debug_bytes != u64::MAX {
                log::info!(
                    "{path}: {debug_bytes} bytes of DWARF, over the {MAX_DWARF_BYTES}-byte cap: \
                     symbol names only"
                );
            }
            None
        };
        let unwind = Unwind::load(&file).map(|(u, b)| {
            bytes += b;
            u
        });
        (
            Self {
                path,
                symbols,
                names: Some((cache.into_inner(), string_tables)),
                segments,
                lines,
                unwind,
                is_go,
            },
            bytes,
        )
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
    let (module, _) = Module::from_file(file, "fuzz".into());
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
pub struct Symbolizer {
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
    tick: u64,
    evicted: u64,
    /// Modules said to be too large for the cache (said once each; forgotten past 1,024).
    oversized: std::collections::HashSet<(String, u64)>,
}

struct Cached {
    /// None: not loadable (not ELF, not a regular file, gone), remembered to not retry.
    module: Option<Arc<Module>>,
    bytes: u64,
    last_used: u64,
}

/// Scans a module may go unused before it is dropped.
pub const IDLE_TICKS: u64 = 4;

/// What the module cache holds and has dropped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub modules: usize,
    pub bytes: u64,
    pub evicted: u64,
}

impl Symbolizer {
    pub fn new(budget: u64) -> Self {
        Self {
            cache: Arc::new(Mutex::new(ModuleCache {
                modules: HashMap::new(),
                budget,
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
    pub fn process(&self, pid: u32) -> Option<ProcessSymbols> {
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
    pub fn tick(&self) -> u64 {
        let mut cache = self.lock();
        cache.tick += 1;
        let (tick, before) = (cache.tick, cache.modules.len());
        cache
            .modules
            .retain(|_, c| c.last_used + IDLE_TICKS >= tick);
        while cache.bytes_held() > cache.budget {
            let Some(oldest) = cache
                .modules
                .iter()
                .filter(|(_, c)| c.bytes > 0)
                .min_by_key(|(_, c)| c.last_used)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            cache.modules.remove(&oldest);
        }
        let dropped = (before - cache.modules.len()) as u64;
        cache.evicted += dropped;
        dropped
    }

    pub fn stats(&self) -> CacheStats {
        let cache = self.lock();
        CacheStats {
            modules: cache.modules.len(),
            bytes: cache.bytes_held(),
            evicted: cache.evicted,
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
        let (module, bytes) = match Module::load(pid, m) {
            Ok((module, bytes)) => {
                log::debug!(
                    "PID {pid}: loaded {} ({bytes} bytes kept) in {:?}",
                    m.path,
                    started.elapsed()
                );
                (Some(Arc::new(module)), bytes)
            }
            Err(e) => {
                log::debug!("PID {pid}: not symbolising {}: {e}", m.path);
                (None, 0)
            }
        };
        drop(entered);
        let mut cache = self.lock();
        if bytes > cache.budget {
            if cache.oversized.len() >= 1024 {
                cache.oversized.clear();
            }
            if cache.oversized.insert(m.file.clone()) {
                log::info!(
                    "{}: {bytes} bytes of symbols and unwind tables, over the whole cache \
                     budget: loaded for each use, not kept",
                    m.path
                );
            }
            return Lookup::Found(module);
        }
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
    fn bytes_held(&self) -> u64 {
        self.modules.values().map(|c| c.bytes).sum()
    }
}

/// One process's view: its mappings, with the modules they resolve to.
pub struct ProcessSymbols {
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
    pub fn is_code(&self, addr: u64) -> bool {
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
    pub fn unwind_row(&mut self, addr: u64) -> Option<UnwindRow> {
        let (module, vaddr) = self.module(addr)?;
        module.unwind.as_ref()?.row(vaddr)
    }

    /// Whether `addr` is in a Go binary's code.
    pub fn is_go_code(&mut self, addr: u64) -> bool {
        self.module(addr).is_some_and(|(m, _)| m.is_go)
    }

    /// Frames for a return address (looked up one byte back, inside the call) or, when
    /// `exact`, for an instruction address; inlined frames first.
    pub fn frames(&mut self, addr: u64, exact: bool, out: &mut Vec<Frame>) {
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
}
