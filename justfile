# dlb tasks; `just --list` shows them. Recipes pass extra arguments through.
set positional-arguments
set shell := ["bash", "-euo", "pipefail", "-c"]

# Where `call` and `bench` send work: the gateway.
addr := env_var_or_default("DLB_ADDR", "127.0.0.1:12000")

# Show the recipes
default:
    @just --list

# Run every test (what CI runs)
test:
    cargo test --workspace --locked

# Format all code
fmt:
    cargo fmt --all

# Check formatting and lints; warnings are errors
lint:
    cargo fmt --all --check
    cargo clippy --workspace --all-targets --locked -- -D warnings

# Build release binaries into target/release
build:
    cargo build --workspace --release --locked

# Run one compute instance in the foreground (e.g. `just compute --id B --listen 127.0.0.1:13002`)
compute *args: build
    target/release/dlb-compute "$@"

# Run the gateway in the foreground over three local instances (override with --backend ...)
gateway *args: build
    target/release/dlb-gateway --backend A=127.0.0.1:13001 --backend B=127.0.0.1:13002 --backend C=127.0.0.1:13003 "$@"

# Call one operation (e.g. `just call prime 97`, `just call fib 1000`)
call *args: build
    target/release/dlb call --addr {{addr}} "$@"

# Load test with dlb bench (e.g. `just bench -c 64 -d 10`, `just bench --rate 5000`)
bench *args: build
    target/release/dlb bench --addr {{addr}} "$@"

# Operation benchmarks (criterion) against GMP and `wc -w`, with ratios
bench-ops:
    scripts/bench-ops
