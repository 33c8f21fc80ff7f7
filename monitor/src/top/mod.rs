//! `leakmon top`: a live terminal view of what the daemon sees host-wide (processes with their
//! task counts and trends, firing alerts with their proof) and a drill-down into one process's
//! tasks, grouped and sortable; or of one process watched here (`--pid`). Fits 80x24; exits on
//! q, Ctrl-C and SIGTERM, leaving the terminal as it was.

mod feed;
mod screen;

use std::{
    io::IsTerminal as _,
    sync::{Arc, Mutex},
    time::Duration,
};

use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};

pub(crate) use self::feed::Source;
use self::feed::{Tasks, Update};
use crate::output::socket::protocol::View;

#[derive(Debug, thiserror::Error)]
pub(crate) enum TopError {
    #[error("leakmon top needs a terminal (for a one-off look, use `leakmon dump`)")]
    NoTerminal,
    #[error("the terminal")]
    Terminal(#[source] std::io::Error),
}

/// How a drill-down's groups are ordered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sort {
    Count,
    Wait,
}

/// Everything the screen shows.
struct State {
    source: Source,
    view: Option<View>,
    error: Option<String>,
    /// The process drilled into, and its tasks once fetched.
    drilled: Option<u32>,
    tasks: Option<Result<Tasks, String>>,
    selected: usize,
    task_selected: usize,
    sort: Sort,
    help: bool,
    /// Typing a filter (`/`): the text so far, and the filter applied.
    typing: Option<String>,
    filter: String,
}

impl State {
    /// The processes listed: those the filter keeps, with alerts first, then by task count.
    fn processes(&self) -> Vec<&crate::output::socket::protocol::ProcessView> {
        let Some(view) = &self.view else {
            return Vec::new();
        };
        let alerts = |pid: u32| view.alerts.iter().filter(|a| a.pid == pid).count();
        let mut ps: Vec<_> = view
            .processes
            .iter()
            .filter(|p| {
                self.filter.is_empty()
                    || p.pid.to_string() == self.filter
                    || p.exe.contains(&self.filter)
                    || p.pod.as_deref().is_some_and(|n| n.contains(&self.filter))
            })
            .collect();
        ps.sort_by(|a, b| {
            alerts(b.pid)
                .cmp(&alerts(a.pid))
                .then(b.tasks.cmp(&a.tasks))
                .then(b.threads.cmp(&a.threads))
                .then(a.pid.cmp(&b.pid))
        });
        ps
    }

    fn apply(&mut self, update: Update) {
        match update.view {
            Ok(v) => {
                self.view = Some(v);
                self.error = None;
            }
            Err(e) => self.error = Some(e),
        }
        if let Some(t) = update.tasks {
            // A dump of a process no longer drilled into is dropped.
            let current = match &t {
                Ok(t) => Some(t.pid) == self.drilled,
                Err(_) => self.drilled.is_some(),
            };
            if current {
                self.tasks = Some(t);
            }
        }
    }
}

/// Runs the view until q, Ctrl-C or SIGTERM.
pub(crate) fn run(source: Source) -> Result<(), TopError> {
    if !std::io::stdout().is_terminal() {
        return Err(TopError::NoTerminal);
    }
    crate::sys::signals::install().map_err(TopError::Terminal)?;
    let drilled = match &source {
        Source::Process { pid, .. } => Some(*pid),
        Source::Daemon(_) => None,
    };
    let wanted = Arc::new(Mutex::new(drilled));
    let updates = feed::start(source.clone(), Arc::clone(&wanted));
    let mut state = State {
        source,
        view: None,
        error: None,
        drilled,
        tasks: None,
        selected: 0,
        task_selected: 0,
        sort: Sort::Count,
        help: false,
        typing: None,
        filter: String::new(),
    };
    let mut terminal = ratatui::try_init().map_err(TopError::Terminal)?;
    let result = (|| -> Result<(), TopError> {
        loop {
            while let Ok(u) = updates.try_recv() {
                state.apply(u);
            }
            terminal
                .draw(|f| screen::draw(f, &state))
                .map_err(TopError::Terminal)?;
            if crate::sys::signals::stop_requested() {
                return Ok(());
            }
            if !event::poll(Duration::from_millis(200)).map_err(TopError::Terminal)? {
                continue;
            }
            let Event::Key(key) = event::read().map_err(TopError::Terminal)? else {
                continue;
            };
            if key.kind != KeyEventKind::Press {
                continue;
            }
            if key.modifiers.contains(KeyModifiers::CONTROL) && key.code == KeyCode::Char('c') {
                return Ok(());
            }
            if let Some(text) = &mut state.typing {
                match key.code {
                    KeyCode::Enter => {
                        state.filter = std::mem::take(text);
                        state.typing = None;
                        state.selected = 0;
                    }
                    KeyCode::Esc => state.typing = None,
                    KeyCode::Backspace => {
                        text.pop();
                    }
                    KeyCode::Char(c) => text.push(c),
                    _ => {}
                }
                continue;
            }
            match key.code {
                KeyCode::Char('q') => return Ok(()),
                KeyCode::Char('?') | KeyCode::Char('h') => state.help = !state.help,
                KeyCode::Char('s') => {
                    state.sort = match state.sort {
                        Sort::Count => Sort::Wait,
                        Sort::Wait => Sort::Count,
                    }
                }
                KeyCode::Char('/') if state.drilled.is_none() => {
                    state.typing = Some(String::new());
                }
                KeyCode::Up | KeyCode::Char('k') => {
                    let i = if state.drilled.is_some() {
                        &mut state.task_selected
                    } else {
                        &mut state.selected
                    };
                    *i = i.saturating_sub(1);
                }
                KeyCode::Down | KeyCode::Char('j') => {
                    if state.drilled.is_some() {
                        let groups = match &state.tasks {
                            Some(Ok(t)) => t.groups.len(),
                            _ => 0,
                        };
                        state.task_selected =
                            (state.task_selected + 1).min(groups.saturating_sub(1));
                    } else {
                        let n = state.processes().len();
                        state.selected = (state.selected + 1).min(n.saturating_sub(1));
                    }
                }
                KeyCode::Enter if state.drilled.is_none() => {
                    let pid = state.processes().get(state.selected).map(|p| p.pid);
                    if let Some(pid) = pid {
                        state.drilled = Some(pid);
                        state.tasks = None;
                        state.task_selected = 0;
                        *wanted
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(pid);
                    }
                }
                KeyCode::Esc | KeyCode::Backspace | KeyCode::Left
                    if matches!(state.source, Source::Daemon(_)) =>
                {
                    if state.help {
                        state.help = false;
                    } else if state.drilled.take().is_some() {
                        state.tasks = None;
                        *wanted
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
                    } else if !state.filter.is_empty() {
                        state.filter.clear();
                    }
                }
                KeyCode::Esc => state.help = false,
                _ => {}
            }
        }
    })();
    ratatui::restore();
    result
}
