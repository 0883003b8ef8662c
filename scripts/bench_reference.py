"""Outside references for the operation benchmarks, compared with criterion's medians.

Run by scripts/bench-ops right after `cargo bench --bench ops`, so both sides share one run.
"""
import json
import pathlib
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
CRITERION = ROOT / "target" / "criterion"
TEXT = ROOT / "target" / "bench" / "text-100MiB.txt"
REPEATS = 5


def criterion_median_ns(group, bench):
    estimates = CRITERION / group / bench / "new" / "estimates.json"
    return json.loads(estimates.read_text())["median"]["point_estimate"]


def median_seconds(fn):
    samples = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main():
    try:
        import gmpy2
    except ImportError:
        sys.exit("gmpy2 missing: python3 -m venv .venv && .venv/bin/pip install gmpy2")
    rows = []
    ours = criterion_median_ns("is_prime", "worst_u64_prime") / 1e3
    rows.append(("is_prime(2^64-59)", f"{ours:.3f} us", "target <= 1 us", "met" if ours <= 1 else "NOT met"))
    for n in (1_000_000, 10_000_000):
        ours = criterion_median_ns("fibonacci_decimal", str(n)) / 1e9
        gmp = median_seconds(lambda: str(gmpy2.fib(n)))
        ratio = ours / gmp
        rows.append((f"fib({n:,}) + decimal", f"{ours * 1e3:.1f} ms", f"GMP {gmp * 1e3:.1f} ms",
                     f"{ratio:.2f}x GMP (target <= 5x, stretch 2x)"))
    size = TEXT.stat().st_size
    wc = median_seconds(lambda: subprocess.run(["wc", "-w", str(TEXT)], check=True,
                                               stdout=subprocess.DEVNULL))
    wc_gbs = size / wc / 1e9
    for bench in ("word_count", "reverse"):
        ours = criterion_median_ns("text_100MiB", bench) / 1e9
        gbs = size / ours / 1e9
        rows.append((f"{bench} 100 MiB ASCII", f"{gbs:.2f} GB/s", f"wc -w {wc_gbs:.2f} GB/s",
                     f"{gbs / wc_gbs:.1f}x wc -w (target >= 1 GB/s and > wc -w)"))
    print("\n| benchmark | dlb | reference | ratio |\n|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    out = ROOT / "target" / "bench" / "ops.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps([dict(zip(("benchmark", "dlb", "reference", "ratio"), r)) for r in rows], indent=2))
    print(f"\nwritten {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
