#!/usr/bin/env bash
# The benchmarks (issue #8), in release mode, against a throwaway
# PostgreSQL and private Nix stores. Tables go to stdout, JSON to
# bench-results/ (not committed). Run as root, like the tests.
#
#   scripts/bench.sh            # quick: every scenario at a reduced size (a few minutes)
#   scripts/bench.sh full       # every scenario at the issue's sizes (long: see README)
#   scripts/bench.sh makespan --shapes deep --jobs 8   # one scenario, any hydra-bench arguments
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/setup.sh

ensure_all

log "building (release)"
cargo build --release --locked -p hydra-bench -p hydra-testkit --bins

run() {
  log "hydra-bench $*"
  ./target/release/with-postgres -- ./target/release/hydra-bench "$@"
}

case "${1:-quick}" in
  quick)
    run makespan --size 0.25
    run latency --samples 100 --queued 2000
    run transfer --big-mib 256 --small 2000
    run ingest --builds 10000
    run scale --builders 100 --steps 10000 --seconds 20
    ;;
  full)
    run makespan --shapes wide-200,wide-1000,deep-100,deep-200,layered,mixed --repeat 3
    run latency
    run transfer
    run ingest
    run scale
    ;;
  *)
    run "$@"
    ;;
esac
