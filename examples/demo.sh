#!/usr/bin/env bash
# demo.sh [01|04] -- an example end to end: two databases kept in sync by
# the real lua-pglisten runner.
#   01 (default)  examples/01-sync-table: a NOTIFY trigger, resync on connect
#   04            examples/04-cdc: change data capture from the WAL (a slot),
#                 the existing rows copied first (the initial snapshot)
# `make demo [EXAMPLE=04]` runs it under scripts/with-pg.sh, which points the
# PG* environment at a throwaway server (wal_level = logical); run by hand,
# it uses whatever server PG* names and (re)creates demo_source and
# demo_target there (example 04 drops its slot at the end).
#
# Exits 0 when the target matched the source and the runner stopped cleanly
# on SIGTERM, non-zero otherwise.
set -u
cd "$(dirname "$0")/.." || exit 1

RUNNER=${DEMO_RUNNER:-build/lua-pglisten}
EXAMPLE=${1:-01}
case $EXAMPLE in
  01|1) EXAMPLE=01 SCRIPT=examples/01-sync-table/handler.lua ;;
  04|4) EXAMPLE=04 SCRIPT=examples/04-cdc/handler.lua ;;
  *) echo "usage: examples/demo.sh [01|04]" >&2; exit 2 ;;
esac
SRC=demo_source
DST=demo_target
TIMEOUT=30

[ -x "$RUNNER" ] || { echo "demo: $RUNNER is missing; run make first" >&2; exit 1; }
command -v psql >/dev/null || { echo "demo: psql is missing" >&2; exit 1; }

work=$(mktemp -d "${TMPDIR:-/tmp}/pglisten-demo.XXXXXX") || exit 1
log=$work/runner.log
runner_pid= writer_pid=

cleanup() {
  local rc=$?
  trap - EXIT INT TERM HUP
  for pid in $runner_pid $writer_pid; do
    if kill -0 "$pid" 2>/dev/null; then
      kill -KILL "$pid" 2>/dev/null
      wait "$pid" 2>/dev/null
    fi
  done
  rm -rf "$work"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

# psql without NOTICEs (DROP ... IF EXISTS and friends)
psql() { PGOPTIONS='-c client_min_messages=warning' command psql "$@"; }
sql() { psql -qtAX -v ON_ERROR_STOP=1 -d "$1" -c "$2"; }
say() { printf '%s\n' "$*"; }
fail() {
  say "demo FAILED: $*"
  if [ -s "$log" ]; then say "runner log:"; sed 's/^/  | /' "$log"; fi
  exit 1
}
# The runner's log lines worth showing, without timestamps.
show_log() {
  grep -E "$1" "$log" | sed -E 's/^[^ ]+ +/  | /'
}
# "rows checksum" of a database's users table.
state() {
  sql "$1" "SELECT count(*) || ' rows, md5 ' || left(md5(coalesce(string_agg(u::text, E'\n' ORDER BY u.id), '')), 12) FROM users u"
}

# Example 04's two tables, as one "rows checksum" line.
state04() {
  sql "$1" "SELECT (SELECT count(*) || ' users, md5 ' || left(md5(coalesce(string_agg(u::text, E'\n' ORDER BY u.id), '')), 8) FROM users u)
             || '; ' || (SELECT count(*) || ' orders, md5 ' || left(md5(coalesce(string_agg(o::text, E'\n' ORDER BY o.id), '')), 8) FROM orders o)"
}
# Polls until the two databases match (after the writer is done) or TIMEOUT.
wait_synced() { # state-function
  local start synced= writing=1 s t el
  start=$(date +%s.%N)
  while :; do
    if [ -n "$writing" ] && ! kill -0 "$writer_pid" 2>/dev/null; then
      wait "$writer_pid" || { cat "$work/writer.out"; fail "writing to the source"; }
      writing= writer_pid=
    fi
    s=$("$1" "$SRC") || fail "reading $SRC"
    t=$("$1" "$DST") || fail "reading $DST"
    el=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%4.1f", b - a }')
    if [ -z "$writing" ] && [ "$s" = "$t" ]; then
      say "  ${el}s  source: $s"
      say "         target: $t   in sync"
      synced=1
      break
    fi
    say "  ${el}s  source: $s"
    say "         target: $t"
    kill -0 "$runner_pid" 2>/dev/null || fail "the runner died"
    awk -v e="$el" -v t="$TIMEOUT" 'BEGIN { exit !(e + 0 >= t) }' && break
    sleep 0.5
  done
  [ -n "$synced" ] || fail "the target did not match the source within ${TIMEOUT} s"
}
stop_runner() {
  say "stopping the runner (SIGTERM)"
  kill -TERM "$runner_pid"
  for _ in $(seq 100); do
    kill -0 "$runner_pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$runner_pid" 2>/dev/null; then fail "the runner did not stop within 10 s of SIGTERM"; fi
  wait "$runner_pid"; rc=$?
  runner_pid=
  show_log ' (stopped)$'
  [ "$rc" = 0 ] || fail "the runner exited with status $rc"
  grep -q " ERROR " "$log" && fail "the runner logged errors"
}

demo04() {
  local slot=demo_cdc
  say "== lua-pglisten demo: change data capture from the WAL (examples/04-cdc) =="
  [ "$(sql postgres "SHOW wal_level")" = logical ] || fail "the server's wal_level is not logical"
  sql postgres "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = '$slot' AND database = '$SRC'" >/dev/null 2>&1
  for db in "$SRC" "$DST"; do
    sql postgres "DROP DATABASE IF EXISTS $db" && sql postgres "CREATE DATABASE $db" || fail "cannot create $db"
  done
  psql -qX -v ON_ERROR_STOP=1 -d "$SRC" -f examples/04-cdc/source.sql >/dev/null || fail "source.sql"
  psql -qX -v ON_ERROR_STOP=1 -d "$DST" -f examples/04-cdc/target.sql >/dev/null || fail "target.sql"
  sql "$SRC" "INSERT INTO users SELECT i, 'user' || i || '@example.com', 'User ' || i, 'Bio of user ' || i, now()
                FROM generate_series(1, 1000) i;
              INSERT INTO orders SELECT i, (i % 1000) + 1, (i % 97) + 0.5, 'new', now() FROM generate_series(1, 3000) i" \
    || fail "seeding the source"
  say "created $SRC (1000 users, 3000 orders: the snapshot copies them) and $DST (empty)"

  TARGET_URL="dbname=$DST" CDC_SLOT=$slot "$RUNNER" --db "dbname=$SRC" "$SCRIPT" 2>"$log" </dev/null &
  runner_pid=$!
  say "started: $RUNNER --db dbname=$SRC $SCRIPT  (pid $runner_pid)"
  for _ in $(seq 300); do
    grep -q " streaming" "$log" && break
    kill -0 "$runner_pid" 2>/dev/null || fail "the runner exited early"
    sleep 0.1
  done
  grep -q " streaming" "$log" || fail "the runner did not say 'streaming' within 30 s"
  show_log ' created (publication|replication slot) | snapshot table done | initial snapshot done | streaming '

  say "writing to $SRC: new users with orders, payments, a deleted user (its orders cascade), a 100 kB bio"
  psql -qX -v ON_ERROR_STOP=1 -d "$SRC" >"$work/writer.out" 2>&1 <<'SQL' &
BEGIN;
INSERT INTO users SELECT i, 'user' || i || '@example.com', 'User ' || i, NULL, now() FROM generate_series(1001, 1200) i;
INSERT INTO orders SELECT i, 1000 + (i % 200) + 1, 9.99, 'new', now() FROM generate_series(3001, 3600) i;
COMMIT;
SELECT pg_sleep(0.4);
UPDATE orders SET status = 'paid' WHERE id % 3 = 0;
DELETE FROM users WHERE id BETWEEN 1 AND 20;
SELECT pg_sleep(0.4);
UPDATE users SET bio = (SELECT string_agg(md5(g::text), '') FROM generate_series(1, 3200) g) WHERE id = 500;
UPDATE users SET name = 'Renamed (bio unchanged)' WHERE id = 500;
SQL
  writer_pid=$!
  wait_synced state04
  say "a few target rows:"
  psql -X -P pager=off -P footer=off -d "$DST" -c \
    "SELECT u.id, u.name, octet_length(u.bio) AS bio_bytes, count(o.id) AS orders, sum(o.amount) AS total
       FROM users u LEFT JOIN orders o ON o.user_id = u.id WHERE u.id IN (21, 500, 1001) GROUP BY u.id ORDER BY u.id" \
    | sed -e '/^$/d' -e 's/^/  /'
  stop_runner
  say "dropping the slot (lua-pglisten --drop-slot), so that the server keeps no WAL for it"
  TARGET_URL="dbname=$DST" CDC_SLOT=$slot "$RUNNER" --db "dbname=$SRC" --drop-slot "$SCRIPT" 2>>"$log" </dev/null \
    || fail "--drop-slot"
  say "demo OK: target matched the source; the runner exited 0"
  exit 0
}
[ "$EXAMPLE" = 04 ] && demo04

say "== lua-pglisten demo: keeping a table in sync (examples/01-sync-table) =="

for db in "$SRC" "$DST"; do
  sql postgres "DROP DATABASE IF EXISTS $db" && sql postgres "CREATE DATABASE $db" || fail "cannot create $db"
done
psql -qX -v ON_ERROR_STOP=1 -d "$SRC" -f examples/01-sync-table/source.sql >/dev/null || fail "source.sql"
psql -qX -v ON_ERROR_STOP=1 -d "$DST" -f examples/01-sync-table/target.sql >/dev/null || fail "target.sql"
sql "$SRC" "INSERT INTO users
            SELECT i, 'user' || i || '@example.com', 'User ' || i, 'Bio of user ' || i, now()
              FROM generate_series(1, 100) i" || fail "seeding the source"
say "created $SRC (100 users) and $DST (empty)"

SOURCE_URL="dbname=$SRC" TARGET_URL="dbname=$DST" \
  "$RUNNER" --db "dbname=$SRC" "$SCRIPT" 2>"$log" </dev/null &
runner_pid=$!
say "started: $RUNNER --db dbname=$SRC $SCRIPT  (pid $runner_pid)"

for _ in $(seq 100); do
  grep -q " listening" "$log" && break
  kill -0 "$runner_pid" 2>/dev/null || fail "the runner exited early"
  sleep 0.1
done
grep -q " listening" "$log" || fail "the runner did not say 'listening' within 10 s"
sleep 0.3
show_log ' listening | users resynced '

say "writing to $SRC: 300 inserts in 3 transactions, updates, deletes, one 20 kB bio"
# in the background, with pauses, so that the target can be seen catching up
psql -qX -v ON_ERROR_STOP=1 -d "$SRC" >"$work/writer.out" 2>&1 <<'SQL' &
BEGIN;
INSERT INTO users SELECT i, 'user' || i || '@example.com', 'User ' || i, 'Bio of user ' || i, now()
  FROM generate_series(101, 200) i;
COMMIT;
SELECT pg_sleep(0.4);
BEGIN;
INSERT INTO users SELECT i, 'user' || i || '@example.com', 'User ' || i, NULL, now()
  FROM generate_series(201, 300) i;
UPDATE users SET name = name || ' (renamed)', updated_at = now() WHERE id % 5 = 0;
COMMIT;
SELECT pg_sleep(0.4);
BEGIN;
INSERT INTO users SELECT i, 'user' || i || '@example.com', 'User ' || i, 'Bio ' || md5(i::text), now()
  FROM generate_series(301, 400) i;
DELETE FROM users WHERE id % 7 = 0;
COMMIT;
SELECT pg_sleep(0.4);
UPDATE users SET email = upper(email), updated_at = now() WHERE id BETWEEN 50 AND 80;
DELETE FROM users WHERE id BETWEEN 390 AND 400;
INSERT INTO users VALUES (1000, 'long@example.com', 'Long Bio', repeat('lorem ipsum ', 1700), now());
SQL
writer_pid=$!

start=$(date +%s.%N)
synced= writing=1
while :; do
  if [ -n "$writing" ] && ! kill -0 "$writer_pid" 2>/dev/null; then
    wait "$writer_pid" || { cat "$work/writer.out"; fail "writing to the source"; }
    writing= writer_pid=
  fi
  s=$(state "$SRC") || fail "reading $SRC"
  t=$(state "$DST") || fail "reading $DST"
  el=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%4.1f", b - a }')
  if [ -z "$writing" ] && [ "$s" = "$t" ]; then
    say "  ${el}s  source: $s   target: $t   in sync"
    synced=1
    break
  fi
  say "  ${el}s  source: $s   target: $t"
  kill -0 "$runner_pid" 2>/dev/null || fail "the runner died"
  awk -v e="$el" -v t="$TIMEOUT" 'BEGIN { exit !(e + 0 >= t) }' && break
  sleep 0.5
done
[ -n "$synced" ] || fail "the target did not match the source within ${TIMEOUT} s"

say "a few target rows:"
psql -X -P pager=off -P footer=off -d "$DST" -c \
  "SELECT id, email, name, left(bio, 24) AS bio, octet_length(bio) AS bio_bytes
     FROM users WHERE id IN (1, 5, 201, 1000) ORDER BY id" | sed -e '/^$/d' -e 's/^/  /'

say "stopping the runner (SIGTERM)"
kill -TERM "$runner_pid"
rc=
for _ in $(seq 100); do
  kill -0 "$runner_pid" 2>/dev/null || break
  sleep 0.1
done
if kill -0 "$runner_pid" 2>/dev/null; then fail "the runner did not stop within 10 s of SIGTERM"; fi
wait "$runner_pid"; rc=$?
runner_pid=
show_log ' (stopped)$'
[ "$rc" = 0 ] || fail "the runner exited with status $rc"
grep -q " ERROR " "$log" && fail "the runner logged errors"
say "demo OK: target matched the source; the runner exited 0"
