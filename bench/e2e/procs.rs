//! What a process costs, from /proc: CPU seconds (utime + stime, all
//! threads), resident memory, and, for Postfix, the sum over its master and
//! every child (a child that exited was reaped by the master, so its time
//! is in the master's cutime + cstime).

use std::sync::OnceLock;

fn clk_tck() -> f64 {
    static TCK: OnceLock<f64> = OnceLock::new();
    *TCK.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// Fields of /proc/PID/stat after the command name (field 3 is index 0).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// (ppid, utime+stime, cutime+cstime) in clock ticks.
fn stat(pid: u32) -> Option<(u32, u64, u64)> {
    let f = stat_fields(pid)?;
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    Some((n(1) as u32, n(11) + n(12), n(13) + n(14)))
}

/// CPU seconds used by `pid` itself (every thread).
pub fn cpu_secs(pid: u32) -> f64 {
    stat(pid)
        .map(|(_, own, _)| own as f64 / clk_tck())
        .unwrap_or(0.0)
}

fn pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Direct children of `ppid`.
pub fn children(ppid: u32) -> Vec<u32> {
    pids()
        .into_iter()
        .filter(|&p| stat(p).is_some_and(|(pp, _, _)| pp == ppid))
        .collect()
}

/// CPU seconds of a process tree one level deep, reaped children included
/// (Postfix's master and its daemons).
pub fn tree_cpu_secs(master: u32) -> f64 {
    let Some((_, own, reaped)) = stat(master) else {
        return 0.0;
    };
    let kids: u64 = children(master)
        .into_iter()
        .filter_map(stat)
        .map(|(_, own, _)| own)
        .sum();
    (own + reaped + kids) as f64 / clk_tck()
}

fn status_kb(pid: u32, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Resident set size in KiB.
pub fn rss_kb(pid: u32) -> u64 {
    status_kb(pid, "VmRSS:").unwrap_or(0)
}

/// Proportional set size in KiB (shared pages divided among their users).
pub fn pss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Pss:"))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

pub fn threads(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Threads:"))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// The 1-minute load average.
pub fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

/// CPU seconds used by every process on the machine (from /proc/stat), to
/// see how much else ran during a measurement.
pub fn machine_busy_secs() -> f64 {
    let s = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(cpu) = s.lines().next() else {
        return 0.0;
    };
    let v: Vec<u64> = cpu
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    let busy: u64 = v
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, x)| x)
        .take(6)
        .sum();
    busy as f64 / clk_tck()
}

/// CPU seconds of the threads of `pid` named `name` (comm).
pub fn thread_cpu_secs(pid: u32, name: &str) -> f64 {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0.0;
    };
    let mut ticks = 0u64;
    for e in dir.filter_map(|e| e.ok()) {
        let p = e.path();
        let comm = std::fs::read_to_string(p.join("comm")).unwrap_or_default();
        if comm.trim() != name {
            continue;
        }
        if let Ok(s) = std::fs::read_to_string(p.join("stat")) {
            if let Some(i) = s.rfind(')') {
                let f: Vec<&str> = s[i + 2..].split_whitespace().collect();
                let n = |k: usize| f.get(k).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
                ticks += n(11) + n(12);
            }
        }
    }
    ticks as f64 / clk_tck()
}
