#!/usr/bin/env bash
# The project's test command: installs what is missing, starts a throwaway Postgres (unless
# NATS_PG_AUTH_TEST_DATABASE_URL points at one), then runs lints and every test.
#   ./scripts/test.sh            # fmt, clippy, unit + integration tests
#   ./scripts/test.sh login      # extra args go to `cargo test`
set -euo pipefail
cd "$(dirname "$0")/.."

eval "$(./scripts/setup.sh)"
export NATS_SERVER_BIN

pgdir=""
cleanup() { [ -n "$pgdir" ] && ./scripts/pg.sh stop "$pgdir"; [ -n "$pgdir" ] && rm -rf "$pgdir"; }
trap cleanup EXIT
if [ -z "${NATS_PG_AUTH_TEST_DATABASE_URL:-}" ]; then
  pgdir="$(mktemp -d /tmp/nats-pg-auth-test-pg.XXXXXX)"
  port="${NATS_PG_AUTH_TEST_PG_PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')}"
  NATS_PG_AUTH_TEST_DATABASE_URL="$(./scripts/pg.sh start "$pgdir" "$port")"
  export NATS_PG_AUTH_TEST_DATABASE_URL
fi
echo "test: Postgres at $NATS_PG_AUTH_TEST_DATABASE_URL, nats-server at $NATS_SERVER_BIN" >&2

# docker-compose.yaml against the Compose schema, offline (no container engine needed).
if docker compose version >/dev/null 2>&1; then
  docker compose -f docker-compose.yaml config --quiet
elif command -v docker-compose >/dev/null 2>&1; then
  docker-compose -f docker-compose.yaml config --quiet
else
  echo "test: no docker compose / docker-compose: docker-compose.yaml NOT schema-checked (scripts/setup.sh installs it as root)" >&2
fi

cargo fmt --all -- --check
cargo clippy --all-targets --quiet -- -D warnings
# Benches are compiled by clippy above but not run here: the load tool runs for minutes and is
# `cargo bench`'s job (see BENCHMARKS.md).
cargo test --lib --bins --tests "$@"
