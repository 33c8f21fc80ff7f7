//! Parser for `.gopclntab`, the Go runtime's own PC -> function/file/line
//! table, in the Go 1.20+ layout (magic 0xfffffff1). It survives
//! `-ldflags="-s -w"`, so it is our symbolizer for stripped binaries too.
//!
//! Layout (all offsets relative to the section start):
//! - pcHeader: magic u32, pad, minLC, ptrSize, nfunc, nfiles, textStart
//!   (unused since go1.26), then offsets of funcnametab, cutab, filetab,
//!   pctab and the function table.
//! - function table: nfunc+1 pairs `{entryoff u32, funcoff u32}` sorted by
//!   entryoff (relative to the text start); the last entryoff is the end.
//! - `_func` at functab+funcoff: fixed 44 bytes, then `npcdata` u32 offsets
//!   into pctab and `nfuncdata` u32 offsets from `moduledata.gofunc`.

use std::fmt;

use super::Frame;
use super::GoError;
use super::buildinfo::uvarint;

pub(crate) const GO120_MAGIC: u32 = 0xffff_fff1;
const HEADER_LEN: usize = 72;
const FUNC_LEN: usize = 44;
const PCDATA_INL_TREE_INDEX: u32 = 2;
const FUNCDATA_INL_TREE: u32 = 3;
const INLINED_CALL_LEN: u64 = 16;

/// `moduledata.gofunc` and a copy of the bytes behind it, which hold the
/// FUNCDATA blobs (we only read inline trees from them).
pub(crate) struct GoFunc {
    pub base: u64,
    pub bytes: Vec<u8>,
}

pub(crate) struct Pclntab {
    data: Vec<u8>,
    /// Virtual address of the section (what `moduledata.pcHeader` points to).
    pub vaddr: u64,
    text_start: u64,
    nfunc: usize,
    funcnametab: usize,
    cutab: usize,
    filetab: usize,
    pctab: usize,
    functab: usize,
    gofunc: Option<GoFunc>,
}

impl fmt::Debug for Pclntab {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pclntab")
            .field("vaddr", &self.vaddr)
            .field("len", &self.data.len())
            .field("text_start", &self.text_start)
            .field("nfunc", &self.nfunc)
            .field("gofunc", &self.gofunc.as_ref().map(|g| g.base))
            .finish()
    }
}

/// One `_func` record.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Func {
    /// Byte offset of the `_func` inside the section.
    off: usize,
    pub entry: u64,
    /// First address past the function (next function's entry).
    pub end: u64,
    name_off: u32,
    /// `_func.args`: bytes of arguments (`i32::MIN`, ArgsSizeUnknown, for reflect stubs).
    pub args: i32,
    /// pc-value table of the stack pointer's distance from its value at entry.
    pub pcsp: u32,
    pcfile: u32,
    pcln: u32,
    npcdata: u32,
    cu_offset: u32,
    /// `_func.funcID`: what kind of function the runtime takes it for (its wrappers are left
    /// out of tracebacks).
    pub func_id: u8,
    /// `_func.flag`: `FuncFlagTopFrame` (1), `FuncFlagSPWrite` (2), `FuncFlagAsm` (4).
    pub flag: u8,
    nfuncdata: u8,
}

fn u32_at(data: &[u8], off: usize) -> Option<u32> {
    let b = data.get(off..off.checked_add(4)?)?;
    Some(u32::from_le_bytes(b.try_into().ok()?))
}

pub(super) use crate::proc::u64_at;

/// NUL-terminated string at `off`.
fn cstr_at(data: &[u8], off: usize) -> Option<&str> {
    let tail = data.get(off..)?;
    let len = tail.iter().position(|&b| b == 0)?;
    std::str::from_utf8(tail.get(..len)?).ok()
}

impl Pclntab {
    pub(crate) fn parse(data: Vec<u8>, vaddr: u64) -> Result<Pclntab, GoError> {
        let magic = u32_at(&data, 0).ok_or(GoError::BadPclntab("truncated header"))?;
        if magic != GO120_MAGIC {
            return Err(GoError::UnsupportedPclntab { magic });
        }
        let header = data
            .get(..HEADER_LEN)
            .ok_or(GoError::BadPclntab("truncated header"))?;
        // minLC is the PC quantum: 1 on amd64, which pcvalue decoding assumes.
        if header[6] != 1 || header[7] != 8 {
            return Err(GoError::BadPclntab(
                "unexpected pc quantum or pointer size (not amd64)",
            ));
        }
        let field = |i: usize| -> Result<usize, GoError> {
            u64_at(header, 8 + 8 * i)
                .and_then(|v| usize::try_from(v).ok())
                .filter(|&v| v <= data.len())
                .ok_or(GoError::BadPclntab("header field out of range"))
        };
        let nfunc = field(0)?;
        let text_start = u64_at(header, 24).unwrap_or(0);
        let table = Pclntab {
            vaddr,
            text_start,
            nfunc,
            funcnametab: field(3)?,
            cutab: field(4)?,
            filetab: field(5)?,
            pctab: field(6)?,
            functab: field(7)?,
            gofunc: None,
            data,
        };
        let functab_end = (nfunc + 1)
            .checked_mul(8)
            .and_then(|n| n.checked_add(table.functab));
        if functab_end.is_none_or(|end| end > table.data.len()) {
            return Err(GoError::BadPclntab("function table runs past the section"));
        }
        Ok(table)
    }

    /// `pcHeader.textStart`; zero on go1.26+ which no longer stores it.
    pub(crate) fn header_text_start(&self) -> u64 {
        self.text_start
    }

    pub(crate) fn set_text_start(&mut self, text_start: u64) {
        self.text_start = text_start;
    }

    /// Offset of funcnametab from the header; `moduledata.funcnametab`
    /// points there, which lets us validate a moduledata candidate.
    pub(crate) fn funcnametab_offset(&self) -> u64 {
        self.funcnametab as u64
    }

    pub(crate) fn set_gofunc(&mut self, gofunc: GoFunc) {
        self.gofunc = Some(gofunc);
    }

    #[cfg(test)]
    pub(crate) fn gofunc_base(&self) -> Option<u64> {
        self.gofunc.as_ref().map(|g| g.base)
    }

    pub(crate) fn text_start(&self) -> u64 {
        self.text_start
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.nfunc
    }

    fn entry_off(&self, i: usize) -> Option<u32> {
        u32_at(&self.data, self.functab + 8 * i)
    }

    /// The i-th function record.
    pub(crate) fn func(&self, i: usize) -> Option<Func> {
        if i >= self.nfunc {
            return None;
        }
        let funcoff = u32_at(&self.data, self.functab + 8 * i + 4)? as usize;
        let off = self.functab.checked_add(funcoff)?;
        let rec = self.data.get(off..off.checked_add(FUNC_LEN)?)?;
        let at = |o: usize| u32_at(rec, o);
        Some(Func {
            off,
            entry: self.text_start + u64::from(at(0)?),
            end: self.text_start + u64::from(self.entry_off(i + 1)?),
            name_off: at(4)?,
            args: at(8)? as i32,
            pcsp: at(16)?,
            pcfile: at(20)?,
            pcln: at(24)?,
            npcdata: at(28)?,
            cu_offset: at(32)?,
            func_id: rec[40],
            flag: rec[41],
            nfuncdata: rec[43],
        })
    }

    /// Function containing `pc` (binary search over sorted entries).
    pub(crate) fn find_func(&self, pc: u64) -> Option<Func> {
        let rel = u32::try_from(pc.checked_sub(self.text_start)?).ok()?;
        if rel >= self.entry_off(self.nfunc)? {
            return None;
        }
        // First index whose entry is > rel, minus one.
        let (mut lo, mut hi) = (0usize, self.nfunc);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if self.entry_off(mid)? <= rel {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        self.func(lo.checked_sub(1)?)
    }

    /// Linear scan; fine for the handful of names a monitor probes.
    pub(crate) fn func_by_name(&self, name: &str) -> Option<Func> {
        (0..self.nfunc)
            .filter_map(|i| self.func(i))
            .find(|f| self.func_name(f) == Some(name))
    }

    pub(crate) fn func_name(&self, f: &Func) -> Option<&str> {
        self.name_at(f.name_off)
    }

    fn name_at(&self, name_off: u32) -> Option<&str> {
        cstr_at(&self.data, self.funcnametab.checked_add(name_off as usize)?)
    }

    pub(crate) fn pcdata_off(&self, f: &Func, index: u32) -> Option<u32> {
        if index >= f.npcdata {
            return None;
        }
        u32_at(&self.data, f.off + FUNC_LEN + 4 * index as usize).filter(|&o| o != 0)
    }

    fn funcdata_off(&self, f: &Func, index: u32) -> Option<u32> {
        if index >= u32::from(f.nfuncdata) {
            return None;
        }
        let at = f.off + FUNC_LEN + 4 * (f.npcdata as usize + index as usize);
        u32_at(&self.data, at).filter(|&o| o != u32::MAX)
    }

    /// The FUNCDATA blob `index` of `f`: the bytes of `go:func.*` from where it starts.
    pub(crate) fn funcdata(&self, f: &Func, index: u32) -> Option<&[u8]> {
        let gofunc = self.gofunc.as_ref()?;
        gofunc.bytes.get(self.funcdata_off(f, index)? as usize..)
    }

    /// Value of the pc-value table at `table` (offset into pctab) for `pc`.
    /// Encoding: pairs of zig-zag uvarint value delta and uvarint pc delta
    /// (times the pc quantum, 1 on amd64), starting at value -1 and the
    /// function entry; a zero value delta after the first pair ends it.
    pub(crate) fn pcvalue(&self, table: u32, entry: u64, pc: u64) -> Option<i32> {
        if table == 0 {
            return None;
        }
        let mut p = self.data.get(self.pctab.checked_add(table as usize)?..)?;
        let (mut val, mut cur) = (-1i32, entry);
        let mut first = true;
        // Each entry of a well-formed table advances the pc: a table that does not is walked
        // no further than the function, not to the end of the section.
        let steps = pc.checked_sub(entry)?.saturating_add(2);
        for _ in 0..steps {
            let (uvdelta, n) = uvarint(p)?;
            if uvdelta == 0 && !first {
                return None;
            }
            first = false;
            let uvdelta = u32::try_from(uvdelta).ok()?;
            let delta = ((uvdelta >> 1) as i32) ^ -((uvdelta & 1) as i32);
            val = val.wrapping_add(delta);
            p = p.get(n..)?;
            let (pcdelta, n) = uvarint(p)?;
            p = p.get(n..)?;
            cur = cur.checked_add(pcdelta)?;
            if pc < cur {
                return Some(val);
            }
        }
        None
    }

    fn file_name(&self, f: &Func, fileno: i32) -> Option<&str> {
        let idx = u32::try_from(fileno).ok()?.checked_add(f.cu_offset)? as usize;
        let off = u32_at(&self.data, self.cutab.checked_add(idx.checked_mul(4)?)?)?;
        if off == u32::MAX {
            return None;
        }
        cstr_at(&self.data, self.filetab.checked_add(off as usize)?)
    }

    /// Inline tree record `ix` of `f`: (name offset, parentPc).
    fn inlined_call(&self, f: &Func, ix: u64) -> Option<(u32, i32)> {
        let gofunc = self.gofunc.as_ref()?;
        let tree = u64::from(self.funcdata_off(f, FUNCDATA_INL_TREE)?);
        let rec = usize::try_from(tree.checked_add(ix.checked_mul(INLINED_CALL_LEN)?)?).ok()?;
        let name_off = u32_at(&gofunc.bytes, rec.checked_add(4)?)?;
        let parent_pc = u32_at(&gofunc.bytes, rec.checked_add(8)?)? as i32;
        Some((name_off, parent_pc))
    }

    /// See [`super::GoBinary::frames`]: the inline chain at `pc`, innermost first, each with
    /// its own file and line (the runtime's inlineUnwinder walk).
    pub(crate) fn frames(&self, pc: u64) -> Vec<Frame> {
        let Some(f) = self.find_func(pc) else {
            return Vec::new();
        };
        let mut frames = Vec::new();
        let mut pc = pc;
        // Inlining depth is bounded by the compiler; the cap guards against a corrupt tree.
        for _ in 0..64 {
            let file = self
                .pcvalue(f.pcfile, f.entry, pc)
                .and_then(|n| self.file_name(&f, n))
                .unwrap_or("?")
                .to_owned();
            let line = self
                .pcvalue(f.pcln, f.entry, pc)
                .and_then(|l| u32::try_from(l).ok())
                .unwrap_or(0);
            let inlined = self
                .pcdata_off(&f, PCDATA_INL_TREE_INDEX)
                .and_then(|t| self.pcvalue(t, f.entry, pc))
                .and_then(|ix| u64::try_from(ix).ok())
                .and_then(|ix| self.inlined_call(&f, ix));
            match inlined.and_then(|(name_off, parent)| Some((self.name_at(name_off)?, parent))) {
                Some((name, parent_pc)) => {
                    frames.push(Frame {
                        function: name.to_owned(),
                        file,
                        line,
                    });
                    let Some(next) = f.entry.checked_add_signed(i64::from(parent_pc)) else {
                        break;
                    };
                    pc = next;
                }
                None => {
                    if let Some(name) = self.func_name(&f) {
                        frames.push(Frame {
                            function: name.to_owned(),
                            file,
                            line,
                        });
                    }
                    break;
                }
            }
        }
        frames
    }

    /// See [`super::GoBinary::symbolize`]: the innermost of [`Self::frames`].
    pub(crate) fn symbolize(&self, pc: u64) -> Option<Frame> {
        self.frames(pc).into_iter().next()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a tiny synthetic table with two functions.
    fn synthetic() -> Pclntab {
        let mut d = vec![0u8; HEADER_LEN];
        d[..4].copy_from_slice(&GO120_MAGIC.to_le_bytes());
        d[6] = 1;
        d[7] = 8;
        let put64 = |d: &mut Vec<u8>, at: usize, v: u64| {
            d[at..at + 8].copy_from_slice(&v.to_le_bytes());
        };
        put64(&mut d, 8, 2); // nfunc
        put64(&mut d, 24, 0x401000); // textStart
        // funcnametab
        let funcnametab = d.len();
        d.extend_from_slice(b"main.a\0main.b\0main.inl\0");
        // cutab: one CU with one file at filetab offset 0
        let cutab = d.len();
        d.extend_from_slice(&0u32.to_le_bytes());
        let filetab = d.len();
        d.extend_from_slice(b"/src/main.go\0");
        // pctab: offset 0 is reserved (means "no table")
        let pctab = d.len();
        d.push(0);
        // pcfile: value 0 for 0x20 bytes -> uvdelta zigzag(+1)=2, pcdelta 0x20
        let pcfile = (d.len() - pctab) as u32;
        d.extend_from_slice(&[2, 0x20, 0]);
        // pcln: line 10 for 4 bytes, line 12 for 0x1c bytes
        // start -1: +11 -> zigzag 22; +2 -> 4
        let pcln = (d.len() - pctab) as u32;
        d.extend_from_slice(&[22, 4, 4, 0x1c, 0]);
        // inline index: -1 for 8 bytes, 0 for 8 bytes, -1 after
        // first pair needs a delta of 0 (allowed only first): -1 -> zigzag 0? use +0
        let inl = (d.len() - pctab) as u32;
        d.extend_from_slice(&[0, 8, 2, 8, 1, 0x10, 0]);
        while !d.len().is_multiple_of(8) {
            d.push(0);
        }
        let functab = d.len();
        let funcs_at = functab + 3 * 8;
        let rec_len = FUNC_LEN + 4 * 3 + 4 * 4;
        for (i, entry) in [0u32, 0x20, 0x40].iter().enumerate() {
            d.extend_from_slice(&entry.to_le_bytes());
            let funcoff = (funcs_at - functab + i.min(1) * rec_len) as u32;
            d.extend_from_slice(&funcoff.to_le_bytes());
        }
        for (entry, name_off) in [(0u32, 0u32), (0x20, 7)] {
            let start = d.len();
            d.resize(start + FUNC_LEN, 0);
            let w = |d: &mut Vec<u8>, o: usize, v: u32| {
                d[start + o..start + o + 4].copy_from_slice(&v.to_le_bytes())
            };
            w(&mut d, 0, entry);
            w(&mut d, 4, name_off);
            w(&mut d, 20, pcfile);
            w(&mut d, 24, pcln);
            w(&mut d, 28, 3); // npcdata
            w(&mut d, 32, 0); // cu offset
            d[start + 43] = 4; // nfuncdata
            for v in [0u32, 0, inl] {
                d.extend_from_slice(&v.to_le_bytes());
            }
            for v in [u32::MAX, u32::MAX, u32::MAX, 0] {
                d.extend_from_slice(&v.to_le_bytes());
            }
        }
        for (i, v) in [funcnametab, cutab, filetab, pctab, functab]
            .iter()
            .enumerate()
        {
            put64(&mut d, 32 + 8 * i, *v as u64);
        }
        let mut t = Pclntab::parse(d, 0x500000).unwrap();
        // One inlinedCall naming "main.inl" (name offset 14).
        let mut tree = vec![0u8; 16];
        tree[4..8].copy_from_slice(&14u32.to_le_bytes());
        t.set_gofunc(GoFunc {
            base: 0x600000,
            bytes: tree,
        });
        t
    }

    #[test]
    fn lookup_and_lines() {
        let t = synthetic();
        assert_eq!(t.len(), 2);
        assert!(t.find_func(0x400fff).is_none());
        assert!(t.find_func(0x401040).is_none());
        let f = t.find_func(0x401025).unwrap();
        assert_eq!((f.entry, f.end), (0x401020, 0x401040));
        assert_eq!(t.func_name(&f), Some("main.b"));
        assert_eq!(t.func_by_name("main.a").unwrap().entry, 0x401000);
        assert!(t.func_by_name("main.c").is_none());

        let fr = t.symbolize(0x401000).unwrap();
        assert_eq!(
            (fr.function.as_str(), fr.file.as_str(), fr.line),
            ("main.a", "/src/main.go", 10)
        );
        assert_eq!(t.symbolize(0x401004).unwrap().line, 12);
        // 0x401008..0x401010 is inline index 0 -> main.inl.
        assert_eq!(t.symbolize(0x401009).unwrap().function, "main.inl");
        assert_eq!(t.symbolize(0x401011).unwrap().function, "main.a");
        assert_eq!(t.symbolize(0x40103f).unwrap().function, "main.b");
    }

    #[test]
    fn rejects_other_magics() {
        let mut d = vec![0u8; HEADER_LEN];
        d[..4].copy_from_slice(&0xffff_fff0u32.to_le_bytes());
        assert!(matches!(
            Pclntab::parse(d, 0),
            Err(GoError::UnsupportedPclntab { magic: 0xffff_fff0 })
        ));
        assert!(matches!(
            Pclntab::parse(vec![1, 2], 0),
            Err(GoError::BadPclntab(_))
        ));
    }
}
