//! Field offsets of kernel structures from the kernel's own BTF (/sys/kernel/btf/vmlinux),
//! for the programs that read a structure a tracepoint hands them: the layout is the running
//! kernel's, not one written down in the code.

/// Kinds whose trailing data is sized by `vlen` (bytes per item), or fixed.
fn trailing(kind: u32, vlen: usize) -> Option<usize> {
    Some(match kind {
        // INT, VAR, DECL_TAG
        1 | 14 | 17 => 4,
        // ARRAY
        3 => 12,
        // STRUCT, UNION, DATASEC, ENUM64
        4 | 5 | 15 | 19 => 12 * vlen,
        // ENUM, FUNC_PROTO
        6 | 13 => 8 * vlen,
        // PTR, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, FLOAT, TYPE_TAG
        2 | 7..=12 | 16 | 18 => 0,
        _ => return None,
    })
}

fn u32_at(data: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        data.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}

fn str_at(strings: &[u8], at: usize) -> Option<&[u8]> {
    let s = strings.get(at..)?;
    Some(&s[..s.iter().position(|b| *b == 0)?])
}

/// Byte offset of `member` in `struct name`, looking only at its direct members.
pub(crate) fn member_offset(btf: &[u8], name: &str, member: &str) -> Option<u32> {
    if u16::from_le_bytes(btf.get(..2)?.try_into().ok()?) != 0xeb9f {
        return None;
    }
    let hdr_len = u32_at(btf, 4)? as usize;
    let (type_off, type_len) = (u32_at(btf, 8)? as usize, u32_at(btf, 12)? as usize);
    let (str_off, str_len) = (u32_at(btf, 16)? as usize, u32_at(btf, 20)? as usize);
    let types_start = hdr_len.checked_add(type_off)?;
    let types = btf.get(types_start..types_start.checked_add(type_len)?)?;
    let strings_start = hdr_len.checked_add(str_off)?;
    let strings = btf.get(strings_start..strings_start.checked_add(str_len)?)?;
    let mut at = 0;
    while at + 12 <= types.len() {
        let name_off = u32_at(types, at)? as usize;
        let info = u32_at(types, at + 4)?;
        let (vlen, kind, kind_flag) = ((info & 0xffff) as usize, (info >> 24) & 0x1f, info >> 31);
        let body = at + 12;
        let next = body.checked_add(trailing(kind, vlen)?)?;
        if kind == 4 && str_at(strings, name_off)? == name.as_bytes() {
            for i in 0..vlen {
                let m = body + 12 * i;
                if str_at(strings, u32_at(types, m)? as usize)? == member.as_bytes() {
                    let bits = u32_at(types, m + 8)?;
                    // With kind_flag the high 8 bits are a bitfield size.
                    let bits = if kind_flag == 1 {
                        bits & 0xff_ffff
                    } else {
                        bits
                    };
                    return (bits % 8 == 0).then_some(bits / 8);
                }
            }
            return None;
        }
        at = next;
    }
    None
}

/// Offset of `pid` in this kernel's `struct task_struct` (`tgid` follows it), or None when the
/// kernel has no BTF or the layout is not the expected one.
pub(super) fn task_pid_offset() -> Option<u32> {
    let btf = std::fs::read("/sys/kernel/btf/vmlinux").ok()?;
    let pid = member_offset(&btf, "task_struct", "pid")?;
    let tgid = member_offset(&btf, "task_struct", "tgid")?;
    (tgid == pid + 4).then_some(pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_task_struct_pid_in_the_running_kernel() {
        let btf = std::fs::read("/sys/kernel/btf/vmlinux").unwrap();
        let pid = member_offset(&btf, "task_struct", "pid").unwrap();
        assert_eq!(member_offset(&btf, "task_struct", "tgid"), Some(pid + 4));
        assert!(pid > 0 && pid < 16384, "{pid}");
        assert_eq!(task_pid_offset(), Some(pid));
        assert_eq!(member_offset(&btf, "task_struct", "no_such_field"), None);
        assert_eq!(member_offset(b"not btf at all", "task_struct", "pid"), None);
        assert_eq!(member_offset(&btf[..64], "task_struct", "pid"), None);
    }
}
