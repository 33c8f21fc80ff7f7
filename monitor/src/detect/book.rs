//! The alert book: one lifecycle for every kind of alert. Detectors say, at each scan, which
//! alerts hold now (keyed by what they are about); the book turns that into transitions:
//! `firing` once, `changed` when the same group turns into another kind, `updated` at a
//! bounded rate while count, age or growth move, and `resolved` only when the detector no
//! longer lists it. Each alert keeps a stable id for its whole life.

use std::{
    collections::{BTreeMap, HashMap},
    fmt::Debug,
    sync::Arc,
    time::Duration,
};

use serde::Serialize;

use super::{
    AlertKind, Proof,
    groups::{GroupKey, Stack, ThreadReport, WaitsOn},
    nanos,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum AlertState {
    Firing,
    /// Still firing; its count, age or growth moved.
    Updated,
    /// Still firing, as another kind (`Transition::previous` says which).
    Changed,
    Resolved,
}

/// An alert's content at a transition.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Alert {
    pub kind: &'static AlertKind,
    pub group: GroupKey,
    pub count: u64,
    pub oldest_seconds: f64,
    /// Net growth per minute over the leak window (None until the window is covered).
    pub growth_per_minute: Option<f64>,
    /// How the leak is known (e.g. nothing live can reach what the tasks wait on); `None` when
    /// judged by growth or by age.
    pub proof: Option<&'static Proof>,
    /// Members proven leaked.
    pub proven: u64,
    /// How the analysis behind `proof` read the program's memory: which parts by the
    /// runtime's own pointer maps, which whole ("conservatively").
    pub marking: Option<Arc<str>>,
    /// What the group waits on.
    pub waits_on: Option<Arc<WaitsOn>>,
    /// The full stack of one member, innermost first.
    pub stack: Option<Stack>,
    /// Thread alerts: the threads involved (at most a few; `count` has the total).
    pub threads: Vec<ThreadReport>,
    /// What to do.
    pub hint: &'static str,
}

impl Alert {
    /// An alert of `kind` about one `chan send` group of `main.worker`, 10 s old.
    #[cfg(test)]
    pub(crate) fn example(kind: &'static AlertKind) -> Self {
        Self {
            kind,
            group: GroupKey {
                created_at: None,
                entry: "main.worker".into(),
                blocked_at: None,
                wait_reason: Some("chan send".into()),
            },
            count: 1,
            oldest_seconds: 10.0,
            growth_per_minute: None,
            proof: None,
            proven: 0,
            marking: None,
            waits_on: None,
            stack: None,
            threads: Vec::new(),
            hint: kind.hint,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Transition {
    /// Stable for the alert's life (and its group's).
    pub id: Arc<str>,
    pub state: AlertState,
    /// For `Changed`: the kind it was.
    pub previous: Option<&'static AlertKind>,
    pub alert: Alert,
}

#[derive(Debug)]
struct Entry {
    id: Arc<str>,
    alert: Alert,
    /// When the last transition was emitted, and with what content.
    emitted_ns: u64,
    emitted: Alert,
}

/// Firing alerts per process, keyed by `K` (what the alert is about: a goroutine group, a
/// lock cycle, ...).
#[derive(Debug)]
pub(crate) struct AlertBook<K> {
    processes: HashMap<u32, BTreeMap<K, Entry>>,
    /// Least time between two `updated` transitions of one alert.
    update_every: Duration,
}

impl<K: Ord + Clone + Debug> AlertBook<K> {
    pub(crate) fn new(update_every: Duration) -> Self {
        Self {
            processes: HashMap::new(),
            update_every,
        }
    }

    /// What holds for `pid` at `now_ns` (every alert, firing or not yet): returns the
    /// transitions to report.
    pub(crate) fn settle(
        &mut self,
        pid: u32,
        now_ns: u64,
        holds: Vec<(K, Alert)>,
    ) -> Vec<Transition> {
        let book = self.processes.entry(pid).or_default();
        let mut holds: BTreeMap<K, Alert> = holds.into_iter().collect();
        let mut out = Vec::new();
        let every = nanos(self.update_every);
        book.retain(|key, entry| {
            let Some(alert) = holds.remove(key) else {
                let mut alert = entry.alert.clone();
                alert.count = 0;
                out.push(Transition {
                    id: Arc::clone(&entry.id),
                    state: AlertState::Resolved,
                    previous: None,
                    alert,
                });
                return false;
            };
            let previous = entry.alert.kind;
            entry.alert = alert;
            if previous != entry.alert.kind {
                out.push(entry.emit(now_ns, AlertState::Changed, Some(previous)));
            } else if moved(&entry.emitted, &entry.alert)
                && now_ns.saturating_sub(entry.emitted_ns) >= every
            {
                out.push(entry.emit(now_ns, AlertState::Updated, None));
            }
            true
        });
        for (key, alert) in holds {
            let mut entry = Entry {
                id: stable_id(pid, &key, alert.kind),
                emitted: alert.clone(),
                alert,
                emitted_ns: now_ns,
            };
            out.push(entry.emit(now_ns, AlertState::Firing, None));
            book.insert(key, entry);
        }
        if book.is_empty() {
            self.processes.remove(&pid);
        }
        out
    }

    /// The process is gone: everything it had firing resolves.
    pub(crate) fn forget(&mut self, pid: u32) -> Vec<Transition> {
        self.processes
            .remove(&pid)
            .into_iter()
            .flat_map(BTreeMap::into_values)
            .map(|entry| {
                let mut alert = entry.alert;
                alert.count = 0;
                Transition {
                    id: entry.id,
                    state: AlertState::Resolved,
                    previous: None,
                    alert,
                }
            })
            .collect()
    }

    /// Every alert firing now, with its process, as of the last scan.
    pub(crate) fn firing(&self) -> impl Iterator<Item = (u32, &Alert)> {
        self.processes
            .iter()
            .flat_map(|(pid, book)| book.values().map(move |e| (*pid, &e.alert)))
    }

    /// The kind firing for `key` in `pid`, if any.
    pub(crate) fn kind(&self, pid: u32, key: &K) -> Option<&'static AlertKind> {
        self.processes.get(&pid)?.get(key).map(|e| e.alert.kind)
    }
}

impl Entry {
    fn emit(
        &mut self,
        now_ns: u64,
        state: AlertState,
        previous: Option<&'static AlertKind>,
    ) -> Transition {
        self.emitted_ns = now_ns;
        self.emitted = self.alert.clone();
        Transition {
            id: Arc::clone(&self.id),
            state,
            previous,
            alert: self.alert.clone(),
        }
    }
}

/// Whether an alert's figures moved enough since it was last emitted to say so: its count,
/// its growth rate, or its age by more than a fifth.
fn moved(before: &Alert, now: &Alert) -> bool {
    before.count != now.count
        || before.proven != now.proven
        || before.growth_per_minute.map(f64::round) != now.growth_per_minute.map(f64::round)
        || now.oldest_seconds > before.oldest_seconds * 1.2 + 1.0
}

/// A stable id: the same process, group and kind family get the same id (FNV-1a, which does
/// not change between builds).
fn stable_id<K: Debug>(pid: u32, key: &K, kind: &AlertKind) -> Arc<str> {
    let family = if kind.is_thread() { "thread" } else { "task" };
    let text = format!("{pid}/{family}/{key:?}");
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    Arc::from(format!("{h:016x}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::testing::{LEAK, STUCK};

    const S: u64 = 1_000_000_000;

    fn alert(kind: &'static AlertKind, count: u64) -> Alert {
        Alert {
            count,
            ..Alert::example(kind)
        }
    }

    fn states(t: &[Transition]) -> Vec<(AlertState, &'static AlertKind, u64)> {
        t.iter()
            .map(|t| (t.state, t.alert.kind, t.alert.count))
            .collect()
    }

    #[test]
    fn lifecycle_fire_update_change_resolve() {
        let mut book = AlertBook::new(Duration::from_secs(10));
        let stuck = &STUCK;
        let leak = &LEAK;
        let t = book.settle(1, 0, vec![("g", alert(stuck, 3))]);
        assert_eq!(states(&t), [(AlertState::Firing, stuck, 3)]);
        let id = Arc::clone(&t[0].id);
        // Same content: nothing. A new count within the update interval: nothing yet.
        assert!(book.settle(1, S, vec![("g", alert(stuck, 3))]).is_empty());
        assert!(
            book.settle(1, 2 * S, vec![("g", alert(stuck, 4))])
                .is_empty()
        );
        let t = book.settle(1, 11 * S, vec![("g", alert(stuck, 5))]);
        assert_eq!(states(&t), [(AlertState::Updated, stuck, 5)]);
        // A change of kind is one transition naming the previous kind, never a resolution.
        let t = book.settle(1, 12 * S, vec![("g", alert(leak, 9))]);
        assert_eq!(states(&t), [(AlertState::Changed, leak, 9)]);
        assert_eq!(t[0].previous, Some(stuck));
        assert_eq!(t[0].id, id);
        assert_eq!(book.kind(1, &"g"), Some(leak));
        assert_eq!(book.firing().count(), 1);
        let t = book.settle(1, 13 * S, vec![]);
        assert_eq!(states(&t), [(AlertState::Resolved, leak, 0)]);
        assert_eq!(t[0].id, id);
        assert_eq!(book.firing().count(), 0);
        // The same group firing again later gets the same id.
        let t = book.settle(1, 20 * S, vec![("g", alert(leak, 1))]);
        assert_eq!(t[0].id, id);
        let t = book.forget(1);
        assert_eq!(states(&t), [(AlertState::Resolved, leak, 0)]);
        assert!(book.forget(1).is_empty());
    }
}
