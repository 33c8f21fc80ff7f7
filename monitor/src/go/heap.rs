//! The Go heap of a running process, seen through the runtime's own span table
//! (`mheap_.allspans`): which addresses are heap objects, where each object starts and how
//! big it is. Read from outside without stopping the process, so every value is checked.

use super::layouts::HeapOffsets;
use super::pclntab::u64_at;
use super::task::{SliceError, pointer_slice};
use crate::proc::ProcMem;

/// `runtime.pageSize`: spans are whole pages of 8 KiB.
const PAGE: u64 = 8192;
/// `runtime.mSpanInUse`: a span holding heap objects (stacks are `mSpanManual`).
const SPAN_IN_USE: u8 = 1;

/// One span of heap objects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Span {
    pub start: u64,
    pub end: u64,
    pub elemsize: u64,
    pub nelems: u32,
    /// Its objects hold no pointers (`spanclass & 1`): marked, never scanned.
    pub noscan: bool,
    /// Its list of special records (finalizers, cleanups, ...), 0 when none.
    pub specials: u64,
}

/// An object: which span, which slot, where it starts and how long it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Object {
    pub span: u32,
    pub index: u32,
    pub base: u64,
    pub size: u64,
}

/// The in-use spans, sorted by address.
#[derive(Debug, Default)]
pub(crate) struct Heap {
    spans: Vec<Span>,
    low: u64,
    high: u64,
    /// Bytes read from the process to build it.
    pub bytes_read: u64,
}

/// Why a heap could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HeapError {
    /// `mheap_.allspans` unreadable or longer than allowed.
    Unreadable,
    TooManySpans,
    /// Two in-use spans overlap: read while the runtime changed them.
    Torn,
}

impl Heap {
    /// Reads the span table of the heap at `mheap` (an address in the process), at most
    /// `max_spans` spans.
    pub(crate) fn read(
        mem: &ProcMem,
        mheap: u64,
        off: &HeapOffsets,
        max_spans: usize,
    ) -> Result<Heap, HeapError> {
        let header = mheap.wrapping_add(u64::from(off.mheap_allspans));
        let span_bytes = [
            off.mspan_start_addr,
            off.mspan_npages,
            off.mspan_nelems,
            off.mspan_spanclass,
            off.mspan_state,
            off.mspan_elemsize,
            off.mspan_specials,
        ]
        .iter()
        .max()
        .map_or(0, |m| *m as usize + 8);
        let mut heap = Heap::default();
        let read = pointer_slice(mem, header, max_spans, |pointers| {
            heap.bytes_read += pointers.len() as u64 * 8;
            let (spans, ok) = mem.read_many(pointers, span_bytes);
            heap.bytes_read += spans.len() as u64;
            for (j, ok) in ok.iter().enumerate() {
                if *ok && let Some(span) = parse_span(&spans[j * span_bytes..][..span_bytes], off) {
                    heap.spans.push(span);
                }
            }
        });
        match read {
            Ok(()) => {}
            Err(SliceError::Unreadable) => return Err(HeapError::Unreadable),
            Err(SliceError::TooLong) => return Err(HeapError::TooManySpans),
        }
        heap.spans.sort_unstable_by_key(|s| s.start);
        if heap.spans.windows(2).any(|w| w[0].end > w[1].start) {
            return Err(HeapError::Torn);
        }
        heap.low = heap.spans.first().map_or(0, |s| s.start);
        heap.high = heap.spans.last().map_or(0, |s| s.end);
        Ok(heap)
    }

    /// Builds a heap from spans (tests).
    #[cfg(test)]
    pub(crate) fn from_spans(mut spans: Vec<Span>) -> Heap {
        spans.sort_unstable_by_key(|s| s.start);
        Heap {
            low: spans.first().map_or(0, |s| s.start),
            high: spans.last().map_or(0, |s| s.end),
            spans,
            bytes_read: 0,
        }
    }

    pub(crate) fn spans(&self) -> &[Span] {
        &self.spans
    }

    /// The object containing `addr` (an interior pointer finds its object, as in the
    /// runtime's `findObject`). Every slot counts as allocated: a free slot can only make
    /// more reachable, never less.
    pub(crate) fn find(&self, addr: u64) -> Option<Object> {
        if addr < self.low || addr >= self.high {
            return None;
        }
        let i = self
            .spans
            .partition_point(|s| s.start <= addr)
            .checked_sub(1)?;
        let s = self.spans.get(i)?;
        if addr >= s.end {
            return None;
        }
        let index = (addr - s.start) / s.elemsize;
        if index >= u64::from(s.nelems) {
            return None;
        }
        Some(Object {
            span: u32::try_from(i).ok()?,
            index: index as u32,
            base: s.start + index * s.elemsize,
            size: s.elemsize,
        })
    }

    pub(crate) fn span(&self, i: u32) -> Option<&Span> {
        self.spans.get(i as usize)
    }
}

fn parse_span(b: &[u8], off: &HeapOffsets) -> Option<Span> {
    let word = |o: u32| u64_at(b, o as usize).unwrap_or(0);
    let byte = |o: u32| b.get(o as usize).copied().unwrap_or(0);
    if byte(off.mspan_state) != SPAN_IN_USE {
        return None;
    }
    let start = word(off.mspan_start_addr);
    let npages = word(off.mspan_npages);
    // uint16 since go1.22, uintptr before: the low 16 bits are the count either way.
    let nelems = u32::from(u16::from_le_bytes([
        byte(off.mspan_nelems),
        byte(off.mspan_nelems + 1),
    ]));
    let elemsize = word(off.mspan_elemsize);
    let bytes = npages.checked_mul(PAGE)?;
    // A sane span: page-aligned, in the user half of the address space, no larger than
    // 64 GiB, its objects inside it.
    if start == 0
        || start % PAGE != 0
        || npages == 0
        || bytes > 64 << 30
        || start.checked_add(bytes)? > 1 << 47
        || nelems == 0
        || elemsize == 0
        || elemsize.checked_mul(u64::from(nelems))? > bytes
    {
        return None;
    }
    Some(Span {
        start,
        end: start + bytes,
        elemsize,
        nelems,
        noscan: byte(off.mspan_spanclass) & 1 == 1,
        specials: word(off.mspan_specials),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_objects_by_interior_pointers() {
        let heap = Heap::from_spans(vec![
            Span {
                start: 0x10000,
                end: 0x12000,
                elemsize: 48,
                nelems: 170,
                noscan: false,
                specials: 0,
            },
            Span {
                start: 0x20000,
                end: 0x24000,
                elemsize: 0x4000,
                nelems: 1,
                noscan: true,
                specials: 0,
            },
        ]);
        let o = heap.find(0x10000 + 48 * 3 + 17).unwrap();
        assert_eq!((o.span, o.index, o.base, o.size), (0, 3, 0x10000 + 144, 48));
        // The tail of a span past its last object is not an object.
        assert_eq!(heap.find(0x10000 + 48 * 170), None);
        assert_eq!(heap.find(0x1ffff), None);
        assert_eq!(heap.find(0x23fff).unwrap().base, 0x20000);
        assert_eq!(heap.find(0x24000), None);
    }
}
