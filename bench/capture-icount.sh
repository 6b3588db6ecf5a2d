#!/usr/bin/env bash
# What capture costs the writers, counted in instructions (callgrind), so that
# forms can be compared on a machine too noisy for wall-clock ratios.
#
#   PGL_SQL=schema.sql [PGL_SQL_BASE=old-schema.sql] bench/capture-icount.sh
#
# For each schema: a throwaway cluster (../shared/bench/pgtmp.sh) with
# capture.sh's table public.users and hand-written trigger; then, for each
# form, one single-user backend (postgres --single) under valgrind runs
# ICOUNT_N inserts (1000 per statement and transaction, as capture.sh, or
# one per transaction), and callgrind counts its instructions.  Per row:
# base = (I(none, N) - I(none, 0)) / N, capture = (I(form, N) - I(none, N)) / N,
# ratio = base / (base + capture): what capture.sh's "vs none" would be if
# time were instructions.  No NOTIFY listener (single-user mode): the queue
# is written at COMMIT all the same.  Markdown on stdout.
# Environment: ICOUNT_N (20000), ICOUNT_SINGLE_N (5000), BENCH_SHARED.
set -u
here=$(cd "$(dirname "$0")" && pwd)
shared=${BENCH_SHARED:-$here/../../shared/bench}
. "$shared/pgtmp.sh" || exit 1
command -v valgrind >/dev/null || { echo "capture-icount: no valgrind" >&2; exit 1; }
[ -f "${PGL_SQL:-}" ] || { echo "capture-icount: set PGL_SQL to the schema file" >&2; exit 1; }
N=${ICOUNT_N:-20000} SN=${ICOUNT_SINGLE_N:-5000}
work=$(mktemp -d /tmp/pglicount.XXXXXX); chmod 777 "$work"
trap 'pg_down; rm -rf "$work"' EXIT

ROW="CREATE TRIGGER cap AFTER INSERT OR UPDATE OR DELETE ON users FOR EACH ROW EXECUTE FUNCTION"
STMT="CREATE TRIGGER cap AFTER INSERT ON users REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION"
ddl() {
  case $1 in
    none) ;;
    hand-trigger) echo "$ROW hand_notify()" ;;
    notify_row) echo "$ROW pglisten.notify_trigger('users', 'notify')" ;;
    durable_row) echo "$ROW pglisten.notify_trigger('users', 'durable')" ;;
    notify_statement) echo "$STMT pglisten.notify_trigger('users', 'notify')" ;;
    durable_statement) echo "$STMT pglisten.notify_trigger('users', 'durable')" ;;
  esac
}
# script form rows batch: the single-user input (statements end with ";" and a blank line)
script() {
  local d; d=$(ddl "$1")
  [ -n "$d" ] && printf '%s;\n\n' "$d"
  if [ "$3" = 1 ]; then
    printf 'DO $$ BEGIN FOR k IN 1..%d LOOP INSERT INTO users (id, name, email) VALUES (k, %s || k, %s || k || %s); COMMIT; END LOOP; END $$;\n\n' \
      "$2" "'user'" "'user'" "'@example.com'"
  else
    printf 'DO $$ BEGIN FOR k IN 0..(%d/%d - 1) LOOP INSERT INTO users (id, name, email) SELECT g, %s || g, %s || g || %s FROM generate_series(k*%d + 1, (k+1)*%d) g; COMMIT; END LOOP; END $$;\n\n' \
      "$2" "$3" "'user'" "'user'" "'@example.com'" "$3" "$3"
  fi
  printf 'DROP TRIGGER IF EXISTS cap ON users;\n\nTRUNCATE users;\n\nTRUNCATE pglisten.outbox;\n\n'
}
# count form rows batch: instructions of one single-user backend
count() {
  script "$@" >"$work/in.sql"
  pg_as valgrind --tool=callgrind --callgrind-out-file="$work/cg.out" \
    "$PGBIN/postgres" --single -D "$PGTMP/data" -j postgres <"$work/in.sql" >"$work/run.log" 2>&1
  grep -q ERROR "$work/run.log" && { grep ERROR "$work/run.log" | head -n 3 >&2; }
  sed -n 's/^==[0-9]*== Collected : \([0-9]*\)/\1/p' "$work/run.log"
  rm -f "$work/cg.out"
}
table() { # rows batch forms...
  local n=$1 b=$2 z base f t; shift 2
  z=$(count none 0 "$b"); base=$(count none "$n" "$b")
  for f in "$@"; do
    if [ "$f" = none ]; then t=$base; else t=$(count "$f" "$n" "$b"); fi
    awk -v f="$f" -v t="$t" -v b="$base" -v z="$z" -v n="$n" -v s="$SCHEMA" \
      'BEGIN { printf "| %s | %s | %.0f | %.0f | %.2f |\n", f, s, (b - z) / n, (t - b) / n, (b - z) / (t - z) }'
  done
}
measure_schema() { # name file: prints table rows
  SCHEMA=$1
  pg_up >/dev/null || return 1
  trap 'pg_down; rm -rf "$work"' EXIT   # pg_up sets its own
  psql -qX -v ON_ERROR_STOP=1 -f "$2" >/dev/null 2>&1 || { echo "capture-icount: $2 does not install" >&2; return 1; }
  psql -qX -v ON_ERROR_STOP=1 >/dev/null <<'SQL' || return 1
CREATE TABLE users (id bigint PRIMARY KEY, name text, email text);
CREATE FUNCTION hand_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pg_notify('users', json_build_object('op', TG_OP, 'id', NEW.id, 'name', NEW.name, 'email', NEW.email)::text);
  RETURN NULL;
END $$;
SQL
  pg_stop
  if [ "$SCHEMA" = this ]; then
    table "$N" 1000 none hand-trigger notify_row durable_row notify_statement durable_statement >>"$work/batch.md"
  else
    table "$N" 1000 notify_row durable_row >>"$work/batch.md"
  fi
  table "$SN" 1 notify_row durable_row >>"$work/single.md"
  pg_down
}
: >"$work/batch.md"; : >"$work/single.md"
measure_schema this "$PGL_SQL" || exit 1
[ -n "${PGL_SQL_BASE:-}" ] && { measure_schema base "$PGL_SQL_BASE" || exit 1; }

echo "### Instructions per row ($N rows, 1000 per transaction; callgrind, single-user backend)"
echo
echo "| capture | schema | base instr/row | capture instr/row | vs none |"
echo "|---|---|---|---|---|"
cat "$work/batch.md"
echo
echo "### Instructions per single-row transaction ($SN transactions of one INSERT)"
echo
echo "| capture | schema | base instr/tx | capture instr/tx | vs none |"
echo "|---|---|---|---|---|"
cat "$work/single.md"
