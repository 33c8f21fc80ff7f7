//! Lookups the watcher needs beyond single-frame symbolisation.

use std::os::unix::fs::FileExt;

use super::{Frame, GoBinary, elf::Segment};

impl GoBinary {
    /// The frames at `pc` (an unbiased address; `pc - 1` for return addresses), innermost
    /// inlined call first, ending with the function whose code holds `pc`. A lock taken through
    /// an inlined `sync.(*Mutex).Lock` thus shows both the library frame and the program's line.
    pub(crate) fn frames(&self, pc: u64) -> Vec<Frame> {
        self.pclntab.frames(pc)
    }

    /// Lowest virtual address of the PT_LOAD segments (the load bias is measured from it).
    pub(crate) fn lowest_vaddr(&self) -> u64 {
        self.segments.iter().map(|s| s.vaddr).min().unwrap_or(0)
    }

    /// The function a small compiler wrapper (`gowrapN`) at `entry` calls. If it was inlined
    /// into the wrapper, the inline tree names it (the outermost inlined call); else the
    /// first direct `CALL rel32` whose target is the start of a function outside the runtime
    /// (the wrapper's other calls are runtime.morestack and friends).
    pub(crate) fn wrapped_call(&self, entry: u64) -> Option<String> {
        let f = self.pclntab.find_func(entry)?;
        let len = usize::try_from(f.end.checked_sub(f.entry)?).ok()?.min(512);
        let inlined = (0..len as u64).find_map(|off| {
            let frames = self.pclntab.frames(f.entry + off);
            let n = frames.len();
            (n >= 2).then(|| frames.into_iter().nth(n - 2)).flatten()
        });
        if let Some(frame) = inlined {
            return Some(frame.function);
        }
        let mut code = vec![0u8; len];
        let offset = Segment::file_offset(&self.segments, f.entry)?;
        self.file.read_exact_at(&mut code, offset).ok()?;
        (0..code.len().saturating_sub(4)).find_map(|i| {
            let (0xe8, Some(rel)) = (code[i], code.get(i + 1..i + 5)) else {
                return None;
            };
            let rel = i32::from_le_bytes(rel.try_into().ok()?);
            let target = (f.entry + i as u64 + 5).checked_add_signed(i64::from(rel))?;
            let callee = self
                .pclntab
                .find_func(target)
                .filter(|c| c.entry == target)?;
            self.pclntab
                .func_name(&callee)
                .filter(|name| !name.starts_with("runtime."))
                .map(str::to_owned)
        })
    }

    /// `runtime.allgs` located from the code of `runtime.allgadd`, for stripped binaries: its
    /// `allgs = append(allgs, gp)` loads the slice header's three words (ptr, len, cap) with
    /// RIP-relative `mov r64, [rip+disp32]`; the address whose +0, +8 and +16 are all loaded
    /// is the slice. Seen identically from go1.21 to go1.27; anything else gives `None` (and
    /// leakmon falls back to probing parks).
    pub(crate) fn allgs_from_code(&self) -> Option<u64> {
        let f = self.pclntab.func_by_name("runtime.allgadd")?;
        let len = usize::try_from(f.end.checked_sub(f.entry)?).ok()?.min(4096);
        let mut code = vec![0u8; len];
        let offset = Segment::file_offset(&self.segments, f.entry)?;
        self.file.read_exact_at(&mut code, offset).ok()?;
        let loads = rip_relative_loads(f.entry, &code);
        loads
            .iter()
            .copied()
            .find(|a| loads.contains(&(a + 8)) && loads.contains(&(a + 16)))
    }
}

impl GoBinary {
    /// `runtime.mheap_` located from the code of `runtime.mallocinit`, for stripped binaries:
    /// its `mheap_.init()` is `lea rax, [rip+disp32]` (48 8d 05) immediately followed by the
    /// only `call` to `runtime.(*mheap).init` (never inlined). Seen identically from go1.21
    /// to go1.27, default and PIE, internal and external linking, with and without
    /// optimisations; anything else gives `None` (no reachability analysis then).
    pub(crate) fn mheap_from_code(&self) -> Option<u64> {
        let f = self.pclntab.func_by_name("runtime.mallocinit")?;
        let init = self.pclntab.func_by_name("runtime.(*mheap).init")?;
        let len = usize::try_from(f.end.checked_sub(f.entry)?).ok()?.min(8192);
        let mut code = vec![0u8; len];
        let offset = Segment::file_offset(&self.segments, f.entry)?;
        self.file.read_exact_at(&mut code, offset).ok()?;
        (7..code.len().saturating_sub(4)).find_map(|i| {
            let rel = i32::from_le_bytes(code.get(i + 1..i + 5)?.try_into().ok()?);
            let target = (f.entry + i as u64 + 5).checked_add_signed(i64::from(rel))?;
            if code[i] != 0xe8 || target != init.entry || code[i - 7..i - 4] != [0x48, 0x8d, 0x05] {
                return None;
            }
            let disp = i32::from_le_bytes(code[i - 4..i].try_into().ok()?);
            (f.entry + i as u64).checked_add_signed(i64::from(disp))
        })
    }
}

/// Targets of `mov r64, [rip+disp32]` (REX.W 8B /r with mod=00 r/m=101) in `code` at `base`.
fn rip_relative_loads(base: u64, code: &[u8]) -> Vec<u64> {
    code.windows(7)
        .enumerate()
        .filter(|(_, w)| matches!(w[0], 0x48 | 0x4c) && w[1] == 0x8b && w[2] & 0xc7 == 0x05)
        .filter_map(|(i, w)| {
            let disp = i32::from_le_bytes([w[3], w[4], w[5], w[6]]);
            (base + i as u64 + 7).checked_add_signed(i64::from(disp))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::rip_relative_loads;

    #[test]
    fn finds_rip_relative_loads() {
        // mov rcx,[rip+0x10]; nop; mov r8,[rip-0x8]
        let code = [
            0x48, 0x8b, 0x0d, 0x10, 0, 0, 0, 0x90, 0x4c, 0x8b, 0x05, 0xf8, 0xff, 0xff, 0xff,
        ];
        assert_eq!(rip_relative_loads(0x1000, &code), vec![0x1017, 0x1007]);
    }
}
