//! Shared by the integration tests: Go fixtures built at test time with the toolchains
//! `./x setup` installs, and `leakmon` run as a real process whose JSON alerts are collected.
//! These tests load eBPF: they need root and fail without it (never skip).
#![allow(dead_code, reason = "each test binary uses a different part")]

use std::{
    collections::HashMap,
    io::{BufRead as _, BufReader, Read as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, OnceLock, mpsc},
    time::{Duration, Instant},
};

use serde_json::Value;

/// Thresholds short enough for tests; production defaults are minutes.
pub const FAST: [&str; 10] = [
    "--block-threshold",
    "1s",
    "--spin-threshold",
    "2s",
    "--leak-window",
    "3s",
    "--scan-interval",
    "250ms",
    "--format",
    "json",
];

pub const ALERT_TIMEOUT: Duration = Duration::from_secs(40);

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Where `./x test` installed the Go toolchains (it decides the default, and passes it).
fn tools_dir() -> PathBuf {
    std::env::var_os("LEAKMON_TOOLS").map(PathBuf::from).expect(
        "LEAKMON_TOOLS is not set: run the tests through `./x test`, which installs the Go \
         toolchains",
    )
}

/// The Go versions to run fixtures with: set by `./x test`.
pub fn fixture_versions() -> Vec<String> {
    let v = std::env::var("LEAKMON_GO_FIXTURE_VERSIONS").expect(
        "LEAKMON_GO_FIXTURE_VERSIONS is not set: run the tests through `./x test`, which \
         installs the Go toolchains",
    );
    v.split(',').map(str::to_owned).collect()
}

pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "these tests load eBPF programs: run them as root");
}

/// `leakmon args`, run to its end, with no input.
pub fn leakmon(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_leakmon"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// A free local port (bound, then released for a receiver or a fixture to use).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The `go` command of Go `version` (installed by `./x setup`).
pub fn go_tool(version: &str) -> PathBuf {
    tools_dir().join("go").join(version).join("go/bin/go")
}

/// Builds `fixtures/go/<name>` with Go `version` (once per test binary).
pub fn fixture(version: &str, name: &str, stripped: bool) -> PathBuf {
    /// (Go version, fixture, stripped) -> binary.
    type Built = HashMap<(String, String, bool), PathBuf>;
    static BUILT: OnceLock<Mutex<Built>> = OnceLock::new();
    let built = BUILT.get_or_init(Default::default);
    let mut built = built.lock().unwrap();
    let key = (version.to_owned(), name.to_owned(), stripped);
    if let Some(p) = built.get(&key) {
        return p.clone();
    }
    let go = tools_dir().join("go").join(version).join("go/bin/go");
    assert!(
        go.exists(),
        "Go {version} is not installed at {} (run ./x setup)",
        go.display()
    );
    let out = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("fixtures")
        .join(format!(
            "go{version}{}",
            if stripped { "-stripped" } else { "" }
        ))
        .join(name);
    let mut cmd = Command::new(&go);
    cmd.current_dir(repo_root().join("fixtures/go"))
        .args(["build", "-o"])
        .arg(&out)
        .env("GOTOOLCHAIN", "local")
        .env("GOFLAGS", "-mod=mod")
        .env("GOCACHE", tools_dir().join("gocache").join(version));
    if stripped {
        cmd.arg("-ldflags=-s -w");
    }
    let status = cmd.arg(format!("./{name}")).status().unwrap();
    assert!(
        status.success(),
        "building fixture {name} with Go {version} failed"
    );
    built.insert(key, out.clone());
    out
}

/// Builds a native fixture from fixtures/native (once per test binary): `threads` from
/// threads.c with gcc, `deadlock` from deadlock.rs with rustc, `tokio-idle` with cargo. Both keep debug info, as a
/// service's build usually does in its debug package.
pub fn native_fixture(name: &str) -> PathBuf {
    static BUILT: OnceLock<Mutex<HashMap<String, PathBuf>>> = OnceLock::new();
    let mut built = BUILT.get_or_init(Default::default).lock().unwrap();
    if let Some(p) = built.get(name) {
        return p.clone();
    }
    let src = repo_root().join("fixtures/native");
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fixtures/native");
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join(name);
    let status = match name {
        "threads" => Command::new("gcc")
            .args(["-g", "-O1", "-pthread", "-o"])
            .arg(&out)
            .arg(src.join("threads.c"))
            .status(),
        "deadlock" => Command::new("rustc")
            .args(["-g", "-O", "--edition", "2024", "-o"])
            .arg(&out)
            .arg(src.join("deadlock.rs"))
            .status(),
        // A cargo project of its own, built offline from the registry cache leakmon's build
        // filled (its Cargo.lock pins what is there).
        "hostile" => Command::new("gcc")
            .args(["-g", "-O1", "-pthread", "-o"])
            .arg(&out)
            .arg(src.join("hostile.c"))
            .arg("-ldl")
            .status(),
        "dlhost" => Command::new("gcc")
            .args(["-g", "-O1", "-o"])
            .arg(&out)
            .arg(src.join("dlhost.c"))
            .arg("-ldl")
            .status(),
        "hangfs" => Command::new("gcc")
            .args(["-O1", "-o"])
            .arg(&out)
            .arg(src.join("hangfs.c"))
            .status(),
        "libhostile.so" => Command::new("gcc")
            .args(["-g", "-O1", "-shared", "-fPIC", "-o"])
            .arg(&out)
            .arg(src.join("hostile_lib.c"))
            .status(),
        "tokio-idle" => {
            let target = dir.join("tokio-idle-target");
            let status = Command::new("cargo")
                .args([
                    "build",
                    "--release",
                    "--offline",
                    "--locked",
                    "--manifest-path",
                ])
                .arg(src.join("tokio-idle/Cargo.toml"))
                .arg("--target-dir")
                .arg(&target)
                .env_remove("CARGO_TARGET_DIR")
                .status();
            if status.as_ref().is_ok_and(|s| s.success()) {
                std::fs::copy(target.join("release/tokio-idle"), &out).unwrap();
            }
            status
        }
        _ => panic!("no native fixture {name}"),
    }
    .unwrap_or_else(|e| panic!("building native fixture {name}: {e} (is gcc installed?)"));
    assert!(status.success(), "building native fixture {name} failed");
    built.insert(name.to_owned(), out.clone());
    out
}

/// How a tokio fixture is built: as `cargo build --release` leaves it (with the line tables a
/// debug package has), with `strip = true`, or with fat LTO and one codegen unit, stripped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TokioBuild {
    Release,
    Stripped,
    Lto,
    /// tokio-tasks as a release shared library (`libtokio_tasks.so`), for `dlhost`.
    Library,
}

/// The tokio versions the fixtures are built with: one lock file each in
/// fixtures/native/tokio-tasks/locks (`tokio-1.35.lock` -> "1.35"), oldest first.
pub fn tokio_versions() -> Vec<String> {
    let dir = repo_root().join("fixtures/native/tokio-tasks/locks");
    let mut v: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            Some(
                name.strip_prefix("tokio-")?
                    .strip_suffix(".lock")?
                    .to_owned(),
            )
        })
        .collect();
    v.sort_by_key(|s| {
        s.split('.')
            .map(|n| n.parse::<u32>().unwrap_or(0))
            .collect::<Vec<_>>()
    });
    assert!(
        v.len() >= 3,
        "fewer than three tokio lock files in {}",
        dir.display()
    );
    v
}

/// Builds the tokio fixture `name` (`tokio-tasks` with tokio `version`'s lock file, or
/// `tokio-http` with its own), offline from the crates `./x setup` fetched, once per test
/// binary and build kind.
pub fn tokio_fixture(name: &str, version: &str, build: TokioBuild) -> PathBuf {
    type Built = HashMap<(String, String, TokioBuild), PathBuf>;
    static BUILT: OnceLock<Mutex<Built>> = OnceLock::new();
    let mut built = BUILT.get_or_init(Default::default).lock().unwrap();
    let key = (name.to_owned(), version.to_owned(), build);
    if let Some(p) = built.get(&key) {
        return p.clone();
    }
    let src = repo_root().join("fixtures/native").join(name);
    let lock = if name == "tokio-tasks" {
        src.join(format!("locks/tokio-{version}.lock"))
    } else {
        src.join("Cargo.lock")
    };
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("tokio/{name}-{version}"));
    std::fs::create_dir_all(dir.join("src")).unwrap();
    std::fs::copy(src.join("Cargo.toml"), dir.join("Cargo.toml")).unwrap();
    std::fs::copy(src.join("src/main.rs"), dir.join("src/main.rs")).unwrap();
    if src.join("src/lib.rs").exists() {
        std::fs::copy(src.join("src/lib.rs"), dir.join("src/lib.rs")).unwrap();
    }
    std::fs::copy(&lock, dir.join("Cargo.lock")).unwrap();
    let mut cmd = Command::new("cargo");
    cmd.args(["build", "--offline", "--locked", "--manifest-path"])
        .arg(dir.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(dir.join("target"))
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("RUSTFLAGS");
    let profile = match build {
        TokioBuild::Release => {
            cmd.args([
                "--bins",
                "--release",
                "--config",
                "profile.release.strip=false",
            ]);
            "release"
        }
        TokioBuild::Stripped => {
            cmd.args([
                "--bins",
                "--release",
                "--config",
                "profile.release.strip=true",
            ]);
            "release"
        }
        TokioBuild::Lto => {
            cmd.args([
                "--bins",
                "--profile",
                "lto",
                "--config",
                "profile.lto.strip=true",
            ]);
            "lto"
        }
        TokioBuild::Library => {
            cmd.args([
                "--lib",
                "--release",
                "--config",
                "profile.release.strip=false",
            ]);
            "release"
        }
    };
    let status = cmd.status().unwrap();
    assert!(
        status.success(),
        "building {name} with tokio {version} ({build:?}) failed (did `./x setup` fetch its crates?)"
    );
    let (built_as, out) = match build {
        TokioBuild::Library => (
            format!("lib{}.so", name.replace('-', "_")),
            dir.join(format!("lib{}.so", name.replace('-', "_"))),
        ),
        _ => (name.to_owned(), dir.join(format!("{name}-{build:?}"))),
    };
    std::fs::copy(dir.join(format!("target/{profile}/{built_as}")), &out).unwrap();
    built.insert(key, out.clone());
    out
}

/// Line of the `// @block:<tag>` marker in a fixture source file.
pub fn block_line(file: &str, tag: &str) -> u64 {
    let src = std::fs::read_to_string(repo_root().join(file)).unwrap();
    let marker = format!("// @block:{tag}");
    let lines: Vec<u64> = src
        .lines()
        .enumerate()
        .filter(|(_, l)| l.trim_end().ends_with(&marker))
        .map(|(i, _)| i as u64 + 1)
        .collect();
    assert_eq!(lines.len(), 1, "marker {marker} in {file}");
    lines[0]
}

/// A child process killed when dropped.
pub struct Proc {
    pub child: Child,
    pub stdout: Option<BufReader<std::process::ChildStdout>>,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// Waits for the next stdout line to be `want`.
    pub fn expect_line(&mut self, want: &str) {
        let mut line = String::new();
        self.stdout.as_mut().unwrap().read_line(&mut line).unwrap();
        assert_eq!(line.trim(), want, "fixture said {line:?}");
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts a fixture and waits for `ready`.
pub fn start_fixture(bin: &Path, args: &[&str]) -> Proc {
    let mut child = Command::new(bin)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let mut p = Proc {
        child,
        stdout: Some(stdout),
    };
    p.expect_line("ready");
    p
}

/// `leakmon` running with its JSON alerts collected line by line.
pub struct Leakmon {
    pub proc: Proc,
    alerts: mpsc::Receiver<Value>,
    seen: Vec<Value>,
    stderr: Arc<Mutex<String>>,
}

impl Leakmon {
    pub fn start(args: &[&str]) -> Self {
        Self::start_with_env(args, &[])
    }

    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_leakmon"));
        cmd.args(args).envs(env.iter().copied());
        Self::spawn(cmd)
    }

    /// `leakmon` started as a member of the cgroup (v1 or v2) directory `cgroup`.
    pub fn start_in_cgroup(args: &[&str], cgroup: &Path) -> Self {
        use std::os::unix::process::CommandExt as _;
        let procs = std::ffi::CString::new(
            cgroup
                .join("cgroup.procs")
                .into_os_string()
                .into_encoded_bytes(),
        )
        .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_leakmon"));
        cmd.args(args);
        // SAFETY: only async-signal-safe calls (open, write, close) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // "0" means the writing process itself.
                let ok = libc::write(fd, b"0".as_ptr().cast(), 1) == 1;
                libc::close(fd);
                if ok {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
        Self::spawn(cmd)
    }

    fn spawn(mut cmd: Command) -> Self {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut stderr_pipe = child.stderr.take().unwrap();
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = Arc::clone(&stderr);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stderr_pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let (tx, alerts) = mpsc::channel();
        std::thread::spawn(move || {
            for line in stdout.lines().map_while(Result::ok) {
                let v: Value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("leakmon printed a non-JSON line {line:?}: {e}"));
                if tx.send(v).is_err() {
                    break;
                }
            }
        });
        Self {
            proc: Proc {
                child,
                stdout: None,
            },
            alerts,
            seen: Vec::new(),
            stderr,
        }
    }

    pub fn watch(pids: &[u32], extra: &[&str]) -> Self {
        Self::watch_with_env(pids, extra, &[])
    }

    pub fn watch_with_env(pids: &[u32], extra: &[&str], env: &[(&str, &str)]) -> Self {
        let mut args = vec!["watch".to_owned()];
        for pid in pids {
            args.extend(["--pid".to_owned(), pid.to_string()]);
        }
        args.extend(FAST.iter().map(|s| (*s).to_owned()));
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Self::start_with_env(&args, env)
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// The first alert (in order of arrival, including earlier ones not yet matched) that
    /// satisfies `pred`.
    pub fn expect(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        self.expect_within(what, ALERT_TIMEOUT, pred)
    }

    /// [`Leakmon::expect`], waiting up to `timeout`.
    pub fn expect_within(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        if let Some(v) = self.seen.iter().find(|v| pred(v)) {
            return v.clone();
        }
        let deadline = Instant::now() + timeout;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.alerts.recv_timeout(left) {
                Ok(v) => {
                    self.seen.push(v.clone());
                    if pred(&v) {
                        return v;
                    }
                }
                Err(_) => break,
            }
        }
        panic!(
            "no alert {what} within {timeout:?}; alerts seen: {:#?}\nleakmon stderr:\n{}",
            self.seen,
            self.stderr()
        );
    }

    /// Every alert printed over `d`.
    pub fn collect_for(&mut self, d: Duration) -> Vec<Value> {
        let deadline = Instant::now() + d;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            if let Ok(v) = self.alerts.recv_timeout(left) {
                self.seen.push(v);
            }
        }
        self.seen.clone()
    }

    /// Kilobytes of a `/proc/PID/status` field of leakmon (VmRSS, VmHWM).
    pub fn status_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.proc.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("no {field} in {status}"))
    }

    /// Sends SIGTERM and waits for the exit; returns how long it took.
    pub fn stop(&mut self) -> Duration {
        let started = Instant::now();
        self.proc.signal(libc::SIGTERM);
        let deadline = started + Duration::from_secs(30);
        while Instant::now() < deadline {
            if self.proc.child.try_wait().unwrap().is_some() {
                return started.elapsed();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "leakmon did not exit within 30 s of SIGTERM; stderr:\n{}",
            self.stderr()
        );
    }

    /// Waits until stderr contains `needle` (leakmon logs it once attached).
    pub fn wait_stderr(&self, needle: &str) {
        let deadline = Instant::now() + ALERT_TIMEOUT;
        while Instant::now() < deadline {
            if self.stderr().contains(needle) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "leakmon never logged {needle:?}; stderr:\n{}",
            self.stderr()
        );
    }
}

/// Expected (create line, block line) of each fixture mode, from the `@create:` / `@block:`
/// markers in fixtures/go/leaky/main.go.
pub fn markers() -> HashMap<String, (u64, u64)> {
    let src = std::fs::read_to_string(repo_root().join("fixtures/go/leaky/main.go")).unwrap();
    let mut create = HashMap::new();
    let mut block = HashMap::new();
    for (i, line) in src.lines().enumerate() {
        for (tag, map) in [("// @create:", &mut create), ("// @block:", &mut block)] {
            if let Some(mode) = line.split(tag).nth(1) {
                let prev = map.insert(mode.trim().to_owned(), i as u64 + 1);
                assert!(prev.is_none(), "marker {tag}{mode} appears twice");
            }
        }
    }
    create
        .into_iter()
        .map(|(mode, c)| {
            let b = block[&mode];
            (mode, (c, b))
        })
        .collect()
}

pub fn go_version_at_least(version: &str, minor: u32) -> bool {
    version
        .split('.')
        .nth(1)
        .and_then(|m| m.parse::<u32>().ok())
        .is_some_and(|m| m >= minor)
}
