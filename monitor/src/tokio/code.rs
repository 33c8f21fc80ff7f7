//! Reading a little machine code: where a task's poll function goes. Bounded, and read from
//! the process (code the program maps is what runs).

use crate::proc::ProcMem;

/// Bytes of a function read for its calls.
const BODY: usize = 2048;
/// Calls returned at most.
const MAX_CALLS: usize = 16;

/// Targets of the `call rel32` and `jmp rel32` instructions of the function at `addr`, in
/// order, up to the `int3` padding after it. A byte scan, not a disassembly: callers check
/// each target against the symbols.
pub(crate) fn branches(mem: &ProcMem, addr: u64) -> Vec<u64> {
    let mut body = vec![0u8; BODY];
    if !mem.read(addr, &mut body) {
        return Vec::new();
    }
    scan_branches(addr, &body)
}

pub(crate) fn scan_branches(start: u64, body: &[u8]) -> Vec<u64> {
    let mut out = Vec::new();
    let mut i = 0;
    while i + 5 <= body.len() && out.len() < MAX_CALLS {
        // Functions are padded with int3: the body ends there.
        if body[i] == 0xCC && body[i + 1] == 0xCC {
            break;
        }
        if body[i] == 0xE8 || body[i] == 0xE9 {
            let rel = i32::from_le_bytes([body[i + 1], body[i + 2], body[i + 3], body[i + 4]]);
            let target = start
                .wrapping_add(i as u64 + 5)
                .wrapping_add_signed(i64::from(rel));
            if !out.contains(&target) {
                out.push(target);
            }
            i += 5;
        } else {
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn branch_targets_up_to_padding() {
        // push rbp; call +0x10; nop; jmp -0x20; int3; int3; call +0
        let body = [
            0x55, 0xE8, 0x10, 0, 0, 0, 0x90, 0xE9, 0xE0, 0xFF, 0xFF, 0xFF, 0xCC, 0xCC, 0xE8, 0, 0,
            0, 0,
        ];
        assert_eq!(
            scan_branches(0x1000, &body),
            vec![0x1016, 0x1000 + 12 - 0x20]
        );
    }
}
