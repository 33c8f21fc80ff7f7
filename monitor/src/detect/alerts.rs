//! Alert state per process: which alerts fire, and the transitions to report.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::Arc,
};

use super::{
    Snapshot,
    book::{Alert, AlertBook, Transition},
    groups::{GroupKey, WaitsOn, blocked_groups, running_groups},
    rules::{History, Thresholds, WaitClass, nanos},
};

/// What the detector remembers of a blocked group between scans.
#[derive(Debug, Default)]
struct GroupState {
    history: History,
    /// Members at the last scan: task id -> start of its wait.
    members: HashMap<u64, u64>,
    /// When members left (woke, or parked again elsewhere) within the leak window: a group
    /// whose members come and go is a pool, not a leak.
    departures: VecDeque<u64>,
    /// Members judged leaked: the leak holds while any of them is still parked here.
    leaked: HashSet<u64>,
}

#[derive(Debug, Default)]
struct ProcessState {
    groups: HashMap<GroupKey, GroupState>,
}

/// Judges snapshots of each process against the thresholds.
#[derive(Debug)]
pub(crate) struct Detector {
    thresholds: Thresholds,
    processes: HashMap<u32, ProcessState>,
    book: AlertBook<GroupKey>,
}

impl Detector {
    pub(crate) fn new(thresholds: Thresholds) -> Self {
        Self {
            thresholds,
            processes: HashMap::new(),
            book: AlertBook::new(thresholds.update_interval),
        }
    }

    /// Takes one snapshot of `pid` and returns the alerts that started, changed or ended.
    pub(crate) fn observe(&mut self, pid: u32, snapshot: &Snapshot) -> Vec<Transition> {
        let t = self.thresholds;
        let now = snapshot.now_ns;
        let window = nanos(t.leak_window);
        let policy = snapshot.policy;
        let state = self.processes.entry(pid).or_default();

        // What the snapshot holds is due for judging (`Due`): no threshold is applied again.
        let blocked = blocked_groups(&snapshot.tasks);
        let running = running_groups(
            &snapshot.tasks,
            now,
            |runs| policy.running(&t, runs).map(|(kind, _)| kind),
            nanos(t.scan_interval).max(1_000_000_000) * 2,
        );

        // Every group with history gets a sample, 0 when it emptied, so growth and release
        // are both seen; members that left are departures.
        for (key, group) in state.groups.iter_mut() {
            let now_members: HashMap<u64, u64> = blocked
                .get(key)
                .map(|m| m.ids.iter().map(|(g, since, _)| (*g, *since)).collect())
                .unwrap_or_default();
            let left = group
                .members
                .iter()
                .filter(|(g, since)| now_members.get(g) != Some(since))
                .count();
            group.departures.extend(std::iter::repeat_n(now, left));
            while group
                .departures
                .front()
                .is_some_and(|d| now.saturating_sub(*d) > window)
            {
                group.departures.pop_front();
            }
            group.leaked.retain(|g| now_members.contains_key(g));
            group.members = now_members;
            if !blocked.contains_key(key) {
                group.history.push(now, 0, t.leak_window);
            }
        }
        for (key, members) in &blocked {
            let group = state.groups.entry(key.clone()).or_default();
            group.history.push(now, members.count, t.leak_window);
            if group.members.is_empty() {
                group.members = members.ids.iter().map(|(g, s, _)| (*g, *s)).collect();
            }
        }

        let mut holds: Vec<(GroupKey, Alert)> = Vec::new();
        for (key, members) in &blocked {
            let reason = key.wait_reason.as_deref().unwrap_or_default();
            if !policy.may_find(&key.entry, reason) {
                continue;
            }
            let class = policy.classify(reason);
            let Some(group) = state.groups.get_mut(key) else {
                continue;
            };
            let proven = members.ids.iter().filter(|(_, _, p)| *p).count() as u64;
            // A leak is a set that only grows: new members keep joining while the ones
            // already parked stay (none left within the window).
            let grows = class == WaitClass::Idle
                && group.departures.is_empty()
                && group
                    .history
                    .keeps_growing(now, t.leak_window, t.leak_min_growth);
            // Judged leaking now, or still leaking while tasks judged leaked remain: those
            // joining the same place since are counted with them.
            if grows || proven > 0 || !group.leaked.is_empty() {
                group.leaked.extend(members.ids.iter().map(|(g, _, _)| *g));
            }
            let Some(finding) = policy.finding(reason, !group.leaked.is_empty()) else {
                continue;
            };
            let kind = policy.kind(finding);
            // What nothing can ever wake needs no analysis to be proven.
            let (proof, proven, marking) = if let Some(proof) = policy.never_woken(reason) {
                (Some(proof), members.count, None)
            } else {
                let proof = policy.proof().filter(|_| proven > 0);
                (proof, proven, proof.and(snapshot.marking.clone()))
            };
            let growth_per_minute = group
                .history
                .growth(now, t.leak_window)
                .map(|g| g as f64 * 60.0 / t.leak_window.as_secs_f64().max(1e-9));
            let waits_on = members.waits_on.as_ref().map(|w| {
                let mut w = WaitsOn::clone(w);
                w.objects = members.objects.len() as u64;
                Arc::new(w)
            });
            holds.push((
                key.clone(),
                Alert {
                    kind,
                    group: key.clone(),
                    count: members.count,
                    oldest_seconds: now.saturating_sub(members.oldest_since_ns) as f64 / 1e9,
                    growth_per_minute,
                    proof,
                    proven,
                    marking,
                    waits_on,
                    stack: members.stack.clone(),
                    threads: Vec::new(),
                    hint: policy.hint(kind, Some(reason)),
                },
            ));
        }
        for (key, (kind, members)) in &running {
            if !policy.is_runtime_task(&key.entry) {
                holds.push((
                    key.clone(),
                    Alert {
                        kind,
                        group: key.clone(),
                        count: members.count,
                        oldest_seconds: now.saturating_sub(members.oldest_since_ns) as f64 / 1e9,
                        growth_per_minute: None,
                        proof: None,
                        proven: 0,
                        marking: None,
                        waits_on: None,
                        stack: members.stack.clone(),
                        threads: members.threads.iter().map(|t| (**t).clone()).collect(),
                        hint: policy.hint(kind, None),
                    },
                ));
            }
        }

        // Forget groups that have been empty for a whole window and fire nothing.
        let book = &self.book;
        state.groups.retain(|key, g| {
            book.kind(pid, key).is_some() || !g.history.is_idle() || !g.members.is_empty()
        });
        self.book.settle(pid, now, holds)
    }

    /// Every alert firing now, with its process, as of the last scan.
    pub(crate) fn firing(&self) -> impl Iterator<Item = (u32, &Alert)> {
        self.book.firing()
    }

    /// The process is gone: resolve its alerts and drop its state.
    pub(crate) fn forget(&mut self, pid: u32) -> Vec<Transition> {
        self.processes.remove(&pid);
        self.book.forget(pid)
    }
}
