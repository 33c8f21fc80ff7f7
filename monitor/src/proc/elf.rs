//! The headers of a target's ELF file, read without its contents: the file header, section
//! and program headers, section names. `object::File` (and `ElfFile`) read a file's whole
//! symbol tables and their strings when parsed, tens of MiB for a large program or library,
//! on every file a host-wide daemon looks at. Here, what a reader wants of a section is read
//! from the file on purpose ([`Elf::read`], [`files::search_range`]), within its own cap.

use std::{fs::File, os::unix::fs::FileExt as _, sync::Arc};

use object::{
    Endianness, ReadCache, elf,
    elf::FileHeader64,
    read::elf::{FileHeader as _, ProgramHeader as _, SectionHeader as _},
};

use super::files;

/// Section and program headers accepted, at most (a hostile header claims millions).
const MAX_HEADERS: u32 = 4096;
/// Bytes of one header table (section and program headers, section names) read at most.
const MAX_HEADER_READ: u64 = 1 << 20;
/// Longest section name kept.
const MAX_NAME: usize = 256;

#[derive(Debug, thiserror::Error)]
pub(crate) enum ElfError {
    #[error("not a 64-bit ELF file, or its headers are cut short")]
    NotElf,
    #[error("an ELF file for another machine than x86_64")]
    OtherMachine,
    #[error("{count} section or program headers (at most {MAX_HEADERS} are read)")]
    TooManyHeaders { count: u32 },
}

/// One section header.
#[derive(Clone, Debug)]
pub(crate) struct Section {
    pub name: Box<[u8]>,
    pub kind: elf::SectionType,
    /// `SHF_*` bits.
    pub flags: u64,
    /// The index of a related section (a symbol table's strings).
    pub link: u32,
    pub addr: u64,
    pub offset: u64,
    pub size: u64,
}

impl Section {
    /// Where the section's bytes are in the file, when they are there uncompressed.
    pub(crate) fn stored(&self) -> Option<(u64, u64)> {
        (self.kind != elf::SHT_NOBITS && self.flags & elf::SHF_COMPRESSED.0 == 0)
            .then_some((self.offset, self.size))
    }

    fn compressed(&self) -> bool {
        self.kind != elf::SHT_NOBITS && self.flags & elf::SHF_COMPRESSED.0 != 0
    }
}

/// One program header.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Segment {
    pub kind: elf::ProgramType,
    /// `PF_*` bits.
    pub flags: u32,
    pub vaddr: u64,
    pub memsz: u64,
    pub offset: u64,
    pub filesz: u64,
}

/// An x86_64 ELF file's headers, and the file to read sections from.
pub(crate) struct Elf {
    pub file: File,
    pub sections: Vec<Section>,
    pub segments: Vec<Segment>,
}

impl Elf {
    /// Reads the headers of `file` (whatever it holds: each table read is capped).
    pub(crate) fn parse(file: File) -> Result<Self, ElfError> {
        let (sections, segments) = headers(&ReadCache::new(&file))?;
        Ok(Self {
            file,
            sections,
            segments,
        })
    }

    pub(crate) fn section(&self, name: &[u8]) -> Option<&Section> {
        self.sections.iter().find(|s| &*s.name == name)
    }

    /// The loadable segments.
    pub(crate) fn loads(&self) -> impl Iterator<Item = &Segment> {
        self.segments.iter().filter(|p| p.kind == elf::PT_LOAD)
    }

    /// The size of `s`'s contents once inflated, from its compression header when it has
    /// one (None: the header cannot be read).
    pub(crate) fn size_of(&self, s: &Section) -> Option<u64> {
        if s.kind == elf::SHT_NOBITS {
            return Some(0);
        }
        if !s.compressed() {
            return Some(s.size);
        }
        let mut raw = [0u8; size_of::<elf::CompressionHeader64<Endianness>>()];
        self.file.read_exact_at(&mut raw, s.offset).ok()?;
        let (header, _) =
            object::pod::from_bytes::<elf::CompressionHeader64<Endianness>>(&raw).ok()?;
        Some(header.ch_size.get(Endianness::Little))
    }

    /// The contents of `s` (inflated when compressed), when at most `cap` bytes: read from
    /// the file straight into the buffer that is kept.
    pub(crate) fn read(&self, s: &Section, cap: u64) -> Option<Arc<[u8]>> {
        let size = self.size_of(s)?;
        if size > cap {
            return None;
        }
        if s.compressed() {
            return self.inflate(s, size);
        }
        let len = usize::try_from(size).ok()?;
        let mut data: Arc<[u8]> = std::iter::repeat_n(0u8, len).collect();
        self.file
            .read_exact_at(Arc::get_mut(&mut data)?, s.offset)
            .ok()?;
        Some(data)
    }

    fn inflate(&self, s: &Section, size: u64) -> Option<Arc<[u8]>> {
        type Header = elf::CompressionHeader64<Endianness>;
        let skip = size_of::<Header>() as u64;
        let packed_len = usize::try_from(s.size.checked_sub(skip)?.min(size)).ok()?;
        let mut raw = [0u8; size_of::<Header>()];
        self.file.read_exact_at(&mut raw, s.offset).ok()?;
        let (header, _) = object::pod::from_bytes::<Header>(&raw).ok()?;
        let format = match header.ch_type.get(Endianness::Little) {
            elf::ELFCOMPRESS_ZLIB => object::CompressionFormat::Zlib,
            elf::ELFCOMPRESS_ZSTD => object::CompressionFormat::Zstandard,
            _ => return None,
        };
        let mut packed = vec![0u8; packed_len];
        self.file
            .read_exact_at(&mut packed, s.offset.checked_add(skip)?)
            .ok()?;
        let data = object::CompressedData {
            format,
            data: &packed,
            uncompressed_size: size,
        }
        .decompress()
        .ok()?;
        Some(Arc::from(&*data))
    }

    /// The GNU build id, hex, from the `.note.gnu.build-id` section.
    pub(crate) fn build_id(&self) -> Option<String> {
        let (at, len) = self.section(b".note.gnu.build-id")?.stored()?;
        let mut raw = vec![0u8; usize::try_from(len.min(4096)).ok()?];
        self.file.read_exact_at(&mut raw, at).ok()?;
        let mut notes = &raw[..];
        while notes.len() >= 12 {
            let word =
                |i: usize| u32::from_le_bytes(notes[i..i + 4].try_into().unwrap_or_default());
            let (namesz, descsz, kind) = (word(0) as usize, word(4) as usize, word(8));
            let name_end = 12 + namesz.next_multiple_of(4);
            let desc_end = name_end.checked_add(descsz.next_multiple_of(4))?;
            // The name's NUL is counted in its size.
            let name = notes.get(12..12 + namesz)?;
            let name = name.strip_suffix(b"\0").unwrap_or(name);
            let desc = notes.get(name_end..name_end + descsz)?;
            if name == elf::ELF_NOTE_GNU && kind == elf::NT_GNU_BUILD_ID.0 {
                return Some(desc.iter().map(|b| format!("{b:02x}")).collect());
            }
            notes = notes.get(desc_end..)?;
        }
        None
    }
}

/// The section and program headers of the file `whole` reads (each table read capped).
pub(crate) fn headers<R: object::ReadCacheOps>(
    whole: &ReadCache<R>,
) -> Result<(Vec<Section>, Vec<Segment>), ElfError> {
    let cache = files::Capped {
        cache: whole,
        max: MAX_HEADER_READ,
    };
    let header = FileHeader64::<Endianness>::parse(cache).map_err(|_| ElfError::NotElf)?;
    let endian = header.endian().map_err(|_| ElfError::NotElf)?;
    if header.e_machine(endian) != elf::EM_X86_64 {
        return Err(ElfError::OtherMachine);
    }
    let shnum = header.shnum(endian, cache).map_err(|_| ElfError::NotElf)?;
    let phnum = header.phnum(endian, cache).map_err(|_| ElfError::NotElf)?;
    if shnum.max(phnum) > MAX_HEADERS {
        return Err(ElfError::TooManyHeaders {
            count: shnum.max(phnum),
        });
    }
    let table = header
        .sections(endian, cache)
        .map_err(|_| ElfError::NotElf)?;
    let sections = table
        .iter()
        .map(|s| Section {
            name: table
                .section_name(endian, s)
                .map(|n| Box::from(&n[..n.len().min(MAX_NAME)]))
                .unwrap_or_default(),
            kind: s.sh_type(endian),
            flags: s.sh_flags(endian).0,
            link: s.sh_link(endian),
            addr: s.sh_addr(endian),
            offset: s.sh_offset(endian),
            size: s.sh_size(endian),
        })
        .collect();
    let segments = header
        .program_headers(endian, cache)
        .map_err(|_| ElfError::NotElf)?
        .iter()
        .map(|p| Segment {
            kind: p.p_type(endian),
            flags: p.p_flags(endian).0,
            vaddr: p.p_vaddr(endian),
            memsz: p.p_memsz(endian),
            offset: p.p_offset(endian),
            filesz: p.p_filesz(endian),
        })
        .collect();
    Ok((sections, segments))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_test_binary_without_its_symbol_tables() {
        let exe = File::open("/proc/self/exe").unwrap();
        let elf = Elf::parse(exe).unwrap();
        assert!(elf.section(b".text").is_some());
        assert!(elf.loads().any(|p| p.flags & elf::PF_X.0 != 0));
        let hdr = elf.section(b".eh_frame_hdr").unwrap();
        let data = elf.read(hdr, 1 << 20).unwrap();
        assert_eq!(data.len() as u64, hdr.size);
        // The version byte of an .eh_frame_hdr.
        assert_eq!(data[0], 1);
        assert!(elf.read(elf.section(b".text").unwrap(), 16).is_none());
        // Rust links with a build id.
        assert_eq!(elf.build_id().map(|id| id.len()), Some(40));
    }

    #[test]
    fn refuses_what_is_not_elf() {
        let mut f = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut f, &[0x7f, b'E', b'L', b'F', 2, 1, 1]).unwrap();
        assert!(matches!(Elf::parse(f), Err(ElfError::NotElf)));
    }
}
