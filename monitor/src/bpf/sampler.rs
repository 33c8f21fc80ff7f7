//! Sampling a few threads' user registers on demand (`poll_sample`): what a thread that is
//! on a CPU is running, which /proc cannot say without stopping it. Used from scan workers;
//! nothing is attached while no session is open.

use std::{
    collections::HashMap,
    os::fd::{AsFd, OwnedFd},
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use aya::{
    maps::{HashMap as BpfHashMap, MapData},
    programs::PerfEvent,
};
use monitor_ebpf::{GPRS, RegSamples, SAMPLE_RING, names};

use super::{BpfError, Probes, map_err, program, take_map};
use crate::sys::perf;

/// Sampling period, in CPU time of the sampled thread.
const PERIOD: Duration = Duration::from_micros(500);

/// User registers at one sample.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Regs {
    pub ip: u64,
    pub sp: u64,
    pub bp: u64,
}

/// The loaded sampler program and its map, shared by the workers.
pub(crate) struct Sampler {
    program: OwnedFd,
    samples: Mutex<BpfHashMap<MapData, u32, RegSamples>>,
}

impl std::fmt::Debug for Sampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sampler").finish_non_exhaustive()
    }
}

/// Threads being sampled: their perf events close, and their slots go, on drop.
pub(crate) struct Session<'a> {
    sampler: &'a Sampler,
    events: Vec<(u32, OwnedFd)>,
}

impl Sampler {
    /// Starts sampling `tids` (those already sampled by another session, or over the map's
    /// capacity, are left out; a thread gone meanwhile too).
    pub(crate) fn start(&self, tids: &[u32]) -> Session<'_> {
        let mut events = Vec::new();
        let mut map = self.samples.lock().unwrap_or_else(PoisonError::into_inner);
        for &tid in tids {
            if map.get(&tid, 0).is_ok() || map.insert(&tid, &RegSamples::default(), 1).is_err() {
                continue;
            }
            match perf::sample_with(tid, PERIOD.as_nanos() as u64, self.program.as_fd()) {
                Ok(fd) => events.push((tid, fd)),
                Err(e) => {
                    log::debug!("sampling thread {tid}: {e}");
                    let _ = map.remove(&tid);
                }
            }
        }
        Session {
            sampler: self,
            events,
        }
    }
}

impl Session<'_> {
    /// The samples taken so far of each thread, oldest first (at most the last
    /// `SAMPLE_RING`).
    pub(crate) fn read(&self) -> HashMap<u32, Vec<Regs>> {
        let map = self
            .sampler
            .samples
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut out = HashMap::new();
        for (tid, _) in &self.events {
            let Ok(s) = map.get(tid, 0) else {
                continue;
            };
            let n = s.n as usize;
            let kept = n.min(SAMPLE_RING);
            let regs: Vec<Regs> = (n - kept..n)
                .map(|i| {
                    let i = i & (SAMPLE_RING - 1);
                    Regs {
                        ip: s.ip[i],
                        sp: s.sp[i],
                        bp: s.bp[i],
                    }
                })
                .collect();
            if !regs.is_empty() {
                out.insert(*tid, regs);
            }
        }
        out
    }

    /// Every general-purpose register of each sampled thread at its latest sample (threads
    /// never sampled, being off the CPU throughout, are absent).
    pub(crate) fn registers(&self) -> HashMap<u32, [u64; GPRS]> {
        let map = self
            .sampler
            .samples
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        self.events
            .iter()
            .filter_map(|(tid, _)| {
                let s = map.get(tid, 0).ok()?;
                (s.n > 0).then_some((*tid, s.gprs))
            })
            .collect()
    }

    /// Whether any thread is sampled at all.
    pub(crate) fn is_empty(&self) -> bool {
        self.events.is_empty()
    }
}

impl Drop for Session<'_> {
    fn drop(&mut self) {
        let mut map = self
            .sampler
            .samples
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for (tid, fd) in self.events.drain(..) {
            drop(fd);
            let _ = map.remove(&tid);
        }
    }
}

impl Probes {
    /// Loads the sampler program (attached per thread by sessions).
    pub(super) fn load_sampler(ebpf: &mut aya::Ebpf) -> Result<Arc<Sampler>, BpfError> {
        let name = names::POLL_SAMPLE;
        let program: &mut PerfEvent = program(ebpf, name)?;
        let to_err = |source| BpfError::Program {
            name,
            source: Box::new(source),
        };
        program.load().map_err(to_err)?;
        let fd = program
            .fd()
            .map_err(to_err)?
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| to_err(aya::programs::ProgramError::IOError(e)))?;
        let samples = BpfHashMap::try_from(take_map(ebpf, names::SAMPLES)?)
            .map_err(map_err(names::SAMPLES))?;
        Ok(Arc::new(Sampler {
            program: fd,
            samples: Mutex::new(samples),
        }))
    }

    /// The sampler, for scans of processes whose threads may need sampling.
    pub(crate) fn sampler(&self) -> Arc<Sampler> {
        Arc::clone(&self.sampler)
    }
}
