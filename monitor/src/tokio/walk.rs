//! Finding a process's tokio runtimes and walking their task lists, from its memory, while it
//! runs. Everything read is the target's and may be torn, stale or hostile: every node is
//! checked (its vtable one of the program's, its owner the runtime's), every loop bounded.

use std::collections::{HashMap, HashSet};

use super::layout::{HEADER_BYTES, Header, Vtable};
use crate::proc::{ProcMem, u64_at};

/// Bytes of a runtime handle searched for its task list (found at +0x208 on 1.54).
const HANDLE_WINDOW: usize = 4096;
/// Task-list shards believed (tokio caps them at 65,536).
const MAX_SHARDS: u64 = 1 << 16;
/// Each shard: a mutex word, then the list's head and tail.
const SHARD_BYTES: u64 = 24;
const SHARD_HEAD: u64 = 8;
/// Tasks walked per process at most (about 40 bytes each are kept between scans); a longer
/// list is not judged.
pub(crate) const MAX_TASKS: usize = 1 << 20;
/// Bytes read from each task's header on: the header, scheduler, id and the start of the
/// future (whose bytes change when it makes progress).
pub(crate) const TASK_READ: usize = 128;
/// Anonymous memory searched for a live task per discovery at most.
const SEARCH_CHUNK: usize = 1 << 20;

/// One runtime's task list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Runtime {
    /// The `Arc` of the scheduler handle, as tasks point at it.
    pub handle: u64,
    /// `OwnedTasks.id`, also in every task header it owns.
    pub owner_id: u64,
    /// The shards: `Box<[Mutex<LinkedList>]>`.
    pub shards: u64,
    pub shard_count: u64,
}

/// A task as read by a walk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct TaskRec {
    pub addr: u64,
    pub header: Header,
    pub id: u64,
    /// Hash of the first bytes of its future.
    pub signature: u64,
}

/// What searching anonymous memory for live tasks found.
#[derive(Debug, Default)]
pub(crate) struct Discovery {
    pub runtimes: Vec<Runtime>,
    pub bytes_read: u64,
}

/// Searches `ranges` (anonymous writable memory), at most `budget` bytes, for task headers
/// (a word equal to a vtable's address at +16), and from their schedulers, the runtimes' task
/// lists.
pub(crate) fn discover(
    mem: &ProcMem,
    vtables: &HashMap<u64, Vtable>,
    ranges: &[(u64, u64)],
    budget: u64,
) -> Discovery {
    let mut found = Discovery::default();
    let mut schedulers: HashSet<(u64, u64)> = HashSet::new();
    let mut buf = vec![0u8; SEARCH_CHUNK];
    'search: for &(start, end) in ranges {
        let mut at = start;
        while at < end {
            if found.bytes_read >= budget {
                break 'search;
            }
            let len = (end - at).min(SEARCH_CHUNK as u64) as usize;
            let chunk = &mut buf[..len];
            found.bytes_read += len as u64;
            if mem.read(at, chunk) {
                for (i, w) in chunk.as_chunks::<8>().0.iter().enumerate() {
                    let word = u64::from_le_bytes(*w);
                    let Some(v) = vtables.get(&word) else {
                        continue;
                    };
                    let Some(header_addr) = (at + 8 * i as u64).checked_sub(16) else {
                        continue;
                    };
                    if let Some(s) = scheduler_of(mem, header_addr, v) {
                        schedulers.insert(s);
                    }
                }
            }
            at += len as u64;
        }
    }
    let mut seen = HashSet::new();
    for (handle, owner_id) in schedulers {
        if let Some(rt) = task_list(mem, vtables, handle, owner_id)
            && seen.insert((rt.shards, rt.owner_id))
        {
            found.runtimes.push(rt);
        }
    }
    found.runtimes.sort_by_key(|r| r.owner_id);
    found
}

/// (scheduler handle, owner id) of the task at `addr`, if it looks like a live owned task.
fn scheduler_of(mem: &ProcMem, addr: u64, v: &Vtable) -> Option<(u64, u64)> {
    let mut b = [0u8; HEADER_BYTES];
    if !mem.read(addr, &mut b) {
        return None;
    }
    let h = Header::parse(&b)?;
    if h.vtable != v.addr || !h.plausible() {
        return None;
    }
    let handle = mem.read_u64(addr + v.scheduler)?;
    (handle != 0 && handle % 8 == 0).then_some((handle, h.owner_id))
}

/// The task list in the scheduler handle at `handle` owning tasks of `owner_id`: the
/// `OwnedTasks` near a word equal to the id, with a boxed slice of a power-of-two number of
/// shards and the matching mask beside it; checked by reading the shards' heads.
fn task_list(
    mem: &ProcMem,
    vtables: &HashMap<u64, Vtable>,
    handle: u64,
    owner_id: u64,
) -> Option<Runtime> {
    let mut b = vec![0u8; HANDLE_WINDOW];
    if !mem.read(handle, &mut b) {
        // Near the end of a mapping: the first page at least.
        b.truncate(4096.min(HANDLE_WINDOW));
        if !mem.read(handle, &mut b) {
            return None;
        }
    }
    let words: Vec<u64> = (0..b.len() / 8).filter_map(|i| u64_at(&b, i * 8)).collect();
    for (i, _) in words.iter().enumerate().filter(|(_, w)| **w == owner_id) {
        let near = i.saturating_sub(6)..(i + 7).min(words.len());
        for j in near.clone() {
            let (ptr, len) = (words[j], words.get(j + 1).copied().unwrap_or(0));
            if ptr == 0 || ptr % 8 != 0 || !len.is_power_of_two() || len > MAX_SHARDS {
                continue;
            }
            if !near.clone().any(|k| k != j + 1 && words[k] == len - 1) {
                continue;
            }
            let rt = Runtime {
                handle,
                owner_id,
                shards: ptr,
                shard_count: len,
            };
            if heads_check(mem, vtables, &rt) {
                return Some(rt);
            }
        }
    }
    local_task_list(mem, vtables, handle, owner_id, &words)
}

/// A `LocalSet`'s task list (`LocalOwnedTasks` in its `Shared`, which its tasks name as
/// their scheduler): not sharded, one `LinkedList {head, tail}` of task headers beside the
/// id, whose ends are tasks it owns. Walked as a runtime of one shard whose head word is at
/// `shards + SHARD_HEAD`.
fn local_task_list(
    mem: &ProcMem,
    vtables: &HashMap<u64, Vtable>,
    handle: u64,
    owner_id: u64,
    words: &[u64],
) -> Option<Runtime> {
    let owned = |addr: u64| {
        let mut b = [0u8; HEADER_BYTES];
        addr != 0
            && addr.is_multiple_of(8)
            && mem.read(addr, &mut b)
            && Header::parse(&b)
                .is_some_and(|h| h.owner_id == owner_id && vtables.contains_key(&h.vtable))
    };
    for (i, _) in words.iter().enumerate().filter(|(_, w)| **w == owner_id) {
        for j in i.saturating_sub(4)..(i + 5).min(words.len()) {
            let (head, tail) = (words[j], words.get(j + 1).copied().unwrap_or(0));
            if j == i || !owned(head) || !owned(tail) {
                continue;
            }
            let rt = Runtime {
                handle,
                owner_id,
                shards: (handle + 8 * j as u64).checked_sub(SHARD_HEAD)?,
                shard_count: 1,
            };
            if heads_check(mem, vtables, &rt) {
                return Some(rt);
            }
        }
    }
    None
}

/// Whether `rt` still looks like a live runtime: its shard heads are empty or tasks it owns,
/// at least one of them not empty (a walk that failed on a live one raced with the program).
pub(crate) fn still_there(mem: &ProcMem, vtables: &HashMap<u64, Vtable>, rt: &Runtime) -> bool {
    heads_check(mem, vtables, rt)
}

fn heads_check(mem: &ProcMem, vtables: &HashMap<u64, Vtable>, rt: &Runtime) -> bool {
    let heads = shard_heads(mem, rt);
    let Some(heads) = heads else {
        return false;
    };
    let mut any = false;
    for head in heads.into_iter().filter(|h| *h != 0) {
        let mut b = [0u8; HEADER_BYTES];
        if !mem.read(head, &mut b) {
            return false;
        }
        match Header::parse(&b) {
            Some(h) if h.owner_id == rt.owner_id && vtables.contains_key(&h.vtable) => any = true,
            _ => return false,
        }
    }
    any
}

fn shard_heads(mem: &ProcMem, rt: &Runtime) -> Option<Vec<u64>> {
    let mut b = vec![0u8; (rt.shard_count * SHARD_BYTES) as usize];
    if !mem.read(rt.shards, &mut b) {
        return None;
    }
    Some(
        (0..rt.shard_count)
            .filter_map(|s| u64_at(&b, (s * SHARD_BYTES + SHARD_HEAD) as usize))
            .collect(),
    )
}

/// A walk of one runtime's tasks.
#[derive(Debug, Default)]
pub(crate) struct Walk {
    pub tasks: Vec<TaskRec>,
    /// Every shard was followed to its end through nodes that checked out. A walk that is not
    /// complete raced with the program (a task freed under it) or met something hostile.
    pub complete: bool,
    /// process_vm_readv calls made.
    pub reads: u64,
    /// Stopped at the task limit (not a race).
    pub capped: bool,
}

/// Walks every shard of `rt`, reading one node of each shard per batch, at most `max` tasks.
pub(crate) fn walk(
    mem: &ProcMem,
    vtables: &HashMap<u64, Vtable>,
    rt: &Runtime,
    max: usize,
) -> Walk {
    let mut out = Walk::default();
    let Some(heads) = shard_heads(mem, rt) else {
        return out;
    };
    // Per shard: the next node, and where its `next` link is (+0 or +8 in the trailer's
    // pointer pair, learnt from the head, whose `prev` is null).
    let mut cursors: Vec<(u64, Option<u64>)> = heads
        .into_iter()
        .filter(|h| *h != 0)
        .map(|h| (h, None))
        .collect();
    let mut complete = true;
    let mut buf = Vec::new();
    let mut links = Vec::new();
    while !cursors.is_empty() {
        if out.tasks.len() + cursors.len() > max {
            complete = false;
            out.capped = true;
            break;
        }
        let ranges: Vec<(u64, usize)> = cursors.iter().map(|(n, _)| (*n, TASK_READ)).collect();
        buf.resize(ranges.len() * TASK_READ, 0);
        let ok = mem.read_ranges(&ranges, &mut buf);
        out.reads += 1;
        // Headers checked; their trailers' links read next, in one batch.
        let mut live = Vec::with_capacity(cursors.len());
        for (k, &(node, next_at)) in cursors.iter().enumerate() {
            let b = &buf[k * TASK_READ..(k + 1) * TASK_READ];
            let task = ok[k]
                .then(|| Header::parse(b))
                .flatten()
                .filter(|h| h.owner_id == rt.owner_id && h.refs() > 0)
                .and_then(|h| Some((h, vtables.get(&h.vtable)?)));
            let Some((header, v)) = task else {
                complete = false;
                continue;
            };
            let id = u64_at(b, v.id as usize).unwrap_or(0);
            let future =
                &b[(v.id as usize + 8).min(TASK_READ)..(v.trailer as usize).min(TASK_READ)];
            out.tasks.push(TaskRec {
                addr: node,
                header,
                id,
                signature: fnv(future),
            });
            live.push((node + v.trailer, next_at));
        }
        let ranges: Vec<(u64, usize)> = live.iter().map(|(t, _)| (*t, 16)).collect();
        links.resize(ranges.len() * 16, 0);
        let ok = mem.read_ranges(&ranges, &mut links);
        out.reads += 1;
        cursors.clear();
        for (k, &(_, next_at)) in live.iter().enumerate() {
            if !ok[k] {
                complete = false;
                continue;
            }
            let (a, b) = (
                u64_at(&links, k * 16).unwrap_or(0),
                u64_at(&links, k * 16 + 8).unwrap_or(0),
            );
            let next_at = match next_at {
                Some(at) => at,
                // The head: its `prev` is null.
                None if a == 0 => 8,
                None if b == 0 => 0,
                None => {
                    complete = false;
                    continue;
                }
            };
            let next = if next_at == 8 { b } else { a };
            if next != 0 {
                cursors.push((next, Some(next_at)));
            }
        }
    }
    out.complete = complete;
    out
}

/// FNV-1a: a future's bytes, summed up.
pub(crate) fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    })
}
