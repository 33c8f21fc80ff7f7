//! Every goroutine of the process now, for `leakmon dump`: read from the goroutine table as
//! scans read it (no pause), with stacks, creators, wait times and what channel waits wait on.

use std::{collections::HashMap, sync::Arc};

use super::{MAX_GS, MAX_STATE_READS, Park, READ_CHUNK, Target, TargetError};
use crate::{
    detect::{GroupKey, ObjectState, Site, WaitsOn},
    dump::{Creator, Frame, Task},
    go::{
        task::{self, GRecord},
        waits::{self, WaitClass},
    },
};

const GOEXIT: &str = "runtime.goexit";

/// A stack's frames, and where alerts say its goroutines block.
type StackSeen = (Arc<[Frame]>, Option<Arc<Site>>);

impl Target {
    /// Every goroutine but the runtime's own (as Go's own dumps and profiles leave them out).
    pub(super) fn dump_goroutines(
        &mut self,
        now_ns: u64,
        limit: usize,
        notes: &mut Vec<String>,
    ) -> Result<Vec<Task>, TargetError> {
        let allgs = self.scan.ok_or(TargetError::NoTable)?;
        let gs = task::all_gs(&self.mem, allgs.wrapping_add(self.bias), MAX_GS);
        let mut out = Vec::new();
        // Each distinct stack once: its frames, and where alerts say its goroutines block.
        let mut stacks: HashMap<Vec<u64>, StackSeen> = HashMap::new();
        let mut states = HashMap::new();
        // The `go` statement each creation PC is (a leak's goroutines share one).
        let mut creators: HashMap<u64, Option<Frame>> = HashMap::new();
        let (mut running, mut left_out) = (0u64, 0u64);
        let empty: Arc<[Frame]> = Arc::from([]);
        for chunk in gs.chunks(READ_CHUNK) {
            let records = task::read_gs(&self.mem, chunk, &self.binary.offsets);
            for (addr, rec) in chunk.iter().zip(records) {
                let Some(rec) = rec else { continue };
                let Some(state) = task::state_name(rec.status) else {
                    continue;
                };
                if self.is_system(rec.startpc) {
                    continue;
                }
                if out.len() >= limit {
                    left_out += 1;
                    continue;
                }
                let waiting = matches!(rec.status, task::G_WAITING | task::G_LEAKED);
                // A running goroutine's saved registers are stale: its stack cannot be read
                // without stopping it.
                let (stack, blocked_at) = if rec.status == task::G_RUNNING {
                    running += 1;
                    (Arc::clone(&empty), None)
                } else {
                    let pcs = task::stack(&self.mem, &rec);
                    match stacks.get(&pcs) {
                        Some(s) => s.clone(),
                        None => {
                            let frames: Arc<[Frame]> = self.dump_frames(&pcs).into();
                            let site = self
                                .pick_site(&self.frames_at(pcs.iter().copied()))
                                .map(|s| self.interned.site(s));
                            stacks.insert(pcs, (Arc::clone(&frames), site.clone()));
                            (frames, site)
                        }
                    }
                };
                let creator = match creators.get(&rec.gopc) {
                    Some(c) => c.clone(),
                    None => {
                        let c = self.dump_frames(&[rec.gopc]).into_iter().next();
                        creators.insert(rec.gopc, c.clone());
                        c
                    }
                };
                let waits_on = if waiting {
                    self.dump_waits(*addr, &rec, &mut states)
                } else {
                    None
                };
                let wait_reason =
                    waiting.then(|| self.interned.name(self.binary.wait_reason(rec.waitreason)));
                let entry = self.entry(rec.startpc);
                let group = wait_reason.as_ref().map(|r| GroupKey {
                    created_at: self.creation_site(rec.gopc),
                    entry: Arc::clone(&entry),
                    blocked_at,
                    wait_reason: Some(Arc::clone(r)),
                });
                out.push(Task {
                    id: rec.goid,
                    state,
                    wait_reason,
                    waiting_ns: waiting.then(|| self.waited(&rec, now_ns)).flatten(),
                    entry,
                    stack,
                    // Go names no creator for the main goroutine, which the runtime starts.
                    created_by: (rec.goid != 1).then_some(Creator {
                        task: (rec.parent_goid != 0).then_some(rec.parent_goid),
                        frame: creator,
                    }),
                    waits_on,
                    verdict: None,
                    proven: false,
                    waker: None,
                    group,
                    thread: None,
                });
            }
        }
        if running > 0 {
            notes.push(format!(
                "{running} running goroutines are listed without their stacks (they cannot be \
                 read without stopping them)"
            ));
        }
        if left_out > 0 {
            notes.push(format!(
                "{left_out} more goroutines are not listed: this dump lists at most {limit}"
            ));
        }
        Ok(out)
    }

    /// How long a parked goroutine has waited, at least: since the first scan that saw this
    /// park, or since the GC first scanned it parked (`g.waitsince`, what Go's own dumps
    /// print as minutes), whichever says longer.
    fn waited(&self, rec: &GRecord, now_ns: u64) -> Option<u64> {
        let scanned = self
            .parks
            .get(&rec.goid)
            .filter(|p| p.signature == Park::signature(rec))
            .map(|p| now_ns.saturating_sub(p.since_ns));
        let since = u64::try_from(rec.waitsince).unwrap_or(0);
        let gc = (since > 0 && since <= now_ns).then(|| now_ns - since);
        scanned.max(gc)
    }

    /// What a parked goroutine waits on: as the scans found it, else (channels, which need
    /// no heap) read now.
    fn dump_waits(
        &self,
        g: u64,
        rec: &GRecord,
        states: &mut HashMap<u64, Option<Arc<ObjectState>>>,
    ) -> Option<Arc<WaitsOn>> {
        let objects = match self.waits_of(rec.goid) {
            Some(w) => w.to_vec(),
            None => {
                let class = WaitClass::of(self.binary.wait_reason(rec.waitreason))?;
                if class != WaitClass::Channel {
                    return None;
                }
                waits::wait_objects(&self.mem, &self.binary.heap, class, g, rec.waiting, None)
            }
        };
        let first = objects.first()?;
        let state = self.wait_state(first, states, MAX_STATE_READS * 64);
        Some(Arc::new(WaitsOn {
            kind: first.kind.as_str(),
            address: first.addr,
            state,
            objects: objects.len() as u64,
        }))
    }

    /// The frames at return addresses `pcs` (innermost first, inlined calls expanded), each
    /// with the process's address and its offset in its function. As in Go's own tracebacks
    /// and profiles, autogenerated wrappers are left out, and the stack ends before
    /// `runtime.goexit`, where every goroutine returns.
    fn dump_frames(&mut self, pcs: &[u64]) -> Vec<Frame> {
        let mut out = Vec::new();
        for &pc in pcs {
            let at = pc.wrapping_sub(self.bias);
            let frames = self.binary.frames(at.wrapping_sub(1));
            if frames.first().is_some_and(|f| f.function == GOEXIT) {
                break;
            }
            let (offset, wrapper) = match self.binary.func_entry(at.wrapping_sub(1)) {
                Some((entry, wrapper)) => (at.checked_sub(entry), wrapper),
                None => (None, false),
            };
            let last = frames.len().saturating_sub(1);
            let first = out.len();
            for (i, f) in frames.into_iter().enumerate() {
                if i == last && wrapper {
                    // The wrapper's place goes to what was inlined into it, if anything.
                    if let Some(f) = out.get_mut(first..).and_then(<[Frame]>::last_mut) {
                        f.inlined = false;
                    }
                    break;
                }
                out.push(Frame {
                    function: self.interned.name(&f.function),
                    file: self.interned.name(&f.file),
                    line: f.line,
                    pc,
                    offset: if i == last { offset } else { None },
                    inlined: i != last,
                });
            }
        }
        out
    }
}
