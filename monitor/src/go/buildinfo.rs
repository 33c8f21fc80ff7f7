//! Go toolchain version from the `.go.buildinfo` section.
//!
//! Layout (Go 1.18+): a 32-byte header `"\xff Go buildinf:"`, pointer size,
//! flags, padding; with flag bit 1 set the version and module info follow
//! inline as uvarint-length-prefixed strings. Older layouts store pointers
//! instead; they only occur before go1.18, which we reject anyway.

use std::fmt;

use super::GoError;

const MAGIC: &[u8; 14] = b"\xff Go buildinf:";
const HEADER_LEN: usize = 32;
const FLAG_BIG_ENDIAN: u8 = 1;
const FLAG_INLINE_STRINGS: u8 = 2;

/// A released Go toolchain version, e.g. `go1.24.11`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct GoVersion {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl fmt::Display for GoVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "go{}.{}.{}", self.major, self.minor, self.patch)
    }
}

impl GoVersion {
    /// Parses `runtime.Version()` strings: `go1.24.11`, `go1.21rc2`,
    /// `go1.25.5 X:jsonv2`, `devel go1.26-abcdef ...`. Pre-release and devel
    /// builds map to patch 0.
    pub(crate) fn parse(s: &str) -> Option<GoVersion> {
        let s = s.trim();
        let s = s.strip_prefix("devel ").unwrap_or(s);
        let s = s.split_whitespace().next()?.strip_prefix("go")?;
        let mut parts = s.splitn(3, '.');
        let major = leading_number(parts.next()?)?;
        let minor = leading_number(parts.next()?)?;
        let patch = parts.next().and_then(leading_number).unwrap_or(0);
        Some(GoVersion {
            major,
            minor,
            patch,
        })
    }
}

fn leading_number(s: &str) -> Option<u32> {
    let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    s.get(..end)?.parse().ok()
}

/// Reads a Go `binary.Uvarint`.
pub(crate) fn uvarint(data: &[u8]) -> Option<(u64, usize)> {
    let mut value = 0u64;
    for (i, &b) in data.iter().enumerate().take(10) {
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

/// Extracts the raw version string from `.go.buildinfo` contents.
pub(crate) fn version_string(section: &[u8]) -> Result<String, GoError> {
    // The header is 16-byte aligned; it normally sits at offset 0.
    let start = (0..section.len())
        .step_by(16)
        .find(|&off| section.get(off..off + MAGIC.len()) == Some(MAGIC))
        .ok_or(GoError::BadBuildInfo(
            "magic \"\\xff Go buildinf:\" not found",
        ))?;
    let header = section
        .get(start..start + HEADER_LEN)
        .ok_or(GoError::BadBuildInfo("truncated header"))?;
    let (ptr_size, flags) = (header[14], header[15]);
    if ptr_size != 8 || flags & FLAG_BIG_ENDIAN != 0 {
        return Err(GoError::BadBuildInfo(
            "not a 64-bit little-endian build (pointer size or endianness flag)",
        ));
    }
    if flags & FLAG_INLINE_STRINGS == 0 {
        return Err(GoError::BadBuildInfo(
            "pointer-based layout from before go1.18 (supported: go1.21 to go1.27)",
        ));
    }
    let rest = section.get(start + HEADER_LEN..).unwrap_or_default();
    let (len, n) = uvarint(rest).ok_or(GoError::BadBuildInfo("bad version length"))?;
    let bytes = usize::try_from(len)
        .ok()
        .and_then(|len| rest.get(n..n.checked_add(len)?))
        .ok_or(GoError::BadBuildInfo(
            "version string runs past the section",
        ))?;
    String::from_utf8(bytes.to_vec()).map_err(|_| GoError::BadBuildInfo("version is not utf-8"))
}

/// The main module's path (`mod\t<path>\t...` in the module info that follows the version
/// string), which says which frames are the program's own. `None` without module info (a
/// GOPATH build) or on anything malformed.
pub(crate) fn main_module(section: &[u8]) -> Option<String> {
    let start = (0..section.len())
        .step_by(16)
        .find(|&off| section.get(off..off + MAGIC.len()) == Some(MAGIC))?;
    let rest = section.get(start + HEADER_LEN..)?;
    let (len, n) = uvarint(rest)?;
    let rest = rest.get(n.checked_add(usize::try_from(len).ok()?)?..)?;
    let (len, n) = uvarint(rest)?;
    let info = rest.get(n..n.checked_add(usize::try_from(len).ok()?)?)?;
    let info = String::from_utf8_lossy(info);
    info.lines()
        .find_map(|l| l.strip_prefix("mod\t"))
        .and_then(|l| l.split('\t').next())
        .filter(|p| !p.is_empty())
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn main_module_from_module_info() {
        let mut s = section("go1.24.1", FLAG_INLINE_STRINGS);
        s.pop(); // the empty module info
        let info = "0w\u{af}\u{c}\u{92}t\u{8}\u{2}A\u{e1}\u{c1}\u{7}\u{e6}\u{d6}\u{18}\u{e6}path\torders/cmd/api\nmod\torders\t(devel)\t\ndep\tgithub.com/x/y\tv1.0.0\n";
        s.push(info.len() as u8);
        s.extend_from_slice(info.as_bytes());
        assert_eq!(main_module(&s).as_deref(), Some("orders"));
        assert_eq!(main_module(&section("go1.24.1", FLAG_INLINE_STRINGS)), None);
    }

    fn section(version: &str, flags: u8) -> Vec<u8> {
        let mut s = MAGIC.to_vec();
        s.push(8);
        s.push(flags);
        s.resize(HEADER_LEN, 0);
        s.push(version.len() as u8);
        s.extend_from_slice(version.as_bytes());
        s.push(0);
        s
    }

    #[test]
    fn parses_inline_version() {
        let v = version_string(&section("go1.24.11", 2)).unwrap();
        assert_eq!(v, "go1.24.11");
        assert_eq!(
            GoVersion::parse(&v).unwrap(),
            GoVersion {
                major: 1,
                minor: 24,
                patch: 11
            }
        );
    }

    #[test]
    fn finds_aligned_header_after_padding() {
        let mut s = vec![0u8; 32];
        s.extend(section("go1.21.13", 2));
        assert_eq!(version_string(&s).unwrap(), "go1.21.13");
    }

    #[test]
    fn rejects_old_layout_and_garbage() {
        assert!(matches!(
            version_string(&section("go1.17", 0)),
            Err(GoError::BadBuildInfo(_))
        ));
        assert!(version_string(b"hello").is_err());
        let mut truncated = section("go1.24.11", 2);
        truncated.truncate(HEADER_LEN + 4);
        assert!(version_string(&truncated).is_err());
    }

    #[test]
    fn version_strings() {
        let v = |s| GoVersion::parse(s).map(|v| v.to_string());
        assert_eq!(v("go1.27.3").as_deref(), Some("go1.27.3"));
        assert_eq!(v("go1.21rc2").as_deref(), Some("go1.21.0"));
        assert_eq!(v("go1.25.5 X:jsonv2").as_deref(), Some("go1.25.5"));
        assert_eq!(v("devel go1.26-abcdef Tue").as_deref(), Some("go1.26.0"));
        assert_eq!(v("go1.22").as_deref(), Some("go1.22.0"));
        assert_eq!(v("gccgo"), None);
        assert_eq!(v(""), None);
    }

    #[test]
    fn uvarint_multi_byte() {
        assert_eq!(uvarint(&[0x96, 0x01]), Some((150, 2)));
        assert_eq!(uvarint(&[0x80]), None);
    }
}
