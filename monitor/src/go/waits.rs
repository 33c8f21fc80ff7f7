//! What a parked goroutine waits on, read from its `g` with no probe: the channels of its
//! sudog list (`g.waiting`, linked by `waitlink`: one sudog per channel of a select), or the
//! semaphore or `sync.Cond` notify list its sudog names.

use std::{collections::HashMap, sync::Arc};

use serde::Serialize;

use super::{heap::Heap, layouts::HeapOffsets, pclntab::u64_at};
use crate::{
    detect::{Field, ObjectState},
    proc::ProcMem,
};

/// Sudogs followed per goroutine (a select has one per case) and per channel queue.
const MAX_SUDOGS: usize = 256;

/// The kind of object a goroutine waits on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum WaitKind {
    Channel,
    /// A `sync.WaitGroup` (or another user of `runtime_Semacquire`).
    Semaphore,
    /// A `sync.Cond`'s notify list.
    Cond,
    /// A `sync.Mutex` or `RWMutex`: the semaphore word inside it its waiters sleep on.
    Lock,
}

impl WaitKind {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            WaitKind::Channel => "channel",
            WaitKind::Semaphore => "semaphore",
            WaitKind::Cond => "cond",
            WaitKind::Lock => "lock",
        }
    }
}

/// How a wait reason finds its objects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum WaitClass {
    Channel,
    Semaphore,
    Cond,
    /// A lock; the offset of the semaphore its waiters sleep on inside it (a `Mutex`'s
    /// `sema`, an `RWMutex`'s `writerSem` or `readerSem`).
    Lock(u8),
}

impl WaitClass {
    /// The waits whose object can prove a leak (`None` for nil channels, I/O, ...). A lock
    /// nothing live can reach can never be unlocked: its waiters are candidates too, as in
    /// the runtime's own leak detection.
    pub(crate) fn of(reason: &str) -> Option<WaitClass> {
        match reason {
            "chan send" | "chan receive" | "select" => Some(WaitClass::Channel),
            "sync.WaitGroup.Wait" | "semacquire" => Some(WaitClass::Semaphore),
            "sync.Cond.Wait" => Some(WaitClass::Cond),
            // sync.Mutex (internal/sync.Mutex since go1.24): {state int32, sema uint32};
            // sync.RWMutex: {w Mutex, writerSem, readerSem uint32, ...}. Same in 1.21-1.27.
            "sync.Mutex.Lock" => Some(WaitClass::Lock(4)),
            "sync.RWMutex.Lock" => Some(WaitClass::Lock(8)),
            "sync.RWMutex.RLock" => Some(WaitClass::Lock(12)),
            _ => None,
        }
    }

    /// The kind of object a wait of this class is on.
    fn kind(self) -> WaitKind {
        match self {
            WaitClass::Channel => WaitKind::Channel,
            WaitClass::Semaphore => WaitKind::Semaphore,
            WaitClass::Cond => WaitKind::Cond,
            WaitClass::Lock(_) => WaitKind::Lock,
        }
    }

    /// The object a wait's sudog names by `addr`: a lock's own address for the semaphore
    /// inside it (the same heap object either way).
    fn object_of(self, addr: u64) -> u64 {
        match self {
            WaitClass::Lock(sema) => addr.wrapping_sub(u64::from(sema)),
            _ => addr,
        }
    }
}

/// A lock's state as read from it (its `Mutex`, or an `RWMutex`'s writer `Mutex`), and
/// the goroutine found holding it, when one was.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct LockState {
    pub locked: bool,
    /// Goroutines the lock's state counts as waiting.
    pub waiters: u64,
    /// "goroutine 7 in main.holdLock (main.go:120)": a live goroutine whose live stack
    /// slots point to the lock.
    pub holder: Option<Arc<str>>,
}

impl LockState {
    pub(crate) fn described(&self) -> ObjectState {
        let mut fields = vec![
            ("locked", Field::Bool(self.locked)),
            ("waiters", Field::Int(self.waiters)),
        ];
        let mut text = format!(
            "{}, {} waiting",
            if self.locked { "locked" } else { "unlocked" },
            self.waiters
        );
        if let Some(h) = &self.holder {
            fields.push(("held_by", Field::Text(Arc::clone(h))));
            text.push_str(&format!(", held by {h}"));
        }
        ObjectState { fields, text }
    }
}

/// The state of the lock at `lock` (`mutexLocked` = 1, waiters from bit 3, runtime
/// internal/sync/mutex.go, the same since go1.9).
pub(crate) fn lock_state(mem: &ProcMem, lock: u64) -> Option<LockState> {
    let mut b = [0u8; 4];
    if !mem.read(lock, &mut b) {
        return None;
    }
    let state = u32::from_le_bytes(b);
    Some(LockState {
        locked: state & 1 == 1,
        waiters: u64::from(state >> 3),
        holder: None,
    })
}

/// One object waited on: its kind and address (for a channel, the `hchan`; for a semaphore,
/// the semaphore word; for a Cond, its notify list, or before go1.26 the goroutine's sudog in
/// it, which only the list reaches).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct WaitObject {
    pub kind: WaitKind,
    pub addr: u64,
}

/// Sudogs of semaphore and Cond waits before go1.26, which `g.waiting` does not point to:
/// found by their `g` field in the spans of the sudog size class. `g` -> (sudog, elem).
pub(crate) fn sudogs_by_g(
    mem: &ProcMem,
    heap: &Heap,
    off: &HeapOffsets,
) -> HashMap<u64, (u64, u64)> {
    let size = u64::from(off.sudog_size);
    let mut found = HashMap::new();
    for span in heap.spans() {
        if span.noscan || span.elemsize < size || span.elemsize > size + 16 {
            continue;
        }
        let len = (span.elemsize * u64::from(span.nelems)) as usize;
        let mut buf = vec![0u8; len];
        if !mem.read(span.start, &mut buf) {
            continue;
        }
        for (i, obj) in buf.chunks_exact(span.elemsize as usize).enumerate() {
            let g = word(obj, 0);
            let elem = word(obj, off.sudog_elem);
            if g != 0 {
                found.insert(g, (span.start + i as u64 * span.elemsize, elem));
            }
        }
    }
    found
}

/// The objects the goroutine `g` (its `g.waiting` is `waiting`) waits on in a wait of
/// `class`. `legacy` holds the sudogs found by [`sudogs_by_g`] for versions before go1.26
/// (`None` from go1.26 on, where `g.waiting` covers every class).
pub(crate) fn wait_objects(
    mem: &ProcMem,
    off: &HeapOffsets,
    class: WaitClass,
    g: u64,
    waiting: u64,
    legacy: Option<&HashMap<u64, (u64, u64)>>,
) -> Vec<WaitObject> {
    let mut objects = Vec::new();
    match (class, legacy) {
        (WaitClass::Channel, _) | (_, None) => {
            let kind = class.kind();
            let field = if class == WaitClass::Channel {
                off.sudog_c
            } else {
                off.sudog_elem
            };
            let mut sudog = waiting;
            let mut seen = 0;
            while sudog != 0 && seen < MAX_SUDOGS {
                let (Some(addr), Some(next)) = (
                    mem.read_u64(sudog + u64::from(field)),
                    mem.read_u64(sudog + u64::from(off.sudog_waitlink)),
                ) else {
                    return Vec::new();
                };
                if addr != 0 {
                    objects.push(WaitObject {
                        kind,
                        addr: class.object_of(addr),
                    });
                }
                sudog = next;
                seen += 1;
            }
        }
        (WaitClass::Semaphore | WaitClass::Lock(_), Some(found)) => {
            if let Some((_, elem)) = found.get(&g).filter(|(_, e)| *e != 0) {
                objects.push(WaitObject {
                    kind: class.kind(),
                    addr: class.object_of(*elem),
                });
            }
        }
        (WaitClass::Cond, Some(found)) => {
            if let Some((sudog, _)) = found.get(&g) {
                objects.push(WaitObject {
                    kind: WaitKind::Cond,
                    addr: *sudog,
                });
            }
        }
    }
    objects.sort_unstable();
    objects.dedup();
    objects
}

/// A channel's state as read from its `hchan`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ChannelState {
    pub capacity: u64,
    pub length: u64,
    pub closed: bool,
    pub waiting_senders: u32,
    pub waiting_receivers: u32,
}

impl ChannelState {
    /// As alerts show it: `waits_on`'s fields, and "capacity 0, length 0, open, 1 senders and
    /// 0 receivers waiting".
    pub(crate) fn described(&self) -> ObjectState {
        ObjectState {
            fields: vec![
                ("capacity", Field::Int(self.capacity)),
                ("length", Field::Int(self.length)),
                ("closed", Field::Bool(self.closed)),
                (
                    "waiting_senders",
                    Field::Int(u64::from(self.waiting_senders)),
                ),
                (
                    "waiting_receivers",
                    Field::Int(u64::from(self.waiting_receivers)),
                ),
            ],
            text: format!(
                "capacity {}, length {}, {}, {} senders and {} receivers waiting",
                self.capacity,
                self.length,
                if self.closed { "closed" } else { "open" },
                self.waiting_senders,
                self.waiting_receivers
            ),
        }
    }
}

/// The state of the channel at `hchan`.
pub(crate) fn chan_state(mem: &ProcMem, off: &HeapOffsets, hchan: u64) -> Option<ChannelState> {
    let at = |o: u32| mem.read_u64(hchan + u64::from(o));
    let queue = |o: u32| -> u32 {
        let mut n = 0;
        let mut s = at(o).unwrap_or(0);
        while s != 0 && (n as usize) < MAX_SUDOGS {
            n += 1;
            s = mem.read_u64(s + u64::from(off.sudog_next)).unwrap_or(0);
        }
        n
    };
    Some(ChannelState {
        length: at(off.hchan_qcount)?,
        capacity: at(off.hchan_dataqsiz)?,
        closed: at(off.hchan_closed)? as u32 != 0,
        waiting_senders: queue(off.hchan_sendq),
        waiting_receivers: queue(off.hchan_recvq),
    })
}

fn word(b: &[u8], o: u32) -> u64 {
    u64_at(b, o as usize).unwrap_or(0)
}
