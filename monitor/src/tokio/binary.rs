//! What a tokio program's executable says about itself: the tokio version its panic locations
//! name, where its code is, and where its task vtables can be (`.data.rel.ro`). Read once per
//! executable and shared by the processes that run it.

use std::{fs::File, sync::Arc};

use object::{Object, ObjectSection, ObjectSegment, ReadCache};

use super::TokioError;
use crate::proc::files;

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
    /// Reads `file` (the executable of a process): a tokio program, or why not.
    pub(crate) fn read(file: File) -> Result<Self, TokioError> {
        // Only headers go through the cache; sections are searched from the file in chunks,
        // so a huge executable costs one chunk of memory.
        let cache = ReadCache::new(&file);
        let obj = object::File::parse(&cache).map_err(|_| TokioError::NotTokio)?;
        if obj.architecture() != object::Architecture::X86_64 {
            return Err(TokioError::NotTokio);
        }
        let version = obj.section_by_name(".rodata").and_then(|s| {
            files::search_section(&file, &s, MAX_RODATA, 64, version_in).map(Arc::from)
        });
        let stripped = obj.section_by_name(".symtab").is_none();
        // Builds with remapped paths still name tokio in their symbols (both manglings
        // spell the path `5tokio7runtime`).
        let named = version.is_some()
            || obj.section_by_name(".strtab").is_some_and(|s| {
                files::search_section(&file, &s, MAX_RODATA, 16, |chunk| {
                    memchr::memmem::find(chunk, b"5tokio7runtime")
                })
                .is_some()
            });
        if !named {
            return Err(TokioError::NotTokio);
        }
        let Some(rel_ro) = obj.section_by_name(".data.rel.ro") else {
            return Err(TokioError::Unsupported {
                why: "no .data.rel.ro section (where rustc puts the task vtables)".into(),
            });
        };
        let data_rel_ro = (rel_ro.address(), rel_ro.address() + rel_ro.size());
        if rel_ro.size() > MAX_DATA_REL_RO {
            return Err(TokioError::Unsupported {
                why: format!(".data.rel.ro of {} bytes", rel_ro.size()),
            });
        }
        let segments: Vec<_> = obj.segments().collect();
        let lowest_vaddr = segments.iter().map(|s| s.address()).min().unwrap_or(0);
        let code = segments
            .iter()
            .filter(|s| is_exec(*s))
            .map(|s| (s.address(), s.address() + s.size()))
            .collect::<Vec<_>>();
        if code.is_empty() {
            return Err(TokioError::Unsupported {
                why: "no executable segment".into(),
            });
        }
        let build_id = obj
            .build_id()
            .ok()
            .flatten()
            .map(|id| id.iter().map(|b| format!("{b:02x}")).collect());
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

fn is_exec<'d, S: ObjectSegment<'d>>(s: &S) -> bool {
    matches!(s.flags(), object::SegmentFlags::Elf { p_flags, .. } if p_flags.0 & object::elf::PF_X.0 != 0)
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
