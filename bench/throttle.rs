//! Cost of a throttle decision (count + check) and memory per tracked block.
//!
//! `cargo bench --bench throttle` runs the criterion benches, then measures
//! bytes per tracked block with a counting allocator and appends the figures
//! to `bench/RESULTS.md` (section "Throttle decisions").

use std::alloc::{GlobalAlloc, Layout, System};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, Criterion};
use magicmx::config::{Dur, ThrottleConfig, TrustConfig};
use magicmx::throttle::Throttle;

/// Counts live heap bytes, to measure the table's memory.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size(), Ordering::Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new, Ordering::Relaxed);
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn config() -> ThrottleConfig {
    ThrottleConfig {
        // Limits high enough that the benchmark measures counting, not refusing.
        max_connections: u32::MAX / 2,
        max_messages: u32::MAX / 2,
        max_recipients: u32::MAX / 2,
        window: Dur::secs(3600),
        epoch: Dur::secs(60),
        ..ThrottleConfig::default()
    }
}

fn ip(i: u32) -> IpAddr {
    // Spread over distinct /24s: 10.a.b.c with (a, b) from i.
    IpAddr::V4(Ipv4Addr::new(10, (i >> 8) as u8, i as u8, 7))
}

const NOW: u64 = 1_800_000_000_000;

/// `threads` threads make `iters` decisions in total; returns the wall time.
fn contended(t: &Arc<Throttle>, threads: u32, iters: u64, blocks: u32, rcpt: bool) -> Duration {
    let per = iters / threads as u64 + 1;
    let start = Instant::now();
    std::thread::scope(|s| {
        for th in 0..threads {
            let t = t.clone();
            s.spawn(move || {
                let mut x = th.wrapping_mul(2_654_435_761);
                for _ in 0..per {
                    x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                    let a = ip(x % blocks);
                    let d = if rcpt {
                        t.on_rcpt(a, NOW)
                    } else {
                        t.on_connect(a, NOW)
                    };
                    std::hint::black_box(d);
                }
            });
        }
    });
    start.elapsed()
}

fn decisions(c: &mut Criterion) {
    let mut g = c.benchmark_group("throttle");
    g.warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(20);
    for &(threads, blocks) in &[(1u32, 1u32), (1, 10_000), (4, 1), (4, 10_000)] {
        for rcpt in [false, true] {
            let name = format!(
                "{}/threads={threads}/blocks={blocks}",
                if rcpt { "rcpt" } else { "connect" }
            );
            let t = Arc::new(Throttle::new(&config(), &TrustConfig::default(), "bench"));
            g.bench_function(&name, |b| {
                b.iter_custom(|iters| contended(&t, threads, iters, blocks, rcpt))
            });
        }
    }
    g.finish();
}

/// Live heap bytes per tracked block, for blocks with one active epoch and
/// for blocks with counts from 3 origins over 5 epochs.
fn bytes_per_block() -> (f64, f64) {
    let n = 100_000u32;
    let before = LIVE.load(Ordering::Relaxed);
    let t = Throttle::new(&config(), &TrustConfig::default(), "bench");
    for i in 0..n {
        t.on_connect(ip(i), NOW);
    }
    let one = (LIVE.load(Ordering::Relaxed) - before) as f64 / n as f64;
    drop(t);

    let before = LIVE.load(Ordering::Relaxed);
    let t = Throttle::new(&config(), &TrustConfig::default(), "bench");
    let origins: Vec<_> = ["a", "b"].iter().map(|o| t.origin(o)).collect();
    for i in 0..n {
        for e in 0..5u64 {
            let now = NOW - e * 60_000;
            t.on_connect(ip(i), now);
            for &o in &origins {
                let c = magicmx::throttle::Counts {
                    connections: 3,
                    messages: 2,
                    recipients: 4,
                };
                t.merge(o, t.block_of(ip(i)), t.epoch_of(now), c, NOW);
            }
        }
    }
    let busy = (LIVE.load(Ordering::Relaxed) - before) as f64 / n as f64;
    (one, busy)
}

criterion_group!(benches, decisions);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    let (one, busy) = bytes_per_block();
    println!(
        "bytes per tracked block: {one:.0} (1 origin, 1 epoch), {busy:.0} (3 origins x 5 epochs)"
    );
    write_results(one, busy);
}

/// Reads criterion's estimates and writes the section of bench/RESULTS.md.
fn write_results(one: f64, busy: f64) {
    let root = env!("CARGO_MANIFEST_DIR");
    let mut rows = String::new();
    for stage in ["connect", "rcpt"] {
        for &(threads, blocks) in &[(1u32, 1u32), (1, 10_000), (4, 1), (4, 10_000)] {
            let dir = format!(
                "{root}/target/criterion/throttle/{stage}_threads={threads}_blocks={blocks}/new/estimates.json"
            );
            let Ok(text) = std::fs::read_to_string(&dir) else {
                continue;
            };
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
                continue;
            };
            let ns = v["median"]["point_estimate"].as_f64().unwrap_or(f64::NAN);
            rows += &format!(
                "| {stage} | {threads} | {blocks} | {ns:.0} | {:.1} |\n",
                1e3 / ns
            );
        }
    }
    let section = format!(
        "## Throttle decisions\n\n\
         Command: `cargo bench --bench throttle` (criterion; each decision counts and checks; \
         threads share one table; wall time per decision across all threads).\n\n\
         | decision | threads | distinct blocks | ns per decision (median) | million decisions/s |\n\
         |---|---|---|---|---|\n{rows}\n\
         Memory per tracked block (live heap bytes, counting allocator, 100,000 blocks): \
         **{one:.0} bytes** with one origin and one epoch, **{busy:.0} bytes** with 3 origins × 5 epochs.\n\n"
    );
    replace_section(
        &format!("{root}/bench/RESULTS.md"),
        "## Throttle decisions",
        &section,
    );
}

/// Replaces (or appends) the section that starts with `heading`.
fn replace_section(path: &str, heading: &str, section: &str) {
    let old = std::fs::read_to_string(path).unwrap_or_else(|_| "# Benchmark results\n\n".into());
    let new = match old.find(heading) {
        Some(start) => {
            let rest = &old[start + heading.len()..];
            let end = rest
                .find("\n## ")
                .map(|i| start + heading.len() + i + 1)
                .unwrap_or(old.len());
            format!("{}{}{}", &old[..start], section, &old[end..])
        }
        None => format!("{}\n{}", old.trim_end(), "\n\n".to_string() + section),
    };
    let _ = std::fs::write(path, new);
}
