//! What a tokio program's executable says about itself: the tokio version its panic locations
//! name, where its code is, and where its task vtables can be (`.data.rel.ro`). Read once per
//! executable and shared by the processes that run it.

use std::{fs::File, sync::Arc};

use object::{
    Endianness, ReadCache, elf,
    elf::{FileHeader64, SectionHeader64},
    read::elf::{FileHeader, ProgramHeader, SectionHeader},
};

use super::TokioError;
use crate::proc::files;

/// `.rodata` (and `.strtab`) searched for tokio's version at most: the panic locations tokio
/// compiles in ("…/tokio-1.54.1/src/…") are there whatever the build strips.
const MAX_RODATA: u64 = 256 << 20;
/// Section and program headers accepted, at most (a hostile header claims millions).
const MAX_SECTIONS: u32 = 4096;
/// Bytes of one header table (section and program headers, section names, notes) read at
/// most.
const MAX_HEADER_READ: u64 = 1 << 20;
/// `.data.rel.ro` read at most (tens of KiB in a service; the target's file says its size).
pub(crate) const MAX_DATA_REL_RO: u64 = 64 << 20;

#[derive(Debug)]
pub(crate) struct TokioBinary {
    /// From the panic locations ("1.54.1"); None when the build remapped its paths.
    pub version: Option<Arc<str>>,
    /// Lowest PT_LOAD address (for the load bias).
    pub lowest_vaddr: u64,
    /// Executable PT_LOAD ranges (unbiased).
    pub code: Vec<(u64, u64)>,
    /// `.data.rel.ro` (unbiased): relocated pointers to code, where rustc puts vtables.
    pub data_rel_ro: (u64, u64),
    /// GNU build id, hex: names code in a stripped build.
    pub build_id: Option<String>,
    /// No `.symtab`: future types are named by address.
    pub stripped: bool,
}

impl TokioBinary {
    /// Reads `file` (an executable or a library a process maps): a tokio program, or why not.
    /// Only the ELF headers are parsed (not `object::File`, which reads the whole symbol
    /// tables: tens of MiB for a large library); sections are searched from the file in
    /// chunks, so a huge file costs one chunk of memory.
    pub(crate) fn read(file: File) -> Result<Self, TokioError> {
        let whole = ReadCache::new(&file);
        let cache = files::Capped {
            cache: &whole,
            max: MAX_HEADER_READ,
        };
        let header = FileHeader64::<Endianness>::parse(cache).map_err(|_| TokioError::NotTokio)?;
        let endian = header.endian().map_err(|_| TokioError::NotTokio)?;
        if header.e_machine(endian) != elf::EM_X86_64 {
            return Err(TokioError::NotTokio);
        }
        if header
            .shnum(endian, cache)
            .map_err(|_| TokioError::NotTokio)?
            > MAX_SECTIONS
            || header
                .phnum(endian, cache)
                .map_err(|_| TokioError::NotTokio)?
                > MAX_SECTIONS
        {
            return Err(TokioError::NotTokio);
        }
        let sections = header
            .sections(endian, cache)
            .map_err(|_| TokioError::NotTokio)?;
        let find = |name: &[u8]| sections.section_by_name(endian, name).map(|(_, s)| s);
        // Where a section's bytes are in the file, when they are there uncompressed.
        let stored = |s: &SectionHeader64<Endianness>| {
            (s.sh_type(endian) != elf::SHT_NOBITS
                && s.sh_flags(endian).0 & elf::SHF_COMPRESSED.0 == 0)
                .then(|| (s.sh_offset(endian), s.sh_size(endian)))
        };
        let version = find(b".rodata")
            .and_then(stored)
            .and_then(|(at, len)| {
                files::search_range(&file, at, len.min(MAX_RODATA), 64, version_in)
            })
            .map(Arc::from);
        let stripped = find(b".symtab").is_none();
        // Builds with remapped paths still name tokio in their symbols (both manglings
        // spell the path `5tokio7runtime`).
        let named = version.is_some()
            || find(b".strtab")
                .and_then(stored)
                .and_then(|(at, len)| {
                    files::search_range(&file, at, len.min(MAX_RODATA), 16, |chunk| {
                        memchr::memmem::find(chunk, b"5tokio7runtime")
                    })
                })
                .is_some();
        if !named {
            return Err(TokioError::NotTokio);
        }
        let Some(rel_ro) = find(b".data.rel.ro") else {
            return Err(TokioError::Unsupported {
                why: "no .data.rel.ro section (where rustc puts the task vtables)".into(),
            });
        };
        let (rel_ro_at, rel_ro_len) = (rel_ro.sh_addr(endian), rel_ro.sh_size(endian));
        if rel_ro_len > MAX_DATA_REL_RO {
            return Err(TokioError::Unsupported {
                why: format!(".data.rel.ro of {rel_ro_len} bytes"),
            });
        }
        let data_rel_ro = (rel_ro_at, rel_ro_at.saturating_add(rel_ro_len));
        let loads: Vec<_> = header
            .program_headers(endian, cache)
            .map_err(|_| TokioError::NotTokio)?
            .iter()
            .filter(|p| p.p_type(endian) == elf::PT_LOAD)
            .collect();
        let lowest_vaddr = loads.iter().map(|p| p.p_vaddr(endian)).min().unwrap_or(0);
        let code: Vec<(u64, u64)> = loads
            .iter()
            .filter(|p| p.p_flags(endian).0 & elf::PF_X.0 != 0)
            .map(|p| {
                let at = p.p_vaddr(endian);
                (at, at.saturating_add(p.p_memsz(endian)))
            })
            .collect();
        if code.is_empty() {
            return Err(TokioError::Unsupported {
                why: "no executable segment".into(),
            });
        }
        let build_id = find(b".note.gnu.build-id")
            .and_then(|s| s.notes(endian, cache).ok().flatten())
            .and_then(|mut notes| {
                while let Ok(Some(note)) = notes.next() {
                    if note.name() == elf::ELF_NOTE_GNU
                        && note.n_type(endian) == elf::NT_GNU_BUILD_ID
                    {
                        return Some(note.desc().iter().map(|b| format!("{b:02x}")).collect());
                    }
                }
                None
            });
        Ok(Self {
            version,
            lowest_vaddr,
            code,
            data_rel_ro,
            build_id,
            stripped,
        })
    }
}

/// The tokio version in panic-location paths ("…/tokio-1.54.1/src/…").
pub(crate) fn version_in(data: &[u8]) -> Option<String> {
    const NEEDLE: &[u8] = b"tokio-1.";
    let mut at = 0;
    while let Some(i) = memchr::memmem::find(&data[at..], NEEDLE) {
        let start = at + i + "tokio-".len();
        let rest = &data[start..data.len().min(start + 16)];
        let len = rest
            .iter()
            .position(|b| !(b.is_ascii_digit() || *b == b'.'))
            .unwrap_or(rest.len());
        if rest.get(len) == Some(&b'/') && rest[..len].iter().filter(|b| **b == b'.').count() == 2 {
            return std::str::from_utf8(&rest[..len]).ok().map(str::to_owned);
        }
        at = start;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_from_panic_locations() {
        let data = b"\0tokio-util-0.7.1/src\0/home/u/.cargo/registry/src/x/tokio-1.54.1/src/runtime/task/state.rs\0";
        assert_eq!(version_in(data).as_deref(), Some("1.54.1"));
        assert_eq!(version_in(b"tokio-1.2/src tokio-1.35"), None);
        assert_eq!(version_in(b"tokio-1.35.1"), None);
    }
}
