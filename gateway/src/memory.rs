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
//! read-only, backed by a file, and with no anonymous (copy-on-write) page, resident or
//! swapped out. The last condition leaves out the relocated read-only data (RELRO), which the
//! dynamic loader wrote before making it read-only, and any page a debugger patched.
//!
//! The mappings are read from `/proc/self/smaps` and then advised, so the release must not
//! run while another thread maps or unmaps a library (`dlopen`, `dlclose`): a range read as a
//! library's read-only reservation could by then hold its relocated data. The gateway loads
//! its libraries before the first release and releases only after its own loading steps:
//! after the model is loaded (before any connection), once the local link is serving, once
//! the uplink has first connected (name resolution may load libraries), and after an install,
//! a rollback or an adaptation has finished. Something else that loads libraries into the
//! process while it runs (a preloaded plugin) is a reason to set `release_startup_pages =
//! false`.

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
    /// Swapped-out bytes (anonymous pages that are not resident).
    pub swap: u64,
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
            && self.swap == 0
            && self.rss > 0
    }
}

/// Parses smaps text. Lines it does not know are skipped.
pub fn parse_smaps(text: &str) -> Vec<Mapping> {
    let mut out: Vec<Mapping> = Vec::new();
    // Field lines belong to the header above them; after a header that does not parse they
    // are skipped, not credited to the mapping before it.
    let mut current = false;
    for line in text.lines() {
        if let Some(m) = parse_header(line) {
            out.push(m);
            current = true;
            continue;
        }
        if is_header_like(line) {
            current = false;
            continue;
        }
        let Some(last) = out.last_mut().filter(|_| current) else {
            continue;
        };
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
            "Swap:" => last.swap = kib * 1024,
            _ => {}
        }
    }
    out
}

/// A line that starts like a mapping header (`hex-hex ...`), parsed or not.
fn is_header_like(line: &str) -> bool {
    line.split(' ')
        .next()
        .and_then(|r| r.split_once('-'))
        .is_some_and(|(a, b)| {
            !a.is_empty() && a.bytes().all(|c| c.is_ascii_hexdigit()) && !b.is_empty()
        })
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
        swap: 0,
    })
}

/// What a release did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Released {
    /// Mappings released.
    pub mappings: usize,
    /// Resident bytes of those mappings before the release.
    pub bytes: u64,
    /// Mappings the kernel refused (e.g. locked ones), with its error; the others were still
    /// released.
    pub refused: Vec<String>,
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
        // and holds no anonymous page, resident or swapped, so every page in it is an
        // unmodified copy of the file. MADV_DONTNEED only unmaps such pages; the next access
        // maps the same bytes from the page cache (or reads them from the file), so no memory
        // the program can observe changes. This holds as long as no other thread maps or
        // unmaps a library between the read of smaps and this call, which the callers
        // ensure (see the module documentation).
        let advised = unsafe {
            rustix::mm::madvise(
                m.start as *mut std::ffi::c_void,
                m.end - m.start,
                rustix::mm::Advice::LinuxDontNeed,
            )
        };
        match advised {
            Ok(()) => {
                released.mappings += 1;
                released.bytes += m.rss;
            }
            Err(e) => released.refused.push(format!("{}: {e}", m.path)),
        }
    }
    Ok(released)
}

/// [`release_file_pages`] after `what`, logging the outcome (a failure is only logged).
pub fn release_after(what: &str) {
    match release_file_pages() {
        Ok(r) => {
            tracing::info!(
                after = what,
                mappings = r.mappings,
                mib = format_args!("{:.1}", r.bytes as f64 / (1024.0 * 1024.0)),
                "Released resident read-only file pages (code and constants); they stay in the page cache."
            );
            if !r.refused.is_empty() {
                tracing::warn!(after = what, refused = ?r.refused, "Some read-only file pages could not be released.");
            }
        }
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
7f0000400000-7f0000500000 r--p 00000000 08:01 97 /usr/lib/liby.so
Rss:                   4 kB
Anonymous:             0 kB
Swap:                 12 kB
7ffd00000000-7ffd00002000 r-xp 00000000 00:00 0 [vdso]
Rss:                   8 kB
Anonymous:             0 kB
VmFlags: rd ex mr mw me de sd
";

    #[test]
    fn only_clean_private_read_only_file_mappings_are_releasable() {
        let maps = parse_smaps(SAMPLE);
        assert_eq!(maps.len(), 9);
        assert_eq!(maps[1].start, 0x55d0c0100000);
        assert_eq!(maps[1].rss, 4096 * 1024);
        assert_eq!(maps[2].anonymous, 256 * 1024);
        assert_eq!(maps[4].path, "");
        assert_eq!(maps[5].path, "/usr/lib/libx.so (deleted)");
        let releasable: Vec<bool> = maps.iter().map(Mapping::releasable).collect();
        // The relocated constants (anonymous pages), writable data, anonymous memory, a
        // shared mapping, the vDSO and relocated pages that are swapped out are left alone.
        assert_eq!(
            releasable,
            [true, true, false, false, false, true, false, false, false]
        );
    }

    #[test]
    fn fields_after_an_unparsable_header_are_not_credited_to_the_mapping_before() {
        let text = "\
1000-2000 r--p 00000000 08:01 1 /usr/lib/libz.so
Rss:                   4 kB
Anonymous:             0 kB
2000-zzzz r--p 00001000 08:01 1 /usr/lib/libz.so
Rss:                   4 kB
Anonymous:             4 kB
";
        let maps = parse_smaps(text);
        assert_eq!(maps.len(), 1);
        assert_eq!(maps[0].anonymous, 0);
        assert_eq!(maps[0].rss, 4096);
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

    /// The release must not race another thread loading a library (see the module
    /// documentation), and other tests of this binary may load ONNX Runtime. So the test
    /// re-runs itself alone in a child process, which does the release.
    #[test]
    fn release_drops_resident_code_and_the_code_still_runs() {
        const CHILD: &str = "DIREDI_MEMORY_RELEASE_CHILD";
        if std::env::var_os(CHILD).is_none() {
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args([
                    "memory::tests::release_drops_resident_code_and_the_code_still_runs",
                    "--exact",
                    "--test-threads=1",
                    "--nocapture",
                ])
                .env(CHILD, "1")
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success() && text.contains("1 passed"),
                "child: {text}\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            return;
        }
        let before = own_file_rss();
        assert!(before > 0, "this test binary maps its own code");
        let released = release_file_pages().unwrap();
        assert!(released.refused.is_empty(), "{:?}", released.refused);
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
