//! Field offsets inside `runtime.g` (what the eBPF side reads) and inside
//! `runtime.moduledata` (what we need to find inline trees), taken from
//! DWARF when present and from the generated built-in table otherwise.

use std::borrow::Cow;

use gimli::{EndianSlice, LittleEndian};

use super::elf::Elf;
use super::layouts::{HeapOffsets, ModuleDataOffsets, TableEntry};
use super::table::TABLE;
use super::{GOffsets, GoError, GoVersion};

/// Built-in layout for a minor version; patch releases do not change
/// runtime struct layouts.
pub(crate) fn table_entry(version: GoVersion) -> Option<&'static TableEntry> {
    TABLE
        .iter()
        .find(|e| e.major == version.major && e.minor == version.minor)
}

/// Layouts found in DWARF.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DwarfLayout {
    pub offsets: GOffsets,
    pub moduledata: ModuleDataOffsets,
    pub heap: HeapOffsets,
}

struct Wanted {
    type_name: &'static str,
    members: &'static [&'static str],
    found: Vec<Option<u64>>,
    /// `DW_AT_byte_size` of the struct.
    size: Option<u64>,
    seen: bool,
}

const G_MEMBERS: &[&str] = &[
    "goid",
    "gopc",
    "startpc",
    "atomicstatus",
    "waitreason",
    "sched",
    "trackingSeq",
    "waiting",
    "parentGoid",
    "waitsince",
    "_panic",
    "_defer",
];
const GOBUF_MEMBERS: &[&str] = &["sp", "pc", "bp"];
const MODULEDATA_MEMBERS: &[&str] = &[
    "funcnametab",
    "text",
    "gofunc",
    "data",
    "bss",
    "gcdatamask",
    "gcbssmask",
];
const SUDOG_MEMBERS: &[&str] = &["next", "elem", "waitlink", "c"];
const HCHAN_MEMBERS: &[&str] = &["qcount", "dataqsiz", "closed", "recvq", "sendq"];
const MSPAN_MEMBERS: &[&str] = &[
    "startAddr",
    "npages",
    "nelems",
    "spanclass",
    "state",
    "elemsize",
    "specials",
];
const SPECIAL_MEMBERS: &[&str] = &["offset", "kind"];
const MHEAP_MEMBERS: &[&str] = &["allspans"];
const P_MEMBERS: &[&str] = &["pcache"];
/// go1.26+: `sudog.elem` and `sudog.c` wrap the address in this struct.
const TRACEABLE_MEMBERS: &[&str] = &["vu"];

/// Reads struct layouts from DWARF; `Ok(None)` when there is no
/// `.debug_info` (built with `-ldflags=-w` or `-s`).
pub(crate) fn from_dwarf(elf: &Elf<'_>) -> Result<Option<DwarfLayout>, GoError> {
    if !elf.has_section(".debug_info") && !elf.has_section(".zdebug_info") {
        return Ok(None);
    }
    let sections = gimli::DwarfSections::load(|id| -> Result<Cow<'_, [u8]>, GoError> {
        Ok(elf
            .section(id.name())?
            .map(|s| s.data)
            .unwrap_or(Cow::Borrowed(&[])))
    })?;
    let dwarf = sections.borrow(|s| EndianSlice::new(s, LittleEndian));

    let mut wanted = [
        Wanted::new("runtime.g", G_MEMBERS),
        Wanted::new("runtime.gobuf", GOBUF_MEMBERS),
        Wanted::new("runtime.moduledata", MODULEDATA_MEMBERS),
        Wanted::new("runtime.sudog", SUDOG_MEMBERS),
        Wanted::new("runtime.hchan", HCHAN_MEMBERS),
        Wanted::new("runtime.mspan", MSPAN_MEMBERS),
        Wanted::new("runtime.mheap", MHEAP_MEMBERS),
        Wanted::new("runtime.special", SPECIAL_MEMBERS),
        Wanted::new("runtime.p", P_MEMBERS),
        Wanted::new("runtime.maybeTraceablePtr", TRACEABLE_MEMBERS),
    ];
    let mut units = dwarf.units();
    while let Some(header) = units.next().map_err(dwarf_err)? {
        let unit = dwarf.unit(header).map_err(dwarf_err)?;
        let mut cursor = unit.entries();
        // (index into `wanted`, depth of the struct DIE) while inside one.
        let mut inside: Option<(usize, isize)> = None;
        while let Some(entry) = cursor.next_dfs().map_err(dwarf_err)? {
            let depth = entry.depth();
            if inside.is_some_and(|(_, d)| depth <= d) {
                inside = None;
            }
            let name = || -> Result<Option<String>, GoError> {
                let Some(value) = entry.attr_value(gimli::DW_AT_name) else {
                    return Ok(None);
                };
                let s = dwarf.attr_string(&unit, value).map_err(dwarf_err)?;
                Ok(Some(String::from_utf8_lossy(s.slice()).into_owned()))
            };
            match (entry.tag(), inside) {
                (gimli::DW_TAG_structure_type, _) => {
                    // Declarations carry no members; only take the definition.
                    if entry.attr(gimli::DW_AT_declaration).is_some() {
                        continue;
                    }
                    let Some(n) = name()? else { continue };
                    if let Some(i) = wanted.iter().position(|w| !w.seen && w.type_name == n) {
                        wanted[i].seen = true;
                        wanted[i].size = entry
                            .attr(gimli::DW_AT_byte_size)
                            .and_then(|a| a.udata_value());
                        inside = Some((i, depth));
                    }
                }
                (gimli::DW_TAG_member, Some((i, d))) if depth == d + 1 => {
                    let Some(n) = name()? else { continue };
                    let w = &mut wanted[i];
                    if let Some(slot) = w.members.iter().position(|m| *m == n) {
                        w.found[slot] = entry
                            .attr(gimli::DW_AT_data_member_location)
                            .and_then(|a| a.udata_value());
                    }
                }
                _ => {}
            }
        }
        // maybeTraceablePtr exists only since go1.26: not waited for.
        if wanted[..wanted.len() - 1].iter().all(|w| w.seen) {
            break;
        }
    }

    let [
        g,
        gobuf,
        md,
        sudog,
        hchan,
        mspan,
        mheap,
        special,
        p,
        traceable,
    ] = &wanted;
    let sched = g.get(5)?;
    let offsets = GOffsets {
        goid: g.get(0)?,
        gopc: g.get(1)?,
        startpc: g.get(2)?,
        atomicstatus: g.get(3)?,
        waitreason: g.get(4)?,
        sched_sp: add(sched, gobuf.get(0)?)?,
        sched_pc: add(sched, gobuf.get(1)?)?,
        sched_bp: add(sched, gobuf.get(2)?)?,
        tracking_seq: g.get(6)?,
        waiting: g.get(7)?,
        parent_goid: g.get(8)?,
        waitsince: g.get(9)?,
        panic: g.get(10)?,
        defer: g.get(11)?,
    };
    let moduledata = ModuleDataOffsets {
        funcnametab: md.get(0)?,
        text: md.get(1)?,
        gofunc: md.get(2)?,
        data: md.get(3)?,
        bss: md.get(4)?,
        gcdatamask: md.get(5)?,
        gcbssmask: md.get(6)?,
    };
    // The address word inside `elem` and `c` when they are maybeTraceablePtr.
    let vu = if traceable.seen { traceable.get(0)? } else { 0 };
    let heap = HeapOffsets {
        sudog_next: sudog.get(0)?,
        sudog_elem: add(sudog.get(1)?, vu)?,
        sudog_waitlink: sudog.get(2)?,
        sudog_c: add(sudog.get(3)?, vu)?,
        sudog_size: sudog.size.and_then(|s| u32::try_from(s).ok()).ok_or(
            GoError::DwarfMissing {
                what: "runtime.sudog size".into(),
            },
        )?,
        hchan_qcount: hchan.get(0)?,
        hchan_dataqsiz: hchan.get(1)?,
        hchan_closed: hchan.get(2)?,
        hchan_recvq: hchan.get(3)?,
        hchan_sendq: hchan.get(4)?,
        mspan_start_addr: mspan.get(0)?,
        mspan_npages: mspan.get(1)?,
        mspan_nelems: mspan.get(2)?,
        mspan_spanclass: mspan.get(3)?,
        mspan_state: mspan.get(4)?,
        mspan_elemsize: mspan.get(5)?,
        mspan_specials: mspan.get(6)?,
        special_kind: match (special.get(0)?, special.get(1)?) {
            (8, kind @ (10 | 16)) => kind,
            _ => {
                return Err(GoError::DwarfMissing {
                    what: "runtime.special with offset at 8".into(),
                });
            }
        },
        mheap_allspans: mheap.get(0)?,
        p_pcache: p.get(0)?,
    };
    Ok(Some(DwarfLayout {
        offsets,
        moduledata,
        heap,
    }))
}

fn add(a: u32, b: u32) -> Result<u32, GoError> {
    a.checked_add(b).ok_or(GoError::DwarfMissing {
        what: "runtime.g.sched offset in range".into(),
    })
}

fn dwarf_err(source: gimli::Error) -> GoError {
    GoError::Dwarf { source }
}

impl Wanted {
    fn new(type_name: &'static str, members: &'static [&'static str]) -> Wanted {
        Wanted {
            type_name,
            members,
            found: vec![None; members.len()],
            size: None,
            seen: false,
        }
    }

    fn get(&self, i: usize) -> Result<u32, GoError> {
        let missing = || GoError::DwarfMissing {
            what: format!(
                "{}.{}",
                self.type_name,
                self.members.get(i).copied().unwrap_or("?")
            ),
        };
        if !self.seen {
            return Err(GoError::DwarfMissing {
                what: format!("struct {}", self.type_name),
            });
        }
        self.found
            .get(i)
            .copied()
            .flatten()
            .and_then(|v| u32::try_from(v).ok())
            .ok_or_else(missing)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_covers_supported_range() {
        for minor in super::super::MIN_MINOR..=super::super::MAX_TABLE_MINOR {
            let v = GoVersion {
                major: 1,
                minor,
                patch: 0,
            };
            let e = table_entry(v).unwrap_or_else(|| panic!("no table row for {v}"));
            assert!(e.generated_from.starts_with(&format!("go1.{minor}.")));
            assert!(e.wait_reasons.len() > 10);
            for reason in ["chan receive", "chan send", "select", "sleep"] {
                assert!(e.wait_reasons.contains(&reason), "{reason} missing");
            }
        }
        assert!(
            table_entry(GoVersion {
                major: 1,
                minor: 20,
                patch: 0
            })
            .is_none()
        );
    }
}
