#!/usr/bin/env bash
# The demo: a throwaway PostgreSQL, a runner store and two builder stores
# (each in its own mount namespace), and a small real jobset queued in the
# database and built across the builders. Installs what is missing first.
# Run as root (private stores need mount namespaces).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/setup.sh

ensure_all
log "building the demo"
cargo build --locked --quiet -p hydra-testkit --bin hydra-demo
exec ./target/debug/hydra-demo "$@"
