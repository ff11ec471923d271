#!/usr/bin/env bash
# Throwaway Postgres for development and tests. Nothing here is fit for real data: trust auth,
# fsync off.
#
#   scripts/pg.sh start DIR PORT   start (or reuse) a cluster in DIR on 127.0.0.1:PORT;
#                                  prints DATABASE_URL on stdout, logs on stderr
#   scripts/pg.sh stop DIR         stop it (no error when it is not running)
#   scripts/pg.sh status DIR       exit 0 and print the URL when running, exit 3 otherwise
#
# Layout: DIR/data (cluster), DIR/postgres.log, DIR/initdb.log, and the Unix socket in DIR.
# Postgres 15 by default (the schema needs >= 15: UNIQUE NULLS NOT DISTINCT); PGBIN overrides,
# PG_MAX_CONNECTIONS sets max_connections (default 200).
# initdb refuses to run as root, so as root the cluster belongs to the `postgres` user and
# initdb/pg_ctl run through `runuser -u postgres --`.
set -euo pipefail

usage() { echo "usage: pg.sh start DIR PORT | stop DIR | status DIR" >&2; exit 64; }
die() { local code="$1"; shift; echo "pg.sh: $*" >&2; exit "$code"; }

find_pgbin() {
  if [ -n "${PGBIN:-}" ]; then echo "$PGBIN"; return; fi
  if [ -x /usr/lib/postgresql/15/bin/initdb ]; then echo /usr/lib/postgresql/15/bin; return; fi
  # Otherwise the newest installed major version >= 15.
  local d v best=""
  for d in /usr/lib/postgresql/*/bin; do
    v="${d#/usr/lib/postgresql/}"; v="${v%/bin}"
    [[ "$v" =~ ^[0-9]+$ ]] && [ "$v" -ge 15 ] && [ -x "$d/initdb" ] || continue
    if [ -z "$best" ] || [ "$v" -gt "${best#*:}" ]; then best="$d:$v"; fi
  done
  echo "${best%:*}"
}

PGBIN="$(find_pgbin)"
[ -n "$PGBIN" ] && [ -x "$PGBIN/initdb" ] && [ -x "$PGBIN/pg_ctl" ] \
  || die 69 "no Postgres >= 15 server binaries in /usr/lib/postgresql (run scripts/setup.sh, or set PGBIN)"

is_root() { [ "$(id -u)" = 0 ]; }
as_owner() { if is_root; then runuser -u postgres -- "$@"; else "$@"; fi; }

# The pid in DIR/data/postmaster.pid, if that process is alive and is a postgres. A pid file
# left by a crash (or a reboot, where the pid may now belong to anything) does not count.
live_pid() {
  local pidfile="$data/postmaster.pid" pid
  [ -f "$pidfile" ] || return 1
  pid="$(head -n1 "$pidfile" 2>/dev/null || true)"
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  [ -d "/proc/$pid" ] || return 1
  case "$(cat "/proc/$pid/comm" 2>/dev/null)" in postgres*) echo "$pid" ;; *) return 1 ;; esac
}

# Port of the running cluster, from line 4 of postmaster.pid.
running_port() { sed -n 4p "$data/postmaster.pid" 2>/dev/null; }

url() { echo "postgres://postgres@127.0.0.1:$1/postgres"; }

wait_ready() {
  local port="$1" i
  for i in $(seq 1 100); do
    "$PGBIN/pg_isready" -q -h 127.0.0.1 -p "$port" -U postgres -d postgres && return 0
    sleep 0.1
  done
  return 1
}

cmd="${1:-}"; dir="${2:-}"
[ -n "$cmd" ] && [ -n "$dir" ] || usage

case "$cmd" in
  start)
    port="${3:-}"
    [[ "$port" =~ ^[0-9]+$ ]] && [ "$port" -ge 1 ] && [ "$port" -le 65535 ] || usage
    mkdir -p "$dir"
    dir="$(cd "$dir" && pwd)"
    data="$dir/data"
    # Unix socket paths are limited to 107 bytes; fail here rather than with a cryptic FATAL.
    [ "${#dir}" -le 90 ] || die 64 "DIR path is too long for a Unix socket (${#dir} > 90 characters): $dir"

    if is_root; then
      id postgres >/dev/null 2>&1 || die 69 "no 'postgres' user to own the cluster (run scripts/setup.sh)"
      chown postgres:postgres "$dir"
      if [ -d "$data" ] && [ "$(stat -c %U "$data")" != postgres ]; then chown -R postgres:postgres "$data"; fi
      runuser -u postgres -- test -w "$dir" -a -x "$dir" \
        || die 77 "the postgres user cannot write $dir (a parent directory is closed to it?); use a directory under /tmp"
    fi

    if pid="$(live_pid)"; then
      # Already running: reuse it, wherever it listens.
      have="$(running_port)"
      if [ "$have" != "$port" ]; then
        echo "pg.sh: cluster in $dir is already running on port $have (not $port); reusing it" >&2
        port="$have"
      fi
      wait_ready "$port" || die 70 "cluster in $dir (pid $pid) is running but not accepting connections; see $dir/postgres.log"
      url "$port"
      exit 0
    fi
    rm -f "$data/postmaster.pid"   # stale: its process is gone

    if [ ! -f "$data/PG_VERSION" ]; then
      rm -rf "$data"               # a half-made cluster from an interrupted initdb
      as_owner "$PGBIN/initdb" -D "$data" -U postgres --auth=trust -E UTF8 --locale=C --no-sync \
        >"$dir/initdb.log" 2>&1 || { cat "$dir/initdb.log" >&2; die 70 "initdb failed"; }
    fi
    # Settings live in the cluster, so a plain `pg_ctl start` later gets them too. Clusters made
    # by an older pg.sh (settings passed with -o) get them on their next start.
    if ! grep -q '^# --- scripts/pg.sh' "$data/postgresql.conf"; then
      as_owner tee -a "$data/postgresql.conf" >/dev/null <<CONF

# --- scripts/pg.sh: throwaway cluster, not for real data ---
listen_addresses = '127.0.0.1'
unix_socket_directories = '${dir//\'/\'\'}'
max_connections = ${PG_MAX_CONNECTIONS:-200}
fsync = off
synchronous_commit = off
full_page_writes = off
CONF
    fi

    # The port is given at every start, so one DIR can be started on another port later.
    if ! as_owner "$PGBIN/pg_ctl" -D "$data" -l "$dir/postgres.log" -w -t 60 -o "-p $port" start >/dev/null; then
      tail -n 20 "$dir/postgres.log" >&2 || true
      die 70 "Postgres did not start (port $port taken?); full log: $dir/postgres.log"
    fi
    wait_ready "$port" || die 70 "Postgres started but does not accept connections on 127.0.0.1:$port; see $dir/postgres.log"
    url "$port"
    ;;
  stop)
    data="$dir/data"
    [ -f "$data/PG_VERSION" ] || exit 0
    live_pid >/dev/null || { rm -f "$data/postmaster.pid"; exit 0; }
    as_owner "$PGBIN/pg_ctl" -D "$data" -m fast -w -t 30 stop >/dev/null 2>&1 \
      || as_owner "$PGBIN/pg_ctl" -D "$data" -m immediate -w -t 30 stop >/dev/null 2>&1 \
      || die 70 "could not stop the cluster in $dir"
    ;;
  status)
    data="$dir/data"
    live_pid >/dev/null || exit 3
    url "$(running_port)"
    ;;
  *) usage ;;
esac
