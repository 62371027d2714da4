#!/usr/bin/env bash
# The whole test suite: formatting, clippy, then every test with real
# PostgreSQL (one throwaway cluster for the run) and real Nix (private
# stores per test). Installs what is missing first. Run as root (private
# stores need mount namespaces).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/setup.sh

# A fresh clone builds once: incremental state would only take disk space.
export CARGO_INCREMENTAL=0

ensure_all
ensure_moto
ensure_mmdebstrap
ensure_chromium
ensure_nextest

log "checking formatting"
cargo fmt --all -- --check

log "clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

log "building"
cargo build --workspace --all-targets --locked
cargo nextest run --workspace --no-run --locked

log "running the tests (PostgreSQL cluster for this run, private Nix stores per test)"
status=0
./target/debug/with-postgres -- cargo nextest run --workspace --locked --no-fail-fast "$@" || status=$?

# What matters again on the current Nix: Nix 2.26 from a Debian 13 root
# (made on first use, cached in ~/.cache/hydra-queue-runner), sandboxed,
# with build users of each store's own: the daemon client at protocol 1.38,
# the Hydra-like jobsets, CA resolution and early cutoff, builder faults,
# binary caches and substitution. Skipped when a filter was given (the
# arguments above).
if [ "$#" -eq 0 ]; then
  log "again against Nix 2.26 (sandbox on, build users)"
  HQ_NIX=2.26 ./target/debug/with-postgres -- cargo nextest run --locked --no-fail-fast \
    -E 'binary(daemon_client) | binary(pipeline) | binary(content_addressed) | binary(faults) | binary(substitution) | binary(binary_cache) | binary(hydra_dropin)' \
    || status=$?
fi
exit "$status"
