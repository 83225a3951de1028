//! Gives back the resident code pages that only start-up needed.
//!
//! Creating an ONNX Runtime session runs code from all over the library (the kernel registry
//! alone builds thousands of kernel descriptions), and the gateway binary runs its
//! dependencies' start-up constructors. The kernel maps those read-only file pages into the
//! process, and ahead of each fault it maps their page-cache neighbours too ("fault-around",
//! 64 KiB by default). They stay in the process's resident set although serving never runs
//! them again: about 20 MiB of the idle gateway's 40 MiB are such pages.
//!
//! [`release_file_pages`] drops the process's mappings of those pages with
//! `madvise(MADV_DONTNEED)`. The pages stay in the page cache, so a page that is needed again
//! comes back with a minor fault and no disk read; the kernel reclaims the rest like any
//! other unmapped cache when memory is short. Serving maps back only what it runs.
//!
//! Only mappings where this cannot change what the process sees are touched: private,
//! read-only, backed by a file, and with no anonymous (copy-on-write) page. The last
//! condition leaves out the relocated read-only data (RELRO), which the dynamic loader wrote
//! before making it read-only, and any page a debugger patched.

use std::io;

/// One mapping of `/proc/self/smaps`, as far as the release needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    /// First address.
    pub start: usize,
    /// One past the last address.
    pub end: usize,
    /// Permissions, e.g. `r-xp`.
    pub perms: String,
    /// File (or `[heap]`, `[stack]`…; empty for an anonymous mapping).
    pub path: String,
    /// Resident bytes.
    pub rss: u64,
    /// Anonymous (private, written) bytes.
    pub anonymous: u64,
}

impl Mapping {
    /// Private, read-only, file-backed, with every resident page a clean file page.
    pub fn releasable(&self) -> bool {
        let p = self.perms.as_bytes();
        p.len() == 4
            && p[0] == b'r'
            && p[1] == b'-'
            && p[3] == b'p'
            && self.path.starts_with('/')
            && self.anonymous == 0
            && self.rss > 0
    }
}

/// Parses smaps text. Lines it does not know are skipped.
pub fn parse_smaps(text: &str) -> Vec<Mapping> {
    let mut out: Vec<Mapping> = Vec::new();
    for line in text.lines() {
        if let Some(m) = parse_header(line) {
            out.push(m);
            continue;
        }
        let Some(last) = out.last_mut() else { continue };
        let mut fields = line.split_whitespace();
        let (Some(key), Some(value)) = (fields.next(), fields.next()) else {
            continue;
        };
        let Ok(kib) = value.parse::<u64>() else {
            continue;
        };
        match key {
            "Rss:" => last.rss = kib * 1024,
            "Anonymous:" => last.anonymous = kib * 1024,
            _ => {}
        }
    }
    out
}

/// `start-end perms offset dev inode [path]`, or `None` for a field line.
fn parse_header(line: &str) -> Option<Mapping> {
    let mut fields = line.splitn(6, ' ');
    let range = fields.next()?;
    let perms = fields.next()?;
    let (_offset, _dev, _inode) = (fields.next()?, fields.next()?, fields.next()?);
    let (start, end) = range.split_once('-')?;
    let start = usize::from_str_radix(start, 16).ok()?;
    let end = usize::from_str_radix(end, 16).ok()?;
    if perms.len() != 4 || end <= start {
        return None;
    }
    Some(Mapping {
        start,
        end,
        perms: perms.to_owned(),
        path: fields.next().unwrap_or("").trim().to_owned(),
        rss: 0,
        anonymous: 0,
    })
}

/// What a release did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Released {
    /// Mappings released.
    pub mappings: usize,
    /// Resident bytes of those mappings before the release.
    pub bytes: u64,
}

/// Drops this process's resident pages of every [`Mapping::releasable`] mapping.
///
/// The gateway's only `unsafe` block: madvise(2) takes raw addresses.
#[allow(unsafe_code)]
pub fn release_file_pages() -> io::Result<Released> {
    let text = std::fs::read_to_string("/proc/self/smaps")?;
    let mut released = Released::default();
    for m in parse_smaps(&text).iter().filter(|m| m.releasable()) {
        // SAFETY: the range is a whole mapping of this process that is private, read-only
        // and holds no anonymous page, so every resident page is an unmodified copy of the
        // file. MADV_DONTNEED only unmaps such pages; the next access maps the same bytes
        // from the page cache (or reads them from the file), so no memory the program can
        // observe changes. A mapping that went away since smaps was read gives an error,
        // which is returned, and nothing else is affected.
        unsafe {
            rustix::mm::madvise(
                m.start as *mut std::ffi::c_void,
                m.end - m.start,
                rustix::mm::Advice::LinuxDontNeed,
            )?;
        }
        released.mappings += 1;
        released.bytes += m.rss;
    }
    Ok(released)
}

/// [`release_file_pages`] after `what`, logging the outcome (a failure is only logged).
pub fn release_after(what: &str) {
    match release_file_pages() {
        Ok(r) => tracing::info!(
            after = what,
            mappings = r.mappings,
            mib = format_args!("{:.1}", r.bytes as f64 / (1024.0 * 1024.0)),
            "Released resident read-only file pages (code and constants); they stay in the page cache."
        ),
        Err(e) => tracing::warn!(after = what, error = %e, "Cannot release read-only file pages."),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
55d0c0000000-55d0c0100000 r--p 00000000 08:01 1234 /usr/bin/gw
Rss:                 512 kB
Anonymous:             0 kB
55d0c0100000-55d0c0900000 r-xp 00100000 08:01 1234 /usr/bin/gw
Rss:                4096 kB
Anonymous:             0 kB
55d0c0900000-55d0c0a00000 r--p 00900000 08:01 1234 /usr/bin/gw
Rss:                1024 kB
Anonymous:           256 kB
55d0c0a00000-55d0c0b00000 rw-p 00a00000 08:01 1234 /usr/bin/gw
Rss:                 100 kB
Anonymous:           100 kB
7f0000000000-7f0000100000 rw-p 00000000 00:00 0
Rss:                 900 kB
Anonymous:           900 kB
7f0000200000-7f0000300000 r-xp 00000000 08:01 99 /usr/lib/libx.so (deleted)
Rss:                  64 kB
Anonymous:             0 kB
7f0000300000-7f0000400000 r-xs 00000000 08:01 98 /dev/shm/shared
Rss:                  64 kB
Anonymous:             0 kB
7ffd00000000-7ffd00002000 r-xp 00000000 00:00 0 [vdso]
Rss:                   8 kB
Anonymous:             0 kB
VmFlags: rd ex mr mw me de sd
";

    #[test]
    fn only_clean_private_read_only_file_mappings_are_releasable() {
        let maps = parse_smaps(SAMPLE);
        assert_eq!(maps.len(), 8);
        assert_eq!(maps[1].start, 0x55d0c0100000);
        assert_eq!(maps[1].rss, 4096 * 1024);
        assert_eq!(maps[2].anonymous, 256 * 1024);
        assert_eq!(maps[4].path, "");
        assert_eq!(maps[5].path, "/usr/lib/libx.so (deleted)");
        let releasable: Vec<bool> = maps.iter().map(Mapping::releasable).collect();
        // The relocated constants (anonymous pages), writable data, anonymous memory, a
        // shared mapping and the vDSO are left alone.
        assert_eq!(
            releasable,
            [true, true, false, false, false, true, false, false]
        );
    }

    #[test]
    fn garbage_lines_are_skipped() {
        let maps = parse_smaps("Rss: 4 kB\nnot a header\n1-0 r-xp 0 0 0 /x\nzz-1 r-xp 0 0 0 /x\n");
        assert!(maps.is_empty());
    }

    fn own_file_rss() -> u64 {
        let text = std::fs::read_to_string("/proc/self/smaps").unwrap();
        parse_smaps(&text)
            .iter()
            .filter(|m| m.releasable())
            .map(|m| m.rss)
            .sum()
    }

    #[test]
    fn release_drops_resident_code_and_the_code_still_runs() {
        let before = own_file_rss();
        assert!(before > 0, "this test binary maps its own code");
        let released = release_file_pages().unwrap();
        assert!(released.mappings > 0);
        assert!(released.bytes > 0);
        let after = own_file_rss();
        assert!(
            after < before,
            "resident read-only file pages {before} B before, {after} B after the release"
        );
        // Code and constants behave as before (they are mapped back from the page cache).
        let text = format!("{:?}", parse_smaps(SAMPLE)[1]);
        assert!(text.contains("/usr/bin/gw"), "{text}");
        let sum: u64 = (1..=100u64).map(|x| x * x).sum();
        assert_eq!(sum, 338_350);
    }
}
