//! tokio's task layout as seen from outside (stable without `tokio_unstable` from 1.35 to at
//! least 1.54; see ../shared/research/tokio-tasks.md): the task vtables, found by their shape,
//! and the header every task starts with.

/// Words of a task vtable: 7 function pointers, then `trailer_offset`, `scheduler_offset` and
/// `id_offset` (in some order; told apart by size).
const VTABLE_WORDS: usize = 10;
const VTABLE_FNS: usize = 7;
/// Largest offset believed: a future's size sets `trailer_offset` (boxed beyond tokio's limit).
const MAX_OFFSET: u64 = 1 << 24;

/// `Header.state` bits.
pub(crate) const RUNNING: u64 = 1;
pub(crate) const COMPLETE: u64 = 2;
pub(crate) const NOTIFIED: u64 = 4;
pub(crate) const JOIN_INTEREST: u64 = 8;
pub(crate) const CANCELLED: u64 = 32;
pub(crate) const REF_SHIFT: u32 = 6;

/// Header: state @0, queue_next @8, vtable @16, owner_id @24.
pub(crate) const HEADER_BYTES: usize = 32;

/// A task vtable: one per (future type, scheduler).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Vtable {
    pub addr: u64,
    /// `raw::poll::<T, S>` and the other six functions, in declaration order.
    pub fns: [u64; VTABLE_FNS],
    pub trailer: u64,
    pub scheduler: u64,
    pub id: u64,
}

/// Task vtables in `words` (the relocated `.data.rel.ro` read from the process, starting at
/// `base`), where `is_code` says which words point at code.
pub(crate) fn find_vtables(base: u64, words: &[u64], is_code: impl Fn(u64) -> bool) -> Vec<Vtable> {
    let mut out = Vec::new();
    let mut i = 0;
    while i + VTABLE_WORDS <= words.len() {
        let w = &words[i..i + VTABLE_WORDS];
        if let Some(v) = vtable_at(w, &is_code) {
            out.push(Vtable {
                addr: base + 8 * i as u64,
                ..v
            });
            i += VTABLE_WORDS;
        } else {
            i += 1;
        }
    }
    out
}

fn vtable_at(w: &[u64], is_code: &impl Fn(u64) -> bool) -> Option<Vtable> {
    if !w[..VTABLE_FNS].iter().all(|p| is_code(*p)) {
        return None;
    }
    // Offsets, not pointers (a window starting one word early takes `shutdown` for one).
    if w[VTABLE_FNS..].iter().any(|o| is_code(*o)) {
        return None;
    }
    let mut offsets = [w[7], w[8], w[9]];
    offsets.sort_unstable();
    let [scheduler, id, trailer] = offsets;
    // The scheduler follows the 32-byte header; every offset is 8-aligned and distinct.
    let sane = scheduler >= HEADER_BYTES as u64
        && scheduler < id
        && id < trailer
        && trailer < MAX_OFFSET
        && offsets.iter().all(|o| o % 8 == 0);
    // The word after a task vtable is not a small offset (else it is a longer table).
    sane.then(|| Vtable {
        addr: 0,
        fns: w[..VTABLE_FNS].try_into().unwrap_or_default(),
        trailer,
        scheduler,
        id,
    })
}

/// A task header as read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Header {
    pub state: u64,
    pub vtable: u64,
    pub owner_id: u64,
}

impl Header {
    pub(crate) fn parse(b: &[u8]) -> Option<Self> {
        let word = |i: usize| crate::proc::u64_at(b, i * 8);
        Some(Self {
            state: word(0)?,
            vtable: word(2)?,
            owner_id: word(3)?,
        })
    }

    pub(crate) fn refs(&self) -> u64 {
        self.state >> REF_SHIFT
    }

    /// Not running, not scheduled, not done: waiting for a wake.
    pub(crate) fn is_idle(&self) -> bool {
        self.state & (RUNNING | COMPLETE | NOTIFIED) == 0
    }

    /// Idle with no reference but the task list's and its JoinHandle's: no waker exists, so
    /// nothing can wake it. (An AbortHandle also holds a reference: such a task is never
    /// called lost, which errs on the side of silence.)
    pub(crate) fn waker_lost(&self) -> bool {
        self.is_idle()
            && self.state & CANCELLED == 0
            && self.refs() <= 1 + u64::from(self.state & JOIN_INTEREST != 0)
    }

    /// Believable as a live task of an owned list: referenced (by the list, at least).
    pub(crate) fn plausible(&self) -> bool {
        (1..1 << 40).contains(&self.refs()) && self.owner_id != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vtables_by_shape() {
        let code = |p: u64| (0x1000..0x2000).contains(&p);
        let mut words = vec![7, 0x1010];
        // A task vtable: trailer, scheduler, id in declaration order.
        words.extend([
            0x1100, 0x1200, 0x1300, 0x1400, 0x1500, 0x1600, 0x1700, 88, 32, 40,
        ]);
        // A trait object vtable: drop, size, align, methods.
        words.extend([
            0x1800, 48, 8, 0x1900, 0x1a00, 0x1b00, 0x1c00, 0x1d00, 0x1e00, 0x1f00,
        ]);
        // Offsets not believable: equal.
        words.extend([
            0x1100, 0x1200, 0x1300, 0x1400, 0x1500, 0x1600, 0x1700, 32, 32, 40,
        ]);
        let found = find_vtables(0x5000, &words, code);
        assert_eq!(found.len(), 1);
        let v = found[0];
        assert_eq!((v.addr, v.fns[0]), (0x5010, 0x1100));
        assert_eq!((v.scheduler, v.id, v.trailer), (32, 40, 88));
    }

    #[test]
    fn lost_waker_counts_references() {
        let h = |state| Header {
            state,
            vtable: 1,
            owner_id: 1,
        };
        let refs = |n: u64| n << REF_SHIFT;
        // Only the list's reference: lost.
        assert!(h(refs(1)).waker_lost());
        // The list's and the JoinHandle's: lost.
        assert!(h(refs(2) | JOIN_INTEREST).waker_lost());
        // A waker somewhere: fine.
        assert!(!h(refs(2)).waker_lost());
        assert!(!h(refs(3) | JOIN_INTEREST).waker_lost());
        // Scheduled, running or done: not waiting.
        assert!(!h(refs(1) | NOTIFIED).waker_lost());
        assert!(!h(refs(1) | RUNNING).waker_lost());
        assert!(!h(refs(1) | COMPLETE).waker_lost());
    }
}
