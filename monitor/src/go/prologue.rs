//! Recognises the Go amd64 function prologue so uprobes can sit on the
//! `push rbp` instead of the first instruction.
//!
//! Why: the kernel emulates `push` in the uprobe handler, while the stack
//! bound check (`cmp`/`lea`) must be single-stepped out of line, which costs
//! about four times as much. Probing after the check is still correct for
//! argument reads because the check only compares and branches to
//! `morestack`, which re-enters the function from its entry (and so
//! reaches the probe again with the same registers).
//!
//! Only the exact sequences below are accepted; anything else yields
//! `None` and callers probe the entry.
//!
//! ```text
//! 49 3b 66 10                 cmp  rsp, [r14+0x10]          (small frame)
//! 4d 8d 64 24 XX              lea  r12, [rsp+disp8]         (large frame)
//! 4d 8d a4 24 XX XX XX XX     lea  r12, [rsp+disp32]
//!   followed by 4d 3b 66 10   cmp  r12, [r14+0x10]
//! then 76 XX | 0f 86 XX XX XX XX   jbe morestack
//! then 55                     push rbp
//! or just 55 at the entry     (nosplit function with a frame)
//! ```

use std::fmt;

const PUSH_RBP: u8 = 0x55;
const CMP_RSP_STACKGUARD: [u8; 4] = [0x49, 0x3b, 0x66, 0x10];
const CMP_R12_STACKGUARD: [u8; 4] = [0x4d, 0x3b, 0x66, 0x10];
const LEA_R12_DISP8: [u8; 4] = [0x4d, 0x8d, 0x64, 0x24];
const LEA_R12_DISP32: [u8; 4] = [0x4d, 0x8d, 0xa4, 0x24];

/// How the stack bound is computed before the comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum StackCheck {
    /// `cmp rsp, [r14+0x10]`
    Cmp,
    /// `lea r12, [rsp+disp8]; cmp r12, [r14+0x10]`
    LeaDisp8,
    /// `lea r12, [rsp+disp32]; cmp r12, [r14+0x10]`
    LeaDisp32,
}

/// A recognised prologue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Prologue {
    /// Stack check and `jbe` (rel8 if `short_jbe`), then `push rbp`.
    Checked {
        check: StackCheck,
        short_jbe: bool,
        push_offset: usize,
    },
    /// `push rbp` is the first instruction.
    PushFirst,
    /// Not one of the known sequences.
    Unrecognised,
}

impl Prologue {
    /// Offset of `push rbp` from the entry, if recognised.
    pub(crate) fn push_offset(self) -> Option<usize> {
        match self {
            Prologue::Checked { push_offset, .. } => Some(push_offset),
            Prologue::PushFirst => Some(0),
            Prologue::Unrecognised => None,
        }
    }
}

impl fmt::Display for Prologue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Prologue::Checked {
                check,
                short_jbe,
                push_offset,
            } => {
                let check = match check {
                    StackCheck::Cmp => "cmp rsp",
                    StackCheck::LeaDisp8 => "lea r12 disp8; cmp r12",
                    StackCheck::LeaDisp32 => "lea r12 disp32; cmp r12",
                };
                let jbe = if *short_jbe { "jbe rel8" } else { "jbe rel32" };
                write!(f, "{check}; {jbe}; push rbp @+{push_offset}")
            }
            Prologue::PushFirst => f.write_str("push rbp @+0"),
            Prologue::Unrecognised => f.write_str("unrecognised"),
        }
    }
}

/// Classifies the first bytes of a function (at least 18 are needed for the
/// longest form; fewer is fine if the function is shorter).
pub(crate) fn analyze(code: &[u8]) -> Prologue {
    if code.first() == Some(&PUSH_RBP) {
        return Prologue::PushFirst;
    }
    let (check, after_check) = if code.starts_with(&CMP_RSP_STACKGUARD) {
        (StackCheck::Cmp, 4)
    } else if code.starts_with(&LEA_R12_DISP8) {
        (StackCheck::LeaDisp8, 5)
    } else if code.starts_with(&LEA_R12_DISP32) {
        (StackCheck::LeaDisp32, 8)
    } else {
        return Prologue::Unrecognised;
    };
    let Some(mut rest) = code.get(after_check..) else {
        return Prologue::Unrecognised;
    };
    let mut pos = after_check;
    if check != StackCheck::Cmp {
        if !rest.starts_with(&CMP_R12_STACKGUARD) {
            return Prologue::Unrecognised;
        }
        pos += 4;
        rest = rest.get(4..).unwrap_or_default();
    }
    let (short_jbe, jbe_len) = match rest {
        [0x76, _, ..] => (true, 2),
        [0x0f, 0x86, _, _, _, _, ..] => (false, 6),
        _ => return Prologue::Unrecognised,
    };
    pos += jbe_len;
    if code.get(pos) != Some(&PUSH_RBP) {
        return Prologue::Unrecognised;
    }
    Prologue::Checked {
        check,
        short_jbe,
        push_offset: pos,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn push_at(code: &[u8]) -> Option<usize> {
        analyze(code).push_offset()
    }

    #[test]
    fn cmp_short_jbe() {
        let code = [0x49, 0x3b, 0x66, 0x10, 0x76, 0x2a, 0x55, 0x48, 0x89, 0xe5];
        assert_eq!(push_at(&code), Some(6));
        assert_eq!(
            analyze(&code),
            Prologue::Checked {
                check: StackCheck::Cmp,
                short_jbe: true,
                push_offset: 6
            }
        );
    }

    #[test]
    fn cmp_near_jbe() {
        let code = [0x49, 0x3b, 0x66, 0x10, 0x0f, 0x86, 1, 2, 0, 0, 0x55];
        assert_eq!(push_at(&code), Some(10));
    }

    #[test]
    fn lea_disp8_and_disp32() {
        let d8 = [
            0x4d, 0x8d, 0x64, 0x24, 0xd8, 0x4d, 0x3b, 0x66, 0x10, 0x76, 0x10, 0x55,
        ];
        assert_eq!(push_at(&d8), Some(11));
        let d32 = [
            0x4d, 0x8d, 0xa4, 0x24, 0x00, 0xfe, 0xff, 0xff, 0x4d, 0x3b, 0x66, 0x10, 0x0f, 0x86,
            0x10, 0x02, 0x00, 0x00, 0x55,
        ];
        assert_eq!(push_at(&d32), Some(18));
        assert_eq!(
            analyze(&d32).to_string(),
            "lea r12 disp32; cmp r12; jbe rel32; push rbp @+18"
        );
    }

    #[test]
    fn push_first() {
        assert_eq!(analyze(&[0x55, 0x48, 0x89, 0xe5]), Prologue::PushFirst);
        assert_eq!(push_at(&[0x55]), Some(0));
    }

    #[test]
    fn rejects_near_misses() {
        // cmp against a different guard offset
        assert_eq!(push_at(&[0x49, 0x3b, 0x66, 0x18, 0x76, 0x2a, 0x55]), None);
        // lea not followed by cmp r12
        assert_eq!(
            push_at(&[0x4d, 0x8d, 0x64, 0x24, 0xd8, 0x76, 0x10, 0x55]),
            None
        );
        // jbe not followed by push (old SUBQ-first frame layout)
        assert_eq!(
            push_at(&[0x49, 0x3b, 0x66, 0x10, 0x76, 0x2a, 0x48, 0x83, 0xec, 0x18]),
            None
        );
        // jb instead of jbe
        assert_eq!(push_at(&[0x49, 0x3b, 0x66, 0x10, 0x72, 0x2a, 0x55]), None);
        // truncated
        assert_eq!(push_at(&[0x49, 0x3b, 0x66, 0x10, 0x0f, 0x86, 1]), None);
        assert_eq!(push_at(&[0x4d, 0x8d, 0xa4]), None);
        assert_eq!(push_at(&[]), None);
        // MOVQ (TLS), CX style or plain sub
        assert_eq!(push_at(&[0x48, 0x83, 0xec, 0x18]), None);
    }
}
