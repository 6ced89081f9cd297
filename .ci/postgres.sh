# Start a throw-away PostgreSQL on 127.0.0.1 for the test suite (installs Debian's package if missing).
# Exports WEIGHTLAB_TEST_PG_URL; tests that need PostgreSQL read it.
PG_PORT=${PG_PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
PG_DIR=${PG_DIR:-$(mktemp -d /tmp/weightlab-ci-pg.XXXXXX)}

start_postgres() {
  if ! command -v initdb >/dev/null && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  fi
  local bin; bin=$(dirname "$(ls /usr/lib/postgresql/*/bin/initdb | sort -V | tail -1)")
  local run=(); [ "$(id -u)" = 0 ] && run=(runuser -u postgres --)
  mkdir -p "$PG_DIR"; chown -R postgres "$PG_DIR" 2>/dev/null || true
  "${run[@]}" "$bin/initdb" -D "$PG_DIR/data" -U weightlab --auth=trust >/dev/null
  "${run[@]}" "$bin/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/log" -o "-p $PG_PORT -k $PG_DIR -c listen_addresses=127.0.0.1 -c max_connections=200" -w start >/dev/null
  "${run[@]}" "$bin/createdb" -h 127.0.0.1 -p "$PG_PORT" -U weightlab weightlab_test
  export WEIGHTLAB_TEST_PG_URL="postgresql+psycopg://weightlab@127.0.0.1:$PG_PORT/weightlab_test"
  echo "PostgreSQL started: $WEIGHTLAB_TEST_PG_URL"
}

stop_postgres() {
  local bin; bin=$(dirname "$(ls /usr/lib/postgresql/*/bin/pg_ctl | sort -V | tail -1)")
  local run=(); [ "$(id -u)" = 0 ] && run=(runuser -u postgres --)
  "${run[@]}" "$bin/pg_ctl" -D "$PG_DIR/data" -m fast stop >/dev/null 2>&1 || true
  rm -rf "$PG_DIR"
}
