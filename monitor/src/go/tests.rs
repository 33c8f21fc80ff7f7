//! Integration tests against binaries built by every installed Go
//! toolchain (see `testutil.rs`), plus the generator of `table.rs`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::File;
use std::path::Path;

use super::elf::Elf;
use super::offsets::{self, DwarfLayout, table_entry};
use super::testutil::{self, Built};
use super::{GoBinary, GoError, GoVersion, OffsetSource, waitreasons};

use super::PROBED;

fn open(path: &Path) -> GoBinary {
    GoBinary::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

/// Layout and wait reasons straight from DWARF and `.symtab`.
fn ground_truth(path: &Path) -> (GoVersion, DwarfLayout, Vec<String>) {
    let bin = open(path);
    let cache = object::ReadCache::new(File::open(path).expect("open"));
    let elf = Elf::parse(&cache).expect("parse elf");
    let layout = offsets::from_dwarf(&elf)
        .expect("dwarf")
        .expect("has dwarf");
    let reasons = waitreasons::from_symtab(&elf)
        .expect("wait reasons")
        .expect("has symtab");
    (bin.version, layout, reasons)
}

fn symtab_addr(path: &Path, name: &str) -> u64 {
    let cache = object::ReadCache::new(File::open(path).expect("open"));
    let elf = Elf::parse(&cache).expect("parse elf");
    elf.symbol(name)
        .unwrap_or_else(|| panic!("{name} not in symtab"))
        .0
}

#[test]
fn version_offsets_and_wait_reasons() {
    for b in testutil::built() {
        let tc = &b.toolchain;
        let bin = open(&b.normal);
        assert_eq!(bin.version, tc.version, "{}", b.normal.display());
        assert_eq!(bin.version.to_string(), format!("go{}", tc.dir_version));
        assert!(bin.has_dwarf);
        assert!(!bin.pie);
        // Validated versions use their table (checked against DWARF below).
        assert_eq!(bin.offset_source, OffsetSource::Table);
        assert_eq!(bin.wait_reason(0), "");
        assert_eq!(bin.wait_reason(255), "waitReason(255)");
        for name in ["chan send", "chan receive", "select", "sleep"] {
            let code = bin.wait_reasons.iter().position(|r| r == name).unwrap();
            assert_eq!(bin.wait_reason(code as u8), name);
        }
        eprintln!("go{}: {:?}", tc.dir_version, bin.offsets);
    }
}

#[test]
fn stripped_uses_table_and_matches_dwarf() {
    for b in testutil::built() {
        let normal = open(&b.normal);
        let stripped = open(&b.stripped);
        let v = &b.toolchain.dir_version;
        assert_eq!(stripped.version, normal.version);
        assert!(!stripped.has_dwarf, "go{v}");
        assert_eq!(stripped.offset_source, OffsetSource::Table, "go{v}");
        assert_eq!(stripped.offsets, normal.offsets, "go{v}");
        assert_eq!(stripped.wait_reasons, normal.wait_reasons, "go{v}");
        // The goroutine table found from runtime.allgadd's code is the symbol's address.
        assert!(normal.allgs.is_some(), "go{v}: no runtime.allgs symbol");
        assert_eq!(normal.allgs_from_code(), normal.allgs, "go{v}");
        // (Not equal to the normal build's: the build info records -ldflags, shifting data.
        // The stripped end-to-end test shows this address reads the goroutine table.)
        assert!(
            stripped.allgs.is_some(),
            "go{v}: runtime.allgs not found in code"
        );
        // The same for the heap the reachability analysis reads.
        assert!(normal.mheap.is_some(), "go{v}: no runtime.mheap_ symbol");
        assert_eq!(normal.mheap_from_code(), normal.mheap, "go{v}");
        assert!(
            stripped.mheap.is_some(),
            "go{v}: runtime.mheap_ not found in code"
        );
        assert_eq!(stripped.heap, normal.heap, "go{v}");
        assert_eq!(stripped.main_module, normal.main_module, "go{v}");
        assert_eq!(normal.main_module.as_deref(), Some("orders"), "go{v}");
        assert!(stripped.has_inline_info(), "go{v}: moduledata not found");
        for f in PROBED {
            assert_eq!(
                stripped.probe_site(f).unwrap(),
                normal.probe_site(f).unwrap(),
                "go{v} {f}"
            );
        }
    }
}

/// The committed table must equal what DWARF and `.symtab` say for every
/// installed toolchain.
#[test]
fn table_matches_installed_toolchains() {
    for b in testutil::built() {
        let (version, layout, reasons) = ground_truth(&b.normal);
        if version.minor > super::MAX_TABLE_MINOR {
            eprintln!(
                "go{}: newer than the table, not compared",
                b.toolchain.dir_version
            );
            continue;
        }
        let entry = table_entry(version).unwrap_or_else(|| panic!("no table row for {version}"));
        assert_eq!(entry.offsets, layout.offsets, "{version}");
        assert_eq!(entry.moduledata, layout.moduledata, "{version}");
        assert_eq!(entry.wait_reasons, reasons, "{version}");
    }
}

/// The moduledata scan (which also serves stripped binaries) must agree
/// with the symbols it replaces.
#[test]
fn moduledata_matches_symbols() {
    for b in testutil::built() {
        let v = &b.toolchain.dir_version;
        for path in [Some(&b.normal), b.pie.as_ref()].into_iter().flatten() {
            let bin = open(path);
            let (gofunc, text) = (
                symtab_addr(path, "go:func.*"),
                symtab_addr(path, "runtime.text"),
            );
            assert_eq!(
                bin.pclntab().gofunc_base(),
                Some(gofunc),
                "go{v} {}",
                path.display()
            );
            assert_eq!(bin.pclntab().text_start(), text, "go{v} {}", path.display());
        }
        // No symbols to compare with; the layout differs from the normal
        // build after .text, so only the text start is comparable.
        let stripped = open(&b.stripped);
        assert!(stripped.pclntab().gofunc_base().is_some(), "go{v}");
        assert_eq!(
            stripped.pclntab().text_start(),
            symtab_addr(&b.normal, "runtime.text"),
            "go{v}"
        );
    }
}

#[test]
fn symbolize_main_and_inlined_code() {
    let main_line = testutil::line_of("main");
    let inlined_line = testutil::line_of("inlined");
    for b in testutil::built() {
        let v = &b.toolchain.dir_version;
        let main_addr = symtab_addr(&b.normal, "main.main");
        for path in [&b.normal, &b.stripped] {
            let bin = open(path);
            let f = bin.pclntab().func_by_name("main.main").unwrap();
            assert_eq!(f.entry, main_addr, "go{v} {}", path.display());
            let frame = bin.symbolize(f.entry).unwrap();
            assert_eq!(frame.function, "main.main", "go{v}");
            assert!(frame.file.ends_with("/main.go"), "go{v}: {}", frame.file);
            assert_eq!(frame.line, main_line, "go{v}");
            assert_eq!(bin.func_name(f.entry), Some("main.main"));
            assert_eq!(bin.func_name(f.end - 1), Some("main.main"));

            // Some instruction of main.main comes from the inlined scale().
            let inlined = (f.entry..f.end)
                .filter_map(|pc| bin.symbolize(pc))
                .find(|fr| fr.function == "main.scale")
                .unwrap_or_else(|| panic!("go{v}: no inlined main.scale in main.main"));
            assert_eq!(inlined.line, inlined_line, "go{v}");
            assert!(inlined.file.ends_with("/main.go"));

            let send = bin.pclntab().func_by_name("main.blockSend").unwrap();
            let send_line = testutil::line_of("send");
            assert!(
                (send.entry..send.end)
                    .filter_map(|pc| bin.symbolize(pc))
                    .any(|fr| fr.line == send_line && fr.function == "main.blockSend"),
                "go{v}"
            );
            assert!(bin.symbolize(0).is_none());
            assert!(bin.func_name(u64::MAX).is_none());
        }
    }
}

/// Every `.symtab` function in `.text` resolves to its own name, which
/// checks the binary search and the text start.
#[test]
fn func_name_agrees_with_symtab() {
    use object::{Object, ObjectSymbol, SymbolKind};
    for b in testutil::built() {
        let bin = open(&b.normal);
        let data = std::fs::read(&b.normal).unwrap();
        let obj = object::File::parse(&*data).unwrap();
        let mut checked = 0;
        for sym in obj.symbols() {
            let Ok(name) = sym.name() else { continue };
            if sym.kind() != SymbolKind::Text || sym.size() == 0 || name.contains(".abi0") {
                continue;
            }
            // Assembly functions appear under ABI wrappers' names too; only
            // compare names the pclntab has.
            if let Some(got) = bin.func_name(sym.address()) {
                // The symbol table spells the middle dot that pclntab keeps.
                if got == name.replace('·', ".") || got.replace('·', ".") == name {
                    checked += 1;
                } else {
                    panic!(
                        "go{}: {name} at {:#x} symbolized as {got}",
                        b.toolchain.dir_version,
                        sym.address()
                    );
                }
            }
        }
        assert!(checked > 1000, "only {checked} functions checked");
    }
}

#[test]
fn probe_sites_for_runtime_functions() {
    let mut report = String::new();
    for b in testutil::built() {
        let bin = open(&b.normal);
        let data = std::fs::read(&b.normal).unwrap();
        let _ = write!(report, "go{}:", b.toolchain.dir_version);
        for f in PROBED {
            let (site, prologue) = bin.probe_site_with_prologue(f).unwrap();
            assert_eq!(site.entry, symtab_addr(&b.normal, f), "{f}");
            assert!(
                site.after_prologue,
                "go{} {f}: {prologue}",
                b.toolchain.dir_version
            );
            let at = usize::try_from(site.file_offset).unwrap();
            assert_eq!(data[at], 0x55, "{f}: probe not on push rbp");
            assert_eq!(bin.func_name(site.probe_vaddr), Some(f));
            let _ = write!(report, " {f}=[{prologue}]");
        }
        report.push('\n');
    }
    eprint!("{report}");
}

#[test]
fn pie_binary() {
    let Some(b) = testutil::built().iter().find(|b| b.pie.is_some()) else {
        return;
    };
    let Some(pie) = b.pie.as_ref() else { return };
    let bin = open(pie);
    let normal = open(&b.normal);
    assert!(bin.pie);
    let cache = object::ReadCache::new(File::open(pie).expect("open"));
    let relocs = Elf::parse(&cache).expect("parse elf").relative_relocs();
    eprintln!("PIE: {relocs} R_X86_64_RELATIVE relocations");
    assert!(relocs > 1000);
    assert_eq!(bin.offsets, normal.offsets);
    assert_eq!(bin.wait_reasons, normal.wait_reasons);
    assert!(bin.has_inline_info());
    let f = bin.pclntab().func_by_name("main.main").unwrap();
    assert_eq!(f.entry, symtab_addr(pie, "main.main"));
    let frame = bin.symbolize(f.entry).unwrap();
    assert_eq!(
        (frame.function.as_str(), frame.line),
        ("main.main", testutil::line_of("main"))
    );
    let data = std::fs::read(pie).unwrap();
    for name in PROBED {
        let site = bin.probe_site(name).unwrap();
        assert!(site.after_prologue);
        assert_eq!(data[usize::try_from(site.file_offset).unwrap()], 0x55);
    }
}

#[test]
fn rejects_non_go_and_non_elf() {
    let err = GoBinary::open(Path::new("/bin/ls")).unwrap_err();
    assert!(matches!(err, GoError::NotGo), "{err:?}");
    assert_eq!(
        err.to_string(),
        "not a Go executable: no .go.buildinfo section"
    );

    let text = testutil::write_scratch("not-elf.txt", b"#!/bin/sh\necho hello\n");
    let err = GoBinary::open(&text).unwrap_err();
    assert!(matches!(err, GoError::NotElf { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        "not an ELF file; point leakmon at a Go executable"
    );

    let err = GoBinary::open(Path::new("/nonexistent/leakmon")).unwrap_err();
    assert!(matches!(err, GoError::Io { .. }), "{err:?}");
    assert_eq!(err.to_string(), "cannot read /nonexistent/leakmon");

    // An aarch64 ELF: patch e_machine of a copy of /bin/ls.
    let mut ls = std::fs::read("/bin/ls").unwrap();
    ls[18..20].copy_from_slice(&183u16.to_le_bytes());
    let arm = testutil::write_scratch("ls-aarch64", &ls);
    let err = GoBinary::open(&arm).unwrap_err();
    assert!(matches!(err, GoError::UnsupportedArch { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        "unsupported architecture: ELF machine 183; only x86_64 (amd64) Go binaries are supported"
    );
}

#[test]
fn version_gates() {
    let Some(b) = testutil::built().first() else {
        return;
    };
    let v = &b.toolchain.dir_version;
    // Same length as the real version so the patch fits.
    let old = format!("go1.19{}", &v[4..]);
    let err = GoBinary::open(&testutil::with_version(&b.normal, "old", &old)).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("{old} is not supported (supported: go1.21 to go1.27)")
    );
    let future = format!("go1.99{}", &v[4..]);
    let err =
        GoBinary::open(&testutil::with_version(&b.stripped, "future-s", &future)).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "stripped binary: no DWARF and no built-in table for {future}; \
             rebuild without -ldflags=-s -w"
        )
    );
    // Newer than validated: refused, unless asked for; then DWARF gives the layout.
    let newer = testutil::with_version(&b.normal, "future", &future);
    let err = GoBinary::open(&newer).unwrap_err();
    assert!(matches!(err, GoError::NotValidated { .. }), "{err}");
    assert!(err.to_string().contains("go_unvalidated = true"), "{err}");
    let bin = GoBinary::open_with(&newer, true).unwrap();
    assert_eq!(bin.version.minor, 99);
    assert_eq!(bin.offset_source, OffsetSource::Dwarf);
}

/// Regenerates `table.rs`:
/// `LEAKMON_GEN_TABLE=src/go/table.rs cargo test generate_table`.
/// Without the variable this only renders (checking the generator runs).
#[test]
fn generate_table() {
    // Newest patch of each minor in the supported range.
    let mut rows: BTreeMap<u32, &Built> = BTreeMap::new();
    for b in testutil::built() {
        let v = b.toolchain.version;
        if v.major == 1 && (super::MIN_MINOR..=super::MAX_TABLE_MINOR).contains(&v.minor) {
            rows.insert(v.minor, b);
        }
    }
    let mut out = String::from(
        "//! @generated by the `generate_table` test in `tests.rs` from the DWARF and\n\
         //! `runtime.waitReasonStrings` of programs built with each toolchain:\n\
         //! `LEAKMON_GEN_TABLE=src/go/table.rs cargo test generate_table`. Do not edit.\n\
         \n\
         use super::GOffsets;\n\
         use super::layouts::{HeapOffsets, ModuleDataOffsets, TableEntry};\n\
         \n\
         pub(crate) static TABLE: &[TableEntry] = &[\n",
    );
    for b in rows.values() {
        let (version, layout, reasons) = ground_truth(&b.normal);
        let o = layout.offsets;
        let m = layout.moduledata;
        let _ = writeln!(out, "    TableEntry {{");
        let _ = writeln!(out, "        major: {},", version.major);
        let _ = writeln!(out, "        minor: {},", version.minor);
        let _ = writeln!(out, "        generated_from: \"{version}\",");
        let _ = writeln!(out, "        offsets: GOffsets {{");
        for (k, v) in [
            ("goid", o.goid),
            ("gopc", o.gopc),
            ("startpc", o.startpc),
            ("atomicstatus", o.atomicstatus),
            ("waitreason", o.waitreason),
            ("sched_sp", o.sched_sp),
            ("sched_pc", o.sched_pc),
            ("sched_bp", o.sched_bp),
            ("tracking_seq", o.tracking_seq),
            ("waiting", o.waiting),
            ("parent_goid", o.parent_goid),
            ("waitsince", o.waitsince),
            ("panic", o.panic),
            ("defer", o.defer),
        ] {
            let _ = writeln!(out, "            {k}: {v},");
        }
        let _ = writeln!(out, "        }},");
        let _ = writeln!(out, "        moduledata: ModuleDataOffsets {{");
        let _ = writeln!(out, "            funcnametab: {},", m.funcnametab);
        let _ = writeln!(out, "            text: {},", m.text);
        let _ = writeln!(out, "            gofunc: {},", m.gofunc);
        let _ = writeln!(out, "            data: {},", m.data);
        let _ = writeln!(out, "            bss: {},", m.bss);
        let _ = writeln!(out, "            gcdatamask: {},", m.gcdatamask);
        let _ = writeln!(out, "            gcbssmask: {},", m.gcbssmask);
        let _ = writeln!(out, "        }},");
        let h = layout.heap;
        let _ = writeln!(out, "        heap: HeapOffsets {{");
        for (k, v) in [
            ("sudog_next", h.sudog_next),
            ("sudog_elem", h.sudog_elem),
            ("sudog_waitlink", h.sudog_waitlink),
            ("sudog_c", h.sudog_c),
            ("sudog_size", h.sudog_size),
            ("hchan_qcount", h.hchan_qcount),
            ("hchan_dataqsiz", h.hchan_dataqsiz),
            ("hchan_closed", h.hchan_closed),
            ("hchan_recvq", h.hchan_recvq),
            ("hchan_sendq", h.hchan_sendq),
            ("mspan_start_addr", h.mspan_start_addr),
            ("mspan_npages", h.mspan_npages),
            ("mspan_nelems", h.mspan_nelems),
            ("mspan_spanclass", h.mspan_spanclass),
            ("mspan_state", h.mspan_state),
            ("mspan_elemsize", h.mspan_elemsize),
            ("mspan_specials", h.mspan_specials),
            ("special_kind", h.special_kind),
            ("mheap_allspans", h.mheap_allspans),
            ("p_pcache", h.p_pcache),
        ] {
            let _ = writeln!(out, "            {k}: {v},");
        }
        let _ = writeln!(out, "        }},");
        let _ = writeln!(out, "        wait_reasons: &[");
        for r in &reasons {
            let _ = writeln!(out, "            {r:?},");
        }
        let _ = writeln!(out, "        ],");
        let _ = writeln!(out, "    }},");
    }
    out.push_str("];\n");
    // With exactly the toolchains the committed table came from, the output
    // must be byte-identical to it (catches hand edits and generator drift).
    let installed: Vec<String> = rows
        .values()
        .map(|b| b.toolchain.version.to_string())
        .collect();
    let committed: Vec<&str> = super::table::TABLE
        .iter()
        .map(|e| e.generated_from)
        .collect();
    if let Some(path) = std::env::var_os("LEAKMON_GEN_TABLE") {
        std::fs::write(&path, &out).expect("write table");
        eprintln!(
            "wrote {} rows to {}",
            rows.len(),
            Path::new(&path).display()
        );
        return;
    }
    if installed == committed {
        assert!(
            out == include_str!("table.rs"),
            "table.rs is stale; regenerate with LEAKMON_GEN_TABLE=src/go/table.rs"
        );
    } else {
        eprintln!(
            "generate_table: installed {installed:?} differ from {committed:?}, not compared"
        );
    }
}

/// A compressed section declares its own inflated size: a hostile file says a terabyte. That
/// is an error, not an allocation; and a newer-than-validated binary whose DWARF says so is
/// refused with that error.
#[test]
fn declared_section_sizes_are_not_trusted() {
    use object::{Object as _, ObjectSection as _};
    let Some(b) = testutil::built().last() else {
        return;
    };
    let mut data = std::fs::read(&b.normal).unwrap();
    let offset = {
        let file = object::File::parse(&*data).unwrap();
        let section = file.section_by_name(".debug_info").unwrap();
        assert!(
            section.compressed_file_range().unwrap().format != object::CompressionFormat::None,
            "go{} compresses DWARF",
            b.toolchain.dir_version
        );
        section.file_range().unwrap().0 as usize
    };
    // Elf64_Chdr: ch_type, ch_reserved, ch_size (u64), ch_addralign.
    data[offset + 8..offset + 16].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let patched = testutil::write_scratch("huge-dwarf", &data);
    let cache = object::ReadCache::new(File::open(&patched).unwrap());
    let elf = Elf::parse(&cache).unwrap();
    let err = offsets::from_dwarf(&elf).unwrap_err();
    assert!(matches!(err, GoError::SectionTooLarge { .. }), "{err}");
    // Through the whole inspection too, for a version with no table (DWARF is then used).
    let v = &b.toolchain.dir_version;
    let future =
        testutil::with_version(&patched, "huge-dwarf-future", &format!("go1.99{}", &v[4..]));
    let err = GoBinary::open_with(&future, true).unwrap_err();
    assert!(err.to_string().contains("over the 256 MiB"), "{err}");
}
