//! Drawing the live view: the overview (processes, alerts), a drill-down into one process's
//! task groups, the key help. Everything fits 80x24.

use ratatui::{
    Frame,
    layout::{Constraint, Layout, Rect},
    style::{Modifier, Style},
    text::Line,
    widgets::{Block, Borders, Clear, Paragraph, Row, Table, TableState, Wrap},
};

use super::{Sort, State, feed::Source};

const HELP: &[(&str, &str)] = &[
    ("up/down, j/k", "select"),
    ("Enter", "drill into the selected process's tasks"),
    ("Esc", "back (or clear the filter)"),
    ("/", "filter processes by PID, executable or pod"),
    ("s", "sort tasks by count or by wait time"),
    ("?", "this help"),
    ("q, Ctrl-C", "quit"),
];

pub(super) fn draw(f: &mut Frame<'_>, state: &State) {
    let [title, body, footer] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Min(4),
        Constraint::Length(1),
    ])
    .areas(f.area());
    match state.drilled {
        Some(pid) => tasks(f, state, pid, title, body),
        None => overview(f, state, title, body),
    }
    let keys = match (&state.typing, &state.error) {
        (Some(text), _) => format!("filter: {text}_  (Enter apply, Esc cancel)"),
        (None, Some(e)) => format!("! {e}"),
        (None, None) if state.drilled.is_some() => {
            "q quit  Esc back  s sort  up/down select  ? help".to_owned()
        }
        (None, None) => "q quit  Enter tasks  / filter  up/down select  ? help".to_owned(),
    };
    f.render_widget(Paragraph::new(keys), footer);
    if state.help {
        help(f);
    }
}

fn overview(f: &mut Frame<'_>, state: &State, title: Rect, body: Rect) {
    let processes = state.processes();
    let (alerts, memory, scan) = state.view.as_ref().map_or((0, 0, 0.0), |v| {
        (v.alerts.len(), v.memory_bytes >> 20, v.last_scan_seconds)
    });
    let from = match &state.source {
        Source::Daemon(p) => p.display().to_string(),
        Source::Process { pid, .. } => format!("PID {pid}"),
    };
    let mut head = format!(
        "leakmon top  {from}  {} processes  {alerts} alerts",
        processes.len()
    );
    if memory > 0 {
        head.push_str(&format!("  daemon {memory} MiB, scan {scan:.2}s"));
    }
    if !state.filter.is_empty() {
        head.push_str(&format!("  [filter: {}]", state.filter));
    }
    f.render_widget(Paragraph::new(head), title);
    let [top, bottom] = Layout::vertical([Constraint::Min(4), Constraint::Length(8)]).areas(body);
    let rows = processes.iter().map(|p| {
        let n = state
            .view
            .as_ref()
            .map_or(0, |v| v.alerts.iter().filter(|a| a.pid == p.pid).count());
        let name = p
            .pod
            .clone()
            .unwrap_or_else(|| p.exe.rsplit('/').next().unwrap_or(&p.exe).to_owned());
        Row::new(vec![
            p.pid.to_string(),
            p.runtime.clone(),
            p.tasks.to_string(),
            p.threads.map_or_else(String::new, |t| t.to_string()),
            p.growth_per_minute
                .map_or_else(String::new, |g| format!("{g:+.0}")),
            if n > 0 { n.to_string() } else { String::new() },
            trend(&p.history),
            name,
        ])
    });
    let mut table_state = TableState::default()
        .with_selected(Some(state.selected.min(processes.len().saturating_sub(1))));
    let processes_table = table(
        "Processes",
        &[
            ("PID", 8),
            ("RT", 6),
            ("TASKS", 9),
            ("THR", 6),
            ("/MIN", 7),
            ("ALERTS", 6),
            ("TREND", 10),
            ("PROCESS", 10),
        ],
        rows,
    );
    f.render_stateful_widget(processes_table, top, &mut table_state);
    let alerts: Vec<Row<'_>> = state.view.as_ref().map_or_else(Vec::new, |v| {
        v.alerts
            .iter()
            .map(|a| {
                Row::new(vec![
                    a.kind.clone(),
                    a.pid.to_string(),
                    a.count.to_string(),
                    age(a.oldest_seconds),
                    a.proof
                        .as_ref()
                        .map_or_else(String::new, |p| format!("{p} {}", a.proven)),
                    a.blocked_at.clone().unwrap_or_else(|| a.entry.clone()),
                ])
            })
            .collect()
    });
    let alerts_table = table(
        "Firing alerts",
        &[
            ("ALERT", 18),
            ("PID", 8),
            ("COUNT", 7),
            ("AGE", 6),
            ("PROOF", 13),
            ("WHERE", 10),
        ],
        alerts,
    );
    f.render_widget(alerts_table, bottom);
}

fn tasks(f: &mut Frame<'_>, state: &State, pid: u32, title: Rect, body: Rect) {
    let name = state
        .view
        .as_ref()
        .and_then(|v| v.processes.iter().find(|p| p.pid == pid))
        .map(|p| {
            format!(
                " {} ({})",
                p.exe.rsplit('/').next().unwrap_or(&p.exe),
                p.runtime
            )
        })
        .unwrap_or_default();
    let sorted = match state.sort {
        Sort::Count => "count",
        Sort::Wait => "wait",
    };
    let Some(Ok(t)) = &state.tasks else {
        let said = match &state.tasks {
            Some(Err(e)) => format!("PID {pid}{name}: {e}"),
            _ => format!("PID {pid}{name}: reading its tasks..."),
        };
        f.render_widget(Paragraph::new(said).wrap(Wrap { trim: true }), body);
        f.render_widget(Paragraph::new(format!("PID {pid}{name}")), title);
        return;
    };
    f.render_widget(
        Paragraph::new(format!(
            "PID {pid}{name}  {} {}s  {} groups  by {sorted}",
            t.total,
            t.word,
            t.groups.len()
        )),
        title,
    );
    let mut groups = t.groups.clone();
    match state.sort {
        Sort::Count => {
            groups.sort_by(|a, b| b.count.cmp(&a.count).then(b.longest_ns.cmp(&a.longest_ns)))
        }
        Sort::Wait => {
            groups.sort_by(|a, b| b.longest_ns.cmp(&a.longest_ns).then(b.count.cmp(&a.count)))
        }
    }
    let notes = t.notes.len().min(3) as u16;
    let [top, bottom] =
        Layout::vertical([Constraint::Min(3), Constraint::Length(notes)]).areas(body);
    let rows = groups.iter().map(|g| {
        Row::new(vec![
            g.count.to_string(),
            g.status.clone(),
            if g.longest_ns > 0 {
                age(g.longest_ns as f64 / 1e9)
            } else {
                String::new()
            },
            g.verdict.clone(),
            g.place.clone(),
        ])
    });
    let mut table_state = TableState::default().with_selected(Some(
        state.task_selected.min(groups.len().saturating_sub(1)),
    ));
    let groups_table = table(
        &format!("{}s", t.word),
        &[
            ("COUNT", 7),
            ("STATE", 16),
            ("WAIT", 6),
            ("VERDICT", 16),
            ("WHERE", 10),
        ],
        rows,
    );
    f.render_stateful_widget(groups_table, top, &mut table_state);
    let notes: Vec<Line<'_>> = t
        .notes
        .iter()
        .take(3)
        .map(|n| Line::from(format!("# {n}")))
        .collect();
    f.render_widget(Paragraph::new(notes), bottom);
}

/// A table of `rows` under bold column names (with their widths; the last takes the rest),
/// the selected row reversed.
fn table<'a>(
    title: &str,
    columns: &[(&'static str, u16)],
    rows: impl IntoIterator<Item = Row<'a>>,
) -> Table<'a> {
    let last = columns.len().saturating_sub(1);
    let widths = columns.iter().enumerate().map(|(i, (_, w))| {
        if i == last {
            Constraint::Min(*w)
        } else {
            Constraint::Length(*w)
        }
    });
    Table::new(rows, widths)
        .header(
            Row::new(columns.iter().map(|(name, _)| *name))
                .style(Style::new().add_modifier(Modifier::BOLD)),
        )
        .row_highlight_style(Style::new().add_modifier(Modifier::REVERSED))
        .block(Block::new().borders(Borders::TOP).title(title.to_owned()))
}

fn help(f: &mut Frame<'_>) {
    let area = f.area();
    let height = (HELP.len() as u16 + 2).min(area.height);
    let width = 60.min(area.width);
    let rect = Rect {
        x: area.x + (area.width - width) / 2,
        y: area.y + (area.height - height) / 2,
        width,
        height,
    };
    let lines: Vec<Line<'_>> = HELP
        .iter()
        .map(|(k, what)| Line::from(format!("{k:<14} {what}")))
        .collect();
    f.render_widget(Clear, rect);
    f.render_widget(
        Paragraph::new(lines).block(Block::bordered().title("Keys")),
        rect,
    );
}

/// "12s", "3m", "2h".
fn age(seconds: f64) -> String {
    match seconds {
        s if s < 120.0 => format!("{s:.0}s"),
        s if s < 7200.0 => format!("{:.0}m", s / 60.0),
        s => format!("{:.0}h", s / 3600.0),
    }
}

/// The last counts as a small bar chart.
fn trend(history: &[u64]) -> String {
    const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    let last = &history[history.len().saturating_sub(10)..];
    let (lo, hi) = (
        last.iter().copied().min().unwrap_or(0),
        last.iter().copied().max().unwrap_or(0),
    );
    last.iter()
        .map(|n| {
            let i = if hi > lo {
                ((n - lo) * 7 / (hi - lo)) as usize
            } else {
                0
            };
            BARS[i.min(7)]
        })
        .collect()
}
