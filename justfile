# dlb tasks; `just --list` shows them. Recipes pass extra arguments through.
set positional-arguments
set shell := ["bash", "-euo", "pipefail", "-c"]

# Where `call`, `bench` and the grpcurl recipes send work: the gateway.
addr := env_var_or_default("DLB_ADDR", "127.0.0.1:12000")
# Where the grpcurl recipes find control.
control_addr := env_var_or_default("DLB_CONTROL_ADDR", "127.0.0.1:12001")
# The dlb CLI that `call` and `load` run: the release build (made first when missing), or
# DLB_BIN (then nothing is built).
dlb := env_var_or_default("DLB_BIN", "target/release/dlb")
# grpcurl: the one the quick start installs into .venv, else the one on PATH, so the recipes
# work in a fresh shell.
grpcurl := if path_exists(".venv/bin/grpcurl") == "true" { ".venv/bin/grpcurl" } else { "grpcurl" }

# Show the recipes
default:
    @just --list

# Build (release) and run the whole mesh; Ctrl-C stops everything (e.g. `just up --instances 5`)
up *args: build
    target/release/dlb up "$@"

# Stop a mesh started with `just up --detach`
down *args:
    cargo run --release --quiet --bin dlb -- down "$@"

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
call *args: cli
    {{dlb}} call --addr {{addr}} "$@"

# The benchmark suite: direct vs dlb-gateway vs NGINX vs HAProxy; report in target/bench/
bench *args: build
    target/release/dlb bench-suite "$@"

# Load test one address with dlb bench (e.g. `just load -c 64 -d 10`, `just load --rate 5000`)
load *args: cli
    {{dlb}} bench --addr {{addr}} "$@"

# The release build, unless DLB_BIN names the dlb binary to use
[private]
cli:
    [ -n "${DLB_BIN:-}" ] || cargo build --workspace --release --locked

# Operation benchmarks (criterion) against GMP and `wc -w`, with ratios
bench-ops:
    scripts/bench-ops

# grpcurl: list the gateway's services
list:
    {{grpcurl}} -plaintext {{addr}} list

# grpcurl: the gateway's health
health:
    {{grpcurl}} -plaintext {{addr}} grpc.health.v1.Health/Check

# grpcurl: is NUMBER prime? (e.g. `just prime 97`)
prime number:
    {{grpcurl}} -plaintext -d "$(python3 -c 'import json, sys; print(json.dumps({"number": sys.argv[1]}))' "$1")" {{addr}} dlb.v1.Operations/IsPrime

# grpcurl: is TEXT a palindrome, ignoring case, spaces and punctuation?
palindrome text:
    {{grpcurl}} -plaintext -d "$(python3 -c 'import json, sys; print(json.dumps({"text": sys.argv[1], "normalize": True}))' "$1")" {{addr}} dlb.v1.Operations/IsPalindrome

# grpcurl: TEXT reversed
reverse text:
    {{grpcurl}} -plaintext -d "$(python3 -c 'import json, sys; print(json.dumps({"text": sys.argv[1]}))' "$1")" {{addr}} dlb.v1.Operations/Reverse

# grpcurl: the N-th Fibonacci number
fib n:
    {{grpcurl}} -plaintext -d "{\"n\": \"$1\"}" {{addr}} dlb.v1.Operations/Fibonacci

# grpcurl: words of TEXT and the 3 most frequent
wc text:
    {{grpcurl}} -plaintext -d "$(python3 -c 'import json, sys; print(json.dumps({"text": sys.argv[1], "top": 3}))' "$1")" {{addr}} dlb.v1.Operations/WordCount

# grpcurl: the gateway's per-instance stats
stats:
    {{grpcurl}} -plaintext {{addr}} dlb.v1.Gateway/Stats

# grpcurl: control's instances
instances:
    {{grpcurl}} -plaintext {{control_addr}} dlb.v1.Control/ListInstances
