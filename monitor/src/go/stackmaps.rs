//! Which words of a parked goroutine's stack hold live pointers, as the runtime's own GC
//! decides it (`scanstack`, `scanframeworker`, runtime/mgcmark.go): each physical frame is
//! found by its function's `pcsp` table, its locals and arguments are scanned by the stack
//! maps the compiler emitted for the PC it stopped at (`PCDATA_StackMapIndex`,
//! `FUNCDATA_LocalsPointerMaps`, `FUNCDATA_ArgsPointerMaps`), and its stack objects
//! (address-taken locals) only when a live word points into them. A slot that is dead where
//! the frame stopped is not a reference, whatever it still holds.
//!
//! amd64 only (the pclntab parser refuses other layouts): return address on the stack,
//! frame pointer below it, no fixed frame area. Anything this cannot read exactly (a function
//! without maps, an assembly or async-preempted frame, a walk that leaves the stack) gives
//! `None`, and the caller scans the whole stack conservatively, as before.

use std::{collections::HashMap, sync::Arc};

use super::pclntab::{Func, Pclntab, u64_at};

/// `abi.PCDATA_StackMapIndex`.
const PCDATA_STACK_MAP_INDEX: u32 = 1;
/// `abi.FUNCDATA_ArgsPointerMaps`, `FUNCDATA_LocalsPointerMaps`, `FUNCDATA_StackObjects`.
const FUNCDATA_ARGS: u32 = 0;
const FUNCDATA_LOCALS: u32 = 1;
const FUNCDATA_STACK_OBJECTS: u32 = 2;
/// `abi.FuncFlagTopFrame`: the outermost frame of a goroutine (`runtime.goexit`).
const FLAG_TOP_FRAME: u8 = 1;
/// `abi.FuncFlagSPWrite`: writes SP arbitrarily; unwinding through it is not possible.
const FLAG_SP_WRITE: u8 = 2;
/// `abi.FuncFlagAsm`: written in assembly, so no stack maps (`asyncPreempt`, whose caller
/// stopped at no safe point, `debugCallV2`, reflect's call stubs): the runtime scans such
/// frames conservatively, and so the whole stack is scanned here.
const FLAG_ASM: u8 = 4;
/// Frames walked per stack, at most (Go's own tracebacks stop at 100; a stack of 1 GiB of
/// 16-byte frames is far past any real program).
const MAX_FRAMES: usize = 1 << 16;
/// Stack objects per frame read, at most.
const MAX_OBJECTS: usize = 1024;

/// A stack map's bitmap: bit i says word i of the region holds a live pointer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Bits {
    n: u32,
    bits: Box<[u8]>,
}

/// Whether bit `i` of the little-endian bitmap `bits` is set (the runtime's stack maps and
/// global pointer masks alike: bit i of byte i/8 is word i).
pub(crate) fn bit(bits: &[u8], i: u64) -> bool {
    usize::try_from(i / 8)
        .ok()
        .and_then(|b| bits.get(b))
        .is_some_and(|b| b >> (i % 8) & 1 == 1)
}

impl Bits {
    fn words(&self) -> impl Iterator<Item = u32> + '_ {
        (0..self.n).filter(|i| bit(&self.bits, u64::from(*i)))
    }
}

/// What the runtime knows of one physical frame stopped at one PC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FrameMap {
    /// The stack pointer's distance from its value at entry (`pcsp`).
    spdelta: u32,
    top: bool,
    /// Live pointers among the locals, the `n` words below `varp`.
    locals: Bits,
    /// Live pointers among the arguments, the `n` words from `argp`.
    args: Bits,
    /// Stack objects: offset (from `varp` when negative, else from `argp`) and the bytes
    /// that may hold pointers (`ptrBytes`; before go1.24 `_ptrdata`, negative for a GC
    /// program: its absolute value is still the extent).
    objects: Box<[(i32, u32)]>,
}

/// A stack map record (runtime `stackmap`): n bitmaps of nbit bits, back to back.
fn stack_map(blob: &[u8], index: i32) -> Option<Bits> {
    let n = i32::from_le_bytes(blob.get(0..4)?.try_into().ok()?);
    let nbit = i32::from_le_bytes(blob.get(4..8)?.try_into().ok()?);
    if n <= 0 || nbit < 0 || index < 0 || index >= n {
        return None;
    }
    let bytes = (nbit as usize).div_ceil(8);
    let at = 8usize.checked_add(bytes.checked_mul(index as usize)?)?;
    Some(Bits {
        n: nbit as u32,
        bits: blob.get(at..at.checked_add(bytes)?)?.into(),
    })
}

impl FrameMap {
    /// The map of `f`'s frame stopped at `pc` (a return address, or where it parked),
    /// `None` when the runtime's tables do not describe it exactly.
    pub(crate) fn of(table: &Pclntab, f: &Func, pc: u64) -> Option<FrameMap> {
        let top = f.flag & FLAG_TOP_FRAME != 0;
        if f.flag & FLAG_SP_WRITE != 0 || (f.flag & FLAG_ASM != 0 && !top) || f.args < 0 {
            return None;
        }
        let spdelta = u32::try_from(table.pcvalue(f.pcsp, f.entry, pc)?).ok()?;
        // The map index at the call instruction: what is live across the call.
        let target = if pc == f.entry { pc } else { pc - 1 };
        let index = table
            .pcdata_off(f, PCDATA_STACK_MAP_INDEX)
            .and_then(|t| table.pcvalue(t, f.entry, target))
            .unwrap_or(-1)
            .max(0);
        // Locals: [varp - 8n, varp), varp below the saved frame pointer when there is a
        // frame (`unwinder.resolveInternal`).
        let locals_size = u64::from(spdelta).saturating_sub(8);
        let locals = if locals_size > 0 {
            stack_map(table.funcdata(f, FUNCDATA_LOCALS)?, index)?
        } else {
            Bits::default()
        };
        if u64::from(locals.n) * 8 > locals_size {
            return None;
        }
        let args = if f.args > 0 {
            stack_map(table.funcdata(f, FUNCDATA_ARGS)?, index)?
        } else {
            Bits::default()
        };
        let objects = match table.funcdata(f, FUNCDATA_STACK_OBJECTS) {
            None => Box::default(),
            Some(blob) => {
                let n = usize::try_from(u64_at(blob, 0)?).ok()?;
                if n > MAX_OBJECTS {
                    return None;
                }
                (0..n)
                    .map(|i| {
                        let r = blob.get(8 + 16 * i..8 + 16 * (i + 1))?;
                        let word = |o: usize| {
                            i32::from_le_bytes(r[o..o + 4].try_into().unwrap_or_default())
                        };
                        Some((word(0), word(8).unsigned_abs().min(word(4).unsigned_abs())))
                    })
                    .collect::<Option<_>>()?
            }
        };
        Some(FrameMap {
            spdelta,
            top,
            locals,
            args,
            objects,
        })
    }
}

/// Where frame maps come from: the function table, with a cache (a program parks in a few
/// hundred places; its goroutines are many).
pub(crate) trait FrameMaps {
    /// The map at `pc` (an address in the process), `None` when it cannot be had.
    fn at(&mut self, pc: u64) -> Option<Arc<FrameMap>>;
}

/// Frame maps cached by PC (unbiased), at most [`MAX_CACHED`]: past it the cache starts over.
#[derive(Debug, Default)]
pub(crate) struct MapCache {
    maps: HashMap<u64, Option<Arc<FrameMap>>>,
}

const MAX_CACHED: usize = 1 << 16;

/// The frame maps of one process: its function table, where it is loaded, and a cache.
pub(crate) struct ProcessMaps<'a> {
    pub table: &'a Pclntab,
    pub bias: u64,
    pub cache: &'a mut MapCache,
}

impl FrameMaps for ProcessMaps<'_> {
    fn at(&mut self, pc: u64) -> Option<Arc<FrameMap>> {
        let pc = pc.wrapping_sub(self.bias);
        if let Some(m) = self.cache.maps.get(&pc) {
            return m.clone();
        }
        if self.cache.maps.len() >= MAX_CACHED {
            self.cache.maps.clear();
        }
        let map = self
            .table
            .find_func(pc)
            .and_then(|f| FrameMap::of(self.table, &f, pc))
            .map(Arc::new);
        self.cache.maps.insert(pc, map.clone());
        map
    }
}

/// The words of a parked goroutine's stack `stack` (read from `sp` up to the stack's top)
/// that hold live pointers, as byte offsets from `sp`, walking its frames from `pc`.
/// `seeds` are other words that may point into the stack (its `g`'s `_defer`, `_panic`):
/// stack objects they point to are scanned. `None`: scan everything.
pub(crate) fn live_words<M: FrameMaps + ?Sized>(
    maps: &mut M,
    pc: u64,
    sp: u64,
    stack: &[u8],
    seeds: &[u64],
) -> Option<Vec<u32>> {
    let hi = sp.checked_add(stack.len() as u64)?;
    let word_at = |addr: u64| u64_at(stack, usize::try_from(addr.checked_sub(sp)?).ok()?);
    let mut live: Vec<u32> = Vec::new();
    // Stack objects of every frame: [start, end) as offsets from sp.
    let mut objects: Vec<(u32, u32)> = Vec::new();
    let (mut pc, mut frame_sp) = (pc, sp);
    let mut reached_top = false;
    for _ in 0..MAX_FRAMES {
        let map = maps.at(pc)?;
        let fp = frame_sp.checked_add(u64::from(map.spdelta) + 8)?;
        if fp > hi {
            return None;
        }
        let mut varp = fp - 8;
        if varp > frame_sp {
            varp -= 8;
        }
        let offset = |addr: u64| -> Option<u32> {
            (addr >= sp && addr + 8 <= hi).then(|| (addr - sp) as u32)
        };
        let locals_base = varp.checked_sub(u64::from(map.locals.n) * 8)?;
        for i in map.locals.words() {
            live.push(offset(locals_base + u64::from(i) * 8)?);
        }
        for i in map.args.words() {
            live.push(offset(fp + u64::from(i) * 8)?);
        }
        for &(off, size) in map.objects.iter() {
            let base = if off < 0 {
                varp.checked_sub(u64::from(off.unsigned_abs()))?
            } else {
                fp + off as u64
            };
            // Below the frame's sp: not allocated in the frame yet (as the runtime skips it).
            if base < frame_sp {
                continue;
            }
            let start = offset(base)?;
            let end = start.checked_add(size)?;
            if u64::from(end) > hi - sp {
                return None;
            }
            objects.push((start, end));
        }
        if map.top {
            reached_top = true;
            break;
        }
        // A frame with no return address before the top frame: not a stack we can read.
        pc = word_at(fp - 8).filter(|pc| *pc != 0)?;
        frame_sp = fp;
    }
    if !reached_top {
        return None;
    }
    // Stack objects reached from a live word, a seed, or another reached object are
    // scanned (the runtime's `stackScanState`): words up to their pointer extent.
    objects.sort_unstable();
    let mut scanned = vec![false; objects.len()];
    let mut pending: Vec<u64> = live
        .iter()
        .filter_map(|o| word_at(sp + u64::from(*o)))
        .collect();
    pending.extend_from_slice(seeds);
    while let Some(v) = pending.pop() {
        if v < sp || v >= hi {
            continue;
        }
        let o = (v - sp) as u32;
        let i = objects.partition_point(|(start, _)| *start <= o);
        // Objects may nest (a later frame's object inside an earlier one's is not possible,
        // but be safe): check the few before.
        for j in (0..i).rev().take(4) {
            let (start, end) = objects[j];
            if o < end && !scanned[j] {
                scanned[j] = true;
                for w in (start & !7..end).step_by(8) {
                    live.push(w);
                    pending.extend(word_at(sp + u64::from(w)));
                }
            }
        }
    }
    live.sort_unstable();
    live.dedup();
    Some(live)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed(HashMap<u64, Arc<FrameMap>>);
    impl FrameMaps for Fixed {
        fn at(&mut self, pc: u64) -> Option<Arc<FrameMap>> {
            self.0.get(&pc).cloned()
        }
    }

    fn bits(n: u32, set: &[u32]) -> Bits {
        let mut b = vec![0u8; (n as usize).div_ceil(8)];
        for i in set {
            b[*i as usize / 8] |= 1 << (i % 8);
        }
        Bits { n, bits: b.into() }
    }

    /// Two frames: an inner one (pc 0x10) with 4 local words, of which only word 1 is live,
    /// and a stack object; the outer top frame (pc 0x20) with one live argument.
    #[test]
    fn only_live_slots_and_reached_objects_are_words_to_scan() {
        let sp = 0x1000u64;
        // Inner frame: spdelta 48: fp = sp + 56; varp = fp - 16 = sp + 40; locals 4 words
        // [sp + 8, sp + 40); the return address at fp - 8 = sp + 48.
        let inner = FrameMap {
            spdelta: 48,
            top: false,
            locals: bits(4, &[1]),
            args: Bits::default(),
            // One object of 16 bytes at varp - 32 = sp + 8 (local words 0 and 1).
            objects: vec![(-32, 16)].into(),
        };
        // Outer frame at sp' = sp + 56: spdelta 8: fp = sp' + 16, no locals, 1 arg word at fp.
        let outer = FrameMap {
            spdelta: 8,
            top: true,
            locals: Bits::default(),
            args: bits(1, &[0]),
            objects: Box::default(),
        };
        let mut maps = Fixed(HashMap::from([
            (0x10, Arc::new(inner)),
            (0x20, Arc::new(outer)),
        ]));
        let mut stack = vec![0u8; 0x100];
        let put =
            |s: &mut Vec<u8>, off: usize, v: u64| s[off..off + 8].copy_from_slice(&v.to_le_bytes());
        put(&mut stack, 48, 0x20);
        // Local word 1 (sp + 16) is live and points into the object (sp + 8): the object's
        // words (sp + 8, sp + 16) are scanned.
        put(&mut stack, 16, sp + 8);
        let words = live_words(&mut maps, 0x10, sp, &stack, &[]).unwrap();
        // Live local at 16, object words 8 and 16, the outer argument at sp' + 16 = 72.
        assert_eq!(words, vec![8, 16, 72]);
        // Nothing points into the object: only the live slots.
        put(&mut stack, 16, 0xdead_0000);
        let words = live_words(&mut maps, 0x10, sp, &stack, &[]).unwrap();
        assert_eq!(words, vec![16, 72]);
        // A seed (a defer record's address in the g) reaches it.
        let words = live_words(&mut maps, 0x10, sp, &stack, &[sp + 12]).unwrap();
        assert_eq!(words, vec![8, 16, 72]);
        // A return address with no map: no precise answer.
        put(&mut stack, 48, 0x30);
        assert_eq!(live_words(&mut maps, 0x10, sp, &stack, &[]), None);
        // A walk that never reaches the top frame: none either.
        put(&mut stack, 48, 0x10);
        assert_eq!(live_words(&mut maps, 0x10, sp, &stack[..64], &[]), None);
    }

    #[test]
    fn stack_maps_are_read_by_index() {
        // n = 2 bitmaps of 10 bits (2 bytes each).
        let mut blob = Vec::new();
        blob.extend_from_slice(&2i32.to_le_bytes());
        blob.extend_from_slice(&10i32.to_le_bytes());
        blob.extend_from_slice(&[0b0000_0001, 0b10, 0b1000_0000, 0]);
        assert_eq!(
            stack_map(&blob, 0).unwrap().words().collect::<Vec<_>>(),
            vec![0, 9]
        );
        assert_eq!(
            stack_map(&blob, 1).unwrap().words().collect::<Vec<_>>(),
            vec![7]
        );
        assert_eq!(stack_map(&blob, 2), None);
    }
}
