//! Grouping tasks by where they come from and where they wait.

use std::{collections::BTreeMap, sync::Arc};

use serde::Serialize;

use super::{AlertKind, Observation, TaskState};

/// A source location: function, file and line.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub(crate) struct Site {
    pub function: String,
    pub file: String,
    pub line: u32,
}

impl std::fmt::Display for Site {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}:{})", self.function, self.file, self.line)
    }
}

/// A stack, innermost frame first (shared by the tasks parked at the same place).
pub(crate) type Stack = Arc<[Arc<Site>]>;

/// What a task waits on: the kind of object, its address, and what its runtime read of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct WaitsOn {
    pub kind: &'static str,
    pub address: u64,
    pub state: Option<Arc<ObjectState>>,
    /// How many distinct objects the group waits on (one per task for a channel each).
    pub objects: u64,
}

/// What a runtime read of an object waited on (a Go channel's capacity, length, waiters):
/// named fields, which JSON and OTLP flatten into `waits_on`, and a phrase for text alerts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ObjectState {
    pub fields: Vec<(&'static str, Field)>,
    /// "capacity 0, length 0, open, 1 senders and 0 receivers waiting"
    pub text: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Field {
    Int(u64),
    Bool(bool),
    Text(Arc<str>),
}

impl Serialize for WaitsOn {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap as _;
        let fields = self.state.as_ref().map_or(&[][..], |st| &st.fields[..]);
        let mut map = s.serialize_map(Some(3 + fields.len()))?;
        map.serialize_entry("kind", self.kind)?;
        map.serialize_entry("address", &format!("{:#x}", self.address))?;
        for (name, value) in fields {
            match value {
                Field::Int(v) => map.serialize_entry(name, v)?,
                Field::Bool(v) => map.serialize_entry(name, v)?,
                Field::Text(v) => map.serialize_entry(name, v.as_ref())?,
            }
        }
        map.serialize_entry("objects", &self.objects)?;
        map.end()
    }
}

/// One thread in an alert's `threads` list.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub(crate) struct ThreadReport {
    pub tid: u32,
    pub name: Arc<str>,
    /// The futex (lock) address, hex.
    pub waits_on: Option<String>,
    pub owner_tid: Option<u32>,
    pub waited_seconds: f64,
    /// First frame in the program's own code.
    pub blocked_at: Option<Arc<Site>>,
    /// Innermost first, "function (file:line)" or "function (library)".
    pub stack: Arc<[String]>,
    /// Of a thread computing: where it was sampled most, "function (file:line) NN%".
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    pub hot_frames: Arc<[String]>,
}

/// Tasks with the same key leak (or not) together: created at the same place, same entry
/// function, blocked at the same place for the same reason. `wait_reason` is `None` for
/// running tasks.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct GroupKey {
    pub created_at: Option<Arc<Site>>,
    pub entry: Arc<str>,
    pub blocked_at: Option<Arc<Site>>,
    pub wait_reason: Option<Arc<str>>,
}

/// Members of a group at one scan.
#[derive(Clone, Debug, Default)]
pub(crate) struct Members {
    pub count: u64,
    /// Start of the longest wait (or run) among them.
    pub oldest_since_ns: u64,
    /// Each member: (task id, start of its wait), and whether it is proven leaked.
    pub ids: Vec<(u64, u64, bool)>,
    /// What the first member waits on, and its stack.
    pub waits_on: Option<Arc<WaitsOn>>,
    pub stack: Option<Stack>,
    /// Distinct wait objects.
    pub objects: std::collections::BTreeSet<u64>,
    /// Threads the members block (tokio polls), a few.
    pub threads: Vec<Arc<ThreadReport>>,
}

/// Parked tasks, grouped.
pub(crate) fn blocked_groups(tasks: &[Observation]) -> BTreeMap<GroupKey, Members> {
    let mut groups: BTreeMap<GroupKey, Members> = BTreeMap::new();
    for g in tasks {
        let TaskState::Parked {
            since_ns,
            wait_reason,
            blocked_at,
        } = &g.state
        else {
            continue;
        };
        let key = GroupKey {
            created_at: g.created_at.clone(),
            entry: g.entry.clone(),
            blocked_at: blocked_at.clone(),
            wait_reason: Some(wait_reason.clone()),
        };
        let m = groups.entry(key).or_default();
        add(m, *since_ns);
        m.ids.push((g.id, *since_ns, g.proven));
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

/// Tasks that have run without parking, of the kind `judge` gives for how many times each was
/// put on a CPU, and on a CPU within `recent_ns`, grouped.
pub(crate) fn running_groups(
    tasks: &[Observation],
    now_ns: u64,
    judge: impl Fn(u32) -> Option<&'static AlertKind>,
    recent_ns: u64,
) -> BTreeMap<GroupKey, (&'static AlertKind, Members)> {
    let mut groups: BTreeMap<GroupKey, (&'static AlertKind, Members)> = BTreeMap::new();
    for g in tasks {
        let TaskState::Running {
            since_ns,
            runs,
            last_run_ns,
        } = g.state
        else {
            continue;
        };
        let Some(kind) = judge(runs) else {
            continue;
        };
        if now_ns.saturating_sub(last_run_ns) > recent_ns {
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
