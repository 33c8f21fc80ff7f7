//! Grouping goroutines by where they come from and where they wait.

use std::{collections::BTreeMap, sync::Arc};

use serde::Serialize;

use super::{AlertKind, Observation, TaskState};

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

/// A stack, innermost frame first (shared by the goroutines parked at the same place).
pub type Stack = Arc<[Arc<Site>]>;

/// What a task waits on: the kind of object, its address, and for a channel its state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct WaitsOn {
    pub kind: &'static str,
    #[serde(serialize_with = "hex")]
    pub address: u64,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub channel: Option<ChannelState>,
    /// How many distinct objects the group waits on (one per goroutine for a channel each).
    pub objects: u64,
}

fn hex<S: serde::Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{v:#x}"))
}

/// A channel's state as read from its `hchan`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ChannelState {
    pub capacity: u64,
    pub length: u64,
    pub closed: bool,
    pub waiting_senders: u32,
    pub waiting_receivers: u32,
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
    /// Each member: (goid, start of its wait), and whether it is proven leaked.
    pub ids: Vec<(u64, u64, bool)>,
    /// What the first member waits on, and its stack.
    pub waits_on: Option<Arc<WaitsOn>>,
    pub stack: Option<Stack>,
    /// Distinct wait objects.
    pub objects: std::collections::BTreeSet<u64>,
    /// Threads the members block (tokio polls), a few.
    pub threads: Vec<Arc<super::ThreadReport>>,
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
        let m = groups.entry(key).or_default();
        add(m, *since_ns);
        m.ids.push((g.goid, *since_ns, g.proven));
        if let Some(w) = &g.waits_on {
            m.objects.insert(w.address);
            if m.waits_on.is_none() {
                m.waits_on = Some(Arc::clone(w));
            }
        }
        if m.stack.is_none() {
            m.stack.clone_from(&g.stack);
        }
    }
    groups
}

/// Tasks that have run without parking past what `judge` (given how many times each was put
/// on a CPU) says, and were on a CPU within `recent_ns`, grouped, with the kind `judge` gave.
pub fn running_groups(
    goroutines: &[Observation],
    now_ns: u64,
    judge: impl Fn(u32) -> Option<(AlertKind, u64)>,
    recent_ns: u64,
) -> BTreeMap<GroupKey, (AlertKind, Members)> {
    let mut groups: BTreeMap<GroupKey, (AlertKind, Members)> = BTreeMap::new();
    for g in goroutines {
        let TaskState::Running {
            since_ns,
            runs,
            last_run_ns,
        } = g.state
        else {
            continue;
        };
        let Some((kind, min_age_ns)) = judge(runs) else {
            continue;
        };
        if now_ns.saturating_sub(since_ns) < min_age_ns
            || now_ns.saturating_sub(last_run_ns) > recent_ns
        {
            continue;
        }
        let key = GroupKey {
            created_at: g.created_at.clone(),
            entry: g.entry.clone(),
            blocked_at: g.thread.as_ref().and_then(|t| t.blocked_at.clone()),
            wait_reason: None,
        };
        // A key holds one kind: the first member's (a poll blocking and a spin at one place
        // at once are one group).
        let (_, m) = groups
            .entry(key)
            .or_insert_with(|| (kind, Members::default()));
        add(m, since_ns);
        if m.stack.is_none() {
            m.stack.clone_from(&g.stack);
        }
        if let Some(t) = &g.thread
            && m.threads.len() < MAX_THREADS
        {
            m.threads.push(Arc::clone(t));
        }
    }
    groups
}

/// Threads listed per group at most.
const MAX_THREADS: usize = 16;

fn add(members: &mut Members, since_ns: u64) {
    if members.count == 0 || since_ns < members.oldest_since_ns {
        members.oldest_since_ns = since_ns;
    }
    members.count += 1;
}
