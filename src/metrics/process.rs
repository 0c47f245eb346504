//! `process_*` metrics, read from the kernel at each scrape (Linux): open and maximum file
//! descriptors, resident and virtual memory, CPU seconds, threads and start time, under
//! the names every Prometheus client library uses, so stock dashboards and alerts apply.
//! A value the kernel does not give (no /proc) is left out of the scrape.

use nix::sys::resource::{Resource, UsageWho, getrlimit, getrusage};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

/// Linux reports clock ticks to user space in USER_HZ, which the ABI fixes at 100.
const USER_HZ: f64 = 100.0;

/// The collector registered on the metrics registry.
#[derive(Debug)]
pub struct ProcessCollector {
    /// Seconds since the Unix epoch; read once, it cannot change.
    start_time: Option<f64>,
}

impl Default for ProcessCollector {
    fn default() -> Self {
        Self::new()
    }
}

impl ProcessCollector {
    pub fn new() -> Self {
        ProcessCollector {
            start_time: start_time(),
        }
    }
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut gauge = |name: &str, help: &str, value: Option<f64>| {
            let Some(v) = value else { return Ok(()) };
            let g = ConstGauge::new(v);
            g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)
        };
        gauge(
            "process_open_fds",
            "Number of open file descriptors.",
            open_fds().map(|n| n as f64),
        )?;
        gauge(
            "process_max_fds",
            "Maximum number of open file descriptors (the soft RLIMIT_NOFILE).",
            getrlimit(Resource::RLIMIT_NOFILE)
                .ok()
                .map(|(soft, _)| soft as f64),
        )?;
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        gauge(
            "process_resident_memory_bytes",
            "Resident memory size in bytes.",
            status_kib(&status, "VmRSS:").map(|k| k * 1024.0),
        )?;
        gauge(
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes.",
            status_kib(&status, "VmSize:").map(|k| k * 1024.0),
        )?;
        gauge(
            "process_threads",
            "Number of OS threads in the process.",
            status_kib(&status, "Threads:"),
        )?;
        gauge(
            "process_start_time_seconds",
            "Start time of the process since the Unix epoch in seconds.",
            self.start_time,
        )?;
        if let Ok(u) = getrusage(UsageWho::RUSAGE_SELF) {
            let secs = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
            let c = ConstCounter::new(secs(u.user_time()) + secs(u.system_time()));
            c.encode(encoder.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds.",
                None,
                c.metric_type(),
            )?)?;
        }
        Ok(())
    }
}

/// Entries of /proc/self/fd, less the descriptor that lists them.
fn open_fds() -> Option<usize> {
    let n = std::fs::read_dir("/proc/self/fd").ok()?.count();
    Some(n.saturating_sub(1))
}

/// The number after `key` in /proc/self/status (`VmRSS:   1234 kB` → 1234).
fn status_kib(status: &str, key: &str) -> Option<f64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// Boot time (/proc/stat `btime`) plus the process start in ticks since boot
/// (/proc/self/stat field 22).
fn start_time() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) may hold spaces and parentheses: count after the last ')'.
    let after = &stat[stat.rfind(')')? + 1..];
    // `after` starts at field 3, so field 22 is its 20th word.
    let ticks: f64 = after.split_whitespace().nth(19)?.parse().ok()?;
    let boot: f64 = std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    Some(boot + ticks / USER_HZ)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs_f64();
        let start = start_time().expect("start time");
        assert!(
            start <= now + 1.0 && start > now - 3600.0,
            "{start} vs {now}"
        );
        // stdin, stdout and stderr at least (other tests open files concurrently).
        assert!(open_fds().expect("fds") >= 3);
        let status = std::fs::read_to_string("/proc/self/status").expect("status");
        assert!(status_kib(&status, "VmRSS:").expect("rss") > 100.0);
    }
}
