//! Grouping goroutines by where they come from and where they wait.

use std::{collections::BTreeMap, sync::Arc};

use serde::Serialize;

use super::{Observation, TaskState};

/// A source location: function, file and line.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Site {
    pub function: String,
    pub file: String,
    pub line: u32,
}

impl std::fmt::Display for Site {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}:{})", self.function, self.file, self.line)
    }
}

/// Goroutines with the same key leak (or not) together: same `go` statement, same entry
/// function, blocked at the same place for the same reason. `wait_reason` is `None` and
/// `blocked_at` is `None` for running goroutines.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GroupKey {
    pub created_at: Option<Arc<Site>>,
    pub entry: Arc<str>,
    pub blocked_at: Option<Arc<Site>>,
    pub wait_reason: Option<Arc<str>>,
}

/// Members of a group at one scan.
#[derive(Clone, Debug, Default)]
pub struct Members {
    pub count: u64,
    /// Start of the longest wait (or run) among them.
    pub oldest_since_ns: u64,
}

/// Parked goroutines blocked at least `min_age_ns`, grouped.
pub fn blocked_groups(
    goroutines: &[Observation],
    now_ns: u64,
    min_age_ns: u64,
) -> BTreeMap<GroupKey, Members> {
    let mut groups: BTreeMap<GroupKey, Members> = BTreeMap::new();
    for g in goroutines {
        let TaskState::Parked {
            since_ns,
            wait_reason,
            blocked_at,
        } = &g.state
        else {
            continue;
        };
        if now_ns.saturating_sub(*since_ns) < min_age_ns {
            continue;
        }
        let key = GroupKey {
            created_at: g.created_at.clone(),
            entry: g.entry.clone(),
            blocked_at: blocked_at.clone(),
            wait_reason: Some(wait_reason.clone()),
        };
        add(groups.entry(key).or_default(), *since_ns);
    }
    groups
}

/// Goroutines that have run without parking for at least `min_age_ns` and were on a CPU within
/// `recent_ns`, grouped.
pub fn running_groups(
    goroutines: &[Observation],
    now_ns: u64,
    min_age_ns: u64,
    recent_ns: u64,
) -> BTreeMap<GroupKey, Members> {
    let mut groups: BTreeMap<GroupKey, Members> = BTreeMap::new();
    for g in goroutines {
        let TaskState::Running {
            since_ns,
            runs,
            last_run_ns,
        } = g.state
        else {
            continue;
        };
        // One run is a goroutine sitting in a long system call; rescheduling after
        // preemption is what a loop that never blocks looks like.
        let spinning = runs >= 2
            && now_ns.saturating_sub(since_ns) >= min_age_ns
            && now_ns.saturating_sub(last_run_ns) <= recent_ns;
        if !spinning {
            continue;
        }
        let key = GroupKey {
            created_at: g.created_at.clone(),
            entry: g.entry.clone(),
            blocked_at: None,
            wait_reason: None,
        };
        add(groups.entry(key).or_default(), since_ns);
    }
    groups
}

fn add(members: &mut Members, since_ns: u64) {
    if members.count == 0 || since_ns < members.oldest_since_ns {
        members.oldest_since_ns = since_ns;
    }
    members.count += 1;
}
