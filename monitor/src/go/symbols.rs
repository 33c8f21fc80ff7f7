//! Lookups the watcher needs beyond single-frame symbolisation.

use std::os::unix::fs::FileExt;

use super::{Frame, GoBinary, elf::Segment};

impl GoBinary {
    /// The frames at `pc` (an unbiased address; `pc - 1` for return addresses), innermost
    /// inlined call first, ending with the function whose code holds `pc`. A lock taken through
    /// an inlined `sync.(*Mutex).Lock` thus shows both the library frame and the program's line.
    pub fn frames(&self, pc: u64) -> Vec<Frame> {
        self.pclntab.frames(pc)
    }

    /// Lowest virtual address of the PT_LOAD segments (the load bias is measured from it).
    pub fn lowest_vaddr(&self) -> u64 {
        self.segments.iter().map(|s| s.vaddr).min().unwrap_or(0)
    }

    /// The function a small compiler wrapper (`gowrapN`) at `entry` calls: the first direct
    /// `CALL rel32` whose target is the start of a function outside the runtime (the wrapper's
    /// other calls are runtime.morestack and friends).
    pub fn wrapped_call(&self, entry: u64) -> Option<&str> {
        let f = self.pclntab.find_func(entry)?;
        let len = usize::try_from(f.end.checked_sub(f.entry)?).ok()?.min(512);
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
        })
    }
}
