//! Alert kinds, each described once (in the style of tokio-console's warnings): its name, what
//! it counts, whether its members are blocked or spinning, how severe it is, its remedy. Text,
//! JSON, OTLP logs and metrics all read them from here. Each runtime defines its own kinds in
//! its folder (`go/kinds.rs`, `tokio/kinds.rs`); thread kinds are in `threads.rs`.

use serde::Serialize;

/// One alert kind. Kinds are statics compared by name.
#[derive(Debug)]
pub(crate) struct AlertKind {
    /// `goroutine_leak`: the `kind` of JSON alerts and of OTLP attributes.
    pub name: &'static str,
    /// The OTLP log record's event name: `leakmon.` and the name.
    pub event: &'static str,
    /// What it counts, plural: goroutines, tasks or threads.
    pub members: &'static str,
    /// Exported as `leakmon.task_state`.
    pub activity: Activity,
    /// OTLP severity while firing (resolved is INFO).
    pub severity: Severity,
    /// Alerts of one family about one group keep one id when they change kind.
    pub family: Family,
    /// The remedy, when the runtime's policy has none more specific for the wait.
    pub hint: &'static str,
    /// Text alerts: what members that wait on nothing are doing.
    pub running: &'static str,
    /// Whether `running` is followed by where they are blocked (a poll blocked in a call).
    pub running_at: bool,
}

/// Builds an [`AlertKind`], its event name from its name.
macro_rules! alert_kind {
    ($name:literal, $($field:ident: $value:expr),* $(,)?) => {
        $crate::detect::AlertKind {
            name: $name,
            event: concat!("leakmon.", $name),
            $($field: $value,)*
        }
    };
}
pub(crate) use alert_kind;

impl AlertKind {
    /// What members that wait on nothing are doing, unless a kind says more.
    pub(crate) const RUNNING: &'static str = "running without blocking";

    pub(crate) fn is_thread(&self) -> bool {
        self.family == Family::Thread
    }
}

impl PartialEq for AlertKind {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
    }
}

impl Eq for AlertKind {}

impl Serialize for AlertKind {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Activity {
    Blocked,
    Spinning,
}

impl Activity {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Blocked => "blocked",
            Self::Spinning => "spinning",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Severity {
    /// Can recover by itself, or hurts slowly.
    Warn,
    /// Cannot recover by itself (a deadlock, a hung process).
    Error,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Family {
    Task,
    Thread,
}

/// How members of an alert are known to be leaked, when they are proven.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Proof {
    /// `unreachable`: the `proof` of JSON alerts and OTLP attributes.
    pub name: &'static str,
    /// Text alerts, after "proven: ", with `{n}` for how many are proven.
    pub text: &'static str,
    /// OTLP bodies, after ", proven: ".
    pub summary: &'static str,
}

impl Proof {
    /// "nothing live can reach what 3 of them wait on"
    pub(crate) fn say(&self, proven: u64) -> String {
        self.text.replace("{n}", &proven.to_string())
    }
}
