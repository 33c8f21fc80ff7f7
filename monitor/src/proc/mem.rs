//! Reading another process's memory without stopping it (`/proc/PID/mem`, one pread per read).

use std::{fs::File, os::unix::fs::FileExt};

use super::{ProcError, proc_err};

#[derive(Debug)]
pub struct ProcMem {
    file: File,
}

impl ProcMem {
    pub fn open(pid: u32) -> Result<Self, ProcError> {
        let file = File::open(format!("/proc/{pid}/mem")).map_err(|e| proc_err(pid, "mem", e))?;
        Ok(Self { file })
    }

    /// Fills `buf` from `addr`; `false` when the memory is not readable (unmapped, or the
    /// process is gone): callers treat that as "not known now".
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> bool {
        addr != 0 && self.file.read_exact_at(buf, addr).is_ok()
    }

    pub fn read_u64(&self, addr: u64) -> Option<u64> {
        let mut b = [0u8; 8];
        self.read(addr, &mut b).then(|| u64::from_le_bytes(b))
    }
}
