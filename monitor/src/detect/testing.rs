//! Kinds for the tests of what every kind goes through (the book, the sinks): named like Go's,
//! which the sinks' tests print.

use super::{Activity, AlertKind, Family, Proof, Severity, alert_kind};

pub(crate) static LEAK: AlertKind = alert_kind!("goroutine_leak",
    members: "goroutines",
    activity: Activity::Blocked,
    severity: Severity::Warn,
    family: Family::Task,
    hint: "bound the tasks and give each a way to exit",
    running: AlertKind::RUNNING,
    running_at: false,
);

pub(crate) static STUCK: AlertKind = alert_kind!("goroutine_stuck",
    members: "goroutines",
    activity: Activity::Blocked,
    severity: Severity::Warn,
    family: Family::Task,
    hint: "give the wait a timeout",
    running: AlertKind::RUNNING,
    running_at: false,
);

pub(crate) static PROOF: Proof = Proof {
    name: "unreachable",
    text: "nothing live can reach what {n} of them wait on",
    summary: "nothing live can reach what they wait on",
};
