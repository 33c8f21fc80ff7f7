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

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use super::heap::{Heap, Object};
use super::layouts::HeapOffsets;
use super::pclntab::u64_at;
use super::stackmaps::{self, FrameMaps};
use super::waits::{WaitKind, WaitObject};
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
    pub goid: u64,
    /// The stack range in use: `[sched.sp, stack.hi)` when parked, the whole stack when
    /// running or in a system call (its `sched.sp` is stale).
    pub stack: (u64, u64),
    /// Where it parked (`sched.pc`) when it is parked with its stack in place: its frames
    /// are then scanned by the runtime's stack maps. `None`: the whole stack is scanned.
    pub parked_pc: Option<u64>,
    /// What it waits on, when it is a candidate; `None` otherwise (a root).
    pub candidate: Option<Vec<WaitObject>>,
}

/// A range of globals, a root: scanned whole, or only the words its pointer bitmap sets
/// (the runtime's `gcdatamask` / `gcbssmask`: bit i is the word at `start + 8i`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Globals {
    pub start: u64,
    pub len: u64,
    pub mask: Option<Arc<[u8]>>,
}

/// The roots besides goroutines' stacks.
pub(crate) struct Roots<'a> {
    pub globals: &'a [Globals],
    /// Registers of threads on a CPU (sampled).
    pub registers: &'a [u64],
}

/// Where a mark came from when a register held it (no address is 1).
const REGISTER: u64 = 1;

/// What one analysis found.
#[derive(Debug, Default)]
pub(crate) struct Outcome {
    /// Indices (into the goroutines given) of the candidates proven leaked.
    pub leaked: Vec<usize>,
    pub bytes_read: u64,
    pub objects_marked: u64,
    /// Root stacks scanned by their stack maps, and scanned whole (running, in a system
    /// call, or not described exactly by the maps).
    pub precise_stacks: u64,
    pub conservative_stacks: u64,
    /// For each lock some candidate waits on, the live goroutines (indices) whose live stack
    /// slots point to it and which do not wait on it themselves: who may hold it.
    pub holders: HashMap<u64, Vec<usize>>,
}

/// Why an analysis gave no verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReachError {
    /// Reading more than allowed would have been needed.
    OverBudget,
    /// A root or a marked object could not be read: it may hold the only reference.
    Unreadable,
}

/// Candidates found live whose chain of marking words is logged (at debug), per analysis.
const MAX_CHAINS_TOLD: usize = 16;

/// Runs the analysis over `goroutines` (all of them: the candidates and every other live
/// one), the heap read just before and `globals`. Parked stacks are
/// scanned by `maps` when given. Reads at most `max_bytes` of the process's memory.
pub(crate) fn analyse(
    mem: &ProcMem,
    heap: &Heap,
    off: &HeapOffsets,
    roots: &Roots<'_>,
    goroutines: &[Goroutine],
    mut maps: Option<&mut dyn FrameMaps>,
    max_bytes: u64,
) -> Result<Outcome, ReachError> {
    let mut m = Marker::new(mem, heap, off, goroutines, max_bytes);
    for g in roots.globals {
        match &g.mask {
            None => m.scan_range(g.start, g.len)?,
            Some(mask) => m.scan_masked(g.start, g.len, mask)?,
        }
    }
    // Registers of threads on a CPU: a running goroutine may hold its only reference to
    // an object there, where no stack scan sees it.
    for &r in roots.registers {
        m.mark(r, REGISTER);
    }
    m.scan_specials()?;
    let mut live: Vec<bool> = goroutines.iter().map(|g| g.candidate.is_none()).collect();
    for (i, g) in goroutines.iter().enumerate() {
        if live[i] {
            m.root_goroutine(i, g, maps.as_deref_mut())?;
        }
    }
    m.drain()?;
    // Fixpoint: a candidate whose objects are reachable is live, and what its stack holds
    // is reachable in turn.
    let mut chains_told = 0;
    loop {
        let mut woke = false;
        for (i, g) in goroutines.iter().enumerate() {
            let Some(objects) = &g.candidate else {
                continue;
            };
            if live[i] || !objects.iter().any(|o| m.reachable(o.addr)) {
                continue;
            }
            // A few chains say why; 100,000 live candidates would take a minute to log.
            if m.trace.is_some()
                && chains_told < MAX_CHAINS_TOLD
                && let Some(o) = objects.iter().find(|o| m.reachable(o.addr))
            {
                chains_told += 1;
                log::debug!(
                    "reachability: g {:#x} is live: what it waits on, {:#x}, is {}",
                    g.g,
                    o.addr,
                    m.why_marked(o.addr, goroutines)
                );
            }
            live[i] = true;
            woke = true;
            m.root_goroutine(i, g, maps.as_deref_mut())?;
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
        precise_stacks: m.precise_stacks,
        conservative_stacks: m.conservative_stacks,
        holders: m.holders,
    })
}

/// Stacks larger than this are scanned whole, in pieces, with no maps.
const MAX_PRECISE_STACK: u64 = 8 << 20;

struct Marker<'a> {
    /// The locks candidates wait on, and who may hold each (see [`Outcome::holders`]).
    locks: HashSet<u64>,
    holders: HashMap<u64, Vec<usize>>,
    precise_stacks: u64,
    conservative_stacks: u64,
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
    /// With debug logging: for each marked object, the address of the word that marked it
    /// first, so a candidate found reachable can be told by what.
    trace: Option<HashMap<u64, u64>>,
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
            locks: goroutines
                .iter()
                .flat_map(|g| g.candidate.iter().flatten())
                .filter(|o| o.kind == WaitKind::Lock)
                .map(|o| o.addr)
                .collect(),
            holders: HashMap::new(),
            precise_stacks: 0,
            conservative_stacks: 0,
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
            trace: log::log_enabled!(log::Level::Debug).then(Default::default),
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

    fn mark(&mut self, addr: u64, from: u64) {
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
        if let Some(trace) = &mut self.trace {
            trace.insert(o.base, from);
        }
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
                self.scan_words(at, &buf, None);
                self.buf = buf;
            }
            at += n as u64;
        }
        Ok(())
    }

    /// Scans the words of `[start, start + len)` that `mask` sets (bit i: word i), in
    /// pieces; a piece that cannot be read fails the analysis.
    fn scan_masked(&mut self, start: u64, len: u64, mask: &[u8]) -> Result<(), ReachError> {
        let words = (len / 8).min(mask.len() as u64 * 8);
        let mut first = 0u64;
        while first < words {
            let n = (words - first).min(BATCH_BYTES as u64 / 8);
            // Pieces with no pointer are not read at all.
            let bits = first..first + n;
            if !bits.clone().any(|i| stackmaps::bit(mask, i)) {
                first += n;
                continue;
            }
            let at = start + first * 8;
            self.charge(n as usize * 8)?;
            let mut buf = std::mem::take(&mut self.buf);
            buf.resize(n as usize * 8, 0);
            if !self.mem.read(at, &mut buf) {
                self.buf = buf;
                return Err(ReachError::Unreadable);
            }
            for i in bits {
                if stackmaps::bit(mask, i) {
                    self.scan_words(at, &buf, Some(((i - first) * 8) as u32));
                }
            }
            self.buf = buf;
            first += n;
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
        self.scan_words(start, buf, None);
        true
    }

    /// Marks what the words of `buf`, read at `at`, point to.
    fn scan_words(&mut self, at: u64, buf: &[u8], only: Option<u32>) {
        if let Some(offset) = only {
            let s = offset as usize;
            if let Some(w) = buf.get(s..s + 8).and_then(|w| w.try_into().ok()) {
                self.mark(u64::from_le_bytes(w), at + u64::from(offset));
            }
            return;
        }
        for (i, w) in buf.as_chunks::<8>().0.iter().enumerate() {
            let v = u64::from_le_bytes(*w);
            if v >= 4096 {
                self.mark(v, at + i as u64 * 8);
            }
        }
    }

    /// Why the object at `addr` is marked, with debug logging: the chain of words that
    /// marked it, back to a root (a global, a stack or a `g`).
    fn why_marked(&self, addr: u64, goroutines: &[Goroutine]) -> String {
        if self.trace.as_ref().is_some_and(|t| {
            self.heap
                .find(addr)
                .is_some_and(|o| t.get(&o.base) == Some(&REGISTER))
        }) {
            return format!("{addr:#x}, held in a register of a thread on a CPU");
        }
        let Some(trace) = &self.trace else {
            return String::new();
        };
        let mut out = Vec::new();
        let mut addr = addr;
        for _ in 0..16 {
            let Some(o) = self.heap.find(addr) else {
                out.push(format!("{addr:#x} (not in the heap)"));
                break;
            };
            let Some(&from) = trace.get(&o.base) else {
                out.push(format!("object {:#x} (unrecorded)", o.base));
                break;
            };
            out.push(format!(
                "object {:#x}+{:#x} <- word {from:#x}",
                o.base,
                addr - o.base
            ));
            if let Some(g) = goroutines
                .iter()
                .find(|g| (g.stack.0..g.stack.1).contains(&from))
            {
                out.push(format!(
                    "in the stack of g {:#x} [{:#x}, {:#x}){}",
                    g.g,
                    g.stack.0,
                    g.stack.1,
                    if g.candidate.is_some() {
                        " (a candidate woken)"
                    } else {
                        ""
                    }
                ));
                break;
            }
            if self.heap.find(from).is_none() {
                out.push("a global or runtime memory".to_owned());
                break;
            }
            addr = from;
        }
        out.join(", ")
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
                self.scan_words(special + 8, &record[8..], None);
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
    fn root_goroutine<M: FrameMaps + ?Sized>(
        &mut self,
        index: usize,
        g: &Goroutine,
        maps: Option<&mut M>,
    ) -> Result<(), ReachError> {
        let (lo, hi) = g.stack;
        // The g first: its words that point into the stack (defer and panic records kept
        // there) reach the stack objects they name.
        let mut seeds = Vec::new();
        if let Some(o) = self.heap.find(g.g) {
            self.charge(o.size as usize)?;
            let mut obj = vec![0u8; o.size as usize];
            if !self.mem.read(o.base, &mut obj) {
                return Err(ReachError::Unreadable);
            }
            seeds.extend(
                obj.as_chunks::<8>()
                    .0
                    .iter()
                    .map(|w| u64::from_le_bytes(*w))
                    .filter(|v| (lo..hi).contains(v)),
            );
            // All but `stack.hi` (see [`not_references`]).
            self.scan_words(o.base, &obj[..8.min(obj.len())], None);
            self.scan_words(o.base + 16, obj.get(16..).unwrap_or_default(), None);
        }
        if hi <= lo || hi - lo > 1 << 30 {
            return Ok(());
        }
        // Parked, within the size read whole, and readable: by its maps. Else whole, in pieces.
        let read = match (g.parked_pc, maps) {
            (Some(pc), Some(maps)) if hi - lo <= MAX_PRECISE_STACK => {
                let mut stack = vec![0u8; (hi - lo) as usize];
                self.mem.read(lo, &mut stack).then(|| {
                    let words = stackmaps::live_words(maps, pc, lo, &stack, &seeds);
                    (stack, words)
                })
            }
            _ => None,
        };
        let Some((stack, words)) = read else {
            self.conservative_stacks += 1;
            return self.scan_range(lo, hi - lo);
        };
        self.charge(stack.len())?;
        match words {
            Some(words) => {
                self.precise_stacks += 1;
                for w in words {
                    self.scan_words(lo, &stack, Some(w));
                    if !self.locks.is_empty()
                        && let Some(v) = u64_at(&stack, w as usize)
                        && self.locks.contains(&v)
                        && !g.candidate.iter().flatten().any(|o| o.addr == v)
                    {
                        let holders = self.holders.entry(v).or_default();
                        if holders.last() != Some(&index) {
                            holders.push(index);
                        }
                    }
                }
            }
            None => {
                self.conservative_stacks += 1;
                self.scan_words(lo, &stack, None);
            }
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
            if only.is_some() {
                self.scan_words(o.base, obj, only);
                continue;
            }
            // Words of the runtime's own that look like references but are not.
            let mut from = 0;
            for skip in not_references(obj, o.base, self.off.p_pcache)
                .into_iter()
                .flatten()
            {
                self.scan_words(o.base + from as u64, &obj[from..skip.start], None);
                from = skip.end;
            }
            self.scan_words(o.base + from as u64, &obj[from..], None);
        }
        self.buf = buf;
        Ok(())
    }
}

/// Byte ranges of `obj` (at `base`), in order, holding words of the runtime's own that look
/// like references but are not: conservative scanning would otherwise keep what they name
/// reachable, and a leak would go unproven for as long as they stay. Each was seen keeping a
/// leaked `sync.Cond`'s waiters "reachable" on go1.21 (`go_verdicts`, `once-cond`), traced
/// with the debug log's chain of marking words:
/// - the `stack.hi` of a `g` not in `allgs` (an M's `g0` or `gsignal`, reached from
///   `runtime.allm`): the end of its stack, which is also where the next span begins, so
///   it named the object at the start of that span;
/// - in a P (told by its write-barrier buffer): the buffer's entries (see
///   [`write_barrier_buffer`]), and `pcache.base`, the first page of the P's page cache,
///   which names the object at the start of the span allocated there. Since go1.22 a P,
///   like any small object with pointers over 512 bytes, starts 8 bytes into its heap
///   object, after its malloc header: `pcache.base` is then the word after `p_pcache`
///   (go1.27's once-range leaks went unproven one run in six, a channel allocated at the
///   start of the P's cached chunk kept "reachable"). Both words are skipped: the one
///   before it is `p.mcache` (allocated off the heap, so never a heap reference), the one
///   after it on go1.21 is `pcache.cache`, a bitmap.
fn not_references(obj: &[u8], base: u64, p_pcache: u32) -> [Option<std::ops::Range<usize>>; 3] {
    let hi = stack_bounds(obj).then_some(8..16);
    let Some(wb) = write_barrier_buffer(obj, base) else {
        return [hi, None, None];
    };
    let pcache = p_pcache as usize;
    let pcache = (pcache >= 16 && pcache + 16 <= wb.start).then_some(pcache..pcache + 16);
    [hi, pcache, Some(wb)]
}

/// Whether `obj` starts with a goroutine's stack bounds, as every `g` does
/// (`stack.lo`, `stack.hi`): a power-of-two span of at least 2 KiB, aligned to 2 KiB.
fn stack_bounds(obj: &[u8]) -> bool {
    let (Some(lo), Some(hi)) = (u64_at(obj, 0), u64_at(obj, 8)) else {
        return false;
    };
    let size = hi.wrapping_sub(lo);
    lo != 0
        && hi > lo
        && size.is_power_of_two()
        && (2048..=1 << 30).contains(&size)
        && lo % 2048 == 0
}

/// Entries of a P's write-barrier buffer (runtime `wbBuf`, the same in every Go version
/// read: `wbBufEntries` = 512).
const WB_ENTRIES: usize = 512;

/// Where `obj` (at `base`) holds a write-barrier buffer, as a byte range of its entries: the
/// words `next, end` followed by the entries, with `end` pointing just past them and `next`
/// among them, which nothing but that structure does. The entries are copies of pointers the
/// program wrote while a GC was marking, left in place once flushed (the runtime never
/// clears them): the program's real references are where it wrote them.
fn write_barrier_buffer(obj: &[u8], base: u64) -> Option<std::ops::Range<usize>> {
    const LEN: usize = WB_ENTRIES * 8;
    if obj.len() < LEN + 16 {
        return None;
    }
    let words = obj.as_chunks::<8>().0;
    (0..=words.len().saturating_sub(WB_ENTRIES + 2)).find_map(|i| {
        let next = u64::from_le_bytes(words[i]);
        let end = u64::from_le_bytes(words[i + 1]);
        let start = (i + 2) * 8;
        let entries = base.checked_add(start as u64)?;
        (end == entries + LEN as u64
            && (entries..=end).contains(&next)
            && (next - entries) % 8 == 0)
            .then_some(start..start + LEN)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::go::heap::Span;

    /// One analysis with the test's offsets, no stack maps and a generous budget.
    fn run(mem: &ProcMem, heap: &Heap, globals: &[Globals], gs: &[Goroutine]) -> Outcome {
        let roots = Roots {
            globals,
            registers: &[],
        };
        analyse(mem, heap, &offsets(), &roots, gs, None, 1 << 20).unwrap()
    }

    /// A heap of one span of 32 objects of 64 bytes at `base`.
    fn one_span(base: u64) -> Heap {
        Heap::from_spans(vec![Span {
            start: base,
            end: base + 8192,
            elemsize: 64,
            nelems: 32,
            noscan: false,
            specials: 0,
        }])
    }

    fn root(start: u64, len: u64) -> Globals {
        Globals {
            start,
            len,
            mask: None,
        }
    }

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
            p_pcache: 64,
        }
    }

    /// In a P, `pcache.base` is skipped where the table puts it and 8 bytes on, where it is
    /// behind go1.22's malloc header.
    #[test]
    fn a_ps_page_cache_base_is_no_reference_with_or_without_a_malloc_header() {
        let base = 0x7000_0000_0000_u64;
        let mut obj = vec![0u8; 8192];
        let wb = 512;
        obj[wb..wb + 8].copy_from_slice(&(base + wb as u64 + 16 + 8).to_le_bytes());
        obj[wb + 8..wb + 16].copy_from_slice(&(base + wb as u64 + 16 + 4096).to_le_bytes());
        let [_, pcache, entries] = not_references(&obj, base, 64);
        assert_eq!(pcache, Some(64..80));
        assert_eq!(entries, Some(wb + 16..wb + 16 + 4096));
    }

    /// A P's write-barrier buffer holds copies of pointers written during a GC: a stale one
    /// to a channel keeps nothing reachable; the rest of the P is scanned as before.
    #[test]
    fn write_barrier_buffers_are_not_references() {
        // One span holding one 8 KiB object (a P), then 64-byte objects after it.
        let mut f = Fake::new(4096);
        let base = f.base();
        let p = base;
        let chan_a = base + 8192;
        let chan_b = base + 8192 + 64;
        let heap = Heap::from_spans(vec![
            Span {
                start: base,
                end: base + 8192,
                elemsize: 8192,
                nelems: 1,
                noscan: false,
                specials: 0,
            },
            Span {
                start: base + 8192,
                end: base + 16384,
                elemsize: 64,
                nelems: 128,
                noscan: false,
                specials: 0,
            },
        ]);
        // The P: a field pointing to A, then the buffer {next, end, entries} at +64, its
        // third entry (flushed, stale) pointing to B.
        f.set(p + 8, chan_a);
        let entries = p + 80;
        f.set(p + 64, entries + 8);
        f.set(p + 72, entries + 512 * 8);
        f.set(entries + 16, chan_b);
        let global = base + 16384 + 64;
        f.set(global, p);
        let mem = ProcMem::open(std::process::id()).unwrap();
        let chan = |addr| {
            Some(vec![WaitObject {
                kind: WaitKind::Channel,
                addr,
            }])
        };
        let stack = base + 16384 + 128;
        let gs = vec![
            Goroutine {
                g: base + 8192 + 640,
                goid: 0,
                stack: (stack, stack + 8),
                parked_pc: None,
                candidate: chan(chan_a),
            },
            Goroutine {
                g: base + 8192 + 704,
                goid: 0,
                stack: (stack, stack + 8),
                parked_pc: None,
                candidate: chan(chan_b),
            },
        ];
        let out = run(&mem, &heap, &[root(global, 8)], &gs);
        assert_eq!(
            out.leaked,
            vec![1],
            "A is reached through the P, B only from its buffer"
        );
        // Without the buffer's shape (end not just past 512 entries), the word is a reference.
        f.set(p + 72, entries + 511 * 8);
        let out = run(&mem, &heap, &[root(global, 8)], &gs);
        assert!(out.leaked.is_empty(), "{out:?}");
        drop(f);
    }

    /// A `g`'s `stack.hi` (the end of its stack, where the next span may begin) is no
    /// reference; an object that does not start with stack bounds is scanned whole.
    #[test]
    fn stack_bounds_are_not_references() {
        let mut g = vec![0u8; 64];
        g[..8].copy_from_slice(&0x00c0_0003_8000_u64.to_le_bytes());
        g[8..16].copy_from_slice(&0x00c0_0003_8800_u64.to_le_bytes());
        assert_eq!(
            not_references(&g, 0x00c0_0001_0000, 64),
            [Some(8..16), None, None]
        );
        // Not a power of two apart: two ordinary words.
        g[8..16].copy_from_slice(&0x00c0_0003_8808_u64.to_le_bytes());
        assert_eq!(not_references(&g, 0x00c0_0001_0000, 64), [None, None, None]);
    }

    /// Globals with the runtime's pointer bitmap: a word the bitmap does not set is no
    /// reference, whatever it holds.
    #[test]
    fn globals_are_scanned_by_their_pointer_bitmap() {
        let mut f = Fake::new(4096);
        let base = f.base();
        let obj = |i: u64| base + i * 64;
        let heap = one_span(base);
        // Two global words: word 0 (a pointer) names channel A, word 1 (an integer to the
        // runtime) looks like channel B's address.
        let global = obj(40);
        f.set(global, obj(1));
        f.set(global + 8, obj(2));
        let stack = obj(50);
        let mem = ProcMem::open(std::process::id()).unwrap();
        let chan = |addr| {
            Some(vec![WaitObject {
                kind: WaitKind::Channel,
                addr,
            }])
        };
        let gs: Vec<Goroutine> = [(4, 1), (5, 2)]
            .iter()
            .map(|&(g, c)| Goroutine {
                g: obj(g),
                goid: 0,
                stack: (stack, stack + 8),
                parked_pc: None,
                candidate: chan(obj(c)),
            })
            .collect();
        let masked = Globals {
            start: global,
            len: 16,
            mask: Some(vec![0b01].into()),
        };
        let out = run(&mem, &heap, &[masked], &gs);
        assert_eq!(out.leaked, vec![1], "B is named only by a non-pointer word");
        let out = run(&mem, &heap, &[root(global, 16)], &gs);
        assert!(out.leaked.is_empty(), "scanned whole, both are reachable");
        drop(f);
    }

    #[test]
    fn unreachable_channel_is_a_leak_reachable_one_is_not() {
        // One span of 64-byte objects: 0 = global target, 1 = channel A (reachable through
        // object 3), 2 = channel B (only a candidate's stack points to it), 4 = g objects.
        let mut f = Fake::new(4096);
        let base = f.base();
        let obj = |i: u64| base + i * 64;
        let global = obj(40);
        let heap = one_span(base);
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
                goid: 0,
                stack: (stack_a, stack_a + 16),
                parked_pc: None,
                candidate: chan(obj(1)),
            },
            Goroutine {
                g: obj(5),
                goid: 0,
                stack: (stack_b, stack_b + 16),
                parked_pc: None,
                candidate: chan(obj(2)),
            },
        ];
        let out = run(&mem, &heap, &[root(global, 8)], &gs);
        assert_eq!(out.leaked, vec![1]);
        // A live root pointing at B through a sudog-free object clears it too.
        f.set(global, obj(2));
        let out = run(&mem, &heap, &[root(global, 8)], &gs);
        assert_eq!(out.leaked, vec![0]);
        // A candidate made live by its object wakes what its stack holds (fixpoint): A is
        // reached from the global through object 3; candidate 0's stack holds B.
        f.set(global, obj(3));
        f.set(stack_a, obj(2));
        let out = run(&mem, &heap, &[root(global, 8)], &gs);
        assert!(out.leaked.is_empty(), "{out:?}");
        // A register of a thread on a CPU holding B keeps it live too: a running goroutine
        // may hold its only reference there. (The global points to nothing that reaches B.)
        f.set(global, 0);
        f.set(stack_a, 0);
        let out = run(&mem, &heap, &[root(global, 8)], &gs);
        assert_eq!(out.leaked, vec![0, 1], "{out:?}");
        let registers = [0x1234, obj(2) + 8];
        let globals = [root(global, 8)];
        let roots = Roots {
            globals: &globals,
            registers: &registers,
        };
        let out = analyse(&mem, &heap, &offsets(), &roots, &gs, None, 1 << 20).unwrap();
        assert_eq!(out.leaked, vec![0], "{out:?}");
        f.set(global, obj(3));
        // Over budget: no verdict.
        assert_eq!(
            analyse(&mem, &heap, &offsets(), &roots, &gs, None, 8).unwrap_err(),
            ReachError::OverBudget
        );
        drop(f);
    }
}
