#!/usr/bin/env bash
# with-pg.sh COMMAND [ARG...]
# Runs COMMAND against a throwaway PostgreSQL: a new cluster in a temp
# directory, owned by the `postgres` user when run as root (the server refuses
# to run as root), on a free port of 127.0.0.1 and a socket in the temp dir.
# The server and the directory are removed on exit, also when COMMAND fails or
# the script is interrupted; processes that specs started and recorded in
# $PGL_TEST_PIDS are killed too.  Exits with COMMAND's status.
#
# Exported for COMMAND: PGHOST PGPORT PGUSER PGDATABASE (libpq), PGL_TEST_DIR,
# PGL_TEST_CTL (a command: `$PGL_TEST_CTL stop|crash|start|restart`; crash is
# `pg_ctl -m immediate stop`), and for a
# second server on 127.0.0.1 (unless PGL_TEST_SERVERS=1) PGL_TEST_PORT2 and
# PGL_TEST_CTL2.
set -u
PGBIN=${PGBIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1)}
[ -x "$PGBIN/initdb" ] || { echo "with-pg: no PostgreSQL server binaries (PGBIN=$PGBIN)" >&2; exit 1; }
here=$(cd "$(dirname "$0")" && pwd)

dir=$(mktemp -d "${TMPDIR:-/tmp}/pglisten-test.XXXXXX") || exit 1
chmod 755 "$dir"
as_pg=()
if [ "$(id -u)" = 0 ]; then
  id postgres >/dev/null 2>&1 || useradd --system --home-dir "$dir" postgres
  chown postgres "$dir"
  as_pg=(runuser -u postgres --)
fi
export PGL_TEST_DIR=$dir PGL_TEST_PIDS=$dir/pids
: >"$PGL_TEST_PIDS"; chmod 666 "$PGL_TEST_PIDS"

cleanup() {
  local rc=$?
  trap - EXIT INT TERM HUP
  if [ -s "$PGL_TEST_PIDS" ]; then
    # processes specs started: their pids, one a line
    while read -r pid; do kill -KILL "$pid" 2>/dev/null; done <"$PGL_TEST_PIDS"
  fi
  for data in "$dir/data" "$dir/data2"; do
    if [ -f "$data/postmaster.pid" ]; then
      "${as_pg[@]}" "$PGBIN/pg_ctl" -D "$data" -m immediate -w -t 30 stop >/dev/null 2>&1
    fi
  done
  # a server a control script was restarting when we were interrupted (no
  # postmaster.pid at the moment we looked): its postmaster names our dir
  pkill -KILL -f "^$PGBIN/postgres -D $dir/" 2>/dev/null
  rm -rf "$dir"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

free_port() {
  local p
  for _ in $(seq 50); do
    p=$((20000 + RANDOM % 30000))
    (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null || { echo "$p"; return 0; }
  done
  return 1
}

# start_cluster NAME: a cluster in $dir/NAME, its port in $port, and a
# control script $dir/NAME.ctl (stop|start|restart).
start_cluster() {
  local name=$1 data=$dir/$1 started= attempt
  "${as_pg[@]}" "$PGBIN/initdb" -D "$data" -U postgres -A trust -E UTF8 --locale=C.UTF-8 --no-sync \
    >"$dir/$name-initdb.log" 2>&1 </dev/null || { cat "$dir/$name-initdb.log" >&2; return 1; }
  for attempt in 1 2 3 4 5; do
    port=$(free_port) || break
    cat >"$data/postgresql.auto.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$dir'
fsync = off
synchronous_commit = ${sync_commit:-off}
full_page_writes = off
max_connections = 200
log_min_messages = warning
wal_level = logical
max_wal_senders = 20
max_replication_slots = 20
CONF
    if "${as_pg[@]}" "$PGBIN/pg_ctl" -D "$data" -l "$dir/$name.log" -w -t 30 start >/dev/null 2>&1 </dev/null; then
      started=1; break
    fi
  done
  [ -n "$started" ] || { echo "with-pg: could not start PostgreSQL" >&2; cat "$dir/$name.log" >&2 2>/dev/null; return 1; }
  cat >"$dir/$name.ctl" <<CTL
#!/bin/sh
# \$0 stop|crash|start|restart -- a throwaway server of this test run
# (never with make check's sanitizer runtimes, which specs' children inherit)
unset LD_PRELOAD
case "\$1" in
  stop) exec ${as_pg[*]} "$PGBIN/pg_ctl" -D "$data" -m fast -w -t 30 stop ;;
  crash) exec ${as_pg[*]} "$PGBIN/pg_ctl" -D "$data" -m immediate -w -t 30 stop ;;
  start) exec ${as_pg[*]} "$PGBIN/pg_ctl" -D "$data" -l "$dir/$name.log" -w -t 30 start ;;
  restart) exec ${as_pg[*]} "$PGBIN/pg_ctl" -D "$data" -l "$dir/$name.log" -m fast -w -t 30 restart ;;
  *) echo "usage: \$0 stop|crash|start|restart" >&2; exit 2 ;;
esac
CTL
  chmod 755 "$dir/$name.ctl"
}

start_cluster data || exit 1
export PGL_TEST_CTL=$dir/data.ctl
main_port=$port
# a second server, for a target database that goes down on its own (PGL_TEST_SERVERS=1: none).
# It commits with synchronous_commit = on: a target commit that a crash could
# take back must not count as applied (pglisten.apply, spec 30).  fsync stays
# off on purpose: the specs crash the postmaster (-m immediate, SIGKILL), not
# the machine, and what a commit wrote to the OS page cache survives a
# postmaster crash; only an OS crash or power loss would need fsync.
if [ "${PGL_TEST_SERVERS:-2}" -ge 2 ]; then
  sync_commit=on start_cluster data2 || exit 1
  export PGL_TEST_CTL2=$dir/data2.ctl PGL_TEST_PORT2=$port
fi
port=$main_port
export PGHOST=127.0.0.1 PGPORT=$port PGUSER=postgres PGDATABASE=postgres
unset PGPASSWORD PGSERVICE PGOPTIONS DATABASE_URL
echo "with-pg: PostgreSQL $("$PGBIN/postgres" --version | awk '{print $3}') on 127.0.0.1:$port ($dir)" >&2

"$@" </dev/null
