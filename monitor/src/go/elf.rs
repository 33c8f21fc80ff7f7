//! Thin read-only view of a 64-bit little-endian ELF file, just what the Go
//! parsers need: sections by name, reads by virtual address, pointer reads
//! that honour PIE relocations, `.symtab` lookups and PT_LOAD mapping.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;

use object::read::elf::{ElfFile64, FileHeader, ProgramHeader};
use object::{
    Endianness, Object, ObjectSection, ObjectSegment, ObjectSymbol, ReadCache, RelocationFlags, elf,
};

use super::GoError;

pub(crate) type Cache = ReadCache<File>;

/// Whether an x86_64 ELF file surely lacks a section named `name`, from its section headers
/// alone: parsing it whole (`ElfFile`) reads its symbol tables into the cache, tens of MiB
/// for a large program, which a host-wide daemon must not spend on every program that is not
/// Go. False whenever that is not sure (not x86_64, headers unreadable): the full parse says
/// what is wrong.
pub(crate) fn lacks_section(cache: &Cache, name: &[u8]) -> bool {
    matches!(crate::proc::elf::headers(cache),
        Ok((sections, _)) if !sections.iter().any(|s| &*s.name == name))
}

/// Largest section read or inflated (pclntab of the largest Go binaries is ~100 MiB).
const MAX_SECTION_BYTES: u64 = super::MAX_SECTION_MIB << 20;

/// A PT_LOAD segment, kept after the ELF is closed to turn probe addresses
/// into file offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Segment {
    pub vaddr: u64,
    pub memsz: u64,
    pub offset: u64,
    pub filesz: u64,
}

impl Segment {
    /// File offset of `vaddr` if it lies in the file-backed part of a segment.
    pub(crate) fn file_offset(segments: &[Segment], vaddr: u64) -> Option<u64> {
        segments.iter().find_map(|s| {
            let delta = vaddr.checked_sub(s.vaddr)?;
            (delta < s.filesz.min(s.memsz)).then_some(s.offset + delta)
        })
    }
}

pub(crate) struct SectionData<'a> {
    pub addr: u64,
    pub data: Cow<'a, [u8]>,
}

pub(crate) struct Elf<'a> {
    file: ElfFile64<'a, Endianness, &'a Cache>,
    pub pie: bool,
    /// R_X86_64_RELATIVE targets -> addend. Only filled for PIE, where the
    /// linker may leave the pointer slot itself zero.
    relative: HashMap<u64, u64>,
}

impl<'a> Elf<'a> {
    pub(crate) fn parse(cache: &'a Cache) -> Result<Self, GoError> {
        match object::FileKind::parse(cache) {
            Ok(object::FileKind::Elf64) => {}
            Ok(object::FileKind::Elf32) => {
                return Err(GoError::UnsupportedArch {
                    arch: "32-bit ELF".into(),
                });
            }
            Ok(_) => return Err(GoError::NotElf { source: None }),
            Err(e) => return Err(GoError::NotElf { source: Some(e) }),
        }
        let file = ElfFile64::<Endianness, _>::parse(cache)
            .map_err(|e| GoError::NotElf { source: Some(e) })?;
        let endian = file.endian();
        let header = file.elf_header();
        let machine = header.e_machine(endian);
        if machine != elf::EM_X86_64 {
            return Err(GoError::UnsupportedArch {
                arch: format!("ELF machine {machine}"),
            });
        }
        if !file.is_little_endian() {
            return Err(GoError::UnsupportedArch {
                arch: "big-endian ELF".into(),
            });
        }
        // Most executables a host runs are not Go: say so before indexing relocations.
        if file.section_by_name(".go.buildinfo").is_none() {
            return Err(GoError::NotGo);
        }
        let pie = header.e_type(endian) == elf::ET_DYN;
        let mut relative = HashMap::new();
        if pie && let Some(relocs) = file.dynamic_relocations() {
            for (offset, reloc) in relocs {
                if let RelocationFlags::Elf { r_type } = reloc.flags()
                    && r_type == elf::R_X86_64_RELATIVE
                {
                    relative.insert(offset, reloc.addend() as u64);
                }
            }
        }
        Ok(Elf {
            file,
            pie,
            relative,
        })
    }

    /// Section contents (decompressed if SHF_COMPRESSED or `.zdebug_*`) and
    /// address, or `None` if the section does not exist. A section that declares more than
    /// [`MAX_SECTION_BYTES`] is an error: the file says its own sizes.
    pub(crate) fn section(&self, name: &str) -> Result<Option<SectionData<'a>>, GoError> {
        let Some(section) = self.file.section_by_name(name) else {
            return Ok(None);
        };
        let elf_err = |source| GoError::Elf {
            what: format!("section {name}"),
            source,
        };
        let size = section
            .compressed_data()
            .map_err(elf_err)?
            .uncompressed_size;
        if size > MAX_SECTION_BYTES {
            return Err(GoError::SectionTooLarge {
                name: name.to_owned(),
                size,
            });
        }
        let data = section.uncompressed_data().map_err(elf_err)?;
        Ok(Some(SectionData {
            addr: section.address(),
            data,
        }))
    }

    pub(crate) fn has_section(&self, name: &str) -> bool {
        self.file.section_by_name(name).is_some()
    }

    pub(crate) fn section_range(&self, name: &str) -> Option<(u64, u64)> {
        self.file
            .section_by_name(name)
            .map(|s| (s.address(), s.size()))
    }

    /// Address range of the allocated section containing `addr`.
    pub(crate) fn section_range_containing(&self, addr: u64) -> Option<(u64, u64)> {
        self.file.sections().find_map(|s| {
            let (start, size) = (s.address(), s.size());
            (start != 0 && addr >= start && addr - start < size).then_some((start, size))
        })
    }

    /// `len` bytes at virtual address `addr` from the file-backed part of a
    /// PT_LOAD segment.
    pub(crate) fn read_vaddr(&self, addr: u64, len: u64) -> Result<&'a [u8], GoError> {
        for segment in self.file.segments() {
            if let Ok(Some(data)) = segment.data_range(addr, len) {
                return Ok(data);
            }
        }
        Err(GoError::UnmappedAddress { vaddr: addr })
    }

    pub(crate) fn read_u64(&self, addr: u64) -> Result<u64, GoError> {
        let bytes = self.read_vaddr(addr, 8)?;
        let arr: [u8; 8] = bytes
            .try_into()
            .map_err(|_| GoError::UnmappedAddress { vaddr: addr })?;
        Ok(u64::from_le_bytes(arr))
    }

    /// A pointer stored at `addr`, resolving a dynamic RELATIVE relocation
    /// first because PIE images may hold only the addend in `.rela.dyn`.
    pub(crate) fn read_ptr(&self, addr: u64) -> Result<u64, GoError> {
        if let Some(&addend) = self.relative.get(&addr) {
            return Ok(addend);
        }
        self.read_u64(addr)
    }

    /// Addresses in `[start, start+size)` that hold a pointer to `target`.
    pub(crate) fn pointers_to(&self, start: u64, size: u64, target: u64) -> Vec<u64> {
        let mut hits: Vec<u64> = self
            .relative
            .iter()
            .filter(|&(&at, &addend)| addend == target && at >= start && at - start < size)
            .map(|(&at, _)| at)
            .collect();
        if let Ok(data) = self.read_vaddr(start, size) {
            let needle = target.to_le_bytes();
            hits.extend(
                data.as_chunks::<8>()
                    .0
                    .iter()
                    .enumerate()
                    .filter(|(_, w)| **w == needle)
                    .map(|(i, _)| start + 8 * i as u64),
            );
        }
        hits.sort_unstable();
        hits.dedup();
        hits
    }

    #[cfg(test)]
    pub(crate) fn relative_relocs(&self) -> usize {
        self.relative.len()
    }

    /// Address and size of a `.symtab` symbol.
    pub(crate) fn symbol(&self, name: &str) -> Option<(u64, u64)> {
        self.file
            .symbols()
            .find(|s| s.name_bytes().is_ok_and(|n| n == name.as_bytes()))
            .map(|s| (s.address(), s.size()))
    }

    pub(crate) fn load_segments(&self) -> Vec<Segment> {
        let endian = self.file.endian();
        self.file
            .elf_program_headers()
            .iter()
            .filter(|ph| ph.p_type(endian) == elf::PT_LOAD)
            .map(|ph| Segment {
                vaddr: ph.p_vaddr(endian),
                memsz: ph.p_memsz(endian),
                offset: ph.p_offset(endian),
                filesz: ph.p_filesz(endian),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::Segment;

    #[test]
    fn file_offset_maps_through_pt_load() {
        let segs = [
            Segment {
                vaddr: 0x400000,
                memsz: 0x1000,
                offset: 0,
                filesz: 0x1000,
            },
            Segment {
                vaddr: 0x402000,
                memsz: 0x3000,
                offset: 0x1000,
                filesz: 0x800,
            },
        ];
        assert_eq!(Segment::file_offset(&segs, 0x400010), Some(0x10));
        assert_eq!(Segment::file_offset(&segs, 0x402010), Some(0x1010));
        // .bss part of a segment has no file bytes.
        assert_eq!(Segment::file_offset(&segs, 0x402900), None);
        assert_eq!(Segment::file_offset(&segs, 0x401000), None);
    }
}
