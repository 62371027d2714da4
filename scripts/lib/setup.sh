# Installs what the demo and the tests need on a fresh Debian machine, when
# missing: Nix (Debian's nix-bin), PostgreSQL 15 binaries, cargo-nextest.
# Sourced by scripts/test.sh and scripts/demo.sh.

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

apt_updated=
apt_install() {
  if [ -z "$apt_updated" ]; then
    as_root apt-get update -qq
    apt_updated=1
  fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

ensure_nix() {
  if ! command -v nix-store >/dev/null 2>&1; then
    log "installing Nix (nix-bin)"
    apt_install nix-bin
  fi
  # Private stores bind-mount a directory on /nix.
  [ -d /nix ] || as_root mkdir -p /nix
  for tool in unshare nsenter runuser; do
    command -v "$tool" >/dev/null 2>&1 || apt_install util-linux
  done
}

ensure_postgres() {
  if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null 2>&1; then
    log "installing PostgreSQL 15"
    apt_install postgresql-15 || apt_install postgresql
  fi
  id postgres >/dev/null 2>&1 || as_root useradd --system --no-create-home postgres
}

ensure_nextest() {
  if ! cargo nextest --version >/dev/null 2>&1; then
    log "installing cargo-nextest"
    cargo install cargo-nextest --locked
  fi
}

# A local S3-compatible server for the S3 destination tests (moto, from PyPI).
ensure_moto() {
  if ! command -v moto_server >/dev/null 2>&1; then
    log "installing moto (a local S3 server for tests)"
    python3 -m pip install --quiet 'moto[server]'
  fi
}

# mmdebstrap makes the Debian 13 root whose Nix 2.26 the current-Nix tests
# run (hydra_testkit::current_nix; the root itself is made on first use).
ensure_mmdebstrap() {
  if ! command -v mmdebstrap >/dev/null 2>&1; then
    log "installing mmdebstrap (a Debian 13 root with Nix 2.26 for the current-Nix tests)"
    apt_install mmdebstrap
  fi
}

ensure_chromium() {
  if ! command -v chromium >/dev/null 2>&1; then
    log "installing chromium (the status page is tested in a headless browser)"
    apt_install chromium
  fi
}

ensure_all() {
  ensure_nix
  ensure_postgres
}

export NIX_CONFIG="sandbox = false
build-users-group =
substituters =
experimental-features = nix-command ca-derivations"
