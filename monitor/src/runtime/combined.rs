//! A process that runs one runtime twice or more: two builds of it (the executable's and a
//! loaded library's, or two libraries'), each read by a source of its own. Seen from the loop
//! as one source: one scan, one census, one dump. Each task stays attributed to its build: task
//! ids are made distinct per part (two builds count their ids from 1 each), and entries name
//! the part (`tokio_tasks::wait_for_reply [tokio 1.35.1, libplugin.so]`), so the same future
//! type in two builds is two groups.

use std::{collections::HashMap, sync::Arc};

use super::{Census, ProcessInfo, ScanInput, Scanned, TaskSource};
use crate::{
    bpf::{BpfError, Links, Probes},
    dump::task::Task,
};

/// Ids of part `k` are `id + k << PART_SHIFT`: runtimes' own ids stay far below (a tokio
/// task id counts spawns; a goroutine id too).
const PART_SHIFT: u32 = 48;

pub(crate) struct Combined {
    info: ProcessInfo,
    parts: Vec<Part>,
}

struct Part {
    source: Box<dyn TaskSource>,
    /// "tokio 1.35.1, libplugin.so"
    label: String,
    /// Entries as this part names them, renamed once.
    entries: HashMap<Arc<str>, Arc<str>>,
}

impl Part {
    fn entry(&mut self, entry: &Arc<str>) -> Arc<str> {
        if let Some(e) = self.entries.get(entry) {
            return Arc::clone(e);
        }
        let renamed: Arc<str> = format!("{entry} [{}]", self.label).into();
        // Bounded by the part's future types; cleared if a hostile program makes it grow.
        if self.entries.len() >= 65_536 {
            self.entries.clear();
        }
        self.entries.insert(Arc::clone(entry), Arc::clone(&renamed));
        renamed
    }
}

impl Combined {
    /// The sources of one process's builds of one runtime, each with the file it is in.
    pub(crate) fn new(parts: Vec<(Box<dyn TaskSource>, String)>) -> Self {
        let mut info = parts[0].0.process().clone();
        info.runtime_version = parts
            .iter()
            .map(|(s, _)| s.process().runtime_version.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        let parts = parts
            .into_iter()
            .map(|(source, file)| {
                let label = format!(
                    "{} {}, {file}",
                    source.process().runtime,
                    source.process().runtime_version
                );
                Part {
                    source,
                    label,
                    entries: HashMap::new(),
                }
            })
            .collect();
        Self { info, parts }
    }
}

fn part_id(k: usize, id: u64) -> u64 {
    id.wrapping_add((k as u64) << PART_SHIFT)
}

impl TaskSource for Combined {
    fn process(&self) -> &ProcessInfo {
        &self.info
    }

    fn start_time(&self) -> u64 {
        self.parts[0].source.start_time()
    }

    fn attach(&mut self, probes: &mut Probes) -> Result<Option<Links>, BpfError> {
        let mut links = None;
        for p in &mut self.parts {
            if let Some(l) = p.source.attach(probes)? {
                // One set of links per process: a runtime that probes is one build per
                // process (Go); kept from the first part that has any.
                if links.is_none() {
                    links = Some(l);
                } else {
                    probes.detach(l);
                }
            }
        }
        Ok(links)
    }

    /// Every part's scan, as one: not judged when any part is not (a partial list would
    /// look like tasks that left).
    fn scan(&mut self, input: ScanInput) -> Scanned {
        let ScanInput { due, mut records } = input;
        let mut tasks = Vec::new();
        let mut stale = crate::bpf::TaskRecords::new();
        let mut census: Option<Census> = None;
        let mut counted_all = true;
        let mut policy = None;
        let mut marking = None;
        for (k, p) in self.parts.iter_mut().enumerate() {
            let input = ScanInput {
                due,
                records: std::mem::take(&mut records),
            };
            match p.source.scan(input) {
                Scanned::Tasks {
                    tasks: part,
                    stale: s,
                    policy: pol,
                    census: c,
                    marking: m,
                } => {
                    policy.get_or_insert(pol);
                    marking = marking.or(m);
                    stale.extend(s);
                    for mut t in part {
                        t.id = part_id(k, t.id);
                        t.entry = p.entry(&t.entry);
                        tasks.push(t);
                    }
                    match (c, &mut census) {
                        (Some(c), Some(total)) => {
                            for ((state, reason), n) in c.counts {
                                total.add_n(state, &reason, n);
                            }
                        }
                        (Some(c), None) => census = Some(c),
                        (None, _) => counted_all = false,
                    }
                }
                other => return other,
            }
        }
        let Some(policy) = policy else {
            return Scanned::NotJudged;
        };
        Scanned::Tasks {
            tasks,
            stale,
            policy,
            census: census.filter(|_| counted_all),
            marking,
        }
    }

    fn dump(
        &mut self,
        now_ns: u64,
        limit: usize,
        notes: &mut Vec<String>,
    ) -> Result<Vec<Task>, super::RuntimeError> {
        let mut all = Vec::new();
        for (k, p) in self.parts.iter_mut().enumerate() {
            let left = limit.saturating_sub(all.len());
            for mut t in p.source.dump(now_ns, left, notes)? {
                t.id = part_id(k, t.id);
                t.entry = p.entry(&t.entry);
                all.push(t);
            }
        }
        // Each part says what its runtime cannot tell: once is enough.
        let mut said = std::collections::HashSet::new();
        notes.retain(|n| said.insert(n.clone()));
        Ok(all)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_keep_their_ids_apart() {
        assert_eq!(part_id(0, 7), 7);
        assert_ne!(part_id(1, 7), part_id(0, 7));
        assert_eq!(part_id(1, 7) & ((1 << PART_SHIFT) - 1), 7);
    }
}
