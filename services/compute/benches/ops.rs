//! Criterion benchmarks of the operations' cores, without gRPC.
//!
//! `scripts/bench-ops` runs these and then the outside references (GMP through Python's gmpy2,
//! `wc -w`) in the same run, and prints the ratios.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use dlb_compute::ops::Cancel;
use dlb_compute::ops::fibonacci::fibonacci;
use dlb_compute::ops::prime::is_prime_u64;
use dlb_compute::ops::reverse::reverse;
use dlb_compute::ops::word_count::word_count;

/// The largest prime below 2^64: the worst case of the 64-bit test (every base runs).
const WORST_U64_PRIME: u64 = 18_446_744_073_709_551_557;

/// Size of the text for the throughput benchmarks.
const TEXT_BYTES: usize = 100 * 1024 * 1024;

/// Where the benchmark text is written, so `scripts/bench_reference.py` runs `wc -w` on the
/// very same bytes.
const TEXT_PATH: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../target/bench/text-100MiB.txt"
);

/// Deterministic ASCII text of words 1-12 letters long, spaces and a newline every ~10 words.
fn ascii_text(bytes: usize) -> String {
    let mut out = String::with_capacity(bytes + 16);
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    while out.len() < bytes {
        let r = next();
        let len = 1 + (r % 12) as usize;
        for i in 0..len {
            out.push((b'a' + ((r >> (8 + i * 4)) % 26) as u8) as char);
        }
        out.push(if r % 10 == 0 { '\n' } else { ' ' });
    }
    out.truncate(bytes);
    out
}

fn prime(c: &mut Criterion) {
    let mut group = c.benchmark_group("is_prime");
    group.bench_function("worst_u64_prime", |b| {
        b.iter(|| is_prime_u64(black_box(WORST_U64_PRIME)))
    });
    // A strong pseudoprime to bases 2..=23: composite, but only the later bases catch it.
    group.bench_function("u64_strong_pseudoprime", |b| {
        b.iter(|| is_prime_u64(black_box(3_825_123_056_546_413_051)))
    });
    group.finish();
}

fn fib(c: &mut Criterion) {
    let mut group = c.benchmark_group("fibonacci_decimal");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(10));
    let cancel = Cancel::new();
    for n in [1_000_000u64, 10_000_000] {
        group.bench_function(n.to_string(), |b| {
            b.iter(|| fibonacci(black_box(n), &cancel).map(|s| s.len()))
        });
    }
    group.finish();
}

fn text(c: &mut Criterion) {
    let text = ascii_text(TEXT_BYTES);
    let path = std::path::Path::new(TEXT_PATH);
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    if let Err(error) = std::fs::write(path, &text) {
        eprintln!("cannot write {TEXT_PATH}: {error}");
    }
    let cancel = Cancel::new();
    let mut group = c.benchmark_group("text_100MiB");
    group.sample_size(10);
    group.throughput(Throughput::Bytes(text.len() as u64));
    group.bench_function("word_count", |b| {
        b.iter(|| word_count(black_box(&text), 0, &cancel).map(|c| c.words))
    });
    group.bench_function("reverse", |b| b.iter(|| reverse(black_box(&text)).len()));
    group.finish();
}

criterion_group!(benches, prime, fib, text);
criterion_main!(benches);
