//! Reading another process's memory without stopping it: `/proc/PID/mem` (one pread per
//! read), and `process_vm_readv` for many small reads in one system call.

use std::{fs::File, os::unix::fs::FileExt};

use super::{ProcError, proc_err};

/// Iovecs per `process_vm_readv` call (the kernel's IOV_MAX).
const IOV_MAX: usize = 1024;

/// The little-endian word at `off` of what was read, if it is all there.
pub(crate) fn u64_at(data: &[u8], off: usize) -> Option<u64> {
    let b = data.get(off..off.checked_add(8)?)?;
    Some(u64::from_le_bytes(b.try_into().ok()?))
}

#[derive(Debug)]
pub(crate) struct ProcMem {
    pid: u32,
    file: File,
    /// Ranges mapped from files on FUSE: never read (a page fault there may wait on a FUSE
    /// server for ever, past SIGKILL). The target chooses the addresses leakmon reads (stack
    /// pointers, lock words, goroutine pointers), so it could point them there.
    fuse: Vec<(u64, u64)>,
}

impl ProcMem {
    pub(crate) fn open(pid: u32) -> Result<Self, ProcError> {
        let file = File::open(format!("/proc/{pid}/mem")).map_err(|e| proc_err(pid, "mem", e))?;
        Ok(Self {
            pid,
            file,
            fuse: Vec::new(),
        })
        .map(|mut mem| {
            mem.set_fuse_mappings(&super::maps::fuse_mappings(pid));
            mem
        })
    }

    /// The process's mappings of FUSE files, as found now (a long-watched process may have
    /// made some since it was opened).
    pub(crate) fn set_fuse_mappings(&mut self, fuse: &[super::maps::Mapping]) {
        self.fuse = fuse.iter().map(|m| (m.start, m.end)).collect();
    }

    fn touches_fuse(&self, addr: u64, len: usize) -> bool {
        let end = addr.saturating_add(len as u64);
        self.fuse.iter().any(|&(s, e)| addr < e && end > s)
    }

    /// Reads `len` bytes at each of `addrs` into consecutive `len`-byte slots of one buffer,
    /// up to 1,024 reads per system call, and says which slots were read whole.
    pub(crate) fn read_many(&self, addrs: &[u64], len: usize) -> (Vec<u8>, Vec<bool>) {
        let ranges: Vec<(u64, usize)> = addrs.iter().map(|a| (*a, len)).collect();
        let mut buf = vec![0u8; addrs.len() * len];
        let ok = self.read_ranges(&ranges, &mut buf);
        (buf, ok)
    }

    /// Reads each `(addr, len)` of `ranges` into consecutive slots of `buf` (which must hold
    /// their sum), up to 1,024 reads per system call, and says which were read whole.
    pub(crate) fn read_ranges(&self, ranges: &[(u64, usize)], buf: &mut [u8]) -> Vec<bool> {
        let mut ok = vec![false; ranges.len()];
        let mut starts = Vec::with_capacity(ranges.len());
        let mut at = 0usize;
        for (_, len) in ranges {
            starts.push(at);
            at = at.saturating_add(*len);
        }
        if at > buf.len() {
            return ok;
        }
        let slot = |j: usize| starts[j]..starts[j] + ranges[j].1;
        if ranges.iter().any(|(a, len)| self.touches_fuse(*a, *len)) {
            // Rare: one read at a time, each checked.
            for j in 0..ranges.len() {
                ok[j] = self.read(ranges[j].0, &mut buf[slot(j)]);
            }
            return ok;
        }
        let mut i = 0;
        while i < ranges.len() {
            let n = (ranges.len() - i).min(IOV_MAX);
            let base = buf.as_mut_ptr();
            let local: Vec<libc::iovec> = (i..i + n)
                .map(|j| libc::iovec {
                    // SAFETY: every slot lies inside `buf` (checked above).
                    iov_base: unsafe { base.add(starts[j]) }.cast(),
                    iov_len: ranges[j].1,
                })
                .collect();
            let remote: Vec<libc::iovec> = ranges[i..i + n]
                .iter()
                .map(|(a, len)| libc::iovec {
                    iov_base: *a as *mut libc::c_void,
                    iov_len: *len,
                })
                .collect();
            // SAFETY: every local iovec points into `buf`, which outlives the call; remote
            // addresses are only read by the kernel, which checks them.
            let read = unsafe {
                libc::process_vm_readv(
                    self.pid as libc::pid_t,
                    local.as_ptr(),
                    n as libc::c_ulong,
                    remote.as_ptr(),
                    n as libc::c_ulong,
                    0,
                )
            };
            // The kernel stops at the first remote range it cannot read: the ranges before it
            // are whole; read that one alone (it may be fine, e.g. only its tail is unmapped)
            // and go on after it.
            let mut left = usize::try_from(read).unwrap_or(0);
            let mut whole = 0;
            while whole < n && left >= ranges[i + whole].1 {
                left -= ranges[i + whole].1;
                whole += 1;
            }
            ok[i..i + whole].fill(true);
            if whole == n {
                i += n;
            } else {
                let j = i + whole;
                ok[j] = self.read(ranges[j].0, &mut buf[slot(j)]);
                i = j + 1;
            }
        }
        ok
    }

    /// Fills `buf` from `addr`; `false` when the memory is not readable (unmapped, or the
    /// process is gone): callers treat that as "not known now".
    pub(crate) fn read(&self, addr: u64, buf: &mut [u8]) -> bool {
        addr != 0
            && !self.touches_fuse(addr, buf.len())
            && self.file.read_exact_at(buf, addr).is_ok()
    }

    pub(crate) fn read_u64(&self, addr: u64) -> Option<u64> {
        let mut b = [0u8; 8];
        self.read(addr, &mut b).then(|| u64::from_le_bytes(b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_many_reads_whole_slots_and_skips_unreadable_ones() {
        let mem = ProcMem::open(std::process::id()).unwrap();
        let blocks: Vec<[u8; 16]> = (0u8..3).map(|i| [i + 1; 16]).collect();
        let mut addrs: Vec<u64> = blocks.iter().map(|b| b.as_ptr() as u64).collect();
        // Unmapped (the zero page) between readable ones, and more slots than one batch.
        addrs.insert(1, 8);
        addrs.extend(std::iter::repeat_n(blocks[2].as_ptr() as u64, IOV_MAX + 5));
        let (buf, ok) = mem.read_many(&addrs, 16);
        assert_eq!(&ok[..4], &[true, false, true, true]);
        assert!(ok[4..].iter().all(|o| *o));
        assert_eq!(&buf[..16], &[1; 16]);
        assert_eq!(&buf[16..32], &[0; 16]);
        assert_eq!(&buf[32..48], &[2; 16]);
        assert_eq!(&buf[buf.len() - 16..], &[3; 16]);
    }
}
