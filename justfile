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

# Run control (three instances A, B, C on 13001-13003) in the foreground
control *args: build
    target/release/dlb-control "$@"

# Run the gateway in the foreground, following control on 12001
gateway *args: build
    target/release/dlb-gateway --control http://127.0.0.1:12001 "$@"

# Run the dashboard in the foreground on http://127.0.0.1:5000
ui *args: build
    target/release/dlb-ui "$@"

# Call one operation (e.g. `just call prime 97`, `just call fib 1000`)
call *args: build
    target/release/dlb call --addr {{addr}} "$@"

# Load test with dlb bench (e.g. `just bench -c 64 -d 10`, `just bench --rate 5000`)
bench *args: build
    target/release/dlb bench --addr {{addr}} "$@"

# Operation benchmarks (criterion) against GMP and `wc -w`, with ratios
bench-ops:
    scripts/bench-ops
