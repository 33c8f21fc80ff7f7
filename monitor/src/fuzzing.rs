//! Entry points for the fuzz targets (fuzz/, cargo-fuzz): every reader of input a target
//! controls, fed arbitrary bytes. Each must return, whatever the bytes, without panicking,
//! hanging or allocating without bound. Not an API otherwise.

use std::{
    fs::File,
    io::Write as _,
    os::fd::{AsRawFd as _, FromRawFd as _},
    path::PathBuf,
};

/// `data` as a file of its own (memory-backed), and a path that opens it.
fn memfd(data: &[u8]) -> Option<(File, PathBuf)> {
    // SAFETY: a valid NUL-terminated name; the descriptor is owned by the File below.
    let fd = unsafe { libc::memfd_create(c"leakmon-fuzz".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return None;
    }
    // SAFETY: just created, owned here.
    let mut file = unsafe { File::from_raw_fd(fd) };
    file.write_all(data).ok()?;
    let path = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
    Some((file, path))
}

/// A Go executable: ELF, build info, pclntab, DWARF offsets, stripped-binary heuristics.
pub fn go_binary(data: &[u8]) {
    if let Some((_file, path)) = memfd(data) {
        crate::go::GoBinary::exercise(&path);
    }
}

/// A native module: ELF symbols, DWARF lines, `.eh_frame` unwinding.
pub fn native_module(data: &[u8]) {
    if let Some((file, _)) = memfd(data) {
        crate::threads::symbols::exercise_module(file);
    }
}

/// A tokio executable (version, sections, code ranges), the task vtables searched for in
/// relocated data, the machine code followed from them, and the symbol names future types are
/// read from.
pub fn tokio_binary(data: &[u8]) {
    if let Some((file, _)) = memfd(data) {
        crate::tokio::exercise_file(file);
    }
    crate::tokio::exercise(data);
}

/// The kernel's BTF (as /sys/kernel/btf/vmlinux holds it).
pub fn btf(data: &[u8]) {
    let _ = crate::bpf::member_offset(data, "task_struct", "pid");
}

/// /proc/PID/maps text and /proc/PID/task/TID/syscall lines.
pub fn proc_text(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let _ = crate::proc::maps::parse_maps(&text);
    let _ = crate::proc::maps::parse_anonymous_writable(&text);
    let _ = crate::threads::stack::registers(&text);
    let _ = crate::threads::futex::from_proc_syscall(&text, 1, 0);
}
