//! Proof of leaked goroutines from outside, with no pause: a goroutine parked on objects
//! (channels, a semaphore, a Cond) that nothing live can reach any more can never be woken.
//!
//! A conservative mark over the process's memory, read while it runs: roots are the globals
//! that may hold pointers (`.data`, `.bss`), and the stacks and `g`s of every goroutine that
//! is not a candidate; every word that falls in a heap object marks it, and marked objects are
//! scanned in turn (objects of `noscan` spans hold no pointers). The runtime's bookkeeping is
//! not a root: `g` objects are never scanned through (`allgs`, `allm`, run queues all lead to
//! every goroutine's `g`, and from there to what it waits on), and a sudog (an object whose
//! first word is a `g`) is followed only through `next`, the queue it is in. A candidate whose
//! objects are marked is live: its stack and `g` become roots, and marking goes on until
//! nothing changes. The candidates left are proven leaked, as far as this one read shows:
//! callers require two analyses that agree. Every word read is treated as a possible pointer,
//! so a stale or torn value can only make more reachable, never less.

use std::collections::HashSet;

use super::heap::{Heap, Object};
use super::offsets::HeapOffsets;
use super::pclntab::u64_at;
use super::waits::WaitObject;
use crate::proc::ProcMem;

/// Objects waiting to be scanned, at most (past it, spans are rescanned).
const MAX_STACK: usize = 1 << 18;
/// Bytes read per batch of object scans, and per piece of a large object or root range.
const BATCH_BYTES: usize = 1 << 20;
/// Objects read per batch.
const BATCH_OBJECTS: usize = 4096;
/// Bytes of adjacent objects read as one range, at most.
const MERGE_BYTES: usize = 64 << 10;
/// Special records followed, at most (past it, no verdict).
const MAX_SPECIALS: usize = 1 << 20;
/// Bytes of a special record scanned: its header and what follows (a finalizer's function
/// and types, a cleanup's function and id).
const SPECIAL_BYTES: usize = 64;

/// A goroutine as the analysis sees it.
#[derive(Clone, Debug)]
pub(crate) struct Goroutine {
    /// Address of its `g`.
    pub g: u64,
    /// The stack range in use: `[sched.sp, stack.hi)` when parked, the whole stack when
    /// running or in a system call (its `sched.sp` is stale).
    pub stack: (u64, u64),
    /// What it waits on, when it is a candidate; `None` otherwise (a root).
    pub candidate: Option<Vec<WaitObject>>,
}

/// What one analysis found.
#[derive(Debug, Default)]
pub(crate) struct Outcome {
    /// Indices (into the goroutines given) of the candidates proven leaked.
    pub leaked: Vec<usize>,
    pub bytes_read: u64,
    pub objects_marked: u64,
}

/// Why an analysis gave no verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReachError {
    /// Reading more than allowed would have been needed.
    OverBudget,
    /// A root or a marked object could not be read: it may hold the only reference.
    Unreadable,
}

/// Runs the analysis over `goroutines` (all of them: the candidates and every other live
/// one), the heap read just before and `globals` (biased address ranges). Reads at most
/// `max_bytes` of the process's memory.
pub(crate) fn analyse(
    mem: &ProcMem,
    heap: &Heap,
    off: &HeapOffsets,
    globals: &[(u64, u64)],
    goroutines: &[Goroutine],
    max_bytes: u64,
) -> Result<Outcome, ReachError> {
    let mut m = Marker::new(mem, heap, off, goroutines, max_bytes);
    for &(start, len) in globals {
        m.scan_range(start, len)?;
    }
    m.scan_specials()?;
    let mut live: Vec<bool> = goroutines.iter().map(|g| g.candidate.is_none()).collect();
    for (i, g) in goroutines.iter().enumerate() {
        if live[i] {
            m.root_goroutine(g)?;
        }
    }
    m.drain()?;
    // Fixpoint: a candidate whose objects are reachable is live, and what its stack holds
    // is reachable in turn.
    loop {
        let mut woke = false;
        for (i, g) in goroutines.iter().enumerate() {
            let Some(objects) = &g.candidate else {
                continue;
            };
            if live[i] || !objects.iter().any(|o| m.reachable(o.addr)) {
                continue;
            }
            live[i] = true;
            woke = true;
            m.root_goroutine(g)?;
        }
        if !woke {
            break;
        }
        m.drain()?;
    }
    Ok(Outcome {
        leaked: (0..goroutines.len()).filter(|i| !live[*i]).collect(),
        bytes_read: m.bytes_read,
        objects_marked: m.marked_count,
    })
}

struct Marker<'a> {
    mem: &'a ProcMem,
    heap: &'a Heap,
    off: &'a HeapOffsets,
    /// Every goroutine's `g`: never scanned through, and the mark of a sudog.
    gs: HashSet<u64>,
    marks: Vec<Vec<u64>>,
    stack: Vec<Object>,
    /// Spans with marked objects that did not fit on the stack: rescanned whole.
    overflow: HashSet<u32>,
    bytes_read: u64,
    max_bytes: u64,
    marked_count: u64,
    buf: Vec<u8>,
}

impl<'a> Marker<'a> {
    fn new(
        mem: &'a ProcMem,
        heap: &'a Heap,
        off: &'a HeapOffsets,
        goroutines: &[Goroutine],
        max_bytes: u64,
    ) -> Self {
        Self {
            mem,
            heap,
            off,
            gs: goroutines.iter().map(|g| g.g).collect(),
            marks: heap
                .spans()
                .iter()
                .map(|s| vec![0u64; (s.nelems as usize).div_ceil(64)])
                .collect(),
            stack: Vec::new(),
            overflow: HashSet::new(),
            bytes_read: heap.bytes_read,
            max_bytes,
            marked_count: 0,
            buf: Vec::new(),
        }
    }

    fn is_marked(&self, o: &Object) -> bool {
        self.marks
            .get(o.span as usize)
            .and_then(|m| m.get(o.index as usize / 64))
            .is_some_and(|w| w & (1 << (o.index % 64)) != 0)
    }

    /// Whether the object at `addr` is reachable: a marked heap object. An address outside
    /// the heap (a global, a goroutine's stack) proves nothing: reachable.
    fn reachable(&self, addr: u64) -> bool {
        self.heap.find(addr).is_none_or(|o| self.is_marked(&o))
    }

    fn mark(&mut self, addr: u64) {
        let Some(o) = self.heap.find(addr) else {
            return;
        };
        let Some(word) = self
            .marks
            .get_mut(o.span as usize)
            .and_then(|m| m.get_mut(o.index as usize / 64))
        else {
            return;
        };
        let bit = 1 << (o.index % 64);
        if *word & bit != 0 {
            return;
        }
        *word |= bit;
        self.marked_count += 1;
        let scannable = self.heap.span(o.span).is_some_and(|s| !s.noscan);
        // A g is never scanned through; its mark alone says nothing.
        if !scannable || self.gs.contains(&o.base) {
            return;
        }
        if self.stack.len() < MAX_STACK {
            self.stack.push(o);
        } else {
            self.overflow.insert(o.span);
        }
    }

    fn charge(&mut self, bytes: usize) -> Result<(), ReachError> {
        self.bytes_read += bytes as u64;
        if self.bytes_read > self.max_bytes {
            return Err(ReachError::OverBudget);
        }
        Ok(())
    }

    /// Scans `[start, start + len)` word by word, in pieces.
    fn scan_range(&mut self, start: u64, len: u64) -> Result<(), ReachError> {
        let mut at = start & !7;
        let end = start.saturating_add(len);
        while at < end {
            let n = (end - at).min(BATCH_BYTES as u64) as usize;
            self.charge(n)?;
            let mut buf = std::mem::take(&mut self.buf);
            buf.resize(n, 0);
            // Unreadable memory (unmapped, FUSE) holds nothing we can see: a range of a
            // root that cannot be read fails the analysis (no proof without it).
            if !self.mem.read(at, &mut buf) {
                let ok = self.scan_pagewise(at, &mut buf);
                self.buf = buf;
                if !ok {
                    return Err(ReachError::Unreadable);
                }
            } else {
                self.scan_words(&buf, None);
                self.buf = buf;
            }
            at += n as u64;
        }
        Ok(())
    }

    /// A root range that could not be read whole: page by page, failing on a page that
    /// cannot be read (a root we cannot see could hold the only reference).
    fn scan_pagewise(&mut self, start: u64, buf: &mut [u8]) -> bool {
        for (i, page) in buf.chunks_mut(4096).enumerate() {
            if !self.mem.read(start + i as u64 * 4096, page) {
                return false;
            }
        }
        self.scan_words(buf, None);
        true
    }

    fn scan_words(&mut self, buf: &[u8], only: Option<u32>) {
        if let Some(offset) = only {
            let s = offset as usize;
            if let Some(w) = buf.get(s..s + 8).and_then(|w| w.try_into().ok()) {
                self.mark(u64::from_le_bytes(w));
            }
            return;
        }
        for w in buf.as_chunks::<8>().0 {
            let v = u64::from_le_bytes(*w);
            if v >= 4096 {
                self.mark(v);
            }
        }
    }

    /// Objects with special records are roots' referents, as the runtime's GC treats
    /// finalizers: a finalizer may still run and wake a goroutine through what its object
    /// holds. So each record (its function, cleanup arguments) and each such object's
    /// contents are scanned, whatever the kind (kind numbers change between versions; a
    /// profiling record only makes more reachable).
    fn scan_specials(&mut self) -> Result<(), ReachError> {
        let wide = self.off.special_kind == 16;
        let mut budget = MAX_SPECIALS;
        for i in 0..self.heap.spans().len() {
            let Some(span) = self.heap.span(i as u32).copied() else {
                continue;
            };
            let mut special = span.specials;
            while special != 0 && budget > 0 {
                budget -= 1;
                let mut record = [0u8; SPECIAL_BYTES];
                self.charge(SPECIAL_BYTES)?;
                if !self.mem.read(special, &mut record) {
                    return Err(ReachError::Unreadable);
                }
                let word = |o: usize| u64_at(&record, o).unwrap_or(0);
                let offset = if wide {
                    word(8)
                } else {
                    u64::from(u16::from_le_bytes([record[8], record[9]]))
                };
                self.scan_words(&record[8..], None);
                if let Some(o) = self.heap.find(span.start.saturating_add(offset))
                    && !span.noscan
                {
                    self.scan_object(o)?;
                }
                special = word(0);
            }
            if budget == 0 {
                return Err(ReachError::Unreadable);
            }
        }
        Ok(())
    }

    /// A live goroutine's stack and `g` are roots.
    fn root_goroutine(&mut self, g: &Goroutine) -> Result<(), ReachError> {
        let (lo, hi) = g.stack;
        if hi > lo && hi - lo <= 1 << 30 {
            self.scan_range(lo, hi - lo)?;
        }
        if let Some(o) = self.heap.find(g.g) {
            self.scan_object(o)?;
        }
        Ok(())
    }

    fn scan_object(&mut self, o: Object) -> Result<(), ReachError> {
        self.scan_range(o.base, o.size)
    }

    /// Scans marked objects until none is left.
    fn drain(&mut self) -> Result<(), ReachError> {
        loop {
            while !self.stack.is_empty() {
                self.scan_batch()?;
            }
            if self.overflow.is_empty() {
                return Ok(());
            }
            // Push back the marked objects of overflowed spans (some scanned again).
            let spans: Vec<u32> = self.overflow.drain().collect();
            for span in spans {
                let Some(s) = self.heap.span(span).copied() else {
                    continue;
                };
                for index in 0..s.nelems {
                    let o = Object {
                        span,
                        index,
                        base: s.start + u64::from(index) * s.elemsize,
                        size: s.elemsize,
                    };
                    if self.is_marked(&o) && !self.gs.contains(&o.base) {
                        if self.stack.len() < MAX_STACK {
                            self.stack.push(o);
                        } else {
                            self.overflow.insert(span);
                            break;
                        }
                    }
                }
            }
        }
    }

    /// Reads and scans a batch of objects from the stack, many per system call.
    fn scan_batch(&mut self) -> Result<(), ReachError> {
        let mut batch = Vec::new();
        let mut bytes = 0usize;
        while let Some(o) = self.stack.pop() {
            if o.size as usize > BATCH_BYTES / 4 {
                // Large objects on their own, in pieces.
                self.scan_object(o)?;
                continue;
            }
            bytes += o.size as usize;
            batch.push(o);
            if batch.len() >= BATCH_OBJECTS || bytes >= BATCH_BYTES {
                break;
            }
        }
        if batch.is_empty() {
            return Ok(());
        }
        self.charge(bytes)?;
        // Objects next to each other (allocated together, as lists and trees often are) are
        // read as one range: far fewer iovecs than objects.
        batch.sort_unstable_by_key(|o| o.base);
        let mut ranges: Vec<(u64, usize)> = Vec::new();
        let mut range_of = Vec::with_capacity(batch.len());
        for o in &batch {
            match ranges.last_mut() {
                Some((start, len)) if *start + *len as u64 == o.base && *len < MERGE_BYTES => {
                    *len += o.size as usize;
                }
                _ => ranges.push((o.base, o.size as usize)),
            }
            range_of.push(ranges.len() - 1);
        }
        let mut buf = std::mem::take(&mut self.buf);
        buf.resize(bytes, 0);
        let ok = self.mem.read_ranges(&ranges, &mut buf);
        let size = u64::from(self.off.sudog_size);
        let mut at = 0usize;
        for (j, o) in batch.iter().enumerate() {
            let obj = &buf[at..at + o.size as usize];
            at += o.size as usize;
            if !ok[range_of[j]] {
                // An object we cannot read may hold the only reference: no proof.
                self.buf = buf;
                return Err(ReachError::Unreadable);
            }
            // A sudog (its first word is a g) is followed only through its queue.
            let first = u64_at(obj, 0).unwrap_or(0);
            let sudog = o.size >= size && o.size <= size + 16 && self.gs.contains(&first);
            let only = sudog.then_some(self.off.sudog_next);
            self.scan_words(obj, only);
        }
        self.buf = buf;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::go::heap::Span;
    use crate::go::waits::WaitKind;

    /// A fake process: a heap laid out in this test's own memory, read through /proc/self.
    struct Fake {
        words: Vec<u64>,
    }

    impl Fake {
        fn new(n: usize) -> Self {
            // Over-allocate to align the heap to a page.
            Self {
                words: vec![0; n + 1024],
            }
        }
        fn base(&self) -> u64 {
            (self.words.as_ptr() as u64 + 8191) & !8191
        }
        fn set(&mut self, addr: u64, v: u64) {
            let i = ((addr - self.words.as_ptr() as u64) / 8) as usize;
            self.words[i] = v;
        }
    }

    fn offsets() -> HeapOffsets {
        HeapOffsets {
            sudog_next: 8,
            sudog_elem: 24,
            sudog_waitlink: 72,
            sudog_c: 88,
            sudog_size: 96,
            hchan_qcount: 0,
            hchan_dataqsiz: 8,
            hchan_closed: 28,
            hchan_recvq: 48,
            hchan_sendq: 64,
            mspan_start_addr: 0,
            mspan_npages: 0,
            mspan_nelems: 0,
            mspan_spanclass: 0,
            mspan_state: 0,
            mspan_elemsize: 0,
            mspan_specials: 0,
            special_kind: 16,
            mheap_allspans: 0,
        }
    }

    #[test]
    fn unreachable_channel_is_a_leak_reachable_one_is_not() {
        // One span of 64-byte objects: 0 = global target, 1 = channel A (reachable through
        // object 3), 2 = channel B (only a candidate's stack points to it), 4 = g objects.
        let mut f = Fake::new(4096);
        let base = f.base();
        let obj = |i: u64| base + i * 64;
        let global = obj(40);
        let heap = Heap::from_spans(vec![Span {
            start: base,
            end: base + 8192,
            elemsize: 64,
            nelems: 32,
            noscan: false,
            specials: 0,
        }]);
        // The global (outside the heap) points to object 3, which points to channel A.
        f.set(global, obj(3));
        f.set(obj(3) + 8, obj(1));
        // Candidates' stacks: the first holds B (not a root), the live goroutine's stack
        // points to nothing.
        let stack_a = obj(50);
        let stack_b = obj(52);
        f.set(stack_b, obj(2));
        let mem = ProcMem::open(std::process::id()).unwrap();
        let chan = |addr| {
            Some(vec![WaitObject {
                kind: WaitKind::Channel,
                addr,
            }])
        };
        let gs = vec![
            Goroutine {
                g: obj(4),
                stack: (stack_a, stack_a + 16),
                candidate: chan(obj(1)),
            },
            Goroutine {
                g: obj(5),
                stack: (stack_b, stack_b + 16),
                candidate: chan(obj(2)),
            },
        ];
        let out = analyse(&mem, &heap, &offsets(), &[(global, 8)], &gs, 1 << 20).unwrap();
        assert_eq!(out.leaked, vec![1]);
        // A live root pointing at B through a sudog-free object clears it too.
        f.set(global, obj(2));
        let out = analyse(&mem, &heap, &offsets(), &[(global, 8)], &gs, 1 << 20).unwrap();
        assert_eq!(out.leaked, vec![0]);
        // A candidate made live by its object wakes what its stack holds (fixpoint): A is
        // reached from the global through object 3; candidate 0's stack holds B.
        f.set(global, obj(3));
        f.set(stack_a, obj(2));
        let out = analyse(&mem, &heap, &offsets(), &[(global, 8)], &gs, 1 << 20).unwrap();
        assert!(out.leaked.is_empty(), "{out:?}");
        // Over budget: no verdict.
        assert_eq!(
            analyse(&mem, &heap, &offsets(), &[(global, 8)], &gs, 8).unwrap_err(),
            ReachError::OverBudget
        );
        drop(f);
    }
}
