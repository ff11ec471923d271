#!/usr/bin/env bash
# What a promoted standby is asked for when replicas of the service follow a failover
# (issue 17, part 2). Not a timed test: it prints the rows and transactions the new primary
# served between its promotion and the moment every replica is quiet again.
#
#   benches/failover.sh [BINARY]       # default target/debug/nats-pg-auth
#   FAILOVER_USERS=100000 FAILOVER_REPLICAS=3 FAILOVER_AGE=330 benches/failover.sh
#
# It starts, under a fresh /tmp directory (removed at the end): a primary (scripts/pg.sh) with
# FAILOVER_USERS users in 100 accounts (made long ago: the change log is emptied as the prune
# would have), a streaming standby (pg_basebackup -R), a TCP proxy
# (python3) the replicas connect through, nats-server (NATS_SERVER_BIN) and FAILOVER_REPLICAS
# `serve` processes. When every replica holds the whole copy, and FAILOVER_AGE seconds later
# (default 330: the setup is then older than what a replica re-reads), the primary is stopped
# (immediate), the standby promoted, its pg_stat_database counters read, and the proxy pointed
# at it (every connection through it is closed, as a Kubernetes Service or HAProxy does for a
# dead backend). It then waits until every replica is ready and the counters stop moving for
# 12 s, and prints the difference, and the full reloads the replicas made (from /metrics).
# Needs root (the clusters belong to the postgres user), curl and python3.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="$(realpath "${1:-target/debug/nats-pg-auth}")"
USERS="${FAILOVER_USERS:-100000}"
REPLICAS="${FAILOVER_REPLICAS:-3}"
NATS="${NATS_SERVER_BIN:-$HOME/.cache/nats-pg-auth/nats-server-2.15.1/bin/nats-server}"
PGBIN=/usr/lib/postgresql/15/bin
work="$(mktemp -d /tmp/npa-fo.XXXXXX)"
chmod 755 "$work"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  scripts/pg.sh stop "$work/primary" >/dev/null 2>&1 || true
  scripts/pg.sh stop "$work/standby" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
P1=$(port); P2=$(port); PX=$(port); PN=$(port)
psql_on() { local p="$1"; shift; psql -X -q -At "postgres://postgres@127.0.0.1:$p/fo" "$@"; }

scripts/pg.sh start "$work/primary" "$P1" >/dev/null
psql -X -q "postgres://postgres@127.0.0.1:$P1/postgres" -c "CREATE DATABASE fo"
DATABASE_URL="postgres://postgres@127.0.0.1:$PX/fo"
export DATABASE_URL

# The proxy: forwards to the port in $work/target; restarted to switch (closing every connection).
cat >"$work/proxy.py" <<'PY'
import asyncio, sys
listen, target = int(sys.argv[1]), int(sys.argv[2])
async def pipe(r, w):
    try:
        while (b := await r.read(65536)):
            w.write(b); await w.drain()
    except Exception: pass
    finally: w.close()
async def handle(cr, cw):
    try: sr, sw = await asyncio.open_connection("127.0.0.1", target)
    except Exception: cw.close(); return
    await asyncio.gather(pipe(cr, sw), pipe(sr, cw))
async def main():
    s = await asyncio.start_server(handle, "127.0.0.1", listen, reuse_address=True)
    async with s: await s.serve_forever()
asyncio.run(main())
PY
python3 "$work/proxy.py" "$PX" "$P1" & proxy=$!; pids+=("$proxy")

"$BIN" migrate >/dev/null
"$BIN" init --operator-name failover --resolver-dir "$work/jwt" --out "$work/fragment.conf" >/dev/null
psql_on "$P1" <<SQL
INSERT INTO nats.accounts (name) SELECT 'tenant' || i FROM generate_series(1, 100) i;
INSERT INTO nats.users (account_id, username, password_hash)
  SELECT a.id, 'user' || u, (SELECT crypt('pw', gen_salt('bf', 4)))
  FROM generate_series(1, $USERS) u JOIN nats.accounts a ON a.name = 'tenant' || (1 + u % 100);
-- The users were made long ago: the change log holds none of them (the replicas' prune
-- deletes rows after 5 minutes; this is that prune).
DELETE FROM nats.changes;
SQL

mkdir -p "$work/standby"; chown postgres:postgres "$work/standby"
runuser -u postgres -- "$PGBIN/pg_basebackup" -h 127.0.0.1 -p "$P1" -U postgres -X stream -R -c fast -D "$work/standby/data"
echo "unix_socket_directories = '$work/standby'" >>"$work/standby/data/postgresql.auto.conf"
scripts/pg.sh start "$work/standby" "$P2" >/dev/null

printf 'listen: 127.0.0.1:%s\ninclude "fragment.conf"\n' "$PN" >"$work/nats.conf"
"$NATS" -c "$work/nats.conf" >"$work/nats.log" 2>&1 & pids+=($!)
http=()
for i in $(seq 1 "$REPLICAS"); do
  h=$(port); http+=("$h")
  "$BIN" serve --nats-url "nats://127.0.0.1:$PN" --http-listen "127.0.0.1:$h" \
    --db-pool-size 5 --callout-concurrency 3 >"$work/replica$i.log" 2>&1 & pids+=($!)
done
metric() { curl -s "http://127.0.0.1:$1/metrics" | awk -v m="$2" '$1 == m { print $2 }'; }
wait_for() { # seconds, description, command...
  local until=$((SECONDS + $1)) what="$2"; shift 2
  until "$@"; do
    [ "$SECONDS" -lt "$until" ] || { echo "timed out waiting for $what" >&2; tail -5 "$work"/replica*.log >&2; exit 1; }
    sleep 0.2
  done
}
all_loaded() {
  for h in "${http[@]}"; do
    curl -sf "http://127.0.0.1:$h/readyz" >/dev/null || return 1
    [ "$(metric "$h" nats_pg_auth_copy_users)" = "$USERS" ] || return 1
  done
}
wait_for 300 "every replica to load $USERS users" all_loaded
# Steady state: the setup (every user inserted, every account pushed) is older than the 5
# minutes a replica remembers the scopes it read, and the log holds none of it (as the prune
# leaves it). FAILOVER_AGE=0 measures a failover right after a change of every account.
sleep "${FAILOVER_AGE:-330}"
[ "${FAILOVER_AGE:-330}" = 0 ] || psql_on "$P1" -c "DELETE FROM nats.changes" >/dev/null
reloads() { local n=0; for h in "${http[@]}"; do n=$((n + $(metric "$h" nats_pg_auth_copy_reloads_total))); done; echo "$n"; }
# The standby has everything; then the failover.
# (a synchronous commit flushes the WAL before it: scripts/pg.sh turns synchronous_commit off)
lsn=$(psql_on "$P1" -c "SET synchronous_commit = on" -c "SELECT pg_current_xact_id()" -c "SELECT pg_current_wal_flush_lsn()" | tail -n 1)
wait_for 30 "the standby to replay" test "$(psql_on "$P2" -c "SELECT pg_last_wal_replay_lsn() >= '$lsn'")" = t
r0=$(reloads)
runuser -u postgres -- "$PGBIN/pg_ctl" -m immediate -w -D "$work/primary/data" stop >/dev/null
runuser -u postgres -- "$PGBIN/pg_ctl" -w -D "$work/standby/data" promote >/dev/null
stats() { psql -X -q -At "postgres://postgres@127.0.0.1:$P2/postgres" -c "SELECT tup_returned + tup_fetched, xact_commit FROM pg_stat_database WHERE datname = 'fo'"; }
s0=$(stats)
kill "$proxy"; wait "$proxy" 2>/dev/null || true
python3 "$work/proxy.py" "$PX" "$P2" & proxy=$!; pids+=("$proxy")
start=$SECONDS
all_ready() { for h in "${http[@]}"; do curl -sf "http://127.0.0.1:$h/readyz" >/dev/null || return 1; done; }
wait_for 120 "every replica ready on the new primary" all_ready
# Quiet: the counters still for 12 s (an idle backend reports its counts within 10 s).
prev=""; still=0
while [ "$still" -lt 60 ] && [ $((SECONDS - start)) -lt 120 ]; do
  now=$(stats); [ "$now" = "$prev" ] && still=$((still + 1)) || still=0; prev="$now"; sleep 0.2
done
s1=$(stats)
read -r rows0 tx0 <<<"${s0/|/ }"; read -r rows1 tx1 <<<"${s1/|/ }"
echo "binary: $BIN"
echo "replicas: $REPLICAS, users: $USERS"
echo "rows read by the new primary (tup_returned + tup_fetched): $((rows1 - rows0))"
echo "transactions on the new primary: $((tx1 - tx0))"
echo "full reloads of the copy: $(( $(reloads) - r0 ))"
