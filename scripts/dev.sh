#!/usr/bin/env bash
# One command for a local playground: installs what is missing, starts a throwaway Postgres and
# a nats-server on loopback, runs `init` and `serve`, inserts a demo tenant and prints how to
# connect. Ctrl-C stops everything. State lives in ./.dev (delete it to start over).
# Environment: PG_PORT, NATS_PORT, WS_PORT, MQTT_PORT, HTTP_ADDR (where things listen), DEV_DIR
# (the state directory), NATS_PG_AUTH_BIN (a binary to run instead of building one).
set -euo pipefail
cd "$(dirname "$0")/.."

PG_PORT="${PG_PORT:-55433}"
NATS_PORT="${NATS_PORT:-4222}"
WS_PORT="${WS_PORT:-9222}"
MQTT_PORT="${MQTT_PORT:-1883}"
DEV="${DEV_DIR:-$PWD/.dev}"
mkdir -p "$DEV"

HTTP_ADDR="${HTTP_ADDR:-127.0.0.1:9464}"

eval "$(./scripts/setup.sh)"
if [ -n "${NATS_PG_AUTH_BIN:-}" ]; then
  BIN="$NATS_PG_AUTH_BIN"   # a binary built already (the test of this script uses its own)
else
  echo "dev: building nats-pg-auth (a few minutes the first time; cargo shows its progress)" >&2
  cargo build --bin nats-pg-auth
  BIN="$PWD/target/debug/nats-pg-auth"
fi

pids=()
cleanup() {
  trap - EXIT INT TERM   # once: a second TERM would make serve exit without finishing
  echo; echo "dev: stopping"
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  ./scripts/pg.sh stop "$DEV/pg"
}
trap cleanup EXIT INT TERM

ADMIN_URL="$(./scripts/pg.sh start "$DEV/pg" "$PG_PORT")"
psql "$ADMIN_URL" -qtAc "SELECT 1 FROM pg_database WHERE datname = 'nats_pg_auth'" | grep -q 1 \
  || psql "$ADMIN_URL" -qc "CREATE DATABASE nats_pg_auth"
export DATABASE_URL="${ADMIN_URL%/*}/nats_pg_auth"

"$BIN" init --operator-name dev --resolver-dir "$DEV/jwt" --out "$DEV/nats-pg-auth.conf"
cat > "$DEV/nats.conf" <<CONF
server_name: dev
listen: 127.0.0.1:$NATS_PORT
include "nats-pg-auth.conf"
jetstream: { store_dir: "$DEV/js", max_memory_store: 2GB, max_file_store: 10GB }
# Other doors, served from the same rows (README "Ways to connect").
websocket: { listen: "127.0.0.1:$WS_PORT", no_tls: true }
mqtt: { listen: "127.0.0.1:$MQTT_PORT" }
CONF
"$NATS_SERVER_BIN" -c "$DEV/nats.conf" >"$DEV/nats.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 50); do (exec 3<>/dev/tcp/127.0.0.1/$NATS_PORT) 2>/dev/null && break; sleep 0.1; done

# In its own process group (job control on for this one job): Ctrl-C sends SIGINT to the
# terminal's foreground group, and serve must get exactly one signal, cleanup's SIGTERM; a
# second one would make it exit without finishing ("second signal received").
set -m
"$BIN" serve --nats-url "nats://127.0.0.1:$NATS_PORT" --http-listen "$HTTP_ADDR" &
serve_pid=$!
set +m
pids+=($serve_pid)

psql "$DATABASE_URL" -q -v ON_ERROR_STOP=1 <<'SQL'
-- JetStream file storage (256 MiB) lets acme host MQTT clients (their sessions are file streams).
INSERT INTO nats.accounts (name, max_connections, max_jetstream_disk_storage)
  VALUES ('acme', 100, 268435456) ON CONFLICT (name) DO NOTHING;
INSERT INTO nats.roles (account_id, name, publish_permissions, subscribe_permissions)
  SELECT id, 'sensor', '{sensors.>,$SYS.REQ.USER.INFO}', '{sensors.>,_INBOX.>}' FROM nats.accounts WHERE name = 'acme'
  ON CONFLICT DO NOTHING;
INSERT INTO nats.users (account_id, role_id, username, password_hash)
  SELECT a.id, r.id, 'alice', crypt('s3cret', gen_salt('bf', 10))
  FROM nats.accounts a JOIN nats.roles r ON r.account_id = a.id WHERE a.name = 'acme'
  ON CONFLICT (username) DO NOTHING;
INSERT INTO nats.user_tokens (user_id, token_sha256, description)
  SELECT id, digest('demo-token', 'sha256'), 'dev.sh demo token' FROM nats.users WHERE username = 'alice'
  ON CONFLICT (token_sha256) DO NOTHING;
SQL

# "running" only once the callout has subscribed (/readyz 200) and acme is on the server.
readyz() {
  local host="${HTTP_ADDR%:*}" port="${HTTP_ADDR##*:}"
  { exec 3<>"/dev/tcp/$host/$port"; } 2>/dev/null || return 1
  printf 'GET /readyz HTTP/1.0\r\nHost: dev\r\n\r\n' >&3
  local status; IFS= read -r status <&3 || true
  exec 3<&-
  [[ "$status" == *" 200 "* ]]
}
echo "dev: waiting for nats-pg-auth to be ready (http://$HTTP_ADDR/readyz)" >&2
for i in $(seq 1 300); do
  kill -0 "$serve_pid" 2>/dev/null || { echo "dev: nats-pg-auth serve exited; see its log above" >&2; exit 1; }
  if readyz && [ "$(psql "$DATABASE_URL" -qtAc "SELECT synced_at IS NOT NULL FROM nats.accounts WHERE name = 'acme'")" = t ]; then
    break
  fi
  [ "$i" = 300 ] && { echo "dev: not ready after 60 s; see the log above" >&2; exit 1; }
  sleep 0.2
done

cat <<INFO

  nats-pg-auth is running.
    NATS:      nats://127.0.0.1:$NATS_PORT   (server log: .dev/nats.log)
    WebSocket: ws://127.0.0.1:$WS_PORT   MQTT: 127.0.0.1:$MQTT_PORT (user alice / s3cret, topics sensors/#)
    Postgres:  $DATABASE_URL
    HTTP:      http://$HTTP_ADDR/metrics, /readyz
  Demo tenant: account acme, role sensor (pub/sub sensors.>), user alice / s3cret, token demo-token
    $BIN try-login --user alice --password s3cret --publish sensors.t1 --payload 21.5
    $BIN try-login --token demo-token
    $BIN try-login --nats-url ws://127.0.0.1:$WS_PORT --user alice --password s3cret
  Add tenants with SQL:  psql "$DATABASE_URL"
  Ctrl-C stops everything.

INFO
wait
