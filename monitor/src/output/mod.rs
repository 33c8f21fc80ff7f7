//! Outputs: every place alerts and metrics go is a [`Sink`]. Alerts always go to stdout (text
//! or JSON lines, `text.rs`, `json.rs`), and to an OTLP collector when one is set (`otlp/`). Adding an output is a file that
//! implements [`Sink`], its settings (`config::Options`), and a line in [`start`].

mod json;
mod otlp;
mod sink;
pub(crate) mod socket;
mod text;

use std::io::{self, Write};

use self::otlp::Otlp;
pub(crate) use self::{
    json::round3,
    otlp::{ExportError, OtlpOptions, OtlpSettings},
    sink::{Health, Metrics, Sink},
};
use crate::{
    detect::{AlertState, Transition},
    runtime::ProcessInfo,
};

#[derive(
    Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Deserialize, serde::Serialize,
)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Format {
    Text,
    Json,
}

/// What the sinks are set to (part of `config::Settings`).
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct SinkSettings {
    /// Of stdout. None: the command's own default (people read `watch`, machines read `run`).
    pub format: Option<Format>,
    /// None: no export.
    pub otlp: Option<OtlpSettings>,
    /// The local socket that serves dumps and the live view: None for the command's own
    /// default (`run` serves on [`socket::protocol::DEFAULT_SOCKET`]), "" for none.
    pub socket: Option<std::path::PathBuf>,
    /// How the socket's dumps are taken.
    pub dump: crate::dump::DumpOptions,
}

/// The sinks of one monitor.
pub(crate) struct Sinks {
    sinks: Vec<Box<dyn Sink>>,
    /// Alerts fired so far, all kinds.
    fired: u64,
}

/// What a command does unless told otherwise.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Defaults {
    pub format: Format,
    /// Serve on the default socket.
    pub serve: bool,
}

/// The sinks `settings` ask for: stdout in their format (else the command's), OTLP when an
/// endpoint is set, the local socket where one is (a socket that cannot be served is said and
/// left out: the watching goes on).
pub(crate) fn start<W: Write + 'static>(
    settings: &SinkSettings,
    defaults: Defaults,
    out: W,
) -> Result<Sinks, ExportError> {
    let default_format = defaults.format;
    let mut sinks: Vec<Box<dyn Sink>> = vec![match settings.format.unwrap_or(default_format) {
        Format::Text => Box::new(text::Text::new(out)),
        Format::Json => Box::new(json::Json::new(out)),
    }];
    if let Some(s) = &settings.otlp {
        log::info!(
            "exporting alerts to {} and metrics to {} over OTLP ({:?})",
            s.logs_endpoint,
            s.metrics_endpoint,
            s.protocol
        );
        sinks.push(Box::new(Otlp::start(s.clone())?));
    }
    let socket = match &settings.socket {
        Some(p) if p.as_os_str().is_empty() => None,
        Some(p) => Some(p.clone()),
        None => defaults
            .serve
            .then(|| socket::protocol::DEFAULT_SOCKET.into()),
    };
    if let Some(path) = socket {
        match socket::Board::start(&path, settings.dump.clone()) {
            Ok(board) => sinks.push(Box::new(board)),
            Err(e) => log::warn!(
                "{}: no dumps or live view from this daemon",
                crate::sys::chain(&e)
            ),
        }
    }
    Ok(Sinks { sinks, fired: 0 })
}

impl Sinks {
    /// Alerts fired so far.
    pub(crate) fn fired(&self) -> u64 {
        self.fired
    }

    /// Hands a transition to every sink (each gets it whatever another did); a failure
    /// (stdout closed) is returned after.
    pub(crate) fn alert(&mut self, process: &ProcessInfo, t: &Transition) -> io::Result<()> {
        if t.state == AlertState::Firing {
            self.fired += 1;
        }
        let mut result = Ok(());
        for sink in &mut self.sinks {
            let r = sink.alert(process, t);
            if result.is_ok() {
                result = r;
            }
        }
        result
    }

    /// Whether any sink takes metrics.
    pub(crate) fn wants_metrics(&self) -> bool {
        self.sinks.iter().any(|s| s.wants_metrics())
    }

    pub(crate) fn metrics(&mut self, metrics: &Metrics<'_>) {
        for sink in &mut self.sinks {
            sink.metrics(metrics);
        }
    }

    /// Flushes and stops every sink.
    pub(crate) fn close(&mut self) {
        for sink in &mut self.sinks {
            sink.close();
        }
    }
}
