//! What a tokio program's executable says about itself: the tokio version its panic locations
//! name, where its code is, and where its task vtables can be (`.data.rel.ro`). Read once per
//! executable and shared by the processes that run it.

use std::{fs::File, sync::Arc};

use super::TokioError;
use crate::proc::{
    elf::{Elf, Section},
    files,
};

/// `.rodata` (and `.strtab`) searched for tokio's version at most: the panic locations tokio
/// compiles in ("…/tokio-1.54.1/src/…") are there whatever the build strips.
const MAX_RODATA: u64 = 256 << 20;
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
        let elf = Elf::parse(file).map_err(|_| TokioError::NotTokio)?;
        let version = elf
            .section(b".rodata")
            .and_then(Section::stored)
            .and_then(|(at, len)| {
                files::search_range(&elf.file, at, len.min(MAX_RODATA), 64, version_in)
            })
            .map(Arc::from);
        let stripped = elf.section(b".symtab").is_none();
        // Builds with remapped paths still name tokio in their symbols (both manglings
        // spell the path `5tokio7runtime`).
        let named = version.is_some()
            || elf
                .section(b".strtab")
                .and_then(Section::stored)
                .and_then(|(at, len)| {
                    files::search_range(&elf.file, at, len.min(MAX_RODATA), 16, |chunk| {
                        memchr::memmem::find(chunk, b"5tokio7runtime")
                    })
                })
                .is_some();
        if !named {
            return Err(TokioError::NotTokio);
        }
        let Some(rel_ro) = elf.section(b".data.rel.ro") else {
            return Err(TokioError::Unsupported {
                why: "no .data.rel.ro section (where rustc puts the task vtables)".into(),
            });
        };
        let (rel_ro_at, rel_ro_len) = (rel_ro.addr, rel_ro.size);
        if rel_ro_len > MAX_DATA_REL_RO {
            return Err(TokioError::Unsupported {
                why: format!(".data.rel.ro of {rel_ro_len} bytes"),
            });
        }
        let data_rel_ro = (rel_ro_at, rel_ro_at.saturating_add(rel_ro_len));
        let lowest_vaddr = elf.loads().map(|p| p.vaddr).min().unwrap_or(0);
        let code: Vec<(u64, u64)> = elf
            .loads()
            .filter(|p| p.flags & object::elf::PF_X.0 != 0)
            .map(|p| (p.vaddr, p.vaddr.saturating_add(p.memsz)))
            .collect();
        if code.is_empty() {
            return Err(TokioError::Unsupported {
                why: "no executable segment".into(),
            });
        }
        let build_id = elf.build_id();
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
