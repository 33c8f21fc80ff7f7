//! Dumps as text shaped like Go's own: every goroutine with its stack (`debug=2`, what a panic
//! or `SIGQUIT` prints, which tools such as panicparse read), or identical stacks counted
//! (`debug=1`). What Go's text has no place for (leakmon's verdict, what a task waits on, its
//! wait time to the second) goes on a `# leakmon:` line before each goroutine, which those
//! tools pass over.

use std::{collections::HashMap, io::Write};

use super::{Dump, Frame, Labels, Task, frames_of, physical};

/// Every task, as Go's `debug=2` goroutine dump shows it.
pub(super) fn full(dump: &Dump, out: &mut dyn Write) -> std::io::Result<()> {
    for note in &dump.notes {
        writeln!(out, "# leakmon: {note}")?;
    }
    if !dump.notes.is_empty() {
        writeln!(out)?;
    }
    for task in &dump.tasks {
        if let Some(extra) = extra(task) {
            writeln!(out, "# leakmon: {extra}")?;
        }
        writeln!(out, "{} {} [{}]:", dump.task_word, task.id, status(task))?;
        for f in frames_of(task).iter() {
            writeln!(out, "{}(...)", f.function)?;
            write_position(out, f)?;
        }
        if let Some(c) = &task.created_by
            && let Some(f) = &c.frame
        {
            match c.task {
                Some(id) => writeln!(out, "created by {} in {} {id}", f.function, dump.task_word)?,
                None => writeln!(out, "created by {}", f.function)?,
            }
            write_position(out, f)?;
        }
        writeln!(out)?;
    }
    Ok(())
}

fn write_position(out: &mut dyn Write, f: &Frame) -> std::io::Result<()> {
    match f.offset {
        Some(off) => writeln!(out, "\t{}:{} +{off:#x}", f.file, f.line),
        None => writeln!(out, "\t{}:{}", f.file, f.line),
    }
}

/// What goes in the header's brackets: the wait reason (else the state), and as Go says it,
/// the minutes waited once past one.
fn status(task: &Task) -> String {
    let mut s = match &task.wait_reason {
        Some(r) if !r.is_empty() => r.to_string(),
        _ => task.state.to_owned(),
    };
    let minutes = task.waiting_ns.unwrap_or(0) / 60_000_000_000;
    if minutes > 0 {
        s.push_str(&format!(", {minutes} minutes"));
    }
    s
}

/// leakmon's line about a task, when it has something to say.
fn extra(task: &Task) -> Option<String> {
    let mut parts = Vec::new();
    if let Some(v) = task.verdict {
        parts.push(format!("verdict {v}"));
    }
    if let Some(ns) = task.waiting_ns {
        parts.push(format!("waiting {:.1}s", ns as f64 / 1e9));
    }
    if let Some(w) = &task.waits_on {
        let mut s = format!("waits on {} {:#x}", w.kind, w.address);
        if let Some(state) = &w.state {
            s.push_str(&format!(" ({})", state.text));
        }
        parts.push(s);
    }
    if let Some(w) = task.waker {
        parts.push(format!("waker {w}"));
    }
    if let Some(t) = task.thread {
        parts.push(format!("thread {t}"));
    }
    if task.stack.is_empty() {
        parts.push(format!("entry {}", task.entry));
    }
    (!parts.is_empty()).then(|| parts.join("; "))
}

/// Identical stacks counted, as Go's `debug=1` goroutine profile shows them: most common
/// first, each with its count, return addresses, and frames.
pub(super) fn grouped(dump: &Dump, out: &mut dyn Write) -> std::io::Result<()> {
    let mut groups: HashMap<(Vec<Frame>, Labels), u64> = HashMap::new();
    for t in &dump.tasks {
        *groups
            .entry((frames_of(t).into_owned(), Labels::of(t)))
            .or_default() += 1;
    }
    let mut groups: Vec<_> = groups.into_iter().collect();
    groups.sort_by(|(a, n), (b, m)| m.cmp(n).then_with(|| a.cmp(b)));
    writeln!(
        out,
        "{} profile: total {}",
        dump.task_word,
        dump.tasks.len()
    )?;
    for note in &dump.notes {
        writeln!(out, "# leakmon: {note}")?;
    }
    for ((frames, labels), n) in &groups {
        let pcs: Vec<String> = physical(frames)
            .filter_map(|call| call.last())
            .map(|f| format!("{:#x}", f.pc))
            .collect();
        writeln!(out, "{n} @ {}", pcs.join(" "))?;
        for f in frames {
            // As Go prints them: the call instruction (a return address minus one).
            let pc = f.pc.saturating_sub(1);
            let off = f.offset.unwrap_or(1).saturating_sub(1);
            writeln!(
                out,
                "#\t{pc:#x}\t{}+{off:#x}\t{}:{}",
                f.function, f.file, f.line
            )?;
        }
        let mut said = format!("# leakmon: {}", labels.state);
        if let Some(r) = &labels.wait_reason {
            said.push_str(&format!(", {r}"));
        }
        if let Some(v) = labels.verdict {
            said.push_str(&format!("; verdict {v}"));
        }
        writeln!(out, "{said}\n")?;
    }
    Ok(())
}
