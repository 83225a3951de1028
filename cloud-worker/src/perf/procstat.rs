//! What `/proc` says about a process: CPU time and memory. Linux only; `None` when the process
//! is gone or the file has an unexpected shape.

/// `/proc/<pid>/stat` counts CPU time in USER_HZ ticks, which Linux fixes at 100 per second on
/// every architecture the gateway targets (x86_64, aarch64).
const USER_HZ: f64 = 100.0;

/// User + system CPU seconds used so far by `pid` (its threads included, waited-for children
/// not).
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: fields after it.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3, so utime (14) and stime (15) are at 11 and 12.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / USER_HZ)
}

fn status_kib(pid: u32, key: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Resident memory now, MiB.
pub fn rss_mib(pid: u32) -> Option<f64> {
    status_kib(pid, "VmRSS:").map(|k| k / 1024.0)
}

/// Highest resident memory since the process started (the kernel's high-water mark), MiB.
pub fn rss_peak_mib(pid: u32) -> Option<f64> {
    status_kib(pid, "VmHWM:").map(|k| k / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_cpu_time_and_memory() {
        let me = std::process::id();
        assert!(cpu_seconds(me).is_some_and(|s| s >= 0.0));
        let rss = rss_mib(me).unwrap_or(0.0);
        let peak = rss_peak_mib(me).unwrap_or(0.0);
        assert!(rss > 0.0 && peak >= rss);
    }
}
