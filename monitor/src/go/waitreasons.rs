//! Names of `runtime.waitReason` values (`g.waitreason`).
//!
//! The runtime keeps them in `runtime.waitReasonStrings`, a `[N]string`
//! indexed by the enum value, so reading that array from the binary gives
//! the names for exactly this toolchain. Without `.symtab` we cannot find
//! the array and fall back to the built-in table.

use super::GoError;
use super::elf::Elf;

pub(crate) const SYMBOL: &str = "runtime.waitReasonStrings";
/// A Go string header: {data *byte, len int}.
const STRING_HEADER: u64 = 16;
/// Far more than any Go release has (about 50); guards against a bogus size.
const MAX_REASONS: u64 = 1024;

/// Reads the array via the symbol table; `Ok(None)` if there is no such
/// symbol (stripped binary).
pub(crate) fn from_symtab(elf: &Elf<'_>) -> Result<Option<Vec<String>>, GoError> {
    let Some((addr, size)) = elf.symbol(SYMBOL) else {
        return Ok(None);
    };
    let count = size / STRING_HEADER;
    if !size.is_multiple_of(STRING_HEADER) || count == 0 || count > MAX_REASONS {
        return Err(GoError::BadWaitReasons { size });
    }
    (0..count)
        .map(|i| {
            let header = addr + i * STRING_HEADER;
            let len = elf.read_u64(header + 8)?;
            if len == 0 {
                return Ok(String::new());
            }
            let ptr = elf.read_ptr(header)?;
            let bytes = elf.read_vaddr(ptr, len)?;
            Ok(String::from_utf8_lossy(bytes).into_owned())
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

/// `waitReason(N)`, the fallback name for a value outside the known list.
pub(crate) fn unknown_name(code: u8) -> String {
    format!("waitReason({code})")
}

#[cfg(test)]
mod tests {
    #[test]
    fn unknown_names() {
        assert_eq!(super::unknown_name(200), "waitReason(200)");
    }
}
