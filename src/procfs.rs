//! What Linux's `/proc` says about a process: its CPU time and resident memory (compute's
//! `dlb.v1.Load` reports its own; control samples each instance's).

/// Linux reports CPU times in `/proc` in USER_HZ ticks, which the kernel ABI fixes at 100/s.
const TICKS_PER_SECOND: u64 = 100;

/// CPU time and memory of a process.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// User + system CPU time, microseconds.
    pub cpu_micros: u64,
    /// Resident set size, bytes.
    pub rss_bytes: u64,
}

impl Usage {
    /// This process's usage; `None` where `/proc` is missing (not Linux).
    pub fn own() -> Option<Self> {
        Self::read("self")
    }

    /// Process `pid`'s usage; `None` when it is gone (or `/proc` is missing).
    pub fn of(pid: u32) -> Option<Self> {
        Self::read(&pid.to_string())
    }

    fn read(pid: &str) -> Option<Self> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Fields after the command name (which may contain spaces) start after the last ')'.
        let rest = stat.rsplit_once(')')?.1;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after the name.
        let utime: u64 = fields.get(11)?.parse().ok()?;
        let stime: u64 = fields.get(12)?.parse().ok()?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let rss_kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(Self {
            cpu_micros: (utime + stime) * (1_000_000 / TICKS_PER_SECOND),
            rss_bytes: rss_kib * 1024,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_usage_is_read_and_cpu_time_moves() {
        let usage = Usage::own().expect("/proc is readable on Linux");
        assert!(usage.rss_bytes > 0);
        let mut x = 0u64;
        let start = std::time::Instant::now();
        while start.elapsed() < std::time::Duration::from_millis(50) {
            x = x.wrapping_add(std::hint::black_box(1));
        }
        std::hint::black_box(x);
        assert!(Usage::own().unwrap().cpu_micros > 0);
        assert_eq!(
            Usage::of(std::process::id()).map(|u| u.rss_bytes > 0),
            Some(true)
        );
    }

    #[test]
    fn a_missing_process_has_no_usage() {
        assert_eq!(Usage::of(u32::MAX), None);
    }
}
