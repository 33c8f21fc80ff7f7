//! Opening the files a target maps or runs. The target controls them: a mapped library's path
//! may since name a FIFO (open blocks for ever), a device (/dev/zero reads without end) or a
//! huge file. So a file is reached through /proc/PID/map_files (the inode actually mapped,
//! deleted or not, in any mount namespace), looked at with O_PATH before anything opens it
//! for reading, and accepted only as a regular file of the mapped inode within a size cap.
//! Files on FUSE are not opened at all (`fuse_devices`), nor memory mapped from them read
//! (`ProcMem` skips those ranges).

use std::{
    fs::File,
    io,
    os::{
        fd::{AsRawFd, FromRawFd},
        unix::fs::{MetadataExt, OpenOptionsExt},
    },
    path::{Path, PathBuf},
};

/// Largest file read from a target (executables with debug info run to a few hundred MiB).
pub(crate) const MAX_FILE_BYTES: u64 = 1 << 30;

#[derive(Debug, thiserror::Error)]
pub(crate) enum FileError {
    #[error("cannot open {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not a regular file (a FIFO, device or directory): not read")]
    NotRegular { path: PathBuf },
    #[error("{path} is not the file the process mapped (inode {found}, mapped {expected})")]
    Replaced {
        path: PathBuf,
        found: u64,
        expected: u64,
    },
    #[error(
        "{path} has {size} bytes, over the {MAX_FILE_BYTES}-byte limit for files read from targets"
    )]
    TooLarge { path: PathBuf, size: u64 },
}

/// Opens a file `pid` maps at `start..end`, which must be inode `ino` (from /proc/PID/maps),
/// through map_files only: a path looked up under the process's root could pass through a
/// mount the process controls (a FUSE server that never answers). map_files needs
/// CAP_CHECKPOINT_RESTORE (or CAP_SYS_ADMIN).
pub(crate) fn open_mapped(pid: u32, start: u64, end: u64, ino: u64) -> Result<File, FileError> {
    open_checked(
        &PathBuf::from(format!("/proc/{pid}/map_files/{start:x}-{end:x}")),
        Some(ino),
    )
}

/// Opens `path` for reading if it is a regular file (of inode `ino`, when given) within the
/// size cap. Nothing is opened for reading before that is known: an O_PATH descriptor is
/// checked, then reopened, and the reopened file is checked again.
pub(crate) fn open_checked(path: &Path, ino: Option<u64>) -> Result<File, FileError> {
    let open_err = |source| FileError::Open {
        path: path.to_path_buf(),
        source,
    };
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| open_err(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
    // SAFETY: a valid NUL-terminated path; O_PATH neither reads nor runs a driver's open.
    let fd = unsafe { libc::open(c_path.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(open_err(io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just opened and is owned here.
    let handle = unsafe { File::from_raw_fd(fd) };
    check(path, &handle, ino)?;
    // Reopen the very inode checked, for reading; O_NONBLOCK in case it changed kind anyway.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(format!("/proc/self/fd/{}", handle.as_raw_fd()))
        .map_err(open_err)?;
    check(path, &file, ino)?;
    Ok(file)
}

fn check(path: &Path, file: &File, ino: Option<u64>) -> Result<(), FileError> {
    let meta = file.metadata().map_err(|source| FileError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    if !meta.file_type().is_file() {
        return Err(FileError::NotRegular {
            path: path.to_path_buf(),
        });
    }
    if let Some(expected) = ino
        && meta.ino() != expected
    {
        return Err(FileError::Replaced {
            path: path.to_path_buf(),
            found: meta.ino(),
            expected,
        });
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(FileError::TooLarge {
            path: path.to_path_buf(),
            size: meta.len(),
        });
    }
    Ok(())
}

/// A target's file read through a cache that refuses any one read over `max` bytes: ELF
/// headers are parsed through it, so a header that claims a huge table (a hostile file, or
/// a section list one reads by mistake) costs an error, not the daemon's memory.
pub(crate) struct Capped<'a, R: object::ReadCacheOps> {
    pub cache: &'a object::ReadCache<R>,
    pub max: u64,
}

impl<R: object::ReadCacheOps> Clone for Capped<'_, R> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<R: object::ReadCacheOps> Copy for Capped<'_, R> {}

impl<'a, R: object::ReadCacheOps> object::ReadRef<'a> for Capped<'a, R> {
    fn len(self) -> Result<u64, ()> {
        self.cache.len()
    }

    fn read_bytes_at(self, offset: u64, size: u64) -> Result<&'a [u8], ()> {
        if size > self.max {
            return Err(());
        }
        self.cache.read_bytes_at(offset, size)
    }

    fn read_bytes_at_until(
        self,
        range: std::ops::Range<u64>,
        delimiter: u8,
    ) -> Result<&'a [u8], ()> {
        let end = range.end.min(range.start.saturating_add(self.max));
        self.cache.read_bytes_at_until(range.start..end, delimiter)
    }
}

/// Searches `len` bytes of `file` from offset `at` in fixed-size chunks (overlapping by
/// `overlap` bytes, so a match across two chunks is seen whole): `find` gets each chunk and
/// returns what it found. Memory stays at one chunk however long the range.
pub(crate) fn search_range<T>(
    file: &File,
    at: u64,
    len: u64,
    overlap: usize,
    mut find: impl FnMut(&[u8]) -> Option<T>,
) -> Option<T> {
    use std::os::unix::fs::FileExt;
    const CHUNK: usize = 1 << 20;
    let end = at.checked_add(len)?;
    let mut buf = vec![0u8; CHUNK + overlap];
    let (mut at, mut kept) = (at, 0usize);
    while at < end {
        let want = usize::try_from((end - at).min(CHUNK as u64)).ok()?;
        let n = file.read_at(&mut buf[kept..kept + want], at).ok()?;
        if n == 0 {
            return None;
        }
        if let Some(found) = find(&buf[..kept + n]) {
            return Some(found);
        }
        at += n as u64;
        // Keep the chunk's tail in front of the next one.
        let tail = overlap.min(kept + n);
        buf.copy_within(kept + n - tail..kept + n, 0);
        kept = tail;
    }
    None
}

/// Devices (as /proc/PID/maps writes them, "MM:mm" in hex) of the FUSE file systems mounted in
/// `pid`'s mount namespace. Files there are never read: a FUSE request the server does not
/// answer keeps the reader in uninterruptible sleep, past SIGKILL, until the server answers
/// or dies, so one hung FUSE mount could keep leakmon from ever exiting. (NFS and other
/// network file systems wait killably: the deadlines cover them.)
pub(crate) fn fuse_devices(pid: u32) -> std::collections::HashSet<String> {
    let Ok(text) = read_proc_capped(&format!("/proc/{pid}/mountinfo"), 4 << 20) else {
        return Default::default();
    };
    String::from_utf8_lossy(&text)
        .lines()
        .filter_map(|line| {
            // id parent major:minor root mountpoint options [optional...] - fstype source ...
            let (head, tail) = line.split_once(" - ")?;
            let fstype = tail.split_whitespace().next()?;
            if !fstype.starts_with("fuse") {
                return None;
            }
            let (major, minor) = head.split_whitespace().nth(2)?.split_once(':')?;
            let (major, minor) = (major.parse::<u32>().ok()?, minor.parse::<u32>().ok()?);
            Some(format!("{major:02x}:{minor:02x}"))
        })
        .collect()
}

/// Reads at most `limit` bytes of a `/proc` file (the target's own text, of its own size).
pub(crate) fn read_proc_capped(path: &str, limit: u64) -> io::Result<Vec<u8>> {
    use std::io::Read as _;
    let mut out = Vec::new();
    File::open(path)?.take(limit).read_to_end(&mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_fifos_devices_and_other_inodes() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        // Returns at once (no reader or writer needed), and refuses.
        assert!(matches!(
            open_checked(&fifo, None),
            Err(FileError::NotRegular { .. })
        ));
        assert!(matches!(
            open_checked(Path::new("/dev/zero"), None),
            Err(FileError::NotRegular { .. })
        ));
        let link = dir.path().join("zero");
        std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
        assert!(matches!(
            open_checked(&link, None),
            Err(FileError::NotRegular { .. })
        ));
        let plain = dir.path().join("plain");
        std::fs::write(&plain, b"abc").unwrap();
        let opened = open_checked(&plain, None).unwrap().metadata().unwrap();
        assert_eq!(opened.len(), 3);
        assert!(matches!(
            open_checked(&plain, Some(opened.ino() + 1)),
            Err(FileError::Replaced { .. })
        ));
    }

    #[test]
    fn opens_own_mappings_through_map_files() {
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let exe = std::fs::metadata("/proc/self/exe").unwrap().ino();
        let line = maps
            .lines()
            .find(|l| l.split_whitespace().nth(4) == Some(&exe.to_string()))
            .unwrap();
        let (range, _) = line.split_once(' ').unwrap();
        let (s, e) = range.split_once('-').unwrap();
        let opened = open_mapped(
            std::process::id(),
            u64::from_str_radix(s, 16).unwrap(),
            u64::from_str_radix(e, 16).unwrap(),
            exe,
        )
        .unwrap();
        assert_eq!(opened.metadata().unwrap().ino(), exe);
    }
}
