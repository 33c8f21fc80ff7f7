//! `leakmon doctor`: what this host lacks for leakmon, and how to fix it.

use std::path::Path;

use crate::sys::{caps, tracefs};

pub(crate) struct Check {
    pub name: &'static str,
    /// None when fine; else what to do.
    pub problem: Option<String>,
    pub detail: String,
}

fn check(name: &'static str, ok: bool, detail: String, fix: impl FnOnce() -> String) -> Check {
    Check {
        name,
        problem: (!ok).then(fix),
        detail,
    }
}

/// The running daemon's memory against its budget, from the status it writes after each scan.
/// Not running is no failure (doctor runs before it starts); over budget is.
fn daemon_check() -> Check {
    let mib = |b: u64| b as f64 / f64::from(1 << 20);
    match crate::status::Status::read(Path::new(crate::status::STATUS_FILE)) {
        None => check(
            "daemon",
            true,
            format!("not running (no live {})", crate::status::STATUS_FILE),
            String::new,
        ),
        Some(s) => check(
            "daemon",
            s.anon_bytes <= s.budget_bytes,
            format!(
                "PID {}: {:.1} MiB allocated ({:.1} MiB resident) of a {:.0} MiB budget; \
                 symbol cache {:.1} MiB in {} modules, {} evicted; {} processes with tasks \
                 watched; {} unresponsive",
                s.pid,
                mib(s.anon_bytes),
                mib(s.rss_bytes),
                mib(s.budget_bytes),
                mib(s.cache_bytes),
                s.cache_modules,
                s.cache_evicted,
                s.task_processes,
                s.unresponsive
            ),
            || "the daemon is over its memory budget: raise memory_budget, or report it".into(),
        ),
    }
}

pub(crate) fn run_checks() -> Vec<Check> {
    let mut checks = Vec::new();
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    checks.push(check(
        "kernel",
        true,
        format!("Linux {}", release.trim()),
        String::new,
    ));
    let mut missing = caps::missing(&[caps::CAP_BPF, caps::CAP_PERFMON, caps::CAP_SYS_PTRACE]);
    if !caps::can_open_map_files() {
        missing.push("CAP_CHECKPOINT_RESTORE (or CAP_SYS_ADMIN)");
    }
    checks.push(check(
        "privileges",
        missing.is_empty(),
        if missing.is_empty() {
            "CAP_BPF, CAP_PERFMON, CAP_SYS_PTRACE, and CAP_CHECKPOINT_RESTORE or CAP_SYS_ADMIN"
                .into()
        } else {
            format!("missing {}", missing.join(", "))
        },
        || "run as root, or grant the missing capabilities (see deploy/ for systemd and Kubernetes)".into(),
    ));
    let btf = Path::new("/sys/kernel/btf/vmlinux").exists();
    checks.push(check(
        "kernel BTF",
        btf,
        "/sys/kernel/btf/vmlinux".into(),
        || "use a kernel built with CONFIG_DEBUG_INFO_BTF=y (process discovery in `leakmon run` needs it)".into(),
    ));
    let uprobe_pmu = Path::new("/sys/bus/event_source/devices/uprobe/type").exists();
    checks.push(check(
        "uprobes",
        uprobe_pmu,
        "/sys/bus/event_source/devices/uprobe".into(),
        || "use a kernel built with CONFIG_UPROBE_EVENTS=y".into(),
    ));
    let mounted = tracefs::is_mounted() || tracefs::ensure_mounted().is_ok();
    checks.push(check("tracefs", mounted, tracefs::TRACEFS.into(), || {
        format!("mount -t tracefs nodev {}", tracefs::TRACEFS)
    }));
    let kprobes = Path::new("/sys/bus/event_source/devices/kprobe").exists();
    checks.push(check(
        "kprobes",
        true,
        if kprobes {
            "available"
        } else {
            "absent (not needed: leakmon uses tracepoints and uprobes)"
        }
        .into(),
        String::new,
    ));
    let errors = |e: crate::bpf::BpfError| crate::sys::chain(&e);
    let (load, discovery, threads) = if missing.is_empty() {
        match crate::bpf::Probes::load(crate::bpf::Capacity {
            tasks: 1024,
            threads: 1024,
            task_quota: 1024,
        }) {
            // Attaching the tracepoints briefly is harmless; dropping detaches them.
            Ok(mut probes) => (
                Ok(()),
                probes.proc_events().map(drop).map_err(errors),
                probes.attach_threads().map_err(errors),
            ),
            Err(e) => {
                let skipped = || Err("skipped: programs did not load".to_owned());
                (Err(errors(e)), skipped(), skipped())
            }
        }
    } else {
        let skipped = || Err("skipped: missing privileges".to_owned());
        (skipped(), skipped(), skipped())
    };
    checks.push(Check {
        name: "load programs",
        detail: "the kernel's verifier accepts leakmon's uprobe programs".into(),
        problem: load.err(),
    });
    checks.push(Check {
        name: "discovery",
        detail: "exec tracepoint (tp_btf) for `leakmon run`".into(),
        problem: discovery.err(),
    });
    checks.push(daemon_check());
    checks.push(Check {
        name: "watchpoints",
        detail: "a one-shot hardware watchpoint (perf breakpoint event), which confirms tokio \
                 polls that compute"
            .into(),
        problem: crate::sys::perf::self_test().err().map(|e| {
            format!(
                "{e}: polls that compute without a system call are not reported (a VM without \
                 debug registers, or perf_event_open refused)"
            )
        }),
    });
    checks.push(Check {
        name: "thread probes",
        detail: "sched_switch (tp_btf, Linux 5.18+) and thread fork/exit tracepoints".into(),
        problem: threads
            .err()
            .map(|e| format!("{e} (or run with --threads=false)")),
    });
    checks
}
