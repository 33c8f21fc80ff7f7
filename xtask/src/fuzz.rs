//! `./x fuzz`: the parsers of untrusted input (fuzz/) under libFuzzer through cargo-fuzz, each
//! for a fixed time, from a seed corpus of real files: Go executables (normal and stripped),
//! native programs and libraries, this kernel's BTF, /proc text. A crash, a hang (an input
//! over 10 s) or an input using over 1 GiB fails the run; libFuzzer saves the input under
//! fuzz/artifacts/, and once fixed it becomes a regression test beside the parser's tests
//! (as `declared_section_sizes_are_not_trusted` in monitor/src/go/tests.rs).

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};

use crate::{Workspace, demo, run, setup};

/// The targets (fuzz/fuzz_targets) and the largest input each is given.
pub const TARGETS: [(&str, usize); 5] = [
    ("go_binary", 4 << 20),
    ("native_module", 4 << 20),
    ("btf", 8 << 20),
    ("proc_text", 64 << 10),
    ("tokio_binary", 4 << 20),
];

/// Fuzzes every target for `seconds`. With `keep`, the corpus grows across runs in
/// target/fuzz-corpus (`./x fuzz`); else each run starts from the seeds (`./x test`, whose
/// time must not grow with its history).
pub fn run_all(ws: &Workspace, tools: &setup::Tools, seconds: u64, keep: bool) -> Result<()> {
    let corpus_root = ws.root.join(if keep {
        "target/fuzz-corpus"
    } else {
        "target/fuzz-corpus-test"
    });
    if !keep && corpus_root.exists() {
        fs::remove_dir_all(&corpus_root)?;
    }
    seed(ws, tools, &corpus_root)?;
    // One build for every target (cargo-fuzz builds them all when none is named).
    run(fuzz_cmd(ws, tools).args(["build", "--sanitizer", "none"]))?;
    for (target, max_len) in TARGETS {
        eprintln!("xtask: fuzzing {target} for {seconds} s");
        let corpus = corpus_root.join(target);
        run(fuzz_cmd(ws, tools)
            .args(["run", "--sanitizer", "none", target])
            .arg(&corpus)
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .arg(format!("-max_len={max_len}"))
            .args(["-timeout=10", "-rss_limit_mb=1024", "-print_final_stats=1"]))
        .with_context(|| {
            format!(
                "fuzz target {target} failed: the input is in fuzz/artifacts/{target}/; once \
                 fixed, make it a regression test beside that parser's tests"
            )
        })?;
    }
    Ok(())
}

fn fuzz_cmd(ws: &Workspace, tools: &setup::Tools) -> std::process::Command {
    let mut cmd = ws.cargo(tools);
    cmd.current_dir(ws.root.join("fuzz"))
        .arg(format!("+{}", tools.nightly))
        .arg("fuzz")
        .env(
            "PATH",
            tools.path_env_with(&tools.cargo_fuzz_dir().join("bin")),
        );
    cmd
}

/// Real files as seeds, whole and cut short (most mutations of a whole executable change
/// code bytes no parser reads; cut copies reach the tables' edges sooner).
fn seed(ws: &Workspace, tools: &setup::Tools, root: &Path) -> Result<()> {
    let newest = setup::GO_FIXTURE_VERSIONS[setup::GO_FIXTURE_VERSIONS.len() - 1];
    let oldest = setup::GO_FIXTURE_VERSIONS[0];
    let mut go = Vec::new();
    for version in [oldest, newest] {
        for stripped in [false, true] {
            go.push(demo::build_fixture(
                ws, tools, version, "pingpong", stripped,
            )?);
        }
    }
    let libc = Path::new("/usr/lib/x86_64-linux-gnu/libc.so.6");
    let native: Vec<PathBuf> = [Path::new("/usr/bin/true"), libc]
        .into_iter()
        .map(Path::to_path_buf)
        .chain(go.first().cloned())
        .collect();
    let btf = vec![PathBuf::from("/sys/kernel/btf/vmlinux")];
    for (target, files) in [
        ("go_binary", &go),
        ("native_module", &native),
        ("btf", &btf),
    ] {
        let dir = root.join(target);
        fs::create_dir_all(&dir)?;
        for (i, file) in files.iter().enumerate() {
            let data = fs::read(file).with_context(|| format!("reading {}", file.display()))?;
            for cut in [data.len(), 4096, 64 << 10] {
                let cut = cut.min(data.len());
                fs::write(dir.join(format!("seed-{i}-{cut}")), &data[..cut])?;
            }
        }
    }
    // A tokio program, and the names future types are read from.
    let tokio = crate::bench_tokio::build(ws, "tokio-tasks")?;
    let dir = root.join("tokio_binary");
    fs::create_dir_all(&dir)?;
    let data = fs::read(&tokio).with_context(|| format!("reading {}", tokio.display()))?;
    for cut in [data.len(), 4096, 64 << 10] {
        fs::write(
            dir.join(format!("seed-{cut}")),
            &data[..cut.min(data.len())],
        )?;
    }
    fs::write(
        dir.join("names"),
        "dealloc<app::f::{async_fn_env#0}, alloc::sync::Arc<H>>\0\
         core::ptr::drop_in_place<Box<tokio::runtime::task::core::Cell<app::g::{{closure}},A>>>\0\
         /src/tokio-1.54.1/src/runtime/task/state.rs",
    )?;
    let dir = root.join("proc_text");
    fs::create_dir_all(&dir)?;
    fs::write(dir.join("maps"), fs::read("/proc/self/maps")?)?;
    fs::write(
        dir.join("syscall"),
        "202 0x7f1c2e5fe9a0 0x80 0x2 0x0 0x0 0x0 0x7f1c2e5fe8f0 0x7f1c3a0912e4\n",
    )?;
    Ok(())
}
