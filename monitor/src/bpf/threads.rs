//! The thread probes: context switches (and the futex waits threads sleep in) of every
//! process on the host, thread creation and exit.

use std::collections::HashMap;

use aya::{Btf, maps::HashMap as BpfHashMap, programs::BtfTracePoint};
use monitor_ebpf::{FutexWait, ThreadState, names};

use super::{BpfError, Probes, ThreadMaps, map_err, program, take_map};

const BTF_TRACEPOINTS: [(&str, &str); 3] = [
    (names::SCHED_SWITCH, "sched_switch"),
    (names::THREAD_EXIT, "sched_process_exit"),
    (names::THREAD_FORK, "sched_process_fork"),
];

/// What the thread probes hold at one instant.
#[derive(Debug, Default)]
pub(crate) struct ThreadTables {
    /// Futex waits in flight, by thread id.
    pub waits: HashMap<u32, FutexWait>,
    /// Known threads, by thread id.
    pub threads: HashMap<u32, ThreadState>,
}

impl Probes {
    /// Starts tracing futex waits and context switches host-wide. Idempotent.
    pub(crate) fn attach_threads(&mut self) -> Result<(), BpfError> {
        if self.threads.is_some() {
            return Ok(());
        }
        let btf = Btf::from_sys_fs().map_err(|e| BpfError::Btf(Box::new(e)))?;
        for (name, function) in BTF_TRACEPOINTS {
            if name == names::THREAD_FORK && !self.fork_offset {
                // Threads are then recorded at their first switch, without a creation time.
                log::warn!(
                    "the kernel's BTF does not give task_struct's pid and tgid: thread \
                     creation is not traced (thread_leak growth is seen later)"
                );
                continue;
            }
            let program: &mut BtfTracePoint = program(&mut self.ebpf, name)?;
            program
                .load(function, &btf)
                .and_then(|()| program.attach().map(drop))
                .map_err(|source| BpfError::Program {
                    name,
                    source: Box::new(source),
                })?;
        }
        let waits = BpfHashMap::try_from(take_map(&mut self.ebpf, names::THREAD_WAITS)?)
            .map_err(map_err(names::THREAD_WAITS))?;
        let states = BpfHashMap::try_from(take_map(&mut self.ebpf, names::THREADS)?)
            .map_err(map_err(names::THREADS))?;
        self.threads = Some(ThreadMaps { waits, states });
        Ok(())
    }

    /// Everything the thread probes hold (empty before [`Probes::attach_threads`]).
    pub(crate) fn thread_tables(&self) -> ThreadTables {
        let Some(maps) = &self.threads else {
            return ThreadTables::default();
        };
        // Entries deleted under the walk come back as errors: skip them.
        ThreadTables {
            waits: maps.waits.iter().filter_map(Result::ok).collect(),
            threads: maps.states.iter().filter_map(Result::ok).collect(),
        }
    }

    /// Records what userspace found in /proc for a thread the probes have not seen yet: a wait
    /// that began before leakmon started, or a thread that has not left a CPU since.
    /// Never overwrites what a probe wrote meanwhile.
    pub(crate) fn seed_thread(&mut self, tid: u32, state: ThreadState, wait: Option<FutexWait>) {
        const BPF_NOEXIST: u64 = 1;
        let Some(maps) = &mut self.threads else {
            return;
        };
        let _ = maps.states.insert(&tid, &state, BPF_NOEXIST);
        if let Some(wait) = wait {
            let _ = maps.waits.insert(&tid, &wait, BPF_NOEXIST);
        }
    }

    /// Drops the records of a thread found gone (its exit was missed, e.g. a PID reused).
    pub(crate) fn forget_thread(&mut self, tid: u32) {
        if let Some(maps) = &mut self.threads {
            let _ = maps.states.remove(&tid);
            let _ = maps.waits.remove(&tid);
        }
    }

    /// Drops a wait record userspace found stale (the thread is no longer in that wait), if
    /// no probe has replaced it since.
    pub(crate) fn forget_wait(&mut self, tid: u32, seen: &FutexWait) {
        if let Some(maps) = &mut self.threads
            && maps.waits.get(&tid, 0).is_ok_and(|now| now == *seen)
        {
            let _ = maps.waits.remove(&tid);
        }
    }
}
