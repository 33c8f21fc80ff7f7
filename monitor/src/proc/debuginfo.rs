//! Separate debug files of stripped binaries, found where perf and gdb look for them: the
//! build-id tree under `/usr/lib/debug` (the process's own file system first, then the
//! host's), the debuginfod client's cache, and the file `.gnu_debuglink` names (beside the
//! binary, in its `.debug/`, or under `/usr/lib/debug`). A debug file is used only when its
//! build id is the binary's: a file that merely sits at the right path names nothing. Its
//! symbol table names functions and task futures; its DWARF is not read.

use std::{
    os::unix::fs::FileExt as _,
    path::{Path, PathBuf},
};

use super::{elf::Elf, files};

/// Where distributions install debug files.
const DEBUG_ROOT: &str = "/usr/lib/debug";
/// Bytes of a `.gnu_debuglink` section read (a file name, padding and a CRC).
const MAX_DEBUGLINK: usize = 4096;

/// The debug file of `elf`, a file `pid` maps at `path` (as its maps name it, in its own
/// mount namespace), and where it was found; `None` when it has no build id or none is found.
pub(crate) fn find(pid: u32, path: &str, elf: &Elf) -> Option<(Elf, PathBuf)> {
    let id = elf.build_id()?;
    if id.len() < 4 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    // Paths in the target's file system are looked up through /proc/PID/root, but not in a
    // process that has FUSE mounts: a lookup there can hang (see `files::fuse_devices`).
    let target_root = files::fuse_devices(pid)
        .is_empty()
        .then(|| PathBuf::from(format!("/proc/{pid}/root")));
    candidates(target_root.as_deref(), path, &id, debuglink(elf).as_deref())
        .into_iter()
        .find_map(|candidate| {
            let file = files::open_checked(&candidate, None).ok()?;
            let debug = Elf::parse(file).ok()?;
            // Its symbol table is what is read from it.
            let useful = debug.section(b".symtab").is_some();
            (useful && debug.build_id().as_deref() == Some(id.as_str()))
                .then_some((debug, candidate))
        })
}

/// Where to look, in order, for the debug file of a binary at `path` with build id `id`
/// (hex) and debug link `link`.
fn candidates(
    target_root: Option<&Path>,
    path: &str,
    id: &str,
    link: Option<&str>,
) -> Vec<PathBuf> {
    let (dir, rest) = id.split_at(2);
    let by_id = format!("{DEBUG_ROOT}/.build-id/{dir}/{rest}.debug");
    let within = |root: &Path, p: &str| root.join(p.trim_start_matches('/'));
    let mut out = Vec::new();
    if let Some(root) = target_root {
        out.push(within(root, &by_id));
    }
    out.push(PathBuf::from(&by_id));
    out.extend(debuginfod_cache().map(|cache| cache.join(id).join("debuginfo")));
    if let (Some(root), Some(link)) = (target_root, link) {
        let parent = Path::new(path)
            .parent()
            .and_then(Path::to_str)
            .unwrap_or("/");
        for p in [
            format!("{parent}/{link}"),
            format!("{parent}/.debug/{link}"),
            format!("{DEBUG_ROOT}{parent}/{link}"),
        ] {
            out.push(within(root, &p));
        }
    }
    out
}

/// The debuginfod client's cache, as the client finds it: `$DEBUGINFOD_CACHE_PATH`, else
/// `$XDG_CACHE_HOME/debuginfod_client`, else `~/.cache/debuginfod_client`.
fn debuginfod_cache() -> Option<PathBuf> {
    let var = |name| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    var("DEBUGINFOD_CACHE_PATH")
        .or_else(|| var("XDG_CACHE_HOME").map(|p| p.join("debuginfod_client")))
        .or_else(|| var("HOME").map(|p| p.join(".cache/debuginfod_client")))
}

/// The file name `.gnu_debuglink` holds: a plain name (no directory), NUL-terminated.
fn debuglink(elf: &Elf) -> Option<String> {
    let (at, len) = elf.section(b".gnu_debuglink")?.stored()?;
    let mut raw = vec![0u8; usize::try_from(len).ok()?.min(MAX_DEBUGLINK)];
    elf.file.read_exact_at(&mut raw, at).ok()?;
    let name = &raw[..raw.iter().position(|b| *b == 0)?];
    let name = std::str::from_utf8(name).ok()?;
    (!name.is_empty() && !name.contains('/') && name != "." && name != "..")
        .then(|| name.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn looks_where_perf_and_gdb_look() {
        let got = candidates(
            Some(Path::new("/proc/7/root")),
            "/srv/app/bin/server",
            "7cdeab62cd70",
            Some("server.debug"),
        );
        let got: Vec<&str> = got.iter().filter_map(|p| p.to_str()).collect();
        assert_eq!(
            got[0],
            "/proc/7/root/usr/lib/debug/.build-id/7c/deab62cd70.debug"
        );
        assert_eq!(got[1], "/usr/lib/debug/.build-id/7c/deab62cd70.debug");
        let n = got.len();
        assert_eq!(
            got[n - 3..],
            [
                "/proc/7/root/srv/app/bin/server.debug",
                "/proc/7/root/srv/app/bin/.debug/server.debug",
                "/proc/7/root/usr/lib/debug/srv/app/bin/server.debug",
            ]
        );
        // A process with FUSE mounts: nothing in its file system is looked up.
        let got = candidates(None, "/srv/app/bin/server", "7cdeab62cd70", Some("x.debug"));
        assert!(got.iter().all(|p| !p.starts_with("/proc")), "{got:?}");
    }
}
