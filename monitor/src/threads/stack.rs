//! A blocked thread's user stack, taken without stopping it: the kernel reports its stack
//! pointer and instruction pointer in /proc/PID/task/TID/syscall, and the stack memory is
//! read with `process_vm_readv`. Return addresses are found by scanning the stack for words
//! that point just after a call instruction in mapped code, so code built without frame
//! pointers (glibc, optimised C, Rust std) unwinds too.

use std::collections::HashMap;

use super::symbols::{Frame, ProcessSymbols};
use crate::proc::ProcMem;

/// How much of the stack is scanned, from the stack pointer up.
const STACK_BYTES: usize = 16 * 1024;
/// Frames kept (before inline expansion).
const MAX_RETURNS: usize = 24;

/// (stack pointer, instruction pointer) of a thread blocked in the kernel, from the last two
/// fields of its /proc syscall line; None when it is running.
pub(crate) fn registers(syscall_line: &str) -> Option<(u64, u64)> {
    let mut fields = syscall_line.split_whitespace().rev();
    let pc = fields.next()?.strip_prefix("0x")?;
    let sp = fields.next()?.strip_prefix("0x")?;
    Some((
        u64::from_str_radix(sp, 16).ok()?,
        u64::from_str_radix(pc, 16).ok()?,
    ))
}

/// Whether the bytes before a return address end with a call instruction: `call rel32`
/// (E8), or `call r/m64` (FF /2) in its register, memory and displacement forms, with or
/// without a REX prefix.
fn ends_with_call(code: &[u8; 8]) -> bool {
    let is_call_modrm = |modrm: u8| (modrm >> 3) & 7 == 2;
    // E8 rel32
    if code[3] == 0xE8 {
        return true;
    }
    // FF /2 with mod=11 (register) or [reg]: 2 bytes; REX + FF /2: 3 bytes
    if code[6] == 0xFF && is_call_modrm(code[7]) && code[7] >> 6 != 1 && code[7] >> 6 != 2 {
        return true;
    }
    if code[5] == 0xFF && is_call_modrm(code[6]) && code[6] >> 6 == 1 {
        // disp8
        return true;
    }
    if code[2] == 0xFF && is_call_modrm(code[3]) && code[3] >> 6 == 2 {
        // disp32
        return true;
    }
    // FF 15 disp32 (rip-relative) and FF /2 with SIB + disp8
    if code[2] == 0xFF && code[3] == 0x15 {
        return true;
    }
    if code[4] == 0xFF && is_call_modrm(code[5]) && code[5] & 7 == 4 && code[5] >> 6 == 1 {
        return true;
    }
    if code[5] & 0xF0 == 0x40 && code[6] == 0xFF && is_call_modrm(code[7]) {
        return true;
    }
    false
}

/// Takes stacks of blocked threads of one process, remembering which code addresses are
/// return addresses.
pub(crate) struct StackReader {
    mem: ProcMem,
    symbols: ProcessSymbols,
    is_return: HashMap<u64, bool>,
}

impl StackReader {
    pub(crate) fn new(mem: ProcMem, symbols: ProcessSymbols) -> Self {
        Self {
            mem,
            symbols,
            is_return: HashMap::new(),
        }
    }

    /// The code addresses of the stack at (`sp`, `pc`): `pc` first, then return addresses,
    /// innermost first. Frames are followed with the modules' call frame information while
    /// it lasts (exact); where it is missing, or needs a register not known here, the rest of
    /// the stack is scanned.
    pub(crate) fn addresses(&mut self, sp: u64, pc: u64) -> Vec<u64> {
        self.addresses_from(sp, pc, None)
    }

    /// As [`StackReader::addresses`], from a sample that also gave the frame pointer `bp`.
    pub(crate) fn addresses_from(&mut self, sp: u64, pc: u64, bp: Option<u64>) -> Vec<u64> {
        let mut out = vec![pc];
        let (mut rsp, mut rip, mut rbp) = (sp, pc, bp);
        loop {
            let probe = if out.len() == 1 { rip } else { rip - 1 };
            let Some(row) = self.symbols.unwind_row(probe) else {
                break;
            };
            let base = match row.cfa_register {
                7 => rsp,
                6 => match rbp {
                    Some(rbp) => rbp,
                    None => break,
                },
                _ => break,
            };
            let cfa = base.wrapping_add_signed(row.cfa_offset);
            let Some(ra_offset) = row.ra_offset else {
                return out;
            };
            let Some(ra) = self.mem.read_u64(cfa.wrapping_add_signed(ra_offset)) else {
                break;
            };
            if let Some(offset) = row.rbp_offset {
                rbp = self.mem.read_u64(cfa.wrapping_add_signed(offset));
            }
            rsp = cfa;
            rip = ra;
            // The outermost frame returns nowhere.
            if ra == 0 || !self.symbols.is_code(ra) || out.len() > MAX_RETURNS {
                return out;
            }
            out.push(ra);
        }
        self.scan(rsp, &mut out);
        out
    }

    /// Appends the return addresses found on the stack from `sp` up.
    fn scan(&mut self, sp: u64, out: &mut Vec<u64>) {
        let mut stack = vec![0u8; STACK_BYTES];
        // The stack may end before STACK_BYTES: retry smaller.
        let mut len = STACK_BYTES;
        while len >= 512 && !self.mem.read(sp, &mut stack[..len]) {
            len /= 4;
        }
        if len < 512 {
            return;
        }
        for word in stack[..len].as_chunks::<8>().0 {
            let addr = u64::from_le_bytes(*word);
            if addr < 8 || !self.symbols.is_code(addr) {
                continue;
            }
            let mem = &self.mem;
            let is_return = *self.is_return.entry(addr).or_insert_with(|| {
                let mut code = [0u8; 8];
                mem.read(addr - 8, &mut code) && ends_with_call(&code)
            });
            if is_return {
                out.push(addr);
                if out.len() > MAX_RETURNS {
                    break;
                }
            }
        }
    }

    /// Symbolised frames of `addresses` (as returned by [`StackReader::addresses`]).
    pub(crate) fn frames(&mut self, addresses: &[u64]) -> Vec<Frame> {
        let mut frames = Vec::new();
        for (i, addr) in addresses.iter().enumerate() {
            self.symbols.frames(*addr, i == 0, &mut frames);
        }
        frames
    }

    /// Whether a module could not be had in time for some frame (see
    /// [`ProcessSymbols::incomplete`]).
    pub(crate) fn incomplete(&self) -> bool {
        self.symbols.incomplete
    }

    pub(crate) fn is_go_code(&mut self, addr: u64) -> bool {
        self.symbols.is_go_code(addr)
    }

    pub(crate) fn read_u32(&self, addr: u64) -> Option<u32> {
        let mut b = [0u8; 4];
        self.mem.read(addr, &mut b).then(|| u32::from_le_bytes(b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_are_the_last_two_fields() {
        assert_eq!(
            registers("202 0x55beaf82f240 0x80 0x2 0x0 0x0 0x0 0x7fce29fa2ea8 0x7fce2a02d12b"),
            Some((0x7fce_29fa_2ea8, 0x7fce_2a02_d12b))
        );
        assert_eq!(registers("-1 0x7ffd0 0x4005"), Some((0x7ffd0, 0x4005)));
        assert_eq!(registers("running"), None);
    }

    #[test]
    fn call_forms() {
        let with_tail = |tail: &[u8]| {
            let mut code = [0x90u8; 8];
            code[8 - tail.len()..].copy_from_slice(tail);
            code
        };
        assert!(ends_with_call(&with_tail(&[0xE8, 1, 2, 3, 4])));
        assert!(ends_with_call(&with_tail(&[0xFF, 0xD0]))); // call rax
        assert!(ends_with_call(&with_tail(&[0x41, 0xFF, 0xD4]))); // call r12
        assert!(ends_with_call(&with_tail(&[0xFF, 0x15, 1, 2, 3, 4]))); // call [rip+x]
        assert!(ends_with_call(&with_tail(&[0xFF, 0x50, 0x08]))); // call [rax+8]
        assert!(!ends_with_call(&with_tail(&[0x48, 0x89, 0xC7]))); // mov rdi, rax
        assert!(!ends_with_call(&[0x90; 8]));
    }
}
