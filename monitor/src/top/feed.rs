//! What the live view shows, fetched on a thread of its own so a slow daemon or a big dump
//! never freezes the screen: the daemon's view every refresh, and the drilled-down process's
//! dump, grouped.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        mpsc::{Receiver, Sender, channel},
    },
    time::Duration,
};

use serde_json::Value;

use crate::{
    dump::{DumpFormat, DumpOptions},
    output::socket::{
        client,
        protocol::{ProcessView, View},
    },
};

/// How often the view is fetched again.
pub(super) const REFRESH: Duration = Duration::from_secs(2);

/// Where the view comes from.
#[derive(Clone, Debug)]
pub(crate) enum Source {
    /// A running daemon's socket.
    Daemon(PathBuf),
    /// One process, dumped here at every refresh.
    Process { pid: u32, options: DumpOptions },
}

/// Tasks of one process that look the same: state, place, verdict.
#[derive(Clone, Debug, Default, PartialEq)]
pub(super) struct Group {
    pub count: u64,
    /// Wait reason, else state.
    pub status: String,
    /// The longest wait among them.
    pub longest_ns: u64,
    pub verdict: String,
    /// The first frame outside the runtime ("function file:line"), else the entry.
    pub place: String,
}

/// One process's tasks now.
#[derive(Clone, Debug, Default)]
pub(super) struct Tasks {
    pub pid: u32,
    pub total: u64,
    pub word: String,
    pub groups: Vec<Group>,
    pub notes: Vec<String>,
}

pub(super) struct Update {
    pub view: Result<View, String>,
    pub tasks: Option<Result<Tasks, String>>,
}

/// Starts fetching; `wanted` is the process drilled into (the feed dumps it at each refresh).
pub(super) fn start(source: Source, wanted: Arc<Mutex<Option<u32>>>) -> Receiver<Update> {
    let (tx, rx) = channel();
    let spawned = std::thread::Builder::new()
        .name("leakmon-top-feed".into())
        .spawn(move || feed(&source, &wanted, &tx));
    if let Err(e) = spawned {
        log::warn!("no thread to fetch the view: {e}");
    }
    rx
}

fn feed(source: &Source, wanted: &Mutex<Option<u32>>, tx: &Sender<Update>) {
    let mut history: Vec<u64> = Vec::new();
    loop {
        let pid = *wanted
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let update = match source {
            Source::Daemon(path) => Update {
                view: client::view(path).map_err(|e| crate::sys::chain(&e)),
                tasks: pid.map(|pid| {
                    let mut json = Vec::new();
                    client::dump(path, pid, DumpFormat::Json, false, &mut json)
                        .map_err(|e| crate::sys::chain(&e))
                        .and_then(|()| serde_json::from_slice(&json).map_err(|e| e.to_string()))
                        .map(|v| grouped(pid, &v))
                }),
            },
            Source::Process { pid, options } => {
                let dumped = crate::dump::take(*pid, options)
                    .map_err(|e| crate::sys::chain(&e))
                    .and_then(|d| {
                        let v = serde_json::to_value(&d).map_err(|e| e.to_string())?;
                        Ok((d, v))
                    });
                match dumped {
                    Ok((d, v)) => {
                        let tasks = grouped(*pid, &v);
                        history.push(tasks.total);
                        if history.len() > 60 {
                            history.remove(0);
                        }
                        let process = ProcessView {
                            pid: *pid,
                            exe: d.process.exe.clone(),
                            runtime: d.process.runtime.to_owned(),
                            pod: d.process.container.pod_name.clone(),
                            tasks: tasks.total,
                            threads: None,
                            by_state: Vec::new(),
                            history: history.clone(),
                            growth_per_minute: None,
                        };
                        Update {
                            view: Ok(View {
                                processes: vec![process],
                                ..View::default()
                            }),
                            tasks: Some(Ok(tasks)),
                        }
                    }
                    Err(e) => Update {
                        view: Err(e.clone()),
                        tasks: Some(Err(e)),
                    },
                }
            }
        };
        if tx.send(update).is_err() {
            return;
        }
        std::thread::sleep(REFRESH);
    }
}

/// A dump's tasks (its JSON form), grouped.
fn grouped(pid: u32, dump: &Value) -> Tasks {
    let mut groups: BTreeMap<(String, String, String), Group> = BTreeMap::new();
    let tasks = dump["tasks"].as_array().map_or(&[][..], Vec::as_slice);
    for t in tasks {
        let status = t["wait_reason"]
            .as_str()
            .filter(|r| !r.is_empty())
            .or(t["state"].as_str())
            .unwrap_or("?")
            .to_owned();
        let place = t["stack"]
            .as_array()
            .and_then(|s| {
                s.iter().find(|f| {
                    f["function"]
                        .as_str()
                        .is_some_and(|n| !n.starts_with("runtime."))
                })
            })
            .map(|f| {
                let file = f["file"].as_str().unwrap_or("?");
                let file = file.rsplit('/').next().unwrap_or(file);
                format!(
                    "{} {file}:{}",
                    f["function"].as_str().unwrap_or("?"),
                    f["line"]
                )
            })
            .unwrap_or_else(|| t["entry"].as_str().unwrap_or("?").to_owned());
        let verdict = t["verdict"].as_str().unwrap_or("").to_owned();
        let g = groups
            .entry((status.clone(), place.clone(), verdict.clone()))
            .or_insert_with(|| Group {
                status,
                place,
                verdict,
                ..Group::default()
            });
        g.count += 1;
        g.longest_ns = g.longest_ns.max(t["waiting_ns"].as_u64().unwrap_or(0));
    }
    Tasks {
        pid,
        total: tasks.len() as u64,
        word: dump["task_word"].as_str().unwrap_or("task").to_owned(),
        groups: groups.into_values().collect(),
        notes: dump["notes"]
            .as_array()
            .map(|n| {
                n.iter()
                    .filter_map(|s| s.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default(),
    }
}
