//! /proc/PID/maps: the file mappings of a process, read through a cap (the target sets its
//! length).

use std::sync::Arc;

/// Bytes of /proc/PID/maps read at most (about 100,000 mappings).
const MAX_MAPS_BYTES: u64 = 8 << 20;

/// One mapping of /proc/PID/maps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Mapping {
    pub start: u64,
    pub end: u64,
    pub offset: u64,
    pub exec: bool,
    /// (device, inode): the file's identity across processes and mount namespaces.
    pub file: (String, u64),
    pub path: Arc<str>,
}

/// Parses /proc/PID/maps; anonymous mappings are left out.
pub(crate) fn parse_maps(text: &str) -> Vec<Mapping> {
    text.lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let (range, perms, offset, dev, inode) =
                (f.next()?, f.next()?, f.next()?, f.next()?, f.next()?);
            let path = f.collect::<Vec<_>>().join(" ");
            let inode: u64 = inode.parse().ok()?;
            if inode == 0 || !path.starts_with('/') {
                return None;
            }
            let (start, end) = range.split_once('-')?;
            Some(Mapping {
                start: u64::from_str_radix(start, 16).ok()?,
                end: u64::from_str_radix(end, 16).ok()?,
                offset: u64::from_str_radix(offset, 16).ok()?,
                exec: perms.contains('x'),
                file: (dev.to_owned(), inode),
                path: path.into(),
            })
        })
        .collect()
}

/// `pid`'s file mappings.
pub(crate) fn read(pid: u32) -> std::io::Result<Vec<Mapping>> {
    let text = super::files::read_proc_capped(&format!("/proc/{pid}/maps"), MAX_MAPS_BYTES)?;
    Ok(parse_maps(&String::from_utf8_lossy(&text)))
}

/// Every mapping of `pid` (files, anonymous memory, stacks), as sorted (start, end).
pub(crate) fn all_ranges(pid: u32) -> std::io::Result<Vec<(u64, u64)>> {
    let text = super::files::read_proc_capped(&format!("/proc/{pid}/maps"), MAX_MAPS_BYTES)?;
    Ok(parse_all_ranges(&String::from_utf8_lossy(&text)))
}

pub(crate) fn parse_all_ranges(text: &str) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = text
        .lines()
        .filter_map(|line| {
            let (start, end) = line.split_whitespace().next()?.split_once('-')?;
            Some((
                u64::from_str_radix(start, 16).ok()?,
                u64::from_str_radix(end, 16).ok()?,
            ))
        })
        .collect();
    out.sort_unstable();
    out
}

/// The end of the mapping holding `addr` in sorted `ranges`.
pub(crate) fn end_of(ranges: &[(u64, u64)], addr: u64) -> Option<u64> {
    let i = ranges.partition_point(|r| r.0 <= addr).checked_sub(1)?;
    let (start, end) = ranges[i];
    (start..end).contains(&addr).then_some(end)
}

/// `pid`'s private writable anonymous mappings (the heap, thread stacks, allocator arenas):
/// (start, end).
pub(crate) fn anonymous_writable(pid: u32) -> std::io::Result<Vec<(u64, u64)>> {
    let text = super::files::read_proc_capped(&format!("/proc/{pid}/maps"), MAX_MAPS_BYTES)?;
    Ok(parse_anonymous_writable(&String::from_utf8_lossy(&text)))
}

pub(crate) fn parse_anonymous_writable(text: &str) -> Vec<(u64, u64)> {
    text.lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let (range, perms, _, _, inode) =
                (f.next()?, f.next()?, f.next()?, f.next()?, f.next()?);
            let name = f.next();
            if inode != "0" || !perms.starts_with("rw") || !perms.ends_with('p') {
                return None;
            }
            // Named kernel areas ([stack] is the main thread's: not where tasks live).
            if name.is_some_and(|n| n != "[heap]") {
                return None;
            }
            let (start, end) = range.split_once('-')?;
            Some((
                u64::from_str_radix(start, 16).ok()?,
                u64::from_str_radix(end, 16).ok()?,
            ))
        })
        .collect()
}

/// `pid`'s mappings of files on FUSE (see [`super::files::fuse_devices`]).
pub(crate) fn fuse_mappings(pid: u32) -> Vec<Mapping> {
    let fuse = super::files::fuse_devices(pid);
    if fuse.is_empty() {
        return Vec::new();
    }
    let mut maps = read(pid).unwrap_or_default();
    maps.retain(|m| fuse.contains(&m.file.0));
    maps
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mapping_holding_an_address_ends_where_maps_says() {
        let ranges = parse_all_ranges(
            "7f0000000000-7f0000001000 ---p 00000000 00:00 0\n\
             7f0000001000-7f0000801000 rw-p 00000000 00:00 0\n\
             7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0 [stack]\n",
        );
        assert_eq!(end_of(&ranges, 0x7f0000400000), Some(0x7f0000801000));
        assert_eq!(end_of(&ranges, 0x7ffd00000010), Some(0x7ffd00021000));
        assert_eq!(end_of(&ranges, 0x7f0000801000), None);
        assert_eq!(end_of(&ranges, 0x1000), None);
    }

    #[test]
    fn maps_keep_file_mappings() {
        let maps = parse_maps(
            "55d0c0a00000-55d0c0a01000 r--p 00000000 fd:01 1311 /usr/bin/cat\n\
             55d0c0a01000-55d0c0a05000 r-xp 00001000 fd:01 1311 /usr/bin/cat\n\
             7ffd1c000000-7ffd1c021000 rw-p 00000000 00:00 0 [stack]\n\
             7f0000000000-7f0000001000 r-xp 00000000 00:00 0 \n",
        );
        assert_eq!(maps.len(), 2);
        assert!(maps[1].exec && !maps[0].exec);
        assert_eq!((maps[1].start, maps[1].offset), (0x55d0_c0a0_1000, 0x1000));
        assert_eq!(maps[1].file, ("fd:01".to_owned(), 1311));
    }

    #[test]
    fn anonymous_writable_is_heap_and_arenas() {
        let found = parse_anonymous_writable(
            "55d0c0a00000-55d0c0a01000 rw-p 00000000 fd:01 1311 /usr/bin/cat\n\
             55d0c1000000-55d0c1021000 rw-p 00000000 00:00 0 [heap]\n\
             7f0000000000-7f0000100000 rw-p 00000000 00:00 0 \n\
             7f0000100000-7f0000200000 ---p 00000000 00:00 0 \n\
             7ffd1c000000-7ffd1c021000 rw-p 00000000 00:00 0 [stack]\n",
        );
        assert_eq!(
            found,
            vec![
                (0x55d0_c100_0000, 0x55d0_c102_1000),
                (0x7f00_0000_0000, 0x7f00_0010_0000)
            ]
        );
    }
}
