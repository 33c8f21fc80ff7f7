//! Alert transitions as people read them, one paragraph each (`leakmon watch`'s default).

use std::io::{self, Write};

use super::sink::Sink;
use crate::{
    detect::{Alert, AlertState, Transition},
    runtime::ProcessInfo,
};

pub(crate) struct Text<W: Write> {
    out: W,
}

impl<W: Write> Text<W> {
    pub(crate) fn new(out: W) -> Self {
        Self { out }
    }
}

impl<W: Write> Sink for Text<W> {
    fn alert(&mut self, process: &ProcessInfo, t: &Transition) -> io::Result<()> {
        writeln!(self.out, "{}", text(process, t))?;
        self.out.flush()
    }
}

/// "FIRING goroutine_leak PID 41 (/srv/api, go1.24.11): 1204 goroutines created at ..."
fn text(p: &ProcessInfo, t: &Transition) -> String {
    let a: &Alert = &t.alert;
    let state = match t.state {
        AlertState::Firing => "FIRING",
        AlertState::Updated => "UPDATE",
        AlertState::Changed => "CHANGED",
        AlertState::Resolved => "RESOLVED",
    };
    let version = if p.runtime_version.is_empty() {
        p.runtime
    } else {
        &p.runtime_version
    };
    let mut s = format!(
        "{state} {} PID {} ({}, {version}",
        a.kind.name, p.pid, p.exe,
    );
    if let Some(pod) = &p.container.pod_name {
        s.push_str(&format!(", pod {pod}"));
    }
    s.push_str(&format!("): {} {}", a.count, a.kind.members));
    if let Some(c) = &a.group.created_at {
        s.push_str(&format!(" created at {c}"));
    }
    s.push_str(&format!(" in {}", a.group.entry));
    match (&a.group.blocked_at, &a.group.wait_reason) {
        (Some(b), Some(r)) => s.push_str(&format!(", blocked at {b} on {r}")),
        (None, Some(r)) => s.push_str(&format!(", blocked on {r}")),
        (Some(b), None) if a.kind.running_at => {
            s.push_str(&format!(", {} blocked at {b}", a.kind.running));
        }
        (_, None) => s.push_str(&format!(", {}", a.kind.running)),
    }
    s.push_str(&format!(" for {:.0}s", a.oldest_seconds));
    if let Some(g) = a.growth_per_minute.filter(|g| *g > 0.0) {
        s.push_str(&format!(", +{g:.0}/min"));
    }
    if let Some(previous) = t.previous {
        s.push_str(&format!(" (was {})", previous.name));
    }
    if let Some(proof) = a.proof {
        s.push_str(&format!("\n  proven: {}", proof.say(a.proven)));
        if let Some(m) = &a.marking {
            s.push_str(&format!(" (memory read: {m})"));
        }
    }
    if let Some(w) = &a.waits_on {
        s.push_str(&format!("\n  waits on {} {:#x}", w.kind, w.address));
        if let Some(state) = &w.state {
            s.push_str(&format!(" ({})", state.text));
        }
        if w.objects > 1 {
            s.push_str(&format!(" and {} more like it", w.objects - 1));
        }
    }
    if matches!(t.state, AlertState::Firing | AlertState::Changed) {
        for th in &a.threads {
            s.push_str(&format!("\n  thread {} ({})", th.tid, th.name));
            if let Some(lock) = &th.waits_on {
                s.push_str(&format!(" waits on {lock}"));
            }
            if let Some(owner) = th.owner_tid {
                s.push_str(&format!(" held by thread {owner}"));
            }
            s.push_str(&format!(" for {:.0}s", th.waited_seconds));
            if let Some(site) = &th.blocked_at {
                s.push_str(&format!(" at {site}"));
            }
        }
        s.push_str(&format!("\n  hint: {}", a.hint));
    }
    s
}
