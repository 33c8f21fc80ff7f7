//! Naming native code addresses: a process's mappings, and for each mapped file its ELF
//! symbols and, when it has DWARF, inlined functions with file:line. Files are loaded once per
//! (device, inode) and shared by every process that maps them.

use std::{borrow::Cow, collections::HashMap, sync::Arc};

use gimli::{EndianArcSlice, LittleEndian};
use object::{Object, ObjectSection, ObjectSegment, ObjectSymbol, SymbolKind};

/// One mapping of /proc/PID/maps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    pub offset: u64,
    pub exec: bool,
    /// (device, inode): the file's identity across processes and mount namespaces.
    pub file: (String, u64),
    pub path: Arc<str>,
}

/// Parses /proc/PID/maps; anonymous mappings are left out.
pub fn parse_maps(text: &str) -> Vec<Mapping> {
    text.lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let (range, perms, offset, dev, inode) =
                (f.next()?, f.next()?, f.next()?, f.next()?, f.next()?);
            let path = f.collect::<Vec<_>>().join(" ");
            let inode: u64 = inode.parse().ok()?;
            if inode == 0 || !path.starts_with('/') {
                return None;
            }
            let (start, end) = range.split_once('-')?;
            Some(Mapping {
                start: u64::from_str_radix(start, 16).ok()?,
                end: u64::from_str_radix(end, 16).ok()?,
                offset: u64::from_str_radix(offset, 16).ok()?,
                exec: perms.contains('x'),
                file: (dev.to_owned(), inode),
                path: path.into(),
            })
        })
        .collect()
}

/// A named code location. `file` and `line` are known where the module has line tables.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Frame {
    pub function: Arc<str>,
    pub file: Option<Arc<str>>,
    pub line: u32,
    /// The file the code is in (the executable or a library).
    pub module: Arc<str>,
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
    symbols: Vec<(u64, u64, Arc<str>)>,
    /// (file offset, vaddr, size) of each loadable segment.
    segments: Vec<(u64, u64, u64)>,
    lines: Option<addr2line::Context<EndianArcSlice<LittleEndian>>>,
    unwind: Option<Unwind>,
    is_go: bool,
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
    fn load(file: &object::File) -> Option<Self> {
        let section = |name: &str| {
            let s = file.section_by_name(name)?;
            let data = s.uncompressed_data().ok()?;
            Some((
                s.address(),
                EndianArcSlice::new(Arc::from(&*data), LittleEndian),
            ))
        };
        let (eh_addr, eh_data) = section(".eh_frame")?;
        let mut bases = gimli::BaseAddresses::default().set_eh_frame(eh_addr);
        if let Some(text) = file.section_by_name(".text") {
            bases = bases.set_text(text.address());
        }
        let hdr = section(".eh_frame_hdr").and_then(|(addr, data)| {
            bases = bases.clone().set_eh_frame_hdr(addr);
            gimli::EhFrameHdr::from(data).parse(&bases, 8).ok()
        });
        let mut eh_frame = gimli::EhFrame::from(eh_data);
        eh_frame.set_address_size(8);
        Some(Self {
            eh_frame,
            hdr,
            bases,
        })
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
    fn load(pid: u32, mapping: &Mapping) -> Option<Self> {
        // Through the process's root: the path is in its mount namespace.
        let data = std::fs::read(format!("/proc/{pid}/root{}", mapping.path))
            .or_else(|_| std::fs::read(&*mapping.path))
            .ok()?;
        let file = object::File::parse(&*data).ok()?;
        let mut symbols: Vec<(u64, u64, Arc<str>)> = file
            .symbols()
            .chain(file.dynamic_symbols())
            .filter(|s| s.kind() == SymbolKind::Text && s.address() != 0)
            .filter_map(|s| {
                let name = s.name().ok()?;
                let name = format!("{:#}", rustc_demangle::demangle(name));
                Some((s.address(), s.address() + s.size().max(1), name.into()))
            })
            .collect();
        symbols.sort_by_key(|s| (s.0, std::cmp::Reverse(s.1)));
        symbols.dedup_by_key(|s| s.0);
        let segments = file
            .segments()
            .map(|s| {
                let (offset, size) = s.file_range();
                (offset, s.address(), size)
            })
            .collect();
        let is_go = file.section_by_name(".gopclntab").is_some()
            || file.section_by_name(".go.buildinfo").is_some();
        let lines = if file.section_by_name(".debug_info").is_some() && !is_go {
            let load =
                |id: gimli::SectionId| -> Result<EndianArcSlice<LittleEndian>, gimli::Error> {
                    let data = file
                        .section_by_name(id.name())
                        .and_then(|s| s.uncompressed_data().ok())
                        .unwrap_or(Cow::Borrowed(&[]));
                    Ok(EndianArcSlice::new(Arc::from(&*data), LittleEndian))
                };
            gimli::Dwarf::load(load)
                .ok()
                .and_then(|dwarf| addr2line::Context::from_dwarf(dwarf).ok())
        } else {
            None
        };
        Some(Self {
            path: mapping.path.clone(),
            symbols,
            segments,
            lines,
            unwind: Unwind::load(&file),
            is_go,
        })
    }

    fn vaddr(&self, file_offset: u64) -> Option<u64> {
        self.segments.iter().find_map(|&(offset, vaddr, size)| {
            let delta = file_offset.checked_sub(offset)?;
            (delta < size).then_some(vaddr + delta)
        })
    }

    fn symbol(&self, vaddr: u64) -> Option<&Arc<str>> {
        let i = self
            .symbols
            .partition_point(|s| s.0 <= vaddr)
            .checked_sub(1)?;
        let (_, end, name) = &self.symbols[i];
        (vaddr < *end).then_some(name)
    }

    /// The symbol at `vaddr`, else `?+0x…` (the address in the file, for `addr2line -e`
    /// with the module's debug package).
    fn name(&self, vaddr: u64) -> Arc<str> {
        self.symbol(vaddr)
            .cloned()
            .unwrap_or_else(|| format!("?+{vaddr:#x}").into())
    }

    /// The frames at `vaddr`, innermost (inlined) first.
    fn frames(&self, vaddr: u64, out: &mut Vec<Frame>) {
        let before = out.len();
        if let Some(lines) = &self.lines
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

/// Symbolises addresses of any process; modules are cached across processes and scans.
#[derive(Default)]
pub struct Symbolizer {
    modules: HashMap<(String, u64), Option<Arc<Module>>>,
}

/// One process's view: its mappings, with the modules they resolve to.
pub struct ProcessSymbols<'a> {
    pid: u32,
    maps: Vec<Mapping>,
    symbolizer: &'a mut Symbolizer,
}

impl Symbolizer {
    /// Reads `pid`'s mappings (None when the process is gone).
    pub fn process(&mut self, pid: u32) -> Option<ProcessSymbols<'_>> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
        Some(ProcessSymbols {
            pid,
            maps: parse_maps(&text),
            symbolizer: self,
        })
    }

    /// Forgets modules no longer mapped by `live` processes' mappings (called now and then).
    pub fn retain(&mut self, keep: impl Fn(&(String, u64)) -> bool) {
        self.modules.retain(|k, _| keep(k));
    }
}

impl ProcessSymbols<'_> {
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
        let module = self
            .symbolizer
            .modules
            .entry(m.file.clone())
            .or_insert_with(|| Module::load(self.pid, &m).map(Arc::new))
            .clone()?;
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

    #[test]
    fn maps_keep_file_mappings() {
        let maps = parse_maps(
            "55d0c0a00000-55d0c0a01000 r--p 00000000 fd:01 1311 /usr/bin/cat\n\
             55d0c0a01000-55d0c0a05000 r-xp 00001000 fd:01 1311 /usr/bin/cat\n\
             7ffd1c000000-7ffd1c021000 rw-p 00000000 00:00 0 [stack]\n\
             7f0000000000-7f0000001000 r-xp 00000000 00:00 0 \n",
        );
        assert_eq!(maps.len(), 2);
        assert!(maps[1].exec && !maps[0].exec);
        assert_eq!((maps[1].start, maps[1].offset), (0x55d0_c0a0_1000, 0x1000));
        assert_eq!(maps[1].file, ("fd:01".to_owned(), 1311));
    }

    #[test]
    fn symbolises_this_test_binary() {
        let mut symbolizer = Symbolizer::default();
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
